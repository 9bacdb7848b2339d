package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/stream"
)

// Review finding: the drain's epoch comes from PostgreSQL's sequence
// outbox_relay_batch and each stream's epoch key in Redis keeps the
// highest one seen. When PostgreSQL goes back in time while Redis does not
// (a point-in-time restore after an incident, a database recreated and
// migrated again, a move to another instance with a fresh sequence), every
// stream's key is ahead of every epoch the relay can take, so every
// takeover is refused ("another relay has taken over the streams") until
// the sequence has been advanced past it by failed drains, one number per
// drain: no event is relayed meanwhile.
func TestReviewARelayWhoseDatabaseWentBackInTimeStillDrains(t *testing.T) {
	t.Parallel()
	for _, backend := range backends(t) {
		t.Run(backend.name, func(t *testing.T) {
			t.Parallel()
			b := backend.setup(t)
			ctx := context.Background()
			for i := range 5 {
				b.insert(t, "item", "a", i*10, 10)
				res, err := b.relay(t).drainer.Drain(ctx, time.Time{})
				require.NoError(t, err)
				require.Equal(t, 10, res.Relayed)
			}
			// The database is restored to a point before those drains:
			// its sequence goes back, Redis keeps its epoch keys.
			_, err := b.pool.Exec(ctx, `SELECT setval('outbox_relay_batch', 1)`)
			require.NoError(t, err)
			b.insert(t, "item", "a", 50, 10)
			res, err := b.relay(t).drainer.Drain(ctx, time.Time{})
			require.NoError(t, err, "the only relay there is must not be refused as superseded")
			require.Equal(t, 10, res.Relayed)
		})
	}
}

// reviewPair returns two aggregate types whose streams are on different
// shards of c.
func reviewPair(t *testing.T, c *redistest.Cluster, prefix string) (string, string) {
	t.Helper()
	for _, x := range spreadTypes {
		for _, y := range spreadTypes {
			if c.PrimaryOf(stream.Name(prefix, x)) != c.PrimaryOf(stream.Name(prefix, y)) {
				return x, y
			}
		}
	}
	t.Fatal("no two streams on different shards")
	return "", ""
}

// A batch with events of two streams on two shards: one shard's primary
// freezes (SIGSTOP) while the batch is in flight, so that stream's EXEC
// times out while the other's succeeds; the frozen primary is failed over
// meanwhile, then comes back (and may still run the EXEC it had buffered).
// Every event must end up in its stream exactly once.
func TestReviewAHalfPublishedBatchAcrossShards(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t, 3, 1)
	b := setupOn(t, c)
	x, y := reviewPair(t, c, b.prefix)
	ctx := context.Background()
	frozen := c.PrimaryOf(stream.Name(b.prefix, y))
	s := b.relay(t, func(cfg *Config) { cfg.BatchSize = 60 })
	// A first drain makes both streams known, so that the next session
	// takes them over at its start, before the batch goes out.
	b.insert(t, x, "w", 0, 1)
	b.insert(t, y, "w", 0, 1)
	_, err := s.drainer.Drain(ctx, time.Time{})
	require.NoError(t, err)
	for i := range 60 {
		typ := x
		if i%2 == 1 {
			typ = y
		}
		b.insert(t, typ, "a", i, 1)
	}
	epochKey := stream.Sibling(stream.Name(b.prefix, y), epochRole)
	before, err := b.redis.Do(ctx, b.redis.B().Get().Key(epochKey).Build()).ToString()
	require.NoError(t, err)
	s.drainer.beforePublish = func() {
		waitFor(t, 10*time.Second, "the session takes y over", func() bool {
			now, _ := b.redis.Do(ctx, b.redis.B().Get().Key(epochKey).Build()).ToString()
			return now != before
		})
		frozen.Pause()
	}
	paused := false
	inner := s.drainer.beforePublish
	s.drainer.beforePublish = func() { inner(); paused = true }
	res, err := s.drainer.Drain(ctx, time.Time{})
	t.Logf("paused %v result %+v entries x %d", paused, res, len(b.entries(t, x)))
	require.Error(t, err, "the frozen shard's EXEC cannot succeed")
	t.Logf("first drain: %v", err)
	s.drainer.beforePublish = nil
	// PrimaryOf would ask the frozen node too, and redis-cli waits for it
	// forever: ask another node whether the frozen one is marked failed
	// and a replica has taken its slots.
	var other *redistest.Server
	for _, n := range c.Nodes() {
		if n != frozen {
			other = n
			break
		}
	}
	waitFor(t, 30*time.Second, "the frozen primary's replica takes over", func() bool {
		nodes := reviewCli(t, other, "CLUSTER", "NODES")
		for _, line := range strings.Split(nodes, "\n") {
			f := strings.Fields(line)
			if len(f) > 2 && strings.HasPrefix(f[1], frozen.Addr()+"@") {
				// Failed, and its slots gone to the replica it had.
				return strings.Contains(f[2], "fail") && !strings.Contains(f[2], "fail?") && len(f) <= 8
			}
		}
		return false
	})
	frozen.Resume()
	c.WaitHealthy()
	waitFor(t, 30*time.Second, "every row is relayed", func() bool {
		_, err := b.relay(t).drainer.Drain(ctx, time.Time{})
		return err == nil && b.outboxCount(t) == 0
	})
	ex, ey := b.entries(t, x), b.entries(t, y)
	t.Logf("x holds %d entries, y %d", len(ex), len(ey))
	requireExactlyOnceInOrder(t, ex, 31)
	requireExactlyOnceInOrder(t, ey, 31)
}

