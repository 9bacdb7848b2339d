package sendemail

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/textproto"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	gomail "github.com/wneessen/go-mail"

	"github.com/outboxfn/outbox/shared/logging"

	"github.com/outboxfn/outbox/shared/smtptest"
)

// refuseWrites installs a switch that makes every write to email_sends fail
// as a read-only database does (SQLSTATE 25006, not an entry's fault), and
// returns the function that turns it on or off.
func refuseWrites(t *testing.T, b *testBundle) func(on bool) {
	t.Helper()
	ctx := context.Background()
	_, err := b.pool.Exec(ctx, `
		CREATE TABLE refuse_switch (on_ bool NOT NULL);
		INSERT INTO refuse_switch VALUES (false);
		CREATE FUNCTION refuse_writes() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF (SELECT on_ FROM refuse_switch) THEN
				RAISE EXCEPTION 'cannot execute % in a read-only transaction', TG_OP USING ERRCODE = '25006';
			END IF;
			RETURN NULL;
		END $$;
		CREATE TRIGGER refuse_writes BEFORE INSERT OR UPDATE OR DELETE ON email_sends
			FOR EACH STATEMENT EXECUTE FUNCTION refuse_writes();`)
	require.NoError(t, err)
	return func(on bool) {
		_, err := b.pool.Exec(ctx, `UPDATE refuse_switch SET on_ = $1`, on)
		require.NoError(t, err)
	}
}

func TestNoSendStartsOnceTheDatabaseCannotRecordSends(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	refuse := refuseWrites(t, b)
	// The database turns read-only right after the server accepted the
	// first email of the batch: that email's mark fails.
	var once sync.Once
	b.smtp.OnAccept(func(smtptest.Message) { once.Do(func() { refuse(true) }) })
	cfg := func(c *Config) {
		c.BatchSize, c.Concurrency = 16, 1
		c.SMTPTimeout, c.SMTPDataTimeout, c.Lease = time.Second, time.Second, 5*time.Second
		c.ClaimIdle = 100 * time.Millisecond
	}
	first := b.service(t, cfg, func(c *Config) { c.ConsumerName = "first" })
	for i := range 16 {
		b.add(t, int64(i+1), fmt.Sprintf("u%d@example.com", i+1), "U")
	}
	stats, err := first.consumer.Pass(ctx, time.Now().Add(20*time.Second))
	t.Logf("first pass: %+v, error: %v", stats, err)
	require.Error(t, err, "a pass whose marks failed fails (the trigger answers 503, the loop backs off)")
	sentUnrecorded := b.smtp.Count()
	t.Logf("emails accepted while their marks could not be written: %d", sentUnrecorded)

	// The instance dies during the outage (its memory of the unrecorded
	// marks with it); the database comes back; another instance takes
	// over once the claims ran out.
	refuse(false)
	time.Sleep(5100 * time.Millisecond)
	second := b.service(t, cfg, func(c *Config) { c.ConsumerName = "second" })
	_, err = second.consumer.Pass(ctx, time.Now().Add(20*time.Second))
	require.NoError(t, err)
	got := map[string]int{}
	for _, m := range b.smtp.Messages() {
		got[m.To[0]]++
	}
	dups := 0
	for _, n := range got {
		if n > 1 {
			dups++
		}
	}
	t.Logf("users: %d, users with two emails: %d", len(got), dups)
	// Before this change: 1 (SENDEMAIL_CONCURRENCY). A send that does not
	// wait for the mark before it may make that twice as many.
	require.LessOrEqual(t, sentUnrecorded, 2*1, "sent while the database could not record them, and sent again after a crash")
}

// pacedSender delays the send of chosen recipients before handing it to the
// real SMTP sender, as a slow (but answering) mail server would.
type pacedSender struct {
	next  Sender
	delay map[string]time.Duration
}

func (p pacedSender) Send(ctx context.Context, msg *gomail.Msg) error {
	rcpts, _ := msg.GetRecipients()
	select {
	case <-time.After(p.delay[strings.Trim(rcpts[0], "<>")]):
	case <-ctx.Done():
		return ctx.Err()
	}
	return p.next.Send(ctx, msg)
}

