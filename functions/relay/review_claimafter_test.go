package relay

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Review of 3e2a83c (claim the batch ahead after the last id of the batch in
// flight). README, "What order is promised": "Events of one aggregate are
// therefore in order when their writers commit in the order they inserted
// and nobody else locks outbox rows". Here two writers of one aggregate do
// exactly that, strictly one after the other (the second begins after the
// first committed), and nobody locks outbox rows; yet the second event
// reaches the stream before the first, because the first one's id is below
// the bound of the claims ahead that follow its commit for up to
// unboundedEvery batches.
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
