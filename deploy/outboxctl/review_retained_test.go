package main

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/pgtest"
	"github.com/outboxfn/outbox/shared/stream"
)

// blobify moves every batch of outbox_relayed_rows into outbox_retained,
// encoded as the relay encodes a batch (migration 00015), with
// PostgreSQL's own send functions.
func (b *testBundle) blobify(t *testing.T) {
	t.Helper()
	_, err := b.ops.pool.Exec(context.Background(), `
		INSERT INTO outbox_retained (batch, events, oldest, data)
		SELECT batch, count(*), min(created_at), `+pgtest.EncodeRetainedSQL+`
		FROM outbox_relayed_rows GROUP BY batch;
		DELETE FROM outbox_relayed_rows`)
	require.NoError(t, err)
}

// Review (hostile): outboxctl's replay, status and purge on events
// retained as batches (the relay's only form since migration 00015); the
// existing tests retain through the view, i.e. as rows.
func TestReviewReplayOfBlobRetainedEvents(t *testing.T) {
	t.Parallel()
	t.Run("by time", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		events := b.retainedFixture(t)
		b.blobify(t)
		require.NoError(t, b.ops.command(ctx, []string{"replay", "-since", "4h", "-until", time.Now().Add(-time.Hour).Format(time.RFC3339)}))
		require.Equal(t, pick(events, 4, 10, 2), b.entries(t, "user"))
		require.Equal(t, pick(events, 5), b.entries(t, "order"))
	})
	t.Run("by event id", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		events := b.retainedFixture(t)
		b.blobify(t)
		require.NoError(t, b.ops.command(context.Background(), []string{"replay",
			"-event-id", events[2].EventID + "," + events[10].EventID, "-event-id", events[5].EventID}))
		require.Equal(t, pick(events, 10, 2), b.entries(t, "user"))
		require.Equal(t, pick(events, 5), b.entries(t, "order"))
	})
	t.Run("status counts", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		b.retainedFixture(t)
		b.blobify(t)
		r, err := b.ops.retained(ctx)
		require.NoError(t, err)
		require.EqualValues(t, 6, r.Events)
	})
}

// Review (hostile): TestPurgeKeepsTheSendRecordOfAnEventRetainedInALaterBatch
// with the event retained as a batch of outbox_retained.
func TestReviewPurgeKeepsTheSendRecordOfABlobRetainedEvent(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	b.ops.retention, b.ops.dedupeWindow = 24*time.Hour, 24*time.Hour
	now := time.Now()
	occurred := now.Add(-24*time.Hour - 2*time.Minute)
	sent := now.Add(-24*time.Hour - time.Minute)
	reclaimed := now.Add(-24*time.Hour + time.Minute)
	id := uuid.NewString()
	b.retain(t, 1, stream.Event{EventID: id, EventType: "user.created", AggregateType: "user",
		AggregateID: "1", Payload: "{}", OccurredAt: occurred, OutboxID: 1}, reclaimed)
	b.blobify(t)
	_, err := b.ops.pool.Exec(ctx, `INSERT INTO email_sends (key, event_id, sent_at, created_at) VALUES ('welcome:1', $1, $2, $2)`, id, sent)
	require.NoError(t, err)
	require.NoError(t, b.ops.command(ctx, []string{"purge", "-older-than", "24h"}))
	require.Equal(t, 1, b.count(t, "email_sends"))
}