func TestAMarkDelayedFarLessThanTheLeaseCostsNoDuplicate(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	// One conversation may last 3 s (2 × 1 s + 1 s), the lease 6 s. The
	// database cannot write marks for 1.2 s, a fifth of the lease, right
	// after the server accepted u2's email.
	cfg := func(c *Config) {
		c.BatchSize, c.Concurrency = 2, 1
		c.SMTPTimeout, c.SMTPDataTimeout, c.Lease = time.Second, time.Second, 6*time.Second
		c.ClaimIdle = 50 * time.Millisecond
	}
	var once sync.Once
	b.smtp.OnAccept(func(m smtptest.Message) {
		if m.To[0] != "u2@example.com" {
			return
		}
		once.Do(func() {
			_, err := b.pool.Exec(ctx, `ALTER TABLE email_sends ADD CONSTRAINT refuse_marks CHECK (sent_at IS NULL) NOT VALID`)
			require.NoError(t, err)
			time.AfterFunc(1200*time.Millisecond, func() {
				_, _ = b.pool.Exec(ctx, `ALTER TABLE email_sends DROP CONSTRAINT refuse_marks`)
			})
		})
	})
	smtpSender, err := NewSMTPSender(b.smtp.URL(), time.Second, time.Second)
	require.NoError(t, err)
	// u1's send takes 2.9 s, u2's 1.9 s: both inside one conversation's
	// limit, and u2's starts while its batch claim still covers it.
	paced := pacedSender{next: smtpSender, delay: map[string]time.Duration{
		"u1@example.com": 2900 * time.Millisecond, "u2@example.com": 1900 * time.Millisecond}}
	first, err := NewWithSender(ctx, b.config(cfg, func(c *Config) { c.ConsumerName = "first" }), paced, logging.Discard())
	require.NoError(t, err)
	t.Cleanup(func() { first.Stop(); first.Close(); closeSender(smtpSender) })
	second := b.service(t, cfg, func(c *Config) { c.ConsumerName = "second" })
	require.NoError(t, first.consumer.EnsureGroup(ctx))
	b.add(t, 1, "u1@example.com", "U")
	b.add(t, 2, "u2@example.com", "U")

	// Another instance keeps taking over idle entries meanwhile.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			_, _ = second.consumer.Pass(ctx, time.Now().Add(10*time.Second))
		}
	})
	entries, err := first.consumer.read(ctx, ">", 0)
	require.NoError(t, err)
	start := time.Now()
	st, err := first.consumer.handle(ctx, entries)
	t.Logf("first: %v", err)
	t.Logf("first handled %+v in %s", st, time.Since(start))
	for _, m := range b.smtp.Messages() {
		t.Logf("accepted %s at +%s", m.To[0], m.At.Sub(start))
	}
	var rows []string
	r, err := b.pool.Query(ctx, `SELECT key || ' sent ' || coalesce(sent_at::text, '-') || ' attempts ' || attempts FROM email_sends ORDER BY key`)
	require.NoError(t, err)
	for r.Next() {
		var s string
		require.NoError(t, r.Scan(&s))
		rows = append(rows, s)
	}
	t.Logf("records at %s: %v", time.Now(), rows)
	time.Sleep(time.Second)
	close(stop)
	wg.Wait()
	got := map[string]int{}
	for _, m := range b.smtp.Messages() {
		got[m.To[0]]++
	}
	require.Equal(t, map[string]int{"u1@example.com": 1, "u2@example.com": 1}, got,
		"one email each: the mark was late by 1.2 s, not by a lease")
}

func closeSender(s any) {
	if c, ok := s.(interface{ Close() error }); ok {
		_ = c.Close()
	}
}

