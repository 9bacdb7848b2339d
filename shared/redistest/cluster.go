package redistest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Cluster is a private Redis Cluster: shards primaries, each with its
// replicas, on loopback ports, for tests that need cluster routing or a
// failover, and for commands that measure one (local/bench). A test's
// cluster (StartCluster) is removed when the test ends; a command's
// (NewCluster) when it calls Close.
type Cluster struct {
	// t fails the test in the methods that can fail one (WaitHealthy,
	// PrimaryOf, Failover, FailoverLosingWrites); nil for a cluster from
	// NewCluster, which must not call them.
	t     testing.TB
	nodes []*Server
	dir   string // holds each node's directory; Close removes it
}

// clusterNodeTimeout is the nodes' cluster-node-timeout: a primary that
// does not answer for this long is failed over by its replica, in about
// twice that.
const clusterNodeTimeout = 1000 * time.Millisecond

// ErrNotInstalled says a program a private server needs (redis-server,
// redis-cli) is not on the PATH.
var ErrNotInstalled = errors.New("not installed")

// StartCluster starts shards × (1 + replicasPerShard) redis-server nodes
// in cluster mode as NewCluster does, fails t if it cannot, and removes the
// cluster when t ends. It skips t when redis-server or redis-cli is not
// installed.
func StartCluster(t testing.TB, shards, replicasPerShard int) *Cluster {
	t.Helper()
	c, err := NewCluster(shards, replicasPerShard)
	if errors.Is(err, ErrNotInstalled) {
		t.Skipf("redistest: %v: the Redis Cluster tests need it", err)
	}
	if err != nil {
		t.Fatalf("redistest: %v", err)
	}
	t.Cleanup(c.Close)
	c.t = t
	for _, s := range c.nodes {
		s.t = t
	}
	return c
}

// NewCluster starts shards × (1 + replicasPerShard) redis-server nodes in
// cluster mode (no persistence, each with its own directory and
// nodes.conf) on free loopback ports, joins them with redis-cli --cluster
// create, and waits until every node reports cluster_state:ok and every
// replica has synchronised. It is for commands, not tests (StartCluster
// wraps it for those): the caller must Close the cluster, and must not
// call the methods that fail a test. The error wraps ErrNotInstalled when
// redis-server or redis-cli is missing.
func NewCluster(shards, replicasPerShard int) (_ *Cluster, err error) {
	for _, bin := range []string{"redis-server", "redis-cli"} {
		if _, err := exec.LookPath(bin); err != nil {
			return nil, fmt.Errorf("%s: %w", bin, ErrNotInstalled)
		}
	}
	dir, err := os.MkdirTemp("", "redistest-cluster-")
	if err != nil {
		return nil, fmt.Errorf("create the cluster's directory: %w", err)
	}
	c := &Cluster{dir: dir}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	n := shards * (1 + replicasPerShard)
	addrs := make([]string, 0, n)
	for i := range n {
		// The cluster bus listens on port+10000, so both must be free.
		port, err := freeClusterPort()
		if err != nil {
			return nil, err
		}
		nodeDir := filepath.Join(dir, strconv.Itoa(i))
		if err := os.Mkdir(nodeDir, 0o700); err != nil {
			return nil, fmt.Errorf("create a node's directory: %w", err)
		}
		s := &Server{port: port, args: []string{"--dir", nodeDir,
			"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
			"--cluster-node-timeout", strconv.Itoa(int(clusterNodeTimeout.Milliseconds())),
			// A replica's first synchronisation would wait 5 s for others
			// to join it.
			"--repl-diskless-sync-delay", "0"}}
		if err := s.start(); err != nil {
			return nil, err
		}
		c.nodes = append(c.nodes, s)
		addrs = append(addrs, s.Addr())
	}
	args := append([]string{"--cluster", "create"}, addrs...)
	args = append(args, "--cluster-replicas", strconv.Itoa(replicasPerShard), "--cluster-yes")
	if out, err := exec.Command("redis-cli", args...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("redis-cli --cluster create: %w\n%s", err, out)
	}
	if err := c.waitHealthy(); err != nil {
		return nil, err
	}
	return c, nil
}

// Close kills every node and removes their directories. It is safe to call
// twice.
func (c *Cluster) Close() {
	for _, s := range c.nodes {
		s.Stop()
	}
	if c.dir != "" {
		_ = os.RemoveAll(c.dir)
	}
}

