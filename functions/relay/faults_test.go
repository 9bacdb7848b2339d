package relay

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/config"
	"github.com/outboxfn/outbox/shared/outbox"
	"github.com/outboxfn/outbox/shared/pgtest"
	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/stream"
)

// Faults that are not crashes: other people's transactions, server errors
// in the middle of the lock protocol, Redis refusing part of a batch.

// openTx begins a transaction on its own connection, rolled back with t.
func openTx(t *testing.T, url string) pgx.Tx {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close(context.Background()) })
	tx, err := conn.Begin(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { tx.Rollback(context.Background()) }) //nolint:errcheck // committed or gone
	return tx
}

func insertIn(t *testing.T, tx pgx.Tx, aggregateID string) {
	t.Helper()
	require.NoError(t, outbox.Insert(context.Background(), tx, outbox.Event{
		AggregateType: "user", AggregateID: aggregateID, EventType: "user.created",
		Payload: json.RawMessage(`{"seq": 0}`),
	}))
}

func TestAnOpenTransactionDelaysOnlyItsOwnRow(t *testing.T) {
	t.Parallel()
	b := setup(t)
	s := b.relay(t)
	start(t, s)

	// The insert rings the doorbell, so the transaction holds the busy lock
	// in shared mode until it ends: a forgotten BEGIN in psql.
	forgotten := openTx(t, b.url)
	insertIn(t, forgotten, "forgotten")

	b.insert(t, "user", "committed", 1, 5)
	waitFor(t, 3*time.Second, "the committed rows arrive while the transaction stays open", func() bool {
		return len(b.entries(t, "user")) == 5
	})

	code, body := trigger(t, s)
	require.Equal(t, http.StatusOK, code, body)
	assert.Equal(t, false, body["busy"], "the trigger was locked out: %v", body)

	standby := b.relay(t)
	_, err := standby.Drain(context.Background(), time.Now().Add(2*time.Second))
	require.NoError(t, err, "a standby relay must not be locked out by the open transaction")

	require.NoError(t, forgotten.Commit(context.Background()))
	waitFor(t, 3*time.Second, "the open transaction's row arrives once it commits", func() bool {
		return len(b.entries(t, "user")) == 6
	})
}

func TestAFailedLockWaitLeavesNoLockBehind(t *testing.T) {
	t.Parallel()
	b := setup(t)
	// A transaction holding the busy lock in shared mode, and a server that
	// cancels any statement running longer than 300 ms.
	holder := openTx(t, b.url)
	_, err := holder.Exec(context.Background(), `SELECT pg_advisory_xact_lock_shared(`+busyLock+`)`)
	require.NoError(t, err)
	strict := b.relay(t, func(c *Config) { c.DatabaseURL = pgtest.WithOptions(b.url, "-c statement_timeout=300") })
	var timeout string
	require.NoError(t, strict.pool.QueryRow(context.Background(), `SHOW statement_timeout`).Scan(&timeout))
	require.Equal(t, "300ms", timeout)
	b.insert(t, "user", "a", 1, 3)

	_, err = strict.Drain(context.Background(), time.Now().Add(5*time.Second))
	require.NoError(t, err, "the drain must not wait on the busy lock until the server cancels it")
	require.NoError(t, holder.Rollback(context.Background()))

	var leaked int
	require.NoError(t, b.pool.QueryRow(context.Background(),
		`SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid::int = `+drainLock+`
		 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`).Scan(&leaked))
	assert.Zero(t, leaked, "the drain lock outlived the drain")

	other := b.relay(t)
	_, err = other.Drain(context.Background(), time.Now().Add(2*time.Second))
	require.NoError(t, err, "another relay must be able to drain")
	assert.Len(t, b.entries(t, "user"), 3)
}

// transactions counts the transactions this database has run, as the
// statistics system reports them (each backend flushes at most once a
// second, so callers measure over seconds).
func transactions(t *testing.T, b *testBundle) int64 {
	t.Helper()
	ctx := context.Background()
	conn, err := b.pool.Acquire(ctx)
	require.NoError(t, err)
	defer conn.Release()
	_, err = conn.Exec(ctx, `SELECT pg_stat_clear_snapshot()`)
	require.NoError(t, err)
	var n int64
	require.NoError(t, conn.QueryRow(ctx,
		`SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()`).Scan(&n))
	return n
}

