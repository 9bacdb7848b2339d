package main

import (
	"context"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/stream"
)

// retain puts e into outbox_relayed as part of batch, and the batch into
// outbox_relay_batches, as the relay does when it relays e at relayedAt.
func (b *testBundle) retain(t *testing.T, batch int64, e stream.Event, relayedAt time.Time) {
	t.Helper()
	var traceparent, tracestate *string
	if e.Traceparent != "" {
		traceparent = &e.Traceparent
	}
	if e.Tracestate != "" {
		tracestate = &e.Tracestate
	}
	_, err := b.ops.pool.Exec(context.Background(), `
		WITH batch AS (
			INSERT INTO outbox_relay_batches (aggregate_type, batch, events, last_ms, last_seq, relayed_at)
			VALUES ($3, $1, 1, 0, 0, $9)
			ON CONFLICT (batch, aggregate_type, partition) DO UPDATE SET events = outbox_relay_batches.events + 1)
		INSERT INTO outbox_relayed (batch, id, event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at, tracestate)
		VALUES ($1, $2, $4, $3, $5, $6, $7, $8, $10, $11)`,
		batch, e.OutboxID, e.AggregateType, e.EventID, e.AggregateID, e.EventType, e.Payload, traceparent, relayedAt, e.OccurredAt, tracestate)
	require.NoError(t, err)
}

// replaying records the newest batch of each stream in outbox_streams, as
// the relay does, and a replay under way from the batch given (0: none).
func (b *testBundle) replaying(t *testing.T, from map[string]int64) {
	t.Helper()
	for aggregateType, batch := range from {
		var replayFrom *int64
		if batch != 0 {
			replayFrom = &batch
		}
		_, err := b.ops.pool.Exec(context.Background(), `
			INSERT INTO outbox_streams (aggregate_type, batch, last_ms, last_seq, entries_added, replay_from)
			VALUES ($1, 4, 0, 0, 0, $2)`, aggregateType, replayFrom)
		require.NoError(t, err)
	}
}

// entries reads a stream and decodes its entries, ids left out.
func (b *testBundle) entries(t *testing.T, aggregateType string) []stream.Event {
	t.Helper()
	got, err := b.ops.redis.Do(context.Background(), b.ops.redis.B().Xrange().
		Key(stream.Name(b.ops.prefix, aggregateType)).Start("-").End("+").Build()).AsXRange()
	require.NoError(t, err)
	events := make([]stream.Event, len(got))
	for i, entry := range got {
		events[i], err = stream.Decode(entry.ID, entry.FieldValues)
		require.NoError(t, err)
		events[i].ID = ""
	}
	return events
}

// retainedFixture retains, relative to now:
//
//	batch 1, relayed 5h ago: user 1
//	batch 2, relayed 3h ago: user 10, user 4, order 5 (stream order: 4, 5, 10)
//	batch 3, relayed 2h ago: user 2
//	batch 4, relayed 30m ago: user 11
//
// and returns the events by outbox id.
func (b *testBundle) retainedFixture(t *testing.T) map[int64]stream.Event {
	t.Helper()
	now := time.Now()
	occurred := time.Date(2026, 1, 2, 3, 4, 5, 123456000, time.UTC)
	events := map[int64]stream.Event{}
	for _, r := range []struct {
		batch, id     int64
		aggregateType string
		ago           time.Duration
	}{
		{1, 1, "user", 5 * time.Hour},
		{2, 10, "user", 3 * time.Hour},
		{2, 4, "user", 3 * time.Hour},
		{2, 5, "order", 3 * time.Hour},
		{3, 2, "user", 2 * time.Hour},
		{4, 11, "user", 30 * time.Minute},
	} {
		e := stream.Event{EventID: uuid.NewString(), EventType: r.aggregateType + ".created", AggregateType: r.aggregateType,
			AggregateID: fmt.Sprint(r.id * 100),
			// Spaces and key order a jsonb column would not keep.
			Payload:    fmt.Sprintf(`{"z": 1,  "id":%d, "name":"Zoë"}`, r.id),
			OccurredAt: occurred.Add(time.Duration(r.id) * time.Second), OutboxID: r.id}
		if r.id%2 == 0 {
			e.Traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
		}
		if r.id%4 == 0 {
			e.Tracestate = "rojo=00f067aa0ba902b7"
		}
		b.retain(t, r.batch, e, now.Add(-r.ago))
		events[r.id] = e
	}
	return events
}

