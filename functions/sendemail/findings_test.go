package sendemail

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/smtptest"
	"github.com/outboxfn/outbox/shared/stream"
)

// Tests of a mail server that is slow, ambiguous or half-broken, and of a
// database that answers but cannot write (issue 13).

// passes runs n triggered passes, each after the entries went idle.
func passes(t *testing.T, s *Service, n int, idle time.Duration) Stats {
	t.Helper()
	var total Stats
	for range n {
		time.Sleep(idle)
		total.add(pass(t, s))
	}
	return total
}

func TestAMessageTheServerAcceptedIsSentOnce(t *testing.T) {
	t.Parallel()
	short := func(c *Config) {
		c.ClaimIdle, c.Lease, c.SendAttempts, c.MaxDeliveries = 100*time.Millisecond, 50*time.Millisecond, 3, 5
	}
	for _, tc := range []struct {
		name  string
		stage string
		fault smtptest.Fault
	}{
		{"when the server drops the connection on QUIT", "QUIT", smtptest.Fault{Drop: true}},
		{"when RSET fails", "RSET", smtptest.Fault{Reply: smtptest.TempFailure}},
		{"when QUIT fails", "QUIT", smtptest.Fault{Reply: smtptest.TempFailure}},
		{"when the server drops the connection right after its 250", smtptest.EndOfData, smtptest.Fault{DropAfterReply: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			b.smtp.Inject(tc.stage, tc.fault)
			s := b.service(t, short)
			b.add(t, 1, "ada@example.com", "Ada")
			require.EqualValues(t, 1, pass(t, s).Sent)
			passes(t, s, 3, 120*time.Millisecond)
			require.Equal(t, 1, b.smtp.Count(), "one accepted copy")
			require.Zero(t, b.pending(t))
			require.Empty(t, b.deadLetters(t))
		})
	}
}

func TestASendWithoutAnswerIsRetriedOnceAfterTheLease(t *testing.T) {
	t.Parallel()
	b := setup(t)
	// The server keeps the message and drops the connection instead of
	// answering 250: the client cannot know.
	b.smtp.Inject(smtptest.EndOfData, smtptest.Fault{Drop: true, Times: 1})
	s := b.service(t, func(c *Config) { c.ClaimIdle, c.Lease, c.SendAttempts = 100*time.Millisecond, 600*time.Millisecond, 3 })
	b.add(t, 1, "ada@example.com", "Ada")
	require.EqualValues(t, 1, pass(t, s).Retried)
	require.Equal(t, 1, b.smtp.Count(), "no retry in place: the first copy may have been delivered")
	// Within the lease the entry is claimed again but not sent.
	passes(t, s, 2, 120*time.Millisecond)
	require.Equal(t, 1, b.smtp.Count(), "not retried before the lease ran out")
	require.Eventually(t, func() bool { pass(t, s); return b.pending(t) == 0 }, 5*time.Second, 100*time.Millisecond)
	msgs := b.smtp.Messages()
	require.Len(t, msgs, 2, "at most one extra copy")
	require.Equal(t, msgs[0].Header.Get("Message-Id"), msgs[1].Header.Get("Message-Id"), "with the same Message-ID")
}

func TestASlowServerNeverOutrunsTheClaims(t *testing.T) {
	t.Parallel()
	b := setup(t)
	// About 8 replies per message: 0.4 s a message, 3.2 s for a batch of 8
	// sent one at a time, against a 1 s lease and a 1.2 s claim idle time.
	b.smtp.SetReplyDelay(50 * time.Millisecond)
	slow := func(c *Config) {
		c.BatchSize, c.Concurrency, c.Lease, c.ClaimIdle, c.ClaimInterval = 8, 1, time.Second, 1200*time.Millisecond, 100*time.Millisecond
	}
	one, two := b.service(t, slow), b.service(t, slow)
	require.NoError(t, one.consumer.EnsureGroup(context.Background()))
	for i := range 8 {
		b.add(t, int64(i+1), fmt.Sprintf("u%d@example.com", i+1), "U")
	}
	require.NoError(t, one.Start(context.Background()))
	require.NoError(t, two.Start(context.Background()))
	require.Eventually(t, func() bool { return b.pending(t) == 0 && b.smtp.Count() >= 8 }, 20*time.Second, 50*time.Millisecond)
	one.Stop()
	two.Stop()
	got := map[string]int{}
	for _, m := range b.smtp.Messages() {
		got[m.To[0]]++
	}
	require.Len(t, got, 8)
	for to, n := range got {
		require.Equal(t, 1, n, "%s got %d emails", to, n)
	}
}

