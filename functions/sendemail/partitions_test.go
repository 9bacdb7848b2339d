package sendemail

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/smtptest"
	"github.com/outboxfn/outbox/shared/stream"
)

// partitions is the STREAM_PARTITIONS of the tests of partitioned streams.
const partitions = 6

func withPartitions(c *Config) { c.StreamPartitions = partitions }

// addToPartition puts a user.created event for userID on its partition's
// stream, as the relay with STREAM_PARTITIONS=6 would.
func (b *testBundle) addToPartition(t *testing.T, userID int64) {
	t.Helper()
	id := fmt.Sprint(userID)
	payload, err := json.Marshal(map[string]any{"user_id": userID, "email": fmt.Sprintf("u%d@example.com", userID), "name": "U"})
	require.NoError(t, err)
	e := stream.Event{EventID: uuid.NewString(), EventType: "user.created", AggregateType: "user",
		AggregateID: id, Payload: string(payload), OccurredAt: time.Now()}
	key := stream.PartitionName(b.prefix, "user", stream.Partition(id, partitions), partitions)
	cmd := b.redis.B().Xadd().Key(key).Id("*").FieldValue()
	f := e.Fields()
	for i := 0; i+1 < len(f); i += 2 {
		cmd = cmd.FieldValue(f[i], f[i+1])
	}
	require.NoError(t, b.redis.Do(context.Background(), cmd.Build()).Error())
}

// recipients counts the messages per recipient.
func recipients(msgs []smtptest.Message) map[string]int {
	n := map[string]int{}
	for _, m := range msgs {
		for _, to := range m.To {
			n[to]++
		}
	}
	return n
}

// With STREAM_PARTITIONS=6 sendemail reads the six streams of the user
// events, each with its own loop: every email goes out once, and a
// partition whose emails keep failing holds back none of the others.
func TestSendemailConsumesEveryPartition(t *testing.T) {
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
			t.Run("sends every email once", func(t *testing.T) {
				t.Parallel()
				b := where.setup(t)
				s := b.service(t, withPartitions)
				require.NoError(t, s.Start(context.Background()))
				const users = 60
				for u := range int64(users) {
					b.addToPartition(t, u+1)
				}
				msgs := b.smtp.WaitFor(t, users, 30*time.Second)
				got := recipients(msgs)
				require.Len(t, got, users, "every user got an email")
				for to, n := range got {
					require.Equal(t, 1, n, "%s got one email", to)
				}
				ctx := context.Background()
				for _, key := range stream.Names(b.prefix, "user", partitions) {
					waitUntil(t, 10*time.Second, key+" has nothing pending", func() bool {
						res, err := b.redis.Do(ctx, b.redis.B().Xpending().Key(key).Group("sendemail").Build()).ToArray()
						if err != nil || len(res) == 0 {
							return false
						}
						n, err := res[0].AsInt64()
						return err == nil && n == 0
					})
				}
			})

			t.Run("keeps sending from the other partitions while one hangs and fails", func(t *testing.T) {
				t.Parallel()
				b := where.setup(t)
				// The stuck partition's conversations hang at RCPT until the
				// test ends (the client gives up after SMTP_TIMEOUT), then
				// are refused for now.
				const stuck = 3
				release := make(chan struct{})
				var hanging atomic.Int32
				b.smtp.RefuseRecipients(func(to string) bool {
					var u int64
					if _, err := fmt.Sscanf(strings.TrimSuffix(to, "@example.com"), "u%d", &u); err != nil {
						return false
					}
					if stream.Partition(fmt.Sprint(u), partitions) != stuck {
						return false
					}
					hanging.Add(1)
					defer hanging.Add(-1)
					select {
					case <-release:
					case <-time.After(time.Minute):
					}
					return true
				}, smtptest.TempFailure)
				s := b.service(t, withPartitions, func(c *Config) { c.SendAttempts = 1 })
				t.Cleanup(func() { close(release) }) // before the service stops
				require.NoError(t, s.Start(context.Background()))
				// The stuck partition's events come first.
				var stuckUsers, others int
				for u := int64(1); u <= 120; u++ {
					if stream.Partition(fmt.Sprint(u), partitions) == stuck {
						b.addToPartition(t, u)
						stuckUsers++
					}
				}
				waitUntil(t, 10*time.Second, "the stuck partition's sends hang", func() bool { return hanging.Load() > 0 })
				for u := int64(1); u <= 120; u++ {
					if stream.Partition(fmt.Sprint(u), partitions) != stuck {
						b.addToPartition(t, u)
						others++
					}
				}
				require.Positive(t, stuckUsers)
				msgs := b.smtp.WaitFor(t, others, 30*time.Second)
				require.Positive(t, hanging.Load(), "the other partitions' emails went out while the stuck one's still hung")
				got := recipients(msgs)
				require.Len(t, got, others, "every user of the other partitions got an email")
				ctx := context.Background()
				key := stream.PartitionName(b.prefix, "user", stuck, partitions)
				res, err := b.redis.Do(ctx, b.redis.B().Xpending().Key(key).Group("sendemail").Build()).ToArray()
				require.NoError(t, err)
				pending, err := res[0].AsInt64()
				require.NoError(t, err)
				require.Positive(t, pending, "the stuck partition's entries wait for a retry")
			})
		})
	}
}

// waitUntil polls cond until it holds, or fails t after timeout.
func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting until %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
