package sendemail

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/rueidis"
	"github.com/sethvargo/go-retry"
)

// Stats counts what the consumer did with the entries it handled.
type Stats struct {
	// Sent counts emails the mail server accepted.
	Sent int64 `json:"sent"`
	// Duplicates counts entries whose email had been sent already.
	Duplicates int64 `json:"duplicates_skipped"`
	// Skipped counts entries of event types sendemail does not handle;
	// they are acknowledged.
	Skipped int64 `json:"unknown_types_skipped"`
	// Retried counts entries left pending after a transient failure.
	Retried int64 `json:"retry_later"`
	// DeadLettered counts entries moved to the dead-letter stream.
	DeadLettered int64 `json:"dead_lettered"`
	// Claimed counts entries taken over from idle consumers.
	Claimed int64 `json:"claimed"`
	// Vanished counts pending entries that were trimmed from the stream
	// before anyone processed them.
	Vanished int64 `json:"trimmed_before_processing"`
	// Ambiguous counts sends whose message data went out but whose answer
	// never came: each may have reached the recipient, and is retried once
	// after the lease.
	Ambiguous int64 `json:"ambiguous_sends"`
}

func (s *Stats) add(o Stats) {
	s.Sent += o.Sent
	s.Duplicates += o.Duplicates
	s.Skipped += o.Skipped
	s.Retried += o.Retried
	s.DeadLettered += o.DeadLettered
	s.Claimed += o.Claimed
	s.Vanished += o.Vanished
	s.Ambiguous += o.Ambiguous
}

func (s Stats) handled() int64 {
	return s.Sent + s.Duplicates + s.Skipped + s.Retried + s.DeadLettered + s.Vanished
}

type outcomeKind int

const (
	outcomeSent outcomeKind = iota
	outcomeDuplicate
	outcomeSkipped
	outcomeRetry
	outcomeDead
	outcomeVanished
)

type outcome struct {
	kind outcomeKind
	err  error
	// failures is the email's failed deliveries, as counted in its record.
	failures  int64
	ambiguous bool
}

// Consumer reads the user stream through a consumer group and sends one
// welcome email per user.created event.
type Consumer struct {
	client     rueidis.Client
	stream     string
	deadLetter string
	group      string
	name       string

	batchSize     int64
	concurrency   int
	block         time.Duration
	claimIdle     time.Duration
	maxDeliveries int64
	sendAttempts  int
	// sendLimit bounds one conversation; stopGrace is how long a send
	// under way may go on after shutdown began.
	sendLimit time.Duration
	stopGrace time.Duration
	// forgetIdle is how long a consumer of the group with nothing pending
	// stays idle before the claim loop removes it.
	forgetIdle time.Duration

	sends  *Sends
	mailer *Mailer
	sender Sender
	logger *slog.Logger
	tel    *instruments

	// unrecorded holds, by key, the marks of emails sent whose record
	// could not be committed yet.
	unrecorded sync.Map

	// beforeAck, when set by a test, runs after a batch was processed and
	// before it is acknowledged; an error stops there, as a crash would.
	beforeAck func() error

	groupOnce sync.Mutex
	groupOK   bool

	// unmarked bounds, across every batch this process handles at once
	// (the loop, its claim loop, triggers), the emails being sent or
	// sent and not yet marked.
	unmarkedOnce sync.Once
	unmarked     chan struct{}

	flushMu     sync.Mutex
	flushing    bool
	flushClosed bool
	flushStop   chan struct{}
	flushWG     sync.WaitGroup
}

// unmarkedSlots returns the bound on emails sent and not yet marked: the
// one the consumers of every partition share when New set it, a channel
// of 2 × concurrency of the consumer's own otherwise.
func (c *Consumer) unmarkedSlots() chan struct{} {
	c.unmarkedOnce.Do(func() {
		if c.unmarked == nil {
			c.unmarked = make(chan struct{}, 2*c.concurrency)
		}
	})
	return c.unmarked
}

// redisTimeout bounds one Redis round trip that does not block.
const redisTimeout = 5 * time.Second

