package main

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/stream"
)

// A batch in doubt: the relay published an event (sendemail emailed it and
// wrote its send record at once), then its COMMIT failed; the rows were
// claimed again later, by a batch relayed after the send record was
// created. While that batch is retained, a replay re-delivers the event, so
// its send record must survive any purge the command accepts.
func TestPurgeKeepsTheSendRecordOfAnEventRetainedInALaterBatch(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	b.ops.retention, b.ops.dedupeWindow = 24*time.Hour, 24*time.Hour
	now := time.Now()
	occurred := now.Add(-24*time.Hour - 2*time.Minute)
	sent := now.Add(-24*time.Hour - time.Minute)      // emailed from the batch in doubt
	reclaimed := now.Add(-24*time.Hour + time.Minute) // retained by the batch that re-claimed it
	id := uuid.NewString()
	b.retain(t, 1, stream.Event{EventID: id, EventType: "user.created", AggregateType: "user",
		AggregateID: "1", Payload: "{}", OccurredAt: occurred, OutboxID: 1}, reclaimed)
	_, err := b.ops.pool.Exec(ctx, `INSERT INTO email_sends (key, event_id, sent_at, created_at) VALUES ('welcome:1', $1, $2, $2)`, id, sent)
	require.NoError(t, err)

	require.NoError(t, b.ops.command(ctx, []string{"purge", "-older-than", "24h"}))
	t.Log(b.out.String())
	require.Equal(t, 1, b.count(t, "email_sends"), "the event is still retained; without its record a replay emails it again")
}
