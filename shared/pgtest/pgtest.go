// Package pgtest gives each test its own PostgreSQL database, created from a
// template that is migrated once, so tests can run in parallel, commit,
// LISTEN and NOTIFY, and never see each other's rows.
//
// The server is DATABASE_URL's (default: the local one). The template is named
// after a hash of the migration files, so a changed schema gets a new one.
package pgtest

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/pg"
	"github.com/outboxfn/outbox/sql/migrations"
)

// DefaultURL is the server tests use when DATABASE_URL is unset.
const DefaultURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"

// AdminURL is the URL of the server's maintenance database that tests create
// their databases from.
func AdminURL() string {
	if u := os.Getenv("DATABASE_URL"); u != "" {
		return u
	}
	return DefaultURL
}

var template = sync.OnceValues(prepareTemplate)

// New creates a migrated database for t and returns its URL. The database is
// dropped when t ends.
func New(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	url, drop, err := Create(ctx, "outbox_test_"+randomHex(6))
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := drop(ctx); err != nil {
			t.Errorf("pgtest: %v", err)
		}
	})
	return url
}

// NewPool is New plus a pool on the new database, closed when t ends: what
// most tests need to look at the rows the code under test wrote.
func NewPool(t testing.TB) (string, *pgxpool.Pool) {
	t.Helper()
	url := New(t)
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatalf("pgtest: open pool: %v", err)
	}
	t.Cleanup(pool.Close)
	return url, pool
}

// Create makes a migrated database called name (dropping any old one of
// that name first) and returns its URL and a function that drops it. It is
// for benchmarks and tools; tests use New.
func Create(ctx context.Context, name string) (url string, drop func(context.Context) error, err error) {
	tmpl, err := template()
	if err != nil {
		return "", nil, err
	}
	conn, err := pgx.Connect(ctx, AdminURL())
	if err != nil {
		return "", nil, fmt.Errorf("connect to %s: %w (is PostgreSQL running? `make services` starts it)", redact(AdminURL()), err)
	}
	defer conn.Close(ctx)
	ident := pgx.Identifier{name}.Sanitize()
	if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+ident+" WITH (FORCE)"); err != nil {
		return "", nil, fmt.Errorf("drop old database %s: %w", name, err)
	}
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+ident+" TEMPLATE "+pgx.Identifier{tmpl}.Sanitize()); err != nil {
		return "", nil, fmt.Errorf("create database %s: %w", name, err)
	}
	drop = func(ctx context.Context) error {
		conn, err := pgx.Connect(ctx, AdminURL())
		if err != nil {
			return fmt.Errorf("connect to drop %s: %w", name, err)
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+ident+" WITH (FORCE)"); err != nil {
			return fmt.Errorf("drop database %s: %w", name, err)
		}
		return nil
	}
	return WithDatabase(AdminURL(), name), drop, nil
}

// WithDatabase returns u with its database replaced by name.
func WithDatabase(u, name string) string {
	parsed, err := url.Parse(u)
	if err != nil {
		return u
	}
	parsed.Path = "/" + name
	return parsed.String()
}

// WithOptions returns u with its options parameter (server settings for
// every session, such as "-c statement_timeout=300") set to options.
func WithOptions(u, options string) string {
	parsed, err := url.Parse(u)
	if err != nil {
		return u
	}
	q := parsed.Query()
	q.Set("options", options)
	// pgx decodes %20 but not "+" as a space.
	parsed.RawQuery = strings.ReplaceAll(q.Encode(), "+", "%20")
	return parsed.String()
}

// prepareTemplate makes sure a migrated template for the current migrations
// exists. Test binaries of several packages run at once, so creation is
// serialised by an advisory lock and published by a rename: a template is
// either complete or not there.
func prepareTemplate() (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	hash, err := migrationsHash()
	if err != nil {
		return "", err
	}
	name := "outbox_tmpl_" + hash
	conn, err := pgx.Connect(ctx, AdminURL())
	if err != nil {
		return "", fmt.Errorf("connect to %s: %w (is PostgreSQL running? `make services` starts it)", redact(AdminURL()), err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock(hashtext('outbox.pgtest'))"); err != nil {
		return "", fmt.Errorf("lock template creation: %w", err)
	}
	defer conn.Exec(context.WithoutCancel(ctx), "SELECT pg_advisory_unlock(hashtext('outbox.pgtest'))") //nolint:errcheck // closing the connection releases it too

	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).Scan(&exists); err != nil {
		return "", fmt.Errorf("look for template: %w", err)
	}
	if exists {
		return name, nil
	}
	building := name + "_building"
	if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{building}.Sanitize()+" WITH (FORCE)"); err != nil {
		return "", fmt.Errorf("drop half-built template: %w", err)
	}
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{building}.Sanitize()); err != nil {
		return "", fmt.Errorf("create template: %w", err)
	}
	if _, err := pg.Migrate(ctx, WithDatabase(AdminURL(), building), logging.Discard()); err != nil {
		return "", fmt.Errorf("migrate template: %w", err)
	}
	if _, err := conn.Exec(ctx, "ALTER DATABASE "+pgx.Identifier{building}.Sanitize()+" RENAME TO "+pgx.Identifier{name}.Sanitize()); err != nil {
		return "", fmt.Errorf("publish template: %w", err)
	}
	return name, nil
}

func migrationsHash() (string, error) {
	h := sha256.New()
	err := fs.WalkDir(migrations.FS, ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fs.ReadFile(migrations.FS, path)
		if err != nil {
			return err
		}
		fmt.Fprintf(h, "%s\x00%d\x00", path, len(b))
		h.Write(b)
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("hash migrations: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil))[:12], nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func redact(u string) string {
	parsed, err := url.Parse(u)
	if err != nil {
		return "the database URL"
	}
	return parsed.Redacted()
}
