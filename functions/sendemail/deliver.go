package sendemail

// One email, from a decoded entry to "sent" (or why not). The invariants
// this file keeps: a conversation with the mail server starts only under a
// claim whose lease outlasts it by at least half the slack a fresh claim
// leaves (taken ahead with its window, or renewed or taken right before
// the send; see covers); no conversation starts once the database failed
// to record a send of the batch; and an email the server answered 250 to
// is never sent again by this process, nor released for another to send.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/redis/rueidis"
	"github.com/sethvargo/go-retry"
	gomail "github.com/wneessen/go-mail"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/outboxfn/outbox/shared/events"
	"github.com/outboxfn/outbox/shared/stream"
)

// job is an entry that decoded into an email to send.
type job struct {
	key     string // the business fact: "welcome:<user id>"
	eventID string
	msg     *gomail.Msg
}

// Decode reads a user.created entry into the send key ("welcome:<user id>"),
// the canonical event id and the recipient. skip is true for other event
// types; an error means the entry can never be sent.
func Decode(id string, fields map[string]string) (key, eventID string, r Recipient, skip bool, err error) {
	ev, err := stream.Decode(id, fields)
	if err != nil {
		return "", "", r, false, err
	}
	if ev.EventType != events.TypeUserCreated {
		return "", "", r, true, nil
	}
	u, err := uuid.Parse(ev.EventID)
	if err != nil {
		return "", "", r, false, fmt.Errorf("%w: event_id %q is not a UUID", stream.ErrMalformed, ev.EventID)
	}
	var user events.UserCreated
	if err := json.Unmarshal([]byte(ev.Payload), &user); err != nil {
		return "", "", r, false, fmt.Errorf("decode %s payload: %w", ev.EventType, err)
	}
	if user.UserID <= 0 {
		return "", "", r, false, fmt.Errorf("decode %s payload: user_id must be positive", ev.EventType)
	}
	// The canonical form: uuid.Parse also takes urn:uuid:… and braces,
	// which PostgreSQL refuses.
	return "welcome:" + strconv.FormatInt(user.UserID, 10), u.String(),
		Recipient{UserID: user.UserID, Email: user.Email, Name: user.Name}, false, nil
}

// prepare decodes e into a job, or says what became of it if there is
// nothing to send.
func (c *Consumer) prepare(e rueidis.XRangeEntry) (*job, outcome) {
	if e.FieldValues == nil {
		return nil, outcome{kind: outcomeVanished}
	}
	key, eventID, r, skip, err := Decode(e.ID, e.FieldValues)
	switch {
	case err != nil:
		return nil, outcome{kind: outcomeDead, err: err}
	case skip:
		return nil, outcome{kind: outcomeSkipped}
	}
	msg, err := c.mailer.Welcome(r, eventID)
	if err != nil {
		return nil, outcome{kind: outcomeDead, err: err}
	}
	return &job{key: key, eventID: eventID, msg: msg}, outcome{}
}

// heldClaim is a claim taken for a job ahead of its send, together with
// the other jobs of its window (see Consumer.claimWindows).
type heldClaim struct {
	token string
	// asked is when the claim statement was about to be sent.
	asked time.Time
}

// covers says whether a claim asked for at asked may be used, without a
// round trip, for a conversation that starts now.
//
// The claim's lease was set from the database's now() when its statement
// ran, which was after asked; every consumer compares it with the
// database's clock. So it runs out no earlier than asked + lease, as long
// as that clock runs no faster than this process's monotonic clock (the
// same assumption a claim taken right before the send relies on). The
// conversation ends by now + sendLimit (sendOnce cuts it there), and its
// mark must commit before the lease runs out, or another consumer may
// send the email again. A fresh claim leaves the mark lease - sendLimit
// after the longest conversation; one taken ahead is used only while it
// still leaves at least half of that, so that a mark delayed by less than
// half of that slack never costs a duplicate. A claim that does not is
// renewed first, right before the send. With a lease no longer than one
// conversation (a setting Validate refuses, but tests use) no claim taken
// ahead is used, and every email is claimed right before its send.
func (c *Consumer) covers(asked time.Time) bool {
	slack := c.sends.lease - c.sendLimit
	return slack > 0 && time.Since(asked)+c.sendLimit+slack/2 < c.sends.lease
}

// claimOutcome turns a claim's answer into the outcome of a delivery that
// cannot go on; ok is true when the claim was taken.
func claimOutcome(res claimResult, dbErr *errOnce) (o outcome, ok bool) {
	switch {
	case res.err != nil && entryFault(res.err):
		return outcome{kind: outcomeDead, err: res.err}, false
	case res.err != nil:
		dbErr.set(res.err)
		return outcome{kind: outcomeRetry, err: res.err}, false
	case res.state == alreadySent:
		return outcome{kind: outcomeDuplicate}, false
	case res.state == leasedElsewhere:
		// Not a failure of this email: nothing is counted.
		return outcome{kind: outcomeRetry, err: errors.New("another claim on this email is still running")}, false
	}
	return outcome{}, true
}