func TestEmailsSentButNotRecordedStayBoundedByTheConcurrency(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	// Each statement that marks emails sent takes 200 ms, however many
	// it marks (a database slow to flush its WAL).
	_, err := b.pool.Exec(ctx, `
		CREATE FUNCTION slow_marks() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF EXISTS (SELECT FROM new_rows WHERE sent_at IS NOT NULL) THEN PERFORM pg_sleep(0.2); END IF;
			RETURN NULL;
		END $$;
		CREATE TRIGGER slow_marks AFTER UPDATE ON email_sends REFERENCING NEW TABLE AS new_rows
			FOR EACH STATEMENT EXECUTE FUNCTION slow_marks();`)
	require.NoError(t, err)
	var mu sync.Mutex
	worst := 0
	b.smtp.OnAccept(func(smtptest.Message) {
		// Accepted (this one included) and not yet recorded: what a
		// crash now would send twice once the lease ran out. Counted
		// before the marks are read: an email accepted on the other
		// connection during the query would count as unrecorded
		// without having had its chance to be marked.
		accepted := b.smtp.Count()
		var marked int
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM email_sends WHERE sent_at IS NOT NULL`).Scan(&marked))
		mu.Lock()
		defer mu.Unlock()
		worst = max(worst, accepted-marked)
	})
	s := b.service(t, func(c *Config) { c.BatchSize, c.Concurrency = 32, 2 })
	for i := range 32 {
		b.add(t, int64(i+1), fmt.Sprintf("u%d@example.com", i+1), "U")
	}
	start := time.Now()
	st, err := s.consumer.Pass(ctx, time.Now().Add(60*time.Second))
	t.Logf("pass: %+v %v in %s; accepted %d", st, err, time.Since(start), b.smtp.Count())
	require.NoError(t, err)
	require.EqualValues(t, 32, st.Sent)
	mu.Lock()
	defer mu.Unlock()
	t.Logf("most emails accepted and not yet recorded at once: %d", worst)
	// Before this change: SENDEMAIL_CONCURRENCY (2). A send that does
	// not wait for the mark before it may make that twice as many.
	require.LessOrEqual(t, worst, 2*2, "a crash now would send this many emails twice")
}

// senderAndWelcome starts a test SMTP server and returns it, a sender to it
// and one welcome message.
func senderAndWelcome(t *testing.T) (*smtptest.Server, *SMTPSender, *gomail.Msg) {
	t.Helper()
	srv := smtptest.Start(t)
	sender, err := NewSMTPSender(srv.URL(), 5*time.Second, 5*time.Second)
	require.NoError(t, err)
	m, err := NewMailer("Example <welcome@example.com>", "Hi")
	require.NoError(t, err)
	msg, err := m.Welcome(Recipient{UserID: 1, Email: "ada@example.com", Name: "Ada"}, "7f1c2a5e-1a1b-4c2d-8e3f-0a1b2c3d4e5f")
	require.NoError(t, err)
	return srv, sender, msg
}

func TestCloseLeavesNoConnectionOpenBehindASendUnderWay(t *testing.T) {
	t.Parallel()
	srv, sender, msg := senderAndWelcome(t)
	srv.SetReplyDelay(100 * time.Millisecond)
	done := make(chan error, 1)
	go func() { done <- sender.Send(context.Background(), msg) }()
	time.Sleep(150 * time.Millisecond) // the send is under way
	require.NoError(t, sender.Close())
	require.NoError(t, <-done)
	sender.mu.Lock()
	left := len(sender.idle)
	sender.mu.Unlock()
	if left > 0 {
		_ = sender.Close()
	}
	require.Zero(t, left, "a connection kept after Close is never closed")
}

func TestAKeptConnectionThatMisbehavesCostsNoDuplicateAndNoStrayRecipient(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		stage string
		fault smtptest.Fault
	}{
		{"a drop at MAIL", "MAIL", smtptest.Fault{Drop: true, Times: 2}},
		{"a drop right after MAIL's 250", "MAIL", smtptest.Fault{DropAfterReply: true, Times: 2}},
		{"a drop at RCPT", "RCPT", smtptest.Fault{Drop: true, Times: 2}},
		{"a drop right after RCPT's 250", "RCPT", smtptest.Fault{DropAfterReply: true, Times: 2}},
		{"a 451 at RCPT", "RCPT", smtptest.Fault{Reply: smtptest.TempFailure, Times: 2}},
		{"a drop at DATA", "DATA", smtptest.Fault{Drop: true, Times: 2}},
		{"a 451 at DATA", "DATA", smtptest.Fault{Reply: smtptest.TempFailure, Times: 2}},
		{"a 451 to the data", smtptest.EndOfData, smtptest.Fault{Reply: smtptest.TempFailure, Times: 2}},
		{"a drop right after the data's 250", smtptest.EndOfData, smtptest.Fault{DropAfterReply: true, Times: 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			s := b.service(t, func(c *Config) { c.BatchSize, c.Concurrency = 8, 2 })
			b.add(t, 100, "warm@example.com", "W")
			require.EqualValues(t, 1, pass(t, s).Sent) // a connection is kept
			b.smtp.Inject(tc.stage, tc.fault)
			for i := range 8 {
				b.add(t, int64(i+1), fmt.Sprintf("u%d@example.com", i+1), "U")
			}
			require.EqualValues(t, 8, pass(t, s).Sent)
			got := map[string]int{}
			for _, m := range b.smtp.Messages() {
				require.Len(t, m.To, 1, "one recipient per message")
				require.Equal(t, m.To[0], strings.Trim(m.Header.Get("To")[strings.Index(m.Header.Get("To"), "<"):], "<>"), "the envelope recipient is the header's")
				got[m.To[0]]++
			}
			require.Len(t, got, 9)
			for to, n := range got {
				require.Equal(t, 1, n, to)
			}
		})
	}
}

func TestTwoConsumersWithRenewedBatchClaimsSendEachEmailOnce(t *testing.T) {
	t.Parallel()
	b := setup(t)
	// A conversation may last 2 × 300 ms + 200 ms = 0.8 s, the lease 1.2 s:
	// claims taken with a batch cover sends that start within 0.4 s, and are
	// renewed after. Entries go idle (and are taken over) after 300 ms.
	b.smtp.SetReplyDelay(20 * time.Millisecond)
	cfg := func(c *Config) {
		c.BatchSize, c.Concurrency = 64, 2
		c.SMTPTimeout, c.SMTPDataTimeout, c.Lease = 300*time.Millisecond, 200*time.Millisecond, 1200*time.Millisecond
		c.ClaimIdle, c.ClaimInterval = 300*time.Millisecond, 50*time.Millisecond
	}
	_, err := b.pool.Exec(context.Background(), `
		CREATE TABLE renewals (key text);
		CREATE FUNCTION count_renewals() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF OLD.claimed_by = NEW.claimed_by AND NEW.sent_at IS NULL THEN INSERT INTO renewals VALUES (NEW.key); END IF;
			RETURN NULL;
		END $$;
		CREATE TRIGGER count_renewals AFTER UPDATE ON email_sends FOR EACH ROW EXECUTE FUNCTION count_renewals();`)
	require.NoError(t, err)
	one, two := b.service(t, cfg), b.service(t, cfg)
	require.NoError(t, one.cfg.Validate())
	require.NoError(t, one.consumer.EnsureGroup(context.Background()))
	const users = 300
	for i := range users {
		b.add(t, int64(i+1), fmt.Sprintf("u%d@example.com", i+1), "U")
	}
	require.NoError(t, one.Start(context.Background()))
	require.NoError(t, two.Start(context.Background()))
	require.Eventually(t, func() bool { return b.pending(t) == 0 && b.smtp.Count() >= users }, 120*time.Second, 50*time.Millisecond)
	time.Sleep(2 * time.Second) // a late copy would show by now
	one.Stop()
	two.Stop()
	got := map[string]int{}
	for _, m := range b.smtp.Messages() {
		got[m.To[0]]++
	}
	dups := 0
	for _, n := range got {
		if n > 1 {
			dups++
		}
	}
	var renewed int
	require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT count(*) FROM email_sends WHERE attempts > 1`).Scan(&renewed))
	var renewals int
	require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT count(*) FROM renewals`).Scan(&renewals))
	t.Logf("users %d, with two emails %d, claimed more than once %d, renewals (and releases) %d", len(got), dups, renewed, renewals)
	if dl := b.deadLetters(t); len(dl) > 0 {
		t.Logf("dead letters %d, first: %v", len(dl), dl[0].FieldValues[FieldDeadError])
	}
	require.Len(t, got, users)
	require.Zero(t, dups)
}

func TestAnAnswerLostOnAKeptConnectionCostsOneCopyAfterTheBatchLease(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := func(c *Config) {
		c.SMTPTimeout, c.SMTPDataTimeout, c.Lease = 200*time.Millisecond, 200*time.Millisecond, time.Second
		c.ClaimIdle = 100 * time.Millisecond
	}
	s := b.service(t, cfg)
	b.add(t, 100, "warm@example.com", "W")
	require.EqualValues(t, 1, pass(t, s).Sent) // a connection is kept
	b.smtp.Inject(smtptest.EndOfData, smtptest.Fault{Drop: true, Times: 1})
	b.add(t, 1, "ada@example.com", "Ada")
	start := time.Now()
	st := pass(t, s)
	require.EqualValues(t, 1, st.Ambiguous)
	passes(t, s, 5, 120*time.Millisecond) // inside the lease: not sent again
	require.Equal(t, 2, b.smtp.Count())
	require.Eventually(t, func() bool { pass(t, s); return b.pending(t) == 0 }, 5*time.Second, 100*time.Millisecond)
	var ada []smtptest.Message
	for _, m := range b.smtp.Messages() {
		if m.To[0] == "ada@example.com" {
			ada = append(ada, m)
		}
	}
	require.Len(t, ada, 2, "one extra copy")
	require.Equal(t, ada[0].Header.Get("Message-Id"), ada[1].Header.Get("Message-Id"))
	require.GreaterOrEqual(t, ada[1].At.Sub(start), time.Second-50*time.Millisecond, "not before the lease ran out")
}

// hangingSender stands for a process that died in the middle of its sends:
// every send hangs until died is closed.
type hangingSender struct {
	started *atomic.Int64
	died    chan struct{}
}

func (h hangingSender) Send(ctx context.Context, _ *gomail.Msg) error {
	h.started.Add(1)
	select {
	case <-h.died:
		return errors.New("the process is gone")
	case <-ctx.Done():
		return ctx.Err()
	}
}

func TestAConsumerThatDiesMidBatchHoldsBackOnlyAFewTimesItsConcurrency(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx, cancel := context.WithCancel(context.Background())
	cfg := func(c *Config) { c.BatchSize, c.Concurrency, c.ClaimIdle = 32, 2, 100*time.Millisecond }
	dying := hangingSender{started: new(atomic.Int64), died: make(chan struct{})}
	dead, err := NewWithSender(ctx, b.config(cfg, func(c *Config) { c.ConsumerName = "dead" }), dying, logging.Discard())
	require.NoError(t, err)
	require.NoError(t, dead.consumer.EnsureGroup(ctx))
	for i := range 32 {
		b.add(t, int64(i+1), fmt.Sprintf("u%d@example.com", i+1), "U")
	}
	// The consumer reads its batch and starts sending; it is killed
	// (SIGKILL, out of memory, the node lost) in the middle of its
	// first two sends: nothing of it runs again, nothing is released.
	entries, err := dead.consumer.read(ctx, ">", 0)
	require.NoError(t, err)
	require.Len(t, entries, 32)
	handled := make(chan struct{})
	go func() {
		defer close(handled)
		_, _ = dead.consumer.handle(ctx, entries)
	}()
	t.Cleanup(func() {
		close(dying.died)
		cancel()
		<-handled
		dead.Stop()
		dead.Close()
	})
	require.Eventually(t, func() bool { return dying.started.Load() == 2 }, 5*time.Second, 10*time.Millisecond)

	// Another instance takes the entries over after SENDEMAIL_CLAIM_IDLE.
	time.Sleep(150 * time.Millisecond)
	stats := pass(t, b.service(t, cfg, func(c *Config) { c.ConsumerName = "survivor" }))
	t.Logf("survivor: %+v", stats)
	// Held back for the 30 s lease: the two sends under way, and the
	// claims taken ahead of the next ones (2 × SENDEMAIL_CONCURRENCY at a
	// time, the next window once half of one started).
	require.GreaterOrEqual(t, stats.Sent, int64(32-3*2), "the rest of the batch does not wait for the lease")
	require.EqualValues(t, 32, stats.Sent+stats.Retried)
}

// startSilentGoodbyeServer starts an SMTP server that accepts every
// message and never answers QUIT, and returns its URL.
func startSilentGoodbyeServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var mu sync.Mutex
	var conns []net.Conn
	var wg sync.WaitGroup
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		for _, c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	serve := func(conn net.Conn) {
		r := textproto.NewReader(bufio.NewReader(conn))
		reply := func(s string) { _, _ = conn.Write([]byte(s + "\r\n")) }
		reply("220 localhost ready")
		for {
			line, err := r.ReadLine()
			if err != nil {
				return
			}
			switch verb, _, _ := strings.Cut(strings.ToUpper(line), " "); verb {
			case "QUIT":
				// No answer: the client waits until its deadline.
			case "DATA":
				reply("354 go ahead")
				if _, err := r.ReadDotLines(); err != nil {
					return
				}
				reply("250 queued")
			default:
				reply("250 ok")
			}
		}
	}
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, conn)
			mu.Unlock()
			wg.Go(func() { serve(conn) })
		}
	})
	return "smtp://" + ln.Addr().String() + "?tls=none"
}

func TestAGoodbyeNeverDelaysTheSendItFollows(t *testing.T) {
	t.Parallel()
	sender, err := NewSMTPSender(startSilentGoodbyeServer(t), 2*time.Second, 2*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = sender.Close() })
	m, err := NewMailer("Example <welcome@example.com>", "Hi")
	require.NoError(t, err)
	// The last message a connection carries is followed by QUIT, which
	// this server never answers: the send (and so its mark) must not wait
	// for it.
	var slowest time.Duration
	for i := range keepMessages {
		msg, err := m.Welcome(Recipient{UserID: int64(i + 1), Email: fmt.Sprintf("u%d@example.com", i+1), Name: "U"}, "7f1c2a5e-1a1b-4c2d-8e3f-0a1b2c3d4e5f")
		require.NoError(t, err)
		start := time.Now()
		require.NoError(t, sender.Send(context.Background(), msg))
		slowest = max(slowest, time.Since(start))
	}
	require.Less(t, slowest, time.Second, "a send waited for the goodbye that followed it")
	start := time.Now()
	require.NoError(t, sender.Close())
	require.Less(t, time.Since(start), 1500*time.Millisecond, "Close cuts a goodbye under way after a second")
}

func TestMarksAreWrittenAFewDozenAtATime(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	// Each statement that marks emails sent takes 200 ms, and records
	// how many it marked.
	_, err := b.pool.Exec(ctx, `
		CREATE TABLE mark_statements (marked int);
		CREATE FUNCTION slow_marks() RETURNS trigger LANGUAGE plpgsql AS $$
		DECLARE n int;
		BEGIN
			SELECT count(*) INTO n FROM new_rows WHERE sent_at IS NOT NULL;
			IF n > 0 THEN
				INSERT INTO mark_statements VALUES (n);
				PERFORM pg_sleep(0.2);
			END IF;
			RETURN NULL;
		END $$;
		CREATE TRIGGER slow_marks AFTER UPDATE ON email_sends REFERENCING NEW TABLE AS new_rows
			FOR EACH STATEMENT EXECUTE FUNCTION slow_marks();`)
	require.NoError(t, err)
	s := b.service(t, func(c *Config) { c.BatchSize, c.Concurrency = 256, 64 })
	for i := range 256 {
		b.add(t, int64(i+1), fmt.Sprintf("u%d@example.com", i+1), "U")
	}
	st, err := s.consumer.Pass(ctx, time.Now().Add(60*time.Second))
	require.NoError(t, err)
	require.EqualValues(t, 256, st.Sent)
	var largest, statements int
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT max(marked), count(*) FROM mark_statements`).Scan(&largest, &statements))
	t.Logf("%d mark statements, the largest marked %d", statements, largest)
	require.Greater(t, largest, 1, "marks that wait together share a statement")
	require.LessOrEqual(t, largest, markBatch, "one statement, one timeout: a failure there costs every email in it")
}
