package relay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/outbox"
	"github.com/outboxfn/outbox/shared/pgtest"
	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/serve"
	"github.com/outboxfn/outbox/shared/stream"
)

func TestMain(m *testing.M) {
	// After a failover a rueidis cluster client closes the connections to
	// nodes that left the slot map 5 s later, in a goroutine of its own
	// that Close does not wait for.
	goleak.VerifyTestMain(m,
		goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*clusterClient)._refresh.func2"))
}

type testBundle struct {
	url    string
	pool   *pgxpool.Pool
	redis  rueidis.Client
	prefix string
	// redisURL and cluster are what the relay connects to.
	redisURL string
	cluster  bool
}

func setup(t *testing.T) *testBundle {
	t.Helper()
	url, pool := pgtest.NewPool(t)
	client, prefix := redistest.New(t)
	return &testBundle{url: url, pool: pool, redis: client, prefix: prefix, redisURL: redistest.URL()}
}

// setupOn is setup with the streams on the Redis Cluster c.
func setupOn(t *testing.T, c *redistest.Cluster) *testBundle {
	t.Helper()
	url, pool := pgtest.NewPool(t)
	client, prefix := c.Client(t)
	return &testBundle{url: url, pool: pool, redis: client, prefix: prefix, redisURL: c.URL(), cluster: true}
}

func (b *testBundle) config(mutate ...func(*Config)) Config {
	cfg := Config{
		Config:         logging.Config{LogFormat: "text", LogLevel: "info"},
		DatabaseURL:    b.url,
		DBMaxConns:     4,
		RedisURL:       b.redisURL,
		RedisCluster:   b.cluster,
		StreamPrefix:   b.prefix,
		BatchSize:      100,
		PollInterval:   time.Hour, // tests prove wake-ups; the poll must not rescue them
		DedupeWindow:   time.Hour,
		Retention:      time.Hour,
		TrimInterval:   time.Minute,
		DrainTimeout:   30 * time.Second,
		ReconnectDelay: 50 * time.Millisecond,
		Background:     true,
	}
	for _, m := range mutate {
		m(&cfg)
	}
	return cfg
}

// relay builds a relay (not started) that is stopped and closed with t.
func (b *testBundle) relay(t *testing.T, mutate ...func(*Config)) *Service {
	t.Helper()
	s, err := New(context.Background(), b.config(mutate...), logging.Discard())
	require.NoError(t, err)
	t.Cleanup(func() { s.Stop(); s.Close() })
	return s
}

func start(t *testing.T, s *Service) {
	t.Helper()
	require.NoError(t, s.Start(context.Background()))
	waitFor(t, 10*time.Second, "the listener connects", s.listening.Load)
}

// insert writes n events for aggregate in one transaction each, numbering
// them in their payload from first.
func (b *testBundle) insert(t *testing.T, aggregateType, aggregateID string, first, n int) {
	t.Helper()
	ctx := context.Background()
	for i := first; i < first+n; i++ {
		tx, err := b.pool.Begin(ctx)
		require.NoError(t, err)
		require.NoError(t, outbox.Insert(ctx, tx, outbox.Event{
			AggregateType: aggregateType, AggregateID: aggregateID, EventType: aggregateType + ".changed",
			Payload: json.RawMessage(fmt.Sprintf(`{"seq": %d, "aggregate": %q}`, i, aggregateID)),
		}))
		require.NoError(t, tx.Commit(ctx))
	}
}

// insertBulk writes n events for one aggregate in one statement.
func (b *testBundle) insertBulk(t *testing.T, aggregateType string, n int) {
	t.Helper()
	_, err := b.pool.Exec(context.Background(),
		`INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
		 SELECT $1, (i % 10)::text, 'bulk', json_build_object('seq', i) FROM generate_series(1, $2) AS i`,
		aggregateType, n)
	require.NoError(t, err)
}

func (b *testBundle) entries(t *testing.T, aggregateType string) []stream.Event {
	t.Helper()
	msgs, err := b.redis.Do(context.Background(),
		b.redis.B().Xrange().Key(stream.Name(b.prefix, aggregateType)).Start("-").End("+").Build()).AsXRange()
	require.NoError(t, err)
	out := make([]stream.Event, len(msgs))
	for i, m := range msgs {
		e, err := stream.Decode(m.ID, m.FieldValues)
		require.NoError(t, err)
		out[i] = e
	}
	return out
}

