// Package sendemail is the function that sends one welcome email per
// user.created event, reading the user stream through a consumer group
// (with STREAM_PARTITIONS, each partition's stream, with a loop of its own).
//
// # Delivery
//
// Entries are processed concurrently and acknowledged in batches. Entries a
// crashed consumer left pending are claimed by another (XAUTOCLAIM) after
// SENDEMAIL_CLAIM_IDLE. A transient failure (network, SMTP 4xx, timeout) is
// retried in place a few times, then left pending and retried after the
// claim time; an entry that fails permanently (SMTP 5xx for the recipient,
// an undecodable entry, a bad address) or more than SENDEMAIL_MAX_DELIVERIES
// times goes to the dead-letter stream <stream>:dead. Entries of other event
// types are acknowledged and counted, since another group may handle them.
//
// # Sending once
//
// A consumer claims the send of each email by the business fact it
// represents ("welcome:<user id>") in PostgreSQL, under a token of its own
// and with a lease longer than the longest conversation: the emails of a
// read batch 2 × SENDEMAIL_CONCURRENCY at a time, one statement each, and
// each claim is renewed right before its send if what is left of its lease
// no longer covers a whole conversation and half the rest for the mark.
// At most 2 × SENDEMAIL_CONCURRENCY emails are sent and not yet marked at
// any time, and no send starts once a mark failed.
// Once the server answered 250 to the message data
// the email is sent, whatever fails after, and is marked so before the
// entry is acknowledged. A redelivered or duplicated event finds the mark
// and is acknowledged without sending. The one window left is a send whose
// answer to the data never came (or a crash before the mark's commit): it
// is retried once after the lease, with the same Message-ID, derived from
// the event id, so the receiving side can drop that duplicate too.
package sendemail

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/GoogleCloudPlatform/functions-framework-go/functions"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/rueidis"

	"github.com/outboxfn/outbox/shared/events"
	"github.com/outboxfn/outbox/shared/httpjson"
	"github.com/outboxfn/outbox/shared/pg"
	"github.com/outboxfn/outbox/shared/serve"
	"github.com/outboxfn/outbox/shared/stream"
	"github.com/outboxfn/outbox/shared/telemetry"
)

// Name is the function's name in the Functions Framework.
const Name = "SendEmail"

// Function is the function as the Functions Framework and shared/serve run
// it: one service, built lazily from the environment on first use.
var Function = serve.Define(Name, New)

func init() { functions.HTTP(Name, Function.Handler.ServeHTTP) }

// DeadLetterStream names the dead-letter stream of a stream: {<stream>}:dead,
// in the stream's hash slot (stream.Sibling), because an entry moves there
// and is acknowledged in one script, which a Redis Cluster runs only on
// keys of one slot.
func DeadLetterStream(name string) string { return stream.Sibling(name, "dead") }

// LegacyDeadLetterStream names the dead-letter stream of a stream before
// 2026-11-24 (<stream>:dead), which is in another slot. outboxctl moves
// what it holds to DeadLetterStream.
func LegacyDeadLetterStream(name string) string { return name + ":dead" }

// Service is sendemail: an HTTP trigger and a background loop around one
// Consumer per stream (partition) of the user events.
type Service struct {
	cfg   Config
	pool  *pgxpool.Pool
	redis rueidis.Client
	// consumer reads the first (with one partition, the only) stream;
	// consumers holds it and those of the other partitions, in order.
	consumer  *Consumer
	consumers []*Consumer
	logger    *slog.Logger
	bg        serve.Background

	// handler is serveHTTP inside the request's server span and metrics;
	// unobserve unregisters the stream gauges.
	handler   http.Handler
	unobserve func() error
}

// New builds the service from cfg. Nothing connects until it is used.
func New(ctx context.Context, cfg Config, logger *slog.Logger) (*Service, error) {
	cfg = cfg.withDefaults()
	var sender Sender
	var err error
	if cfg.SMTPURL != "" {
		sender, err = NewSMTPSender(cfg.SMTPURL, cfg.SMTPTimeout, cfg.SMTPDataTimeout)
	} else {
		sender, err = NewMailboxSender(cfg.MailboxDir)
	}
	if err != nil {
		return nil, err
	}
	return NewWithSender(ctx, cfg, sender, logger)
}