func pick(events map[int64]stream.Event, ids ...int64) []stream.Event {
	out := make([]stream.Event, len(ids))
	for i, id := range ids {
		out[i] = events[id]
	}
	return out
}

func TestReplay(t *testing.T) {
	t.Parallel()

	t.Run("by time range publishes the range's events in batch order with the relay's fields", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		events := b.retainedFixture(t)

		require.NoError(t, b.ops.command(ctx, []string{"replay", "-since", "4h", "-until", time.Now().Add(-time.Hour).Format(time.RFC3339)}))
		require.Equal(t, pick(events, 4, 10, 2), b.entries(t, "user"), "batches 2 and 3, in (batch, id) order")
		require.Equal(t, pick(events, 5), b.entries(t, "order"))
		require.Contains(t, b.out.String(), "batches 2 to 3\n")
		require.Contains(t, b.out.String(), b.ops.prefix+"user: 3 events published\n")
		require.Contains(t, b.out.String(), b.ops.prefix+"order: 1 events published\n")
	})

	t.Run("by time range with -type publishes that aggregate type only, up to now without -until", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		events := b.retainedFixture(t)

		require.NoError(t, b.ops.command(context.Background(), []string{"replay", "-since", "4h", "-type", "user"}))
		require.Equal(t, pick(events, 4, 10, 2, 11), b.entries(t, "user"))
		require.Empty(t, b.entries(t, "order"))
	})

	t.Run("by time range reads page after page in batch order", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		// 1234 events in 13 batches, ids falling within each batch and
		// rising from one batch to the next.
		_, err := b.ops.pool.Exec(ctx, `
			INSERT INTO outbox_relay_batches (aggregate_type, batch, events, last_ms, last_seq, relayed_at)
			SELECT 'user', g, least(100, 1234 - g * 100), 0, 0, now() - interval '1 hour' FROM generate_series(0, 12) AS g;
			INSERT INTO outbox_relayed (batch, id, event_id, aggregate_type, aggregate_id, event_type, payload, created_at)
			SELECT i / 100, (i / 100) * 1000 + 99 - i % 100, gen_random_uuid(), 'user', i::text, 'user.created', '{}', now()
			FROM generate_series(0, 1233) AS i`)
		require.NoError(t, err)

		require.NoError(t, b.ops.command(ctx, []string{"replay", "-since", "2h"}))
		var want []int64
		rows, err := b.ops.pool.Query(ctx, `SELECT id FROM outbox_relayed ORDER BY batch, id`)
		require.NoError(t, err)
		for rows.Next() {
			var id int64
			require.NoError(t, rows.Scan(&id))
			want = append(want, id)
		}
		require.NoError(t, rows.Err())
		got := b.entries(t, "user")
		ids := make([]int64, len(got))
		for i, e := range got {
			ids[i] = e.OutboxID
		}
		require.Len(t, ids, 1234)
		require.Equal(t, want, ids)
	})

	t.Run("by event id publishes those events in batch order", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		events := b.retainedFixture(t)

		require.NoError(t, b.ops.command(context.Background(), []string{"replay",
			"-event-id", events[2].EventID + "," + events[10].EventID, "-event-id", events[5].EventID}))
		require.Equal(t, pick(events, 10, 2), b.entries(t, "user"), "batch 2's id 10 before batch 3's id 2")
		require.Equal(t, pick(events, 5), b.entries(t, "order"))
	})

	t.Run("by event id reports an event not retained and publishes nothing", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		events := b.retainedFixture(t)
		gone := uuid.NewString()

		err := b.ops.command(context.Background(), []string{"replay", "-event-id", events[1].EventID + "," + gone})
		require.ErrorIs(t, err, errNotRetained)
		require.ErrorContains(t, err, gone)
		require.NotContains(t, err.Error(), events[1].EventID)
		require.Equal(t, 1, exit(err, io.Discard), "a failure, not a usage error")
		require.Empty(t, b.entries(t, "user"))
	})

	t.Run("dry run counts the events of each stream and publishes nothing", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		events := b.retainedFixture(t)

		require.NoError(t, b.ops.command(ctx, []string{"replay", "-dry-run", "-since", "4h"}))
		require.Contains(t, b.out.String(), b.ops.prefix+"user: 4 events would be published\n")
		require.Contains(t, b.out.String(), b.ops.prefix+"order: 1 events would be published\n")
		b.out.Reset()
		require.NoError(t, b.ops.command(ctx, []string{"replay", "-dry-run", "-event-id", events[2].EventID}))
		require.Contains(t, b.out.String(), b.ops.prefix+"user: 1 events would be published\n")
		require.Empty(t, b.entries(t, "user"))
		require.Empty(t, b.entries(t, "order"))
	})

	t.Run("says when nothing is selected and when the relay is replaying a stream itself", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		b.retainedFixture(t)
		b.replaying(t, map[string]int64{"user": 3, "order": 0})

		require.NoError(t, b.ops.command(ctx, []string{"replay", "-since", "10m"}))
		require.Contains(t, b.out.String(), "nothing to publish")
		b.out.Reset()
		require.NoError(t, b.ops.command(ctx, []string{"replay", "-since", "7h", "-dry-run"}))
		require.Contains(t, b.out.String(), "nothing relayed before")
		require.Contains(t, b.out.String(), "note: the relay is itself publishing "+b.ops.prefix+"user again from batch 3\n")
		require.NotContains(t, b.out.String(), "publishing "+b.ops.prefix+"order")
	})

	t.Run("refuses to publish when Redis refuses the stream, and says which event", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		events := b.retainedFixture(t)
		require.NoError(t, b.ops.redis.Do(ctx, b.ops.redis.B().Set().Key(stream.Name(b.ops.prefix, "order")).Value("not a stream").Build()).Error())

		err := b.ops.command(ctx, []string{"replay", "-since", "4h", "-until", "1h"})
		require.ErrorContains(t, err, "WRONGTYPE")
		require.ErrorContains(t, err, events[5].EventID)
		require.Equal(t, 1, exit(err, io.Discard))
		require.Contains(t, b.out.String(), b.ops.prefix+"user: 3 events published\n", "what was published is reported")
	})

	t.Run("usage mistakes are usage errors and publish nothing", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		events := b.retainedFixture(t)
		id := events[1].EventID
		for _, args := range [][]string{
			{"replay"},
			{"replay", "-dry-run"},
			{"replay", "-type", "user"},
			{"replay", "-since", "4h", "-event-id", id},
			{"replay", "-until", "1h", "-event-id", id},
			{"replay", "-until", "1h"},
			{"replay", "-event-id", id, "-type", "user"},
			{"replay", "-event-id", "not-a-uuid"},
			{"replay", "-event-id", id + ","},
			{"replay", "-since", "yesterday"},
			{"replay", "-since", "-1h"},
			{"replay", "-since", "1h", "-until", "2h"},
			{"replay", "-since", "4h", id},
		} {
			err := b.ops.command(context.Background(), args)
			require.ErrorIs(t, err, errUsage, "%v", args)
			require.Equal(t, 2, exit(err, io.Discard), "%v", args)
		}
		require.Empty(t, b.entries(t, "user"))
	})
}
