package main

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/functions/sendemail"
	"github.com/outboxfn/outbox/shared/stream"
)

// REVIEW (hostile): outboxctl partitions checks "every group of every
// recorded stream" — a stream with unread entries and no group at all
// (Redis lost the group with a failover/flush and the relay re-published
// before sendemail re-created it, or sendemail was never started) has no
// group to complain, and the records are forgotten: the entries are never
// read by anyone once the relay and sendemail move to the new partitions.
func TestReviewPartitionsRefusesAStreamWithUnreadEntriesAndNoGroup(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.ops.partitions = partitions
	ctx := context.Background()
	old := stream.Name(b.ops.prefix, "user")
	_, err := b.ops.pool.Exec(ctx, `INSERT INTO outbox_streams (aggregate_type, batch, last_ms, last_seq, entries_added)
		VALUES ('user', 1, 0, 0, 1)`)
	require.NoError(t, err)
	b.xadd(t, old, userEvent(1).Fields()...)
	err = b.ops.command(ctx, []string{"partitions"})
	require.ErrorIs(t, err, errStreamsUnread, "an entry nobody has read: the switch strands it")
}

// REVIEW (hostile): outboxctl with STREAM_PARTITIONS left at its default
// while the relay's records say 6 (an operator who set it on the functions
// only) replays retained events into <prefix>user, which no sendemail with
// 6 partitions reads, and reports success; dlq list says "no dead letters"
// while the partitions hold some. Only status mentions the difference.
func TestReviewOutboxctlRefusesAnotherNumberOfPartitionsThanTheRelays(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	t.Run("replay", func(t *testing.T) {
		t.Parallel()
		b := setup(t) // STREAM_PARTITIONS unset: 1
		_, err := b.ops.pool.Exec(ctx, `INSERT INTO outbox_streams (aggregate_type, partition, partitions, batch, last_ms, last_seq, entries_added)
			SELECT 'user', p, 6, 1, 0, 0, 1 FROM generate_series(0, 5) AS p`)
		require.NoError(t, err)
		at := time.Now().Add(-time.Hour)
		for id := 1; id <= 6; id++ {
			b.retain(t, int64(id), userEvent(id), at)
		}
		err = b.ops.command(ctx, []string{"replay", "-since", "2h"})
		one := b.xlen(t, stream.Name(b.ops.prefix, "user"))
		require.Error(t, err, "replayed %d events into %s, a stream nobody reads with 6 partitions", one, stream.Name(b.ops.prefix, "user"))
	})
	t.Run("dlq list", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		_, err := b.ops.pool.Exec(ctx, `INSERT INTO outbox_streams (aggregate_type, partition, partitions, batch, last_ms, last_seq, entries_added)
			SELECT 'user', p, 6, 1, 0, 0, 1 FROM generate_series(0, 5) AS p`)
		require.NoError(t, err)
		key := stream.PartitionName(b.ops.prefix, "user", stream.Partition("1", 6), 6)
		b.xadd(t, sendemail.DeadLetterStream(key), append(userEvent(1).Fields(), sendemail.FieldDeadStream, key, sendemail.FieldDeadError, "refused")...)
		err = b.ops.command(ctx, []string{"dlq", "list"})
		require.Error(t, err, "dlq list printed %q while %s holds a dead letter", b.out.String(), fmt.Sprint(sendemail.DeadLetterStream(key)))
	})
}

// REVIEW (hostile): the relay's refusal tells the operator to "run
// outboxctl partitions 6 with STREAM_PARTITIONS=6" (functions/relay's
// partitionsChanged); outboxctl partitions takes no argument and refuses
// that command line.
func TestReviewTheRelaysAdviceIsACommandOutboxctlAccepts(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.ops.partitions = partitions
	require.NoError(t, b.ops.command(context.Background(), []string{"partitions", "6"}))
}