func TestTransactionsElsewhereCostTheIdleRelayNothing(t *testing.T) {
	t.Parallel()
	b := setup(t)
	elsewhere := openTx(t, pgtest.New(t))
	_, err := elsewhere.Exec(context.Background(), `SELECT pg_current_xact_id()`)
	require.NoError(t, err)
	unrelated := openTx(t, b.url) // idle in transaction here, without an outbox row
	_, err = unrelated.Exec(context.Background(), `SELECT pg_current_xact_id()`)
	require.NoError(t, err)

	s := b.relay(t)
	start(t, s)
	b.insert(t, "user", "a", 1, 1)
	waitFor(t, 3*time.Second, "the row arrives", func() bool { return len(b.entries(t, "user")) == 1 })

	time.Sleep(1500 * time.Millisecond) // let the drain's own statistics land
	before := transactions(t, b)
	time.Sleep(3 * time.Second)
	ran := transactions(t, b) - before
	assert.Less(t, ran, int64(20), "the idle relay ran %d transactions in 3 s", ran)

	b.insert(t, "user", "a", 2, 1)
	waitFor(t, time.Second, "a new row still arrives at once", func() bool { return len(b.entries(t, "user")) == 2 })
}

func TestTheTriggerDrainsRowsItsDrainKeptQuiet(t *testing.T) {
	t.Parallel()
	b := setup(t)
	s := b.relay(t, func(c *Config) { c.Background = false })
	b.insert(t, "user", "a", 1, 3)

	// While the triggered drain holds the busy lock, a transaction inserts
	// (so skips the doorbell) and commits only after the drain is over.
	quiet := openTx(t, b.url)
	inserted, committed := make(chan struct{}), make(chan error, 1)
	s.drainer.beforePublish = func() {
		select {
		case <-inserted:
		default:
			insertIn(t, quiet, "quiet")
			close(inserted)
			go func() {
				time.Sleep(300 * time.Millisecond)
				committed <- quiet.Commit(context.Background())
			}()
		}
	}
	code, body := trigger(t, s)
	require.Equal(t, http.StatusOK, code, body)
	require.NoError(t, <-committed)
	assert.Equal(t, 0, b.outboxCount(t), "the trigger left a row behind: %v", body)
	assert.Len(t, b.entries(t, "user"), 4)
}

