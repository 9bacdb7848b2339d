// Package loadtest drives thousands of signups through the real pipeline
// (createuser, a relay and two sendemail consumers, against PostgreSQL,
// Redis and an SMTP server) while the mail server misbehaves in one way at a
// time, and counts what every user received.
package loadtest

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/functions/createuser"
	"github.com/outboxfn/outbox/functions/relay"
	"github.com/outboxfn/outbox/functions/sendemail"
	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/pgtest"
	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/smtptest"
	"github.com/outboxfn/outbox/shared/stream"
)

// signups is how many users each scenario signs up: LOADTEST_SIGNUPS, or
// 2000 (200 with -short).
func signups(t *testing.T) int {
	if v := os.Getenv("LOADTEST_SIGNUPS"); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(t, err, "LOADTEST_SIGNUPS")
		return n
	}
	if testing.Short() {
		return 200
	}
	return 2000
}

var tempFailure = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try again later"}

func TestEveryUserGetsOneEmailWhateverTheMailServerDoes(t *testing.T) {
	t.Parallel()
	n := signups(t)
	tests := []struct {
		name      string
		misbehave func(s *smtptest.Server)
		// ambiguous: the server's reply to the data never arrives for
		// some messages, so at most one extra copy (with the same
		// Message-ID) is allowed.
		ambiguous bool
	}{
		{name: "a server that behaves", misbehave: func(*smtptest.Server) {}},
		{name: "a server that drops every connection on QUIT", misbehave: func(s *smtptest.Server) {
			s.Inject("QUIT", smtptest.Fault{Drop: true})
		}},
		{name: "a server that fails RSET", misbehave: func(s *smtptest.Server) {
			s.Inject("RSET", smtptest.Fault{Reply: tempFailure})
		}},
		{name: "a server that drops one connection in 20 after accepting the message", ambiguous: true, misbehave: func(s *smtptest.Server) {
			s.Inject(smtptest.EndOfData, smtptest.Fault{Drop: true, Times: n / 20})
		}},
		{name: "a server that drops one connection in 20 before accepting the message", misbehave: func(s *smtptest.Server) {
			s.Inject("DATA", smtptest.Fault{Drop: true, Times: n / 20})
		}},
		{name: "a server that refuses one recipient in 10 for now", misbehave: func(s *smtptest.Server) {
			s.Inject("RCPT", smtptest.Fault{Reply: tempFailure, Times: n / 10})
		}},
		{name: "a server that takes 40 ms for every reply", misbehave: func(s *smtptest.Server) {
			s.SetReplyDelay(40 * time.Millisecond)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			mail := smtptest.Start(t)
			tt.misbehave(mail)
			p := start(t, mail.URL())
			start := time.Now()
			created := p.signUp(t, n)
			require.Len(t, created, n, "every signup is eventually created")

			p.settle(t, 3*time.Minute)
			settled := time.Since(start)
			byUser := messagesByRecipient(mail)

			var missing, extraSameID, extraOtherID int
			for email := range created {
				ids := byUser[email]
				switch {
				case len(ids) == 0:
					missing++
				case len(ids) > 1:
					for _, id := range ids[1:] {
						if id == ids[0] {
							extraSameID++
						} else {
							extraOtherID++
						}
					}
				}
			}
			t.Logf("%d signups: settled in %s; %d messages accepted; %d users without an email; %d extra copies with the same Message-ID, %d with another",
				n, settled.Round(time.Millisecond), mail.Count(), missing, extraSameID, extraOtherID)
			assert.Zero(t, missing, "users without an email")
			assert.Zero(t, extraOtherID, "users with two different emails")
			if !tt.ambiguous {
				assert.Zero(t, extraSameID, "users with two copies of one email")
			} else {
				assert.LessOrEqual(t, extraSameID, n/20, "at most one extra copy per ambiguous send")
			}
		})
	}
}

// pipeline is the running system of one scenario.
type pipeline struct {
	createUser http.Handler
	db         *pgxpool.Pool
	redis      rueidis.Client
	stream     string
}

func start(t *testing.T, smtpURL string) *pipeline {
	t.Helper()
	client, prefix := redistest.New(t)
	return startOn(t, smtpURL, redistest.URL(), false, client, prefix, 0)
}

// startOn runs createuser, a relay that retains what it relayed for
// retention (0: not at all) and two sendemail consumers on a database of
// their own, against the Redis at redisURL (a Redis Cluster if cluster;
// client talks to it) with
// stream prefix, sending mail through smtpURL. Nothing is trimmed, so the
// stream shows every event the relay published.
func startOn(t *testing.T, smtpURL, redisURL string, cluster bool, client rueidis.Client, prefix string, retention time.Duration) *pipeline {
	t.Helper()
	return startPartitioned(t, smtpURL, redisURL, cluster, client, prefix, retention, 1)
}