func TestOneConversationIsBoundedBySMTPTimeout(t *testing.T) {
	t.Parallel()
	srv := smtptest.Start(t)
	// Each reply within a 1 s timeout, five of them before the data.
	srv.SetReplyDelay(400 * time.Millisecond)
	sender, err := NewSMTPSender(srv.URL(), time.Second, time.Second)
	require.NoError(t, err)
	m, err := NewMailer("Example <welcome@example.com>", "Hi")
	require.NoError(t, err)
	msg, err := m.Welcome(Recipient{UserID: 1, Email: "ada@example.com", Name: "Ada"}, uuid.NewString())
	require.NoError(t, err)
	start := time.Now()
	err = sender.Send(context.Background(), msg)
	require.Error(t, err)
	require.Less(t, time.Since(start), 1200*time.Millisecond)
	require.Zero(t, srv.Count())
}

func TestSettingsAreCheckedAgainstEachOther(t *testing.T) {
	t.Parallel()
	b := &testBundle{url: "postgres://x", prefix: "p:", smtp: smtptest.Start(t)}
	cfg := b.config(func(c *Config) {
		c.MailboxDir, c.SMTPTimeout, c.SMTPDataTimeout, c.Lease, c.ClaimIdle = "x", 10*time.Second, 10*time.Minute, 5*time.Minute, 10*time.Minute
	})
	require.ErrorContains(t, cfg.Validate(), "SENDEMAIL_LEASE", "a lease shorter than one conversation")
	cfg.Lease = 11 * time.Minute
	require.NoError(t, cfg.Validate())
}

func TestOneBadEntryOrAReadOnlyDatabaseDeadLettersNothingElse(t *testing.T) {
	t.Parallel()

	t.Run("sends every email of a batch that carries an event id in urn form", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		s := b.service(t)
		b.addEvent(t, stream.Event{EventID: "urn:uuid:" + uuid.NewString(), EventType: "user.created", AggregateType: "user",
			AggregateID: "1", Payload: `{"user_id":1,"email":"u1@example.com","name":"U"}`, OccurredAt: time.Now()})
		for i := 2; i <= 6; i++ {
			b.add(t, int64(i), fmt.Sprintf("u%d@example.com", i), "U")
		}
		require.EqualValues(t, 6, pass(t, s).Sent)
		require.Equal(t, 6, b.smtp.Count())
		require.Zero(t, b.pending(t))
	})

	t.Run("keeps every entry pending while the database refuses writes", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		fast := func(c *Config) { c.ClaimIdle, c.Lease, c.MaxDeliveries = 20*time.Millisecond, 10*time.Millisecond, 2 }
		require.NoError(t, b.service(t, fast).consumer.EnsureGroup(context.Background()))
		b.add(t, 1, "ada@example.com", "Ada")
		b.add(t, 2, "bob@example.com", "Bob")
		u, err := url.Parse(b.url)
		require.NoError(t, err)
		u.RawQuery += "&options=-c%20default_transaction_read_only%3Don" // a space, not a plus, for pgx
		readOnly := b.service(t, fast, func(c *Config) { c.DatabaseURL = u.String() })
		for range 6 {
			time.Sleep(30 * time.Millisecond)
			_, _ = readOnly.consumer.Pass(context.Background(), time.Now().Add(5*time.Second))
		}
		require.Empty(t, b.deadLetters(t), "nothing dead-lettered")
		require.Zero(t, b.smtp.Count())
		time.Sleep(30 * time.Millisecond)
		require.EqualValues(t, 2, pass(t, b.service(t, fast)).Sent, "once the database can write, both go out")
		require.Empty(t, b.deadLetters(t))
	})
}

