package redistest

import (
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Server is a private redis-server process, for tests that stop and start
// Redis without disturbing the shared one.
type Server struct {
	// t fails the test when Start cannot bring the server up; nil for the
	// nodes of a cluster from NewCluster until StartCluster adopts them.
	t    testing.TB
	port int
	cmd  *exec.Cmd
	args []string // extra redis-server arguments
}

// StartReplica starts a private redis-server that replicates primary, and
// waits until the replication link is up.
func StartReplica(t testing.TB, primary *Server) *Server {
	t.Helper()
	s := StartServer(t, "--replicaof", "127.0.0.1", strconv.Itoa(primary.port))
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		out, err := exec.Command("redis-cli", "-p", strconv.Itoa(s.port), "INFO", "replication").Output()
		if err == nil && strings.Contains(string(out), "master_link_status:up") {
			return s
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("redistest: replica on port %d did not connect to its primary", s.port)
	return nil
}

// Pause stops the server's process without ending it (SIGSTOP), as a frozen
// host would; Resume lets it go on.
func (s *Server) Pause() {
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Signal(syscall.SIGSTOP)
	}
}

// Resume undoes Pause.
func (s *Server) Resume() {
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Signal(syscall.SIGCONT)
	}
}

// StartServer starts redis-server on a free port, with args added to its
// command line, and stops it when t ends. It skips t if redis-server is not
// installed.
func StartServer(t testing.TB, args ...string) *Server {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("redis-server is not installed")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("redistest: find a free port: %v", err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	_ = ln.Close()
	// A directory of its own: a replica writes the copy it receives there.
	s := &Server{t: t, port: port, args: append([]string{"--dir", t.TempDir()}, args...)}
	s.Start()
	t.Cleanup(s.Stop)
	return s
}

// URL is the server's redis:// URL.
func (s *Server) URL() string { return fmt.Sprintf("redis://127.0.0.1:%d/0", s.port) }

// Start (re)starts the server and waits until it accepts connections.
func (s *Server) Start() {
	s.t.Helper()
	if err := s.start(); err != nil {
		s.t.Fatalf("redistest: %v", err)
	}
}

// start is Start for callers without a test: it returns what went wrong.
func (s *Server) start() error {
	args := append([]string{"--port", strconv.Itoa(s.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", ""}, s.args...)
	s.cmd = exec.Command("redis-server", args...)
	if err := s.cmd.Start(); err != nil {
		s.cmd = nil
		return fmt.Errorf("start redis-server: %w", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", s.port)); err == nil {
			_ = c.Close()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.Stop()
	return fmt.Errorf("redis-server on port %d did not start", s.port)
}

// Stop kills the server, as a crash or an outage would.
func (s *Server) Stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGCONT) // a paused process dies only once resumed
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
	s.cmd = nil
}
