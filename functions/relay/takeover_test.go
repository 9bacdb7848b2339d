package relay

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/pgtest"
)

// A crash between EXEC and COMMIT of a batch that holds an event whose
// stream name is taken by a key of another type: the next relay must still
// be able to drain.
func TestATakeoverSurvivesABatchInDoubtWithARefusedEvent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	require.NoError(t, b.redis.Do(ctx, b.redis.B().Set().Key(b.prefix+"clash").Value("x").Build()).Error())
	b.insert(t, "user", "good", 1, 2)
	b.insert(t, "clash", "bad", 1, 1)
	b.insert(t, "user", "good", 3, 2)

	crashing := b.relay(t)
	crashing.drainer.afterPublish = func() error { return errors.New("simulated crash") }
	_, err := crashing.drainer.Drain(ctx, time.Time{})
	require.ErrorContains(t, err, "simulated crash")

	next := b.relay(t)
	for range 3 {
		_, err = next.Drain(ctx, time.Now().Add(5*time.Second))
	}
	assert.NoError(t, err, "the relay is wedged until the in-flight marker expires (RELAY_DEDUPE_WINDOW)")
	var left, dead int
	require.NoError(t, b.pool.QueryRow(ctx,
		`SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM outbox_dead)`).Scan(&left, &dead))
	assert.Equal(t, 0, left, "rows stuck in the outbox")
	assert.Equal(t, 1, dead)
	b.insert(t, "user", "later", 1, 1)
	_, _ = next.Drain(ctx, time.Now().Add(5*time.Second))
	assert.Len(t, b.entries(t, "user"), 5, "later events are blocked too")
}

// The claim lock protects order only against a claim ahead that is already
// open when the next relay takes the drain lock. A claim ahead that starts a
// moment later (the old relay's process was paused, its pool had to dial)
// claims rows after the takeover, and the new relay publishes past them.
func TestALateClaimAheadOfARelayThatLostItsLockCannotReorder(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	a := b.relay(t, func(c *Config) {
		c.DatabaseURL = withApplicationName(t, b.url, "relay-a")
		c.BatchSize, c.Background = 10, false
	})
	standby := b.relay(t, func(c *Config) { c.BatchSize, c.Background = 10, false })
	b.insertBulk(t, "item", 100)

	// A's pool is full but for the one connection its drain takes, so that
	// its claim ahead waits for a connection, as one that dials would.
	hold := func(s *Service) func() {
		var conns []interface{ Release() }
		for range int(s.cfg.DBMaxConns) - 1 {
			c, err := s.pool.Acquire(ctx)
			require.NoError(t, err)
			conns = append(conns, c)
		}
		return func() {
			for _, c := range conns {
				c.Release()
			}
		}
	}
	releaseA := hold(a)
	var standbyErr error
	first := true
	a.drainer.beforePublish = func() {
		if !first {
			return
		}
		first = false
		// A's drain-lock session dies (killed, or ended by the server's
		// idle timeout while A's process was paused).
		_, err := b.pool.Exec(ctx, `SELECT pg_terminate_backend(l.pid) FROM pg_locks l
			JOIN pg_stat_activity s ON s.pid = l.pid
			WHERE s.application_name = 'relay-a' AND l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
			  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
			  AND l.objid::bigint = (`+drainLock+`::bigint & 4294967295)`)
		require.NoError(t, err)
		waitFor(t, 5*time.Second, "A's lock holder is gone", func() bool { return drainLockHolder(t, b) == "" })
		releaseB := hold(standby)
		standbyFirst := true
		standby.drainer.beforePublish = func() {
			if !standbyFirst {
				return
			}
			standbyFirst = false
			// Now A's claim ahead gets its connection and claims.
			releaseA()
			// Give it the time to claim (or, once fixed, to be refused); a
			// t.Fatal here would hang the standby's drain.
			time.Sleep(300 * time.Millisecond)
			releaseB()
		}
		_, standbyErr = standby.drainer.Drain(ctx, time.Time{})
	}
	_, err := a.drainer.Drain(ctx, time.Time{})
	require.Error(t, err, "A lost its lock")
	require.NoError(t, standbyErr)
	_, err = standby.drainer.Drain(ctx, time.Time{})
	require.NoError(t, err)
	require.Zero(t, b.outboxCount(t))
	requireExactlyOnceInOrder(t, b.entries(t, "item"), 100)
}