func (b *testBundle) outboxCount(t *testing.T) int {
	t.Helper()
	var n int
	require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT count(*) FROM outbox`).Scan(&n))
	return n
}

// requireExactlyOnceInOrder checks that entries hold want distinct events
// and that each aggregate's events appear in increasing seq order.
func requireExactlyOnceInOrder(t *testing.T, entries []stream.Event, want int) {
	t.Helper()
	seen := map[string]bool{}
	lastSeq := map[string]int{}
	for _, e := range entries {
		require.False(t, seen[e.EventID], "event %s published twice", e.EventID)
		seen[e.EventID] = true
		var p struct {
			Seq int `json:"seq"`
		}
		require.NoError(t, json.Unmarshal([]byte(e.Payload), &p))
		if last, ok := lastSeq[e.AggregateID]; ok {
			require.Greater(t, p.Seq, last, "aggregate %s out of order", e.AggregateID)
		}
		lastSeq[e.AggregateID] = p.Seq
	}
	require.Len(t, seen, want)
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting until %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func trigger(t *testing.T, s *Service, header ...string) (int, map[string]any) {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, "/", nil)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, req)
	var body map[string]any
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &body), rec.Body.String())
	return rec.Code, body
}

// backends are the Redis deployments the main tests run against: the
// shared server, and a three-shard Redis Cluster with a replica per shard,
// started for t.
func backends(t *testing.T) []struct {
	name  string
	setup func(*testing.T) *testBundle
} {
	c := redistest.StartCluster(t, 3, 1)
	return []struct {
		name  string
		setup func(*testing.T) *testBundle
	}{
		{"one server", setup},
		{"a Redis Cluster", func(t *testing.T) *testBundle { return setupOn(t, c) }},
	}
}

func TestRelay(t *testing.T) {
	t.Parallel()
	backends := backends(t)

	for _, on := range backends {
		t.Run("publishes every row once with its fields intact, then deletes it, on "+on.name, func(t *testing.T) {
			t.Parallel()
			b := on.setup(t)
			ctx := context.Background()
			tx, err := b.pool.Begin(ctx)
			require.NoError(t, err)
			tp := "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
			payload := `{"user_id": 7,  "name": "Zoë \"Z\" <z>", "nested": {"a": [1, 2.50]}}`
			require.NoError(t, outbox.Insert(ctx, tx, outbox.Event{AggregateType: "user", AggregateID: "7",
				EventType: "user.created", Payload: json.RawMessage(payload), Traceparent: tp}))
			require.NoError(t, tx.Commit(ctx))
			var eventID string
			var createdAt time.Time
			require.NoError(t, b.pool.QueryRow(ctx, `SELECT event_id::text, created_at FROM outbox`).Scan(&eventID, &createdAt))
			b.insertBulk(t, "order", 250)

			status, body := trigger(t, b.relay(t))
			require.Equal(t, http.StatusOK, status, body)
			require.EqualValues(t, 251, body["relayed"])
			require.EqualValues(t, 0, body["backlog"])
			require.EqualValues(t, 0, body["oldest_age_seconds"])
			require.Equal(t, true, body["complete"])
			require.EqualValues(t, 3, body["batches"], "251 rows in batches of 100")

			users := b.entries(t, "user")
			require.Len(t, users, 1)
			e := users[0]
			require.Equal(t, eventID, e.EventID)
			require.Equal(t, "user.created", e.EventType)
			require.Equal(t, "user", e.AggregateType)
			require.Equal(t, "7", e.AggregateID)
			require.Equal(t, payload, e.Payload, "the payload is relayed byte for byte")
			require.Equal(t, tp, e.Traceparent)
			require.True(t, createdAt.Equal(e.OccurredAt), "occurred_at %s != created_at %s", e.OccurredAt, createdAt)

			orders := b.entries(t, "order")
			requireExactlyOnceInOrder(t, orders, 250)
			require.Empty(t, orders[0].Traceparent, "no traceparent field when none was stored")
			require.Zero(t, b.outboxCount(t))
		})
	}

	for _, on := range backends {
		t.Run("relays concurrent inserts exactly once and in order per aggregate, on "+on.name, func(t *testing.T) {
			t.Parallel()
			b := on.setup(t)
			s := b.relay(t)
			start(t, s)
			var wg sync.WaitGroup
			for g := range 8 {
				wg.Go(func() { b.insert(t, "item", fmt.Sprint(g), 0, 100) })
			}
			wg.Wait()
			waitFor(t, 20*time.Second, "800 entries arrive", func() bool { return len(b.entries(t, "item")) >= 800 })
			requireExactlyOnceInOrder(t, b.entries(t, "item"), 800)
			// Entries are in the stream from the EXEC on, rows gone only at the COMMIT after it.
			waitFor(t, 10*time.Second, "the last batch commits", func() bool { return b.outboxCount(t) == 0 })
		})
	}

	t.Run("lets two relays run at once without losing or duplicating", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		r1, r2 := b.relay(t), b.relay(t)
		start(t, r1)
		start(t, r2)
		var wg sync.WaitGroup
		for g := range 6 {
			wg.Go(func() { b.insert(t, "item", fmt.Sprint(g), 0, 100) })
		}
		for range 5 {
			wg.Go(func() {
				status, body := trigger(t, r2)
				require.Equal(t, http.StatusOK, status, body)
			})
		}
		wg.Wait()
		waitFor(t, 20*time.Second, "600 entries arrive", func() bool { return len(b.entries(t, "item")) >= 600 })
		b.insertBulk(t, "item2", 500)
		waitFor(t, 20*time.Second, "500 more arrive", func() bool { return len(b.entries(t, "item2")) >= 500 })
		requireExactlyOnceInOrder(t, b.entries(t, "item"), 600)
		require.Len(t, b.entries(t, "item2"), 500)
		// Entries are in the stream from the EXEC on, rows gone only at the COMMIT after it.
		waitFor(t, 10*time.Second, "the last batch commits", func() bool { return b.outboxCount(t) == 0 })
	})

	for _, on := range backends {
		t.Run("loses nothing and publishes nothing twice when killed between XADD and COMMIT, on "+on.name, func(t *testing.T) {
			t.Parallel()
			b := on.setup(t)
			b.insertBulk(t, "item", 250)
			crashing := b.relay(t)
			crashing.drainer.afterPublish = func() error { return errors.New("simulated crash") }
			_, err := crashing.drainer.Drain(context.Background(), time.Time{})
			require.ErrorContains(t, err, "simulated crash")
			require.Len(t, b.entries(t, "item"), 100, "the first batch reached the stream")
			require.Equal(t, 250, b.outboxCount(t), "but its rows were not deleted")

			// A new relay, with nothing in memory, takes over.
			res, err := b.relay(t).drainer.Drain(context.Background(), time.Time{})
			require.NoError(t, err)
			require.Equal(t, 150, res.Relayed)
			require.Equal(t, 100, res.Duplicates)
			require.Zero(t, b.outboxCount(t))
			entries := b.entries(t, "item")
			require.Len(t, entries, 250)
			ids := map[string]bool{}
			for _, e := range entries {
				ids[e.EventID] = true
			}
			require.Len(t, ids, 250, "no event is in the stream twice")
		})
	}

	for _, on := range backends {
		t.Run("refuses the batch of a relay that lost its lock without noticing, on "+on.name, func(t *testing.T) {
			t.Parallel()
			b := on.setup(t)
			b.insertBulk(t, "item", 50)
			ctx := context.Background()
			zombie := b.relay(t)
			var takeover struct {
				res Result
				err error
			}
			// Between the zombie's claim and its XADD, its connection dies (a
			// network partition, say) and another relay drains everything.
			zombie.drainer.beforePublish = func() {
				_, err := b.pool.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_locks
				WHERE locktype = 'advisory' AND pid <> pg_backend_pid()
				  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`)
				if err == nil {
					takeover.res, takeover.err = b.relay(t).drainer.Drain(ctx, time.Time{})
				} else {
					takeover.err = err
				}
			}
			_, err := zombie.drainer.Drain(ctx, time.Time{})
			require.ErrorIs(t, err, ErrSuperseded)
			require.NoError(t, takeover.err)
			require.Equal(t, 50, takeover.res.Relayed)

			entries := b.entries(t, "item")
			ids := map[string]bool{}
			for _, e := range entries {
				ids[e.EventID] = true
			}
			require.Len(t, ids, 50, "every event is in the stream")
			require.Equal(t, 50, len(entries), "and none twice")
			require.Zero(t, b.outboxCount(t))
		})
	}

	for _, on := range backends {
		t.Run("keeps no more than the batch in doubt in its in-flight marker, on "+on.name, func(t *testing.T) {
			t.Parallel()
			b := on.setup(t)
			ctx := context.Background()
			records := func() int64 {
				n, err := b.redis.Do(ctx, b.redis.B().Strlen().Key(stream.Sibling(stream.Name(b.prefix, "item"), markerRole)).Build()).AsInt64()
				require.NoError(t, err)
				return n / markerRecord
			}
			s := b.relay(t)
			for i := range 30 {
				b.insert(t, "item", "a", i, 1)
				_, err := s.drainer.Drain(ctx, time.Time{})
				require.NoError(t, err)
				require.LessOrEqual(t, records(), int64(1), "drain %d carried committed batches forward", i)
			}

			// A crash leaves a batch in doubt: the next relay keeps it, skips
			// it, and drops it from the marker once its rows are deleted.
			b.insertBulk(t, "item", 150)
			crashing := b.relay(t)
			crashing.drainer.afterPublish = func() error { return errors.New("simulated crash") }
			_, err := crashing.drainer.Drain(ctx, time.Time{})
			require.Error(t, err)
			require.EqualValues(t, 100, records())
			res, err := b.relay(t).drainer.Drain(ctx, time.Time{})
			require.NoError(t, err)
			require.Equal(t, 100, res.Duplicates)
			require.Equal(t, 50, res.Relayed)
			b.insert(t, "item", "b", 0, 1)
			_, err = s.drainer.Drain(ctx, time.Time{})
			require.NoError(t, err)
			require.LessOrEqual(t, records(), int64(1))
			require.Len(t, b.entries(t, "item"), 181, "every event once")
		})
	}

	t.Run("republishes an interrupted batch when suppression is off", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		b.insertBulk(t, "item", 50)
		crashing := b.relay(t, func(c *Config) { c.DedupeWindow = 0 })
		crashing.drainer.afterPublish = func() error { return errors.New("simulated crash") }
		_, err := crashing.drainer.Drain(context.Background(), time.Time{})
		require.Error(t, err)
		_, err = b.relay(t, func(c *Config) { c.DedupeWindow = 0 }).drainer.Drain(context.Background(), time.Time{})
		require.NoError(t, err)
		require.Len(t, b.entries(t, "item"), 100, "at-least-once: each event twice, none lost")
	})

	t.Run("keeps rows while Redis is down and relays them once it is back", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		server := redistest.StartServer(t)
		s := b.relay(t, func(c *Config) { c.RedisURL = server.URL() })
		start(t, s)
		b.insert(t, "item", "a", 0, 3)
		client, err := stream.NewClient(server.URL(), false)
		require.NoError(t, err)
		defer client.Close()
		count := func() int64 {
			n, _ := client.Do(context.Background(), client.B().Xlen().Key(b.prefix+"item").Build()).AsInt64()
			return n
		}
		// Rows are deleted once the EXEC's reply is in; stopping Redis before
		// then would leave them to be published again.
		waitFor(t, 10*time.Second, "3 entries arrive and their rows are deleted", func() bool {
			return count() == 3 && b.outboxCount(t) == 0
		})

		server.Stop()
		b.insert(t, "item", "a", 3, 5)
		status, body := trigger(t, s)
		require.Equal(t, http.StatusServiceUnavailable, status, body)
		require.Equal(t, 5, b.outboxCount(t), "nothing is dropped while Redis is down")

		server.Start()
		waitFor(t, 15*time.Second, "the backlog arrives after Redis returns", func() bool { return b.outboxCount(t) == 0 })
		waitFor(t, 5*time.Second, "the 3 events Redis forgot are published again", func() bool { return count() == 8 })
		private := *b
		private.redis = client
		requireExactlyOnceInOrder(t, private.entries(t, "item"), 8)
	})

	t.Run("reconnects its listener and wakes on the next insert without the poll", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		s := b.relay(t)
		start(t, s)
		// Kill every other session of the test database, the listener included,
		// as a database restart would.
		_, err := b.pool.Exec(context.Background(),
			`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()`)
		require.NoError(t, err)
		waitFor(t, 10*time.Second, "the listener notices", func() bool { return !s.listening.Load() })
		waitFor(t, 10*time.Second, "the listener reconnects", s.listening.Load)
		b.insert(t, "item", "a", 0, 1)
		waitFor(t, 5*time.Second, "the insert is relayed", func() bool { return len(b.entries(t, "item")) == 1 })
	})

	t.Run("watches an insert that skipped the doorbell", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		b.insert(t, "item", "a", 0, 1)
		s := b.relay(t)
		// While the relay is busy, an insert begins: it skips the doorbell.
		skipper, err := b.pool.Begin(ctx)
		require.NoError(t, err)
		defer skipper.Rollback(ctx) //nolint:errcheck
		var vxid string
		s.drainer.beforePublish = func() {
			require.NoError(t, outbox.Insert(ctx, skipper, outbox.Event{AggregateType: "item", AggregateID: "b",
				EventType: "x", Payload: json.RawMessage(`{"seq": 0}`)}))
			require.NoError(t, skipper.QueryRow(ctx,
				`SELECT virtualtransaction FROM pg_locks WHERE pid = pg_backend_pid() LIMIT 1`).Scan(&vxid))
		}
		res, err := s.drainer.Drain(ctx, time.Time{})
		require.NoError(t, err)
		require.Equal(t, 1, res.Relayed)
		require.Contains(t, res.Writers, vxid,
			"the open insert is watched, so its commit wakes the relay; otherwise it waits for the poll")
	})

	t.Run("rings the doorbell only while no relay is draining", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		listener, err := b.pool.Acquire(ctx)
		require.NoError(t, err)
		defer listener.Release()
		_, err = listener.Exec(ctx, "LISTEN outbox")
		require.NoError(t, err)
		notified := func() bool {
			ctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
			defer cancel()
			_, err := listener.Conn().WaitForNotification(ctx)
			return err == nil
		}

		b.insert(t, "item", "a", 0, 1)
		require.True(t, notified(), "an idle relay is woken")

		busy, err := b.pool.Acquire(ctx)
		require.NoError(t, err)
		defer busy.Release()
		_, err = busy.Exec(ctx, "SELECT pg_advisory_lock("+busyLock+")")
		require.NoError(t, err)
		b.insert(t, "item", "a", 1, 1)
		require.False(t, notified(), "a draining relay is not disturbed")
		_, err = busy.Exec(ctx, "SELECT pg_advisory_unlock("+busyLock+")")
		require.NoError(t, err)

		b.insert(t, "item", "a", 2, 1)
		require.True(t, notified())
	})

	t.Run("answers busy, not 503, while its own loop keeps draining", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		s := b.relay(t, func(c *Config) { c.DrainTimeout = time.Second })
		b.insertBulk(t, "item", 5)
		s.drainer.sem <- struct{}{} // the background loop is in a long drain
		status, body := trigger(t, s)
		<-s.drainer.sem
		require.Equal(t, http.StatusOK, status, body)
		require.Equal(t, true, body["busy"])
		require.EqualValues(t, 5, body["backlog"])
	})

	t.Run("answers other methods with 405 and a missing token with 401", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		s := b.relay(t, func(c *Config) { c.TriggerToken = "s3cret" })
		rec := httptest.NewRecorder()
		s.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
		require.Equal(t, http.StatusMethodNotAllowed, rec.Code)
		require.Equal(t, "POST", rec.Header().Get("Allow"))

		for _, auth := range []string{"", "Bearer wrong", "s3cret", "Basic czNjcmV0"} {
			status, body := trigger(t, s, "Authorization", auth)
			require.Equal(t, http.StatusUnauthorized, status, "Authorization %q", auth)
			require.Contains(t, body, "error")
		}
		status, body := trigger(t, s, "Authorization", "Bearer s3cret")
		require.Equal(t, http.StatusOK, status, body)
	})
}

