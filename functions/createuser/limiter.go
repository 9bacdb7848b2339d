package createuser

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outboxfn/outbox/shared/httpjson"
)

// sweepEvery is how many limiter calls of one instance pass between two
// deletions of expired buckets.
const sweepEvery = 512

// limiter enforces the abuse limits in PostgreSQL (table rate_limits), so
// they hold across every instance of the service. See migration 00010 for
// the algorithm (GCRA: limit requests per window, refilled steadily).
type limiter struct {
	pool       *pgxpool.Pool
	window     time.Duration
	perAddress int
	perDomain  int
	calls      atomic.Uint64
}

// rateLimitedError is answered with 429 and a Retry-After header.
type rateLimitedError struct {
	err        *httpjson.Error
	retryAfter time.Duration
}

func (e *rateLimitedError) Error() string { return e.err.Error() }
func (e *rateLimitedError) Unwrap() error { return e.err }

// allow takes one request from the bucket of the client's address and,
// if that allows it, from the bucket of the recipient's domain. The domain's
// bucket is only touched when the address's allowed the request, so that one
// client cannot use up a domain's allowance with requests it was refused.
func (l *limiter) allow(ctx context.Context, addr, domain string) error {
	if l.calls.Add(1)%sweepEvery == 0 {
		if err := l.sweep(ctx); err != nil {
			return err
		}
	}
	if l.perAddress > 0 {
		ok, retry, err := l.take(ctx, "addr:"+addr, l.perAddress)
		if err != nil {
			return err
		}
		if !ok {
			return &rateLimitedError{httpjson.Errorf(http.StatusTooManyRequests, "rate_limited",
				"too many sign-ups from your network address; retry in %d s", seconds(retry)), retry}
		}
	}
	if l.perDomain > 0 {
		ok, retry, err := l.take(ctx, "domain:"+domain, l.perDomain)
		if err != nil {
			return err
		}
		if !ok {
			return &rateLimitedError{httpjson.Errorf(http.StatusTooManyRequests, "rate_limited",
				"too many sign-ups for addresses at %s; retry in %d s", domain, seconds(retry)), retry}
		}
	}
	return nil
}

// take is one round trip. The final SELECT reads the snapshot from before the
// UPSERT, so on refusal it sees the bucket that refused.
func (l *limiter) take(ctx context.Context, key string, limit int) (bool, time.Duration, error) {
	emission := l.window / time.Duration(limit)
	var ok bool
	var retryUS *float64
	err := l.pool.QueryRow(ctx, `
		WITH take AS (
			INSERT INTO rate_limits AS r (key, tat) VALUES ($1, now() + $2 * interval '1 microsecond')
			ON CONFLICT (key) DO UPDATE SET tat = greatest(r.tat, now()) + $2 * interval '1 microsecond'
			WHERE greatest(r.tat, now()) + $2 * interval '1 microsecond' <= now() + $3 * interval '1 microsecond'
			RETURNING 1
		)
		SELECT EXISTS (SELECT FROM take),
		       (SELECT extract(epoch FROM tat - now()) * 1e6 + $2 - $3 FROM rate_limits WHERE key = $1)::float8`,
		key, emission.Microseconds(), l.window.Microseconds()).Scan(&ok, &retryUS)
	if err != nil {
		return false, 0, fmt.Errorf("take from rate limit %s: %w", key, err)
	}
	if ok || retryUS == nil {
		return true, 0, nil
	}
	return false, time.Duration(*retryUS) * time.Microsecond, nil
}

// sweep deletes buckets that have run empty: they mean the same as no row.
func (l *limiter) sweep(ctx context.Context) error {
	if _, err := l.pool.Exec(ctx, `DELETE FROM rate_limits WHERE tat < now()`); err != nil {
		return fmt.Errorf("sweep rate limits: %w", err)
	}
	return nil
}

// seconds rounds a wait up to whole seconds, at least 1, as Retry-After says it.
func seconds(d time.Duration) int {
	return max(1, int(math.Ceil(d.Seconds())))
}

// clientAddress returns the key of the client's network address.
//
// Behind hops proxies that each append the address they received the
// connection from to X-Forwarded-For, the client's address is the entry hops
// from the end: everything left of it was written by the client and proves
// nothing. Cloud Run's front end appends (or sets) the address it saw, so
// hops is 1 there and the last entry is the only one a client cannot choose.
// With hops 0, or a header shorter than hops (not from our proxies), the
// peer of the connection counts.
//
// An IPv6 client is keyed by its /64, the block one subscriber usually holds.
func clientAddress(r *http.Request, hops int) string {
	addr := peerAddress(r.RemoteAddr)
	if hops > 0 {
		var entries []string
		for _, v := range r.Header.Values("X-Forwarded-For") {
			entries = append(entries, strings.Split(v, ",")...)
		}
		if len(entries) >= hops {
			addr = parseAddress(strings.TrimSpace(entries[len(entries)-hops]))
		}
	}
	if !addr.IsValid() {
		return "unknown"
	}
	addr = addr.Unmap().WithZone("")
	if addr.Is6() {
		return netip.PrefixFrom(addr, 64).Masked().String()
	}
	return addr.String()
}

func peerAddress(remote string) netip.Addr {
	if ap, err := netip.ParseAddrPort(remote); err == nil {
		return ap.Addr()
	}
	return parseAddress(remote)
}

// parseAddress reads an address with or without a port or brackets.
func parseAddress(s string) netip.Addr {
	if a, err := netip.ParseAddr(strings.Trim(s, "[]")); err == nil {
		return a
	}
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr()
	}
	return netip.Addr{}
}