// EnsureGroup creates the consumer group (and the stream, if missing) at
// the start of the stream, so that events relayed before the first consumer
// ever ran are not skipped. An existing group is left as it is.
func (c *Consumer) EnsureGroup(ctx context.Context) error {
	c.groupOnce.Lock()
	defer c.groupOnce.Unlock()
	if c.groupOK {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, redisTimeout)
	defer cancel()
	err := c.client.Do(ctx, c.client.B().XgroupCreate().Key(c.stream).Group(c.group).Id("0").Mkstream().Build()).Error()
	if err != nil && !rueidis.IsRedisBusyGroup(err) {
		return fmt.Errorf("create consumer group %s on %s: %w", c.group, c.stream, err)
	}
	c.groupOK = true
	return nil
}

// checkGroup notices a reply saying that the stream or the group is gone:
// Redis lost data (restarted without persistence, flushed, the stream
// deleted). The group is then created again, at the start of whatever the
// stream holds, by the next EnsureGroup: entries the relay publishes again
// are read, and the send records make those already emailed no-ops. It
// returns err.
func (c *Consumer) checkGroup(ctx context.Context, err error) error {
	if re, ok := rueidis.IsRedisErr(err); !ok || !strings.HasPrefix(re.Error(), "NOGROUP") {
		return err
	}
	c.groupOnce.Lock()
	defer c.groupOnce.Unlock()
	if c.groupOK {
		c.groupOK = false
		c.logger.WarnContext(ctx, "the consumer group is gone (Redis lost data, or the stream was deleted); creating it again",
			slog.String("stream", c.stream), slog.String("group", c.group))
	}
	return err
}

// read runs XREADGROUP from id (">" for new entries, an id for this
// consumer's own pending ones), blocking up to block when it is positive.
func (c *Consumer) read(ctx context.Context, id string, block time.Duration) ([]rueidis.XRangeEntry, error) {
	cmd := c.client.B().Xreadgroup().Group(c.group, c.name).Count(c.batchSize)
	var built rueidis.Completed
	if block > 0 {
		built = cmd.Block(block.Milliseconds()).Streams().Key(c.stream).Id(id).Build()
	} else {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, redisTimeout)
		defer cancel()
		built = cmd.Streams().Key(c.stream).Id(id).Build()
	}
	res, err := c.client.Do(ctx, built).AsXRead()
	if rueidis.IsRedisNil(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", c.stream, c.checkGroup(ctx, err))
	}
	return res[c.stream], nil
}

// claim runs one XAUTOCLAIM step from cursor.
func (c *Consumer) claim(ctx context.Context, cursor string) (next string, entries []rueidis.XRangeEntry, deleted int, err error) {
	ctx, cancel := context.WithTimeout(ctx, redisTimeout)
	defer cancel()
	reply, err := c.client.Do(ctx, c.client.B().Xautoclaim().Key(c.stream).Group(c.group).Consumer(c.name).
		MinIdleTime(strconv.FormatInt(c.claimIdle.Milliseconds(), 10)).Start(cursor).Count(c.batchSize).Build()).ToArray()
	if err != nil {
		return "", nil, 0, fmt.Errorf("claim idle entries of %s: %w", c.stream, c.checkGroup(ctx, err))
	}
	if len(reply) < 2 {
		return "", nil, 0, fmt.Errorf("claim idle entries of %s: short reply", c.stream)
	}
	if next, err = reply[0].ToString(); err != nil {
		return "", nil, 0, fmt.Errorf("claim idle entries: cursor: %w", err)
	}
	if entries, err = reply[1].AsXRange(); err != nil {
		return "", nil, 0, fmt.Errorf("claim idle entries: entries: %w", err)
	}
	if len(reply) > 2 {
		ids, _ := reply[2].ToArray()
		deleted = len(ids)
	}
	return next, entries, deleted, nil
}

