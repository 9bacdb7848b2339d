package sendemail

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/redis/rueidis"
	"github.com/sethvargo/go-retry"
	gomail "github.com/wneessen/go-mail"

	"github.com/outboxfn/outbox/shared/events"
	"github.com/outboxfn/outbox/shared/stream"
)

// Dead-letter entries carry the original fields plus these.
const (
	FieldDeadOriginalID = "dlq_original_id"
	FieldDeadStream     = "dlq_stream"
	FieldDeadError      = "dlq_error"
	FieldDeadDeliveries = "dlq_deliveries"
	FieldDeadConsumer   = "dlq_consumer"
	FieldDeadFailedAt   = "dlq_failed_at"
)

// OriginalFields returns, sorted, the names of an entry's fields that are
// not dead-letter bookkeeping: what to copy when an entry moves to the
// dead-letter stream, or back from it.
func OriginalFields(fields map[string]string) []string {
	keys := make([]string, 0, len(fields))
	for k := range fields {
		if !strings.HasPrefix(k, "dlq_") {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	return keys
}

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
}

func (s *Stats) add(o Stats) {
	s.Sent += o.Sent
	s.Duplicates += o.Duplicates
	s.Skipped += o.Skipped
	s.Retried += o.Retried
	s.DeadLettered += o.DeadLettered
	s.Claimed += o.Claimed
	s.Vanished += o.Vanished
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
	smtpTimeout   time.Duration

	sends  *Sends
	mailer *Mailer
	sender Sender
	logger *slog.Logger

	// beforeAck, when set by a test, runs after a batch was processed and
	// before it is acknowledged; an error stops there, as a crash would.
	beforeAck func() error

	groupOnce sync.Mutex
	groupOK   bool
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
		return nil, fmt.Errorf("read %s: %w", c.stream, err)
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
		return "", nil, 0, fmt.Errorf("claim idle entries of %s: %w", c.stream, err)
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

// deliveries reads the delivery counts of this consumer's pending entries.
func (c *Consumer) deliveries(ctx context.Context, entries []rueidis.XRangeEntry) (map[string]int64, error) {
	counts := make(map[string]int64, len(entries))
	if len(entries) == 0 {
		return counts, nil
	}
	ctx, cancel := context.WithTimeout(ctx, redisTimeout)
	defer cancel()
	rows, err := c.client.Do(ctx, c.client.B().Xpending().Key(c.stream).Group(c.group).
		Start(entries[0].ID).End(entries[len(entries)-1].ID).Count(int64(len(entries))*4+64).Consumer(c.name).Build()).ToArray()
	if err != nil {
		return nil, fmt.Errorf("read delivery counts: %w", err)
	}
	for _, r := range rows {
		fields, err := r.ToArray()
		if err != nil || len(fields) < 4 {
			continue
		}
		id, _ := fields[0].ToString()
		n, _ := fields[3].AsInt64()
		counts[id] = n
	}
	return counts, nil
}

// handle processes entries, then acknowledges the finished ones in one
// command and dead-letters the failed ones. deliveries may be nil for
// entries read for the first time.
//
// Every email of the batch is claimed in one statement; the claimed ones are
// sent concurrently, each marked sent as soon as the server accepted it
// (marks that are ready at the same moment share one commit).
func (c *Consumer) handle(ctx context.Context, entries []rueidis.XRangeEntry, deliveries map[string]int64) (Stats, error) {
	var stats Stats
	count := func(id string) int64 {
		if deliveries == nil {
			return 1
		}
		return max(deliveries[id], 1)
	}
	outcomes := make([]outcome, len(entries))
	jobs := make([]*job, len(entries))
	// A second entry for the same email (the same event added twice) takes
	// the first one's outcome instead of racing it for the claim.
	firstOf := make(map[string]int, len(entries))
	copyOf := make(map[int]int)
	var keys, eventIDs []string
	var firstErr error
	for i, e := range entries {
		j, o := c.prepare(e, count(e.ID))
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
		keys, eventIDs = append(keys, j.key), append(eventIDs, j.eventID)
	}
	if len(keys) > 0 {
		claimCtx, cancel := context.WithTimeout(ctx, redisTimeout)
		states, err := c.sends.Claim(claimCtx, keys, eventIDs, c.name)
		cancel()
		// The entries stay pending; the caller hears of it so that it backs
		// off (or answers 503) instead of reading more that cannot be sent.
		firstErr = err
		marks := c.startMarks(ctx)
		sem := make(chan struct{}, c.concurrency)
		var wg sync.WaitGroup
		for i, j := range jobs {
			switch {
			case j == nil:
			case err != nil:
				outcomes[i] = outcome{outcomeRetry, err}
			case states[j.key] == alreadySent:
				outcomes[i] = outcome{kind: outcomeDuplicate}
			case states[j.key] == leasedElsewhere:
				outcomes[i] = outcome{outcomeRetry, errors.New("another consumer is sending this email")}
			default:
				sem <- struct{}{}
				wg.Go(func() {
					defer func() { <-sem }()
					outcomes[i] = c.deliver(ctx, j, count(entries[i].ID), marks)
				})
			}
		}
		wg.Wait()
		marks.close()
	}
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
			c.logger.WarnContext(ctx, "delivery failed; will retry", slog.String("entry_id", e.ID), slog.Any("error", o.err))
		case outcomeDead:
			if err := c.deadLetterEntry(ctx, e, count(e.ID), o.err); err != nil {
				firstErr = cmpErr(firstErr, err)
				continue
			}
			stats.DeadLettered++
			c.logger.WarnContext(ctx, "moved to dead-letter stream", slog.String("entry_id", e.ID),
				slog.String("dead_letter_stream", c.deadLetter), slog.Any("error", o.err))
		}
	}
	if len(ack) > 0 {
		if err := c.client.Do(ctx, c.client.B().Xack().Key(c.stream).Group(c.group).Id(ack...).Build()).Error(); err != nil {
			firstErr = cmpErr(firstErr, fmt.Errorf("acknowledge %d entries: %w", len(ack), err))
		}
	}
	return stats, firstErr
}