// freeClusterPort returns a free loopback port p whose cluster bus port
// p+10000 is free too.
func freeClusterPort() (int, error) {
	for range 100 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, fmt.Errorf("find a free port: %w", err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		if port+10000 > 65535 {
			_ = ln.Close()
			continue
		}
		bus, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port+10000))
		_ = ln.Close()
		if err != nil {
			continue
		}
		_ = bus.Close()
		return port, nil
	}
	return 0, errors.New("no free port pair for a cluster node")
}

// Addr is the server's host:port.
func (s *Server) Addr() string { return fmt.Sprintf("127.0.0.1:%d", s.port) }

// URL is a redis:// URL naming every node of the cluster (the first as
// host, the others as addr parameters), for a client with REDIS_CLUSTER
// set.
func (c *Cluster) URL() string {
	u := "redis://" + c.nodes[0].Addr()
	for i, s := range c.nodes[1:] {
		sep := "&"
		if i == 0 {
			sep = "?"
		}
		u += sep + "addr=" + s.Addr()
	}
	return u
}

// Nodes returns the cluster's servers, primaries and replicas, in the order
// they were started.
func (c *Cluster) Nodes() []*Server { return c.nodes }

// cli runs redis-cli against s and returns its output.
func (s *Server) cli(args ...string) (string, error) {
	// A node that is frozen (SIGSTOP) or gone must fail the call, not hang
	// the test that asked it.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "redis-cli", append([]string{"-p", strconv.Itoa(s.port)}, args...)...).Output()
	return string(out), err
}

// WaitHealthy waits until every running node reports cluster_state:ok,
// agrees on which node serves each shard, and every replica's link to its
// primary is up (a replica that has not synchronised cannot take over).
func (c *Cluster) WaitHealthy() {
	c.t.Helper()
	if err := c.waitHealthy(); err != nil {
		c.t.Fatalf("redistest: %v", err)
	}
}

