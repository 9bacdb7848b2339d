package outbox_test

import (
	"context"
	"math"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/outbox"
	"github.com/outboxfn/outbox/shared/pgtest"
)

// encodeSQL encodes the events of outbox_relayed_rows (those retained before
// migration 00015) the way the relay encodes a batch for outbox_retained:
// what DecodeRetained reads must be exactly that.
const encodeSQL = `SELECT ` + pgtest.EncodeRetainedSQL + ` FROM outbox_relayed_rows`

func TestRetainedEventsDecodeAsPostgreSQLEncodedThem(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, pool := pgtest.NewPool(t)
	_, err := pool.Exec(ctx, `INSERT INTO outbox_relayed (batch, id, event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at, tracestate) VALUES
		(1, 1, '0b7e5c1e-0000-4000-8000-000000000001', 'user', 'ä', 'user.created', '{"n": "Zoë 🎉"}', NULL, '2026-11-24 01:02:03.456789+00', NULL),
		(1, 2, '0b7e5c1e-0000-4000-8000-000000000002', 'order.v2', '', 'x', '[]', '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01', '1999-12-31 23:59:59.999999+00', 'k=v'),
		(1, 3, '0b7e5c1e-0000-4000-8000-000000000003', 'user', '3', 'x', '{}', '', '9999-12-31 23:59:59.999999+00', '')`)
	require.NoError(t, err)
	var data []byte
	require.NoError(t, pool.QueryRow(ctx, encodeSQL).Scan(&data))

	var got []outbox.RetainedEvent
	require.NoError(t, outbox.DecodeRetained(7, data, func(e *outbox.RetainedEvent) error {
		got = append(got, *e)
		return nil
	}))
	tp, ts, empty := "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "k=v", ""
	id := func(last byte) [16]byte {
		return [16]byte{0x0b, 0x7e, 0x5c, 0x1e, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0, last}
	}
	require.Equal(t, []outbox.RetainedEvent{
		{Batch: 7, ID: 1, EventID: id(1), AggregateType: "user", AggregateID: "ä", EventType: "user.created",
			Payload: []byte(`{"n": "Zoë 🎉"}`), CreatedAt: time.Date(2026, 11, 24, 1, 2, 3, 456789000, time.UTC)},
		{Batch: 7, ID: 2, EventID: id(2), AggregateType: "order.v2", EventType: "x", Payload: []byte(`[]`),
			Traceparent: &tp, Tracestate: &ts, CreatedAt: time.Date(1999, 12, 31, 23, 59, 59, 999999000, time.UTC)},
		{Batch: 7, ID: 3, EventID: id(3), AggregateType: "user", AggregateID: "3", EventType: "x", Payload: []byte(`{}`),
			Traceparent: &empty, Tracestate: &empty, CreatedAt: time.Date(9999, 12, 31, 23, 59, 59, 999999000, time.UTC)},
	}, got)

	// ReadRetained reads both kinds of retained event, in (batch, id)
	// order, and keeps only the type asked for: of outbox_retained, the
	// batches outbox_relay_batches says hold events of it.
	_, err = pool.Exec(ctx, `INSERT INTO outbox_retained (batch, events, oldest, data) VALUES (0, 3, '-infinity', $1), (-1, 3, '-infinity', $1)`, data)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO outbox_relay_batches (batch, aggregate_type, events, last_ms, last_seq) VALUES (0, 'user', 2, 1, 0), (0, 'order.v2', 1, 1, 0), (-1, 'order.v2', 1, 1, 0)`)
	require.NoError(t, err)
	read, err := outbox.ReadRetained(ctx, pool, "user", math.MinInt64, math.MaxInt64)
	require.NoError(t, err)
	var order [][2]int64
	for _, e := range read {
		order = append(order, [2]int64{e.Batch, e.ID})
	}
	require.Equal(t, [][2]int64{{0, 1}, {0, 3}, {1, 1}, {1, 3}}, order)
}

func TestMalformedRetainedDataIsAnErrorNotAPanic(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, pool := pgtest.NewPool(t)
	_, err := pool.Exec(ctx, `INSERT INTO outbox_relayed (batch, id, event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at, tracestate)
		VALUES (1, 1, gen_random_uuid(), 'user', '1', 'x', '{}', 'tp', 'infinity', NULL)`)
	require.NoError(t, err)
	var data []byte
	require.NoError(t, pool.QueryRow(ctx, encodeSQL).Scan(&data))
	var infinite []pgtype.InfinityModifier
	require.NoError(t, outbox.DecodeRetained(1, data, func(e *outbox.RetainedEvent) error {
		infinite = append(infinite, e.Infinite)
		return nil
	}))
	require.Equal(t, []pgtype.InfinityModifier{pgtype.Infinity}, infinite)
	for cut := 1; cut < len(data); cut++ {
		err := outbox.DecodeRetained(1, data[:cut], func(*outbox.RetainedEvent) error { return nil })
		require.Error(t, err, "data cut after %d of %d bytes", cut, len(data))
	}
	bad := append([]byte{0, 8}, data[2:]...) // eight fields, not nine
	require.Error(t, outbox.DecodeRetained(1, bad, func(*outbox.RetainedEvent) error { return nil }))
}
