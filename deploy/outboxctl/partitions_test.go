package main

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/functions/sendemail"
	"github.com/outboxfn/outbox/shared/stream"
)

// partitions is the STREAM_PARTITIONS of the tests of partitioned streams.
const partitions = 6

// userEvent is a user.created event for user id.
func userEvent(id int) stream.Event {
	return stream.Event{EventID: uuid.NewString(), EventType: "user.created", AggregateType: "user", AggregateID: fmt.Sprint(id),
		Payload: fmt.Sprintf(`{"user_id":%d,"email":"u%d@example.com","name":"U"}`, id, id), OccurredAt: time.Now().UTC().Truncate(time.Microsecond),
		OutboxID: int64(id)}
}

// xadd adds fields to key.
func (b *testBundle) xadd(t *testing.T, key string, fields ...string) {
	t.Helper()
	cmd := b.ops.redis.B().Xadd().Key(key).Id("*").FieldValue()
	for i := 0; i+1 < len(fields); i += 2 {
		cmd = cmd.FieldValue(fields[i], fields[i+1])
	}
	require.NoError(t, b.ops.redis.Do(context.Background(), cmd.Build()).Error())
}

func (b *testBundle) xlen(t *testing.T, key string) int64 {
	t.Helper()
	n, err := b.ops.redis.Do(context.Background(), b.ops.redis.B().Xlen().Key(key).Build()).AsInt64()
	require.NoError(t, err)
	return n
}

