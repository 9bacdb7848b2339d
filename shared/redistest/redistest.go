// Package redistest gives each test a Redis client and a key prefix of its
// own, and deletes the test's keys when it ends, so tests share one server
// without seeing each other's streams.
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

// New returns a client and a prefix ("test:<name>:<random>:") for t. Every
// key under the prefix is deleted, and the client closed, when t ends.
func New(t testing.TB) (rueidis.Client, string) {
	t.Helper()
	opt, err := rueidis.ParseURL(URL())
	if err != nil {
		t.Fatalf("redistest: parse REDIS_URL: %v", err)
	}
	opt.DisableCache = true
	client, err := rueidis.NewClient(opt)
	if err != nil {
		t.Fatalf("redistest: connect to %s: %v (is Redis running? `make services` starts it)", URL(), err)
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

// Delete removes every key that starts with prefix.
func Delete(ctx context.Context, t testing.TB, client rueidis.Client, prefix string) {
	var cursor uint64
	for {
		entry, err := client.Do(ctx, client.B().Scan().Cursor(cursor).Match(prefix+"*").Count(1000).Build()).AsScanEntry()
		if err != nil {
			t.Errorf("redistest: scan %s*: %v", prefix, err)
			return
		}
		if len(entry.Elements) > 0 {
			if err := client.Do(ctx, client.B().Unlink().Key(entry.Elements...).Build()).Error(); err != nil {
				t.Errorf("redistest: delete %s*: %v", prefix, err)
				return
			}
		}
		if entry.Cursor == 0 {
			return
		}
		cursor = entry.Cursor
	}
}
