package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// functionNames are the three functions, each built once into its own
// binary from functions/<name>/cmd/<name>.
var functionNames = []string{"createuser", "relay", "sendemail"}

// buildFunctions compiles the three function binaries into dir and returns
// their paths by name. It runs in the module root, which it finds from the
// working directory (go run and go test both run inside the module).
func buildFunctions(ctx context.Context, dir string) (map[string]string, error) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		return nil, fmt.Errorf("the go command is needed to build the functions: %w", err)
	}
	root, err := moduleRoot()
	if err != nil {
		return nil, err
	}
	bins := make(map[string]string, len(functionNames))
	args := []string{"build", "-o", dir + string(os.PathSeparator)}
	for _, name := range functionNames {
		args = append(args, "./functions/"+name+"/cmd/"+name)
		bins[name] = filepath.Join(dir, name)
	}
	cmd := exec.CommandContext(ctx, goTool, args...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("go build the functions: %w\n%s", err, out)
	}
	return bins, nil
}

// moduleRoot is the nearest directory upwards holding go.mod.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("working directory: %w", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("run chaos inside the module (no go.mod above the working directory)")
		}
		dir = parent
	}
}

// proc is one function process of a scenario. It is supervised: an exit
// nobody asked for is recorded as a crash and the process is started
// again after a second, as Cloud Run would.
type proc struct {
	name string // createuser, relay-1, sendemail-2, …
	kind string // createuser, relay or sendemail
	// consumer is a sendemail's SENDEMAIL_CONSUMER.
	consumer string
	bin      string
	env      []string
	port     atomic.Int32 // PORT; changed when another program took it
	logPath  string
	// shutdownTimeout is the SHUTDOWN_TIMEOUT the process runs with: after
	// a SIGTERM it must be gone within it (and a little).
	shutdownTimeout time.Duration

	mu       sync.Mutex // held while the process is being stopped or started
	cmd      *exec.Cmd
	done     chan struct{}
	expected bool // the exit under way was asked for
	stopped  bool // stopped for good (end of the scenario)
	logFile  *os.File

	evMu   sync.Mutex
	starts int
	events []string // crashes, hangs, unclean exits: what went wrong
}

// start starts the process; the caller holds p.mu.
func (p *proc) startLocked() error {
	if p.logFile == nil {
		f, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return fmt.Errorf("open %s: %w", p.logPath, err)
		}
		p.logFile = f
	}
	cmd := exec.Command(p.bin)
	cmd.Env = append(slices.Clone(p.env), "PORT="+strconv.Itoa(int(p.port.Load())))
	cmd.Stdout = p.logFile
	cmd.Stderr = p.logFile
	// Its own process group, so that a Ctrl-C in the terminal reaches only
	// chaos, which stops everything in order; killed with chaos if chaos
	// dies outright.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", p.name, err)
	}
	p.evMu.Lock()
	p.starts++
	p.evMu.Unlock()
	p.cmd, p.expected = cmd, false
	done := make(chan struct{})
	p.done = done
	go p.supervise(cmd, done)
	return nil
}

// supervise waits for the process to end; an exit nobody asked for is a
// crash, recorded, and the process is started again.
func (p *proc) supervise(cmd *exec.Cmd, done chan struct{}) {
	err := cmd.Wait()
	close(done)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.expected || p.stopped || p.cmd != cmd {
		return
	}
	p.cmd = nil
	// Our bug, not the product's: the port chosen for it was taken by
	// another program meanwhile. Give it another.
	if strings.Contains(tail(p.logPath), "address already in use") {
		if port, perr := freePort(); perr == nil {
			p.port.Store(int32(port))
			if err := p.startLocked(); err != nil {
				p.record("could not restart on another port: %v", err)
			}
			return
		}
	}
	p.record("crashed: %v (see %s)", exitText(err), p.logPath)
	time.Sleep(time.Second)
	if p.stopped {
		return
	}
	if err := p.startLocked(); err != nil {
		p.record("could not restart after a crash: %v", err)
	}
}

func exitText(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// record notes something that went wrong with the process.
func (p *proc) record(format string, args ...any) {
	p.evMu.Lock()
	defer p.evMu.Unlock()
	p.events = append(p.events, time.Now().Format("15:04:05.000")+" "+p.name+" "+fmt.Sprintf(format, args...))
}

// problems returns what went wrong so far.
func (p *proc) problems() []string {
	p.evMu.Lock()
	defer p.evMu.Unlock()
	return append([]string(nil), p.events...)
}

// Kill stops the process with sig (SIGKILL or SIGTERM) and starts it again
// after pause. After a SIGTERM the process must exit within its shutdown
// timeout plus 3 s, and cleanly; otherwise that is recorded (and the
// process killed).
func (p *proc) Kill(ctx context.Context, sig syscall.Signal, pause time.Duration) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return nil
	}
	if p.cmd != nil {
		p.stopLocked(sig)
	}
	select {
	case <-ctx.Done():
	case <-time.After(pause):
	}
	if p.stopped {
		return nil
	}
	return p.startLocked()
}