// TestNoLostWakeups bounds latency, so it runs alone: not in parallel with
// the package's other tests, and `make test` runs it after every other
// package's, which would load the same two cores.
func TestNoLostWakeups(t *testing.T) {
	b := setup(t)
	s := b.relay(t) // poll interval: one hour
	start(t, s)
	ctx := context.Background()

	// A session idle in transaction, holding an xid, must not stall the relay.
	idle, err := b.pool.Begin(ctx)
	require.NoError(t, err)
	defer idle.Rollback(ctx) //nolint:errcheck
	_, err = idle.Exec(ctx, `SELECT pg_current_xact_id()`)
	require.NoError(t, err)

	// Read the stream as it fills, stamping each entry's arrival.
	arrived := map[string]time.Time{}
	var mu sync.Mutex
	readCtx, stopReading := context.WithCancel(ctx)
	var reader sync.WaitGroup
	reader.Go(func() {
		last := "0"
		for readCtx.Err() == nil {
			res, err := b.redis.Do(readCtx, b.redis.B().Xread().Count(1000).Block(100).Streams().
				Key(b.prefix+"item").Id(last).Build()).AsXRead()
			if err != nil {
				continue
			}
			now := time.Now()
			mu.Lock()
			for _, e := range res[b.prefix+"item"] {
				arrived[e.FieldValues[stream.FieldEventID]] = now
				last = e.ID
			}
			mu.Unlock()
		}
	})

	// Bursts of concurrent inserts separated by pauses, so that the relay
	// keeps switching between busy (doorbell off) and idle. With the poll
	// an hour away, an event whose wake-up was lost stays in the outbox
	// until the next burst's doorbell: it arrives only after that burst
	// began, or, after the last burst, never.
	type commit struct {
		at    time.Time
		burst int
	}
	const bursts = 20
	committed := map[string]commit{}
	var cmu sync.Mutex
	began := make([]time.Time, bursts)
	total := 0
	for burst := range bursts {
		n := 5 + 20*(burst%3)
		began[burst] = time.Now()
		var wg sync.WaitGroup
		for g := range 4 {
			wg.Go(func() {
				for i := range n {
					// Between the trigger and the commit, a pause of up to
					// 8 ms: the race a lost wake-up hides in is an insert
					// that skipped the doorbell and commits after the
					// relay's last look.
					var id string
					err := pgx.BeginFunc(ctx, b.pool, func(tx pgx.Tx) error {
						err := tx.QueryRow(ctx,
							`INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
							 VALUES ('item', $1, 'x', json_build_object('seq', $2::int)) RETURNING event_id::text`,
							fmt.Sprintf("%d-%d", burst, g), i).Scan(&id)
						if err != nil {
							return err
						}
						_, err = tx.Exec(ctx, `SELECT pg_sleep($1)`, float64((i*7+g*3)%9)/1000)
						return err
					})
					if !assert.NoError(t, err) {
						return
					}
					now := time.Now()
					cmu.Lock()
					committed[id] = commit{now, burst}
					cmu.Unlock()
				}
			})
		}
		wg.Wait()
		total += 4 * n
		// Pauses well above the 100 ms bound, so that a slow machine's
		// delays are not mistaken for a lost wake-up.
		time.Sleep(time.Duration(300+burst*37%50) * time.Millisecond)
	}
	waitFor(t, 10*time.Second, "every event arrives (one that does not lost its wake-up)", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(arrived) >= total
	})
	stopReading()
	reader.Wait()

	var latencies []time.Duration
	for id, c := range committed {
		if c.burst+1 < bursts && !arrived[id].Before(began[c.burst+1]) {
			t.Errorf("event %s of burst %d arrived %s after its commit, only once burst %d had begun: its wake-up was lost",
				id, c.burst, arrived[id].Sub(c.at), c.burst+1)
		}
		latencies = append(latencies, arrived[id].Sub(c.at))
	}
	sort.Slice(latencies, func(i, j int) bool { return latencies[i] < latencies[j] })
	p50, p99, max := latencies[len(latencies)/2], latencies[len(latencies)*99/100], latencies[len(latencies)-1]
	t.Logf("%d events: commit-to-stream p50 %s, p99 %s, max %s", len(latencies), p50, p99, max)
	require.Less(t, max, 100*time.Millisecond, "an event took longer than the bound to reach the stream")
}

func TestHandlerTimeoutOutlastsTheDrain(t *testing.T) {
	t.Parallel()
	s := &Service{cfg: Config{DrainTimeout: 2 * time.Minute}}
	var ht serve.HandlerTimeout = s
	require.Greater(t, ht.HandlerTimeout(), 2*time.Minute,
		"the server must not cut a triggered drain's answer before the drain may end")
}
