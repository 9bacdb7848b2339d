package relay

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/stream"
)

// lossBundle is a relay on a private Redis, drained by hand.
type lossBundle struct {
	*testBundle
	server  *redistest.Server
	private rueidis.Client
	relay   *Service
	next    int // seq of the next event inserted
}

func newLossBundle(t *testing.T, mutate ...func(*Config)) *lossBundle {
	t.Helper()
	b := setup(t)
	server := redistest.StartServer(t)
	client, err := stream.NewClient(server.URL(), false)
	require.NoError(t, err)
	t.Cleanup(client.Close)
	s := b.relay(t, append([]func(*Config){func(c *Config) {
		c.RedisURL, c.Background, c.BatchSize = server.URL(), false, 10
	}}, mutate...)...)
	view := *b
	view.redis = client // entries() reads the private server
	return &lossBundle{testBundle: &view, server: server, private: client, relay: s}
}

// relayNew inserts n events (one aggregate, seq numbered on from the last)
// and drains; it returns what the drain did.
func (l *lossBundle) relayNew(t *testing.T, n int) Result {
	t.Helper()
	l.insert(t, "item", "a", l.next, n)
	l.next += n
	res, err := l.drain()
	if err != nil {
		// The first command after a restart finds the old connection
		// broken; the next drain dials again.
		res, err = l.drain()
	}
	require.NoError(t, err)
	return res
}

func (l *lossBundle) drain() (Result, error) {
	return l.relay.drainer.Drain(context.Background(), time.Time{})
}

// crashAfterPublish inserts n events and drains once, failing between XADD
// and COMMIT as a crash would: the events are in the stream, their rows in
// the outbox.
func (l *lossBundle) crashAfterPublish(t *testing.T, n int) {
	t.Helper()
	l.insert(t, "item", "a", l.next, n)
	l.next += n
	l.relay.drainer.afterPublish = func() error { return fmt.Errorf("crash") }
	_, err := l.drain()
	require.Error(t, err)
	l.relay.drainer.afterPublish = nil
}

// batches returns the numbers of the retained batches, oldest first.
func (l *lossBundle) batches(t *testing.T) []int64 {
	t.Helper()
	rows, err := l.pool.Query(context.Background(), `SELECT batch FROM outbox_relay_batches ORDER BY batch`)
	require.NoError(t, err)
	batches, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(t, err)
	return batches
}

func (l *lossBundle) do(t *testing.T, cmd func(b rueidis.Builder) rueidis.Completed) {
	t.Helper()
	require.NoError(t, l.private.Do(context.Background(), cmd(l.private.B())).Error())
}

func TestWhatRedisLosesIsPublishedAgainFromPostgreSQL(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		// lose relays events (30 of them, in batches of 10), makes Redis
		// lose some, and returns how many.
		lose func(t *testing.T, l *lossBundle) int
	}{
		{"a Redis restarted without persistence", func(t *testing.T, l *lossBundle) int {
			l.relayNew(t, 30)
			l.server.Stop()
			l.server.Start()
			return 30
		}},
		{"a FLUSHALL", func(t *testing.T, l *lossBundle) int {
			l.relayNew(t, 30)
			l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Flushall().Build() })
			return 30
		}},
		{"a stream deleted by hand", func(t *testing.T, l *lossBundle) int {
			l.relayNew(t, 30)
			l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Del().Key(l.prefix + "item").Build() })
			return 30
		}},
		{"a stream deleted and created again by a consumer group and another writer", func(t *testing.T, l *lossBundle) int {
			l.relayNew(t, 30)
			key := l.prefix + "item"
			l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Del().Key(key).Build() })
			l.do(t, func(b rueidis.Builder) rueidis.Completed {
				return b.XgroupCreate().Key(key).Group("g").Id("0").Mkstream().Build()
			})
			// Its last-generated-id is now past every recorded one; only
			// the entries-added counter tells.
			l.do(t, func(b rueidis.Builder) rueidis.Completed {
				return b.Xadd().Key(key).Id("*").FieldValue().FieldValue("note", "not an event").Build()
			})
			l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Xtrim().Key(key).Maxlen().Threshold("0").Build() })
			return 30
		}},
		{"a Redis that lost only its last two batches, as a failover to a lagging replica does", func(t *testing.T, l *lossBundle) int {
			l.relayNew(t, 10)
			l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Save().Build() })
			l.relayNew(t, 20)
			l.server.Stop()
			l.server.Start() // from the snapshot taken after the first batch
			return 20
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			l := newLossBundle(t)
			lost := tt.lose(t, l)

			start := time.Now()
			res := l.relayNew(t, 10)
			t.Logf("%d lost events published again, and 10 new ones, in %s", res.Replayed, time.Since(start).Round(time.Millisecond))
			require.Equal(t, lost, res.Replayed, "events published again")
			require.Equal(t, 10, res.Relayed)
			requireExactlyOnceInOrder(t, events(l.entries(t, "item")), l.next)

			res, err := l.drain()
			require.NoError(t, err)
			require.Zero(t, res.Replayed, "once published again, the stream is whole")
		})
	}
}

