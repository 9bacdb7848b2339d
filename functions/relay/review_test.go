package relay

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
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
