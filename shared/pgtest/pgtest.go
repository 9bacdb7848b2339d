// Package pgtest gives each test its own PostgreSQL database, created from a
// template that is migrated once, so tests can run in parallel, commit,
// LISTEN and NOTIFY, and never see each other's rows.
//
// It is a thin layer over github.com/peterldowns/pgtestdb, which keeps one
// template per schema (named after a hash of sql/migrations) and serialises
// its creation across concurrently running test binaries. This package adds
// the server from DATABASE_URL, our own migration code, and dropping every
// database at the end, even a failed test's with connections left open.
package pgtest

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" database/sql driver pgtestdb connects with
	"github.com/peterldowns/pgtestdb"

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

// New creates a migrated database for t and returns its URL. The database is
// dropped when t ends.
func New(t testing.TB) string {
	t.Helper()
	conf, err := config()
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	name := pgtestdb.Custom(hintTB{t}, conf, migrator{}).Database
	// Cleanups run last-registered first, so this drop comes before
	// pgtestdb's, which would keep a failed test's database and cannot drop
	// one the test left connections open to.
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := dropDatabase(ctx, name); err != nil {
			t.Errorf("pgtest: %v", err)
		}
	})
	return WithDatabase(AdminURL(), name)
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
	conf, err := config()
	if err != nil {
		return "", nil, err
	}
	// pgtestdb reports through a testing.TB; without a test, its failures
	// come back here as a panic.
	tb := &toolTB{}
	defer func() {
		if r := recover(); r != nil {
			f, ok := r.(fatal)
			if !ok {
				panic(r)
			}
			err = f.err
		}
	}()
	clone := pgtestdb.Custom(tb, conf, migrator{}).Database

	conn, err := pgx.Connect(ctx, AdminURL())
	if err != nil {
		tb.cleanup()
		return "", nil, fmt.Errorf("connect to %s: %w", redact(AdminURL()), err)
	}
	defer conn.Close(ctx)
	if err := dropOn(ctx, conn, name); err != nil {
		tb.cleanup()
		return "", nil, fmt.Errorf("drop old database: %w", err)
	}
	// Nobody is connected to the clone yet (Custom opens its *sql.DB
	// lazily and closes it), so it can be renamed.
	if _, err := conn.Exec(ctx, "ALTER DATABASE "+pgx.Identifier{clone}.Sanitize()+" RENAME TO "+pgx.Identifier{name}.Sanitize()); err != nil {
		tb.cleanup()
		return "", nil, fmt.Errorf("rename %s to %s: %w", clone, name, err)
	}
	drop = func(ctx context.Context) error {
		defer tb.cleanup()
		return dropDatabase(ctx, name)
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

// config is pgtestdb's view of AdminURL. Tests connect as the admin user,
// not as a role pgtestdb would create, so that they need no privilege beyond
// what DATABASE_URL has and behave as they did before pgtestdb.
func config() (pgtestdb.Config, error) {
	u, err := url.Parse(AdminURL())
	if err != nil || u.Scheme == "" {
		return pgtestdb.Config{}, errors.New("pgtest: DATABASE_URL must be a postgres:// URL")
	}
	port := u.Port()
	if port == "" {
		port = "5432"
	}
	password, _ := u.User.Password()
	// pgtestdb pastes these into a URL without escaping them.
	escaped := strings.TrimPrefix(url.UserPassword("", password).String(), ":")
	return pgtestdb.Config{
		DriverName: "pgx",
		Host:       u.Hostname(),
		Port:       port,
		User:       u.User.Username(),
		Password:   escaped,
		Database:   strings.TrimPrefix(u.Path, "/"),
		Options:    u.RawQuery,
		TestRole: &pgtestdb.Role{
			Username: u.User.Username(),
			Password: escaped,
		},
	}, nil
}

// migrator builds templates with the code that migrates production, so
// tests run against exactly the schema it makes.
type migrator struct{}

// Hash names the template after the migration files.
func (migrator) Hash() (string, error) { return migrationsHash() }

// Migrate applies sql/migrations to the new, empty template.
func (migrator) Migrate(ctx context.Context, _ *sql.DB, conf pgtestdb.Config) error {
	if _, err := pg.Migrate(ctx, WithDatabase(AdminURL(), conf.Database), logging.Discard()); err != nil {
		return fmt.Errorf("migrate template: %w", err)
	}
	return nil
}

// hintTB prefixes pgtestdb's failures with the package and the server, and
// says how to start the local one: it is the usual cause.
type hintTB struct{ testing.TB }

func (tb hintTB) Fatalf(format string, args ...any) {
	tb.TB.Helper()
	tb.TB.Fatalf("pgtest: %s (server %s; `make services` starts the local one)", fmt.Sprintf(format, args...), redact(AdminURL()))
}

// Logf drops pgtestdb's "testdbconf: <url>" line: the URL would carry
// DATABASE_URL's password into every verbose test log.
func (tb hintTB) Logf(format string, args ...any) {
	if strings.HasPrefix(format, "testdbconf") {
		return
	}
	tb.TB.Helper()
	tb.TB.Logf(format, args...)
}

// toolTB is the testing.TB pgtestdb needs, for Create, which has no test.
type toolTB struct {
	cleanups []func()
}

// fatal carries a pgtestdb failure from toolTB.Fatalf to Create.
type fatal struct{ err error }

func (*toolTB) Helper()              {}
func (*toolTB) Logf(string, ...any)  {}
func (*toolTB) Failed() bool         { return false }
func (tb *toolTB) Cleanup(fn func()) { tb.cleanups = append(tb.cleanups, fn) }

// Fatalf must not return: pgtestdb carries on with nil values after it.
func (*toolTB) Fatalf(format string, args ...any) {
	panic(fatal{fmt.Errorf("pgtest: %s (server %s)", fmt.Sprintf(format, args...), redact(AdminURL()))})
}

// cleanup runs pgtestdb's cleanups; after a rename they find nothing to
// drop, but they close what pgtestdb opened.
func (tb *toolTB) cleanup() {
	defer func() { _ = recover() }() // a failure here leaves a database behind, nothing worse
	for i := len(tb.cleanups) - 1; i >= 0; i-- {
		tb.cleanups[i]()
	}
	tb.cleanups = nil
}

func dropDatabase(ctx context.Context, name string) error {
	conn, err := pgx.Connect(ctx, AdminURL())
	if err != nil {
		return fmt.Errorf("connect to drop %s: %w", name, err)
	}
	defer conn.Close(ctx)
	return dropOn(ctx, conn, name)
}

// dropOn drops name even if connections to it are open: a test that leaked
// one has failed already, and its database must not outlive it.
func dropOn(ctx context.Context, conn *pgx.Conn, name string) error {
	if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
		return fmt.Errorf("drop database %s: %w", name, err)
	}
	return nil
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

func redact(u string) string {
	parsed, err := url.Parse(u)
	if err != nil {
		return "the database URL"
	}
	return parsed.Redacted()
}

// EncodeRetainedSQL is an aggregate over rows of outbox_relayed_rows that
// encodes them, in id order, as the relay encodes a batch for
// outbox_retained.data (migration 00015), with PostgreSQL's own send
// functions: tests check the Go decoder against it, and turn retained rows
// into batches with it.
const EncodeRetainedSQL = `string_agg(
  int2send(9::int2) || int4send(8) || int8send(id) || int4send(16) || uuid_send(event_id)
  || int4send(octet_length(convert_to(aggregate_type, 'UTF8'))) || convert_to(aggregate_type, 'UTF8')
  || int4send(octet_length(convert_to(aggregate_id, 'UTF8'))) || convert_to(aggregate_id, 'UTF8')
  || int4send(octet_length(convert_to(event_type, 'UTF8'))) || convert_to(event_type, 'UTF8')
  || int4send(octet_length(convert_to(payload::text, 'UTF8'))) || convert_to(payload::text, 'UTF8')
  || coalesce(int4send(octet_length(convert_to(traceparent, 'UTF8'))) || convert_to(traceparent, 'UTF8'), int4send(-1))
  || int4send(8) || timestamptz_send(created_at)
  || coalesce(int4send(octet_length(convert_to(tracestate, 'UTF8'))) || convert_to(tracestate, 'UTF8'), int4send(-1)),
  '' ORDER BY id)`