func TestAnEventRedisRefusesIsKeptNotLost(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	tests := []struct {
		name          string
		aggregateType string
		prepare       func(t *testing.T, b *testBundle)
	}{
		{
			name:          "a stream name taken by a key of another type",
			aggregateType: "clash",
			prepare: func(t *testing.T, b *testBundle) {
				require.NoError(t, b.redis.Do(ctx, b.redis.B().Set().Key(b.prefix+"clash").Value("x").Build()).Error())
			},
		},
		{
			name:          "an aggregate type written before the check that maps onto the relay's own key",
			aggregateType: "_relay:epoch",
			prepare: func(t *testing.T, b *testBundle) {
				_, err := b.pool.Exec(ctx, `ALTER TABLE outbox DROP CONSTRAINT outbox_aggregate_type_check`)
				require.NoError(t, err)
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			tt.prepare(t, b)
			b.insert(t, "user", "good", 1, 2)
			_, err := b.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
				VALUES ($1, 'bad', 'bad.event', '{}')`, tt.aggregateType)
			require.NoError(t, err)
			b.insert(t, "user", "good", 3, 2)
			s := b.relay(t)

			for range 3 { // a drain that fails leaves the rows for the next one
				_, _ = s.Drain(ctx, time.Now().Add(5*time.Second))
			}
			var left, dead int
			require.NoError(t, b.pool.QueryRow(ctx,
				`SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM outbox_dead WHERE aggregate_type = $1 AND error <> '')`,
				tt.aggregateType).Scan(&left, &dead))
			assert.Equal(t, 1, left+dead, "the refused event vanished")
			assert.Equal(t, 1, dead, "the refused event should be in outbox_dead")
			assert.Len(t, b.entries(t, "user"), 4, "the good events must flow past the bad one")
			assert.EqualValues(t, 1, s.Health(ctx).Details.(map[string]any)["dead"], "health counts the dead events")
		})
	}
}

func TestEntriesCarryTheirOutboxIDSoAReorderIsVisible(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	s := b.relay(t)
	first := openTx(t, b.url)
	insertIn(t, first, "same") // takes the lower id
	b.insert(t, "user", "same", 1, 1)
	_, err := s.Drain(ctx, time.Now().Add(5*time.Second))
	require.NoError(t, err)
	require.NoError(t, first.Commit(ctx))
	_, err = s.Drain(ctx, time.Now().Add(5*time.Second))
	require.NoError(t, err)

	entries := b.entries(t, "user")
	require.Len(t, entries, 2)
	assert.Greater(t, entries[0].OutboxID, entries[1].OutboxID,
		"the later commit of the lower id is published second, and the ids show it")
}

func TestTheRelayTrimsWhatEveryGroupAcknowledged(t *testing.T) {
	t.Parallel()
	t.Run("trimming is on by default", func(t *testing.T) {
		var cfg Config
		require.NoError(t, config.Load(&cfg))
		assert.Positive(t, cfg.TrimInterval)
		assert.Positive(t, cfg.StreamRetention)
	})
	t.Run("after a drain, acknowledged entries past the retention are gone and the rest stay", func(t *testing.T) {
		t.Parallel()
		ctx := context.Background()
		b := setup(t)
		s := b.relay(t, func(c *Config) { c.TrimInterval, c.StreamRetention = time.Millisecond, 0 })
		key := stream.Name(b.prefix, "user")
		b.insert(t, "user", "a", 1, 5)
		_, err := s.Drain(ctx, time.Now().Add(5*time.Second))
		require.NoError(t, err)
		require.NoError(t, b.redis.Do(ctx, b.redis.B().XgroupCreate().Key(key).Group("g").Id("0").Build()).Error())
		read, err := b.redis.Do(ctx, b.redis.B().Xreadgroup().Group("g", "c").Count(3).Streams().Key(key).Id(">").Build()).AsXRead()
		require.NoError(t, err)
		for _, e := range read[key] {
			require.NoError(t, b.redis.Do(ctx, b.redis.B().Xack().Key(key).Group("g").Id(e.ID).Build()).Error())
		}
		time.Sleep(5 * time.Millisecond)
		b.insert(t, "user", "a", 6, 1)
		_, err = s.Drain(ctx, time.Now().Add(5*time.Second))
		require.NoError(t, err)
		left := b.entries(t, "user")
		require.Len(t, left, 3, "the 3 acknowledged entries are trimmed; 2 unread and the new one stay")
		for i, e := range left {
			assert.Contains(t, e.Payload, fmt.Sprintf(`"seq": %d`, 4+i))
		}
	})
}

func TestABatchWaitsForAReplicaWhenAsked(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	primary := redistest.StartServer(t)
	replica := redistest.StartReplica(t, primary)
	onReplica, err := stream.NewClient(replica.URL(), false)
	require.NoError(t, err)
	t.Cleanup(onReplica.Close)
	s := b.relay(t, func(c *Config) {
		c.RedisURL, c.WaitReplicas, c.WaitTimeout = primary.URL(), 1, 200*time.Millisecond
	})
	replicated := func() int64 {
		n, err := onReplica.Do(ctx, onReplica.B().Xlen().Key(stream.Name(b.prefix, "user")).Build()).AsInt64()
		require.NoError(t, err)
		return n
	}

	b.insert(t, "user", "a", 1, 50)
	res, err := s.Drain(ctx, time.Now().Add(5*time.Second))
	require.NoError(t, err)
	assert.Zero(t, res.Unreplicated)
	assert.Equal(t, int64(50), replicated(), "when the drain returns, the replica has every entry")

	replica.Pause()
	b.insert(t, "user", "a", 51, 5)
	res, err = s.Drain(ctx, time.Now().Add(5*time.Second))
	replica.Resume()
	require.NoError(t, err, "a replica that does not answer delays a batch, it does not stop the relay")
	assert.Equal(t, 1, res.Unreplicated, "the batch no replica confirmed is counted")
	assert.Equal(t, 0, b.outboxCount(t))
}
