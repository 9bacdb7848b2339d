package serve

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/logging"
)

// probe is a Service whose health, liveness and handler a test sets.
type probe struct {
	timeout time.Duration
	health  func() Health
	live    func() error
	handler http.HandlerFunc
}

func (p *probe) ServeHTTP(w http.ResponseWriter, r *http.Request) { p.handler(w, r) }
func (p *probe) Start(context.Context) error                      { return nil }
func (p *probe) Stop()                                            {}
func (p *probe) Close()                                           {}
func (p *probe) Health(context.Context) Health                    { return p.health() }
func (p *probe) Live(context.Context) error                       { return p.live() }
func (p *probe) HandlerTimeout() time.Duration                    { return p.timeout }

type serveBundle struct {
	base   string
	addr   string
	logs   *syncBuffer
	probe  *probe
	cancel context.CancelFunc
}

type syncBuffer struct {
	mu  chan struct{}
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu <- struct{}{}
	defer func() { <-b.mu }()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu <- struct{}{}
	defer func() { <-b.mu }()
	return b.buf.String()
}

// setup serves one probe function "P" with cfg's timeouts (1 s where unset)
// and the handler timeout p says (cfg.WriteTimeout when zero).
func setup(t *testing.T, cfg Config, opts ...func(*probe)) *serveBundle {
	t.Helper()
	p := &probe{
		health:  func() Health { return Health{OK: true, Checks: map[string]string{"postgres": "ok"}} },
		live:    func() error { return nil },
		handler: func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "P") },
	}
	for _, o := range opts {
		o(p)
	}
	for _, d := range []*time.Duration{&cfg.ShutdownTimeout, &cfg.ReadTimeout, &cfg.WriteTimeout, &cfg.IdleTimeout} {
		if *d == 0 {
			*d = time.Second
		}
	}
	logs := &syncBuffer{mu: make(chan struct{}, 1)}
	logger := logging.New(logs, logging.Config{LogFormat: "text", LogLevel: "info"})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, ln, cfg, logger, Built("P", p))
	}()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	b := &serveBundle{base: "http://" + ln.Addr().String(), addr: ln.Addr().String(), logs: logs, probe: p, cancel: cancel}
	require.Eventually(t, func() bool { return reachable(b.base + LivePath) }, 5*time.Second, 10*time.Millisecond)
	return b
}

func TestHealth(t *testing.T) {
	t.Parallel()

	t.Run("says only which dependency is down, and logs the error redacted once", func(t *testing.T) {
		t.Parallel()
		b := setup(t, Config{})
		const leak = `failed to connect to user=app database=outbox: 10.1.2.3:5432 (db.internal): password=hunter2 redis://:hunter2@10.9.9.9:6379`
		b.probe.health = func() Health {
			return Health{OK: false, Checks: map[string]string{"postgres": leak, "redis": "ok"},
				Details: map[string]any{"consumer": "host-1234-abcd", "stream": "outbox:user", "backlog": 7, "listening": false}}
		}
		for range 3 {
			status, body := get(t, b.base+HealthPath)
			require.Equal(t, http.StatusServiceUnavailable, status)
			require.JSONEq(t, `{"status":"unavailable","functions":{"P":{"ok":false,
				"checks":{"postgres":"unavailable","redis":"ok"},"details":{"backlog":7,"listening":false}}}}`, body)
		}
		logs := b.logs.String()
		require.Equal(t, 1, strings.Count(logs, "health check failing"), logs)
		require.Contains(t, logs, "db.internal", "the details go to the log")
		require.NotContains(t, logs, "hunter2")

		b.probe.health = func() Health { return Health{OK: true, Checks: map[string]string{"postgres": "ok", "redis": "ok"}} }
		status, _ := get(t, b.base+HealthPath)
		require.Equal(t, http.StatusOK, status)
		require.Contains(t, b.logs.String(), "health check recovered")
	})

	t.Run("serves health on a path Cloud Run does not reserve, and /healthz locally", func(t *testing.T) {
		t.Parallel()
		b := setup(t, Config{})
		for _, path := range []string{HealthPath, LivePath} {
			require.NotEqual(t, byte('z'), path[len(path)-1], "Cloud Run reserves paths ending in z")
			status, _ := get(t, b.base+path)
			require.Equal(t, http.StatusOK, status, path)
		}
		status, _ := get(t, b.base+"/healthz")
		require.Equal(t, http.StatusOK, status)
	})

	t.Run("liveness ignores dependencies and fails only when a service says it is stuck", func(t *testing.T) {
		t.Parallel()
		b := setup(t, Config{})
		b.probe.health = func() Health { return Health{OK: false, Checks: map[string]string{"postgres": "down"}} }
		status, body := get(t, b.base+LivePath)
		require.Equal(t, http.StatusOK, status)
		require.JSONEq(t, `{"status":"ok"}`, body)

		b.probe.live = func() error { return errors.New("loop stopped") }
		status, body = get(t, b.base+LivePath)
		require.Equal(t, http.StatusServiceUnavailable, status)
		require.JSONEq(t, `{"status":"stuck","function":"P"}`, body)
		require.Contains(t, b.logs.String(), "loop stopped")
	})
}