func TestWritersOfEveryKindAreWatched(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	tests := []struct {
		name  string
		write func(t *testing.T, tx pgx.Tx)
	}{
		{"COPY", func(t *testing.T, tx pgx.Tx) {
			_, err := tx.CopyFrom(ctx, pgx.Identifier{"outbox"}, []string{"aggregate_type", "aggregate_id", "event_type", "payload"},
				pgx.CopyFromRows([][]any{{"item", "b", "x", `{"seq": 0}`}}))
			require.NoError(t, err)
		}},
		{"INSERT ON CONFLICT DO NOTHING", func(t *testing.T, tx pgx.Tx) {
			_, err := tx.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('item', 'b', 'x', '{"seq": 0}') ON CONFLICT DO NOTHING`)
			require.NoError(t, err)
		}},
		{"an insert in a released savepoint", func(t *testing.T, tx pgx.Tx) {
			_, err := tx.Exec(ctx, `SAVEPOINT s; INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('item', 'b', 'x', '{"seq": 0}'); RELEASE s`)
			require.NoError(t, err)
		}},
		{"an insert through a view", func(t *testing.T, tx pgx.Tx) {
			_, err := tx.Exec(ctx, `CREATE TEMP VIEW v AS SELECT * FROM outbox; INSERT INTO v (aggregate_type, aggregate_id, event_type, payload) VALUES ('item', 'b', 'x', '{"seq": 0}')`)
			require.NoError(t, err)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			b.insert(t, "item", "a", 0, 1)
			s := b.relay(t)
			w := openTx(t, b.url)
			var vxid string
			s.drainer.beforePublish = func() {
				if vxid != "" {
					return
				}
				tt.write(t, w)
				require.NoError(t, w.QueryRow(ctx, `SELECT virtualtransaction FROM pg_locks WHERE pid = pg_backend_pid() LIMIT 1`).Scan(&vxid))
			}
			res, err := s.drainer.Drain(ctx, time.Time{})
			require.NoError(t, err)
			require.Contains(t, res.Writers, vxid)
			require.NoError(t, w.Commit(ctx))
			_, err = s.drainer.Drain(ctx, time.Time{})
			require.NoError(t, err)
			require.Len(t, b.entries(t, "item"), 2)
		})
	}
}

func TestServerErrorsAtEveryStepLeaveNoLockBehind(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	b.insertBulk(t, "item", 3000)
	for _, ms := range []int{1, 2, 3, 5, 8} {
		strict := b.relay(t, func(c *Config) {
			c.DatabaseURL = withApplicationName(t, pgtest.WithOptions(b.url, fmt.Sprintf("-c statement_timeout=%d", ms)), "strict")
			c.BatchSize = 1000
		})
		for range 5 {
			_, _ = strict.Drain(ctx, time.Now().Add(5*time.Second))
			var held int
			require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
				WHERE l.locktype = 'advisory' AND a.datname = current_database()`).Scan(&held))
			require.Zero(t, held, "statement_timeout=%dms left an advisory lock held after the drain", ms)
		}
	}
	_, err := b.relay(t).Drain(ctx, time.Now().Add(10*time.Second))
	require.NoError(t, err)
	require.Zero(t, b.outboxCount(t))
	ids := map[string]bool{}
	for _, e := range b.entries(t, "item") {
		require.False(t, ids[e.EventID], "event %s twice", e.EventID)
		ids[e.EventID] = true
	}
	require.Len(t, ids, 3000)
}
