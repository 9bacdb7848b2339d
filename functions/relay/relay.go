// Package relay is the function that moves committed outbox rows into Redis
// Streams: woken by LISTEN/NOTIFY, with a fallback poll, in batches of one
// transaction and one Redis round trip each.
//
// # Guarantees
//
// Every committed outbox row reaches its stream (<prefix><aggregate type>) at
// least once, or the outbox_dead table when Redis refuses it, and the relay
// suppresses its own re-publications (see [Publisher]). Entries are in id
// order within a batch and in claim order across batches (see [Drainer.Drain]
// and the README for what that means per aggregate). One relay drains at a
// time, holding an advisory lock; other instances wait for it and take over
// when its session ends.
//
// # Invocation
//
// POST / (or /Relay) drains until the outbox is empty or the deadline is near
// and answers with what it did. While the process lives, a background loop
// also drains on every notification, every poll interval, and whenever a
// transaction that might have skipped the doorbell ends.
package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/GoogleCloudPlatform/functions-framework-go/functions"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgxlisten"
	"github.com/redis/rueidis"
	"github.com/sethvargo/go-retry"

	"github.com/outboxfn/outbox/shared/httpjson"
	"github.com/outboxfn/outbox/shared/outbox"
	"github.com/outboxfn/outbox/shared/pg"
	"github.com/outboxfn/outbox/shared/serve"
	"github.com/outboxfn/outbox/shared/stream"
	"github.com/outboxfn/outbox/shared/telemetry"
)

// Name is the function's name in the Functions Framework.
const Name = "Relay"

// Function is the function as the Functions Framework and shared/serve run
// it: one service, built lazily from the environment on first use.
var Function = serve.Define(Name, New)

func init() { functions.HTTP(Name, Function.Handler.ServeHTTP) }

// Service is the relay: an HTTP trigger and a background loop around one
// Drainer.
type Service struct {
	cfg     Config
	pool    *pgxpool.Pool
	redis   rueidis.Client
	drainer *Drainer
	logger  *slog.Logger
	bg      serve.Background

	// bell is rung by notifications; one slot, so a burst of them causes
	// one drain, not one each.
	bell chan struct{}
	// listening is true while the LISTEN connection is up.
	listening atomic.Bool
	// looping is true while the background loop runs.
	looping atomic.Bool
	// heard is when the listener last heard a notification (UnixNano);
	// pingEvery is how often the relays ping it.
	heard     atomic.Int64
	pingEvery time.Duration

	// handler is serveHTTP inside the request's server span and metrics;
	// unobserve unregisters the outbox gauges.
	handler   http.Handler
	unobserve func() error
}

// New builds a relay from cfg. Nothing connects until it is used.
func New(ctx context.Context, cfg Config, logger *slog.Logger) (*Service, error) {
	// A batch's transaction is idle while its events go to Redis, for at
	// most the publish timeout (5 s); a session idle in a transaction for
	// longer lost its relay, and the server ends it and frees its locks.
	pool, err := pg.NewPool(ctx, cfg.DatabaseURL, pg.PoolConfig{MaxConns: cfg.DBMaxConns, Direct: true, IdleInTransactionTimeout: 10 * time.Second})
	if err != nil {
		return nil, err
	}
	client, err := stream.NewClient(cfg.RedisURL, cfg.RedisCluster)
	if err != nil {
		pool.Close()
		return nil, err
	}
	publisher := NewPublisher(client, cfg.StreamPrefix, cfg.DedupeWindow)
	publisher.waitReplicas, publisher.waitTimeout = int64(cfg.WaitReplicas), cfg.WaitTimeout
	publisher.partitions = max(cfg.StreamPartitions, 1)
	// A relay waiting for another's drain lock gives up after a poll
	// interval and tries again on its next wake-up.
	drainer := NewDrainer(pool, publisher, cfg.BatchSize, cfg.PollInterval, logger)
	drainer.retention, publisher.track = cfg.Retention, cfg.Retention > 0
	drainer.tel = newInstruments(cfg.Telemetry)
	if cfg.TrimInterval > 0 {
		drainer.trimmer, drainer.trimEvery = NewTrimmer(client, cfg.StreamPrefix, cfg.StreamRetention), cfg.TrimInterval
	}
	s := &Service{
		cfg: cfg, pool: pool, redis: client, drainer: drainer, logger: logger,
		bell: make(chan struct{}, 1), pingEvery: defaultPingEvery,
	}
	s.handler = telemetry.HTTPHandler(Name, cfg.Telemetry, http.HandlerFunc(s.serveHTTP))
	if err := s.observeOutbox(cfg.Telemetry); err != nil {
		s.Close()
		return nil, fmt.Errorf("register outbox gauges: %w", err)
	}
	return s, nil
}