// NewWithSender is New with the delivery of messages replaced, for tests
// and benchmarks that measure everything but the mail server.
func NewWithSender(ctx context.Context, cfg Config, sender Sender, logger *slog.Logger) (*Service, error) {
	cfg = cfg.withDefaults()
	mailer, err := NewMailer(cfg.From, cfg.Subject)
	if err != nil {
		return nil, err
	}
	pool, err := pg.NewPool(ctx, cfg.DatabaseURL, pg.PoolConfig{MaxConns: cfg.DBMaxConns})
	if err != nil {
		return nil, err
	}
	client, err := stream.NewClient(cfg.RedisURL, cfg.RedisCluster)
	if err != nil {
		pool.Close()
		return nil, err
	}
	name := cfg.ConsumerName
	if name == "" {
		name = defaultConsumerName()
	}
	s := &Service{cfg: cfg, pool: pool, redis: client, logger: logger}
	sends, tel := &Sends{pool: pool, lease: cfg.Lease}, newInstruments(cfg.Telemetry)
	// The partitions' consumers share one bound on the emails sent and not
	// yet marked: what a crash would send twice stays what it is with one.
	unmarked := make(chan struct{}, 2*cfg.Concurrency)
	for _, key := range stream.Names(cfg.StreamPrefix, events.AggregateUser, cfg.StreamPartitions) {
		clog := logger.With(slog.String("consumer", name))
		if cfg.StreamPartitions > 1 {
			clog = clog.With(slog.String("stream", key))
		}
		s.consumers = append(s.consumers, &Consumer{
			client: client, stream: key, deadLetter: DeadLetterStream(key), group: cfg.Group, name: name,
			batchSize: cfg.BatchSize, concurrency: cfg.Concurrency, block: cfg.Block, claimIdle: cfg.ClaimIdle,
			maxDeliveries: cfg.MaxDeliveries, sendAttempts: cfg.SendAttempts,
			sendLimit: SendLimit(cfg.SMTPTimeout, cfg.SMTPDataTimeout), stopGrace: stopGrace(cfg.ShutdownTimeout),
			forgetIdle: max(time.Hour, 10*cfg.ClaimIdle),
			sends:      sends, mailer: mailer, sender: sender, unmarked: unmarked,
			logger: clog, tel: tel,
		})
	}
	s.consumer = s.consumers[0]
	s.handler = telemetry.HTTPHandler(Name, cfg.Telemetry, http.HandlerFunc(s.serveHTTP))
	if err := s.observeStream(cfg.Telemetry); err != nil {
		s.Close()
		return nil, fmt.Errorf("register stream gauges: %w", err)
	}
	return s, nil
}

// stopGrace is how long a send under way may go on after shutdown began:
// the shutdown time less 2s for its mark and acknowledgement (at least half
// of it).
func stopGrace(shutdown time.Duration) time.Duration {
	return max(shutdown-2*time.Second, shutdown/2)
}

// defaultConsumerName is unique per process and fixed for its life.
func defaultConsumerName() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "sendemail"
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return host + "-" + hex.EncodeToString(b)
}

// Start starts the background loop unless BACKGROUND is false: one loop
// per partition, because one XREADGROUP cannot read streams of several
// Redis Cluster slots, and so that an empty or stuck partition holds back
// no other.
func (s *Service) Start(ctx context.Context) error {
	if !s.cfg.Background {
		return nil
	}
	return s.bg.Start(ctx, func(ctx context.Context) {
		var wg sync.WaitGroup
		for _, c := range s.consumers {
			wg.Go(func() { c.Run(ctx, s.cfg.ClaimInterval) })
		}
		wg.Wait()
	})
}

// Stop ends the background loop after the batch in hand is finished.
func (s *Service) Stop() { s.bg.Stop() }

