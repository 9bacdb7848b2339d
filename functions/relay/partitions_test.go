package relay

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/stream"
)

// partitions is the STREAM_PARTITIONS of the tests of partitioned streams.
const partitions = 6

func withPartitions(cfg *Config) { cfg.StreamPartitions = partitions }

// partitionEntries reads every partition of typ's streams.
func (b *testBundle) partitionEntries(t *testing.T, typ string) [][]stream.Event {
	t.Helper()
	out := make([][]stream.Event, partitions)
	for p, name := range stream.Names(b.prefix, typ, partitions) {
		msgs, err := b.redis.Do(context.Background(), b.redis.B().Xrange().Key(name).Start("-").End("+").Build()).AsXRange()
		require.NoError(t, err)
		for _, m := range msgs {
			e, err := stream.Decode(m.ID, m.FieldValues)
			require.NoError(t, err)
			out[p] = append(out[p], e)
		}
	}
	return out
}

// requirePartitioned checks that typ's partitions hold want events in all,
// each once, in its aggregate's partition, and each aggregate's in order;
// and that the unpartitioned stream was not written.
func requirePartitioned(t *testing.T, b *testBundle, typ string, want int) {
	t.Helper()
	parts := b.partitionEntries(t, typ)
	var all []stream.Event
	for p, entries := range parts {
		for _, e := range entries {
			require.Equal(t, p, stream.Partition(e.AggregateID, partitions), "aggregate %s is in its partition", e.AggregateID)
		}
		all = append(all, entries...)
	}
	requireExactlyOnceInOrder(t, all, want)
	require.Empty(t, b.entries(t, typ), "nothing goes to the stream of one partition")
}

// partitionedLoad inserts each events for aggregates aggregates of typ,
// concurrently, in one transaction per event.
func partitionedLoad(t *testing.T, b *testBundle, typ string, aggregates, each int) {
	var wg sync.WaitGroup
	for a := range aggregates {
		wg.Go(func() { b.insert(t, typ, fmt.Sprint(a), 0, each) })
	}
	wg.Wait()
}

