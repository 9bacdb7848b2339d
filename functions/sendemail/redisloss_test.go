package sendemail

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/stream"
)

// A Redis that forgets (restarted without persistence, flushed, its stream
// deleted) takes the consumer group with it. sendemail must create the
// group again by itself and go on, not answer NOGROUP until restarted.
func TestTheConsumerGroupIsCreatedAgainWhenRedisForgetsIt(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	tests := []struct {
		name   string
		forget func(t *testing.T, b *testBundle, server *redistest.Server)
	}{
		{"after a restart without persistence", func(t *testing.T, b *testBundle, server *redistest.Server) {
			server.Stop()
			server.Start()
		}},
		{"after the stream was deleted", func(t *testing.T, b *testBundle, server *redistest.Server) {
			require.NoError(t, b.redis.Do(ctx, b.redis.B().Del().Key(b.stream).Build()).Error())
		}},
	}
	for _, tt := range tests {
		for _, mode := range []string{"background loop", "trigger"} {
			t.Run(tt.name+", "+mode, func(t *testing.T) {
				t.Parallel()
				server := redistest.StartServer(t)
				b := setup(t)
				client, err := stream.NewClient(server.URL(), false)
				require.NoError(t, err)
				t.Cleanup(client.Close)
				b.redis = client
				s := b.service(t, func(c *Config) { c.RedisURL = server.URL(); c.Background = mode == "background loop" })
				if mode == "background loop" {
					require.NoError(t, s.Start(ctx))
				}
				send := func(id int64, email string) {
					b.add(t, id, email, "A")
					if mode == "trigger" {
						rec := httptest.NewRecorder()
						s.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
						require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
					}
				}
				require.NoError(t, s.consumer.EnsureGroup(ctx))
				send(1, "one@example.com")
				b.smtp.WaitFor(t, 1, 5*time.Second)

				tt.forget(t, b, server)
				// The relay publishes again (issue 12 makes it replay what Redis
				// lost); the consumer must read it without a restart.
				published := false
				for deadline := time.Now().Add(10 * time.Second); b.smtp.Count() < 2 && time.Now().Before(deadline); {
					if !published {
						e := stream.Event{EventID: "00000000-0000-4000-8000-000000000002", EventType: "user.created",
							AggregateType: "user", AggregateID: "2", OccurredAt: time.Now(),
							Payload: `{"user_id": 2, "email": "two@example.com", "name": "B"}`}
						cmd := b.redis.B().Xadd().Key(b.stream).Id("*").FieldValue()
						f := e.Fields()
						for i := 0; i+1 < len(f); i += 2 {
							cmd = cmd.FieldValue(f[i], f[i+1])
						}
						published = b.redis.Do(ctx, cmd.Build()).Error() == nil
					}
					if mode == "trigger" {
						s.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodPost, "/", nil))
					}
					time.Sleep(100 * time.Millisecond)
				}
				assert.Equal(t, 2, b.smtp.Count(), "the email after Redis forgot was not sent")
				// The first command on a connection Redis dropped answers EOF
				// while the client reconnects: health must recover, not be
				// right on its first try.
				assert.Eventually(t, func() bool { return s.Health(ctx).OK }, 2*time.Second, 50*time.Millisecond,
					"health after recovery: %+v", s.Health(ctx))
			})
		}
	}
}

// After Redis restarts, the consumer's first command on its old connection
// fails (EOF). When that command is the XACK of entries whose emails went
// out, the entries must not stay pending until they are claimed again
// (ClaimIdle, a minute here): the XACK is sent again.
func TestAnAcknowledgementThatMeetsARestartedRedisIsSentAgain(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	server := redistest.StartServer(t)
	b := setup(t)
	client, err := stream.NewClient(server.URL(), false)
	require.NoError(t, err)
	t.Cleanup(client.Close)
	b.redis = client
	s := b.service(t, func(c *Config) { c.RedisURL = server.URL() })
	require.NoError(t, s.consumer.EnsureGroup(ctx))
	require.NoError(t, s.Start(ctx))
	b.add(t, 1, "one@example.com", "A")
	b.smtp.WaitFor(t, 1, 5*time.Second)
	pending := func() int64 {
		n, err := client.Do(ctx, client.B().Xpending().Key(b.stream).Group(s.cfg.Group).Build()).ToArray()
		if err != nil || len(n) == 0 {
			return -1
		}
		p, err := n[0].AsInt64()
		if err != nil {
			return -1
		}
		return p
	}
	require.Eventually(t, func() bool { return pending() == 0 }, 5*time.Second, 10*time.Millisecond)

	// A restart that keeps the data (a snapshot), as with persistence on.
	require.NoError(t, client.Do(ctx, client.B().Save().Build()).Error())
	server.Stop()
	server.Start()
	client, err = stream.NewClient(server.URL(), false) // the test's own connection died too
	require.NoError(t, err)
	t.Cleanup(client.Close)
	b.redis = client
	b.add(t, 2, "two@example.com", "B")
	b.smtp.WaitFor(t, 2, 10*time.Second)
	assert.Eventually(t, func() bool { return pending() == 0 }, 2*time.Second, 50*time.Millisecond, "the second entry is still pending after its email was sent: %v",
		fmt.Sprint(client.Do(ctx, client.B().Xpending().Key(b.stream).Group(s.cfg.Group).Start("-").End("+").Count(10).Build()).ToAny()))
}
