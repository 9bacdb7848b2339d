package serve

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/outboxfn/outbox/shared/logging"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// echo is a Service that answers with its name.
type echo struct {
	name    string
	started bool
	stopped bool
}

func (e *echo) ServeHTTP(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, e.name) }
func (e *echo) Start(context.Context) error                      { e.started = true; return nil }
func (e *echo) Stop()                                            { e.stopped = true }
func (e *echo) Close()                                           {}
func (e *echo) Health(context.Context) Health                    { return Health{OK: true} }

func fn(s *echo) Function {
	return Built(s.name, s)
}

func reachable(url string) bool {
	res, err := http.Get(url)
	if err != nil {
		return false
	}
	res.Body.Close()
	return true
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	res, err := http.Get(url)
	require.NoError(t, err)
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(b)
}

func TestServe(t *testing.T) {
	t.Run("serves every function at /<Name> and runs their loops until shutdown", func(t *testing.T) {
		a, b := &echo{name: "A"}, &echo{name: "B"}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error)
		go func() { done <- Serve(ctx, ln, Config{ShutdownTimeout: time.Second}, logging.Discard(), fn(a), fn(b)) }()
		base := "http://" + ln.Addr().String()
		require.Eventually(t, func() bool { return reachable(base + "/health") }, 5*time.Second, 10*time.Millisecond)
		_, body := get(t, base+"/A")
		require.Equal(t, "A", body)
		_, body = get(t, base+"/B")
		require.Equal(t, "B", body)
		require.True(t, a.started && b.started)

		status, body := get(t, base+"/C")
		require.Equal(t, http.StatusNotFound, status)
		require.JSONEq(t, `{"error":{"code":"not_found","message":"no such path; this server has /A, /B and /health"}}`, body)
		res, err := http.Post(base+"/health", "application/json", nil)
		require.NoError(t, err)
		res.Body.Close()
		require.Equal(t, http.StatusMethodNotAllowed, res.StatusCode)
		require.Equal(t, "application/json", res.Header.Get("Content-Type"))
		cancel()
		require.NoError(t, <-done)
		require.True(t, a.stopped && b.stopped)
	})

	t.Run("serves only FUNCTION_TARGET, at /", func(t *testing.T) {
		a, b := &echo{name: "A"}, &echo{name: "B"}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error)
		go func() {
			done <- Serve(ctx, ln, Config{FunctionTarget: "B", ShutdownTimeout: time.Second}, logging.Discard(), fn(a), fn(b))
		}()
		base := "http://" + ln.Addr().String()
		require.Eventually(t, func() bool { return reachable(base + "/health") }, 5*time.Second, 10*time.Millisecond)
		_, body := get(t, base+"/")
		require.Equal(t, "B", body)
		require.False(t, a.started, "a function that is not the target is not built or started")
		cancel()
		require.NoError(t, <-done)
	})

	t.Run("refuses a FUNCTION_TARGET it does not have", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		err = Serve(context.Background(), ln, Config{FunctionTarget: "Nope"}, logging.Discard(), fn(&echo{name: "A"}))
		require.ErrorContains(t, err, `FUNCTION_TARGET "Nope"`)
	})
}

type testConfig struct {
	logging.Config
	Size int `envconfig:"SERVE_TEST_SIZE" default:"3"`
}

func TestDefine(t *testing.T) {
	builds := 0
	build := func(_ context.Context, c testConfig, _ *slog.Logger) (*echo, error) {
		builds++
		return &echo{name: "size-" + string(rune('0'+c.Size))}, nil
	}

	t.Run("builds the service once, from the environment", func(t *testing.T) {
		t.Setenv("SERVE_TEST_SIZE", "7")
		f := Define("T", build)
		rec := httptest.NewRecorder()
		f.Handler.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
		require.Equal(t, "size-7", rec.Body.String())
		s, err := f.Service()
		require.NoError(t, err)
		require.Equal(t, "size-7", s.(*echo).name)
		require.Equal(t, 1, builds)
	})

	t.Run("answers a bad configuration with a JSON 500 and names the variable", func(t *testing.T) {
		t.Setenv("SERVE_TEST_SIZE", "many")
		f := Define("T", build)
		_, err := f.Service()
		require.ErrorContains(t, err, "SERVE_TEST_SIZE")
		rec := httptest.NewRecorder()
		f.Handler.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
		require.Equal(t, http.StatusInternalServerError, rec.Code)
		var body map[string]map[string]string
		require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &body))
		require.Equal(t, "internal", body["error"]["code"])
	})
}
