package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/functions/createuser"
	"github.com/outboxfn/outbox/functions/relay"
	"github.com/outboxfn/outbox/functions/sendemail"
	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/serve"
)

const secret = "hunter2-s3cret"

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestHealthDisclosesNothing runs the three real functions against a
// PostgreSQL and a Redis that are not there, each URL with a user, a password
// and a database, and asks /health as an anonymous client would.
func TestHealthDisclosesNothing(t *testing.T) {
	t.Parallel()
	// Port 1 on loopback refuses at once.
	dbURL := "postgres://outbox_app:" + secret + "@127.0.0.1:1/outbox_prod?connect_timeout=1&sslmode=disable"
	redisURL := "redis://outbox_user:" + secret + "@127.0.0.1:1/3"
	smtpURL := "smtps://mailer:" + secret + "@127.0.0.1:1"
	logs := &lockedBuffer{}
	logger := logging.New(logs, logging.Config{LogFormat: "json", LogLevel: "debug"})
	lc := logging.Config{LogFormat: "json", LogLevel: "debug"}
	ctx := context.Background()

	cu, err := createuser.New(ctx, createuser.Config{Config: lc, DatabaseURL: dbURL, DBMaxConns: 2, RequestTimeout: time.Second}, logger)
	require.NoError(t, err)
	rl, err := relay.New(ctx, relay.Config{Config: lc, DatabaseURL: dbURL, DBMaxConns: 3, RedisURL: redisURL,
		StreamPrefix: "outbox:", BatchSize: 10, PollInterval: time.Hour, DedupeWindow: time.Hour,
		DrainTimeout: time.Second, ReconnectDelay: time.Second}, logger)
	require.NoError(t, err)
	se, err := sendemail.New(ctx, sendemail.Config{Config: lc, DatabaseURL: dbURL, DBMaxConns: 3, RedisURL: redisURL,
		StreamPrefix: "outbox:", Group: "sendemail", ConsumerName: "host-db7.internal-1234", BatchSize: 16, Concurrency: 1,
		Block: 100 * time.Millisecond, ClaimIdle: time.Minute, ClaimInterval: time.Minute, MaxDeliveries: 5, SendAttempts: 1,
		Lease: 30 * time.Second, SMTPURL: smtpURL, SMTPTimeout: time.Second, From: "Example <welcome@example.com>",
		Subject: "Welcome, {{.Name}}!", DrainTimeout: time.Second}, logger)
	require.NoError(t, err)
	fn := func(name string, s serve.Service) serve.Function {
		return serve.Function{Name: name, Handler: s.(http.Handler), Service: func() (serve.Service, error) { return s, nil }}
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	sctx, cancel := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() {
		served <- serve.Serve(sctx, ln, serve.Config{ShutdownTimeout: 5 * time.Second}, logger,
			fn(createuser.Name, cu), fn(relay.Name, rl), fn(sendemail.Name, se))
	}()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-served)
	})
	base := "http://" + ln.Addr().String()
	var res *http.Response
	require.Eventually(t, func() bool {
		res, err = http.Get(base + serve.HealthPath)
		return err == nil
	}, 10*time.Second, 20*time.Millisecond)
	body, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	res.Body.Close()

	require.Equal(t, http.StatusServiceUnavailable, res.StatusCode)
	require.Contains(t, string(body), `"postgres":"unavailable"`)
	require.Contains(t, string(body), `"redis":"unavailable"`)
	hostname, _ := os.Hostname()
	for _, leak := range []string{secret, "outbox_app", "outbox_user", "outbox_prod", "127.0.0.1", ":1", "host-db7", "dial", "connect", hostname} {
		if leak != "" {
			require.NotContains(t, string(body), leak, "the public answer discloses %q", leak)
		}
	}
	require.NotContains(t, logs.String(), secret, "the logs hold no password")
	require.Contains(t, logs.String(), "health check failing", "the details go to the log")

	live, err := http.Get(base + serve.LivePath)
	require.NoError(t, err)
	live.Body.Close()
	require.Equal(t, http.StatusOK, live.StatusCode, "liveness does not fail because the dependencies are down")
}