// handle processes entries, then acknowledges the finished ones in one
// command and dead-letters the failed ones.
//
// The emails of the batch are claimed ahead of their sends, a window of
// 2 × SENDEMAIL_CONCURRENCY at a time in one statement each, the next
// window while half of the current one is still to start (see
// claimWindows): a consumer killed mid-batch holds back only a few times
// its concurrency, not the batch, for the lease. Each claim is used for its
// send only if its lease still leaves the mark enough time after the
// longest conversation (see deliver and covers), and is renewed right
// before the send otherwise, so a claim never has to last the batch. Once
// ctx ends, or the database failed a claim or a mark, no further send
// starts; the entries not started stay pending, their claims released, for
// whoever comes next.
func (c *Consumer) handle(ctx context.Context, entries []rueidis.XRangeEntry) (Stats, error) {
	var stats Stats
	// Each entry is handled in a span of its own, in the trace it carries.
	ectx, spans := c.startEntries(ctx, entries)
	outcomes := make([]outcome, len(entries))
	defer func() {
		for i, span := range spans {
			endEntry(span, outcomes[i])
		}
		c.tel.count(ctx, stats, len(entries), c.stream, c.group)
	}()
	jobs := make([]*job, len(entries))
	// A second entry for the same email (the same event added twice) takes
	// the first one's outcome instead of racing it for the claim.
	firstOf := make(map[string]int, len(entries))
	copyOf := make(map[int]int)
	for i, e := range entries {
		j, o := c.prepare(e)
		if j == nil {
			outcomes[i] = o
			continue
		}
		if first, ok := firstOf[j.key]; ok {
			copyOf[i] = first
			continue
		}
		firstOf[j.key] = i
		jobs[i] = j
	}
	var dbErr errOnce
	ahead := c.claimWindows(ctx, jobs, outcomes, &dbErr)
	claims, marks := c.startClaims(ctx), c.startMarks(ctx, &dbErr)
	// sem bounds the conversations under way, not the marks that follow
	// them: a send does not wait for the commit of the one before.
	sem := make(chan struct{}, c.concurrency)
	// unmarked bounds the emails being sent or sent whose mark has not
	// committed yet: what a crash would send twice, and what a database
	// that stopped writing lets out unrecorded.
	unmarked := c.unmarkedSlots()
	var wg sync.WaitGroup
dispatch:
	for w, win := range ahead.windows {
		ahead.wait(w)
		for n, i := range win {
			j := jobs[i]
			if j == nil {
				continue
			}
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
			}
			if ctx.Err() != nil || dbErr.get() != nil {
				ahead.stop(w, n, cmpErr(dbErr.get(), errors.New("not started: shutting down")))
				break dispatch
			}
			if n >= len(win)/2 {
				ahead.start(w + 1)
			}
			wg.Go(func() {
				released := false
				release := func() {
					if !released {
						released = true
						<-sem
					}
				}
				defer release()
				outcomes[i] = c.deliver(ectx[i], j, ahead.held[i], claims, marks, &dbErr, release, unmarked)
			})
		}
	}
	wg.Wait()
	claims.close()
	marks.close()
	for i, first := range copyOf {
		switch outcomes[first].kind {
		case outcomeSent, outcomeDuplicate:
			outcomes[i] = outcome{kind: outcomeDuplicate}
		default:
			outcomes[i] = outcomes[first]
		}
	}
	if c.beforeAck != nil {
		if err := c.beforeAck(); err != nil {
			return stats, err
		}
	}

	// Acknowledge even during shutdown: the work is done.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), redisTimeout)
	defer cancel()
	// The entries go on to wait when the database failed them: the caller
	// backs off (or answers 503) instead of reading more that cannot be sent.
	firstErr := dbErr.get()
	var ack []string
	for i, o := range outcomes {
		e := entries[i]
		switch o.kind {
		case outcomeSent:
			stats.Sent++
			ack = append(ack, e.ID)
		case outcomeDuplicate:
			stats.Duplicates++
			ack = append(ack, e.ID)
		case outcomeSkipped:
			stats.Skipped++
			ack = append(ack, e.ID)
		case outcomeVanished:
			stats.Vanished++
			ack = append(ack, e.ID)
		case outcomeRetry:
			stats.Retried++
			if o.ambiguous {
				stats.Ambiguous++
			}
			c.logger.WarnContext(ectx[i], "delivery failed; will retry", slog.String("entry_id", e.ID), slog.Any("error", o.err))
		case outcomeDead:
			if o.ambiguous {
				stats.Ambiguous++
			}
			if err := c.deadLetterEntry(ctx, e, max(o.failures, 1), o.err); err != nil {
				firstErr = cmpErr(firstErr, err)
				continue
			}
			stats.DeadLettered++
			c.logger.WarnContext(ectx[i], "moved to dead-letter stream", slog.String("entry_id", e.ID),
				slog.String("dead_letter_stream", c.deadLetter), slog.Any("error", o.err))
		}
	}
	if len(ack) > 0 {
		if err := c.acknowledge(ctx, ack); err != nil {
			firstErr = cmpErr(firstErr, fmt.Errorf("acknowledge %d entries: %w", len(ack), c.checkGroup(ctx, err)))
		}
	}
	return stats, firstErr
}

