package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outboxfn/outbox/shared/events"
	"github.com/outboxfn/outbox/shared/outbox"
	"github.com/outboxfn/outbox/shared/pg"
	"github.com/outboxfn/outbox/shared/smtptest"
	"github.com/outboxfn/outbox/shared/tcpproxy"
)

// fault is one thing that goes wrong. apply does it and undoes it (restarts
// what it stopped, thaws what it froze) before it returns.
type fault struct {
	name string
	// what says, for the report, what the fault does.
	what string
	// ambiguous faults can leave a send whose outcome the sender cannot
	// know (the server took the message but its 250 never arrived, or the
	// sender died or froze between the 250 and recording it): a second
	// copy with the same Message-ID is then allowed, and counted.
	ambiguous bool
	apply     func(ctx context.Context, s *stage, rnd *rand.Rand) error
}

// ambiguousCopies bounds the copies an ambiguous fault excuses: every send a
// consumer may have in flight when it dies or freezes (2 ×
// SENDEMAIL_CONCURRENCY, 8 by default, each of the two consumers), or every
// reply smtp-drop-before-250 drops (one signup in 20).
func ambiguousCopies(signups int) int { return max(2*2*8, signups/20) }

// Pauses and durations of the faults.
const (
	restartPause = 2 * time.Second
	stallFor     = 15 * time.Second
	// stopFor is longer than claimIdle, so the other consumer takes over
	// the stopped one's entries while it is frozen.
	stopFor   = 8 * time.Second
	longTxFor = 15 * time.Second
	slowFor   = 8 * time.Second
	slowReply = 150 * time.Millisecond
)

