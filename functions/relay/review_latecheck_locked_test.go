package relay

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// Review of 25e23a9: a row locked by someone else (README: "for example
// someone's UPDATE outbox left open") sits below every bound. lateBelowSQL
// found it (it did not skip locked rows until b60a421), so whenever needsLateCheck says look, which
// under steady inserts is most batches, the batch claimed ahead is rolled
// back and claimed again from the start: the claim ahead is wasted, and
// the drain publishes and claims in turn instead of side by side. The row
// is not late, and rolling back cannot help: it stays locked.
//
// Needs pg_stat_statements: a private server started with
// -c shared_preload_libraries=pg_stat_statements, named by
// REVIEW_STATS_DATABASE_URL.
func TestReviewALockedRowDoesNotDiscardEveryBatchAhead(t *testing.T) {
	b := setupOnServerOf(t, "REVIEW_STATS_DATABASE_URL", "a server with pg_stat_statements loaded")
	ctx := context.Background()
	_, err := b.pool.Exec(ctx, `CREATE EXTENSION IF NOT EXISTS pg_stat_statements`)
	require.NoError(t, err)
	s := b.relay(t, func(c *Config) { c.Background = false })
	b.insertBulk(t, "user", 30000)
	locker := openTx(t, b.url)
	_, err = locker.Exec(ctx, `UPDATE outbox SET payload = payload WHERE id = (SELECT min(id) FROM outbox)`)
	require.NoError(t, err)
	_, err = b.pool.Exec(ctx, `SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database WHERE datname = current_database()), 0)`)
	require.NoError(t, err)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		conn, err := pgx.Connect(ctx, b.url)
		if err != nil {
			return
		}
		defer conn.Close(ctx)
		for {
			select {
			case <-stop:
				return
			default:
			}
			tx, err := conn.Begin(ctx)
			if err != nil {
				return
			}
			if _, err := tx.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('app', 'a', 'e', '{}')`); err != nil {
				return
			}
			time.Sleep(2 * time.Millisecond)
			if tx.Commit(ctx) != nil {
				return
			}
		}
	})
	res, err := s.drainer.Drain(ctx, time.Now().Add(60*time.Second))
	close(stop)
	wg.Wait()
	require.NoError(t, err)

	stat := func(like string) (calls, rows int64) {
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT coalesce(sum(calls), 0)::bigint, coalesce(sum(rows), 0)::bigint
			FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
			  AND regexp_replace(query, '\s+', ' ', 'g') LIKE $1`, like).Scan(&calls, &rows))
		return
	}
	aheadCalls, aheadRows := stat(`DELETE FROM outbox WHERE id = ANY (ARRAY (SELECT id FROM outbox WHERE id >%`)
	startCalls, startRows := stat(`DELETE FROM outbox WHERE id = ANY (ARRAY (SELECT id FROM outbox ORDER BY%`)
	checks, _ := stat(`SELECT id FROM outbox WHERE id <= $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED%`)
	t.Logf("relayed %d in %d batches; claims ahead %d (%d rows), claims from the start %d (%d rows); looks for late rows %d",
		res.Relayed, res.Batches, aheadCalls, aheadRows, startCalls, startRows, checks)
	claimed := aheadRows + startRows
	require.LessOrEqual(t, claimed, int64(res.Relayed)*11/10,
		"rows claimed %d for %d relayed: batches claimed ahead were given back (a locked row is not a late row)", claimed, res.Relayed)
}