// acknowledge XACKs ids, and again after a failure that is not Redis's
// answer (up to ackAttempts in all): after Redis restarted, each of the
// client's pooled connections fails its first command (EOF) before it is
// dialled again, and entries left pending would wait ClaimIdle to be
// claimed again. XACK is idempotent.
func (c *Consumer) acknowledge(ctx context.Context, ids []string) error {
	var err error
	for attempt := range ackAttempts {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return err
			case <-time.After(10 * time.Millisecond):
			}
		}
		err = c.client.Do(ctx, c.client.B().Xack().Key(c.stream).Group(c.group).Id(ids...).Build()).Error()
		if _, answered := rueidis.IsRedisErr(err); err == nil || answered {
			return err
		}
	}
	return err
}

// ackAttempts bounds the tries of one XACK: more than the connections a
// rueidis client keeps (four by default).
const ackAttempts = 6

// aheadClaims are the claims a batch takes ahead of its sends, a window at
// a time (see Consumer.claimWindows). A window's claims are written by the
// goroutine that takes them, and read once wait returned.
type aheadClaims struct {
	c        *Consumer
	ctx      context.Context
	jobs     []*job
	outcomes []outcome
	dbErr    *errOnce
	// held is the claim taken for each job, by index; windows are the job
	// indexes of each window, in order.
	held    []heldClaim
	windows [][]int
	done    []chan struct{} // nil until the window's claim started
}

// claimWindows splits jobs into windows of 2 × concurrency and takes the
// first one's claims. Sends starting from one window hide the round trip
// of the next one's claim (handle starts it once half the window started),
// and a window is small enough that a consumer killed mid-batch holds back
// only what it was sending and about to send.
func (c *Consumer) claimWindows(ctx context.Context, jobs []*job, outcomes []outcome, dbErr *errOnce) *aheadClaims {
	a := &aheadClaims{c: c, ctx: ctx, jobs: jobs, outcomes: outcomes, dbErr: dbErr, held: make([]heldClaim, len(jobs))}
	size := 2 * c.concurrency
	var win []int
	for i, j := range jobs {
		if j == nil {
			continue
		}
		win = append(win, i)
		if len(win) == size {
			a.windows, win = append(a.windows, win), nil
		}
	}
	if len(win) > 0 {
		a.windows = append(a.windows, win)
	}
	a.done = make([]chan struct{}, len(a.windows))
	a.start(0)
	return a
}

// start takes window w's claims in the background, once; nothing is
// claimed once ctx ended or the database failed (nothing more starts).
func (a *aheadClaims) start(w int) {
	if w >= len(a.windows) || a.done[w] != nil {
		return
	}
	done := make(chan struct{})
	a.done[w] = done
	if a.ctx.Err() != nil || a.dbErr.get() != nil {
		close(done)
		return
	}
	go func() {
		defer close(done)
		a.claim(a.windows[w])
	}()
}

// wait starts window w's claims if that has not happened yet, and waits
// for them.
func (a *aheadClaims) wait(w int) {
	a.start(w)
	<-a.done[w]
}

// claim claims the emails of the jobs at idx in one statement, each under
// a token of its own. A job that cannot be claimed gets its outcome and is
// dropped from jobs. A job whose email this process sent but could not
// record is left to deliver, which records it first.
func (a *aheadClaims) claim(idx []int) {
	var reqs []claimRequest
	var at []int
	for _, i := range idx {
		j := a.jobs[i]
		if _, owed := a.c.unrecorded.Load(j.key); owed {
			continue
		}
		reqs = append(reqs, claimRequest{key: j.key, eventID: j.eventID, token: newToken(a.c.name)})
		at = append(at, i)
	}
	if len(reqs) == 0 {
		return
	}
	asked := time.Now()
	for n, res := range a.c.claimEach(context.WithoutCancel(a.ctx), reqs, a.c.sends.ClaimAhead) {
		i := at[n]
		if o, ok := claimOutcome(res, a.dbErr); !ok {
			a.outcomes[i], a.jobs[i] = o, nil
			continue
		}
		a.held[i] = heldClaim{token: reqs[n].token, asked: asked}
	}
}

