package relay

import (
	"context"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/outbox"
)

// The relay reads claimed rows and encodes them for outbox_retained by hand
// (rows.go); what it retains must be exactly what the outbox held, value
// for value, whichever protocol pgx speaks, read back through SQL (the
// outbox_relayed view decodes it) and through Go (outbox.ReadRetained, the
// replay's reader).
func TestRetainedRowsAreTheOutboxRowsExactly(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, urlSuffix string
	}{
		{"over the extended protocol, read by hand", ""},
		{"over the simple protocol, read by pgx's Scan", "default_query_exec_mode=simple_protocol"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			ctx := context.Background()
			_, err := b.pool.Exec(ctx, `
				INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, traceparent, tracestate, created_at) VALUES
				  ('user', '1', 'user.created', '{"name": "Zoë \u00e9\u4e16\u754c 🎉", "n": 1}', NULL, NULL, '2026-11-23 10:00:00.123456+00'),
				  ('user', 'ä-2', 'user.created', $1, '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01', 'congo=t61rcWkgMzE,rojo=00f067aa0ba902b7', '1999-12-31 23:59:59.999999+00'),
				  ('order.v2', '', 'order.placed', '[]', '', '', '2038-01-19 03:14:08+00'),
				  ('user', '3', 'user.created', '{"quote": "\"", "nl": "a\nb", "nul": "\\u0000"}', NULL, 'vendor=x', now())`,
				`{"big": "`+strings.Repeat("x", 70_000)+`"}`)
			require.NoError(t, err)
			want := relayedRows(t, b, `SELECT 0::bigint, id, event_id, aggregate_type, aggregate_id, event_type, payload::text, traceparent, created_at, tracestate FROM outbox`)

			url := b.url
			if tc.urlSuffix != "" {
				url += map[bool]string{true: "&", false: "?"}[strings.Contains(url, "?")] + tc.urlSuffix
			}
			s := b.relay(t, func(c *Config) { c.DatabaseURL = url; c.Background = false })
			res, err := s.drainer.Drain(ctx, time.Time{})
			require.NoError(t, err)
			require.Equal(t, len(want), res.Relayed)

			got := relayedRows(t, b, `SELECT 0::bigint, id, event_id, aggregate_type, aggregate_id, event_type, payload::text, traceparent, created_at, tracestate FROM outbox_relayed`)
			require.Equal(t, want, got)
			decoded, err := outbox.ReadRetained(ctx, b.pool, "", math.MinInt64, math.MaxInt64)
			require.NoError(t, err)
			require.Len(t, decoded, len(want))
			for i, e := range decoded {
				// Through PostgreSQL's types again, to compare as want does.
				rows, err := b.pool.Query(ctx, `SELECT 0::bigint, $1::bigint, $2::uuid, $3::text, $4::text, $5::text, $6::text, $7::text, $8::timestamptz, $9::text`,
					e.ID, e.EventID, e.AggregateType, e.AggregateID, e.EventType, string(e.Payload), e.Traceparent,
					pgtype.Timestamptz{Time: e.CreatedAt, InfinityModifier: e.Infinite, Valid: true}, e.Tracestate)
				require.NoError(t, err)
				values, err := pgx.CollectExactlyOneRow(rows, func(r pgx.CollectableRow) ([]any, error) { return r.Values() })
				require.NoError(t, err)
				require.Equal(t, want[i], values, "event %d as outbox.ReadRetained decodes it", i)
			}
			// The stream entries carry the trace fields the rows had.
			state := map[string]string{}
			for _, e := range append(b.entries(t, "user"), b.entries(t, "order.v2")...) {
				state[e.AggregateID] = e.Traceparent + " " + e.Tracestate
			}
			require.Equal(t, map[string]string{"1": " ", "ä-2": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
				"": " ", "3": " vendor=x"}, state)
		})
	}
}

// relayedRows reads a query's rows ordered by id, as text, for comparison.
func relayedRows(t *testing.T, b *testBundle, sql string) [][]any {
	t.Helper()
	rows, err := b.pool.Query(context.Background(), sql+` ORDER BY id`)
	require.NoError(t, err)
	all, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) ([]any, error) { return r.Values() })
	require.NoError(t, err)
	require.NotEmpty(t, all)
	return all
}