func cmpErr(first, next error) error {
	if first != nil {
		return first
	}
	return next
}

// job is an entry that decoded into an email to send.
type job struct {
	key     string // the business fact: "welcome:<user id>"
	eventID string
	msg     *gomail.Msg
}

// prepare decodes e into a job, or says what became of it if there is
// nothing to send.
func (c *Consumer) prepare(e rueidis.XRangeEntry, deliveries int64) (*job, outcome) {
	if e.FieldValues == nil {
		return nil, outcome{kind: outcomeVanished}
	}
	if deliveries > c.maxDeliveries {
		return nil, outcome{outcomeDead, fmt.Errorf("delivered %d times, more than the maximum of %d", deliveries, c.maxDeliveries)}
	}
	ev, err := stream.Decode(e.ID, e.FieldValues)
	if err != nil {
		return nil, outcome{outcomeDead, err}
	}
	if ev.EventType != events.TypeUserCreated {
		return nil, outcome{kind: outcomeSkipped}
	}
	if _, err := uuid.Parse(ev.EventID); err != nil {
		return nil, outcome{outcomeDead, fmt.Errorf("%w: event_id %q is not a UUID", stream.ErrMalformed, ev.EventID)}
	}
	var user events.UserCreated
	if err := json.Unmarshal([]byte(ev.Payload), &user); err != nil {
		return nil, outcome{outcomeDead, fmt.Errorf("decode %s payload: %w", ev.EventType, err)}
	}
	if user.UserID <= 0 {
		return nil, outcome{outcomeDead, fmt.Errorf("decode %s payload: user_id must be positive", ev.EventType)}
	}
	msg, err := c.mailer.Welcome(Recipient{UserID: user.UserID, Email: user.Email, Name: user.Name}, ev.EventID)
	if err != nil {
		return nil, outcome{outcomeDead, err}
	}
	return &job{key: "welcome:" + strconv.FormatInt(user.UserID, 10), eventID: ev.EventID, msg: msg}, outcome{}
}

