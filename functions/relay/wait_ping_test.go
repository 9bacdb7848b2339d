package relay

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/stream"
)

// The longest WAIT timeout Validate accepts must not turn a paused replica
// into a stopped relay: the wait shares the publish's 5 s with the XADDs.
func TestTheLongestWaitTimeoutAllowedDoesNotStopTheRelay(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	tooLong := b.config(func(c *Config) { c.WaitReplicas, c.WaitTimeout = 1, 4990*time.Millisecond })
	require.Error(t, tooLong.Validate(), "a wait that could outlast the publish is refused")

	primary := redistest.StartServer(t)
	replica := redistest.StartReplica(t, primary)
	mutate := func(c *Config) {
		c.RedisURL, c.WaitReplicas, c.WaitTimeout, c.BatchSize = primary.URL(), 1, time.Second, 1000
	}
	cfg := b.config(mutate)
	require.NoError(t, cfg.Validate(), "the configuration is accepted")
	s := b.relay(t, mutate)
	b.insertBulk(t, "user", 1000)
	replica.Pause()
	t.Cleanup(replica.Resume)
	res, err := s.Drain(ctx, time.Now().Add(20*time.Second))
	replica.Resume()
	require.NoError(t, err, "a replica that does not answer delays a batch, it does not stop the relay")
	assert.Equal(t, 1, res.Unreplicated)
}

// A Redis (or proxy) that refuses WAIT: the EXEC succeeded, the events are
// in the stream, yet every batch fails and the relay never deletes a row.
func TestARefusedWaitDoesNotStopTheRelay(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	primary := redistest.StartServer(t)
	admin, err := stream.NewClient(primary.URL(), false)
	require.NoError(t, err)
	t.Cleanup(admin.Close)
	require.NoError(t, admin.Do(ctx, admin.B().Arbitrary("ACL", "SETUSER", "default", "-wait").Build()).Error())
	s := b.relay(t, func(c *Config) { c.RedisURL, c.WaitReplicas, c.WaitTimeout = primary.URL(), 1, 100*time.Millisecond })
	b.insert(t, "user", "a", 1, 3)
	for range 3 {
		_, err = s.Drain(ctx, time.Now().Add(5*time.Second))
		if err == nil {
			break
		}
	}
	require.NoError(t, err, "WAIT refused should count as unreplicated, not fail the published batch")
	assert.Equal(t, 0, b.outboxCount(t))
}

// A listener that works must not be replaced because the pool was too busy
// to send the pings.
func TestABusyPoolDoesNotMakeAWorkingListenerDeaf(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	s := b.relay(t)
	s.pingEvery = 100 * time.Millisecond
	start(t, s)
	var held []*pgxpool.Conn
	for range s.cfg.DBMaxConns {
		c, err := s.pool.Acquire(ctx)
		require.NoError(t, err)
		held = append(held, c)
	}
	deadline := time.Now().Add(500 * time.Millisecond)
	stayed := true
	for time.Now().Before(deadline) {
		if !s.listening.Load() {
			stayed = false
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	for _, c := range held {
		c.Release()
	}
	assert.True(t, stayed, "the listener was declared deaf while it was fine: only the pool was busy")
}

// A row committed while the listener is deaf, with no poll to rescue it,
// is relayed once the listener is replaced: the bell rings after the
// reconnect.
func TestARowCommittedWhileDeafIsRelayedAfterTheReplace(t *testing.T) {
	t.Parallel()
	b := setup(t)
	proxy := b.proxy(t)
	t.Cleanup(proxy.Thaw)
	s := b.relay(t, func(c *Config) { c.DatabaseURL = proxy.URL(b.url) })
	s.pingEvery = 100 * time.Millisecond
	start(t, s)
	proxy.Freeze()
	waitFor(t, 5*time.Second, "the relay notices that its listener is deaf", func() bool { return !s.listening.Load() })
	b.insert(t, "user", "a", 1, 1)
	proxy.Thaw()
	waitFor(t, 30*time.Second, "the row committed while deaf is relayed", func() bool { return len(b.entries(t, "user")) == 1 })
}

func TestNoReplicaAtAllCountsEveryBatchAndGoesOn(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	primary := redistest.StartServer(t)
	s := b.relay(t, func(c *Config) {
		c.RedisURL, c.WaitReplicas, c.WaitTimeout, c.BatchSize = primary.URL(), 1, 100*time.Millisecond, 10
	})
	b.insert(t, "user", "a", 1, 25)
	began := time.Now()
	res, err := s.Drain(ctx, time.Now().Add(10*time.Second))
	require.NoError(t, err)
	t.Logf("3 batches took %s", time.Since(began))
	assert.Equal(t, 3, res.Batches)
	assert.Equal(t, 3, res.Unreplicated)
	assert.Equal(t, 25, res.Relayed)
}

// README: "A batch the replica does not confirm in time is committed anyway
// ..., logged at WARN". A triggered drain (plain serverless) logs nothing.
func TestATriggeredDrainLogsUnreplicatedBatches(t *testing.T) {
	t.Parallel()
	b := setup(t)
	primary := redistest.StartServer(t)
	var logs bytes.Buffer
	var mu sync.Mutex
	logger := slog.New(slog.NewTextHandler(&lockedWriter{w: &logs, mu: &mu}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	s, err := New(context.Background(), b.config(func(c *Config) {
		c.RedisURL, c.WaitReplicas, c.WaitTimeout, c.Background = primary.URL(), 1, 50*time.Millisecond, false
	}), logger)
	require.NoError(t, err)
	t.Cleanup(func() { s.Stop(); s.Close() })
	b.insert(t, "user", "a", 1, 3)
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
	require.Equal(t, http.StatusOK, rec.Code)
	assert.Contains(t, rec.Body.String(), `"unreplicated_batches":1`)
	mu.Lock()
	defer mu.Unlock()
	assert.Contains(t, logs.String(), "level=WARN", "the unreplicated batch is not logged")
}

type lockedWriter struct {
	w  *bytes.Buffer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
