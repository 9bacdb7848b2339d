package relay

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/stream"
)

// A batch claimed ahead is claimed after the last id of the batch being
// published (claimAfterSQL), so a row with a lower id that commits late is
// left to a claim from the outbox's start. These tests hold such a row's
// transaction open and commit it while the first batch is published.
func TestARowThatCommitsBelowTheClaimedIdsIsStillRelayed(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		backlog int
		// within is where the late row must be in the stream at the
		// latest (its entry's index, from 0).
		within int
	}{
		{"by the same drain when the run of full batches ends", 450, 450},
		{"within about unboundedEvery batches when the run goes on", 2500, 1200},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			s := b.relay(t, func(c *Config) { c.Background = false })
			late := openTx(t, b.url)
			insertIn(t, late, "late") // the lowest id; invisible until committed
			b.insertBulk(t, "user", tc.backlog)
			var once sync.Once
			committed := make(chan error, 1)
			s.drainer.beforePublish = func() {
				once.Do(func() { committed <- late.Commit(context.Background()) })
			}
			res, err := s.drainer.Drain(context.Background(), time.Time{})
			require.NoError(t, err)
			require.NoError(t, <-committed)
			require.Equal(t, tc.backlog+1, res.Relayed)
			require.Zero(t, b.outboxCount(t))
			entries := b.entries(t, "user")
			at := slices.IndexFunc(entries, func(e stream.Event) bool { return e.AggregateID == "late" })
			require.GreaterOrEqual(t, at, 0, "the late row is in the stream")
			require.LessOrEqual(t, at, tc.within, "the late row's place in the stream")
		})
	}
}
