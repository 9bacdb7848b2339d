package sendemail

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	gomail "github.com/wneessen/go-mail"

	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/smtptest"
)

// slowMarks makes every statement that marks emails sent take d.
func slowMarks(t *testing.T, b *testBundle, d time.Duration) {
	t.Helper()
	_, err := b.pool.Exec(context.Background(), fmt.Sprintf(`
		CREATE FUNCTION slow_marks() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF EXISTS (SELECT FROM new_rows WHERE sent_at IS NOT NULL) THEN PERFORM pg_sleep(%f); END IF;
			RETURN NULL;
		END $$;
		CREATE TRIGGER slow_marks AFTER UPDATE ON email_sends REFERENCING NEW TABLE AS new_rows
			FOR EACH STATEMENT EXECUTE FUNCTION slow_marks();`, d.Seconds()))
	require.NoError(t, err)
}

// R2-1: the bound is per handle call, not per process.
func TestTwoPassesAtOnceKeepAtMostTwiceTheConcurrencySentButUnmarked(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	slowMarks(t, b, 200*time.Millisecond)
	var mu sync.Mutex
	worst := 0
	b.smtp.OnAccept(func(smtptest.Message) {
		// Accepted first, then marked: a mark committed in between makes
		// this an underestimate, never an overestimate.
		accepted := b.smtp.Count()
		var marked int
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM email_sends WHERE sent_at IS NOT NULL`).Scan(&marked))
		mu.Lock()
		defer mu.Unlock()
		worst = max(worst, accepted-marked)
	})
	s := b.service(t, func(c *Config) { c.BatchSize, c.Concurrency, c.DBMaxConns = 16, 2, 8 })
	require.NoError(t, s.consumer.EnsureGroup(ctx))
	for i := range 64 {
		b.add(t, int64(i+1), fmt.Sprintf("u%d@example.com", i+1), "U")
	}
	// Two triggers overlap (a scheduler and a retry of a 503, or the
	// background loop beside its claim loop): each is a handle of its own.
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			_, err := s.consumer.Pass(ctx, time.Now().Add(60*time.Second))
			require.NoError(t, err)
		})
	}
	wg.Wait()
	require.Equal(t, 64, b.smtp.Count())
	mu.Lock()
	defer mu.Unlock()
	t.Logf("most emails accepted and not yet recorded at once: %d", worst)
	require.LessOrEqual(t, worst, 2*2, "README: at most 2 × SENDEMAIL_CONCURRENCY sent and not yet marked at any time")
}

// R2-2: in trigger mode a mark kept in memory is retried only if this
// instance takes the entry again.
func TestAMarkThatFailedIsWrittenOnceTheDatabaseIsBackEvenIfAnotherInstanceTakesTheEntry(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	refuse := refuseWrites(t, b)
	var once sync.Once
	b.smtp.OnAccept(func(smtptest.Message) {
		once.Do(func() {
			refuse(true)
			// Longer than the mark's retries (about 1.5 s), far shorter
			// than what the claim has left after the send.
			time.AfterFunc(2500*time.Millisecond, func() { refuse(false) })
		})
	})
	cfg := func(c *Config) {
		c.BatchSize, c.Concurrency = 1, 1
		c.SMTPTimeout, c.SMTPDataTimeout, c.Lease = 500*time.Millisecond, 500*time.Millisecond, 8*time.Second
		c.ClaimIdle = 100 * time.Millisecond
	}
	a := b.service(t, cfg, func(c *Config) { c.ConsumerName = "a" })
	other := b.service(t, cfg, func(c *Config) { c.ConsumerName = "b" })
	require.NoError(t, a.consumer.EnsureGroup(ctx))
	b.add(t, 1, "ada@example.com", "Ada")
	_, err := a.consumer.Pass(ctx, time.Now().Add(10*time.Second))
	require.Error(t, err, "the mark failed")
	_, owed := a.consumer.unrecorded.Load("welcome:1")
	require.True(t, owed, "instance a remembers the email it sent but could not record")
	// a stays alive; the database is back after 2.5 s; the trigger
	// happens to reach instance b for the next 10 s (Cloud Run routes
	// requests to any instance).
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		_, _ = other.consumer.Pass(ctx, time.Now().Add(5*time.Second))
		time.Sleep(200 * time.Millisecond)
	}
	_, stillOwed := a.consumer.unrecorded.Load("welcome:1")
	t.Logf("emails to ada: %d; a still owes the mark: %v", b.smtp.Count(), stillOwed)
	require.Equal(t, 1, b.smtp.Count(), "the mark became possible 2.5 s after the send, well inside the 8 s lease")
}

// ctxSender records whether the handle's context had ended when a send started.
type ctxSender struct {
	handleCtx context.Context
	next      Sender
	late      atomic.Int64
	started   atomic.Int64
}

func (s *ctxSender) Send(ctx context.Context, msg *gomail.Msg) error {
	s.started.Add(1)
	if s.handleCtx.Err() != nil {
		s.late.Add(1)
	}
	return s.next.Send(ctx, msg)
}

// R2-3: a send can start after shutdown began, if the claim right before
// it was slow.
func TestNoSendStartsOnceShutdownBeganEvenIfTheClaimBeforeItWasSlow(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, err := b.pool.Exec(ctx, `
		CREATE FUNCTION slow_renewals() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF OLD.claimed_by = NEW.claimed_by AND NEW.sent_at IS NULL THEN PERFORM pg_sleep(1); END IF;
			RETURN NEW;
		END $$;
		CREATE TRIGGER slow_renewals BEFORE UPDATE ON email_sends
			FOR EACH ROW EXECUTE FUNCTION slow_renewals();`)
	require.NoError(t, err)
	smtpSender, err := NewSMTPSender(b.smtp.URL(), time.Second, time.Second)
	require.NoError(t, err)
	rec := &ctxSender{handleCtx: ctx, next: smtpSender}
	// A lease shorter than a conversation: every claim is taken right
	// before its send.
	cfg := b.config(func(c *Config) {
		c.BatchSize, c.Concurrency = 1, 1
		c.SMTPTimeout, c.SMTPDataTimeout, c.Lease = time.Second, time.Second, 2*time.Second
	})
	s, err := NewWithSender(context.Background(), cfg, rec, logging.Discard())
	require.NoError(t, err)
	t.Cleanup(func() { s.Stop(); s.Close(); closeSender(smtpSender) })
	require.NoError(t, s.consumer.EnsureGroup(ctx))
	b.add(t, 1, "ada@example.com", "Ada")
	entries, err := s.consumer.read(ctx, ">", 0)
	require.NoError(t, err)
	// The claim taken ahead does not cover a conversation: it is renewed
	// right before the send, which takes 1 s; SIGTERM comes meanwhile.
	time.AfterFunc(500*time.Millisecond, cancel)
	st, err := s.consumer.handle(ctx, entries)
	t.Logf("handle: %+v %v; sends started %d, after shutdown began %d", st, err, rec.started.Load(), rec.late.Load())
	require.Zero(t, rec.late.Load(), "README: on SIGTERM no send starts")
}

// R2-4: a goodbye begun after Close outlives it.
func TestCloseLeavesNoGoodbyeRunningBehindIt(t *testing.T) {
	t.Parallel()
	srv, sender, msg := senderAndWelcome(t)
	srv.SetReplyDelay(200 * time.Millisecond)
	done := make(chan error, 1)
	go func() { done <- sender.Send(context.Background(), msg) }()
	time.Sleep(300 * time.Millisecond)
	require.NoError(t, sender.Close())
	require.NoError(t, <-done)
	sender.mu.Lock()
	quitting := len(sender.quitting)
	sender.mu.Unlock()
	t.Logf("goodbyes still running after Close and the send returned: %d", quitting)
	require.Zero(t, quitting, "Close returned while a goodbye goroutine it never waits for still runs")
}

// A mark that fails once (its retry succeeds) stops the batch; the
// rest is sent once, after the claim idle time, not after the lease.
func TestAMarkThatFailsOnceLeavesTheRestOfTheBatchForTheNextPassNotForTheLease(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	_, err := b.pool.Exec(ctx, `
		CREATE TABLE fail_once (on_ bool NOT NULL);
		INSERT INTO fail_once VALUES (false);
		CREATE SEQUENCE fail_seq;
		CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			-- nextval is not rolled back with the failed statement.
			IF EXISTS (SELECT FROM new_rows WHERE sent_at IS NOT NULL) AND (SELECT on_ FROM fail_once) AND nextval('fail_seq') = 1 THEN
				RAISE EXCEPTION 'could not flush' USING ERRCODE = '58030';
			END IF;
			RETURN NULL;
		END $$;
		CREATE TRIGGER fail_once AFTER UPDATE ON email_sends REFERENCING NEW TABLE AS new_rows
			FOR EACH STATEMENT EXECUTE FUNCTION fail_once();`)
	require.NoError(t, err)
	var once sync.Once
	b.smtp.OnAccept(func(smtptest.Message) {
		once.Do(func() { _, _ = b.pool.Exec(ctx, `UPDATE fail_once SET on_ = true`) })
	})
	s := b.service(t, func(c *Config) {
		c.BatchSize, c.Concurrency, c.ClaimIdle = 16, 2, 300*time.Millisecond
	})
	for i := range 16 {
		b.add(t, int64(i+1), fmt.Sprintf("u%d@example.com", i+1), "U")
	}
	st, err := s.consumer.Pass(ctx, time.Now().Add(30*time.Second))
	t.Logf("first pass: %+v %v", st, err)
	require.Error(t, err)
	var held int
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM email_sends WHERE sent_at IS NULL AND lease_until > now()`).Scan(&held))
	require.Zero(t, held, "claims of sends not started are released")
	var marked int
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM email_sends WHERE sent_at IS NOT NULL`).Scan(&marked))
	require.Equal(t, b.smtp.Count(), marked, "every email accepted is recorded")
	require.EqualValues(t, marked, st.Sent, "and acknowledged")
	start := time.Now()
	require.Eventually(t, func() bool {
		_, _ = s.consumer.Pass(ctx, time.Now().Add(10*time.Second))
		return b.pending(t) == 0
	}, 10*time.Second, 100*time.Millisecond)
	t.Logf("the rest followed in %s", time.Since(start))
	b.requireOneEmailEach(t, 16)
}

// Stop while sends are under way and marks are slow: every email
// accepted is recorded and acknowledged, nothing not started stays claimed.
func TestStopWhileMarksAreSlowLeavesNothingClaimedAndNothingUnrecorded(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	slowMarks(t, b, 300*time.Millisecond)
	b.smtp.SetReplyDelay(10 * time.Millisecond)
	s := b.service(t, func(c *Config) { c.BatchSize, c.Concurrency = 64, 4 })
	require.NoError(t, s.consumer.EnsureGroup(ctx))
	for i := range 64 {
		b.add(t, int64(i+1), fmt.Sprintf("u%d@example.com", i+1), "U")
	}
	require.NoError(t, s.Start(ctx))
	require.Eventually(t, func() bool { return b.smtp.Count() >= 6 }, 10*time.Second, 5*time.Millisecond)
	s.Stop()
	accepted := b.smtp.Count()
	var marked, held int
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE sent_at IS NOT NULL), count(*) FILTER (WHERE sent_at IS NULL AND lease_until > now()) FROM email_sends`).Scan(&marked, &held))
	t.Logf("accepted %d, marked %d, still claimed %d, pending %d", accepted, marked, held, b.pending(t))
	require.Equal(t, accepted, marked)
	require.Zero(t, held)
	require.EqualValues(t, 64-accepted, b.pending(t))
}
