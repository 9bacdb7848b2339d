package relay

import (
	"context"
	"fmt"
	"github.com/redis/rueidis"
	"os"
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
			byAggregate := map[string][]any{}
			for _, w := range want {
				byAggregate[w[4].(string)] = w
			}
			str := func(v any) string {
				if v == nil {
					return ""
				}
				return v.(string)
			}
			entries := b.entries(t, "user")
			require.Len(t, entries, len(want))
			for _, e := range entries {
				require.True(t, stamps[e.AggregateID].Equal(e.OccurredAt), "%q: stream says %s, row says %s", e.AggregateID, e.OccurredAt, stamps[e.AggregateID])
				w := byAggregate[e.AggregateID]
				require.NotNil(t, w, "entry for %q", e.AggregateID)
				require.Equal(t, []string{w[2].(string), w[5].(string), w[6].(string), str(w[7]), str(w[9])},
					[]string{e.EventID, e.EventType, e.Payload, e.Traceparent, e.Tracestate}, "entry for %q", e.AggregateID)
			}
		})
	}
}

// Review (hostile): the trace context survives every path an event takes
// after the claim: the stream, the retained copy published again after
// Redis lost the stream, and outbox_dead when the relay refuses it.
func TestTraceContextSurvivesRepublishAndBurial(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	l := newLossBundle(t)
	_, err := l.pool.Exec(ctx, `
		INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, traceparent, tracestate)
		SELECT 'item', 'a', 'x', json_build_object('seq', g), '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01',
		       CASE WHEN g % 3 = 0 THEN NULL WHEN g % 3 = 1 THEN '' ELSE 'rojo=' || g END
		FROM generate_series(1, 25) g`)
	require.NoError(t, err)
	res, err := l.drain()
	require.NoError(t, err)
	require.Equal(t, 25, res.Relayed)
	first := map[int64]string{}
	for _, e := range l.entries(t, "item") {
		first[e.OutboxID] = e.Traceparent + "|" + e.Tracestate
	}
	require.Len(t, first, 25)
	l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Del().Key(l.prefix + "item").Build() })
	res, err = l.drain()
	require.NoError(t, err)
	require.Equal(t, 25, res.Replayed)
	again := map[int64]string{}
	for _, e := range l.entries(t, "item") {
		again[e.OutboxID] = e.Traceparent + "|" + e.Tracestate
	}
	require.Equal(t, first, again, "published again with the trace context it had")
	for id, s := range first {
		if id%3 == 2 {
			require.Equal(t, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01|rojo="+fmt.Sprint(id), s)
		}
	}

	// A refused event keeps its tracestate (NULL stays NULL, '' stays '').
	l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Set().Key(l.prefix + "clash").Value("x").Build() })
	_, err = l.pool.Exec(ctx, `
		INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, traceparent, tracestate) VALUES
		  ('clash', 'n', 'x', '{}', NULL, NULL), ('clash', 'e', 'x', '{}', '', ''), ('clash', 's', 'x', '{}', 'tp', 'k=v')`)
	require.NoError(t, err)
	want := relayedRows(t, l.testBundle, `SELECT event_id, aggregate_id, payload::text, traceparent, tracestate, created_at FROM outbox`)
	res, err = l.drain()
	require.NoError(t, err)
	require.Equal(t, 3, res.Dead)
	got := relayedRows(t, l.testBundle, `SELECT event_id, aggregate_id, payload::text, traceparent, tracestate, created_at FROM outbox_dead`)
	require.Equal(t, want, got)
}

