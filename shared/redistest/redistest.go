// Package redistest gives each test a Redis client and a key prefix of its
// own, and deletes the test's keys when it ends, so tests share one server
// without seeing each other's streams. For tests that restart, flush or
// cluster Redis it starts private servers (StartServer, StartReplica) and
// private Redis Clusters (StartCluster); NewCluster starts the same cluster
// for a command (local/bench), which removes it with Close.
package redistest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"regexp"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/outboxfn/outbox/shared/stream"
)

// DefaultURL is the server tests use when REDIS_URL is unset.
const DefaultURL = "redis://127.0.0.1:6379/0"

// URL is the Redis URL tests use.
func URL() string {
	if u := os.Getenv("REDIS_URL"); u != "" {
		return u
	}
	return DefaultURL
}

var unsafe = regexp.MustCompile(`[^A-Za-z0-9_]+`)

// New returns a client and a prefix ("test:<name>:<random>:") for t, on
// the shared server at URL. Every key under the prefix is deleted, and the
// client closed, when t ends.
func New(t testing.TB) (rueidis.Client, string) {
	t.Helper()
	return open(t, URL(), false)
}

// Client returns a cluster client and a prefix of t's own, as New does for
// the shared server.
func (c *Cluster) Client(t testing.TB) (rueidis.Client, string) {
	t.Helper()
	return open(t, c.URL(), true)
}

func open(t testing.TB, url string, cluster bool) (rueidis.Client, string) {
	t.Helper()
	opt, err := rueidis.ParseURL(url)
	if err != nil {
		t.Fatalf("redistest: parse REDIS_URL: %v", err)
	}
	opt.DisableCache = true
	client, err := rueidis.NewClient(opt)
	if err != nil {
		t.Fatalf("redistest: connect to %s: %v (is Redis running? `make services` starts it)", url, err)
	}
	if cluster != (client.Mode() == rueidis.ClientModeCluster) {
		client.Close()
		t.Fatalf("redistest: %s: client mode %s, want cluster %v", url, client.Mode(), cluster)
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := unsafe.ReplaceAllString(t.Name(), "_")
	if len(name) > 40 {
		name = name[len(name)-40:]
	}
	prefix := "test:" + name + ":" + hex.EncodeToString(b) + ":"
	t.Cleanup(func() {
		defer client.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		Delete(ctx, t, client, prefix)
	})
	return client, prefix
}

// Delete removes every key that starts with prefix, and the keys that
// share a stream's hash slot ({<prefix>…}:…, see stream.Sibling).
func Delete(ctx context.Context, t testing.TB, client rueidis.Client, prefix string) {
	for _, pattern := range []string{prefix + "*", "{" + prefix + "*"} {
		keys, err := stream.Keys(ctx, client, pattern, "")
		if err != nil {
			t.Errorf("redistest: list %s: %v", pattern, err)
			return
		}
		// One UNLINK per key: on a cluster the keys are in many slots.
		cmds := make(rueidis.Commands, 0, len(keys))
		for _, k := range keys {
			cmds = append(cmds, client.B().Unlink().Key(k).Build())
		}
		for _, r := range client.DoMulti(ctx, cmds...) {
			if err := r.Error(); err != nil {
				t.Errorf("redistest: delete %s: %v", pattern, err)
				return
			}
		}
	}
}