// HandlerTimeout is the write deadline of this function's requests:
// a triggered pass runs up to SENDEMAIL_DRAIN_TIMEOUT, and the answer needs a moment after it.
func (s *Service) HandlerTimeout() time.Duration { return s.cfg.DrainTimeout + 5*time.Second }

// Close releases the pool, the Redis client and the mail server's
// connections kept for the next message.
func (s *Service) Close() {
	if s.unobserve != nil {
		_ = s.unobserve()
	}
	for _, c := range s.consumers {
		c.stopFlusher()
	}
	if c, ok := s.consumer.sender.(io.Closer); ok {
		_ = c.Close()
	}
	s.pool.Close()
	s.redis.Close()
}

// Health checks PostgreSQL and Redis.
func (s *Service) Health(ctx context.Context) serve.Health {
	h := serve.Check(ctx, map[string]func(context.Context) error{
		"postgres": s.pool.Ping,
		"redis":    func(ctx context.Context) error { return stream.Ping(ctx, s.redis) },
		// The group exists, or is created now: a Redis that lost it is not
		// healthy until the group is back.
		"group": func(ctx context.Context) error {
			var errs []error
			for _, c := range s.consumers {
				errs = append(errs, c.EnsureGroup(ctx))
			}
			return errors.Join(errs...)
		},
		"partitions": s.checkPartitions,
	})
	details := map[string]any{"consumer": s.consumer.name, "stream": s.consumer.stream, "group": s.consumer.group}
	if len(s.consumers) > 1 {
		streams := make([]string, len(s.consumers))
		for i, c := range s.consumers {
			streams[i] = c.stream
		}
		details["streams"] = streams
	}
	h.Details = details
	return h
}

// checkPartitions fails while the relay's records show the user stream
// spread over another number of partitions than this consumer reads: its
// events would wait, unread, in streams nobody consumes.
func (s *Service) checkPartitions(ctx context.Context) error {
	var recorded []int32
	err := s.pool.QueryRow(ctx, `SELECT coalesce(array_agg(DISTINCT partitions), '{}') FROM outbox_streams WHERE aggregate_type = $1`,
		events.AggregateUser).Scan(&recorded)
	if err != nil {
		return fmt.Errorf("read the relay's number of partitions: %w", err)
	}
	for _, n := range recorded {
		if int(n) != len(s.consumers) {
			return fmt.Errorf("STREAM_PARTITIONS is %d here but the relay writes %v: set the relay's number (README: Changing STREAM_PARTITIONS)",
				len(s.consumers), recorded)
		}
	}
	return nil
}

// ServeHTTP is the trigger: POST claims idle entries and reads new ones
// until none are left or the deadline is near.
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
	start := time.Now()
	stats, err := s.pass(ctx, stopBy)
	if err != nil {
		s.logger.WarnContext(ctx, "triggered pass failed", slog.Any("error", err))
		httpjson.WriteError(w, r, s.logger, httpjson.Errorf(http.StatusServiceUnavailable, "unavailable",
			"pass failed after handling %d entries; unhandled entries stay pending and are retried", stats.handled()))
		return
	}
	httpjson.Write(w, http.StatusOK, struct {
		Stats
		DurationMS float64 `json:"duration_ms"`
	}{stats, float64(time.Since(start).Microseconds()) / 1000})
}

// pass runs a triggered pass over every partition at once, so that one
// partition's backlog or failures do not use up the others' time.
func (s *Service) pass(ctx context.Context, stopBy time.Time) (Stats, error) {
	if len(s.consumers) == 1 {
		return s.consumer.Pass(ctx, stopBy)
	}
	var (
		mu    sync.Mutex
		stats Stats
		errs  []error
		wg    sync.WaitGroup
	)
	for _, c := range s.consumers {
		wg.Go(func() {
			st, err := c.Pass(ctx, stopBy)
			mu.Lock()
			defer mu.Unlock()
			stats.add(st)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", c.stream, err))
			}
		})
	}
	wg.Wait()
	return stats, errors.Join(errs...)
}