// faults is the catalogue, in the order the run goes through them.
var faults = []fault{
	killFault("kill9-createuser", "createuser", syscall.SIGKILL),
	killFault("kill9-relay", "relay", syscall.SIGKILL),
	killFault("kill9-sendemail", "sendemail", syscall.SIGKILL),
	killFault("sigterm-createuser", "createuser", syscall.SIGTERM),
	killFault("sigterm-relay", "relay", syscall.SIGTERM),
	killFault("sigterm-sendemail", "sendemail", syscall.SIGTERM),
	{name: "pg-restart", ambiguous: true, what: "pg_ctl restart -m immediate of PostgreSQL (crash and recovery)",
		apply: func(ctx context.Context, s *stage, _ *rand.Rand) error { return s.pg.RestartImmediate(ctx) }},
	{name: "redis-restart-empty", what: "Redis killed and restarted without persistence (comes back empty)",
		apply: func(ctx context.Context, s *stage, _ *rand.Rand) error {
			return s.redis.Restart(ctx, nothing, time.Second)
		}},
	{name: "redis-restart-snapshot", what: "SAVE, 1 s more of load, Redis killed and restarted from that snapshot (loses the last second)",
		apply: func(ctx context.Context, s *stage, _ *rand.Rand) error {
			if err := s.redisC.Do(ctx, s.redisC.B().Save().Build()).Error(); err != nil {
				return fmt.Errorf("SAVE: %w", err)
			}
			sleep(ctx, time.Second)
			return s.redis.Restart(ctx, snapshot, time.Second)
		}},
	{name: "redis-restart-aof", what: "append-only file turned on (fsync always), Redis killed and restarted from it (loses nothing)",
		apply: func(ctx context.Context, s *stage, _ *rand.Rand) error {
			c := s.redisC
			if err := c.Do(ctx, c.B().ConfigSet().ParameterValue().ParameterValue("appendonly", "yes").Build()).Error(); err != nil {
				return fmt.Errorf("CONFIG SET appendonly yes: %w", err)
			}
			// The append-only file exists once its first rewrite is done.
			deadline := time.Now().Add(20 * time.Second)
			for {
				info, err := c.Do(ctx, c.B().Info().Section("persistence").Build()).ToString()
				if err != nil {
					return fmt.Errorf("INFO persistence: %w", err)
				}
				if strings.Contains(info, "aof_enabled:1") && strings.Contains(info, "aof_rewrite_in_progress:0") &&
					!strings.Contains(info, "aof_rewrite_scheduled:1") {
					break
				}
				if time.Now().After(deadline) {
					return errors.New("the append-only file was not written within 20 s")
				}
				sleep(ctx, 50*time.Millisecond)
			}
			sleep(ctx, time.Second)
			return s.redis.Restart(ctx, appendOnly, time.Second)
		}},
	{name: "redis-pause", what: fmt.Sprintf("redis-server SIGSTOPped for %s, then SIGCONT (a stalled host)", stopFor),
		apply: func(ctx context.Context, s *stage, _ *rand.Rand) error { return s.redis.Pause(ctx, stopFor) }},
	{name: "redis-flushall", what: "FLUSHALL",
		apply: func(ctx context.Context, s *stage, _ *rand.Rand) error {
			return s.redisC.Do(ctx, s.redisC.B().Flushall().Build()).Error()
		}},
	{name: "redis-del-stream", what: "DEL " + streamName,
		apply: func(ctx context.Context, s *stage, _ *rand.Rand) error {
			return s.redisC.Do(ctx, s.redisC.B().Del().Key(streamName).Build()).Error()
		}},
	{name: "smtp-451", what: "451 to RCPT for one signup in 10",
		apply: func(_ context.Context, s *stage, _ *rand.Rand) error {
			s.mail.Inject("RCPT", smtptest.Fault{Reply: smtptest.TempFailure, Times: max(1, s.signups/10)})
			return nil
		}},
	{name: "smtp-drop-at-data", what: "connection dropped at DATA, before the message (one signup in 20)",
		apply: func(_ context.Context, s *stage, _ *rand.Rand) error {
			s.mail.Inject("DATA", smtptest.Fault{Drop: true, Times: max(1, s.signups/20)})
			return nil
		}},
	{name: "smtp-drop-before-250", ambiguous: true, what: "message taken, connection dropped before the final 250 (one signup in 20)",
		apply: func(_ context.Context, s *stage, _ *rand.Rand) error {
			s.mail.Inject(smtptest.EndOfData, smtptest.Fault{Drop: true, Times: max(1, s.signups/20)})
			return nil
		}},
	{name: "smtp-drop-after-250", what: "connection dropped right after the final 250 (one signup in 20)",
		apply: func(_ context.Context, s *stage, _ *rand.Rand) error {
			s.mail.Inject(smtptest.EndOfData, smtptest.Fault{DropAfterReply: true, Times: max(1, s.signups/20)})
			return nil
		}},
	{name: "smtp-slow", what: fmt.Sprintf("every SMTP reply delayed %s for %s", slowReply, slowFor),
		apply: func(ctx context.Context, s *stage, _ *rand.Rand) error {
			s.mail.SetReplyDelay(slowReply)
			sleep(ctx, slowFor)
			s.mail.SetReplyDelay(0)
			return nil
		}},
	{name: "long-tx", what: fmt.Sprintf("a transaction inserts a user and its outbox row and stays open %s", longTxFor),
		apply: longTransaction},
	{name: "sigstop-sendemail", ambiguous: true, what: fmt.Sprintf("a busy sendemail consumer SIGSTOPped for %s (claim idle %s), then SIGCONT", stopFor, claimIdle),
		apply: func(ctx context.Context, s *stage, rnd *rand.Rand) error {
			return s.pick(ctx, "sendemail", rnd).Pause(ctx, stopFor)
		}},
	{name: "sendemail-pg-stall", ambiguous: true,
		what: fmt.Sprintf("the network between a busy sendemail and PostgreSQL silent for %s: its marks cannot commit (a copy after the lease is allowed)", stallFor),
		apply: func(ctx context.Context, s *stage, rnd *rand.Rand) error {
			return s.stall(ctx, s.senderPG[s.senderIndex(s.pick(ctx, "sendemail", rnd))])
		}},
	{name: "sendemail-redis-stall",
		what: fmt.Sprintf("the network between a busy sendemail and Redis silent for %s: it cannot acknowledge", stallFor),
		apply: func(ctx context.Context, s *stage, rnd *rand.Rand) error {
			return s.stall(ctx, s.senderRedis[s.senderIndex(s.pick(ctx, "sendemail", rnd))])
		}},
	{name: "relay-pg-stall", what: fmt.Sprintf("the network between the draining relay and PostgreSQL silent for %s (tcpproxy Freeze, then Thaw)", stallFor),
		apply: stallDrainer},
}

