package createuser

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/logging"
)

func limits(window time.Duration, perAddress, perDomain int) func(*Config) {
	return func(c *Config) {
		c.RateLimitWindow, c.RateLimitPerAddress, c.RateLimitPerDomain, c.ForwardedHops = window, perAddress, perDomain, 1
	}
}

// postFrom posts a sign-up for email as Cloud Run would pass it on from
// the client at xff's last entry.
func postFrom(t *testing.T, h http.Handler, xff, email string) response {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(fmt.Sprintf(`{"email":%q,"name":"N"}`, email)))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Forwarded-For", xff)
	return do(t, h, req)
}

func requireLimited(t *testing.T, res response, minWait, maxWait int) {
	t.Helper()
	require.Equal(t, http.StatusTooManyRequests, res.Status, res.Raw)
	require.Equal(t, "rate_limited", errorCode(t, res))
	wait, err := strconv.Atoi(res.Header.Get("Retry-After"))
	require.NoError(t, err, "Retry-After is whole seconds: %q", res.Header.Get("Retry-After"))
	require.GreaterOrEqual(t, wait, minWait)
	require.LessOrEqual(t, wait, maxWait)
}

func TestRateLimits(t *testing.T) {
	t.Parallel()

	t.Run("limits sign-ups per client address, taken from the last X-Forwarded-For entry", func(t *testing.T) {
		t.Parallel()
		b := setup(t, limits(time.Hour, 2, 0))
		require.Equal(t, http.StatusCreated, postFrom(t, b.svc, "198.51.100.7", "a1@example.com").Status)
		// A client can write anything in front of the entry Cloud Run appends.
		require.Equal(t, http.StatusCreated, postFrom(t, b.svc, "10.9.9.9, 198.51.100.7", "a2@example.com").Status)
		// Two refills of 30 minutes each are in use: the next one is 1800 s away.
		requireLimited(t, postFrom(t, b.svc, "203.0.113.50, 198.51.100.7", "a3@example.com"), 1790, 1800)
		require.Equal(t, [3]int{2, 2, 0}, b.counts(t), "a refused request writes nothing")
		require.Equal(t, http.StatusCreated, postFrom(t, b.svc, "198.51.100.7, 198.51.100.8", "a4@example.com").Status,
			"another address has its own allowance")
	})

	t.Run("limits an IPv6 client by its /64", func(t *testing.T) {
		t.Parallel()
		b := setup(t, limits(time.Hour, 1, 0))
		require.Equal(t, http.StatusCreated, postFrom(t, b.svc, "2001:db8:1:2::1", "a1@example.com").Status)
		requireLimited(t, postFrom(t, b.svc, "2001:db8:1:2:ffff::9", "a2@example.com"), 1, 3600)
		require.Equal(t, http.StatusCreated, postFrom(t, b.svc, "2001:db8:1:3::1", "a3@example.com").Status)
	})

	t.Run("limits sign-ups per recipient domain across instances, in its canonical form", func(t *testing.T) {
		t.Parallel()
		b := setup(t, limits(time.Hour, 0, 2))
		other, err := New(context.Background(), b.cfg, logging.Discard())
		require.NoError(t, err)
		t.Cleanup(other.Close)
		require.Equal(t, http.StatusCreated, postFrom(t, b.svc, "198.51.100.1", "a@exämple.com").Status)
		require.Equal(t, http.StatusCreated, postFrom(t, other, "198.51.100.2", "b@xn--exmple-cua.com").Status)
		requireLimited(t, postFrom(t, b.svc, "198.51.100.3", "c@EXÄMPLE.com"), 1790, 1800)
		requireLimited(t, postFrom(t, other, "198.51.100.4", "d@exämple.com"), 1790, 1800)
		require.Equal(t, http.StatusCreated, postFrom(t, other, "198.51.100.5", "e@example.org").Status)
	})

	t.Run("does not count requests the address limit refused against the domain", func(t *testing.T) {
		t.Parallel()
		b := setup(t, limits(time.Hour, 1, 2))
		require.Equal(t, http.StatusCreated, postFrom(t, b.svc, "198.51.100.1", "a@example.com").Status)
		for i := range 5 {
			requireLimited(t, postFrom(t, b.svc, "198.51.100.1", fmt.Sprintf("x%d@example.com", i)), 1, 3600)
		}
		require.Equal(t, http.StatusCreated, postFrom(t, b.svc, "198.51.100.2", "b@example.com").Status)
		requireLimited(t, postFrom(t, b.svc, "198.51.100.3", "c@example.com"), 1, 3600)
	})

	t.Run("allows a client again once its bucket has refilled", func(t *testing.T) {
		t.Parallel()
		b := setup(t, limits(300*time.Millisecond, 1, 0))
		start := time.Now()
		require.Equal(t, http.StatusCreated, postFrom(t, b.svc, "198.51.100.1", "a@example.com").Status)
		requireLimited(t, postFrom(t, b.svc, "198.51.100.1", "b@example.com"), 1, 1)
		// Refused attempts take nothing, so polling does not keep the client out.
		var res response
		require.Eventually(t, func() bool {
			res = postFrom(t, b.svc, "198.51.100.1", "b@example.com")
			return res.Status == http.StatusCreated
		}, 10*time.Second, 20*time.Millisecond)
		require.GreaterOrEqual(t, time.Since(start), 250*time.Millisecond)
	})

	t.Run("deletes buckets that have run empty as it goes", func(t *testing.T) {
		t.Parallel()
		b := setup(t, limits(time.Hour, 5, 0))
		ctx := context.Background()
		_, err := b.pool.Exec(ctx, `INSERT INTO rate_limits (key, tat) VALUES ('addr:192.0.2.1', now() - interval '1 s'), ('addr:192.0.2.2', now() + interval '1 h')`)
		require.NoError(t, err)
		b.svc.limiter.calls.Store(sweepEvery - 1)
		require.Equal(t, http.StatusCreated, postFrom(t, b.svc, "198.51.100.1", "a@example.com").Status)
		var keys []string
		rows, err := b.pool.Query(ctx, `SELECT key FROM rate_limits ORDER BY key`)
		require.NoError(t, err)
		for rows.Next() {
			var k string
			require.NoError(t, rows.Scan(&k))
			keys = append(keys, k)
		}
		require.NoError(t, rows.Err())
		require.Equal(t, []string{"addr:192.0.2.2", "addr:198.51.100.1"}, keys)
	})

	t.Run("answers 503 when the database is unreachable, not 429 or 500", func(t *testing.T) {
		t.Parallel()
		svc, err := New(context.Background(), Config{
			Config:      logging.Config{LogFormat: "text", LogLevel: "info"},
			DatabaseURL: "postgres://postgres@127.0.0.1:1/postgres?sslmode=disable&connect_timeout=1",
			DBMaxConns:  2, RequestTimeout: 2 * time.Second,
			RateLimitWindow: time.Hour, RateLimitPerAddress: 1, RateLimitPerDomain: 1, ForwardedHops: 1,
		}, logging.Discard())
		require.NoError(t, err)
		t.Cleanup(svc.Close)
		res := postFrom(t, svc, "198.51.100.1", "a@example.com")
		require.Equal(t, http.StatusServiceUnavailable, res.Status, res.Raw)
	})
}

