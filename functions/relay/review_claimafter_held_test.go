package relay

import (
	"context"
	"encoding/json"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/outbox"
	"github.com/outboxfn/outbox/shared/stream"
)

// Attempts that held (review of 3e2a83c): a late row below the claims'
// bound, committed after the k-th batch was published (its claim ahead
// taken), in busy mode (the inserter skipped the doorbell) or not, with
// retention off or on, with partitions: the drain reports Complete only
// with the outbox empty and the late row relayed once.
func TestReviewLateRowBelowTheBoundIsRelayedBeforeComplete(t *testing.T) {
	t.Parallel()
	for _, busy := range []bool{false, true} {
		for _, retention := range []time.Duration{0, time.Hour} {
			for _, parts := range []int{1, 4} {
				for _, at := range []int32{1, 3, 4, 5} {
					name := fmt.Sprintf("busy=%v/retention=%v/partitions=%d/after-batch-%d", busy, retention, parts, at)
					t.Run(name, func(t *testing.T) {
						t.Parallel()
						b := setup(t)
						s := b.relay(t, func(c *Config) {
							c.Background, c.Retention, c.StreamPartitions = false, retention, parts
						})
						ctx := context.Background()
						late := openTx(t, b.url)
						if busy {
							// The inserter finds the busy lock taken: no
							// doorbell, and no shared lock kept.
							holder, err := b.pool.Acquire(ctx)
							require.NoError(t, err)
							_, err = holder.Exec(ctx, "SELECT pg_advisory_lock("+busyLock+")")
							require.NoError(t, err)
							insertIn(t, late, "late")
							_, err = holder.Exec(ctx, "SELECT pg_advisory_unlock("+busyLock+")")
							require.NoError(t, err)
							holder.Release()
						} else {
							insertIn(t, late, "late")
						}
						b.insertBulk(t, "user", 450)
						var calls atomic.Int32
						s.drainer.afterPublish = func() error {
							if calls.Add(1) == at {
								return late.Commit(context.Background())
							}
							return nil
						}
						res, err := s.drainer.Drain(ctx, time.Time{})
						require.NoError(t, err)
						require.True(t, res.Complete)
						require.Equal(t, 451, res.Relayed)
						require.Zero(t, b.outboxCount(t))
						n := 0
						for p := range parts {
							for _, e := range b.entries(t, stream.PartitionKey("user", p, parts)) {
								if e.AggregateID == "late" {
									n++
								}
							}
						}
						require.Equal(t, 1, n)
						if busy {
							require.Empty(t, res.Writers)
						}
					})
				}
			}
		}
	}
}

// Held: a late row below the bound, committed during a drain in which the
// stream is deleted (a re-publication from retention follows); after the
// drain the outbox is empty and every event is in the stream once.
func TestReviewLateRowAcrossARepublication(t *testing.T) {
	t.Parallel()
	for _, delAt := range []int{2, 3, 5} {
		t.Run(fmt.Sprintf("deleted-before-batch-%d", delAt), func(t *testing.T) {
			t.Parallel()
			l := newLossBundle(t)
			l.relayNew(t, 20)
			key := l.prefix + "item"
			late := openTx(t, l.url)
			require.NoError(t, outboxInsertItem(late, "late"))
			l.insert(t, "item", "a", l.next, 45)
			l.next += 45
			batches, published := 0, 0
			l.relay.drainer.afterPublish = func() error {
				if published++; published == 1 {
					return late.Commit(context.Background())
				}
				return nil
			}
			l.relay.drainer.beforePublish = func() {
				if batches++; batches == delAt {
					l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Del().Key(key).Build() })
				}
			}
			res, err := l.drain()
			require.NoError(t, err)
			require.True(t, res.Complete)
			require.Zero(t, l.outboxCount(t))
			entries := lastCopies(l.entries(t, "item"))
			require.Equal(t, 66, len(entries))
			// The batch that lands in the deleted stream is in doubt: it
			// is published again after the re-publication (README, "When
			// Redis forgets"), so its events, the late row among them when
			// it went into that batch, may have two copies.
			copies := map[string]int{}
			for _, e := range l.entries(t, "item") {
				if e.AggregateID == "late" {
					copies[e.EventID]++
				}
			}
			require.Len(t, copies, 1, "the late row is in the stream")
			for _, n := range copies {
				require.LessOrEqual(t, n, 2, "copies of the late row")
			}
		})
	}
}

func outboxInsertItem(tx pgx.Tx, aggregateID string) error {
	return outbox.Insert(context.Background(), tx, outbox.Event{
		AggregateType: "item", AggregateID: aggregateID, EventType: "item.changed",
		Payload: json.RawMessage(`{"seq": -1}`),
	})
}
