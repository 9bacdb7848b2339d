package relay

import (
	"context"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// Review of 25e23a9 (lateBelowSQL runs only when needsLateCheck says a late
// row is possible). The argument: a late row's writer held the outbox's
// write lock when writersSQL read pg_locks, unless its id came after
// what pg_sequence_last_value read. But the two are read at two moments of
// one statement: pg_locks first (GetLockStatusData at the first call of
// pg_lock_status), the sequence after pg_locks has been formatted and
// filtered. A writer that locks the outbox and takes its id between the two
// is in neither: not in the writers, and its id is at most the sequence
// value read. If another writer takes a higher id in the same window and
// commits before the claim statement's snapshot, the batch's last id is
// above the first writer's id, the check is skipped, and the first writer's
// row, committed late, is overtaken by the next event of its aggregate.
//
// The window is normally microseconds; here a session holding 500k advisory
// locks (pg_locks then takes ~200 ms to produce its rows) widens it, so the
// schedule is deterministic. It needs a server with a large lock table, so
// it runs only with REVIEW_LOCKS_DATABASE_URL set to such a server, e.g.
// one started with -c max_locks_per_transaction=8000 -c max_connections=60.
func TestReviewWriterBetweenLocksAndSequenceReadIsNotMissed(t *testing.T) {
	b := setupOnServerOf(t, "REVIEW_LOCKS_DATABASE_URL", "a server with max_locks_per_transaction >= 8000")
	s := b.relay(t, func(c *Config) { c.Background = false })
	ctx := context.Background()
	b.insertBulk(t, "user", 99) // ids 1..99

	// Many locks make pg_locks slow: the window between its snapshot and
	// the sequence read grows to ~200 ms.
	holder := openTx(t, b.url)
	_, err := holder.Exec(ctx, `SELECT count(pg_advisory_xact_lock(i)) FROM generate_series(1, 500000) i`)
	require.NoError(t, err)

	watch, err := pgx.Connect(ctx, b.url)
	require.NoError(t, err)
	defer watch.Close(ctx)

	late := openTx(t, b.url)
	var once sync.Once
	s.drainer.beforePublish = func() {
		once.Do(func() {
			// The first batch (1..99 and 101) is being published; the late
			// writer commits, then the next writer of its aggregate begins,
			// inserts and commits, before the batch ahead is claimed (its
			// own pg_locks read takes ~200 ms too).
			require.NoError(t, late.Commit(ctx))
			next := openTx(t, b.url)
			insertIn(t, next, "agg")
			require.NoError(t, next.Commit(ctx))
		})
	}
	type result struct {
		res Result
		err error
	}
	done := make(chan result, 1)
	go func() {
		r, err := s.drainer.Drain(ctx, time.Time{})
		done <- result{r, err}
	}()
	// Wait until the first claim's writersSQL runs.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int
		require.NoError(t, watch.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND state = 'active' AND query LIKE '%FROM pg_locks%RowExclusiveLock%'
			  AND pid <> pg_backend_pid()`).Scan(&n))
		if n > 0 {
			break
		}
		require.True(t, time.Now().Before(deadline), "the claim never ran")
		time.Sleep(time.Millisecond)
	}
	time.Sleep(30 * time.Millisecond) // pg_locks has taken its snapshot
	insertIn(t, late, "agg")          // id 100: locks the outbox after the snapshot
	other := openTx(t, b.url)
	insertIn(t, other, "other") // id 101, committed before the claim
	require.NoError(t, other.Commit(ctx))
	var lateID int64
	require.NoError(t, late.QueryRow(ctx, `SELECT max(id) FROM outbox WHERE aggregate_id = 'agg'`).Scan(&lateID))

	r := <-done
	require.NoError(t, r.err)
	t.Logf("the first drain: complete %v, %d rows left in the outbox", r.res.Complete, b.outboxCount(t))
	// Whatever the drain left, the next one relays.
	_, err = s.drainer.Drain(ctx, time.Time{})
	require.NoError(t, err)
	require.Zero(t, b.outboxCount(t))

	var ids []int64
	for _, e := range b.entries(t, "user") {
		if e.AggregateID == "agg" {
			ids = append(ids, e.OutboxID)
		}
	}
	t.Logf("late writer's id %d; aggregate agg's ids in stream order: %v", lateID, ids)
	require.Len(t, ids, 2)
	require.Less(t, ids[0], ids[1], "aggregate agg's events in the stream, by outbox id: the second writer's event came first")
}

// setupOnServerOf is setup with the test database on the PostgreSQL server
// that the environment variable names (one set up for the test, since the
// shared server may not be changed); the test is skipped without it.
func setupOnServerOf(t *testing.T, variable, what string) *testBundle {
	t.Helper()
	url := os.Getenv(variable)
	if url == "" {
		t.Skipf("needs %s (%s)", variable, what)
	}
	t.Setenv("DATABASE_URL", url)
	return setup(t)
}