// Start starts the background loop unless BACKGROUND is false. It refuses
// to start when PostgreSQL's records of the streams show another
// STREAM_PARTITIONS (ErrPartitionsChanged); a PostgreSQL it cannot reach
// is not an error here: every drain checks again.
func (s *Service) Start(ctx context.Context) error {
	if err := s.drainer.checkPartitions(ctx); errors.Is(err, ErrPartitionsChanged) {
		return err
	} else if err != nil {
		s.logger.WarnContext(ctx, "could not check the streams' number of partitions; each drain checks it", slog.Any("error", err))
	}
	if !s.cfg.Background {
		return nil
	}
	return s.bg.Start(ctx, s.run)
}

// Stop ends the background loop; a batch in flight is committed or rolled
// back first.
func (s *Service) Stop() { s.bg.Stop() }

// HandlerTimeout is the write deadline of this function's requests:
// a triggered drain runs up to RELAY_DRAIN_TIMEOUT, and the answer needs a moment after it.
func (s *Service) HandlerTimeout() time.Duration { return s.cfg.DrainTimeout + 5*time.Second }

// Close releases the pool and the Redis client.
func (s *Service) Close() {
	if s.unobserve != nil {
		_ = s.unobserve()
	}
	s.pool.Close()
	s.redis.Close()
}

// Drain moves rows to the streams until the outbox is empty or stopBy (if
// not zero) has passed; it is what the HTTP trigger runs.
func (s *Service) Drain(ctx context.Context, stopBy time.Time) (Result, error) {
	return s.drainer.Drain(ctx, stopBy)
}

// Backlog measures what waits in the outbox.
func (s *Service) Backlog(ctx context.Context) (outbox.Backlog, error) {
	return outbox.MeasureBacklog(ctx, s.pool)
}

// Health checks PostgreSQL and Redis and reports the backlog.
func (s *Service) Health(ctx context.Context) serve.Health {
	h := serve.Check(ctx, map[string]func(context.Context) error{
		"postgres": s.pool.Ping,
		"redis":    func(ctx context.Context) error { return stream.Ping(ctx, s.redis) },
	})
	details := map[string]any{"listening": s.listening.Load()}
	if b, err := s.Backlog(ctx); err == nil {
		details["backlog"], details["oldest_age_seconds"] = b.Events, b.OldestAgeSeconds
	}
	if d, err := outbox.MeasureDead(ctx, s.pool); err == nil {
		// Events Redis refused: each one is worth an alert.
		details["dead"] = d.Count
	}
	h.Details = details
	return h
}