// killFault stops one process of kind with sig and starts it again after
// restartPause. It aims where it hurts: the relay that holds the drain
// lock, a sendemail consumer with entries in flight (waiting up to 3 s for
// one). Killing a sendemail outright can leave an email sent and not
// recorded: ambiguous; SIGTERM lets the send under way finish and record it.
func killFault(name, kind string, sig syscall.Signal) fault {
	how := "kill -9"
	if sig == syscall.SIGTERM {
		how = "SIGTERM"
	}
	target := map[string]string{"createuser": "createuser", "relay": "the draining relay", "sendemail": "a busy sendemail"}[kind]
	return fault{name: name, ambiguous: kind == "sendemail" && sig != syscall.SIGTERM,
		what: fmt.Sprintf("%s of %s, restarted %s later", how, target, restartPause),
		apply: func(ctx context.Context, s *stage, rnd *rand.Rand) error {
			return s.pick(ctx, kind, rnd).Kill(ctx, sig, restartPause)
		}}
}

// pick chooses the process of kind a fault hits: the relay holding the
// drain lock, a sendemail consumer with pending entries, or else one drawn
// from rnd.
func (s *stage) pick(ctx context.Context, kind string, rnd *rand.Rand) *proc {
	var procs []*proc
	for _, p := range s.all {
		if p.kind == kind {
			procs = append(procs, p)
		}
	}
	chosen := procs[rnd.IntN(len(procs))]
	switch kind {
	case "relay":
		if i, ok := s.waitDrainer(ctx); ok {
			return s.relays[i]
		}
	case "sendemail":
		deadline := time.Now().Add(3 * time.Second)
		for time.Now().Before(deadline) && ctx.Err() == nil {
			busy := s.busyConsumers(ctx)
			for _, p := range procs {
				if busy[p.consumer] {
					return p
				}
			}
			sleep(ctx, 5*time.Millisecond)
		}
	}
	return chosen
}

// waitDrainer waits up to 3 s for a relay to hold the drain lock (it holds
// it while it drains) and returns its index.
func (s *stage) waitDrainer(ctx context.Context) (int, bool) {
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if i, ok := s.drainer(ctx); ok {
			return i, true
		}
		sleep(ctx, 5*time.Millisecond)
	}
	return 0, false
}

// drainer returns the index of the relay that holds the drain lock.
func (s *stage) drainer(ctx context.Context) (int, bool) {
	var app string
	err := s.db.QueryRow(ctx, `SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)
		WHERE l.locktype = 'advisory' AND l.granted AND l.objid::int = hashtext('outbox.relay.drain')
		  AND a.datname = current_database() LIMIT 1`).Scan(&app)
	if err != nil {
		return 0, false
	}
	for i, r := range s.relays {
		if r.name == app {
			return i, true
		}
	}
	return 0, false
}

// busyConsumers returns the consumers with pending entries.
func (s *stage) busyConsumers(ctx context.Context) map[string]bool {
	c := s.redisC
	out := map[string]bool{}
	summary, err := c.Do(ctx, c.B().Xpending().Key(streamName).Group("sendemail").Build()).ToArray()
	if err != nil || len(summary) < 4 {
		return out
	}
	perConsumer, _ := summary[3].ToArray()
	for _, pc := range perConsumer {
		pair, err := pc.ToArray()
		if err != nil || len(pair) < 1 {
			continue
		}
		name, _ := pair[0].ToString()
		out[name] = true
	}
	return out
}

