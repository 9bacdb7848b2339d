package createuser

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/pgtest"
)

// cutAfterCommit is a TCP proxy to PostgreSQL that passes everything, but
// once a client has sent COMMIT it lets the server work for a moment and
// then breaks both connections, before the client reads the answer: the
// commit happened, and its answer is lost.
func cutAfterCommit(t *testing.T, target string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			var cut atomic.Bool
			wg.Go(func() {
				defer c.Close()
				buf := make([]byte, 64<<10)
				for {
					n, err := s.Read(buf)
					if cut.Load() {
						return // the answer to COMMIT never reaches the client
					}
					if n > 0 {
						if _, werr := c.Write(buf[:n]); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			})
			wg.Go(func() {
				defer s.Close()
				defer c.Close()
				buf := make([]byte, 64<<10)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						commit := bytes.Contains(bytes.ToLower(buf[:n]), []byte("commit\x00"))
						if commit {
							cut.Store(true)
						}
						if _, werr := s.Write(buf[:n]); werr != nil {
							return
						}
						if commit {
							time.Sleep(300 * time.Millisecond) // the server commits
							return
						}
					}
					if err != nil {
						return
					}
				}
			})
		}
	})
	return ln.Addr().String()
}

// "The connection broke" is the README's first case of an unconfirmed
// COMMIT. Here it breaks after the server committed: the answer must not
// say that nothing was written.
func TestACommitWhoseConnectionBreaksSaysTheUserMayExist(t *testing.T) {
	t.Parallel()
	url, pool := pgtest.NewPool(t)
	proxied := strings.Replace(url, "127.0.0.1:5432", cutAfterCommit(t, "127.0.0.1:5432"), 1)
	require.NotEqual(t, url, proxied, "the URL goes through the proxy")
	svc, err := New(context.Background(), Config{Config: logging.Config{LogFormat: "text", LogLevel: "error"},
		DatabaseURL: proxied, DBMaxConns: 2, RequestTimeout: 5 * time.Second}, logging.Discard())
	require.NoError(t, err)
	t.Cleanup(svc.Close)
	b := &testBundle{svc: svc, pool: pool}

	res := b.post(t, `{"email":"cut@example.com","name":"Cut"}`, "Idempotency-Key", "cut-1")
	require.Equal(t, http.StatusServiceUnavailable, res.Status, res.Raw)
	assert.Equal(t, [3]int{1, 1, 1}, b.counts(t), "the server committed")
	assert.Contains(t, res.Raw, "may or may not exist", "not 'nothing was written'")
}
