package pgtest_test

import (
	"context"
	"io/fs"
	"net/url"
	"path"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/outboxfn/outbox/shared/pgtest"
	"github.com/outboxfn/outbox/sql/migrations"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// latestMigration is the version goose records last: the number that
// starts the name of the newest file in sql/migrations.
func latestMigration(t *testing.T) int64 {
	t.Helper()
	names, err := fs.Glob(migrations.FS, "*.sql")
	require.NoError(t, err)
	require.NotEmpty(t, names)
	var latest int64
	for _, name := range names {
		v, err := strconv.ParseInt(strings.SplitN(path.Base(name), "_", 2)[0], 10, 64)
		require.NoError(t, err)
		latest = max(latest, v)
	}
	return latest
}

func databaseName(t *testing.T, u string) string {
	t.Helper()
	parsed, err := url.Parse(u)
	require.NoError(t, err)
	return strings.TrimPrefix(parsed.Path, "/")
}

func databaseExists(t *testing.T, name string) bool {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, pgtest.AdminURL())
	require.NoError(t, err)
	defer conn.Close(ctx)
	var exists bool
	require.NoError(t, conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).Scan(&exists))
	return exists
}

func TestNewGivesEachTestAPrivateMigratedDatabase(t *testing.T) {
	latest := latestMigration(t)
	var names []string
	for i := range 2 {
		t.Run("database "+strconv.Itoa(i), func(t *testing.T) {
			u, pool := pgtest.NewPool(t)
			var version int64
			require.NoError(t, pool.QueryRow(context.Background(),
				"SELECT max(version_id) FROM goose_db_version WHERE is_applied").Scan(&version))
			require.Equal(t, latest, version, "the database is migrated to the newest file")
			var current string
			require.NoError(t, pool.QueryRow(context.Background(), "SELECT current_database()").Scan(&current))
			require.Equal(t, databaseName(t, u), current, "the URL names the database the pool is on")
			_, err := pool.Exec(context.Background(), "CREATE TABLE only_here (id int)")
			require.NoError(t, err, "a table made in one test's database is not in another's")
			names = append(names, current)
		})
	}
	require.Len(t, names, 2)
	require.NotEqual(t, names[0], names[1])
	for _, name := range names {
		require.False(t, databaseExists(t, name), "database %s is dropped when its test ends", name)
	}
}

// endingTB lets a test end another test's life early: its cleanups run when
// end is called, and it can claim to have failed.
type endingTB struct {
	testing.TB
	failed   bool
	cleanups []func()
}

func (e *endingTB) Failed() bool      { return e.failed || e.TB.Failed() }
func (e *endingTB) Cleanup(fn func()) { e.cleanups = append(e.cleanups, fn) }

func (e *endingTB) end() {
	for i := len(e.cleanups) - 1; i >= 0; i-- {
		e.cleanups[i]()
	}
	e.cleanups = nil
}

func TestNewDropsTheDatabaseOfAFailedTestWithConnectionsLeftOpen(t *testing.T) {
	ctx := context.Background()
	// pgtestdb keeps a failed test's database by default; on a shared server
	// they would pile up.
	tb := &endingTB{TB: t, failed: true}
	u := pgtest.New(tb)
	leaked, err := pgx.Connect(ctx, u)
	require.NoError(t, err)
	defer leaked.Close(ctx)
	tb.end()
	require.False(t, databaseExists(t, databaseName(t, u)))
}

func TestCreateReplacesADatabaseOfTheSameNameAndDropRemovesIt(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	name := "outbox_pgtest_create_" + strconv.FormatInt(time.Now().UnixNano(), 36)
	u, _, err := pgtest.Create(ctx, name) // the next Create replaces it
	require.NoError(t, err)
	require.Equal(t, name, databaseName(t, u))
	conn, err := pgx.Connect(ctx, u)
	require.NoError(t, err)
	_, err = conn.Exec(ctx, "CREATE TABLE old_run (id int)")
	require.NoError(t, err)
	conn.Close(ctx)

	u, drop, err := pgtest.Create(ctx, name)
	require.NoError(t, err)
	conn, err = pgx.Connect(ctx, u)
	require.NoError(t, err)
	var oldRun *string
	require.NoError(t, conn.QueryRow(ctx, "SELECT to_regclass('old_run')::text").Scan(&oldRun))
	require.Nil(t, oldRun, "the second Create starts from the template again")
	var users *string
	require.NoError(t, conn.QueryRow(ctx, "SELECT to_regclass('users')::text").Scan(&users))
	require.NotNil(t, users, "the database is migrated")

	require.NoError(t, drop(ctx), "drop works with a connection still open")
	conn.Close(ctx)
	require.False(t, databaseExists(t, name))
}

func TestWithDatabaseAndWithOptionsKeepTheRestOfTheURL(t *testing.T) {
	base := "postgres://u:p@h:5432/postgres?sslmode=disable"
	require.Equal(t, "postgres://u:p@h:5432/other?sslmode=disable", pgtest.WithDatabase(base, "other"))
	got := pgtest.WithOptions(base, "-c statement_timeout=300")
	require.Equal(t, "postgres://u:p@h:5432/postgres?options=-c%20statement_timeout%3D300&sslmode=disable", got)
	cfg, err := pgx.ParseConfig(got)
	require.NoError(t, err)
	require.Equal(t, "-c statement_timeout=300", cfg.RuntimeParams["options"], "pgx reads %20 as a space")
}

// BenchmarkNew measures what every test pays for its database: clone the
// template, then drop the clone.
func BenchmarkNew(b *testing.B) {
	pgtest.New(b) // build or find the template outside the timing
	b.ResetTimer()
	tb := &endingTB{TB: b}
	for range b.N {
		pgtest.New(tb)
		tb.end()
	}
}
