package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/rueidis"

	"github.com/outboxfn/outbox/functions/relay"
	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/pgtest"
	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/stream"
)

// fill inserts n user.created-like rows into table in one statement.
func fill(ctx context.Context, e *env, table string, n int) error {
	return fillTypes(ctx, e, table, n, []string{"user"})
}

// fillTypes is fill with the rows' aggregate types taken in turn from
// types, so that the relay publishes them to that many streams.
func fillTypes(ctx context.Context, e *env, table string, n int, types []string) error {
	_, err := e.pool.Exec(ctx, `INSERT INTO `+table+` (aggregate_type, aggregate_id, event_type, payload)
		SELECT ($2::text[])[1 + i % cardinality($2::text[])], i::text, 'user.created',
		       json_build_object('user_id', i, 'email', 'user' || i || '@example.com', 'name', 'User ' || i)
		FROM generate_series(1, $1) AS i`, n, types)
	if err == nil {
		_, err = e.pool.Exec(ctx, `VACUUM ANALYZE `+table)
	}
	return err
}

// rawDrain is the ceiling: the relay's claim statement in batches of 1000,
// in one transaction each, rows read into memory, no Redis.
func rawDrain(ctx context.Context, e *env) (int, error) {
	conn, err := e.pool.Acquire(ctx)
	if err != nil {
		return 0, err
	}
	defer conn.Release()
	total := 0
	for {
		tx, err := conn.Begin(ctx)
		if err != nil {
			return total, err
		}
		rows, _ := tx.Query(ctx, `DELETE FROM outbox WHERE id = ANY (ARRAY (SELECT id FROM outbox ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED))
			RETURNING id, event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at`)
		n := 0
		var id int64
		var eventID [16]byte
		var aggType, aggID, eventType string
		var payload []byte
		var traceparent *string
		var createdAt time.Time
		_, err = pgx.ForEachRow(rows, []any{&id, &eventID, &aggType, &aggID, &eventType, &payload, &traceparent, &createdAt}, func() error {
			n++
			return nil
		})
		if err != nil {
			_ = tx.Rollback(ctx)
			return total, err
		}
		if err := tx.Commit(ctx); err != nil {
			return total, err
		}
		total += n
		if n < 1000 {
			return total, nil
		}
	}
}

const naiveTable = `CREATE TABLE IF NOT EXISTS naive_outbox (
	id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	event_id uuid NOT NULL DEFAULT gen_random_uuid(),
	aggregate_type text NOT NULL, aggregate_id text NOT NULL, event_type text NOT NULL,
	payload json NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), published_at timestamptz);
CREATE INDEX IF NOT EXISTS naive_outbox_unpublished ON naive_outbox (id) WHERE published_at IS NULL`

// naiveRelayOnce is one poll of the relay most outbox samples ship: select
// unpublished rows, then for each one an XADD and an UPDATE, one round trip
// each. It returns how many rows it published.
func naiveRelayOnce(ctx context.Context, e *env, key string) (int, error) {
	rows, err := e.pool.Query(ctx, `SELECT id, event_id::text, aggregate_type, aggregate_id, event_type, payload::text, created_at
		FROM naive_outbox WHERE published_at IS NULL ORDER BY id LIMIT 100`)
	if err != nil {
		return 0, err
	}
	type row struct {
		id                                 int64
		eventID, aggType, aggID, typ, body string
		at                                 time.Time
	}
	var batch []row
	var r row
	_, err = pgx.ForEachRow(rows, []any{&r.id, &r.eventID, &r.aggType, &r.aggID, &r.typ, &r.body, &r.at}, func() error {
		batch = append(batch, r)
		return nil
	})
	if err != nil {
		return 0, err
	}
	for _, r := range batch {
		ev := stream.Event{EventID: r.eventID, EventType: r.typ, AggregateType: r.aggType, AggregateID: r.aggID, Payload: r.body, OccurredAt: r.at}
		cmd := e.redis.B().Xadd().Key(key).Id("*").FieldValue()
		f := ev.Fields()
		for i := 0; i < len(f); i += 2 {
			cmd = cmd.FieldValue(f[i], f[i+1])
		}
		if err := e.redis.Do(ctx, cmd.Build()).Error(); err != nil {
			return 0, err
		}
		if _, err := e.pool.Exec(ctx, `UPDATE naive_outbox SET published_at = now() WHERE id = $1`, r.id); err != nil {
			return 0, err
		}
	}
	return len(batch), nil
}