// deliver sees one email through: up to sendAttempts conversations, each
// under a claim that covers it (ahead, the claim taken with its window, for
// the first if it still does; otherwise one taken right before it). A send
// the server answered 250 to is sent, whatever fails after; a send whose
// answer never came keeps its claim, so that it is retried only once the
// lease has run out. sent is called once a conversation ended in 250,
// before the mark: the next send need not wait for this one's commit. A
// slot of unmarked is held from before the claim is checked until the
// mark committed (or the send failed), and no send starts once dbErr is
// set: its mark could not be written either.
func (c *Consumer) deliver(ctx context.Context, j *job, ahead heldClaim, claims *batcher[claimRequest, claimResult], marks *batcher[mark, markResult], dbErr *errOnce, sent func(), unmarked chan struct{}) outcome {
	if o, ok := c.recordUnrecorded(ctx, j.key); ok {
		return o
	}
	// A send that has started is seen through for up to stopGrace after
	// shutdown begins, then cut.
	sendCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	stopCut := context.AfterFunc(ctx, func() {
		t := time.AfterFunc(c.stopGrace, cancel)
		context.AfterFunc(sendCtx, func() { t.Stop() })
	})
	defer stopCut()
	dbCtx := context.WithoutCancel(ctx)
	// notStarted leaves the email pending, releasing the claim token
	// holds (if any) so that it waits for nobody's lease.
	notStarted := func(token string, err error) outcome {
		if token != "" {
			c.releaseUnstarted(ctx, []claimRequest{{key: j.key, token: token}})
		}
		return outcome{kind: outcomeRetry, err: err}
	}
	backoff := retry.WithJitterPercent(20, retry.NewExponential(200*time.Millisecond))
	for try := 1; ; try++ {
		// The claim held now: the one taken ahead, before the first try
		// only (a failed try released its claim).
		prior := ""
		if try == 1 {
			prior = ahead.token
		}
		// The slot is taken before the claim is judged: waiting for it
		// (for marks to commit) takes time off the claim's lease.
		select {
		case unmarked <- struct{}{}:
		case <-ctx.Done():
			return notStarted(prior, fmt.Errorf("not started: shutting down: %w", ctx.Err()))
		}
		if ctx.Err() != nil {
			<-unmarked
			return notStarted(prior, fmt.Errorf("not started: shutting down: %w", ctx.Err()))
		}
		if err := dbErr.get(); err != nil {
			<-unmarked
			return notStarted(prior, fmt.Errorf("not started: the send records failed: %w", err))
		}
		token := prior
		// A renewal (the same token) or a new claim, right before the send.
		if prior == "" || !c.covers(ahead.asked) {
			if token == "" {
				token = newToken(c.name)
			}
			_, span := c.tel.startChild(ctx, "claim", trace.SpanKindClient, attribute.Bool("outbox.email.renewal", prior != ""))
			res, _ := claims.do(claimRequest{key: j.key, eventID: j.eventID, token: token})
			o, ok := claimOutcome(res, dbErr)
			endSpan(span, o.err)
			if !ok {
				<-unmarked
				return o
			}
		} else {
			// The claim taken ahead, with its window, still covers the send.
			_, span := c.tel.startChild(ctx, "claim", trace.SpanKindInternal, attribute.Bool("outbox.email.ahead", true))
			span.End()
		}
		// A mark may have failed, or shutdown begun, while the claim was
		// taken.
		if err := dbErr.get(); err != nil {
			<-unmarked
			return notStarted(token, fmt.Errorf("not started: the send records failed: %w", err))
		}
		if ctx.Err() != nil {
			<-unmarked
			return notStarted(token, fmt.Errorf("not started: shutting down: %w", ctx.Err()))
		}

		err := c.sendOnce(sendCtx, j.msg)
		if err == nil {
			sent()
			defer func() { <-unmarked }()
			return c.recordSent(dbCtx, j, token, marks)
		}
		<-unmarked
		ambiguous := errors.Is(err, errAmbiguous)
		opCtx, cancelOp := context.WithTimeout(dbCtx, redisTimeout)
		if errors.Is(err, errPermanent) {
			if ferr := c.sends.Forget(opCtx, j.key, token); ferr != nil {
				c.logger.WarnContext(ctx, "forget send claim", slog.Any("error", ferr))
			}
			cancelOp()
			return outcome{kind: outcomeDead, err: err}
		}
		if !ambiguous && try < c.sendAttempts && sendCtx.Err() == nil && ctx.Err() == nil {
			if rerr := c.sends.Release(opCtx, j.key, token); rerr != nil {
				c.logger.WarnContext(ctx, "release send claim", slog.Any("error", rerr))
			}
			cancelOp()
			delay, _ := backoff.Next()
			select {
			case <-time.After(delay):
				continue
			case <-ctx.Done():
				return outcome{kind: outcomeRetry, err: err}
			}
		}
		if ambiguous {
			c.logger.WarnContext(ctx, "no answer to the message data; the email may have gone out, and is retried once after the lease",
				slog.String("key", j.key), slog.Duration("lease", c.sends.lease), slog.Any("error", err))
		}
		failures, held, ferr := c.sends.Fail(opCtx, j.key, token, ambiguous)
		cancelOp()
		switch {
		case ferr != nil:
			dbErr.set(ferr)
			return outcome{kind: outcomeRetry, err: err, ambiguous: ambiguous}
		case held && failures >= c.maxDeliveries:
			fctx, cancelF := context.WithTimeout(dbCtx, redisTimeout)
			if ferr := c.sends.Forget(fctx, j.key, token); ferr != nil {
				c.logger.WarnContext(ctx, "forget send claim", slog.Any("error", ferr))
			}
			cancelF()
			return outcome{kind: outcomeDead, err: fmt.Errorf("gave up after %d deliveries: %w", failures, err), failures: failures, ambiguous: ambiguous}
		}
		return outcome{kind: outcomeRetry, err: err, failures: failures, ambiguous: ambiguous}
	}
}