// run is the background loop: listen, and drain on every wake-up.
func (s *Service) run(ctx context.Context) {
	s.looping.Store(true)
	defer s.looping.Store(false)
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { s.listen(ctx) })

	poll := time.NewTimer(jitter(s.cfg.PollInterval))
	defer poll.Stop()
	var w watch
	defer w.stop()
	var failing *retry.Backoff
	var failingSince time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.bell:
		case <-poll.C:
		case <-w.due():
			if ended, err := w.check(ctx, s.pool); err == nil && !ended {
				continue
			}
		}
		start := time.Now()
		res, err := s.drainer.Drain(ctx, time.Time{})
		if err != nil && ctx.Err() != nil {
			return
		}
		if errors.Is(err, ErrBusy) {
			// Another relay drains (and watches the outbox's writers);
			// wait for its lock again.
			s.ring()
			continue
		}
		if err != nil {
			if failing == nil {
				failing, failingSince = newBackoff(), time.Now()
				s.logger.ErrorContext(ctx, "relay failing; rows stay in the outbox and are retried", slog.Any("error", err))
			}
			delay, _ := (*failing).Next()
			select {
			case <-ctx.Done():
				return
			case <-time.After(delay):
			}
			s.ring()
			continue
		}
		if failing != nil {
			s.logger.InfoContext(ctx, "relay recovered", slog.Duration("after", time.Since(failingSince)))
			failing = nil
		}
		s.warnUnreplicated(ctx, res)
		if res.Batches > 0 {
			s.logger.DebugContext(ctx, "drained",
				slog.Int("relayed", res.Relayed), slog.Int("duplicates_skipped", res.Duplicates),
				slog.Int("dead", res.Dead), slog.Int("batches", res.Batches), slog.Duration("duration", time.Since(start)))
		}
		w.reset(res.Writers)
		poll.Reset(jitter(s.cfg.PollInterval))
	}
}

// Re-checks of the outbox's writers start watchFirst after a drain and
// back off to watchMax: a writer that ends within milliseconds (a request
// in flight) is seen within milliseconds, one that stays open (a forgotten
// BEGIN, a backfill) costs a cheap query a few times a second, and only the
// rows it writes wait for it. Writers are watched until they end.
const (
	watchFirst = 2 * time.Millisecond
	watchMax   = 250 * time.Millisecond
)

// watch holds the outbox's writers at the end of the last drain and a
// timer for re-checking them.
type watch struct {
	writers writers
	delay   time.Duration
	timer   *time.Timer
}

// reset watches ws: from watchFirst on if it holds a writer not watched
// before, else at the pace reached, so that a writer that stays open is not
// re-checked from scratch after every drain.
func (w *watch) reset(ws writers) {
	if w.delay == 0 || !w.writers.holdsAll(ws) {
		w.delay = watchFirst
	}
	w.writers = ws
	w.arm()
}

func (w *watch) arm() {
	if len(w.writers) == 0 {
		w.stop()
		return
	}
	if w.timer == nil {
		w.timer = time.NewTimer(w.delay)
	} else {
		w.timer.Reset(w.delay)
	}
}

func (w *watch) stop() {
	if w.timer != nil {
		w.timer.Stop()
	}
}

// due fires when the writers should be checked; nil (never) when there
// are none.
func (w *watch) due() <-chan time.Time {
	if len(w.writers) == 0 || w.timer == nil {
		return nil
	}
	return w.timer.C
}

// check reports whether a watched writer has ended; if none has, it backs
// off and re-arms.
func (w *watch) check(ctx context.Context, q querier) (bool, error) {
	now, err := outboxWriters(ctx, q)
	if err == nil && w.writers.anyEnded(now) {
		w.writers = nil
		return true, nil
	}
	w.delay = min(2*w.delay, watchMax)
	w.arm()
	return false, err
}

// warnUnreplicated logs the batches of a drain that no replica confirmed.
func (s *Service) warnUnreplicated(ctx context.Context, res Result) {
	if res.Unreplicated > 0 {
		s.logger.WarnContext(ctx, "batches committed without the replicas' confirmation (WAIT timed out or was refused); a Redis failover now could drop them",
			slog.Int("batches", res.Unreplicated), slog.Int("replicas_asked", s.cfg.WaitReplicas))
	}
}

