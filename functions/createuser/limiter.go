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

// bucket is one limit a request must pass.
type bucket struct {
	key   string
	limit int
	what  string // names the limit in a refusal
}

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
	var buckets []bucket
	if l.perAddress > 0 {
		buckets = append(buckets, bucket{"addr:" + addr, l.perAddress, "from your network address"})
	}
	if l.perDomain > 0 {
		buckets = append(buckets, bucket{"domain:" + domain, l.perDomain, "for addresses at " + domain})
	}
	refused, retry, err := l.take(ctx, buckets)
	if err != nil || refused < 0 {
		return err
	}
	return &rateLimitedError{httpjson.Errorf(http.StatusTooManyRequests, "rate_limited",
		"too many sign-ups %s; retry in %d s", buckets[refused].what, seconds(retry)), retry}
}

// take takes one request from each bucket in order, in one statement and
// one round trip, each only if every bucket before it allowed the request.
// It returns the index of the bucket that refused, or -1, and how long
// until that bucket allows a request. The final SELECT reads the snapshot
// from before the UPSERTs, so it sees the bucket that refused as it was.
func (l *limiter) take(ctx context.Context, buckets []bucket) (int, time.Duration, error) {
	if len(buckets) == 0 {
		return -1, 0, nil
	}
	var sql strings.Builder
	args := []any{l.window.Microseconds()}
	var results []string
	for i, b := range buckets {
		args = append(args, b.key, (l.window / time.Duration(b.limit)).Microseconds())
		k, e := len(args)-1, len(args) // placeholders of this bucket's key and emission interval
		source := fmt.Sprintf("VALUES ($%d, now() + $%d * interval '1 microsecond')", k, e)
		if i > 0 {
			source = fmt.Sprintf("SELECT $%d, now() + $%d * interval '1 microsecond' FROM take%d", k, e, i-1)
		}
		sep := "WITH"
		if i > 0 {
			sep = ","
		}
		fmt.Fprintf(&sql, `%s take%d AS (
			INSERT INTO rate_limits AS r (key, tat) %s
			ON CONFLICT (key) DO UPDATE SET tat = greatest(r.tat, now()) + $%d * interval '1 microsecond'
			WHERE greatest(r.tat, now()) + $%d * interval '1 microsecond' <= now() + $1 * interval '1 microsecond'
			RETURNING 1
		)
		`, sep, i, source, e, e)
		results = append(results, fmt.Sprintf("EXISTS (SELECT FROM take%d)", i),
			fmt.Sprintf("(SELECT extract(epoch FROM tat - now()) * 1e6 + $%d - $1 FROM rate_limits WHERE key = $%d)::float8", e, k))
	}
	sql.WriteString("SELECT " + strings.Join(results, ", "))

	ok := make([]bool, len(buckets))
	retryUS := make([]*float64, len(buckets))
	dest := make([]any, 0, 2*len(buckets))
	for i := range buckets {
		dest = append(dest, &ok[i], &retryUS[i])
	}
	if err := l.pool.QueryRow(ctx, sql.String(), args...).Scan(dest...); err != nil {
		return 0, 0, fmt.Errorf("take from rate limits: %w", err)
	}
	for i := range buckets {
		if !ok[i] {
			var retry time.Duration
			if retryUS[i] != nil {
				retry = time.Duration(*retryUS[i]) * time.Microsecond
			}
			return i, retry, nil
		}
	}
	return -1, 0, nil
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
