package relay

import (
	"context"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/stream"
	"github.com/outboxfn/outbox/shared/tcpproxy"
)

// A relay whose network goes silent while it holds the drain lock: its
// packets stop, its TCP connections stay up. The proxy's kernel answers
// for it, so neither side's keepalive notices; only the server's idle
// timeouts end its session and free the lock, and only the relay's own
// deadlines let it stop or recover.

// silenced is a relay, A, that reaches PostgreSQL through a proxy and was
// frozen while it held the drain lock, and a standby, B, that reaches it
// directly and waits for that lock.
type silenced struct {
	b        *testBundle
	proxy    *tcpproxy.Proxy
	a, other *Service
	frozenAt time.Time
}

// silence starts A on a backlog, starts B once A holds the drain lock, and
// freezes A's network.
func silence(t *testing.T, backlog int) *silenced {
	t.Helper()
	b := setup(t)
	proxy := b.proxy(t)
	a := b.relay(t, func(c *Config) {
		c.DatabaseURL = withApplicationName(t, proxy.URL(b.url), "relay-a")
		// Many short transactions, so that A is still draining when frozen.
		c.BatchSize = 10
	})
	other := b.relay(t, func(c *Config) { c.DatabaseURL = withApplicationName(t, b.url, "relay-b") })
	// Cleanups run last first: the network comes back before the relays
	// are stopped, so that a relay that cannot stop while frozen fails its
	// own assertion, not the whole run.
	t.Cleanup(proxy.Thaw)

	b.insertBulk(t, "item", backlog)
	start(t, a)
	waitFor(t, 10*time.Second, "relay A holds the drain lock", func() bool { return drainLockHolder(t, b) == "relay-a" })
	start(t, other)
	proxy.Freeze()
	s := &silenced{b: b, proxy: proxy, a: a, other: other, frozenAt: time.Now()}
	// Whatever A's backend was doing, it can no longer release the lock.
	time.Sleep(100 * time.Millisecond)
	require.Equal(t, "relay-a", drainLockHolder(t, b), "A finished its drain before the freeze: make the backlog bigger")
	require.NotZero(t, b.outboxCount(t), "A finished its drain before the freeze: make the backlog bigger")
	return s
}