// deliver sends a claimed job's email and marks it sent.
func (c *Consumer) deliver(ctx context.Context, j *job, deliveries int64, marks *markBatcher) outcome {
	// The send is ours: see it through even if shutdown begins.
	ctx = context.WithoutCancel(ctx)
	if err := c.send(ctx, j.msg); err != nil {
		permanent := errors.Is(err, errPermanent)
		relCtx, cancel := context.WithTimeout(ctx, redisTimeout)
		if rerr := c.sends.Release(relCtx, j.key, c.name, permanent); rerr != nil {
			c.logger.WarnContext(ctx, "release send claim", slog.Any("error", rerr))
		}
		cancel()
		if permanent {
			return outcome{outcomeDead, err}
		}
		if deliveries >= c.maxDeliveries {
			return outcome{outcomeDead, fmt.Errorf("gave up after %d deliveries: %w", deliveries, err)}
		}
		return outcome{outcomeRetry, err}
	}
	// The email is out. From here until the mark is committed is the one
	// window in which a crash leads to a second email.
	if err := marks.mark(j.key, strings.Join(j.msg.GetGenHeader(gomail.HeaderMessageID), "")); err != nil {
		c.logger.ErrorContext(ctx, "email sent but not recorded; a redelivered duplicate event could send it again",
			slog.String("key", j.key), slog.Any("error", err))
	}
	return outcome{kind: outcomeSent}
}

// send tries msg up to sendAttempts times while failures are transient,
// backing off exponentially from 200ms.
func (c *Consumer) send(ctx context.Context, msg *gomail.Msg) error {
	b := retry.WithMaxRetries(uint64(c.sendAttempts-1), retry.WithJitterPercent(20, retry.NewExponential(200*time.Millisecond)))
	return retry.Do(ctx, b, func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, c.smtpTimeout)
		defer cancel()
		err := c.sender.Send(ctx, msg)
		if err != nil && !errors.Is(err, errPermanent) {
			return retry.RetryableError(err)
		}
		return err
	})
}

// markBatcher writes send marks as soon as they are ready; marks that
// arrive while a write is under way go together in the next one. No mark
// waits for others: batching only happens when there is a queue.
type markBatcher struct {
	sends *Sends
	reqs  chan markRequest
	done  chan struct{}
}

type markRequest struct {
	key, messageID string
	result         chan error
}

func (c *Consumer) startMarks(ctx context.Context) *markBatcher {
	m := &markBatcher{sends: c.sends, reqs: make(chan markRequest, c.concurrency), done: make(chan struct{})}
	// Marks are written even during shutdown: failing here costs a
	// duplicate email.
	ctx = context.WithoutCancel(ctx)
	go func() {
		defer close(m.done)
		for req := range m.reqs {
			batch := []markRequest{req}
		more:
			for len(batch) < 256 {
				select {
				case r, ok := <-m.reqs:
					if !ok {
						break more
					}
					batch = append(batch, r)
				default:
					break more
				}
			}
			keys, ids := make([]string, len(batch)), make([]string, len(batch))
			for i, r := range batch {
				keys[i], ids[i] = r.key, r.messageID
			}
			// Worth a few seconds of retries.
			b := retry.WithMaxRetries(4, retry.NewExponential(100*time.Millisecond))
			err := retry.Do(ctx, b, func(ctx context.Context) error {
				ctx, cancel := context.WithTimeout(ctx, redisTimeout)
				defer cancel()
				return retry.RetryableError(m.sends.MarkSent(ctx, keys, ids))
			})
			for _, r := range batch {
				r.result <- err
			}
		}
	}()
	return m
}