func TestClientAddress(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		hops   int
		remote string
		xff    []string
		want   string
	}{
		{"takes the last entry behind one proxy", 1, "169.254.1.1:5000", []string{"198.51.100.7"}, "198.51.100.7"},
		{"ignores what the client wrote in front", 1, "169.254.1.1:5000", []string{"1.2.3.4, 10.0.0.1, 198.51.100.7"}, "198.51.100.7"},
		{"reads header lines in order", 1, "169.254.1.1:5000", []string{"1.2.3.4", "198.51.100.7"}, "198.51.100.7"},
		{"takes the second to last behind two proxies", 2, "169.254.1.1:5000", []string{"1.2.3.4,198.51.100.7, 35.191.0.1"}, "198.51.100.7"},
		{"uses the peer with hops 0", 0, "192.0.2.9:5000", []string{"198.51.100.7"}, "192.0.2.9"},
		{"uses the peer when the header is shorter than the hops", 2, "192.0.2.9:5000", []string{"198.51.100.7"}, "192.0.2.9"},
		{"uses the peer without a header", 1, "192.0.2.9:5000", nil, "192.0.2.9"},
		{"drops a port", 1, "", []string{"198.51.100.7:4711"}, "198.51.100.7"},
		{"keys IPv6 by its /64", 1, "", []string{"[2001:db8:1:2:3:4:5:6]:443"}, "2001:db8:1:2::/64"},
		{"unmaps IPv4 in IPv6", 1, "", []string{"::ffff:198.51.100.7"}, "198.51.100.7"},
		{"puts every unreadable entry in one bucket", 1, "192.0.2.9:5000", []string{"1.2.3.4, not-an-ip"}, "unknown"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			req := httptest.NewRequest(http.MethodPost, "/", nil)
			req.RemoteAddr = tt.remote
			for _, v := range tt.xff {
				req.Header.Add("X-Forwarded-For", v)
			}
			require.Equal(t, tt.want, clientAddress(req, tt.hops))
		})
	}
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	valid := Config{
		Config:     logging.Config{LogFormat: "text", LogLevel: "info"},
		DBMaxConns: 1, RequestTimeout: time.Second,
		RateLimitWindow: time.Hour, RateLimitPerAddress: 20, RateLimitPerDomain: 200, ForwardedHops: 1,
	}
	require.NoError(t, valid.Validate())
	tests := []struct {
		name   string
		mutate func(*Config)
		names  string
	}{
		{"a negative address limit", func(c *Config) { c.RateLimitPerAddress = -1 }, "RATE_LIMIT_PER_ADDRESS"},
		{"a negative domain limit", func(c *Config) { c.RateLimitPerDomain = -1 }, "RATE_LIMIT_PER_DOMAIN"},
		{"a window under a second", func(c *Config) { c.RateLimitWindow = time.Millisecond }, "RATE_LIMIT_WINDOW"},
		{"negative hops", func(c *Config) { c.ForwardedHops = -1 }, "FORWARDED_HOPS"},
	}
	for _, tt := range tests {
		c := valid
		tt.mutate(&c)
		err := c.Validate()
		require.Error(t, err, tt.name)
		require.Contains(t, err.Error(), tt.names, tt.name)
	}
	off := valid
	off.RateLimitPerAddress, off.RateLimitPerDomain, off.RateLimitWindow = 0, 0, 0
	require.NoError(t, off.Validate(), "no window is needed while both limits are off")
}