// longTransaction inserts a real user and its user.created event and keeps
// the transaction open for longTxFor: the relay must neither stall behind it
// nor miss the row once it commits.
func longTransaction(ctx context.Context, s *stage, _ *rand.Rand) error {
	// In a scenario that also restarts PostgreSQL, the database may be
	// starting up or going away: the writer tries again, as a client
	// would, for a while.
	deadline := time.Now().Add(longTxRetryFor)
	for {
		err := longTransactionOnce(ctx, s)
		if err == nil || !pg.IsUnavailable(err) || time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		sleep(ctx, 200*time.Millisecond)
	}
}

// longTxRetryFor bounds longTransaction's tries while PostgreSQL is down.
const longTxRetryFor = 10 * time.Second

func longTransactionOnce(ctx context.Context, s *stage) error {
	conn, err := pgx.Connect(ctx, s.dbURL)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	tx, err := conn.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // after Commit a no-op
	email := fmt.Sprintf("longtx.%d.%s@mail.example.com", time.Now().UnixNano(), s.tag)
	var id int64
	if err := tx.QueryRow(ctx, `INSERT INTO users (email, name) VALUES ($1, 'Long Transaction') RETURNING id`, email).Scan(&id); err != nil {
		return fmt.Errorf("insert user: %w", err)
	}
	payload, _ := json.Marshal(events.UserCreated{UserID: id, Email: email, Name: "Long Transaction"})
	if err := outbox.Insert(ctx, tx, outbox.Event{AggregateType: events.AggregateUser, AggregateID: fmt.Sprint(id),
		EventType: events.TypeUserCreated, Payload: payload}); err != nil {
		return err
	}
	sleep(ctx, longTxFor)
	if err := tx.Commit(context.WithoutCancel(ctx)); err != nil {
		return fmt.Errorf("commit after %s: %w", longTxFor, err)
	}
	return nil
}

// stallDrainer freezes the proxy of the relay that holds the drain lock (or
// a random one when none does), for stallFor.
func stallDrainer(ctx context.Context, s *stage, rnd *rand.Rand) error {
	i := rnd.IntN(len(s.proxies))
	if d, ok := s.waitDrainer(ctx); ok {
		i = d
	}
	return s.stall(ctx, s.proxies[i])
}

// stall silences p for stallFor.
func (s *stage) stall(ctx context.Context, p *tcpproxy.Proxy) error {
	p.Freeze()
	sleep(ctx, stallFor)
	p.Thaw()
	return nil
}

// senderIndex is p's index in s.senders.
func (s *stage) senderIndex(p *proc) int {
	return max(0, slices.Index(s.senders, p))
}

// sleep waits d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// findFault returns the fault named name.
func findFault(name string) (fault, bool) {
	for _, f := range faults {
		if f.name == name {
			return f, true
		}
	}
	return fault{}, false
}

// planned is a fault at an offset from the start of the load.
type planned struct {
	At    time.Duration
	Fault string
}

// MarshalJSON writes the offset in seconds.
func (p planned) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		AtSeconds float64 `json:"at_seconds"`
		Fault     string  `json:"fault"`
	}{p.At.Seconds(), p.Fault})
}

// mixedPlan draws k distinct faults and when each starts, in the first
// three quarters of the load, from rnd: the same seed gives the same plan.
func mixedPlan(rnd *rand.Rand, k int, load time.Duration) []planned {
	order := rnd.Perm(len(faults))
	plan := make([]planned, 0, k)
	for _, i := range order[:k] {
		at := time.Duration(rnd.Int64N(int64(load*3/4))) + load/10
		plan = append(plan, planned{At: at.Round(100 * time.Millisecond), Fault: faults[i].name})
	}
	return plan
}