// drainConfig is the relay of the drain measurements (retention on, its
// default), publishing to redisURL under prefix; the cluster step uses it
// too, so that both drain with the same settings.
func drainConfig(e *env, prefix, redisURL string, cluster bool) relay.Config {
	return relay.Config{Config: quiet, DatabaseURL: e.dbURL, DBMaxConns: 4, RedisURL: redisURL, RedisCluster: cluster,
		StreamPrefix: prefix, BatchSize: 1000, PollInterval: 5 * time.Second, DedupeWindow: 24 * time.Hour,
		Retention: 24 * time.Hour, DrainTimeout: time.Hour, ReconnectDelay: time.Second}
}

func benchDrain(ctx context.Context, e *env, s Settings) ([]Figure, error) {
	prefix := e.freshPrefix("drain")
	// The relay as deployed (retention on, its default) and without it,
	// to show what keeping relayed events in PostgreSQL costs.
	newRelay := func(retention time.Duration) (*relay.Service, error) {
		cfg := drainConfig(e, prefix, redistest.URL(), false)
		cfg.Retention = retention
		return relay.New(ctx, cfg, logging.New(nopWriter{}, quiet))
	}
	rl, err := newRelay(24 * time.Hour)
	if err != nil {
		return nil, err
	}
	defer rl.Close()
	bare, err := newRelay(0)
	if err != nil {
		return nil, err
	}
	defer bare.Close()
	if _, err := e.pool.Exec(ctx, `TRUNCATE outbox`); err != nil {
		return nil, err
	}
	drainWith := func(rl *relay.Service) (float64, error) {
		if err := fill(ctx, e, "outbox", s.Backlog); err != nil {
			return 0, err
		}
		t := time.Now()
		res, err := rl.Drain(ctx, time.Time{})
		if err != nil {
			return 0, fmt.Errorf("relay drain: %w", err)
		}
		rate := float64(res.Relayed) / time.Since(t).Seconds()
		if res.Relayed != s.Backlog {
			return 0, fmt.Errorf("relay drained %d of %d rows", res.Relayed, s.Backlog)
		}
		e.deleteKeys(ctx, prefix)
		// A fresh start for the next round: no retained rows to grow the
		// table, no records of the streams just deleted.
		_, err = e.pool.Exec(ctx, `TRUNCATE outbox_retained, outbox_relayed_rows, outbox_relay_batches, outbox_streams`)
		return rate, err
	}
	var rawRate, relayRate, bareRate []float64
	for round := range 3 {
		if err := fill(ctx, e, "outbox", s.Backlog); err != nil {
			return nil, err
		}
		t := time.Now()
		n, err := rawDrain(ctx, e)
		if err != nil {
			return nil, fmt.Errorf("raw drain: %w", err)
		}
		rawRate = append(rawRate, float64(n)/time.Since(t).Seconds())
		r, err := drainWith(rl)
		if err != nil {
			return nil, err
		}
		relayRate = append(relayRate, r)
		if r, err = drainWith(bare); err != nil {
			return nil, err
		}
		bareRate = append(bareRate, r)
		e.logf("round %d: raw %.0f rows/s, relay %.0f events/s, relay without retention %.0f events/s",
			round+1, rawRate[round], relayRate[round], bareRate[round])
	}

	// Re-publication: the stream of a drained backlog is deleted (as a
	// flush would), and the next drain publishes it again from PostgreSQL.
	if err := fill(ctx, e, "outbox", s.Backlog); err != nil {
		return nil, err
	}
	if _, err := rl.Drain(ctx, time.Time{}); err != nil {
		return nil, fmt.Errorf("relay drain: %w", err)
	}
	e.deleteKeys(ctx, prefix)
	t0 := time.Now()
	res, err := rl.Drain(ctx, time.Time{})
	if err != nil {
		return nil, fmt.Errorf("re-publication: %w", err)
	}
	if res.Replayed != s.Backlog {
		return nil, fmt.Errorf("re-published %d of %d events", res.Replayed, s.Backlog)
	}
	replayRate := float64(res.Replayed) / time.Since(t0).Seconds()
	e.logf("re-publication of %d events: %.0f events/s", res.Replayed, replayRate)
	e.deleteKeys(ctx, prefix)
	if _, err := e.pool.Exec(ctx, `TRUNCATE outbox_retained, outbox_relayed_rows, outbox_relay_batches, outbox_streams`); err != nil {
		return nil, err
	}

	if _, err := e.pool.Exec(ctx, naiveTable); err != nil {
		return nil, err
	}
	if err := fill(ctx, e, "naive_outbox", s.NaiveBacklog); err != nil {
		return nil, err
	}
	t := time.Now()
	naive := 0
	for {
		n, err := naiveRelayOnce(ctx, e, prefix+"naive")
		if err != nil {
			return nil, fmt.Errorf("naive relay: %w", err)
		}
		naive += n
		if n == 0 {
			break
		}
	}
	naiveRate := float64(naive) / time.Since(t).Seconds()
	e.logf("naive relay: %.0f events/s over %d rows", naiveRate, naive)
	e.deleteKeys(ctx, prefix)
	if _, err := e.pool.Exec(ctx, `TRUNCATE naive_outbox`); err != nil {
		return nil, err
	}

	// Medians: one round may meet a checkpoint flushing the last round's
	// million row changes.
	relayAvg, rawAvg, bareAvg := median(relayRate), median(rawRate), median(bareRate)
	return []Figure{
		compare(fmt.Sprintf("relay drain of %d rows", s.Backlog), relayAvg, "events/s", "raw SQL drain, no Redis", rawAvg).
			target("ratio >= 0.5", relayAvg/rawAvg >= 0.5),
		compare("cost of retention (RELAY_RETENTION)", relayAvg, "events/s", "the same relay with RELAY_RETENTION=0", bareAvg),
		compare(fmt.Sprintf("re-publication of %d events after their stream was deleted", s.Backlog), replayRate, "events/s",
			"the relay's drain with retention", relayAvg),
		compare("relay drain vs the naive relay", relayAvg, "events/s", "naive: poll, XADD+UPDATE per row", naiveRate).
			target("ratio >= 10", relayAvg/naiveRate >= 10),
	}, nil
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

// watcher records when each event id arrives on a stream.
type watcher struct {
	mu      sync.Mutex
	arrived map[string]time.Time
	cancel  context.CancelFunc
	done    chan struct{}
}

func watch(ctx context.Context, client rueidis.Client, key string) *watcher {
	ctx, cancel := context.WithCancel(ctx)
	w := &watcher{arrived: map[string]time.Time{}, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		last := "0" // the stream is new; "$" would skip entries added between two reads
		for ctx.Err() == nil {
			res, err := client.Do(ctx, client.B().Xread().Count(1000).Block(200).Streams().Key(key).Id(last).Build()).AsXRead()
			if err != nil {
				continue
			}
			now := time.Now()
			w.mu.Lock()
			for _, entry := range res[key] {
				w.arrived[entry.FieldValues[stream.FieldEventID]] = now
				last = entry.ID
			}
			w.mu.Unlock()
		}
	}()
	return w
}

func (w *watcher) stop() {
	w.cancel()
	<-w.done
}

// latencies returns arrival minus commit for every committed event, waiting
// up to wait for stragglers; a missing event counts as wait.
func (w *watcher) latencies(committed map[string]time.Time, wait time.Duration) []time.Duration {
	deadline := time.Now().Add(wait)
	for {
		w.mu.Lock()
		n := len(w.arrived)
		w.mu.Unlock()
		if n >= len(committed) || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([]time.Duration, 0, len(committed))
	for id, at := range committed {
		if got, ok := w.arrived[id]; ok {
			out = append(out, got.Sub(at))
		} else {
			out = append(out, wait)
		}
	}
	return out
}

// produce inserts one event at a time into table at rate per second for d,
// and returns each event's commit time.
func produce(ctx context.Context, e *env, table string, rate int, d time.Duration) (map[string]time.Time, error) {
	committed := map[string]time.Time{}
	ticker := time.NewTicker(time.Second / time.Duration(rate))
	defer ticker.Stop()
	end := time.Now().Add(d)
	for i := 0; time.Now().Before(end); i++ {
		<-ticker.C
		var id string
		err := e.pool.QueryRow(ctx, `INSERT INTO `+table+` (aggregate_type, aggregate_id, event_type, payload)
			VALUES ('user', $1, 'user.created', json_build_object('user_id', $2::int)) RETURNING event_id::text`,
			strconv.Itoa(i), i).Scan(&id)
		if err != nil {
			return nil, err
		}
		committed[id] = time.Now()
	}
	return committed, nil
}

func benchWakeup(ctx context.Context, e *env, s Settings) ([]Figure, error) {
	prefix := e.freshPrefix("wake")
	rl, err := startRelay(ctx, e, prefix)
	if err != nil {
		return nil, err
	}
	w := watch(ctx, e.redis, prefix+"user")
	time.Sleep(200 * time.Millisecond) // the listener connects, the watcher blocks
	committed, err := produce(ctx, e, "outbox", s.WakeRate, s.WakeDuration)
	if err != nil {
		return nil, err
	}
	lat := w.latencies(committed, 5*time.Second)
	w.stop()
	rl.Stop()
	rl.Close()

	// The naive relay, polling every second.
	if _, err := e.pool.Exec(ctx, naiveTable); err != nil {
		return nil, err
	}
	nw := watch(ctx, e.redis, prefix+"naive")
	pollCtx, stopPolling := context.WithCancel(ctx)
	var polling sync.WaitGroup
	polling.Go(func() {
		ticker := time.NewTicker(time.Second)
		defer ticker.Stop()
		for {
			select {
			case <-pollCtx.Done():
				return
			case <-ticker.C:
			}
			for {
				n, err := naiveRelayOnce(pollCtx, e, prefix+"naive")
				if err != nil || n == 0 {
					break
				}
			}
		}
	})
	naiveCommitted, err := produce(ctx, e, "naive_outbox", s.WakeRate, s.NaiveWakeDuration)
	if err != nil {
		stopPolling()
		return nil, err
	}
	naiveLat := nw.latencies(naiveCommitted, 3*time.Second)
	stopPolling()
	polling.Wait()
	nw.stop()
	e.deleteKeys(ctx, prefix)

	p50, p99 := ms(percentile(lat, 50)), ms(percentile(lat, 99))
	e.logf("relay: %d events, p50 %.2f ms, p99 %.2f ms, max %.2f ms", len(lat), p50, p99, ms(percentile(lat, 100)))
	n50, n99 := ms(percentile(naiveLat, 50)), ms(percentile(naiveLat, 99))
	return []Figure{
		compare(fmt.Sprintf("commit-to-stream p50 at %d/s", s.WakeRate), p50, "ms", "naive relay, 1 s poll", n50).
			target("<= 3 ms", p50 <= 3),
		compare(fmt.Sprintf("commit-to-stream p99 at %d/s", s.WakeRate), p99, "ms", "naive relay, 1 s poll", n99).
			target("<= 15 ms", p99 <= 15),
	}, nil
}

// benchMemory drains growing backlogs, each in a child process, and reads
// the child's peak RSS.
func benchMemory(ctx context.Context, e *env, s Settings) ([]Figure, error) {
	if len(s.RSSBacklogs) == 0 {
		return nil, nil
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	var figures []Figure
	var first float64
	for _, n := range s.RSSBacklogs {
		if _, err := e.pool.Exec(ctx, `TRUNCATE outbox`); err != nil {
			return nil, err
		}
		if err := fill(ctx, e, "outbox", n); err != nil {
			return nil, err
		}
		prefix := e.freshPrefix("rss")
		out, err := exec.CommandContext(ctx, exe, "-rss-child", e.dbURL, "-rss-prefix", prefix).Output()
		e.deleteKeys(ctx, prefix)
		if err != nil {
			return nil, fmt.Errorf("child drain of %d rows: %w", n, err)
		}
		var child rssReport
		if err := json.Unmarshal(out, &child); err != nil {
			return nil, fmt.Errorf("child report %q: %w", out, err)
		}
		if child.Relayed != n {
			return nil, fmt.Errorf("child drained %d of %d rows", child.Relayed, n)
		}
		mb := float64(child.PeakRSSKiB) / 1024
		e.logf("backlog %d: peak RSS %.1f MB, %.0f events/s", n, mb, child.Rate)
		f := Figure{Name: fmt.Sprintf("relay peak RSS draining %d rows", n), Value: mb, Unit: "MB"}
		if first == 0 {
			first = mb
		} else {
			f = compare(f.Name, mb, "MB", fmt.Sprintf("at %d rows", s.RSSBacklogs[0]), first)
		}
		figures = append(figures, f.target("<= 100 MB, flat", mb <= 100))
	}
	return figures, nil
}

type rssReport struct {
	Relayed    int     `json:"relayed"`
	PeakRSSKiB int64   `json:"peak_rss_kib"`
	Rate       float64 `json:"rate"`
}

// rssChildMain drains the outbox of dbURL with default relay settings and
// prints the process's peak RSS (VmHWM) as JSON.
func rssChildMain(ctx context.Context, dbURL, prefix string) error {
	rl, err := relay.New(ctx, relay.Config{Config: quiet, DatabaseURL: dbURL, DBMaxConns: 4, RedisURL: redistest.URL(),
		StreamPrefix: prefix, BatchSize: 1000, PollInterval: 5 * time.Second, DedupeWindow: 24 * time.Hour, Retention: 24 * time.Hour,
		DrainTimeout: time.Hour, ReconnectDelay: time.Second}, logging.New(nopWriter{}, quiet))
	if err != nil {
		return err
	}
	defer rl.Close()
	t := time.Now()
	res, err := rl.Drain(ctx, time.Time{})
	if err != nil {
		return err
	}
	rate := float64(res.Relayed) / time.Since(t).Seconds()
	peak, err := peakRSS()
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(rssReport{Relayed: res.Relayed, PeakRSSKiB: peak, Rate: rate})
}

func peakRSS() (int64, error) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("VmHWM not found in /proc/self/status")
}

// benchIdle measures the relay's CPU while it has nothing to do, first
// alone, then while other sessions hold transactions open: one with an xid
// in another database, one with an xid in this one, and one holding an
// outbox row it has not committed, which the relay watches until it ends.
// Events keep arriving at 2/s throughout, and their latency is reported.
func benchIdle(ctx context.Context, e *env, s Settings) ([]Figure, error) {
	prefix := e.freshPrefix("idle")
	defer e.deleteKeys(ctx, prefix)
	rl, err := startRelay(ctx, e, prefix)
	if err != nil {
		return nil, err
	}
	defer func() { rl.Stop(); rl.Close() }()
	w := watch(ctx, e.redis, prefix+"user")
	defer w.stop()
	time.Sleep(300 * time.Millisecond)

	measure := func(d time.Duration) (cpu float64, txPerSec float64, lat []time.Duration, err error) {
		tx0, err := dbTransactions(ctx, e)
		if err != nil {
			return 0, 0, nil, err
		}
		cpu0, start := processCPU(), time.Now()
		committed, err := produce(ctx, e, "outbox", 2, d)
		if err != nil {
			return 0, 0, nil, err
		}
		elapsed := time.Since(start)
		cpu = (processCPU() - cpu0).Seconds() / elapsed.Seconds() * 100
		time.Sleep(1100 * time.Millisecond) // backends flush statistics at most once a second
		tx1, err := dbTransactions(ctx, e)
		if err != nil {
			return 0, 0, nil, err
		}
		return cpu, float64(tx1-tx0) / elapsed.Seconds(), w.latencies(committed, 5*time.Second), nil
	}
	baseCPU, baseTx, _, err := measure(s.IdleBaseline)
	if err != nil {
		return nil, err
	}

	otherURL, drop, err := pgtest.Create(ctx, "bench_idle_"+strconv.FormatInt(time.Now().UnixNano(), 36))
	if err != nil {
		return nil, err
	}
	defer drop(context.WithoutCancel(ctx)) //nolint:errcheck // a leftover database is dropped by the next run's cleanup
	var held []*pgx.Conn
	defer func() {
		for _, c := range held {
			c.Close(context.WithoutCancel(ctx))
		}
	}()
	for _, open := range []struct{ url, sql string }{
		{otherURL, `SELECT pg_current_xact_id()`},
		{e.dbURL, `SELECT pg_current_xact_id()`},
		{e.dbURL, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('held', '1', 'held', '{}')`},
	} {
		c, err := pgx.Connect(ctx, open.url)
		if err != nil {
			return nil, err
		}
		held = append(held, c)
		if _, err := c.Exec(ctx, "BEGIN; "+open.sql); err != nil {
			return nil, err
		}
	}
	cpu, tx, lat, err := measure(s.IdleDuration)
	if err != nil {
		return nil, err
	}
	e.logf("idle relay: %.2f%% of a core alone, %.2f%% with 3 open transactions over %s; %.1f vs %.1f transactions/s; events p50 %.2f ms, max %.2f ms",
		baseCPU, cpu, s.IdleDuration, baseTx, tx, ms(percentile(lat, 50)), ms(percentile(lat, 100)))
	return []Figure{
		compare("idle relay CPU, 3 transactions held open", cpu, "% of a core", "idle relay, none open", baseCPU).
			target("< 1%", cpu < 1).
			note(fmt.Sprintf("over %s; %.1f transactions/s against PostgreSQL (%.1f alone); events meanwhile p50 %.2f ms",
				s.IdleDuration, tx, baseTx, ms(percentile(lat, 50)))),
	}, nil
}

// processCPU is the CPU time this process has used, user and system.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// dbTransactions counts the transactions the bench database has run.
func dbTransactions(ctx context.Context, e *env) (int64, error) {
	conn, err := e.pool.Acquire(ctx)
	if err != nil {
		return 0, err
	}
	defer conn.Release()
	var n int64
	err = conn.QueryRow(ctx, `SELECT xact_commit + xact_rollback FROM pg_stat_database, pg_stat_clear_snapshot()
		WHERE datname = current_database()`).Scan(&n)
	return n, err
}

// benchWait measures what RELAY_REDIS_WAIT_REPLICAS=1 costs: the relay
// drains the same backlog into a private primary with one replica, with and
// without waiting for the replica's confirmation of each batch.
func benchWait(ctx context.Context, e *env, s Settings) ([]Figure, error) {
	primary, err := startRedis(ctx)
	if err != nil {
		return nil, err
	}
	defer primary.stop()
	replica, err := startRedis(ctx, "--replicaof", "127.0.0.1", strconv.Itoa(primary.port))
	if err != nil {
		return nil, err
	}
	defer replica.stop()
	if _, err := e.pool.Exec(ctx, `TRUNCATE outbox`); err != nil {
		return nil, err
	}
	drain := func(wait int) (float64, int, error) {
		rl, err := relay.New(ctx, relay.Config{Config: quiet, DatabaseURL: e.dbURL, DBMaxConns: 4, RedisURL: primary.url(),
			StreamPrefix: e.freshPrefix("wait"), BatchSize: 1000, PollInterval: 5 * time.Second, DedupeWindow: 24 * time.Hour, Retention: 24 * time.Hour,
			DrainTimeout: time.Hour, ReconnectDelay: time.Second, WaitReplicas: wait, WaitTimeout: time.Second},
			logging.New(nopWriter{}, quiet))
		if err != nil {
			return 0, 0, err
		}
		defer rl.Close()
		if err := fill(ctx, e, "outbox", s.WaitBacklog); err != nil {
			return 0, 0, err
		}
		t := time.Now()
		res, err := rl.Drain(ctx, time.Time{})
		if err != nil {
			return 0, 0, err
		}
		return float64(res.Relayed) / time.Since(t).Seconds(), res.Unreplicated, nil
	}
	var plain, waited []float64
	unreplicated := 0
	for range 3 {
		r, _, err := drain(0)
		if err != nil {
			return nil, err
		}
		plain = append(plain, r)
		r, u, err := drain(1)
		if err != nil {
			return nil, err
		}
		waited, unreplicated = append(waited, r), unreplicated+u
	}
	p, w := median(plain), median(waited)
	e.logf("relay into a primary with one replica: %.0f events/s, %.0f with WAIT 1 (%d batches unconfirmed)", p, w, unreplicated)
	return []Figure{
		compare(fmt.Sprintf("relay drain of %d rows, WAIT for 1 replica", s.WaitBacklog), w, "events/s", "the same, no WAIT", p).
			note(fmt.Sprintf("private primary + replica on this machine; %d batches unconfirmed", unreplicated)),
	}, nil
}

// redisProcess is a private redis-server the benchmark starts and kills.
type redisProcess struct {
	port int
	cmd  *exec.Cmd
	dir  string
}

func (r *redisProcess) url() string { return fmt.Sprintf("redis://127.0.0.1:%d/0", r.port) }

func (r *redisProcess) stop() {
	_ = r.cmd.Process.Kill()
	_ = r.cmd.Wait()
	_ = os.RemoveAll(r.dir)
}

// startRedis starts redis-server on a free loopback port, without
// persistence, and waits until it answers (and, for a replica, until its
// link to the primary is up).
func startRedis(ctx context.Context, args ...string) (*redisProcess, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	_ = ln.Close()
	// A directory of its own: a replica writes the copy it receives there.
	dir, err := os.MkdirTemp("", "bench-redis-")
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, "redis-server", append([]string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--logfile", "", "--dir", dir}, args...)...)
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("start redis-server: %w", err)
	}
	r := &redisProcess{port: port, cmd: cmd, dir: dir}
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		out, err := exec.CommandContext(ctx, "redis-cli", "-p", strconv.Itoa(port), "INFO", "replication").Output()
		if err == nil && (len(args) == 0 || strings.Contains(string(out), "master_link_status:up")) {
			return r, nil
		}
	}
	r.stop()
	return nil, fmt.Errorf("redis-server on port %d did not come up", port)
}