// stop gives every job from position n of window w on the outcome err
// (it stays pending) and releases the claims taken for them, once the
// claims under way have returned.
func (a *aheadClaims) stop(w, n int, err error) {
	var unstarted []claimRequest
	for k := w; k < len(a.windows); k++ {
		if a.done[k] != nil {
			<-a.done[k]
		}
		from := 0
		if k == w {
			from = n
		}
		for _, i := range a.windows[k][from:] {
			if a.jobs[i] == nil {
				continue
			}
			a.outcomes[i] = outcome{kind: outcomeRetry, err: err}
			if a.held[i].token != "" {
				unstarted = append(unstarted, claimRequest{key: a.jobs[i].key, token: a.held[i].token})
			}
		}
	}
	a.c.releaseUnstarted(a.ctx, unstarted)
}

// releaseUnstarted releases the claims taken ahead of sends that will not
// start; failing that, they run out with their lease.
func (c *Consumer) releaseUnstarted(ctx context.Context, reqs []claimRequest) {
	if len(reqs) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), redisTimeout)
	defer cancel()
	if err := c.sends.ReleaseUnstarted(ctx, reqs); err != nil {
		c.logger.WarnContext(ctx, "release claims of sends not started; they wait for their lease", slog.Int("count", len(reqs)), slog.Any("error", err))
	}
}

func cmpErr(first, next error) error {
	if first != nil {
		return first
	}
	return next
}

// errOnce keeps the first error reported by concurrent deliveries.
type errOnce struct {
	mu  sync.Mutex
	err error
}

func (e *errOnce) set(err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.err == nil {
		e.err = err
	}
}

func (e *errOnce) get() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.err
}

// Run is the background loop: new entries as they arrive, with the claim
// loop beside it (which also takes over entries an earlier life of this
// process left, whatever its name). It returns when ctx is done.
func (c *Consumer) Run(ctx context.Context, claimInterval time.Duration) {
	var health healthLog
	for {
		err := c.EnsureGroup(ctx)
		if err == nil {
			break
		}
		if !health.failed(ctx, c.logger, err) {
			return
		}
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		ticker := time.NewTicker(claimInterval)
		defer ticker.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-ticker.C:
			}
			if stats, err := c.ClaimIdle(ctx, time.Time{}); err != nil && ctx.Err() == nil {
				c.logger.WarnContext(ctx, "claim idle entries", slog.Any("error", err))
			} else if stats.Claimed > 0 {
				c.logger.InfoContext(ctx, "claimed idle entries", slog.Int64("claimed", stats.Claimed))
			}
		}
	})
	for ctx.Err() == nil {
		if err := c.EnsureGroup(ctx); err != nil {
			if !health.failed(ctx, c.logger, err) {
				return
			}
			continue
		}
		if health.failing() {
			// Every entry read raises its delivery count: read none until
			// the send records can be reached again.
			if err := c.ping(ctx); err != nil {
				if !health.failed(ctx, c.logger, err) {
					return
				}
				continue
			}
		}
		c.flushUnrecorded(ctx)
		entries, err := c.read(ctx, ">", c.block)
		if err == nil && len(entries) > 0 {
			_, err = c.handle(ctx, entries)
		}
		if err != nil {
			if !health.failed(ctx, c.logger, err) {
				return
			}
			continue
		}
		health.ok(ctx, c.logger)
	}
}

// Pass claims idle entries, then reads new ones without blocking, until
// none are left or stopBy has passed: the HTTP trigger's work. It does not
// re-read this consumer's own pending entries, which the background loop
// may be processing right now.
func (c *Consumer) Pass(ctx context.Context, stopBy time.Time) (Stats, error) {
	if err := c.EnsureGroup(ctx); err != nil {
		return Stats{}, err
	}
	c.flushUnrecorded(ctx)
	stats, err := c.ClaimIdle(ctx, stopBy)
	if err != nil {
		return stats, err
	}
	for time.Now().Before(stopBy) {
		entries, err := c.read(ctx, ">", 0)
		if err != nil {
			return stats, err
		}
		if len(entries) == 0 {
			return stats, nil
		}
		s, err := c.handle(ctx, entries)
		stats.add(s)
		if err != nil {
			return stats, err
		}
	}
	return stats, nil
}