// sendOnce has one conversation about msg, bounded by the sender's limit.
func (c *Consumer) sendOnce(ctx context.Context, msg *gomail.Msg) (err error) {
	ctx, span := c.tel.startChild(ctx, "smtp send", trace.SpanKindClient)
	start := time.Now()
	defer func() {
		c.tel.timeSMTP(ctx, start, err)
		endSpan(span, err)
	}()
	ctx, cancel := context.WithTimeout(ctx, c.sendLimit)
	defer cancel()
	return c.sender.Send(ctx, msg)
}

// recordSent marks a sent email. If the mark cannot be committed the fact
// is kept in memory, the claim is kept (never released), the entry stays
// pending, and the mark is tried again before anything else is done with
// that email here.
func (c *Consumer) recordSent(ctx context.Context, j *job, token string, marks *batcher[mark, markResult]) outcome {
	m := mark{key: j.key, token: token, messageID: strings.Join(j.msg.GetGenHeader(gomail.HeaderMessageID), "")}
	_, span := c.tel.startChild(ctx, "mark", trace.SpanKindClient)
	res, err := marks.do(m)
	endSpan(span, err)
	lost := res.lost
	if err != nil {
		c.unrecorded.Store(j.key, m)
		c.startFlusher()
		c.logger.ErrorContext(ctx, "email sent but not yet recorded; the entry stays pending and the mark is retried",
			slog.String("key", j.key), slog.Any("error", err))
		return outcome{kind: outcomeRetry, err: err}
	}
	if lost {
		c.logger.ErrorContext(ctx, "email sent after its claim had run out; another consumer may have sent it too",
			slog.String("key", j.key))
	}
	return outcome{kind: outcomeSent}
}

// recordUnrecorded retries the mark of an email this process sent but could
// not record; ok says there was one.
func (c *Consumer) recordUnrecorded(ctx context.Context, key string) (outcome, bool) {
	v, ok := c.unrecorded.Load(key)
	if !ok {
		return outcome{}, false
	}
	mctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), redisTimeout)
	defer cancel()
	if _, err := c.sends.MarkSent(mctx, []mark{v.(mark)}); err != nil {
		return outcome{kind: outcomeRetry, err: fmt.Errorf("email sent, mark still failing: %w", err)}, true
	}
	c.unrecorded.Delete(key)
	return outcome{kind: outcomeSent}, true
}

// flushUnrecorded retries every mark this process still owes.
func (c *Consumer) flushUnrecorded(ctx context.Context) {
	c.unrecorded.Range(func(k, _ any) bool {
		c.recordUnrecorded(ctx, k.(string))
		return ctx.Err() == nil
	})
}

// startFlusher retries the marks this process owes in the background, with
// backoff, until none is owed or the consumer is closed: in trigger mode
// nothing else retries them unless this instance happens to take the same
// entry again before the claim runs out.
func (c *Consumer) startFlusher() {
	c.flushMu.Lock()
	defer c.flushMu.Unlock()
	if c.flushing || c.flushClosed {
		return
	}
	if c.flushStop == nil {
		c.flushStop = make(chan struct{})
	}
	c.flushing = true
	stop := c.flushStop
	c.flushWG.Go(func() {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go func() {
			select {
			case <-stop:
				cancel()
			case <-ctx.Done():
			}
		}()
		b := retry.WithCappedDuration(2*time.Second, retry.NewExponential(200*time.Millisecond))
		for {
			d, _ := b.Next()
			select {
			case <-stop:
				c.flushMu.Lock()
				c.flushing = false
				c.flushMu.Unlock()
				return
			case <-time.After(d):
			}
			c.flushUnrecorded(ctx)
			c.flushMu.Lock()
			empty := true
			c.unrecorded.Range(func(any, any) bool { empty = false; return false })
			if empty {
				c.flushing = false
				c.flushMu.Unlock()
				return
			}
			c.flushMu.Unlock()
		}
	})
}

// stopFlusher stops the background retries of owed marks and waits for them.
func (c *Consumer) stopFlusher() {
	c.flushMu.Lock()
	c.flushClosed = true
	if c.flushStop != nil {
		close(c.flushStop)
	}
	c.flushMu.Unlock()
	c.flushWG.Wait()
}
