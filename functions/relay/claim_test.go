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
// published (claimAfterSQL); a row with a lower id that commits late is
// found when that batch commits (lateBelowSQL), and the batch ahead is
// claimed again from the start, the late row first. These tests hold such a
// row's transaction open and commit it while the first batch (100 rows) is
// published: the late row must be in the second.
func TestARowThatCommitsBelowTheClaimedIdsIsStillRelayed(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		backlog int
		// within is where the late row must be in the stream at the
		// latest (its entry's index, from 0).
		within int
	}{
		{"in the next batch when the run of full batches ends soon", 450, 199},
		{"in the next batch when the run goes on", 2500, 199},
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

func TestALateRowIsLookedForOnlyWhenOneIsPossible(t *testing.T) {
	t.Parallel()
	w := func(ids ...string) writers { return writersOf(ids) }
	for _, tc := range []struct {
		name      string
		allocated int64 // what the sequence had handed out at the claim
		atClaim   writers
		after     int64 // the batch ahead's bound
		now       writers
		want      bool
	}{
		{"no writer then, none now, the bound handed out before the claim", 500, nil, 400, nil, false},
		{"a writer then still open now", 500, w("3/7"), 400, w("3/7"), false},
		{"a writer that began after the claim", 500, nil, 400, w("4/9"), false},
		{"a writer then that has ended", 500, w("3/7"), 400, nil, true},
		{"one of two writers then has ended", 500, w("3/7", "5/1"), 400, w("5/1", "4/9"), true},
		{"the bound above what the sequence had handed out", 500, nil, 501, nil, true},
		{"the sequence's last value unknown (it caches ids)", 0, nil, 400, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cur := &claimed{writers: tc.atClaim, allocated: tc.allocated}
			require.Equal(t, tc.want, needsLateCheck(cur, &claimed{after: tc.after}, tc.now))
		})
	}
}