// With STREAM_PARTITIONS=6 outboxctl works on every partition: status
// lists each one's stream, dlq each one's dead letters, replay publishes
// each event to its aggregate's partition, and partitions switches the
// relay's records only once the old streams are read.
func TestOutboxctlWorksOnEveryPartition(t *testing.T) {
	t.Parallel()
	partitioned := func(t *testing.T) *testBundle {
		b := setup(t)
		b.ops.partitions = partitions
		return b
	}
	name := func(b *testBundle, id int) string { return b.ops.streamOf("user", fmt.Sprint(id)) }

	t.Run("status shows every partition's stream and the number of partitions", func(t *testing.T) {
		t.Parallel()
		b := partitioned(t)
		for id := 1; id <= 12; id++ {
			b.xadd(t, name(b, id), userEvent(id).Fields()...)
		}
		s, err := b.ops.status(context.Background())
		require.NoError(t, err)
		require.Equal(t, partitions, s.Partitions)
		var names []string
		var total int64
		for _, st := range s.Streams {
			names = append(names, st.Name)
			total += st.Length
		}
		for id := 1; id <= 12; id++ {
			require.Contains(t, names, name(b, id))
		}
		require.EqualValues(t, 12, total)
		printStatus(b.out, s)
		require.Contains(t, b.out.String(), "partitions: STREAM_PARTITIONS=6")
		require.Contains(t, b.out.String(), "stream "+name(b, 1)+":")
	})

	t.Run("dlq lists, redrives and drops the dead letters of every partition", func(t *testing.T) {
		t.Parallel()
		b := partitioned(t)
		ctx := context.Background()
		a, c := 1, 2
		for stream.Partition(fmt.Sprint(c), partitions) == stream.Partition(fmt.Sprint(a), partitions) {
			c++
		}
		for _, id := range []int{a, c} {
			fields := append(userEvent(id).Fields(), sendemail.FieldDeadStream, name(b, id), sendemail.FieldDeadError, "refused")
			b.xadd(t, sendemail.DeadLetterStream(name(b, id)), fields...)
		}
		letters, err := b.ops.dlqList(ctx, 0)
		require.NoError(t, err)
		require.Len(t, letters, 2)
		require.ElementsMatch(t, []string{name(b, a), name(b, c)}, []string{letters[0].Stream, letters[1].Stream})

		_, err = b.ops.dlqRedrive(ctx, []string{"9/" + letters[0].ID})
		require.ErrorIs(t, err, errNoSuchEntry, "there is no partition 9")
		if letters[0].ID == letters[1].ID {
			_, err := b.ops.dlqRedrive(ctx, []string{letters[0].ID})
			require.ErrorIs(t, err, errAmbiguousEntry, "added in the same millisecond, the letters share an id")
		}
		n, err := b.ops.dlqRedrive(ctx, []string{fmt.Sprintf("%d/%s", letters[0].Partition, letters[0].ID)})
		require.NoError(t, err)
		require.Equal(t, 1, n)
		require.EqualValues(t, 1, b.xlen(t, letters[0].Stream), "the letter went back to its own partition")
		n, err = b.ops.dlqDrop(ctx, nil)
		require.NoError(t, err)
		require.Equal(t, 1, n)
		require.Zero(t, b.xlen(t, sendemail.DeadLetterStream(letters[1].Stream)))
		require.Zero(t, b.xlen(t, letters[1].Stream), "dropped, not redriven")
	})

	t.Run("replay publishes each retained event to its aggregate's partition", func(t *testing.T) {
		t.Parallel()
		b := partitioned(t)
		at := time.Now().Add(-time.Hour)
		for id := 1; id <= 12; id++ {
			b.retain(t, int64(id), userEvent(id), at)
		}
		require.NoError(t, b.ops.command(context.Background(), []string{"replay", "-since", "2h"}))
		var total int64
		for _, key := range stream.Names(b.ops.prefix, "user", partitions) {
			entries, err := b.ops.redis.Do(context.Background(), b.ops.redis.B().Xrange().Key(key).Start("-").End("+").Build()).AsXRange()
			require.NoError(t, err)
			for _, e := range entries {
				require.Equal(t, key, name(b, mustAtoi(t, e.FieldValues[stream.FieldAggregateID])))
			}
			total += int64(len(entries))
		}
		require.EqualValues(t, 12, total)
		require.Zero(t, b.xlen(t, stream.Name(b.ops.prefix, "user")), "nothing goes to the stream of one partition")
	})

	t.Run("partitions forgets the relay's records of the old streams only once every group read them", func(t *testing.T) {
		t.Parallel()
		b := partitioned(t)
		ctx := context.Background()
		old := stream.Name(b.ops.prefix, "user")
		_, err := b.ops.pool.Exec(ctx, `INSERT INTO outbox_streams (aggregate_type, batch, last_ms, last_seq, entries_added)
			VALUES ('user', 1, 0, 0, 1)`)
		require.NoError(t, err)
		b.xadd(t, old, userEvent(1).Fields()...)
		require.NoError(t, b.ops.redis.Do(ctx, b.ops.redis.B().XgroupCreate().Key(old).Group("sendemail").Id("0").Build()).Error())

		err = b.ops.command(ctx, []string{"partitions"})
		require.ErrorIs(t, err, errStreamsUnread)
		require.ErrorContains(t, err, "lag 1")

		read, err := b.ops.redis.Do(ctx, b.ops.redis.B().Xreadgroup().Group("sendemail", "c").Count(10).Streams().Key(old).Id(">").Build()).AsXRead()
		require.NoError(t, err)
		require.ErrorIs(t, b.ops.command(ctx, []string{"partitions"}), errStreamsUnread, "read but not acknowledged")
		require.NoError(t, b.ops.redis.Do(ctx, b.ops.redis.B().Xack().Key(old).Group("sendemail").Id(read[old][0].ID).Build()).Error())

		require.NoError(t, b.ops.command(ctx, []string{"partitions"}))
		require.Contains(t, b.out.String(), "forgot the relay's records of 1 streams of [1] partitions")
		var left int
		require.NoError(t, b.ops.pool.QueryRow(ctx, `SELECT count(*) FROM outbox_streams`).Scan(&left))
		require.Zero(t, left)
		require.NoError(t, b.ops.command(ctx, []string{"partitions"}))
		require.Contains(t, b.out.String(), "nothing to do")
	})
}

func mustAtoi(t *testing.T, s string) int {
	t.Helper()
	var n int
	_, err := fmt.Sscan(s, &n)
	require.NoError(t, err)
	return n
}