// BenchmarkLimits measures what the abuse limits cost a sign-up, with every
// request from its own address, and its recipient domain one of many or
// always the same (the hot row of a popular domain):
//
//	go test -run '^$' -bench Limits -benchtime 5s ./functions/createuser
func BenchmarkLimits(b *testing.B) {
	for _, bb := range []struct {
		name    string
		limits  func(*Config)
		domains int
	}{
		{"off", func(*Config) {}, 1000},
		{"on, many domains", limits(time.Hour, 1000, 1<<30), 1000},
		{"on, one domain", limits(time.Hour, 1000, 1<<30), 1},
	} {
		b.Run(bb.name, func(b *testing.B) {
			bundle := setup(b, func(c *Config) { bb.limits(c); c.DBMaxConns = 16 })
			var n atomic.Int64
			b.SetParallelism(8) // 16 goroutines on 2 cores, as the pgbench runs
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					i := n.Add(1)
					req := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(
						fmt.Sprintf(`{"email":"u%d@d%d.example.com","name":"N"}`, i, i%int64(bb.domains))))
					req.Header.Set("Content-Type", "application/json")
					req.Header.Set("X-Forwarded-For", fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255))
					rec := httptest.NewRecorder()
					bundle.svc.ServeHTTP(rec, req)
					if rec.Code != http.StatusCreated {
						b.Errorf("status %d: %s", rec.Code, rec.Body)
						return
					}
				}
			})
		})
	}
}
