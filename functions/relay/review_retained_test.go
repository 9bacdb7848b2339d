package relay

import (
	"context"
	"math"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/outbox"
)

// Review (hostile, migration 00015): the README says a relay of the
// earlier release "goes on working" during the rolling deploy. Its purge
// is `DELETE FROM outbox_relayed WHERE batch BETWEEN $1 AND $2` (HEAD~1
// drainer.go purgeOld), which now hits the view's INSTEAD OF DELETE
// trigger, which raises for every event of outbox_retained.
func TestReviewAnOldReleasesPurgeWorksOnTheView(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	b.insert(t, "user", "a", 0, 5)
	s := b.relay(t, func(c *Config) { c.Background = false })
	_, err := s.drainer.Drain(ctx, time.Time{})
	require.NoError(t, err)
	first, last, ok, err := outbox.RetainedRun(ctx, b.pool, "", math.MinInt64, math.MaxInt64, 5000)
	require.NoError(t, err)
	require.True(t, ok)
	// The previous release's purge statement, verbatim.
	tag, err := b.pool.Exec(ctx, `DELETE FROM outbox_relayed WHERE batch BETWEEN $1 AND $2`, first, last)
	require.NoError(t, err, "the previous release's purge of a batch the new release retained")
	require.EqualValues(t, 5, tag.RowsAffected(), "events purged")
	var left int
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM outbox_retained`).Scan(&left))
	require.Zero(t, left, "batches left in outbox_retained")
}

// Review (hostile): the plpgsql decoder and the Go encoder agree at the
// ends of PostgreSQL's timestamptz range and for odd text.
func TestReviewViewAndGoDecodeExtremesAlike(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	_, err := b.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, traceparent, tracestate, created_at) VALUES
		('user', '', '', '""', '', NULL, '4713-11-24 00:00:00+00 BC'),
		('user', 'x', 'y', '{"a":"\ud83c\udf89"}', NULL, '', '294276-12-31 23:59:59.999999+00'),
		('user', 'z', 'y', 'null', 'tp', 'ts', '1999-12-31 23:59:59.999999+00'),
		('user', 'w', 'y', '1', 'tp', 'ts', '0001-01-01 00:00:00.000001+00 BC'),
		('user', 'v', 'y', $1, 'tp', 'ts', '2000-01-01 00:00:00+00')`, `{"big":"`+strings.Repeat("é", 600_000)+`"}`)
	require.NoError(t, err)
	want := relayedRows(t, b, `SELECT id, event_id, aggregate_type, aggregate_id, event_type, payload::text, traceparent, created_at::text, tracestate FROM outbox`)
	s := b.relay(t, func(c *Config) { c.Background = false })
	_, err = s.drainer.Drain(ctx, time.Time{})
	require.NoError(t, err)
	got := relayedRows(t, b, `SELECT id, event_id, aggregate_type, aggregate_id, event_type, payload::text, traceparent, created_at::text, tracestate FROM outbox_relayed`)
	require.Equal(t, want, got)
}

// Review (hostile): a relay of the previous release re-publishes from the
// view (HEAD~1 drainer.go retained: SELECT … FROM outbox_relayed WHERE
// aggregate_type = $1 AND batch BETWEEN $2 AND $3 ORDER BY batch, id) under
// its 10 s statement timeout. RELAY_BATCH_SIZE goes up to 10000; the view's
// plpgsql decoder was quadratic in a batch's events (1000: 0.5 s, 4000:
// 10 s), so one such batch could not be read back by the old release.
func TestReviewOldReleaseReadsABigBatchThroughTheViewInItsTimeout(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	_, err := b.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
		SELECT 'user', g::text, 'x', json_build_object('seq', g) FROM generate_series(1, 10000) g`)
	require.NoError(t, err)
	s := b.relay(t, func(c *Config) { c.Background = false; c.BatchSize = 10000 })
	res, err := s.drainer.Drain(ctx, time.Time{})
	require.NoError(t, err)
	require.Equal(t, 10000, res.Relayed)
	conn, err := b.pool.Acquire(ctx)
	require.NoError(t, err)
	defer conn.Release()
	_, err = conn.Exec(ctx, `SET statement_timeout = '10s'`)
	require.NoError(t, err)
	defer conn.Exec(ctx, `RESET statement_timeout`) //nolint:errcheck
	start := time.Now()
	rows, err := conn.Query(ctx, `
		SELECT batch, id, event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at, tracestate
		FROM outbox_relayed WHERE aggregate_type = $1 AND batch BETWEEN $2 AND $3
		ORDER BY batch, id`, "user", int64(math.MinInt64), int64(math.MaxInt64))
	require.NoError(t, err)
	n := 0
	for rows.Next() {
		n++
	}
	require.NoError(t, rows.Err(), "after %s", time.Since(start))
	require.Equal(t, 10000, n)
}

// Review (hostile): the migration's Down on a database with retained
// batches, then Up again; after a FLUSHALL the relay publishes every event
// again exactly once, in order.
func TestReviewMigrationDownAndUpKeepsEveryRetainedEvent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	l := newLossBundle(t)
	l.relayNew(t, 25) // three batches of 10 at most
	want := relayedRows(t, l.testBundle, `SELECT batch, id, event_id, aggregate_type, aggregate_id, event_type, payload::text, traceparent, created_at, tracestate FROM outbox_relayed`)
	sql, err := os.ReadFile("../../sql/migrations/00015_outbox_retained.sql")
	require.NoError(t, err)
	up, down, ok := strings.Cut(string(sql), "-- +goose Down")
	require.True(t, ok)
	_, err = l.pool.Exec(ctx, down)
	require.NoError(t, err)
	require.Equal(t, want, relayedRows(t, l.testBundle, `SELECT batch, id, event_id, aggregate_type, aggregate_id, event_type, payload::text, traceparent, created_at, tracestate FROM outbox_relayed`))
	_, err = l.pool.Exec(ctx, up)
	require.NoError(t, err)
	l.relayNew(t, 5)
	l.requireReplayedAfterFlush(t, 30)
}

// Review (hostile): batches retained as rows (a relay of the previous
// release, writing through the view during the rolling deploy) between
// batches retained as blobs; a FLUSHALL; every event once, in order.
func TestReviewRowBatchesBetweenBlobBatchesReplayInOrder(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	l := newLossBundle(t)
	l.relayNew(t, 10)
	l.relayNew(t, 10)
	l.relayNew(t, 10)
	batches := l.batches(t)
	require.Len(t, batches, 3)
	// The middle batch as the old release retains it: rows, through the view.
	_, err := l.pool.Exec(ctx, `
		WITH old AS (SELECT * FROM outbox_relayed WHERE batch = $1)
		INSERT INTO outbox_relayed SELECT * FROM old`, batches[1])
	require.NoError(t, err)
	_, err = l.pool.Exec(ctx, `DELETE FROM outbox_retained WHERE batch = $1`, batches[1])
	require.NoError(t, err)
	var rows int
	require.NoError(t, l.pool.QueryRow(ctx, `SELECT count(*) FROM outbox_relayed_rows`).Scan(&rows))
	require.Equal(t, 10, rows)
	l.requireReplayedAfterFlush(t, 30)
}

// Review (hostile): the previous release's retain is a binary COPY into
// outbox_relayed, which is now a view.
func TestReviewBinaryCopyIntoTheViewIsKept(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	n, err := b.pool.CopyFrom(ctx, pgx.Identifier{"outbox_relayed"},
		[]string{"batch", "id", "event_id", "aggregate_type", "aggregate_id", "event_type", "payload", "traceparent", "created_at", "tracestate"},
		pgx.CopyFromRows([][]any{{int64(5), int64(1), "0b7e5c1e-0000-4000-8000-000000000001", "user", "a", "x", `{"seq":1}`, nil, time.Now(), nil}}))
	require.NoError(t, err)
	require.EqualValues(t, 1, n)
	var rows int
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM outbox_relayed_rows`).Scan(&rows))
	require.Equal(t, 1, rows)
}