// startPartitioned is startOn with the user events spread over partitions
// streams (STREAM_PARTITIONS); p.stream is then the first partition's.
func startPartitioned(t *testing.T, smtpURL, redisURL string, cluster bool, client rueidis.Client, prefix string, retention time.Duration, partitions int) *pipeline {
	t.Helper()
	ctx := context.Background()
	dbURL, db := pgtest.NewPool(t)
	log := logging.Config{LogFormat: "text", LogLevel: "warn"}

	cu, err := createuser.New(ctx, createuser.Config{Config: log, DatabaseURL: dbURL, DBMaxConns: 8,
		RequestTimeout: 5 * time.Second, ForwardedHops: 1}, logging.Discard())
	require.NoError(t, err)
	t.Cleanup(cu.Close)
	rl, err := relay.New(ctx, relay.Config{Config: log, DatabaseURL: dbURL, DBMaxConns: 4, RedisURL: redisURL,
		RedisCluster: cluster, StreamPrefix: prefix, StreamPartitions: partitions, BatchSize: 1000, PollInterval: time.Second, DedupeWindow: time.Hour, Retention: retention,
		DrainTimeout: 10 * time.Second, ReconnectDelay: 100 * time.Millisecond, Background: true}, logging.Discard())
	require.NoError(t, err)
	require.NoError(t, rl.Start(ctx))
	t.Cleanup(func() { rl.Stop(); rl.Close() })

	// Short timeouts so that an ambiguous send is retried, and a crashed
	// consumer's entries re-claimed, within the test.
	const lease = 4 * time.Second
	for i := range 2 {
		se, err := sendemail.New(ctx, sendemail.Config{Config: log, DatabaseURL: dbURL, DBMaxConns: 8, RedisURL: redisURL,
			RedisCluster: cluster, StreamPrefix: prefix, StreamPartitions: partitions, Group: "sendemail", ConsumerName: fmt.Sprintf("load-%d", i), BatchSize: 64, Concurrency: 8,
			Block: 200 * time.Millisecond, ClaimIdle: 2 * lease, ClaimInterval: time.Second, MaxDeliveries: 20, SendAttempts: 3,
			Lease: lease, SMTPURL: smtpURL, SMTPTimeout: time.Second, SMTPDataTimeout: time.Second,
			From: "Example <welcome@example.com>", Subject: "Welcome, {{.Name}}!", DrainTimeout: 10 * time.Second,
			ShutdownTimeout: 5 * time.Second, Background: true}, logging.Discard())
		require.NoError(t, err)
		require.NoError(t, se.Start(ctx))
		t.Cleanup(func() { se.Stop(); se.Close() })
	}
	return &pipeline{createUser: cu, db: db, redis: client, stream: stream.Names(prefix, "user", partitions)[0]}
}

// signUp creates n users over createuser's HTTP handler, eight at a time,
// retrying a 503 with the same Idempotency-Key, and returns their emails.
func (p *pipeline) signUp(t *testing.T, n int) map[string]bool {
	t.Helper()
	run := strconv.FormatInt(time.Now().UnixNano(), 36)
	var mu sync.Mutex
	created := make(map[string]bool, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(n) {
					return
				}
				email := fmt.Sprintf("user%d.%s@mail.example.com", i, run)
				body := fmt.Sprintf(`{"email": %q, "name": "User %d"}`, email, i)
				for attempt := 0; ; attempt++ {
					req := httptest.NewRequest(http.MethodPost, "/", bytes.NewBufferString(body))
					req.Header.Set("Content-Type", "application/json")
					req.Header.Set("Idempotency-Key", email)
					req.Header.Set("X-Forwarded-For", fmt.Sprintf("10.%d.%d.%d", w, i/250%250, i%250))
					rec := httptest.NewRecorder()
					p.createUser.ServeHTTP(rec, req)
					if rec.Code == http.StatusCreated {
						mu.Lock()
						created[email] = true
						mu.Unlock()
						break
					}
					if rec.Code != http.StatusServiceUnavailable || attempt == 20 {
						t.Errorf("signup %d: %d %s", i, rec.Code, rec.Body.String())
						break
					}
					time.Sleep(50 * time.Millisecond)
				}
			}
		})
	}
	wg.Wait()
	return created
}

// messagesByRecipient maps each recipient to the Message-IDs it received.
func messagesByRecipient(s *smtptest.Server) map[string][]string {
	out := make(map[string][]string)
	for _, m := range s.Messages() {
		for _, to := range m.To {
			out[strings.ToLower(to)] = append(out[strings.ToLower(to)], m.Header.Get("Message-Id"))
		}
	}
	return out
}

// settle waits until the relay has emptied the outbox and the consumers
// have read every entry of the stream and acknowledged it (nothing pending,
// no lag), or fails after timeout.
func (p *pipeline) settle(t *testing.T, timeout time.Duration) {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(timeout)
	for {
		var backlog int
		require.NoError(t, p.db.QueryRow(ctx, `SELECT count(*) FROM outbox`).Scan(&backlog))
		groups, err := p.redis.Do(ctx, p.redis.B().XinfoGroups().Key(p.stream).Build()).ToArray()
		if err == nil && backlog == 0 && len(groups) == 1 {
			g, err := groups[0].AsMap()
			require.NoError(t, err)
			pendingMsg, lagMsg := g["pending"], g["lag"]
			pending, _ := pendingMsg.AsInt64()
			lag, lagErr := lagMsg.AsInt64()
			if pending == 0 && lagErr == nil && lag == 0 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the pipeline did not settle within %s", timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