func (s *Service) ring() {
	select {
	case s.bell <- struct{}{}:
	default:
	}
}

// pingChannel carries the relays' pings: an empty notification each relay
// sends every pingEvery, so that every listener hears something at least
// that often while its connection works.
const (
	pingChannel      = "outbox_relay_ping"
	defaultPingEvery = 30 * time.Second
)

// listen keeps a LISTEN connection up and rings the bell on every
// notification and after every (re)connect, when notifications sent while
// disconnected may have been lost.
//
// A connection can also go deaf without failing: a network that drops
// packets silently leaves it waiting for a notification that never comes,
// for as long as TCP keepalive takes, or for ever over a proxy that still
// answers. So the relay pings the channel pingChannel every pingEvery and
// starts the listener again when it heard nothing for two pings.
func (s *Service) listen(ctx context.Context) {
	for ctx.Err() == nil {
		lctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			s.listenUntil(lctx)
		}()
		deaf := s.watchListener(lctx)
		cancel()
		<-done
		if deaf && s.listening.Swap(false) {
			s.logger.WarnContext(ctx, "listener heard nothing, not even the relays' pings; reconnecting",
				slog.Duration("silent_for", s.deafAfter()))
		}
	}
}

func (s *Service) listenUntil(ctx context.Context) {
	l := &pgxlisten.Listener{
		Connect: func(ctx context.Context) (*pgx.Conn, error) {
			return pg.Connect(ctx, s.cfg.DatabaseURL, 5*time.Second)
		},
		LogError: func(ctx context.Context, err error) {
			if ctx.Err() != nil {
				return
			}
			if s.listening.Swap(false) {
				s.logger.WarnContext(ctx, "listener disconnected; reconnecting", slog.Any("error", err))
			}
		},
		ReconnectDelay: s.cfg.ReconnectDelay,
	}
	l.Handle(outbox.Channel, doorbell{s})
	l.Handle(pingChannel, pong{s})
	_ = l.Listen(ctx) // returns only when ctx is done
}

// watchListener pings every pingEvery until ctx is done, and reports true
// as soon as a connected listener has heard nothing for two pings.
func (s *Service) watchListener(ctx context.Context) (deaf bool) {
	s.hear()
	ticker := time.NewTicker(s.pingEvery)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case <-ticker.C:
		}
		if s.listening.Load() && time.Since(time.Unix(0, s.heard.Load())) > s.deafAfter() {
			return true
		}
		go func() {
			ctx, cancel := context.WithTimeout(ctx, s.pingEvery)
			defer cancel()
			conn, err := s.pool.Acquire(ctx)
			if err != nil {
				if st := s.pool.Stat(); st.AcquiredConns() >= st.MaxConns() {
					// The pool was busy, not the network: this ping says
					// nothing about the listener.
					s.hear()
				}
				return
			}
			defer conn.Release()
			_, _ = conn.Exec(ctx, "SELECT pg_notify('"+pingChannel+"', '')") // a failure shows as silence
		}()
	}
}

// hear notes that the listener heard something.
func (s *Service) hear() { s.heard.Store(time.Now().UnixNano()) }

// deafAfter is the silence after which a listener counts as deaf: two pings
// and a half, so that one ping late by less than an interval is not silence.
func (s *Service) deafAfter() time.Duration { return 5 * s.pingEvery / 2 }

// doorbell is the LISTEN handler. It only rings: draining inline would stall
// the listener.
type doorbell struct{ s *Service }

func (d doorbell) HandleNotification(context.Context, *pgconn.Notification, *pgx.Conn) error {
	d.s.hear()
	d.s.ring()
	return nil
}

func (d doorbell) HandleBacklog(ctx context.Context, _ string, _ *pgx.Conn) error {
	d.s.hear()
	if !d.s.listening.Swap(true) {
		d.s.logger.InfoContext(ctx, "listening for outbox notifications")
	}
	d.s.ring()
	return nil
}