// Review (hostile): an event Redis refuses is buried and leaves the batch
// retained: its count and its oldest created_at are those of the events
// kept, and a re-publication after a FLUSHALL leaves it out.
func TestReviewBuriedEventsLeaveTheRetainedBatch(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	l := newLossBundle(t)
	_, err := l.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at) VALUES
		('item', 'b', 'x', '{"seq": 100}', '-infinity'),
		('item', 'a', 'x', '{"seq": 0}', '2020-01-01 00:00:00+00'),
		('item', 'a', 'x', '{"seq": 1}', '2021-01-01 00:00:00+00')`)
	require.NoError(t, err)
	res, err := l.drain()
	require.NoError(t, err)
	require.Equal(t, 1, res.Dead)
	var kept int
	var oldest time.Time
	require.NoError(t, l.pool.QueryRow(ctx, `SELECT events, oldest FROM outbox_retained`).Scan(&kept, &oldest))
	require.Equal(t, 2, kept)
	require.Equal(t, time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC), oldest.UTC())
	var viewCount int
	require.NoError(t, l.pool.QueryRow(ctx, `SELECT count(*) FROM outbox_relayed`).Scan(&viewCount))
	require.Equal(t, 2, viewCount)
	l.requireReplayedAfterFlush(t, 2)
}

// Review (hostile): the purge removes old rows and blobs alike, and counts
// them.
func TestReviewPurgeRemovesRowsAndBlobs(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	l := newLossBundle(t)
	l.relayNew(t, 10)
	l.relayNew(t, 10)
	batches := l.batches(t)
	_, err := l.pool.Exec(ctx, `WITH old AS (SELECT * FROM outbox_relayed WHERE batch = $1) INSERT INTO outbox_relayed SELECT * FROM old`, batches[0])
	require.NoError(t, err)
	_, err = l.pool.Exec(ctx, `DELETE FROM outbox_retained WHERE batch = $1`, batches[0])
	require.NoError(t, err)
	_, err = l.pool.Exec(ctx, `UPDATE outbox_relay_batches SET relayed_at = now() - interval '2 hours'`)
	require.NoError(t, err)
	conn, err := l.pool.Acquire(ctx)
	require.NoError(t, err)
	defer conn.Release()
	n, err := l.relay.drainer.purgeOld(ctx, conn)
	require.NoError(t, err)
	require.EqualValues(t, 20, n)
	var left int
	require.NoError(t, l.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM outbox_relayed_rows) + (SELECT count(*) FROM outbox_retained) + (SELECT count(*) FROM outbox_relay_batches)`).Scan(&left))
	require.Zero(t, left)
}

// requireReplayedAfterFlush flushes Redis and requires that the next drain
// (or the one after, if the first meets the flush mid-way) publishes the
// want events of type item again, each once and in order.
func (l *lossBundle) requireReplayedAfterFlush(t *testing.T, want int) {
	t.Helper()
	l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Flushall().Build() })
	res, err := l.drain()
	if err != nil {
		res, err = l.drain()
	}
	require.NoError(t, err)
	require.Equal(t, want, res.Replayed)
	requireExactlyOnceInOrder(t, events(l.entries(t, "item")), want)
}