func TestASilentNetworkDoesNotHoldTheDrainLock(t *testing.T) {
	t.Parallel()

	t.Run("lets the standby take over and the silenced relay drain again after the thaw", func(t *testing.T) {
		t.Parallel()
		const backlog = 30000
		s := silence(t, backlog)
		b := s.b
		b.insert(t, "late", "a", 0, 5)

		// The server must end A's session (idle_in_transaction_session_timeout
		// or idle_session_timeout) so that B gets the lock.
		var takeover time.Duration
		deadline := s.frozenAt.Add(30 * time.Second)
		for {
			if takeover == 0 && drainLockHolder(t, b) == "relay-b" {
				takeover = time.Since(s.frozenAt)
				t.Logf("B took the drain lock %s after A's network froze", takeover.Round(10*time.Millisecond))
			}
			if streamLen(t, b, "item") >= backlog && streamLen(t, b, "late") == 5 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("30 s after A's network froze, %d of %d backlog and %d of 5 late events are in the stream; the drain lock is held by %q",
					streamLen(t, b, "item"), backlog, streamLen(t, b, "late"), drainLockHolder(t, b))
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("every event was in the stream %s after A's network froze", time.Since(s.frozenAt).Round(10*time.Millisecond))
		require.NotZero(t, takeover, "B drained the rows, so it must have held the lock")
		requireExactlyOnceInOrder(t, b.entries(t, "item"), backlog)
		requireExactlyOnceInOrder(t, b.entries(t, "late"), 5)

		// A was not restarted; once its network is back, and B is gone, it
		// alone drains.
		s.proxy.Thaw()
		thawedAt := time.Now()
		s.other.Stop()
		b.insert(t, "after", "a", 0, 5)
		waitFor(t, 30*time.Second, "A relays new rows after the thaw", func() bool { return streamLen(t, b, "after") == 5 })
		t.Logf("A relayed again %s after the thaw", time.Since(thawedAt).Round(10*time.Millisecond))
		requireExactlyOnceInOrder(t, b.entries(t, "after"), 5)
		waitFor(t, 10*time.Second, "the last batch commits", func() bool { return b.outboxCount(t) == 0 })
	})

	t.Run("stops within seconds while its network is silent", func(t *testing.T) {
		t.Parallel()
		s := silence(t, 30000)
		stopped := make(chan time.Duration, 1)
		go func() {
			began := time.Now()
			s.a.Stop()
			stopped <- time.Since(began)
		}()
		select {
		case took := <-stopped:
			t.Logf("A stopped %s after it was asked to, its network frozen", took.Round(10*time.Millisecond))
		case <-time.After(10 * time.Second):
			// Let it finish, so that the test ends.
			s.proxy.Thaw()
			took := <-stopped
			t.Errorf("A did not stop within 10 s while its network was frozen; it stopped only after the thaw, %s after it was asked to",
				took.Round(10*time.Millisecond))
		}
	})
}

// The drain lock orders drains, but a drain claims its next batch on a
// second connection while the current one is published, and SKIP LOCKED
// lets a claim pass over rows another transaction holds. When the network
// goes silent between the two claims, the server ends the lock holder's
// session first: it went idle in its transaction first, so its timeout
// expires first. The standby must not overtake the rows the second
// session still holds.
func TestAStandbyDoesNotOvertakeTheBatchAClaimAheadStillHolds(t *testing.T) {
	t.Parallel()
	b := setup(t)
	proxy := b.proxy(t)
	a := b.relay(t, func(c *Config) {
		c.DatabaseURL = withApplicationName(t, proxy.URL(b.url), "relay-a")
		c.BatchSize = 10
		c.Background = false
	})
	standby := b.relay(t, func(c *Config) { c.Background = false })
	t.Cleanup(proxy.Thaw)
	b.insertBulk(t, "item", 100)
	ctx := context.Background()

	// After A published rows 1-10 and claimed 11-20 ahead, before it
	// commits, its network goes silent and the server ends the session
	// that holds the drain lock.
	frozen := make(chan struct{})
	var once sync.Once
	a.drainer.afterPublish = func() (err error) {
		once.Do(func() {
			defer close(frozen)
			proxy.Freeze()
			var holder int
			if err = b.pool.QueryRow(ctx, `SELECT l.pid FROM pg_locks l
				WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
				  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
				  AND l.objid::bigint = (`+drainLock+`::bigint & 4294967295)`).Scan(&holder); err != nil {
				return
			}
			if _, err = b.pool.Exec(ctx, `SELECT pg_terminate_backend($1)`, holder); err != nil {
				return
			}
			// The hook runs in A's drain, not the test's goroutine: no
			// require here.
			for n := 1; n > 0 && err == nil; time.Sleep(5 * time.Millisecond) {
				err = b.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE pid = $1`, holder).Scan(&n)
			}
		})
		return err
	}
	drained := make(chan error, 1)
	go func() {
		_, err := a.drainer.Drain(ctx, time.Time{})
		drained <- err
	}()
	select {
	case <-frozen:
	case err := <-drained:
		t.Fatalf("A's drain ended before it was frozen: %v", err)
	}
	var claimedAhead int
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
		WHERE application_name = 'relay-a' AND datname = current_database() AND state = 'idle in transaction'`).Scan(&claimedAhead))
	require.Equal(t, 1, claimedAhead, "A's claim ahead is open")

	// The standby drains while A's claim ahead is still open; its session
	// ends a moment later, as its own idle timeout would end it.
	standbyDone := make(chan error, 1)
	go func() {
		_, err := standby.drainer.Drain(ctx, time.Time{})
		standbyDone <- err
	}()
	time.Sleep(500 * time.Millisecond)
	_, err := b.pool.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE application_name = 'relay-a' AND datname = current_database()`)
	require.NoError(t, err)
	require.NoError(t, <-standbyDone)
	_, err = standby.drainer.Drain(ctx, time.Time{})
	require.NoError(t, err)

	proxy.Thaw()
	require.Error(t, <-drained, "A's commit cannot have succeeded")
	requireExactlyOnceInOrder(t, b.entries(t, "item"), 100)
	require.Zero(t, b.outboxCount(t))
}

// drainLockHolder returns the application_name of the session that holds
// the drain lock in b's database, or "" if none does.
func drainLockHolder(t *testing.T, b *testBundle) string {
	t.Helper()
	var name string
	// A bigint advisory key is stored as classid (high half) and objid (low
	// half), with objsubid 1.
	require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT coalesce(max(a.application_name), '')
		FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
		WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
		  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
		  AND l.objid::bigint = (`+drainLock+`::bigint & 4294967295)
		  AND l.classid::bigint = (`+drainLock+`::bigint >> 32 & 4294967295)`).Scan(&name))
	return name
}

// streamLen is the length of aggregateType's stream.
func streamLen(t *testing.T, b *testBundle, aggregateType string) int64 {
	t.Helper()
	n, err := b.redis.Do(context.Background(), b.redis.B().Xlen().Key(stream.Name(b.prefix, aggregateType)).Build()).AsInt64()
	require.NoError(t, err)
	return n
}

// withApplicationName returns u with its application_name set, so that the
// session is easy to tell apart in pg_stat_activity.
func withApplicationName(t *testing.T, u, name string) string {
	t.Helper()
	parsed, err := url.Parse(u)
	require.NoError(t, err)
	q := parsed.Query()
	q.Set("application_name", name)
	parsed.RawQuery = q.Encode()
	return parsed.String()
}

// proxy starts a TCP proxy in front of the test database.
func (b *testBundle) proxy(t *testing.T) *tcpproxy.Proxy {
	t.Helper()
	target, err := url.Parse(b.url)
	require.NoError(t, err)
	return tcpproxy.Start(t, target.Host)
}

func TestADeafListenerIsNoticedAndReplaced(t *testing.T) {
	t.Parallel()
	b := setup(t)
	proxy := b.proxy(t)
	t.Cleanup(proxy.Thaw)
	s := b.relay(t, func(c *Config) { c.DatabaseURL = proxy.URL(b.url) })
	s.pingEvery = 100 * time.Millisecond
	start(t, s)

	// The network goes silent without breaking the connection: nothing
	// fails, the listener just hears nothing.
	proxy.Freeze()
	waitFor(t, 5*time.Second, "the relay notices that its listener is deaf", func() bool { return !s.listening.Load() })
	proxy.Thaw()
	waitFor(t, 15*time.Second, "the listener is back", s.listening.Load)
	b.insert(t, "user", "a", 1, 1)
	waitFor(t, 5*time.Second, "an insert wakes the relay again", func() bool { return len(b.entries(t, "user")) == 1 })
}