// ClaimIdle takes over entries idle for longer than the claim time (their
// consumer crashed, or they failed transiently), following the XAUTOCLAIM
// cursor to its end, and processes them.
func (c *Consumer) ClaimIdle(ctx context.Context, stopBy time.Time) (Stats, error) {
	var stats Stats
	// A claim raises each entry's delivery count. While PostgreSQL is down
	// no delivery can succeed, and claiming anyway would push every pending
	// entry toward the dead-letter stream during an outage.
	if err := c.ping(ctx); err != nil {
		return stats, err
	}
	cursor := "0-0"
	for {
		next, entries, deleted, err := c.claim(ctx, cursor)
		if err != nil {
			return stats, err
		}
		if deleted > 0 {
			// Pending entries trimmed away: events whose email may never
			// have been sent.
			c.logger.WarnContext(ctx, "pending entries were trimmed from the stream before they were processed",
				slog.Int("count", deleted), slog.String("stream", c.stream))
		}
		stats.Vanished += int64(deleted)
		stats.Claimed += int64(len(entries))
		if len(entries) > 0 {
			s, err := c.handle(ctx, entries)
			stats.add(s)
			if err != nil {
				return stats, err
			}
		}
		if next == "0-0" || (!stopBy.IsZero() && time.Now().After(stopBy)) {
			return stats, c.forgetConsumers(ctx)
		}
		cursor = next
	}
}

// forgetConsumers removes the group's consumers that have nothing pending
// and have been idle for forgetIdle: every restart adds a consumer name,
// and they would pile up. One with entries pending is kept whatever its
// idle time (XGROUP DELCONSUMER would drop them); a live consumer reads
// every SENDEMAIL_BLOCK, which resets its idle time.
func (c *Consumer) forgetConsumers(ctx context.Context) error {
	if c.forgetIdle <= 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, redisTimeout)
	defer cancel()
	consumers, err := c.client.Do(ctx, c.client.B().XinfoConsumers().Key(c.stream).Group(c.group).Build()).ToArray()
	if err != nil {
		return fmt.Errorf("list consumers of %s: %w", c.group, err)
	}
	for _, m := range consumers {
		info, err := m.AsMap()
		if err != nil {
			continue
		}
		nameMsg, pendingMsg, idleMsg := info["name"], info["pending"], info["idle"]
		name, _ := nameMsg.ToString()
		pending, _ := pendingMsg.AsInt64()
		idle, _ := idleMsg.AsInt64()
		if name == c.name || pending > 0 || time.Duration(idle)*time.Millisecond < c.forgetIdle {
			continue
		}
		if err := c.client.Do(ctx, c.client.B().XgroupDelconsumer().Key(c.stream).Group(c.group).Consumername(name).Build()).Error(); err != nil {
			return fmt.Errorf("remove idle consumer %s: %w", name, err)
		}
		c.logger.InfoContext(ctx, "removed an idle consumer with nothing pending", slog.String("removed", name))
	}
	return nil
}

// ping checks, within a Redis round trip's time, that the send records can
// be reached.
func (c *Consumer) ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, redisTimeout)
	defer cancel()
	return c.sends.Ping(ctx)
}

// healthLog logs a failing dependency once when it starts failing and once
// when it recovers, and spaces retries with capped exponential backoff.
type healthLog struct {
	backoff retry.Backoff
	since   time.Time
}

// failed logs (the first time) and waits before the next try; it returns
// false if ctx ended meanwhile.
func (h *healthLog) failed(ctx context.Context, logger *slog.Logger, err error) bool {
	if ctx.Err() != nil {
		return false
	}
	if h.backoff == nil {
		h.backoff = retry.WithCappedDuration(30*time.Second, retry.WithJitterPercent(20, retry.NewExponential(100*time.Millisecond)))
		h.since = time.Now()
		logger.ErrorContext(ctx, "consumer failing; entries stay pending and are retried", slog.Any("error", err))
	}
	delay, _ := h.backoff.Next()
	select {
	case <-ctx.Done():
		return false
	case <-time.After(delay):
		return true
	}
}

// failing reports whether the last try failed.
func (h *healthLog) failing() bool { return h.backoff != nil }

func (h *healthLog) ok(ctx context.Context, logger *slog.Logger) {
	if h.backoff != nil {
		logger.InfoContext(ctx, "consumer recovered", slog.Duration("after", time.Since(h.since)))
		h.backoff = nil
	}
}
