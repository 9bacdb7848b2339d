// Command services makes sure PostgreSQL and Redis answer before `make run`
// or `make test` go on. It uses DATABASE_URL and REDIS_URL when they are set;
// otherwise it checks the local defaults, starts a local server that is
// installed but stopped, and, when it cannot, says exactly what to do.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/rueidis"

	"github.com/outboxfn/outbox/shared/stream"
)

const (
	defaultDatabaseURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	defaultRedisURL    = "redis://127.0.0.1:6379/0"
)

func main() {
	ctx := context.Background()
	ok := ensure(ctx, "PostgreSQL", "DATABASE_URL", defaultDatabaseURL, pingPostgres, startPostgres, postgresHelp) &&
		ensure(ctx, "Redis", "REDIS_URL", defaultRedisURL, pingRedis, startRedis, redisHelp)
	if !ok {
		os.Exit(1)
	}
}

func ensure(ctx context.Context, what, env, def string,
	ping func(context.Context, string) error, start func(context.Context) error, help string,
) bool {
	url, fromEnv := os.LookupEnv(env)
	if !fromEnv || url == "" {
		url = def
	}
	err := ping(ctx, url)
	if err == nil {
		fmt.Printf("%s: ok (%s)\n", what, redact(url))
		return true
	}
	if fromEnv {
		fmt.Fprintf(os.Stderr, "%s at %s=%s does not answer: %v\n"+
			"Start that server, fix %s, or unset it to use the local default %s.\n", what, env, redact(url), err, env, def)
		return false
	}
	fmt.Printf("%s: not answering at %s (%v); trying to start it\n", what, def, err)
	if startErr := start(ctx); startErr != nil {
		fmt.Fprintf(os.Stderr, "%s could not be started: %v\n%s", what, startErr, help)
		return false
	}
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if err = ping(ctx, url); err == nil {
			fmt.Printf("%s: started and ok\n", what)
			return true
		}
		time.Sleep(250 * time.Millisecond)
	}
	fmt.Fprintf(os.Stderr, "%s was started but still does not answer at %s: %v\n%s", what, def, err, help)
	return false
}

func pingPostgres(ctx context.Context, url string) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	return conn.Ping(ctx)
}

func pingRedis(ctx context.Context, url string) error {
	opt, err := stream.ParseURL(url)
	if err != nil {
		return err
	}
	opt.DisableCache = true
	opt.Dialer.Timeout = 2 * time.Second
	client, err := rueidis.NewClient(opt)
	if err != nil {
		return err
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	return client.Do(ctx, client.B().Ping().Build()).Error()
}

// startPostgres starts a Debian/Ubuntu cluster or a Homebrew service.
func startPostgres(ctx context.Context) error {
	if _, err := exec.LookPath("pg_ctlcluster"); err == nil {
		versions, _ := filepath.Glob("/etc/postgresql/*/main")
		sort.Strings(versions)
		if len(versions) == 0 {
			return errors.New("pg_ctlcluster is installed but no cluster exists under /etc/postgresql")
		}
		version := filepath.Base(filepath.Dir(versions[len(versions)-1]))
		return run(ctx, "pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start")
	}
	if _, err := exec.LookPath("brew"); err == nil {
		return run(ctx, "brew", "services", "start", "postgresql")
	}
	return errors.New("no PostgreSQL installation found")
}

func startRedis(ctx context.Context) error {
	if _, err := exec.LookPath("redis-server"); err != nil {
		return errors.New("redis-server is not installed")
	}
	return run(ctx, "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379", "--save", "", "--appendonly", "no")
}

func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

const postgresHelp = `To get PostgreSQL, do one of:
  - Debian/Ubuntu: sudo apt-get install -y postgresql, then allow the local user "postgres"
    without a password over TCP (trust for 127.0.0.1 in pg_hba.conf), or set DATABASE_URL
    with a password: DATABASE_URL=postgres://postgres:PASSWORD@127.0.0.1:5432/postgres?sslmode=disable
  - macOS: brew install postgresql@15 && brew services start postgresql@15
  - Docker: docker compose -f local/compose.yaml up -d
  - Elsewhere: point DATABASE_URL at a PostgreSQL 13+ server you can create databases on.
Then run the make target again.
`

const redisHelp = `To get Redis (6.2 or later), do one of:
  - Debian/Ubuntu: sudo apt-get install -y redis-server
  - macOS: brew install redis && brew services start redis
  - Docker: docker compose -f local/compose.yaml up -d
  - Elsewhere: point REDIS_URL at a Redis server, e.g. REDIS_URL=redis://host:6379/0
Then run the make target again.
`

func redact(u string) string {
	if i := strings.Index(u, "@"); i > 0 {
		if j := strings.Index(u, "://"); j > 0 && j < i {
			if k := strings.Index(u[j+3:i], ":"); k >= 0 {
				return u[:j+3+k] + ":xxxxx" + u[i:]
			}
		}
	}
	return u
}