// pong hears the relays' pings.
type pong struct{ s *Service }

func (p pong) HandleNotification(context.Context, *pgconn.Notification, *pgx.Conn) error {
	p.s.hear()
	return nil
}

// ServeHTTP is the trigger: POST drains and reports.
func (s *Service) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.handler.ServeHTTP(w, r) }

func (s *Service) serveHTTP(w http.ResponseWriter, r *http.Request) {
	if !httpjson.Method(w, r, http.MethodPost) {
		return
	}
	if !serve.Authorized(w, r, s.cfg.TriggerToken) {
		return
	}
	ctx := r.Context()
	stopBy := time.Now().Add(s.cfg.DrainTimeout)
	if d, ok := ctx.Deadline(); ok && d.Add(-time.Second).Before(stopBy) {
		stopBy = d.Add(-time.Second)
	}
	ctx, cancel := context.WithDeadline(ctx, stopBy.Add(500*time.Millisecond))
	defer cancel()
	start := time.Now()
	res, err := s.drainer.Drain(ctx, stopBy)
	if err == nil {
		err = s.drainAfterWriters(ctx, &res, stopBy)
	}
	s.warnUnreplicated(ctx, res)
	busy := errors.Is(err, ErrBusy)
	if err != nil && !busy {
		s.logger.WarnContext(ctx, "triggered drain failed", slog.Any("error", err))
		httpjson.WriteError(w, r, s.logger, httpjson.Errorf(http.StatusServiceUnavailable, "unavailable",
			"drain failed (%d events relayed before it did); rows stay in the outbox and are retried", res.Relayed))
		return
	}
	backlog, err := s.Backlog(ctx)
	if err != nil {
		httpjson.WriteError(w, r, s.logger, httpjson.Errorf(http.StatusServiceUnavailable, "unavailable", "%v", err))
		return
	}
	httpjson.Write(w, http.StatusOK, struct {
		Result
		outbox.Backlog
		Busy       bool    `json:"busy"`
		DurationMS float64 `json:"duration_ms"`
	}{res, backlog, busy, float64(time.Since(start).Microseconds()) / 1000})
}

// triggerWatch bounds how long a triggered drain without a background loop
// waits for the outbox's writers to end.
const triggerWatch = time.Second

// drainAfterWriters makes sure a row whose doorbell a triggered drain kept
// quiet is not left for the next trigger, which in serverless mode is a
// minute away. With a background loop running, the loop's next drain lists
// the writers still open and watches them; without one, the trigger waits
// up to triggerWatch (and never past stopBy) for one of them to end, and
// drains again.
func (s *Service) drainAfterWriters(ctx context.Context, res *Result, stopBy time.Time) error {
	if s.looping.Load() && (len(res.Writers) > 0 || !res.Complete) {
		// The loop's next drain takes over what is left, and the writers.
		s.ring()
		return nil
	}
	if len(res.Writers) == 0 {
		return nil
	}
	until := time.Now().Add(triggerWatch)
	if stopBy.Before(until) {
		until = stopBy
	}
	var w watch
	defer w.stop()
	for len(res.Writers) > 0 {
		w.reset(res.Writers)
		for ended := false; !ended; {
			select {
			case <-ctx.Done():
				return nil
			case <-w.due():
			}
			if time.Now().After(until) {
				return nil
			}
			var err error
			if ended, err = w.check(ctx, s.pool); err != nil {
				return err
			}
		}
		more, err := s.drainer.Drain(ctx, stopBy)
		if err != nil {
			return err
		}
		res.add(more)
	}
	return nil
}

func newBackoff() *retry.Backoff {
	b := retry.NewExponential(100 * time.Millisecond)
	b = retry.WithJitterPercent(20, b)
	b = retry.WithCappedDuration(30*time.Second, b)
	return &b
}

// jitter spreads d by ±20% so that instances do not poll in lockstep.
func jitter(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
}