// With STREAM_PARTITIONS=6 an aggregate type's events are spread over six
// streams by aggregate, and each stream keeps the promises a single one
// does: on one server and on a Redis Cluster, where the partitions' slots
// spread over the shards.
func TestPartitionedStreams(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t, 3, 0)
	for _, where := range []struct {
		name  string
		setup func(t *testing.T) *testBundle
	}{
		{"on one server", setup},
		{"on a Redis Cluster", func(t *testing.T) *testBundle { return setupOn(t, c) }},
	} {
		t.Run(where.name, func(t *testing.T) {
			t.Parallel()
			t.Run("publishes every event once, in its aggregate's partition, in order", func(t *testing.T) {
				t.Parallel()
				b := where.setup(t)
				if b.cluster {
					shards := map[*redistest.Server]bool{}
					for _, name := range stream.Names(b.prefix, "item", partitions) {
						shards[c.PrimaryOf(name)] = true
					}
					require.Greater(t, len(shards), 1, "the partitions are on more than one shard")
				}
				s := b.relay(t, withPartitions)
				start(t, s)
				partitionedLoad(t, b, "item", 24, 10)
				waitFor(t, 20*time.Second, "240 entries arrive", func() bool {
					n := 0
					for _, p := range b.partitionEntries(t, "item") {
						n += len(p)
					}
					return n >= 240 && b.outboxCount(t) == 0
				})
				requirePartitioned(t, b, "item", 240)
				for p, entries := range b.partitionEntries(t, "item") {
					require.NotEmpty(t, entries, "partition %d has events (24 aggregates over 6)", p)
				}
				var recorded int
				require.NoError(t, b.pool.QueryRow(context.Background(),
					`SELECT count(*) FROM outbox_streams WHERE aggregate_type = 'item' AND partitions = $1`, partitions).Scan(&recorded))
				require.Equal(t, partitions, recorded, "PostgreSQL records each partition's stream")
			})

			t.Run("loses nothing and publishes nothing twice when killed between XADD and COMMIT", func(t *testing.T) {
				t.Parallel()
				b := where.setup(t)
				// One batch of 100 with events of every partition, then 120 more.
				for i := range 220 {
					b.insert(t, "item", fmt.Sprint(i%12), i, 1)
				}
				crashing := b.relay(t, withPartitions)
				crashing.drainer.afterPublish = func() error { return errors.New("simulated crash") }
				_, err := crashing.drainer.Drain(context.Background(), time.Time{})
				require.ErrorContains(t, err, "simulated crash")
				require.Equal(t, 220, b.outboxCount(t), "the first batch's rows were not deleted")

				res, err := b.relay(t, withPartitions).drainer.Drain(context.Background(), time.Time{})
				require.NoError(t, err)
				require.Equal(t, 100, res.Duplicates, "each partition's marker covers its part of the batch in doubt")
				require.Equal(t, 120, res.Relayed)
				require.Zero(t, b.outboxCount(t))
				requirePartitioned(t, b, "item", 220)
			})

			t.Run("refuses the batch of a relay that lost its lock without noticing", func(t *testing.T) {
				t.Parallel()
				b := where.setup(t)
				for i := range 60 {
					b.insert(t, "item", fmt.Sprint(i%12), i, 1)
				}
				ctx := context.Background()
				zombie := b.relay(t, withPartitions)
				var takeover struct {
					res Result
					err error
				}
				zombie.drainer.beforePublish = func() {
					_, err := b.pool.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_locks
						WHERE locktype = 'advisory' AND pid <> pg_backend_pid()
						  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`)
					if err == nil {
						takeover.res, takeover.err = b.relay(t, withPartitions).drainer.Drain(ctx, time.Time{})
					} else {
						takeover.err = err
					}
				}
				_, err := zombie.drainer.Drain(ctx, time.Time{})
				require.ErrorIs(t, err, ErrSuperseded)
				require.NoError(t, takeover.err)
				require.Equal(t, 60, takeover.res.Relayed)
				requirePartitioned(t, b, "item", 60)
			})

			t.Run("publishes again, from retention, the one partition Redis lost", func(t *testing.T) {
				t.Parallel()
				b := where.setup(t)
				ctx := context.Background()
				for i := range 180 {
					b.insert(t, "item", fmt.Sprint(i%18), i, 1)
				}
				s := b.relay(t, withPartitions)
				res, err := s.drainer.Drain(ctx, time.Time{})
				require.NoError(t, err)
				require.Equal(t, 180, res.Relayed)
				before := b.partitionEntries(t, "item")
				lost := 2
				require.NotEmpty(t, before[lost])
				require.NoError(t, b.redis.Do(ctx, b.redis.B().Del().Key(stream.PartitionName(b.prefix, "item", lost, partitions)).Build()).Error())

				b.insert(t, "item", "0", 1000, 1) // a new event, in whatever partition
				res, err = s.drainer.Drain(ctx, time.Time{})
				require.NoError(t, err)
				require.Equal(t, len(before[lost]), res.Replayed, "exactly the lost partition's events come back")
				after := b.partitionEntries(t, "item")
				for p := range partitions {
					if p != lost && p != stream.Partition("0", partitions) {
						require.Equal(t, before[p], after[p], "partition %d was left alone", p)
					}
				}
				requirePartitioned(t, b, "item", 181)
			})
		})
	}
}

// A relay never mixes two numbers of partitions: events of one aggregate
// would sit in two streams, with no order between them.
func TestARelayRefusesAnotherNumberOfPartitionsThanItsRecords(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	b.insert(t, "item", "1", 0, 3)
	_, err := b.relay(t).drainer.Drain(ctx, time.Time{})
	require.NoError(t, err)

	b.insert(t, "item", "1", 3, 1)
	s := b.relay(t, withPartitions)
	err = s.Start(ctx)
	require.ErrorIs(t, err, ErrPartitionsChanged)
	require.ErrorContains(t, err, "the relay runs with 6, the records say 1")
	require.ErrorContains(t, err, "outboxctl partitions 6")
	_, err = s.drainer.Drain(ctx, time.Time{})
	require.ErrorIs(t, err, ErrPartitionsChanged, "a drain checks too (a rolling deploy)")
	require.Equal(t, 1, b.outboxCount(t), "nothing was published")

	_, err = b.pool.Exec(ctx, `DELETE FROM outbox_streams`) // what outboxctl partitions does once the old streams are read
	require.NoError(t, err)
	res, err := s.drainer.Drain(ctx, time.Time{})
	require.NoError(t, err)
	require.Equal(t, 1, res.Relayed)
}
