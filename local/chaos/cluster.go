package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/redis/rueidis"

	"github.com/outboxfn/outbox/shared/stream"
)

// pgBin is where Debian and Ubuntu install PostgreSQL 15's server programs.
// CHAOS_PG_BIN overrides it.
const pgBin = "/usr/lib/postgresql/15/bin"

// errMissing says a server program chaos needs is not installed; the test
// skips on it.
var errMissing = errors.New("not installed")

// freePort returns a TCP port nobody listens on at the moment, below the
// kernel's ephemeral range (32768 and up on Linux): a port from that range
// can be taken by any outgoing connection between now and the moment a
// process (re)binds it, and Redis and the functions rebind theirs after
// every restart.
func freePort() (int, error) {
	for range 200 {
		port := 20000 + rand.IntN(12000)
		// Every interface, as the functions listen (":PORT").
		ln, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
		if err != nil {
			continue
		}
		ln.Close()
		return port, nil
	}
	return 0, errors.New("find a free port: none free among 200 tried between 20000 and 32000")
}

// waitDial waits until addr accepts TCP connections.
func waitDial(ctx context.Context, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not accepting connections after %s: %w", addr, timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// postgres is a private PostgreSQL cluster in a temporary directory,
// listening on a free loopback port and a unix socket in that directory.
// It is never the shared server on 5432.
type postgres struct {
	bin     string
	data    string
	sockets string
	logFile string
	port    int
	// asPostgres runs the server programs through runuser as the postgres
	// user: initdb refuses to run as root.
	asPostgres bool
	mu         sync.Mutex // one pg_ctl at a time
}

// postgresBin is the directory of PostgreSQL's server programs.
func postgresBin() string {
	if v := os.Getenv("CHAOS_PG_BIN"); v != "" {
		return v
	}
	return pgBin
}

// checkInstalled reports, as errMissing, a server program chaos needs and
// cannot find, before anything is built or started.
func checkInstalled() error {
	if _, err := os.Stat(filepath.Join(postgresBin(), "initdb")); err != nil {
		return fmt.Errorf("PostgreSQL 15 (%s/initdb; CHAOS_PG_BIN names another directory): %w", postgresBin(), errMissing)
	}
	if _, err := exec.LookPath("redis-server"); err != nil {
		return fmt.Errorf("redis-server: %w", errMissing)
	}
	if os.Geteuid() == 0 {
		if _, err := exec.LookPath("runuser"); err != nil {
			return fmt.Errorf("running as root, initdb needs runuser (util-linux) to run as postgres: %w", errMissing)
		}
		if _, err := user.Lookup("postgres"); err != nil {
			return fmt.Errorf("running as root, PostgreSQL needs the postgres user: %w", errMissing)
		}
	}
	return nil
}

// startPostgres creates and starts a cluster under dir.
func startPostgres(ctx context.Context, dir string) (*postgres, error) {
	bin := postgresBin()
	if err := checkInstalled(); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	p := &postgres{bin: bin, data: filepath.Join(dir, "pgdata"), sockets: filepath.Join(dir, "pgsock"),
		logFile: filepath.Join(dir, "postgres.log"), port: port, asPostgres: os.Geteuid() == 0}
	for _, d := range []string{p.data, p.sockets} {
		if err := os.Mkdir(d, 0o700); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	if p.asPostgres {
		// The temporary directory is root's; postgres must reach into it and
		// own what the cluster writes.
		if _, err := exec.LookPath("runuser"); err != nil {
			return nil, fmt.Errorf("running as root, initdb needs runuser (util-linux) to run as postgres: %w", errMissing)
		}
		u, err := user.Lookup("postgres")
		if err != nil {
			return nil, fmt.Errorf("running as root, PostgreSQL needs the postgres user: %w", errMissing)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chmod(dir, 0o755); err != nil {
			return nil, fmt.Errorf("open %s to postgres: %w", dir, err)
		}
		for _, f := range []string{p.data, p.sockets} {
			if err := os.Chown(f, uid, gid); err != nil {
				return nil, fmt.Errorf("give %s to postgres: %w", f, err)
			}
		}
		lf, err := os.OpenFile(p.logFile, os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			return nil, fmt.Errorf("create %s: %w", p.logFile, err)
		}
		lf.Close()
		if err := os.Chown(p.logFile, uid, gid); err != nil {
			return nil, fmt.Errorf("give %s to postgres: %w", p.logFile, err)
		}
	}
	if out, err := p.run(ctx, "initdb", "-D", p.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"); err != nil {
		return nil, fmt.Errorf("initdb: %w\n%s", err, out)
	}
	if out, err := p.run(ctx, "pg_ctl", "start", "-D", p.data, "-w", "-t", "60", "-l", p.logFile, "-o", p.serverOptions()); err != nil {
		return nil, fmt.Errorf("pg_ctl start: %w\n%s", err, out)
	}
	return p, nil
}

// serverOptions are the postgres command-line options: the private port and
// socket directory, loopback only, and enough connections for every
// process of a scenario (createuser 8, relays 2 × 5, sendemail 2 × 8, the
// run's own few).
func (p *postgres) serverOptions() string {
	return fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c max_connections=100", p.port, p.sockets)
}

// run runs a PostgreSQL server program, as postgres when we are root.
func (p *postgres) run(ctx context.Context, prog string, args ...string) ([]byte, error) {
	path := filepath.Join(p.bin, prog)
	var cmd *exec.Cmd
	if p.asPostgres {
		cmd = exec.CommandContext(ctx, "runuser", append([]string{"-u", "postgres", "--", path}, args...)...)
	} else {
		cmd = exec.CommandContext(ctx, path, args...)
	}
	// pg_ctl's postmaster must not belong to our process group: a Ctrl-C in
	// the terminal is ours to handle (we stop the cluster ourselves).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Dir = "/"
	return cmd.CombinedOutput()
}

// Addr is the cluster's host:port.
func (p *postgres) Addr() string { return fmt.Sprintf("127.0.0.1:%d", p.port) }

// URL is the URL of database db on the cluster.
func (p *postgres) URL(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", p.port, db)
}

// RestartImmediate crashes the cluster (no checkpoint, every session cut,
// crash recovery at start) and starts it again, as a host failure would.
func (p *postgres) RestartImmediate(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if out, err := p.run(ctx, "pg_ctl", "restart", "-D", p.data, "-m", "immediate", "-w", "-t", "60", "-l", p.logFile, "-o", p.serverOptions()); err != nil {
		return fmt.Errorf("pg_ctl restart -m immediate: %w\n%s", err, out)
	}
	return nil
}

// Stop stops the cluster fast; its directory goes with the run's.
func (p *postgres) Stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	// Not the run's context: this runs on the way out after a Ctrl-C too.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, _ = p.run(ctx, "pg_ctl", "stop", "-D", p.data, "-m", "immediate", "-w", "-t", "20")
}

// redisServer is a private redis-server on a free loopback port, with its
// own directory, started and killed by the run. Unlike the test helper in
// shared/redistest it needs no testing.TB, and it can restart with or
// without what it had saved.
type redisServer struct {
	dir  string
	port int
	log  string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

// startRedis starts redis-server in dir/redis, without persistence.
func startRedis(ctx context.Context, dir string) (*redisServer, error) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		return nil, fmt.Errorf("redis-server: %w", errMissing)
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	r := &redisServer{dir: filepath.Join(dir, "redis"), port: port, log: filepath.Join(dir, "redis.log")}
	if err := os.Mkdir(r.dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", r.dir, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r, r.startLocked(ctx, false)
}

// URL is the server's redis:// URL.
func (r *redisServer) URL() string { return fmt.Sprintf("redis://127.0.0.1:%d/0", r.port) }

func (r *redisServer) startLocked(ctx context.Context, appendOnly bool) error {
	aof := "no"
	if appendOnly {
		aof = "yes"
	}
	// --save "": no background snapshots; what a restart finds on disk is
	// only what a fault put there on purpose (SAVE, the append-only file).
	r.cmd = exec.Command("redis-server", "--port", strconv.Itoa(r.port), "--bind", "127.0.0.1",
		"--dir", r.dir, "--save", "", "--appendonly", aof, "--appendfsync", "always",
		"--daemonize", "no", "--logfile", r.log)
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := r.cmd.Start(); err != nil {
		return fmt.Errorf("start redis-server: %w", err)
	}
	done := make(chan struct{})
	r.done = done
	go func(cmd *exec.Cmd) { _ = cmd.Wait(); close(done) }(r.cmd)
	return waitDial(ctx, fmt.Sprintf("127.0.0.1:%d", r.port), 10*time.Second)
}

// killLocked kills the server at once, as a crash would.
func (r *redisServer) killLocked() {
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Signal(syscall.SIGCONT)
	_ = r.cmd.Process.Kill()
	<-r.done
	r.cmd = nil
}

// persistence says what a restarted Redis comes back with.
type persistence int

const (
	// nothing: the files are removed, Redis starts empty (a server without
	// persistence, a Memorystore Basic Tier maintenance).
	nothing persistence = iota
	// snapshot: whatever the last SAVE wrote (a restore, a lagging
	// replica).
	snapshot
	// appendOnly: every write, from the append-only file.
	appendOnly
)

// Restart kills the server and starts it again after pause, coming back
// with what p says.
func (r *redisServer) Restart(ctx context.Context, p persistence, pause time.Duration) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.killLocked()
	if p == nothing {
		if err := r.wipeLocked(); err != nil {
			return err
		}
	}
	select {
	case <-ctx.Done():
	case <-time.After(pause):
	}
	return r.startLocked(context.WithoutCancel(ctx), p == appendOnly)
}

// Reset gives the next scenario an empty Redis without persistence.
func (r *redisServer) Reset(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.killLocked()
	if err := r.wipeLocked(); err != nil {
		return err
	}
	return r.startLocked(ctx, false)
}

func (r *redisServer) wipeLocked() error {
	entries, err := os.ReadDir(r.dir)
	if err != nil {
		return fmt.Errorf("read %s: %w", r.dir, err)
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(r.dir, e.Name())); err != nil {
			return fmt.Errorf("wipe redis dir: %w", err)
		}
	}
	return nil
}

// Pause freezes the server (SIGSTOP) for d, then lets it go on: a
// stalled host. Connections stay open and unanswered meanwhile.
func (r *redisServer) Pause(ctx context.Context, d time.Duration) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd == nil {
		return errors.New("redis-server is not running")
	}
	if err := r.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		return fmt.Errorf("SIGSTOP redis-server: %w", err)
	}
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
	return r.cmd.Process.Signal(syscall.SIGCONT)
}

// Stop kills the server for good.
func (r *redisServer) Stop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.killLocked()
}

// client opens a client of the private server for the run's own checks and
// faults.
func (r *redisServer) client() (rueidis.Client, error) {
	return stream.NewClient(r.URL(), false)
}
