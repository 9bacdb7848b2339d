// Package pg opens PostgreSQL connections the way every function needs them,
// applies the schema, and tells errors that mean "the database is not there"
// from errors that mean "this request is wrong".
package pg

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// PoolConfig is how a function sizes and bounds its pool.
type PoolConfig struct {
	// MaxConns caps the pool; zero means pgxpool's default (4 or the CPU count).
	MaxConns int32
	// ConnectTimeout bounds one connection attempt; zero means 5 s.
	ConnectTimeout time.Duration
	// Direct says that the URL reaches PostgreSQL itself, not a pooler such
	// as PgBouncer, which refuses startup parameters it does not track. Only
	// then does the server get its side of the TCP keepalive, so that it
	// ends the session of a client that vanished.
	Direct bool
	// IdleInTransactionTimeout, when positive, sets
	// idle_in_transaction_session_timeout: the server ends a session that
	// sat this long in an open transaction, releasing its locks, even if
	// the client is still (or seems) connected.
	IdleInTransactionTimeout time.Duration
	// ClientCheckInterval, when positive, sets client_connection_check_interval
	// (PostgreSQL 14 or later): while a statement runs, such as a wait for a
	// lock, the server checks this often whether the client has gone and, if
	// it has, cancels the statement rather than finish it for nobody.
	ClientCheckInterval time.Duration
}

// keepalive is the TCP keepalive of every connection this package opens: a
// peer that stops answering is declared dead after Idle + Count×Interval
// (10 s + 3×5 s = 25 s) of silence, against over two hours with Linux's
// defaults and two and a half minutes with Go's.
//
// The client side is set on the socket; with Direct (and always in
// Connect) the same numbers go to the server as tcp_keepalives_idle,
// tcp_keepalives_interval and tcp_keepalives_count, and tcp_user_timeout
// is set to their sum: keepalive probes are only sent while nothing is
// unacknowledged, so a server writing to a vanished client (a NOTIFY, a
// batch of rows) would otherwise retransmit for about 15 minutes.
//
// Neither side helps over a unix socket (Cloud Run's /cloudsql), nor
// against a peer whose kernel still answers while its process is stuck;
// statement deadlines and the server's idle timeouts cover those.
var keepalive = net.KeepAliveConfig{Enable: true, Idle: 10 * time.Second, Interval: 5 * time.Second, Count: 3}

// NewPool parses url and returns a pool that connects lazily, so that a
// function starts even while the database is down and recovers once it is up.
//
// Settings in url (as parameters, or as -c options) win over pc's.
func NewPool(ctx context.Context, url string, pc PoolConfig) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("parse database url: %w", err)
	}
	if pc.MaxConns > 0 {
		cfg.MaxConns = pc.MaxConns
	}
	cfg.ConnConfig.ConnectTimeout = pc.ConnectTimeout
	if cfg.ConnConfig.ConnectTimeout == 0 {
		cfg.ConnConfig.ConnectTimeout = 5 * time.Second
	}
	configure(cfg.ConnConfig, pc)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("create pool: %w", err)
	}
	return pool, nil
}

// Connect opens one direct connection, for work a pooler cannot carry:
// LISTEN, and session-level advisory locks. It gets the keepalives of a
// Direct pool.
func Connect(ctx context.Context, url string, timeout time.Duration) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("parse database url: %w", err)
	}
	if timeout > 0 {
		cfg.ConnectTimeout = timeout
	}
	configure(cfg, PoolConfig{Direct: true})
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	return conn, nil
}

// configure gives cfg the client keepalive and the server settings pc asks
// for, leaving alone any the URL set.
func configure(cfg *pgx.ConnConfig, pc PoolConfig) {
	// pgconn bounds the whole connection attempt by ConnectTimeout with a
	// context, so the dialer needs no timeout of its own.
	dialer := &net.Dialer{KeepAliveConfig: keepalive}
	cfg.DialFunc = dialer.DialContext

	set := func(name string, value int64) {
		if value <= 0 {
			return
		}
		if _, ok := cfg.RuntimeParams[name]; ok || inOptions(cfg.RuntimeParams["options"], name) {
			return
		}
		cfg.RuntimeParams[name] = strconv.FormatInt(value, 10)
	}
	if pc.Direct {
		set("tcp_keepalives_idle", int64(keepalive.Idle/time.Second))
		set("tcp_keepalives_interval", int64(keepalive.Interval/time.Second))
		set("tcp_keepalives_count", int64(keepalive.Count))
		set("tcp_user_timeout", (keepalive.Idle + time.Duration(keepalive.Count)*keepalive.Interval).Milliseconds())
	}
	set("idle_in_transaction_session_timeout", pc.IdleInTransactionTimeout.Milliseconds())
	set("client_connection_check_interval", pc.ClientCheckInterval.Milliseconds())
}

// inOptions reports whether options, the value of the options startup
// parameter, sets the server setting name, as "-c name=value", "-cname=value"
// or "--name=value" (the server reads dashes in a name as underscores).
//
// The server applies options before the other startup parameters, so a
// default sent as a parameter would override it.
func inOptions(options, name string) bool {
	fields := strings.Fields(options)
	for i := 0; i < len(fields); i++ {
		f := fields[i]
		switch {
		case f == "-c" && i+1 < len(fields):
			i++
			f = fields[i]
		case strings.HasPrefix(f, "--"):
			f = f[2:]
		case strings.HasPrefix(f, "-c"):
			f = f[2:]
		default:
			continue
		}
		key, _, _ := strings.Cut(f, "=")
		if strings.EqualFold(strings.ReplaceAll(key, "-", "_"), name) {
			return true
		}
	}
	return false
}

// IsUnavailable reports whether err means the database could not be reached,
// went away, timed out or refused work for now: conditions in which the same
// request may succeed later, so callers answer 503 instead of 500.
func IsUnavailable(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var connectErr *pgconn.ConnectError
	if errors.As(err, &connectErr) {
		return true
	}
	var netErr net.Error
	if errors.As(err, &netErr) {
		return true
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code[:2] {
		case "08", // connection exception
			"53", // insufficient resources
			"57": // operator intervention: shutdown, cannot connect now, query canceled
			return true
		}
		switch pgErr.Code {
		case "40001", "40P01": // serialization failure, deadlock: retry
			return true
		}
		return false
	}
	// Errors raised by pgconn when the connection broke mid-flight.
	return pgconn.SafeToRetry(err) || pgconn.Timeout(err)
}

// IsUniqueViolation reports whether err is a unique_violation on constraint
// (any constraint when constraint is empty).
func IsUniqueViolation(err error, constraint string) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "23505" {
		return false
	}
	return constraint == "" || pgErr.ConstraintName == constraint
}