// waitHealthy is WaitHealthy for callers without a test.
func (c *Cluster) waitHealthy() error {
	deadline := time.Now().Add(30 * time.Second)
	var why string
	for time.Now().Before(deadline) {
		if why = c.unhealthy(); why == "" {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("cluster not healthy after 30s: %s", why)
}

// unhealthy says what keeps the cluster from being healthy, or "".
func (c *Cluster) unhealthy() string {
	var primaries string
	for _, s := range c.nodes {
		if s.cmd == nil {
			continue
		}
		info, err := s.cli("CLUSTER", "INFO")
		if err != nil || !strings.Contains(info, "cluster_state:ok") {
			return fmt.Sprintf("%s: cluster_state not ok (%v)", s.Addr(), err)
		}
		nodes, err := s.cli("CLUSTER", "NODES")
		if err != nil {
			return fmt.Sprintf("%s: CLUSTER NODES: %v", s.Addr(), err)
		}
		view := primaryView(nodes)
		if primaries == "" {
			primaries = view
		} else if view != primaries {
			return fmt.Sprintf("%s sees primaries %s, others %s", s.Addr(), view, primaries)
		}
		repl, err := s.cli("INFO", "replication")
		if err != nil {
			return fmt.Sprintf("%s: INFO replication: %v", s.Addr(), err)
		}
		if strings.Contains(repl, "role:slave") && !strings.Contains(repl, "master_link_status:up") {
			return fmt.Sprintf("%s: replica not synchronised", s.Addr())
		}
	}
	return ""
}

// primaryView lists, from a CLUSTER NODES reply, the connected primaries
// serving slots, sorted by their first slot range.
func primaryView(nodes string) string {
	var out []string
	for _, line := range strings.Split(strings.TrimSpace(nodes), "\n") {
		f := strings.Fields(line)
		if len(f) < 9 || !strings.Contains(f[2], "master") || strings.Contains(f[2], "fail") || f[7] != "connected" {
			continue
		}
		out = append(out, f[8]+"="+strings.Split(f[1], "@")[0])
	}
	slices.Sort(out)
	return strings.Join(out, ",")
}

// PrimaryOf returns the running node that serves key's slot as primary.
func (c *Cluster) PrimaryOf(key string) *Server {
	c.t.Helper()
	p := c.primaryOf(key)
	if p == nil {
		c.t.Fatalf("redistest: no node serves the slot of %s", key)
	}
	return p
}

// primaryOf is PrimaryOf, or nil while no node serves the slot.
func (c *Cluster) primaryOf(key string) *Server {
	for _, s := range c.nodes {
		if s.cmd == nil {
			continue
		}
		slot, err := s.cli("CLUSTER", "KEYSLOT", key)
		if err != nil {
			continue
		}
		n, err := strconv.Atoi(strings.TrimSpace(slot))
		if err != nil {
			continue
		}
		nodes, err := s.cli("CLUSTER", "NODES")
		if err != nil {
			continue
		}
		addr := servingPrimary(nodes, n)
		for _, p := range c.nodes {
			if p.Addr() == addr && p.cmd != nil {
				return p
			}
		}
		return nil
	}
	return nil
}

// servingPrimary finds in a CLUSTER NODES reply the address of the
// connected primary that serves slot.
func servingPrimary(nodes string, slot int) string {
	for _, line := range strings.Split(strings.TrimSpace(nodes), "\n") {
		f := strings.Fields(line)
		if len(f) < 9 || !strings.Contains(f[2], "master") || strings.Contains(f[2], "fail") {
			continue
		}
		for _, r := range f[8:] {
			lo, hi, ok := strings.Cut(r, "-")
			if !ok {
				hi = lo
			}
			a, err1 := strconv.Atoi(lo)
			b, err2 := strconv.Atoi(hi)
			if err1 == nil && err2 == nil && a <= slot && slot <= b {
				return strings.Split(f[1], "@")[0]
			}
		}
	}
	return ""
}

// Failover kills the primary that serves key's slot, as a crash would,
// waits until its replica has taken over and the other nodes agree, and
// returns the killed node (Start brings it back, as a replica of the new
// primary). Writes the replica had not received are lost, as in a real
// failover.
func (c *Cluster) Failover(key string) *Server {
	c.t.Helper()
	old := c.PrimaryOf(key)
	old.Stop()
	return c.awaitTakeover(key, old)
}

// awaitTakeover waits until a node other than old serves key's slot and
// the cluster is healthy again, and returns old.
func (c *Cluster) awaitTakeover(key string, old *Server) *Server {
	c.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if p := c.primaryOf(key); p != nil && p != old && c.unhealthy() == "" {
			return old
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.t.Fatalf("redistest: no replica took over from %s within 30s: %s", old.Addr(), c.unhealthy())
	return nil
}

// replicasOf returns the running replicas of primary.
func (c *Cluster) replicasOf(primary *Server) []*Server {
	c.t.Helper()
	id, err := primary.cli("CLUSTER", "MYID")
	if err != nil {
		c.t.Fatalf("redistest: CLUSTER MYID on %s: %v", primary.Addr(), err)
	}
	id = strings.TrimSpace(id)
	nodes, err := primary.cli("CLUSTER", "NODES")
	if err != nil {
		c.t.Fatalf("redistest: CLUSTER NODES on %s: %v", primary.Addr(), err)
	}
	var out []*Server
	for _, line := range strings.Split(strings.TrimSpace(nodes), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || f[3] != id {
			continue
		}
		addr := strings.Split(f[1], "@")[0]
		for _, s := range c.nodes {
			if s.Addr() == addr && s.cmd != nil {
				out = append(out, s)
			}
		}
	}
	return out
}

// FailoverLosingWrites is Failover after writes the replica never got, as
// when a primary dies before replicating its last writes: it freezes the
// replicas of key's primary (SIGSTOP), cuts their replication links, runs
// write (whose writes reach the primary alone), then kills the primary and
// lets the replicas go on, one of which takes over without those writes.
func (c *Cluster) FailoverLosingWrites(key string, write func()) *Server {
	c.t.Helper()
	old := c.PrimaryOf(key)
	replicas := c.replicasOf(old)
	if len(replicas) == 0 {
		c.t.Fatalf("redistest: the primary of %s has no replica", key)
	}
	for _, r := range replicas {
		r.Pause()
	}
	if out, err := old.cli("CLIENT", "KILL", "TYPE", "replica"); err != nil {
		c.t.Fatalf("redistest: cut the replication links of %s: %v %s", old.Addr(), err, out)
	}
	write()
	old.Stop()
	for _, r := range replicas {
		r.Resume()
	}
	return c.awaitTakeover(key, old)
}
