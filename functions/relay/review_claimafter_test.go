package relay

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/outbox"
)

// Review of 3e2a83c (claim the batch ahead after the last id of the batch in
// flight). README, "What order is promised": "Events of one aggregate are
// therefore in order when their writers commit in the order they inserted
// and nobody else locks outbox rows". Here two writers of one aggregate do
// exactly that, strictly one after the other (the second begins after the
// first committed), and nobody locks outbox rows; yet the second event
// reached the stream before the first, because the first one's id was below
// the bound of the claims ahead that followed its commit (until
// lateBelowSQL).
func TestReviewSequentialWritersOfOneAggregateStayInOrder(t *testing.T) {
	t.Parallel()
	b := setup(t)
	s := b.relay(t, func(c *Config) { c.Background = false })
	first := openTx(t, b.url)
	insertIn(t, first, "agg") // the lowest id; committed during the drain
	b.insertBulk(t, "user", 500)
	var calls atomic.Int32
	s.drainer.afterPublish = func() error {
		switch calls.Add(1) {
		case 1: // the first writer commits
			return first.Commit(context.Background())
		case 2: // the second writer of the same aggregate begins, inserts, commits
			second := openTx(t, b.url)
			insertIn(t, second, "agg")
			return second.Commit(context.Background())
		}
		return nil
	}
	res, err := s.drainer.Drain(context.Background(), time.Time{})
	require.NoError(t, err)
	require.True(t, res.Complete)
	require.Equal(t, 502, res.Relayed)
	require.Zero(t, b.outboxCount(t))
	var ids []int64
	for _, e := range b.entries(t, "user") {
		if e.AggregateID == "agg" {
			ids = append(ids, e.OutboxID)
		}
	}
	require.Len(t, ids, 2)
	require.Less(t, ids[0], ids[1], "aggregate agg's events in the stream, by outbox id: the second writer's event came first")
}

// The same without hooks: the background loop relays while writers, each
// its own aggregate, insert one event per transaction, one transaction
// after the other, holding each open a moment (as a request that does more
// work after its insert would). Each aggregate's writer commits in the
// order it inserted and nobody locks outbox rows, so each aggregate's
// events must reach the stream in outbox id order. Small batches keep the
// relay in runs of full batches at the outbox's tail. At 3e2a83c the test
// failed 3 times in 3 (in round 1 or 2); at its parent it passed 3 times in
// 3 (24 rounds).
func TestReviewSequentialWritersUnderLoadStayInOrder(t *testing.T) {
	t.Parallel()
	b := setup(t)
	s := b.relay(t, func(c *Config) { c.BatchSize = 5 })
	start(t, s)
	const rounds, writers, each = 8, 16, 100
	ctx := context.Background()
	for round := range rounds {
		typ := fmt.Sprintf("round%d", round)
		var wg sync.WaitGroup
		for w := range writers {
			wg.Go(func() {
				conn, err := pgx.Connect(ctx, b.url)
				if !assert.NoError(t, err) {
					return
				}
				defer conn.Close(ctx)
				for i := range each {
					tx, err := conn.Begin(ctx)
					if !assert.NoError(t, err) {
						return
					}
					if !assert.NoError(t, outbox.Insert(ctx, tx, outbox.Event{
						AggregateType: typ, AggregateID: fmt.Sprintf("w%d", w), EventType: "changed",
						Payload: json.RawMessage(fmt.Sprintf(`{"seq": %d}`, i)),
					})) {
						return
					}
					time.Sleep(time.Duration(rand.IntN(3000)) * time.Microsecond)
					if !assert.NoError(t, tx.Commit(ctx)) {
						return
					}
				}
			})
		}
		wg.Wait()
		require.False(t, t.Failed())
		waitFor(t, 30*time.Second, "every writer's event is in the stream", func() bool {
			return len(b.entries(t, typ)) == writers*each
		})
		last := map[string]int64{}
		var reordered []string
		for _, e := range b.entries(t, typ) {
			if l, ok := last[e.AggregateID]; ok && e.OutboxID < l {
				reordered = append(reordered, fmt.Sprintf("%s: %d after %d", e.AggregateID, e.OutboxID, l))
			}
			last[e.AggregateID] = max(last[e.AggregateID], e.OutboxID)
		}
		require.Empty(t, reordered, "round %d: events of one aggregate out of order although its writer committed in insert order", round)
	}
}