// mark records key as sent and waits until that is committed.
func (m *markBatcher) mark(key, messageID string) error {
	r := markRequest{key: key, messageID: messageID, result: make(chan error, 1)}
	m.reqs <- r
	return <-r.result
}

// close stops the batcher once every queued mark is written.
func (m *markBatcher) close() {
	close(m.reqs)
	<-m.done
}

// deadLetterEntry moves e to the dead-letter stream: one MULTI/EXEC adds it
// there, with why it failed, and acknowledges it here, so it is never both
// lost and never left pending.
func (c *Consumer) deadLetterEntry(ctx context.Context, e rueidis.XRangeEntry, deliveries int64, reason error) error {
	add := c.client.B().Xadd().Key(c.deadLetter).Id("*").FieldValue()
	for _, k := range OriginalFields(e.FieldValues) {
		add = add.FieldValue(k, e.FieldValues[k])
	}
	add = add.FieldValue(FieldDeadOriginalID, e.ID).
		FieldValue(FieldDeadStream, c.stream).
		FieldValue(FieldDeadError, reason.Error()).
		FieldValue(FieldDeadDeliveries, strconv.FormatInt(deliveries, 10)).
		FieldValue(FieldDeadConsumer, c.name).
		FieldValue(FieldDeadFailedAt, time.Now().UTC().Format(time.RFC3339Nano))
	results := c.client.DoMulti(ctx,
		c.client.B().Multi().Build(),
		add.Build(),
		c.client.B().Xack().Key(c.stream).Group(c.group).Id(e.ID).Build(),
		c.client.B().Exec().Build())
	for _, r := range results {
		if err := r.Error(); err != nil {
			return fmt.Errorf("dead-letter %s: %w", e.ID, err)
		}
	}
	return nil
}

// Run is the background loop: this consumer's own pending entries first
// (left by an earlier life of the same name), then new entries as they
// arrive, with the claim loop beside it. It returns when ctx is done.
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
	if _, err := c.drainOwnPending(ctx); err != nil && ctx.Err() == nil {
		c.logger.WarnContext(ctx, "re-read own pending entries", slog.Any("error", err))
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
			} else if stats.Claimed > 0 || stats.Vanished > 0 {
				c.logger.InfoContext(ctx, "claimed idle entries", slog.Int64("claimed", stats.Claimed),
					slog.Int64("trimmed_before_processing", stats.Vanished))
			}
		}
	})
	for ctx.Err() == nil {
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
		entries, err := c.read(ctx, ">", c.block)
		if err == nil && len(entries) > 0 {
			_, err = c.handle(ctx, entries, nil)
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
		s, err := c.handle(ctx, entries, nil)
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
		stats.Vanished += int64(deleted)
		stats.Claimed += int64(len(entries))
		if len(entries) > 0 {
			counts, err := c.deliveries(ctx, entries)
			if err != nil {
				return stats, err
			}
			s, err := c.handle(ctx, entries, counts)
			stats.add(s)
			if err != nil {
				return stats, err
			}
		}
		if next == "0-0" || (!stopBy.IsZero() && time.Now().After(stopBy)) {
			return stats, nil
		}
		cursor = next
	}
}

// ping checks, within a Redis round trip's time, that the send records can
// be reached.
func (c *Consumer) ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, redisTimeout)
	defer cancel()
	return c.sends.Ping(ctx)
}

// drainOwnPending processes the entries pending for this consumer's name.
func (c *Consumer) drainOwnPending(ctx context.Context) (Stats, error) {
	var stats Stats
	after := "0"
	for {
		entries, err := c.read(ctx, after, 0)
		if err != nil || len(entries) == 0 {
			return stats, err
		}
		counts, err := c.deliveries(ctx, entries)
		if err != nil {
			return stats, err
		}
		s, err := c.handle(ctx, entries, counts)
		stats.add(s)
		if err != nil {
			return stats, err
		}
		after = entries[len(entries)-1].ID
	}
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