// stopLocked ends the running process with sig and waits for it.
func (p *proc) stopLocked(sig syscall.Signal) {
	cmd, done := p.cmd, p.done
	p.expected = true
	_ = cmd.Process.Signal(syscall.SIGCONT) // a stopped process handles nothing
	_ = cmd.Process.Signal(sig)
	if sig == syscall.SIGTERM {
		select {
		case <-done:
			if code := cmd.ProcessState.ExitCode(); code != 0 {
				p.record("exited with status %d after SIGTERM (see %s)", code, p.logPath)
			}
		case <-time.After(p.shutdownTimeout + 3*time.Second):
			p.record("hung: still running %s after SIGTERM; killed", p.shutdownTimeout+3*time.Second)
			_ = cmd.Process.Kill()
			<-done
		}
	} else {
		<-done
	}
	p.cmd = nil
}

// Stop ends the process for good, with SIGTERM, at the end of a scenario.
func (p *proc) Stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stopped = true
	if p.cmd != nil {
		p.stopLocked(syscall.SIGTERM)
	}
	if p.logFile != nil {
		p.logFile.Close()
		p.logFile = nil
	}
}

// Pause stops the process (SIGSTOP) for d, then lets it go on (SIGCONT):
// a frozen VM, a long GC pause, a debugger.
func (p *proc) Pause(ctx context.Context, d time.Duration) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return fmt.Errorf("%s is not running", p.name)
	}
	if err := p.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		return fmt.Errorf("SIGSTOP %s: %w", p.name, err)
	}
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
	if p.cmd == nil {
		return nil
	}
	return p.cmd.Process.Signal(syscall.SIGCONT)
}

// running reports whether the process is up.
func (p *proc) running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd != nil
}

// base is the process's base URL.
func (p *proc) base() string { return "http://127.0.0.1:" + strconv.Itoa(int(p.port.Load())) }

// live asks the process's liveness endpoint, which never looks at
// PostgreSQL or Redis: a process that does not answer it within timeout is
// hung.
func (p *proc) live(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.base()+"/health/live", nil)
	if err != nil {
		return err
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	_, _ = io.Copy(io.Discard, res.Body)
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("%s/health/live: %s", p.base(), res.Status)
	}
	return nil
}

// healthy asks /health, which checks the process's dependencies.
func (p *proc) healthy(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.base()+"/health", nil)
	if err != nil {
		return false
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return false
	}
	defer res.Body.Close()
	_, _ = io.Copy(io.Discard, res.Body)
	return res.StatusCode == http.StatusOK
}

// waitHealthy waits until every process answers /health with 200.
func waitHealthy(ctx context.Context, procs []*proc, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, p := range procs {
		for !p.healthy(ctx) {
			if time.Now().After(deadline) {
				return fmt.Errorf("%s not healthy after %s (log: %s)%s", p.name, timeout, p.logPath, tail(p.logPath))
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return nil
}

// tail returns the last lines of a log file, for an error message.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil || len(b) == 0 {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 5 {
		lines = lines[len(lines)-5:]
	}
	return "\n  " + strings.Join(lines, "\n  ")
}

// processEnv is the environment every function process starts from: only
// what a program needs to run, so that a DATABASE_URL or REDIS_URL in
// chaos's own environment (the shared servers) can never leak into a
// function.
func processEnv(vars map[string]string) []string {
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), "TZ=UTC"}
	for k, v := range vars {
		env = append(env, k+"="+v)
	}
	return env
}

// proxyTB adapts the run to the testing.TB that shared/tcpproxy takes:
// Helper and Logf do what they would, Fatalf panics (tcpproxy calls it only
// when it cannot listen at all), Cleanup collects the proxy's shutdown for
// the run to call. Every other method is left to the embedded nil
// interface and would panic; tcpproxy calls none.
type proxyTB struct {
	testing.TB
	mu       sync.Mutex
	cleanups []func()
	logf     func(format string, args ...any)
}

func (t *proxyTB) Helper() {}

func (t *proxyTB) Logf(format string, args ...any) { t.logf(format, args...) }

func (t *proxyTB) Fatalf(format string, args ...any) { panic(fmt.Sprintf(format, args...)) }

func (t *proxyTB) Cleanup(f func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.cleanups = append(t.cleanups, f)
}

// close runs the cleanups, last registered first.
func (t *proxyTB) close() {
	t.mu.Lock()
	cs := t.cleanups
	t.cleanups = nil
	t.mu.Unlock()
	for i := len(cs) - 1; i >= 0; i-- {
		cs[i]()
	}
}

// logWarnings counts the WARNING and ERROR lines of the processes' JSON
// logs by process kind, severity and message: the evidence that a fault
// did something, and what the product said about it.
func logWarnings(procs []*proc) map[string]int {
	out := map[string]int{}
	for _, p := range procs {
		f, err := os.Open(p.logPath)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			var line struct {
				Severity string `json:"severity"`
				Message  string `json:"message"`
			}
			if json.Unmarshal(sc.Bytes(), &line) != nil {
				continue
			}
			if line.Severity == "WARNING" || line.Severity == "ERROR" {
				out[fmt.Sprintf("%s %s: %s", p.kind, line.Severity, line.Message)]++
			}
		}
		f.Close()
	}
	return out
}