// Review (hostile): a created_at near the end of PostgreSQL's range
// (294276 AD) must reach the stream as the row's time, whichever path read
// it. The hand reader adds 2000-01-01 in Unix microseconds to PostgreSQL's
// microseconds without checking for overflow.
func TestACreatedAtNearTheEndOfPostgreSQLsRangeIsNotWrappedAround(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"", "simple_protocol"} {
		t.Run("mode "+mode, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			ctx := context.Background()
			_, err := b.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at)
				VALUES ('user', 'far', 'x', '{}', '294270-06-01 00:00:00+00')`)
			require.NoError(t, err)
			url := b.url
			if mode != "" {
				url += map[bool]string{true: "&", false: "?"}[strings.Contains(url, "?")] + "default_query_exec_mode=" + mode
			}
			s := b.relay(t, func(c *Config) { c.DatabaseURL = url; c.Background = false })
			_, err = s.drainer.Drain(ctx, time.Time{})
			require.NoError(t, err)
			res, err := b.redis.Do(ctx, b.redis.B().Xrange().Key(b.prefix+"user").Start("-").End("+").Build()).AsXRange()
			require.NoError(t, err)
			require.Len(t, res, 1)
			require.Equal(t, "294270-06-01T00:00:00Z", res[0].FieldValues["occurred_at"])
		})
	}
}

// Review (hostile): rows written before migration 00013 (no tracestate
// column) are relayed, retained, buried and published again after it.
func TestRowsWrittenBeforeTheTracestateMigrationFlowAfterIt(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	l := newLossBundle(t)
	migration := func(file string) (up, down string) {
		sql, err := os.ReadFile("../../sql/migrations/" + file)
		require.NoError(t, err)
		up, down, ok := strings.Cut(string(sql), "-- +goose Down")
		require.True(t, ok)
		return up, down
	}
	up, down := migration("00013_tracestate.sql")
	up15, down15 := migration("00015_outbox_retained.sql")
	_, err := l.pool.Exec(ctx, down15)
	require.NoError(t, err)
	_, err = l.pool.Exec(ctx, down)
	require.NoError(t, err)
	_, err = l.pool.Exec(ctx, `
		INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, traceparent)
		SELECT 'item', 'a', 'x', json_build_object('seq', g), CASE WHEN g % 2 = 0 THEN 'tp' END FROM generate_series(0, 11) g;
		INSERT INTO outbox_dead (id, event_id, aggregate_type, aggregate_id, event_type, payload, created_at, error)
		VALUES (1000000, gen_random_uuid(), 'item', 'a', 'x', '{}', now(), 'old')`)
	require.NoError(t, err)
	_, err = l.pool.Exec(ctx, up)
	require.NoError(t, err)
	_, err = l.pool.Exec(ctx, up15)
	require.NoError(t, err)
	want := relayedRows(t, l.testBundle, `SELECT event_id, payload::text, traceparent, tracestate, created_at FROM outbox`)
	res, err := l.drain()
	require.NoError(t, err)
	require.Equal(t, 12, res.Relayed)
	require.Equal(t, want, relayedRows(t, l.testBundle, `SELECT event_id, payload::text, traceparent, tracestate, created_at FROM outbox_relayed`))
	l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Del().Key(l.prefix + "item").Build() })
	res, err = l.drain()
	require.NoError(t, err)
	require.Equal(t, 12, res.Replayed)
	requireExactlyOnceInOrder(t, events(l.entries(t, "item")), 12)
}

// Review (hostile): one row whose created_at Go cannot hold (infinity) must
// not stop every event behind it: the relay should bury it, as it buries
// an event it cannot publish, and relay the rest.
// A producer other than createuser may write created_at = 'infinity'; the
// row goes to outbox_dead, and the events behind it go on.
func TestAnInfiniteCreatedAtDoesNotStopTheOutbox(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"", "simple_protocol"} {
		t.Run("mode "+mode, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			ctx := context.Background()
			_, err := b.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at)
				VALUES ('user', 'inf', 'x', '{}', 'infinity'), ('user', 'ok', 'x', '{}', now())`)
			require.NoError(t, err)
			url := b.url
			if mode != "" {
				url += map[bool]string{true: "&", false: "?"}[strings.Contains(url, "?")] + "default_query_exec_mode=" + mode
			}
			s := b.relay(t, func(c *Config) { c.DatabaseURL = url; c.Background = false })
			var lastErr error
			for range 3 {
				_, lastErr = s.drainer.Drain(ctx, time.Time{})
			}
			require.NoError(t, lastErr)
			require.Len(t, b.entries(t, "user"), 1, "the good event behind the bad one is relayed")
			var reason string
			var infinite bool
			require.NoError(t, b.pool.QueryRow(ctx, `SELECT error, created_at = 'infinity' FROM outbox_dead WHERE aggregate_id = 'inf'`).
				Scan(&reason, &infinite))
			require.Contains(t, reason, "created_at is infinite")
			require.True(t, infinite, "outbox_dead keeps the row's created_at as it was")
		})
	}
}

func TestRetainedSizeIsTheEncodingsLength(t *testing.T) {
	t.Parallel()
	tp, ts, empty := "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "k=v", ""
	for _, rows := range [][]row{
		nil,
		{{ID: 1, AggregateType: "user", AggregateID: "ä", EventType: "x", Payload: []byte(`{}`), CreatedAt: time.Now()}},
		{{ID: 2, AggregateType: "u", Payload: []byte(`[]`), Traceparent: &tp, Tracestate: &ts},
			{ID: 3, AggregateType: "u", Payload: []byte(`1`), Traceparent: &empty, Tracestate: &empty}},
	} {
		require.Len(t, appendRetained(nil, rows), retainedSize(rows))
		require.Len(t, appendRetainCopy(nil, 7, rows), retainHead+retainedSize(rows)+2)
	}
}
