package createuser

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/pg"
)

const pgBin = "/usr/lib/postgresql/15/bin"

// privatePostgres starts a PostgreSQL 15 of the test's own on a free port,
// with opts, and stops it when the test ends. It returns the URL and a
// function that runs pg_ctl with more arguments.
func privatePostgres(t *testing.T, settings ...string) (url string, pgctl func(args ...string)) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(pgBin, "initdb")); err != nil {
		t.Skip("PostgreSQL 15 is not installed")
	}
	dir, err := os.MkdirTemp("", "review-pg-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	data, sock, logf := filepath.Join(dir, "data"), filepath.Join(dir, "sock"), filepath.Join(dir, "log")
	require.NoError(t, os.Mkdir(data, 0o700))
	require.NoError(t, os.Mkdir(sock, 0o700))
	require.NoError(t, os.WriteFile(logf, nil, 0o644))
	asPostgres := os.Geteuid() == 0
	if asPostgres {
		u, err := user.Lookup("postgres")
		require.NoError(t, err)
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		require.NoError(t, os.Chmod(dir, 0o755))
		for _, f := range []string{data, sock, logf} {
			require.NoError(t, os.Chown(f, uid, gid))
		}
	}
	var ln net.Listener
	ln, err = net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	run := func(prog string, args ...string) {
		path := filepath.Join(pgBin, prog)
		cmd := exec.Command(path, args...)
		if asPostgres {
			cmd = exec.Command("runuser", append([]string{"-u", "postgres", "--", path}, args...)...)
		}
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		cmd.Dir = "/"
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s %v: %s", prog, args, out)
	}
	run("initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
	serverOpts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1", port, sock)
	pgctl = func(args ...string) {
		run("pg_ctl", append(append([]string{}, args...), "-D", data, "-w", "-t", "60", "-l", logf, "-o", serverOpts)...)
	}
	pgctl("start")
	t.Cleanup(func() { pgctl("stop", "-m", "immediate") })
	url = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
	_, err = pg.Migrate(context.Background(), url, logging.Discard())
	require.NoError(t, err)
	// Settings that would hold the migrations apply after them (the
	// private server only).
	for _, set := range settings {
		setSystem(t, url, set)
	}
	return url, pgctl
}

// PostgreSQL crashes (pg_ctl restart -m immediate) while a COMMIT waits for
// a synchronous standby: the commit record is on disk, so after recovery
// the user exists. The function cannot know it: its answer must say the
// user may exist, and the client's retry with the same key must, once the
// database is back, replay the 201: one user, one event.
func TestACommitCutByAPostgresCrashSaysTheUserMayExistAndItsRetryReplaysIt(t *testing.T) {
	b, url, pgctl := behindAGhostStandby(t) // the crash, not the commit's bound, ends the wait

	const body = `{"email":"crash@example.com","name":"Crash"}`
	done := make(chan response, 1)
	go func() { done <- b.post(t, body, "Idempotency-Key", "crash-1") }()
	time.Sleep(1500 * time.Millisecond) // the COMMIT is waiting for the ghost standby
	pgctl("restart", "-m", "immediate")
	first := <-done
	require.Equal(t, http.StatusServiceUnavailable, first.Status, first.Raw)
	assert.Contains(t, first.Raw, "may or may not exist", "COMMIT was on the wire")

	setSystem(t, url, "synchronous_standby_names = ''")
	conn, err := pgx.Connect(context.Background(), url)
	require.NoError(t, err)
	defer conn.Close(context.Background())

	var retry response
	for range 10 {
		if retry = b.post(t, body, "Idempotency-Key", "crash-1"); retry.Status != http.StatusServiceUnavailable {
			break
		}
		time.Sleep(300 * time.Millisecond) // the pool finds its dead connections
	}
	require.Equal(t, http.StatusCreated, retry.Status, retry.Raw)
	var users, events int
	require.NoError(t, conn.QueryRow(context.Background(),
		`SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM outbox)`).Scan(&users, &events))
	assert.Equal(t, [2]int{1, 1}, [2]int{users, events}, "one user, one event")
	assert.Equal(t, "true", retry.Header.Get("Idempotent-Replayed"), "the first COMMIT had reached the disk")
}

// setSystem runs ALTER SYSTEM SET set on the private server and reloads it.
func setSystem(t *testing.T, url, set string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, "ALTER SYSTEM SET "+set)
	require.NoError(t, err)
	_, err = conn.Exec(ctx, "SELECT pg_reload_conf()")
	require.NoError(t, err)
	time.Sleep(300 * time.Millisecond)
}

// behindAGhostStandby returns a createuser on a private PostgreSQL whose
// every COMMIT waits for a synchronous standby that does not exist, with a
// commit bound (10 s) longer than the tests wait; and the server's URL and
// pg_ctl.
func behindAGhostStandby(t *testing.T) (*testBundle, string, func(args ...string)) {
	t.Helper()
	url, pgctl := privatePostgres(t, "synchronous_standby_names = 'ghost'")
	svc, err := New(context.Background(), Config{Config: logging.Config{LogFormat: "text", LogLevel: "error"},
		DatabaseURL: url, DBMaxConns: 4, RequestTimeout: 2 * time.Second}, logging.New(os.Stderr, logging.Config{LogFormat: "text", LogLevel: "warn"}))
	require.NoError(t, err)
	t.Cleanup(svc.Close)
	svc.commitTimeout = 10 * time.Second
	return &testBundle{svc: svc}, url, pgctl
}