// Under a steady load of events for two streams on two shards, one
// stream's primary dies before replicating its last writes. Batches then
// half publish (the other shard's EXEC runs) until the replica takes over,
// and the replica lacks what the dead primary took. Every event of both
// streams must be in its stream once and in order.
func TestReviewAFailoverLosingWritesUnderATwoShardLoad(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t, 3, 1)
	b := setupOn(t, c)
	x, y := reviewPair(t, c, b.prefix)
	s, err := New(context.Background(), b.config(func(cfg *Config) { cfg.BatchSize, cfg.PollInterval = 20, 200*time.Millisecond }),
		logging.Discard())
	require.NoError(t, err)
	t.Cleanup(func() { s.Stop(); s.Close() })
	start(t, s)
	const aggregates, each = 4, 60
	var wg sync.WaitGroup
	for a := range aggregates {
		wg.Go(func() {
			for i := range each {
				typ := x
				if (a+i)%2 == 1 {
					typ = y
				}
				b.insert(t, typ, fmt.Sprint(a), i, 1)
				time.Sleep(time.Millisecond)
			}
		})
	}
	ctx := context.Background()
	ykey := stream.Name(b.prefix, y)
	xlen := func(key string) int64 {
		n, _ := b.redis.Do(ctx, b.redis.B().Xlen().Key(key).Build()).AsInt64()
		return n
	}
	waitFor(t, 20*time.Second, "a sixth of the events are in y", func() bool { return xlen(ykey) >= aggregates*each/6 })
	old := c.FailoverLosingWrites(ykey, func() {
		cut := xlen(ykey)
		waitFor(t, 20*time.Second, "the relay publishes 20 more events to y", func() bool { return xlen(ykey) >= cut+20 })
	})
	old.Start() // back, as a replica of the new primary
	wg.Wait()
	count := func(typ string) int {
		entries, err := b.redis.Do(ctx, b.redis.B().Xrange().Key(stream.Name(b.prefix, typ)).Start("-").End("+").Build()).AsXRange()
		if err != nil {
			return 0
		}
		ids := map[string]bool{}
		for _, e := range entries {
			ids[e.FieldValues[stream.FieldEventID]] = true
		}
		return len(ids)
	}
	waitFor(t, 60*time.Second, "every event is in its stream", func() bool {
		return count(x)+count(y) >= aggregates*each && b.outboxCount(t) == 0
	})
	requireExactlyOnceInOrder(t, b.entries(t, x), aggregates*each/2)
	requireExactlyOnceInOrder(t, b.entries(t, y), aggregates*each/2)
}

