package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/outboxfn/outbox/functions/createuser"
	"github.com/outboxfn/outbox/functions/relay"
	"github.com/outboxfn/outbox/functions/sendemail"
	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/pgtest"
	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/serve"
	"github.com/outboxfn/outbox/shared/smtptest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// pipeline builds the three functions on one database, Redis prefix and
// SMTP server, as serve.Functions, without reading the environment.
func pipeline(t *testing.T, smtpURL string) []serve.Function {
	t.Helper()
	dbURL := pgtest.New(t)
	_, prefix := redistest.New(t)
	log := logging.Config{LogFormat: "text", LogLevel: "info"}
	ctx := context.Background()

	cu, err := createuser.New(ctx, createuser.Config{Config: log, DatabaseURL: dbURL, DBMaxConns: 4, RequestTimeout: 5 * time.Second}, logging.Discard())
	require.NoError(t, err)
	rl, err := relay.New(ctx, relay.Config{Config: log, DatabaseURL: dbURL, DBMaxConns: 4, RedisURL: redistest.URL(),
		StreamPrefix: prefix, BatchSize: 1000, PollInterval: time.Hour, DedupeWindow: time.Hour,
		DrainTimeout: 10 * time.Second, ReconnectDelay: 100 * time.Millisecond, Background: true}, logging.Discard())
	require.NoError(t, err)
	se, err := sendemail.New(ctx, sendemail.Config{Config: log, DatabaseURL: dbURL, DBMaxConns: 4, RedisURL: redistest.URL(),
		StreamPrefix: prefix, Group: "sendemail", BatchSize: 16, Concurrency: 4, Block: 200 * time.Millisecond,
		ClaimIdle: time.Minute, ClaimInterval: time.Minute, MaxDeliveries: 5, SendAttempts: 3, Lease: 30 * time.Second,
		SMTPURL: smtpURL, SMTPTimeout: 5 * time.Second, From: "Example <welcome@example.com>",
		Subject: "Welcome, {{.Name}}!", DrainTimeout: 10 * time.Second, Background: true}, logging.Discard())
	require.NoError(t, err)
	fn := func(name string, s serve.Service) serve.Function {
		return serve.Function{Name: name, Handler: s.(http.Handler), Service: func() (serve.Service, error) { return s, nil }}
	}
	return []serve.Function{fn(createuser.Name, cu), fn(relay.Name, rl), fn(sendemail.Name, se)}
}

func TestPipeline(t *testing.T) {
	t.Parallel()
	mailServer := smtptest.Start(t)
	fns := pipeline(t, mailServer.URL())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	base := "http://" + ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() {
		served <- serve.Serve(ctx, ln, serve.Config{ShutdownTimeout: 5 * time.Second}, logging.Discard(), fns...)
	}()

	var health *http.Response
	require.Eventually(t, func() bool {
		health, err = http.Get(base + serve.HealthPath)
		return err == nil
	}, 5*time.Second, 20*time.Millisecond)
	var report struct {
		Status    string                  `json:"status"`
		Functions map[string]serve.Health `json:"functions"`
	}
	require.NoError(t, json.NewDecoder(health.Body).Decode(&report))
	health.Body.Close()
	require.Equal(t, http.StatusOK, health.StatusCode)
	require.Equal(t, "ok", report.Status)
	require.Equal(t, "ok", report.Functions["Relay"].Checks["redis"])
	require.Equal(t, "ok", report.Functions["CreateUser"].Checks["postgres"])

	t.Run("a created user gets a welcome email within a second", func(t *testing.T) {
		start := time.Now()
		res, err := http.Post(base+"/CreateUser", "application/json", strings.NewReader(`{"email":"ada@example.com","name":"Ada"}`))
		require.NoError(t, err)
		res.Body.Close()
		require.Equal(t, http.StatusCreated, res.StatusCode)
		msgs := mailServer.WaitFor(t, 1, 5*time.Second)
		elapsed := time.Since(start)
		t.Logf("request to email accepted: %s", elapsed)
		require.Less(t, elapsed, time.Second)
		require.Equal(t, []string{"ada@example.com"}, msgs[0].To)
	})

	t.Run("the triggers answer on their paths", func(t *testing.T) {
		for _, path := range []string{"/Relay", "/SendEmail"} {
			res, err := http.Post(base+path, "application/json", nil)
			require.NoError(t, err)
			var body map[string]any
			require.NoError(t, json.NewDecoder(res.Body).Decode(&body))
			res.Body.Close()
			require.Equal(t, http.StatusOK, res.StatusCode, "%s: %v", path, body)
		}
		res, err := http.Get(base + "/CreateUser")
		require.NoError(t, err)
		res.Body.Close()
		require.Equal(t, http.StatusMethodNotAllowed, res.StatusCode)
	})

	t.Run("shuts down gracefully, finishing the request in flight", func(t *testing.T) {
		// A slow upload keeps a request in flight while shutdown starts.
		conn, err := net.Dial("tcp", ln.Addr().String())
		require.NoError(t, err)
		defer conn.Close()
		body := `{"email":"bob@example.com","name":"Bob"}`
		_, err = fmt.Fprintf(conn, "POST /CreateUser HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body[:10])
		require.NoError(t, err)
		time.Sleep(50 * time.Millisecond)
		cancel()
		time.Sleep(50 * time.Millisecond)
		_, err = fmt.Fprint(conn, body[10:])
		require.NoError(t, err)
		res, err := http.ReadResponse(bufioReader(conn), nil)
		require.NoError(t, err)
		res.Body.Close()
		require.Equal(t, http.StatusCreated, res.StatusCode, "the in-flight request completes")
		select {
		case err := <-served:
			require.NoError(t, err)
		case <-time.After(10 * time.Second):
			t.Fatal("server did not stop")
		}
		_, err = http.Get(base + serve.HealthPath)
		require.Error(t, err, "the listener is closed")
	})
}

func bufioReader(c net.Conn) *bufio.Reader { return bufio.NewReader(c) }