func TestASentEmailWhoseMarkFailedIsNeitherAcknowledgedNorSentAgain(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	// Right after the server accepted the message, the database starts
	// refusing the mark.
	b.smtp.OnAccept(func(smtptest.Message) {
		_, err := b.pool.Exec(ctx, `ALTER TABLE email_sends ADD CONSTRAINT refuse_marks CHECK (sent_at IS NULL) NOT VALID`)
		require.NoError(t, err)
	})
	s := b.service(t, func(c *Config) { c.ClaimIdle, c.Lease = 100*time.Millisecond, 50*time.Millisecond })
	e := stream.Event{EventID: uuid.NewString(), EventType: "user.created", AggregateType: "user", AggregateID: "1",
		Payload: `{"user_id":1,"email":"ada@example.com","name":"Ada"}`, OccurredAt: time.Now()}
	b.addEvent(t, e)
	_, _ = s.consumer.Pass(ctx, time.Now().Add(10*time.Second))
	require.Equal(t, 1, b.smtp.Count())
	require.EqualValues(t, 1, b.pending(t), "not acknowledged: the fact 'sent' is not recorded yet")
	b.smtp.OnAccept(nil)
	_, err := b.pool.Exec(ctx, `ALTER TABLE email_sends DROP CONSTRAINT refuse_marks`)
	require.NoError(t, err)
	b.addEvent(t, e) // the relay publishes the event again
	passes(t, s, 3, 120*time.Millisecond)
	require.Equal(t, 1, b.smtp.Count(), "one email")
	require.Zero(t, b.pending(t))
	var sent bool
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT sent_at IS NOT NULL FROM email_sends WHERE key = 'welcome:1'`).Scan(&sent))
	require.True(t, sent)
}

func TestShutdownIsBounded(t *testing.T) {
	t.Parallel()
	b := setup(t)
	// About 8 replies per message: 1.6 s each, eight in the batch.
	b.smtp.SetReplyDelay(200 * time.Millisecond)
	s := b.service(t, func(c *Config) { c.BatchSize, c.Concurrency, c.ShutdownTimeout = 8, 1, 2*time.Second })
	require.NoError(t, s.consumer.EnsureGroup(context.Background()))
	for i := range 8 {
		b.add(t, int64(i+1), fmt.Sprintf("u%d@example.com", i+1), "U")
	}
	require.NoError(t, s.Start(context.Background()))
	b.smtp.WaitFor(t, 1, 10*time.Second)
	start := time.Now()
	s.Stop()
	require.Less(t, time.Since(start), 3*time.Second, "a send under way gets the shutdown time less 2 s, at least half")
	sent := b.smtp.Count()
	require.Less(t, sent, 4, "no send starts after shutdown began")
	require.EqualValues(t, 8-sent, b.pending(t), "what was not sent stays pending")
}

func TestAnEntryIsAcknowledgedOnlyWhenItIsSafeSomewhere(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	s := b.service(t)
	require.NoError(t, b.redis.Do(ctx, b.redis.B().Set().Key(DeadLetterStream(b.stream)).Value("not a stream").Build()).Error())
	b.addRaw(t, "event_type", "user.created", "payload", "{}") // no event_id: dead-lettered
	stats, err := s.consumer.Pass(ctx, time.Now().Add(5*time.Second))
	require.Error(t, err, "the dead-letter stream refused the entry")
	require.Zero(t, stats.DeadLettered)
	require.EqualValues(t, 1, b.pending(t), "the entry stays pending")
}

func TestHygiene(t *testing.T) {
	t.Parallel()

	t.Run("removes consumers idle with nothing pending, and keeps one with entries pending", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		s := b.service(t)
		require.NoError(t, s.consumer.EnsureGroup(ctx))
		for _, name := range []string{"gone-1", "gone-2"} {
			require.NoError(t, b.redis.Do(ctx, b.redis.B().XgroupCreateconsumer().Key(b.stream).Group("sendemail").Consumer(name).Build()).Error())
		}
		b.add(t, 1, "ada@example.com", "Ada")
		_, err := b.redis.Do(ctx, b.redis.B().Xreadgroup().Group("sendemail", "crashed").Count(1).Streams().Key(b.stream).Id(">").Build()).AsXRead()
		require.NoError(t, err)
		time.Sleep(60 * time.Millisecond)
		s.consumer.forgetIdle = 50 * time.Millisecond
		pass(t, s)
		consumers, err := b.redis.Do(ctx, b.redis.B().XinfoConsumers().Key(b.stream).Group("sendemail").Build()).ToArray()
		require.NoError(t, err)
		var names []string
		for _, c := range consumers {
			info, err := c.AsMap()
			require.NoError(t, err)
			n := info["name"]
			name, _ := n.ToString()
			names = append(names, name)
		}
		require.ElementsMatch(t, []string{"crashed"}, names, "the idle ones are gone; the one with an entry pending stays")
	})

	t.Run("keeps bidi overrides and over-long names out of the headers", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		s := b.service(t)
		b.add(t, 1, "eve@example.com", "Eve \u202egpj.exe\u200b")
		b.add(t, 2, "long@example.com", strings.Repeat("a", 2000))
		require.EqualValues(t, 2, pass(t, s).Sent)
		for _, m := range b.smtp.Messages() {
			for _, line := range strings.Split(string(m.Raw), "\r\n") {
				require.LessOrEqual(t, len(line), 998, "a line of %d bytes", len(line))
			}
			to, err := m.Header.AddressList("To")
			require.NoError(t, err)
			require.NotContains(t, to[0].Name, "\u202e")
			require.NotContains(t, to[0].Name, "\u200b")
		}
	})
}

func TestOnlyTheHolderOfAClaimCanUndoIt(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	sends := &Sends{pool: b.pool, lease: 50 * time.Millisecond}
	id := uuid.NewString()
	st, err := sends.Claim(ctx, []claimRequest{{key: "welcome:1", eventID: id, token: "a/1"}})
	require.NoError(t, err)
	require.Equal(t, []claimState{claimed}, st)
	st, err = sends.Claim(ctx, []claimRequest{{key: "welcome:1", eventID: id, token: "b/1"}})
	require.NoError(t, err)
	require.Equal(t, []claimState{leasedElsewhere}, st, "the lease runs")
	time.Sleep(60 * time.Millisecond)
	sends.lease = time.Minute
	st, err = sends.Claim(ctx, []claimRequest{{key: "welcome:1", eventID: id, token: "b/1"}})
	require.NoError(t, err)
	require.Equal(t, []claimState{claimed}, st, "taken over once the lease ran out")

	// a, whose claim ran out, can neither release b's claim nor count a
	// failure on it nor forget it.
	require.NoError(t, sends.Release(ctx, "welcome:1", "a/1"))
	_, held, err := sends.Fail(ctx, "welcome:1", "a/1", false)
	require.NoError(t, err)
	require.False(t, held)
	require.NoError(t, sends.Forget(ctx, "welcome:1", "a/1"))
	st, err = sends.Claim(ctx, []claimRequest{{key: "welcome:1", eventID: id, token: "c/1"}})
	require.NoError(t, err)
	require.Equal(t, []claimState{leasedElsewhere}, st, "b still holds it")

	// A mark records the fact whoever marks, and says whose claim it was.
	lost, err := sends.MarkSent(ctx, []mark{{key: "welcome:1", token: "a/1", messageID: "<x@example.com>"}})
	require.NoError(t, err)
	require.Equal(t, []string{"welcome:1"}, lost)
	st, err = sends.Claim(ctx, []claimRequest{{key: "welcome:1", eventID: id, token: "c/1"}})
	require.NoError(t, err)
	require.Equal(t, []claimState{alreadySent}, st)
}
