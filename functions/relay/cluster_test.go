package relay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/stream"
)

// spreadTypes are aggregate types whose streams, under any prefix, land on
// more than one shard of a three-shard cluster (checked by the tests).
var spreadTypes = []string{"item", "order", "invoice", "cart", "refund", "parcel"}

// shardsOf counts the primaries that serve the streams of types.
func shardsOf(c *redistest.Cluster, prefix string, types []string) int {
	seen := map[*redistest.Server]bool{}
	for _, typ := range types {
		seen[c.PrimaryOf(stream.Name(prefix, typ))] = true
	}
	return len(seen)
}

// The relay's promises hold on a Redis Cluster as on one server: its
// batches span streams on several shards, each stream's part is its own
// transaction with its own fence and marker, in the stream's hash slot.
func TestRelayOnARedisCluster(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t, 3, 1)

	t.Run("publishes every event of streams on every shard once and in order", func(t *testing.T) {
		t.Parallel()
		b := setupOn(t, c)
		require.Greater(t, shardsOf(c, b.prefix, spreadTypes), 1, "the streams are on more than one shard")
		s := b.relay(t)
		start(t, s)
		var wg sync.WaitGroup
		for i, typ := range spreadTypes {
			wg.Go(func() { b.insert(t, typ, fmt.Sprint(i), 0, 40) })
			wg.Go(func() { b.insert(t, typ, fmt.Sprint(i+100), 0, 40) })
		}
		wg.Wait()
		for _, typ := range spreadTypes {
			waitFor(t, 20*time.Second, typ+"'s 80 entries arrive", func() bool { return len(b.entries(t, typ)) >= 80 })
			requireExactlyOnceInOrder(t, b.entries(t, typ), 80)
		}
		waitFor(t, 10*time.Second, "the last batch commits", func() bool { return b.outboxCount(t) == 0 })
	})

	t.Run("loses nothing and publishes nothing twice when killed between XADD and COMMIT", func(t *testing.T) {
		t.Parallel()
		b := setupOn(t, c)
		// One batch of 100 with events of every type, then 120 more.
		for i := range 220 {
			b.insert(t, spreadTypes[i%len(spreadTypes)], "a", i, 1)
		}
		crashing := b.relay(t)
		crashing.drainer.afterPublish = func() error { return errors.New("simulated crash") }
		_, err := crashing.drainer.Drain(context.Background(), time.Time{})
		require.ErrorContains(t, err, "simulated crash")
		require.Equal(t, 220, b.outboxCount(t), "the first batch's rows were not deleted")

		res, err := b.relay(t).drainer.Drain(context.Background(), time.Time{})
		require.NoError(t, err)
		require.Equal(t, 100, res.Duplicates, "each stream's marker covers its part of the batch in doubt")
		require.Equal(t, 120, res.Relayed)
		require.Zero(t, b.outboxCount(t))
		total := 0
		for _, typ := range spreadTypes {
			entries := b.entries(t, typ)
			ids := map[string]bool{}
			for _, e := range entries {
				ids[e.EventID] = true
			}
			require.Len(t, ids, len(entries), "no event is in %s twice", typ)
			total += len(entries)
		}
		require.Equal(t, 220, total)
	})

	t.Run("refuses the batch of a relay that lost its lock without noticing", func(t *testing.T) {
		t.Parallel()
		b := setupOn(t, c)
		for i := range 60 {
			b.insert(t, spreadTypes[i%3], "a", i, 1)
		}
		ctx := context.Background()
		zombie := b.relay(t)
		var takeover struct {
			res Result
			err error
		}
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
		require.Equal(t, 60, takeover.res.Relayed)
		for _, typ := range spreadTypes[:3] {
			requireExactlyOnceInOrder(t, b.entries(t, typ), 20)
		}
	})

	t.Run("waits for the replica of each stream's shard", func(t *testing.T) {
		t.Parallel()
		b := setupOn(t, c)
		for i := range 60 {
			b.insert(t, spreadTypes[i%len(spreadTypes)], "a", i, 1)
		}
		s := b.relay(t, func(cfg *Config) { cfg.WaitReplicas, cfg.WaitTimeout = 1, time.Second })
		res, err := s.drainer.Drain(context.Background(), time.Time{})
		require.NoError(t, err)
		require.Equal(t, 60, res.Relayed)
		require.Zero(t, res.Unreplicated, "WAIT went to each stream's primary, whose replica answered")
	})

	t.Run("trims streams on every shard", func(t *testing.T) {
		t.Parallel()
		b := setupOn(t, c)
		ctx := context.Background()
		for _, typ := range spreadTypes {
			key := stream.Name(b.prefix, typ)
			require.NoError(t, b.redis.Do(ctx, b.redis.B().XgroupCreate().Key(key).Group("g").Id("$").Mkstream().Build()).Error())
			// Old entries: one added in the millisecond the trimmer reads
			// Redis's clock would not be older than a retention of zero.
			for i := range 5 {
				require.NoError(t, b.redis.Do(ctx, b.redis.B().Xadd().Key(key).Id(fmt.Sprintf("1000-%d", i+1)).FieldValue().FieldValue("f", "v").Build()).Error())
			}
			// Read and acknowledged by the group: nothing keeps them.
			read, err := b.redis.Do(ctx, b.redis.B().Xreadgroup().Group("g", "c").Count(10).Streams().Key(key).Id(">").Build()).AsXRead()
			require.NoError(t, err)
			for _, e := range read[key] {
				require.NoError(t, b.redis.Do(ctx, b.redis.B().Xack().Key(key).Group("g").Id(e.ID).Build()).Error())
			}
		}
		n, err := NewTrimmer(b.redis, b.prefix, 0).TrimAll(ctx)
		require.NoError(t, err)
		require.EqualValues(t, 5*len(spreadTypes), n, "every stream, whatever its shard")
	})
}