// events drops entries that are not events (written by someone else).
func events(entries []stream.Event) []stream.Event {
	out := entries[:0:0]
	for _, e := range entries {
		var p struct {
			Seq *int `json:"seq"`
		}
		if json.Unmarshal([]byte(e.Payload), &p) == nil && p.Seq != nil {
			out = append(out, e)
		}
	}
	return out
}

func TestAStreamDeletedWhileADrainRunsIsPublishedAgainBeforeItsNextBatch(t *testing.T) {
	t.Parallel()
	l := newLossBundle(t)
	l.relayNew(t, 20)
	key := l.prefix + "item"
	l.insert(t, "item", "a", l.next, 30)
	l.next += 30
	batches := 0
	l.relay.drainer.beforePublish = func() {
		if batches++; batches == 2 {
			// Between two batches of one drain: a consumer re-creates
			// the stream at once (sendemail does on NOGROUP).
			l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Del().Key(key).Build() })
			l.do(t, func(b rueidis.Builder) rueidis.Completed {
				return b.XgroupCreate().Key(key).Group("g").Id("0").Mkstream().Build()
			})
		}
	}
	res, err := l.drain()
	require.NoError(t, err)
	require.Equal(t, 30, res.Replayed, "the 20 older events and the first batch of this drain")

	// The batch that landed in the new stream is there twice: once before
	// the events published again, once after; the last copies are in order.
	requireExactlyOnceInOrder(t, lastCopies(l.entries(t, "item")), 50)
}

// lastCopies keeps the last copy of each event: where a batch landed in a
// stream that had lost the events before it, it is published again after
// them, and its first copies stay where they landed.
func lastCopies(entries []stream.Event) []stream.Event {
	last := map[string]int{}
	for i, e := range entries {
		last[e.EventID] = i
	}
	var out []stream.Event
	for i, e := range entries {
		if last[e.EventID] == i {
			out = append(out, e)
		}
	}
	return out
}

func TestRetainedEventsArePurgedAfterTheRetentionWindow(t *testing.T) {
	t.Parallel()
	b := setup(t)
	s := b.relay(t, func(c *Config) { c.Background, c.BatchSize = false, 10 })
	ctx := context.Background()
	b.insert(t, "item", "a", 0, 25)
	_, err := s.drainer.Drain(ctx, time.Time{})
	require.NoError(t, err)
	count := func(table string) (n int) {
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM `+table).Scan(&n))
		return n
	}
	require.Equal(t, 25, count("outbox_relayed"), "every relayed event is retained")
	require.Equal(t, 3, count("outbox_relay_batches"))

	// The first two batches are past the window (an hour); the third is not.
	_, err = b.pool.Exec(ctx, `UPDATE outbox_relay_batches SET relayed_at = now() - interval '2 hours'
		WHERE batch IN (SELECT batch FROM outbox_relay_batches ORDER BY batch LIMIT 2)`)
	require.NoError(t, err)
	s.drainer.purged = time.Time{}
	b.insert(t, "item", "a", 25, 1)
	_, err = s.drainer.Drain(ctx, time.Time{})
	require.NoError(t, err)
	require.Equal(t, 6, count("outbox_relayed"), "the third batch and the new event stay")
	require.Equal(t, 2, count("outbox_relay_batches"))
	require.Equal(t, 1, count("outbox_streams"), "the stream's record outlives its batches")
}
