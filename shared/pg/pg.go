// Package pg opens PostgreSQL connections the way every function needs them,
// applies the schema, and tells errors that mean "the database is not there"
// from errors that mean "this request is wrong".
package pg

import (
	"context"
	"errors"
	"fmt"
	"net"
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
}

// NewPool parses url and returns a pool that connects lazily, so that a
// function starts even while the database is down and recovers once it is up.
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
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("create pool: %w", err)
	}
	return pool, nil
}

// Connect opens one direct connection, for work a pooler cannot carry:
// LISTEN, and session-level advisory locks.
func Connect(ctx context.Context, url string, timeout time.Duration) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("parse database url: %w", err)
	}
	if timeout > 0 {
		cfg.ConnectTimeout = timeout
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	return conn, nil
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