// A primary of the cluster dies under load and its replica takes over
// without the last batches the relay published (replication is
// asynchronous: the test cuts the replica off before they are written).
// The relay notices (its records in PostgreSQL are ahead of the stream)
// and publishes them again from what it retained.
func TestAFailoverOfAClusterPrimaryLosesNoEvent(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t, 3, 1)
	b := setupOn(t, c)
	logs := &lockedBuffer{}
	s, err := New(context.Background(), b.config(func(cfg *Config) { cfg.BatchSize, cfg.PollInterval = 20, 200*time.Millisecond }),
		slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn})))
	require.NoError(t, err)
	t.Cleanup(func() { s.Stop(); s.Close() })
	start(t, s)
	const aggregates, each = 6, 60
	var wg sync.WaitGroup
	for a := range aggregates {
		wg.Go(func() {
			for i := range each {
				b.insert(t, "item", fmt.Sprint(a), i, 1)
				time.Sleep(time.Millisecond) // a steady load, not one burst
			}
		})
	}
	ctx := context.Background()
	key := stream.Name(b.prefix, "item")
	xlen := func() int64 {
		n, _ := b.redis.Do(ctx, b.redis.B().Xlen().Key(key).Build()).AsInt64()
		return n
	}
	waitFor(t, 20*time.Second, "a third of the events are in the stream", func() bool { return xlen() >= aggregates*each/3 })
	var cut, killed int64
	began := time.Now()
	c.FailoverLosingWrites(key, func() {
		cut = xlen()
		waitFor(t, 20*time.Second, "the relay publishes 40 more events", func() bool { return xlen() >= cut+40 })
		killed = xlen()
	})
	t.Logf("failover of %s's primary took %s; the replica was cut off at %d entries, the primary killed at %d",
		key, time.Since(began).Round(time.Millisecond), cut, killed)
	wg.Wait()
	waitFor(t, 60*time.Second, "every event is in the stream", func() bool {
		entries, err := b.redis.Do(ctx, b.redis.B().Xrange().Key(key).Start("-").End("+").Build()).AsXRange()
		if err != nil {
			return false
		}
		ids := map[string]bool{}
		for _, e := range entries {
			ids[e.FieldValues[stream.FieldEventID]] = true
		}
		return len(ids) >= aggregates*each && b.outboxCount(t) == 0
	})
	t.Logf("every event in the stream %s after the failover began", time.Since(began).Round(time.Millisecond))
	requireExactlyOnceInOrder(t, b.entries(t, "item"), aggregates*each)
	require.Contains(t, logs.String(), "Redis had lost events; published them again", "the failover lost events, which the relay published again")
}

// lockedBuffer is a bytes.Buffer that a logger and the test may share.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}