// A relay that lost its drain lock without noticing publishes to a stream
// the new holder has not taken over yet (a stream without a record in
// PostgreSQL, taken over at first use), while the new holder is between its
// start and its first batch. The stream the new holder did take over
// refuses the zombie; the other takes its part, and the new holder's first
// use must find it in the marker: each event once.
func TestReviewAZombiePublishesToAStreamTheNewHolderHasNotTakenOver(t *testing.T) {
	t.Parallel()
	for _, backend := range backends(t) {
		t.Run(backend.name, func(t *testing.T) {
			t.Parallel()
			b := backend.setup(t)
			ctx := context.Background()
			// x has a record (taken over at the start of a drain); z does not.
			x, z := "item", "order"
			b.insert(t, x, "w", 0, 1)
			_, err := b.relay(t).drainer.Drain(ctx, time.Time{})
			require.NoError(t, err)
			for i := range 40 {
				typ := x
				if i%2 == 1 {
					typ = z
				}
				b.insert(t, typ, "a", i+1, 1)
			}
			zombie, holder := b.relay(t), b.relay(t)
			startHolder, zombieGo, zombieDone := make(chan struct{}), make(chan struct{}), make(chan error, 1)
			zombie.drainer.beforePublish = func() {
				_, err := b.pool.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_locks
					WHERE locktype = 'advisory' AND pid <> pg_backend_pid()
					  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`)
				if err != nil {
					t.Errorf("terminate the zombie's session: %v", err)
				}
				close(startHolder)
				<-zombieGo
			}
			go func() {
				_, err := zombie.drainer.Drain(ctx, time.Time{})
				zombieDone <- err
			}()
			<-startHolder
			var zombieErr error
			holder.drainer.beforePublish = func() {
				close(zombieGo)
				zombieErr = <-zombieDone
			}
			res, err := holder.drainer.Drain(ctx, time.Time{})
			require.NoError(t, err)
			t.Logf("zombie: %v; holder: %+v; x %d entries, z %d", zombieErr, res, len(b.entries(t, x)), len(b.entries(t, z)))
			require.Error(t, zombieErr)
			requireExactlyOnceInOrder(t, b.entries(t, x), 21)
			requireExactlyOnceInOrder(t, b.entries(t, z), 20)
			require.Zero(t, b.outboxCount(t))
		})
	}
}

// REDIS_CLUSTER=true against a single server is refused at start-up
// (stream.ErrNotCluster); the opposite mistake is not: REDIS_CLUSTER left
// false with REDIS_URL naming a cluster node (Memorystore for Redis
// Cluster's discovery endpoint, say) starts, and then every drain fails
// with "fence relays of the older version: MOVED …" when the legacy epoch
// key's slot is on another node (or, when it is not, every stream whose
// slot is elsewhere fails with MOVED while the others are relayed): an
// outage whose message points at the upgrade path, instead of a refusal at
// start-up.
func TestReviewASingleServerClientOnAClusterNodeIsRefused(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t, 3, 0)
	b := setup(t)
	b.redisURL = c.Nodes()[0].URL()
	b.insert(t, "item", "a", 0, 1)
	b.insert(t, "order", "a", 0, 1)
	b.insert(t, "invoice", "a", 0, 1)
	s, err := New(context.Background(), b.config(), logging.Discard())
	if err == nil {
		t.Cleanup(func() { s.Stop(); s.Close() })
		_, drainErr := s.drainer.Drain(context.Background(), time.Time{})
		t.Logf("the relay started; its drain: %v", drainErr)
	}
	require.Error(t, err, "REDIS_CLUSTER=false on a cluster node must be refused like the opposite mistake")
}

// reviewCli runs redis-cli against node.
func reviewCli(t *testing.T, node *redistest.Server, args ...string) string {
	t.Helper()
	host, port, _ := strings.Cut(node.Addr(), ":")
	out, err := exec.Command("redis-cli", append([]string{"-h", host, "-p", port}, args...)...).CombinedOutput()
	require.NoError(t, err, "%v: %s", args, out)
	return strings.TrimSpace(string(out))
}

// The slot of a stream moves to another shard (resharding, by hand as
// redis-cli --cluster reshard does it: IMPORTING/MIGRATING, MIGRATE of each
// key, slowly, then SETSLOT NODE) while the relay publishes to it under a
// steady load: the relay meets ASK, TRYAGAIN and MOVED on its dedicated
// connections. Every event must be in the stream once and in order.
func TestReviewAStreamsSlotMovesWhileTheRelayPublishes(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t, 3, 0)
	b := setupOn(t, c)
	ctx := context.Background()
	key := stream.Name(b.prefix, "item")
	logs := &lockedBuffer{}
	s, err := New(ctx, b.config(func(cfg *Config) { cfg.BatchSize, cfg.PollInterval = 10, 100*time.Millisecond }),
		slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn})))
	require.NoError(t, err)
	t.Cleanup(func() { s.Stop(); s.Close() })
	start(t, s)
	const aggregates, each = 4, 150
	var wg sync.WaitGroup
	for a := range aggregates {
		wg.Go(func() {
			for i := range each {
				b.insert(t, "item", fmt.Sprint(a), i, 1)
				time.Sleep(5 * time.Millisecond)
			}
		})
	}
	xlen := func() int64 {
		n, _ := b.redis.Do(ctx, b.redis.B().Xlen().Key(key).Build()).AsInt64()
		return n
	}
	waitFor(t, 20*time.Second, "a quarter of the events are in the stream", func() bool { return xlen() >= aggregates*each/4 })
	src := c.PrimaryOf(key)
	var dst *redistest.Server
	for _, n := range c.Nodes() {
		if n != src {
			dst = n
			break
		}
	}
	began := xlen()
	slot := reviewCli(t, src, "CLUSTER", "KEYSLOT", key)
	srcID, dstID := reviewCli(t, src, "CLUSTER", "MYID"), reviewCli(t, dst, "CLUSTER", "MYID")
	reviewCli(t, dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", srcID)
	reviewCli(t, src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dstID)
	dstHost, dstPort, _ := strings.Cut(dst.Addr(), ":")
	for {
		keys := strings.Fields(reviewCli(t, src, "CLUSTER", "GETKEYSINSLOT", slot, "1"))
		if len(keys) == 0 {
			break
		}
		time.Sleep(300 * time.Millisecond) // the relay works on a slot half moved
		reviewCli(t, src, "MIGRATE", dstHost, dstPort, keys[0], "0", "5000")
	}
	time.Sleep(300 * time.Millisecond)
	for _, n := range c.Nodes() {
		reviewCli(t, n, "CLUSTER", "SETSLOT", slot, "NODE", dstID)
	}
	c.WaitHealthy()
	moved := xlen()
	wg.Wait()
	t.Logf("stream at %d entries when the move began, %d when it ended; relay warnings:\n%s", began, moved, logs.String())
	waitFor(t, 60*time.Second, "every row is relayed", func() bool { return b.outboxCount(t) == 0 })
	require.Equal(t, dst, c.PrimaryOf(key), "the slot moved")
	requireExactlyOnceInOrder(t, b.entries(t, "item"), aggregates*each)
}

// README: "A stream the relay cannot reach when a drain starts is taken
// over when a batch first has events for it, so a shard that is down does
// not hold back the others by itself." A shard that is frozen or cut off
// (SIGSTOP here; a network partition alike) rather than refusing
// connections: every drain first waits for each of its known streams'
// takeover to time out (5 s each, one after the other) before it publishes
// anything to the healthy shards. The cluster here serves the slots it
// still has (cluster-require-full-coverage no) and the shard has no
// replica, so the outage lasts.
func TestReviewAFrozenShardDoesNotHoldBackTheOthers(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t, 3, 0)
	for _, n := range c.Nodes() {
		reviewCli(t, n, "CONFIG", "SET", "cluster-require-full-coverage", "no")
	}
	b := setupOn(t, c)
	x, y := reviewPair(t, c, b.prefix)
	ctx := context.Background()
	s := b.relay(t)
	b.insert(t, x, "w", 0, 1)
	b.insert(t, y, "w", 0, 1)
	_, err := s.drainer.Drain(ctx, time.Time{})
	require.NoError(t, err)
	frozen := c.PrimaryOf(stream.Name(b.prefix, y))
	frozen.Pause()
	t.Cleanup(frozen.Resume)
	for round := range 2 {
		b.insert(t, x, "a", round*10, 10)
		began := time.Now()
		res, err := s.drainer.Drain(ctx, time.Time{})
		took := time.Since(began)
		t.Logf("drain %d with %s's shard frozen: %s, %+v, %v", round, y, took.Round(time.Millisecond), res, err)
		require.NoError(t, err)
		require.Equal(t, 10, res.Relayed)
		require.Less(t, took, 2*time.Second, "the healthy shard's events wait for the frozen shard's takeover to time out")
	}
}

// During a rolling deploy both versions run, and the drain lock passes
// from one to the other in both directions, not only on a rollback. A
// relay of this version leaves a batch in doubt (published, not committed:
// a crash, a lost connection); the next holder is a relay of the older
// version, which knows only the global marker. REVIEW_OLD_RELAY names a
// binary that runs one drain of the older relay (built from 8b21ad3, see
// the review report).
func TestReviewARelayOfTheOlderVersionAfterANewerOnesBatchInDoubt(t *testing.T) {
	t.Parallel()
	old := os.Getenv("REVIEW_OLD_RELAY")
	if old == "" {
		t.Skip("REVIEW_OLD_RELAY not set")
	}
	b := setup(t)
	b.insert(t, "item", "a", 0, 30)
	crashing := b.relay(t)
	crashing.drainer.afterPublish = func() error { return errors.New("simulated crash") }
	_, err := crashing.drainer.Drain(context.Background(), time.Time{})
	require.ErrorContains(t, err, "simulated crash")
	cmd := exec.Command(old)
	cmd.Env = append(os.Environ(), "DATABASE_URL="+b.url, "REDIS_URL="+b.redisURL, "STREAM_PREFIX="+b.prefix)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	t.Logf("older relay: %s", out)
	require.Zero(t, b.outboxCount(t))
	requireExactlyOnceInOrder(t, b.entries(t, "item"), 30)
}

// The other half of the rolling deploy: a relay of this version loses its
// lock without noticing, a relay of the older version takes over and
// drains, then the newer one's batch goes out: nothing fences it, since
// the older relay raises only the global epoch.
func TestReviewARelayOfTheOlderVersionDoesNotFenceANewerZombie(t *testing.T) {
	t.Parallel()
	old := os.Getenv("REVIEW_OLD_RELAY")
	if old == "" {
		t.Skip("REVIEW_OLD_RELAY not set")
	}
	b := setup(t)
	ctx := context.Background()
	b.insert(t, "item", "a", 0, 30)
	zombie := b.relay(t)
	var out []byte
	var oldErr error
	zombie.drainer.beforePublish = func() {
		_, err := b.pool.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_locks
			WHERE locktype = 'advisory' AND pid <> pg_backend_pid()
			  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`)
		if err != nil {
			oldErr = err
			return
		}
		cmd := exec.Command(old)
		cmd.Env = append(os.Environ(), "DATABASE_URL="+b.url, "REDIS_URL="+b.redisURL, "STREAM_PREFIX="+b.prefix)
		out, oldErr = cmd.CombinedOutput()
	}
	_, err := zombie.drainer.Drain(ctx, time.Time{})
	require.NoError(t, oldErr, "%s", out)
	t.Logf("older relay: %s; the zombie's drain: %v", out, err)
	require.Zero(t, b.outboxCount(t))
	requireExactlyOnceInOrder(t, b.entries(t, "item"), 30)
}

// Every drain takes over every stream PostgreSQL has a record of (and every
// stream the process wrote to) before its first batch can go out, even when
// the batch writes to one stream only. The review measured, on loopback, a
// one-event drain at 3.9 ms after one stream was used and 11.1-11.6 ms
// after fifty, one takeover after the other (the relay of 8b21ad3: 3.8-3.9
// ms and 4.6 ms). Side by side, as now, 6.1 ms and 14.4 ms under load: the
// round trips overlap, the fifty dedicated connections still cost. A timed
// assertion does not belong in the suite (speed lives in benchmarks), so it
// runs with REVIEW_MEASURE=1 and checks the ratio.
func TestReviewADrainDoesNotPayARoundTripPerStreamItDoesNotWriteTo(t *testing.T) {
	t.Parallel()
	if os.Getenv("REVIEW_MEASURE") == "" {
		t.Skip("REVIEW_MEASURE not set")
	}
	p50 := func(k int) time.Duration {
		b := setup(t)
		ctx := context.Background()
		s := b.relay(t, func(cfg *Config) { cfg.BatchSize = 1000 })
		_, err := b.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
			SELECT 't' || (i % $1), i::text, 'bulk', '{}' FROM generate_series(1, 200) AS i`, k)
		require.NoError(t, err)
		_, err = s.drainer.Drain(ctx, time.Time{})
		require.NoError(t, err)
		var lat []time.Duration
		for i := range 60 {
			_, err := b.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('t0', $1, 'one', '{}')`, fmt.Sprint(i))
			require.NoError(t, err)
			began := time.Now()
			res, err := s.drainer.Drain(ctx, time.Time{})
			require.NoError(t, err)
			require.Equal(t, 1, res.Relayed)
			lat = append(lat, time.Since(began))
		}
		slices.Sort(lat)
		return lat[len(lat)/2]
	}
	one, fifty := p50(1), p50(50)
	t.Logf("one-event drain p50: %s after one stream, %s after fifty", one, fifty)
	require.Less(t, fifty, 2*one, "a drain that writes to one stream should not cost a round trip per other stream")
}