func TestTimeouts(t *testing.T) {
	t.Parallel()

	t.Run("cuts off a client that declares 100 bytes and sends 1", func(t *testing.T) {
		t.Parallel()
		b := setup(t, Config{ReadTimeout: 300 * time.Millisecond})
		conn, err := net.Dial("tcp", b.addr)
		require.NoError(t, err)
		defer conn.Close()
		start := time.Now()
		_, err = fmt.Fprint(conn, "POST /P HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
		require.NoError(t, err)
		require.NoError(t, conn.SetReadDeadline(time.Now().Add(5*time.Second)))
		r := bufio.NewReader(conn)
		res, err := http.ReadResponse(r, nil)
		require.NoError(t, err, "the server answers instead of waiting for the rest")
		body, err := io.ReadAll(res.Body)
		require.NoError(t, err)
		res.Body.Close()
		require.Equal(t, http.StatusRequestTimeout, res.StatusCode, string(body))
		rest, err := io.ReadAll(r)
		require.NoError(t, err, "and closes the connection")
		require.Empty(t, string(rest))
		require.Less(t, time.Since(start), 2*time.Second)
	})

	t.Run("cuts off a client that trickles its headers", func(t *testing.T) {
		t.Parallel()
		b := setup(t, Config{ReadTimeout: 300 * time.Millisecond})
		conn, err := net.Dial("tcp", b.addr)
		require.NoError(t, err)
		defer conn.Close()
		_, err = fmt.Fprint(conn, "GET /health HTTP/1.1\r\nHost: x\r\n")
		require.NoError(t, err)
		require.NoError(t, conn.SetReadDeadline(time.Now().Add(5*time.Second)))
		_, err = io.ReadAll(conn)
		require.NoError(t, err, "the server closes the connection before the test's deadline")
	})

	t.Run("closes an idle keep-alive connection", func(t *testing.T) {
		t.Parallel()
		b := setup(t, Config{IdleTimeout: 300 * time.Millisecond})
		conn, err := net.Dial("tcp", b.addr)
		require.NoError(t, err)
		defer conn.Close()
		_, err = fmt.Fprint(conn, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
		require.NoError(t, err)
		require.NoError(t, conn.SetReadDeadline(time.Now().Add(5*time.Second)))
		r := bufio.NewReader(conn)
		res, err := http.ReadResponse(r, nil)
		require.NoError(t, err)
		_, _ = io.Copy(io.Discard, res.Body)
		res.Body.Close()
		require.Equal(t, http.StatusOK, res.StatusCode)
		start := time.Now()
		_, err = r.ReadByte()
		require.ErrorIs(t, err, io.EOF, "the idle connection is closed by the server")
		require.Less(t, time.Since(start), 3*time.Second)
	})

	t.Run("lets a trigger run past the read timeout with its context alive", func(t *testing.T) {
		t.Parallel()
		b := setup(t, Config{ReadTimeout: 200 * time.Millisecond, WriteTimeout: 5 * time.Second})
		var canceled atomic.Bool
		b.probe.handler = func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.ReadAll(r.Body)
			select {
			case <-r.Context().Done():
				canceled.Store(true)
			case <-time.After(800 * time.Millisecond): // the work of a long drain
			}
			_, _ = io.WriteString(w, "drained")
		}
		res, err := http.Post(b.base+"/P", "application/json", strings.NewReader(`{}`))
		require.NoError(t, err)
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		require.Equal(t, "drained", string(body))
		require.False(t, canceled.Load(), "the request's context outlives the read timeout")
	})
}

func TestHandlerTimeout(t *testing.T) {
	t.Parallel()
	slow := func(w http.ResponseWriter, _ *http.Request) {
		time.Sleep(600 * time.Millisecond) // a handler that overruns its bound
		_, _ = io.WriteString(w, "late")
	}

	t.Run("a function's own timeout bounds its answer", func(t *testing.T) {
		t.Parallel()
		b := setup(t, Config{WriteTimeout: 10 * time.Second}, func(p *probe) { p.timeout = 200 * time.Millisecond; p.handler = slow })
		res, err := http.Post(b.base+"/P", "application/json", nil)
		if err == nil {
			res.Body.Close()
		}
		require.Error(t, err, "the answer past the function's deadline is not written")
	})

	t.Run("HTTP_WRITE_TIMEOUT applies when the function sets none", func(t *testing.T) {
		t.Parallel()
		b := setup(t, Config{WriteTimeout: 5 * time.Second}, func(p *probe) { p.handler = slow })
		status, body := get(t, b.base+"/P")
		require.Equal(t, http.StatusOK, status)
		require.Equal(t, "late", body)
	})
}

func TestAuthorized(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		header string
		ok     bool
	}{
		{"Bearer tok", true},
		{"bearer tok", true},
		{"BEARER tok", true},
		{"Bearer  tok", true},
		{"Bearer tok2", false},
		{"Basic tok", false},
		{"Bearertok", false},
		{"tok", false},
		{"", false},
	} {
		t.Run(fmt.Sprintf("%q passes: %v", tc.header, tc.ok), func(t *testing.T) {
			r, _ := http.NewRequest(http.MethodPost, "/", nil)
			r.Header.Set("Authorization", tc.header)
			w := &recorder{header: http.Header{}}
			require.Equal(t, tc.ok, Authorized(w, r, "tok"))
			if !tc.ok {
				require.Equal(t, http.StatusUnauthorized, w.status)
			}
		})
	}
}

type recorder struct {
	header http.Header
	status int
}

func (r *recorder) Header() http.Header         { return r.header }
func (r *recorder) Write(b []byte) (int, error) { return len(b), nil }
func (r *recorder) WriteHeader(s int)           { r.status = s }
