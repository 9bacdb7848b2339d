package relay

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Review (hostile): every pgx query exec mode must relay and retain the
// outbox rows exactly, and the stream's occurred_at must be the row's
// created_at, including values at the edges of PostgreSQL's range.
func TestEveryExecModeRetainsRowsExactlyAndStampsTheRightTime(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"", "cache_statement", "cache_describe", "describe_exec", "exec", "simple_protocol"} {
		t.Run("mode "+mode, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			ctx := context.Background()
			_, err := b.pool.Exec(ctx, `
				INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, traceparent, tracestate, created_at) VALUES
				  ('user', 'a1', 'user.created', $1, '', NULL, '1970-01-01 00:00:00+00'),
				  ('user', 'a2', 'user.created', $2, NULL, '', '1900-02-28 12:34:56.000001+00'),
				  ('user', 'a3', 'user.created', '"\u2028\ud83d\ude00\\ud800"', 'tp', 'ts', '0001-01-01 00:00:00+00'),
				  ('user', 'a4', 'user.created', 'null', NULL, NULL, '9999-12-31 23:59:59.999999+00'),
				  ('user', E'\u0301\uFEFF\u202E z', 'user.created', '  {"ws" : [ 1 ,2 ] }  ', NULL, NULL, '2026-07-01 12:00:00.5+14'),
				  ('user', 'a6', 'user.created', '{}', NULL, NULL, '1999-12-31 23:59:59.999999+00'),
				  ('user', 'a7', 'user.created', '{}', NULL, NULL, '2000-01-01 00:00:00+00'),
				  ('user', 'a8', 'user.created', '{}', NULL, NULL, '1999-12-31 23:59:59.5-01')`,
				`{"big": "`+strings.Repeat("é", 40_000)+`"}`, `{"huge": "`+strings.Repeat("x", 3<<20)+`"}`)
			require.NoError(t, err)
			want := relayedRows(t, b, `SELECT 0::bigint, id, event_id::text, aggregate_type, aggregate_id, event_type, payload::text, traceparent, created_at::text, tracestate FROM outbox`)
			stamps := map[string]time.Time{}
			rows, err := b.pool.Query(ctx, `SELECT aggregate_id, created_at FROM outbox`)
			require.NoError(t, err)
			for rows.Next() {
				var id string
				var at time.Time
				require.NoError(t, rows.Scan(&id, &at))
				stamps[id] = at
			}
			require.NoError(t, rows.Err())

			url := b.url
			if mode != "" {
				url += map[bool]string{true: "&", false: "?"}[strings.Contains(url, "?")] + "default_query_exec_mode=" + mode
			}
			s := b.relay(t, func(c *Config) { c.DatabaseURL = url; c.Background = false })
			res, err := s.drainer.Drain(ctx, time.Time{})
			require.NoError(t, err)
			require.Equal(t, len(want), res.Relayed)
			got := relayedRows(t, b, `SELECT 0::bigint, id, event_id::text, aggregate_type, aggregate_id, event_type, payload::text, traceparent, created_at::text, tracestate FROM outbox_relayed`)
			require.Equal(t, want, got)
			for _, e := range b.entries(t, "user") {
				require.True(t, stamps[e.AggregateID].Equal(e.OccurredAt), "%q: stream says %s, row says %s", e.AggregateID, e.OccurredAt, stamps[e.AggregateID])
			}
		})
	}
}
