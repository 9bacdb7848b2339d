package sendemail

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/pgtest"
	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/smtptest"
	"github.com/outboxfn/outbox/shared/stream"
)

func TestMain(m *testing.M) {
	// After a failover a rueidis cluster client closes the connections to
	// nodes that left the slot map 5 s later, in a goroutine of its own
	// that Close does not wait for.
	goleak.VerifyTestMain(m,
		goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*clusterClient)._refresh.func2"))
}

type testBundle struct {
	url    string
	pool   *pgxpool.Pool
	redis  rueidis.Client
	prefix string
	smtp   *smtptest.Server
	stream string
	// redisURL and cluster are what sendemail connects to.
	redisURL string
	cluster  bool
}

func setup(t *testing.T) *testBundle {
	t.Helper()
	url, pool := pgtest.NewPool(t)
	client, prefix := redistest.New(t)
	return &testBundle{url: url, pool: pool, redis: client, prefix: prefix, smtp: smtptest.Start(t), stream: prefix + "user",
		redisURL: redistest.URL()}
}

// setupOn is setup with the stream on the Redis Cluster c.
func setupOn(t *testing.T, c *redistest.Cluster) *testBundle {
	t.Helper()
	url, pool := pgtest.NewPool(t)
	client, prefix := c.Client(t)
	return &testBundle{url: url, pool: pool, redis: client, prefix: prefix, smtp: smtptest.Start(t), stream: prefix + "user",
		redisURL: c.URL(), cluster: true}
}

func (b *testBundle) config(mutate ...func(*Config)) Config {
	cfg := Config{
		Config:        logging.Config{LogFormat: "text", LogLevel: "info"},
		DatabaseURL:   b.url,
		DBMaxConns:    4,
		RedisURL:      b.redisURL,
		RedisCluster:  b.cluster,
		StreamPrefix:  b.prefix,
		Group:         "sendemail",
		BatchSize:     16,
		Concurrency:   4,
		Block:         100 * time.Millisecond,
		ClaimIdle:     time.Minute,
		ClaimInterval: time.Hour,
		MaxDeliveries: 5,
		SendAttempts:  3,
		Lease:         30 * time.Second,
		SMTPURL:       b.smtp.URL(),
		SMTPTimeout:   5 * time.Second,
		// A lease longer than one conversation (20 s), as Validate asks:
		// the claims taken with a batch are used. Tests that shorten the
		// lease claim each email right before its send instead.
		SMTPDataTimeout: 10 * time.Second,
		From:            "Example <welcome@example.com>",
		Subject:         "Welcome, {{.Name}}!",
		DrainTimeout:    30 * time.Second,
		Background:      true,
	}
	for _, m := range mutate {
		m(&cfg)
	}
	return cfg
}

func (b *testBundle) service(t *testing.T, mutate ...func(*Config)) *Service {
	t.Helper()
	s, err := New(context.Background(), b.config(mutate...), logging.Discard())
	require.NoError(t, err)
	t.Cleanup(func() { s.Stop(); s.Close() })
	return s
}

// add puts a user.created event on the stream as the relay would, and
// returns its event id.
func (b *testBundle) add(t *testing.T, userID int64, email, name string) string {
	t.Helper()
	payload, err := json.Marshal(map[string]any{"user_id": userID, "email": email, "name": name})
	require.NoError(t, err)
	return b.addEvent(t, stream.Event{
		EventID: uuid.NewString(), EventType: "user.created", AggregateType: "user",
		AggregateID: fmt.Sprint(userID), Payload: string(payload), OccurredAt: time.Now(),
	})
}

func (b *testBundle) addEvent(t *testing.T, e stream.Event) string {
	t.Helper()
	b.addRaw(t, e.Fields()...)
	return e.EventID
}

func (b *testBundle) addRaw(t *testing.T, fields ...string) {
	t.Helper()
	cmd := b.redis.B().Xadd().Key(b.stream).Id("*").FieldValue()
	for i := 0; i+1 < len(fields); i += 2 {
		cmd = cmd.FieldValue(fields[i], fields[i+1])
	}
	require.NoError(t, b.redis.Do(context.Background(), cmd.Build()).Error())
}

func (b *testBundle) pending(t *testing.T) int64 {
	t.Helper()
	res, err := b.redis.Do(context.Background(), b.redis.B().Xpending().Key(b.stream).Group("sendemail").Build()).ToArray()
	require.NoError(t, err)
	n, err := res[0].AsInt64()
	require.NoError(t, err)
	return n
}

func (b *testBundle) deadLetters(t *testing.T) []rueidis.XRangeEntry {
	t.Helper()
	entries, err := b.redis.Do(context.Background(), b.redis.B().Xrange().Key(DeadLetterStream(b.stream)).Start("-").End("+").Build()).AsXRange()
	require.NoError(t, err)
	return entries
}

// requireOneEmailEach checks that the server accepted exactly one message
// for each of n recipients.
func (b *testBundle) requireOneEmailEach(t *testing.T, n int) {
	t.Helper()
	got := map[string]int{}
	for _, m := range b.smtp.Messages() {
		got[m.To[0]]++
	}
	require.Len(t, got, n)
	for to, n := range got {
		require.Equal(t, 1, n, to)
	}
}

func pass(t *testing.T, s *Service) Stats {
	t.Helper()
	stats, err := s.consumer.Pass(context.Background(), time.Now().Add(30*time.Second))
	require.NoError(t, err)
	return stats
}

// parts splits a multipart/alternative body into content type → text.
func parts(t *testing.T, m smtptest.Message) map[string]string {
	t.Helper()
	mt, params, err := mime.ParseMediaType(m.Header.Get("Content-Type"))
	require.NoError(t, err)
	require.Equal(t, "multipart/alternative", mt)
	r := multipart.NewReader(strings.NewReader(string(m.Body)), params["boundary"])
	out := map[string]string{}
	for {
		p, err := r.NextPart()
		if err != nil {
			break
		}
		ct, _, _ := mime.ParseMediaType(p.Header.Get("Content-Type"))
		buf := new(strings.Builder)
		_, _ = fmt.Fprint(buf, readAll(t, p))
		out[ct] = buf.String()
	}
	return out
}

func readAll(t *testing.T, p *multipart.Part) string {
	t.Helper()
	var sb strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := p.Read(buf)
		sb.Write(buf[:n])
		if err != nil {
			return sb.String()
		}
	}
}

// backends are the Redis deployments the main tests run against: the
// shared server, and a three-shard Redis Cluster with a replica per shard,
// started for t.
func backends(t *testing.T) []struct {
	name  string
	setup func(*testing.T) *testBundle
} {
	c := redistest.StartCluster(t, 3, 1)
	return []struct {
		name  string
		setup func(*testing.T) *testBundle
	}{
		{"one server", setup},
		{"a Redis Cluster", func(t *testing.T) *testBundle { return setupOn(t, c) }},
	}
}

func TestSendEmail(t *testing.T) {
	t.Parallel()
	backends := backends(t)

	for _, on := range backends {
		t.Run("sends one welcome email per event with recipient, subject, both parts and Message-ID, on "+on.name, func(t *testing.T) {
			t.Parallel()
			b := on.setup(t)
			s := b.service(t)
			id1 := b.add(t, 1, "ada@example.com", "Ada <script>")
			id2 := b.add(t, 2, "bob@example.com", "Bob")
			stats := pass(t, s)
			require.Equal(t, Stats{Sent: 2}, stats)

			msgs := b.smtp.Messages()
			require.Len(t, msgs, 2)
			byTo := map[string]smtptest.Message{}
			for _, m := range msgs {
				require.Len(t, m.To, 1)
				byTo[m.To[0]] = m
			}
			ada := byTo["ada@example.com"]
			require.Equal(t, "welcome@example.com", ada.From)
			to, err := ada.Header.AddressList("To")
			require.NoError(t, err)
			require.Equal(t, "Ada <script>", to[0].Name)
			subject, err := new(mime.WordDecoder).DecodeHeader(ada.Header.Get("Subject"))
			require.NoError(t, err)
			require.Equal(t, "Welcome, Ada <script>!", subject)
			require.Equal(t, "<"+id1+"@example.com>", ada.Header.Get("Message-Id"))
			require.Equal(t, "<"+id2+"@example.com>", byTo["bob@example.com"].Header.Get("Message-Id"))
			p := parts(t, ada)
			require.Contains(t, p["text/plain"], "Hello Ada <script>,")
			require.Contains(t, p["text/html"], "Hello Ada &lt;script&gt;,", "the HTML part escapes user data")
			require.NotContains(t, p["text/html"], "<script>")

			require.Zero(t, b.pending(t))
			var sent int
			require.NoError(t, b.pool.QueryRow(context.Background(),
				`SELECT count(*) FROM email_sends WHERE sent_at IS NOT NULL AND message_id LIKE '<%@example.com>'`).Scan(&sent))
			require.Equal(t, 2, sent)
		})
	}

	for _, on := range backends {
		t.Run("sends one email for an event added to the stream three times, on "+on.name, func(t *testing.T) {
			t.Parallel()
			b := on.setup(t)
			s := b.service(t)
			e := stream.Event{EventID: uuid.NewString(), EventType: "user.created", AggregateType: "user", AggregateID: "7",
				Payload: `{"user_id":7,"email":"ada@example.com","name":"Ada"}`, OccurredAt: time.Now()}
			b.addEvent(t, e)
			b.addEvent(t, e)
			require.Equal(t, Stats{Sent: 1, Duplicates: 1}, pass(t, s))
			b.addEvent(t, e)
			require.Equal(t, Stats{Duplicates: 1}, pass(t, s))
			require.Equal(t, 1, b.smtp.Count())
			require.Zero(t, b.pending(t))
		})
	}

	for _, on := range backends {
		t.Run("lets another consumer finish what a killed one left, sending each email once, on "+on.name, func(t *testing.T) {
			t.Parallel()
			b := on.setup(t)
			for i := range 10 {
				b.add(t, int64(i+1), fmt.Sprintf("u%d@example.com", i+1), "U")
			}
			short := func(c *Config) { c.ClaimIdle, c.Lease, c.BatchSize = 300*time.Millisecond, 200*time.Millisecond, 5 }
			// The first consumer sends the first five emails, then dies before
			// acknowledging them.
			killed := b.service(t, short, func(c *Config) { c.ConsumerName = "killed" })
			killed.consumer.beforeAck = func() error { return errors.New("killed") }
			require.NoError(t, killed.consumer.EnsureGroup(context.Background()))
			entries, err := killed.consumer.read(context.Background(), ">", 0)
			require.NoError(t, err)
			_, err = killed.consumer.handle(context.Background(), entries)
			require.ErrorContains(t, err, "killed")
			require.Equal(t, 5, b.smtp.Count())
			// It had also read the other five and never got to them.
			more, err := killed.consumer.read(context.Background(), ">", 0)
			require.NoError(t, err)
			require.Len(t, more, 5)
			require.EqualValues(t, 10, b.pending(t))

			survivor := b.service(t, short, func(c *Config) { c.ConsumerName = "survivor" })
			time.Sleep(350 * time.Millisecond) // let the entries go idle past SENDEMAIL_CLAIM_IDLE
			stats := pass(t, survivor)
			require.EqualValues(t, 10, stats.Claimed)
			require.EqualValues(t, 5, stats.Sent)
			require.EqualValues(t, 5, stats.Duplicates)
			require.Zero(t, b.pending(t))
			msgs := b.smtp.Messages()
			require.Len(t, msgs, 10)
			seen := map[string]bool{}
			for _, m := range msgs {
				require.False(t, seen[m.To[0]], "%s got two emails", m.To[0])
				seen[m.To[0]] = true
			}
		})
	}

	t.Run("retries a 4xx and sends one email", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		b.smtp.FailData(1, smtptest.TempFailure)
		s := b.service(t)
		b.add(t, 1, "ada@example.com", "Ada")
		require.Equal(t, Stats{Sent: 1}, pass(t, s))
		require.Equal(t, 1, b.smtp.Count())
		require.Zero(t, b.pending(t))
	})

	t.Run("leaves a lasting 4xx pending and retries it after the claim time", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		b.smtp.FailData(2, smtptest.TempFailure)
		s := b.service(t, func(c *Config) {
			c.SendAttempts, c.ClaimIdle, c.Lease = 1, 300*time.Millisecond, 200*time.Millisecond
		})
		b.add(t, 1, "ada@example.com", "Ada")
		require.Equal(t, Stats{Retried: 1}, pass(t, s))
		require.EqualValues(t, 1, b.pending(t))
		time.Sleep(350 * time.Millisecond)
		require.Equal(t, Stats{Claimed: 1, Retried: 1}, pass(t, s), "the second delivery fails too")
		time.Sleep(350 * time.Millisecond)
		require.Equal(t, Stats{Claimed: 1, Sent: 1}, pass(t, s))
		require.Equal(t, 1, b.smtp.Count())
		require.Zero(t, b.pending(t))
	})

	t.Run("answers 503 while PostgreSQL is down and claims nothing, so an outage dead-letters nothing", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		fast := func(c *Config) { c.ClaimIdle, c.Lease = 20*time.Millisecond, 10*time.Millisecond }
		require.NoError(t, b.service(t, fast).consumer.EnsureGroup(ctx))
		b.add(t, 1, "ada@example.com", "Ada")
		b.add(t, 2, "bob@example.com", "Bob")
		// A consumer read the first entry and crashed: it is pending, idle.
		_, err := b.redis.Do(ctx, b.redis.B().Xreadgroup().Group("sendemail", "crashed").Count(1).
			Streams().Key(b.stream).Id(">").Build()).AsXRead()
		require.NoError(t, err)
		time.Sleep(30 * time.Millisecond)

		down := b.service(t, fast, func(c *Config) {
			c.DatabaseURL = "postgres://postgres@127.0.0.1:1/none?sslmode=disable&connect_timeout=2"
		})
		for range 3 {
			rec := httptest.NewRecorder()
			down.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
			require.Equal(t, http.StatusServiceUnavailable, rec.Code, rec.Body.String())
			require.Contains(t, rec.Body.String(), `"code":"unavailable"`)
		}
		detail, err := b.redis.Do(ctx, b.redis.B().Xpending().Key(b.stream).Group("sendemail").
			Start("-").End("+").Count(10).Build()).ToArray()
		require.NoError(t, err)
		require.Len(t, detail, 1, "the second entry was not read")
		fields, err := detail[0].ToArray()
		require.NoError(t, err)
		owner, _ := fields[1].ToString()
		deliveries, _ := fields[3].AsInt64()
		require.Equal(t, "crashed", owner, "the idle entry was not claimed")
		require.EqualValues(t, 1, deliveries)

		require.Equal(t, Stats{Claimed: 1, Sent: 2}, pass(t, b.service(t, fast)), "once PostgreSQL is back, both go out")
		require.Equal(t, 2, b.smtp.Count())
		require.Zero(t, b.pending(t))
		require.Empty(t, b.deadLetters(t))
	})

	t.Run("dead-letters an entry after the maximum number of deliveries", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		b.smtp.FailData(100, smtptest.TempFailure)
		s := b.service(t, func(c *Config) {
			c.SendAttempts, c.MaxDeliveries, c.ClaimIdle, c.Lease = 1, 2, 300*time.Millisecond, 200*time.Millisecond
		})
		b.add(t, 1, "ada@example.com", "Ada")
		require.Equal(t, Stats{Retried: 1}, pass(t, s))
		time.Sleep(350 * time.Millisecond)
		require.Equal(t, Stats{Claimed: 1, DeadLettered: 1}, pass(t, s))
		dead := b.deadLetters(t)
		require.Len(t, dead, 1)
		require.Contains(t, dead[0].FieldValues[FieldDeadError], "gave up after 2 deliveries")
		require.Equal(t, "2", dead[0].FieldValues[FieldDeadDeliveries])
		require.Zero(t, b.pending(t))
	})

	for _, on := range backends {
		t.Run("dead-letters a refused recipient and undecodable entries with their reasons, on "+on.name, func(t *testing.T) {
			t.Parallel()
			b := on.setup(t)
			b.smtp.RefuseRecipients(func(to string) bool { return strings.HasPrefix(to, "gone@") }, smtptest.NoSuchUser)
			s := b.service(t)
			b.add(t, 1, "gone@example.com", "Gone")
			b.addRaw(t, "event_type", "user.created", "payload", "{}") // no event_id
			b.addEvent(t, stream.Event{EventID: uuid.NewString(), EventType: "user.created", Payload: "not json", OccurredAt: time.Now()})
			b.addEvent(t, stream.Event{EventID: uuid.NewString(), EventType: "user.created", Payload: `{"user_id":3,"email":"a@b.c, d@e.f","name":"X"}`, OccurredAt: time.Now()})
			b.add(t, 4, "ok@example.com", "Ok")
			require.Equal(t, Stats{Sent: 1, DeadLettered: 4}, pass(t, s), "a malformed entry never stops the consumer")
			require.Zero(t, b.pending(t), "nothing stays pending")

			reasons := map[string]string{}
			for _, d := range b.deadLetters(t) {
				require.NotEmpty(t, d.FieldValues[FieldDeadOriginalID])
				require.Equal(t, b.stream, d.FieldValues[FieldDeadStream])
				require.NotEmpty(t, d.FieldValues[FieldDeadConsumer])
				require.NotEmpty(t, d.FieldValues[FieldDeadFailedAt])
				reasons[d.FieldValues["payload"]] = d.FieldValues[FieldDeadError]
			}
			require.Contains(t, reasons[`{"email":"gone@example.com","name":"Gone","user_id":1}`], "550")
			require.Contains(t, reasons["{}"], "event_id is missing")
			require.Contains(t, reasons["not json"], "decode user.created payload")
			require.Contains(t, reasons[`{"user_id":3,"email":"a@b.c, d@e.f","name":"X"}`], "not a single plain address")
			var records int
			require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT count(*) FROM email_sends WHERE key = 'welcome:1'`).Scan(&records))
			require.Zero(t, records, "a permanent failure leaves no claim behind, so a redrive can send it")
		})
	}

	t.Run("sends no extra header for a name carrying CR/LF", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		s := b.service(t)
		b.add(t, 1, "eve@example.com", "Eve\r\nBcc: spy@evil.example\r\nX-Injected: yes")
		require.Equal(t, Stats{Sent: 1}, pass(t, s))
		m := b.smtp.Messages()[0]
		require.Equal(t, []string{"eve@example.com"}, m.To, "no other recipient")
		require.Empty(t, m.Header.Get("Bcc"))
		require.Empty(t, m.Header.Get("X-Injected"))
		to, err := m.Header.AddressList("To")
		require.NoError(t, err)
		require.Len(t, to, 1)
		require.Equal(t, "Eve Bcc: spy@evil.example X-Injected: yes", to[0].Name)
	})

	t.Run("acknowledges and counts event types it does not handle", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		s := b.service(t)
		b.addEvent(t, stream.Event{EventID: uuid.NewString(), EventType: "user.renamed", Payload: `{}`, OccurredAt: time.Now()})
		require.Equal(t, Stats{Skipped: 1}, pass(t, s))
		require.Zero(t, b.pending(t))
		require.Zero(t, b.smtp.Count())
	})

	t.Run("reads nothing more in the background while PostgreSQL is down", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		s := b.service(t, func(c *Config) {
			c.DatabaseURL = "postgres://postgres@127.0.0.1:1/none?sslmode=disable&connect_timeout=2"
		})
		require.NoError(t, s.consumer.EnsureGroup(context.Background()))
		b.add(t, 1, "ada@example.com", "Ada")
		require.NoError(t, s.Start(context.Background()))
		// The first read cannot know; its claim fails and the entry stays
		// pending, delivered once.
		require.Eventually(t, func() bool { return b.pending(t) == 1 }, 10*time.Second, 5*time.Millisecond)
		b.add(t, 2, "bob@example.com", "Bob")
		// Several of the loop's backoff steps (100 ms, growing) pass.
		time.Sleep(700 * time.Millisecond)
		s.Stop()
		require.EqualValues(t, 1, b.pending(t), "the second entry was not read, so its delivery count did not rise")
		require.Zero(t, b.smtp.Count())
	})

	t.Run("sends in the background loop as entries arrive", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		s := b.service(t)
		require.NoError(t, s.Start(context.Background()))
		for i := range 20 {
			b.add(t, int64(i+1), fmt.Sprintf("u%d@example.com", i+1), "U")
		}
		b.smtp.WaitFor(t, 20, 10*time.Second)
		s.Stop()
		require.Equal(t, 20, b.smtp.Count())
		require.Zero(t, b.pending(t))
	})

	t.Run("shares the stream between two consumers, sending each email once", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		// A copy that meets another consumer's lease is retried after the
		// claim time; keep it short so that the retry happens here.
		short := func(c *Config) {
			c.ClaimIdle, c.Lease, c.ClaimInterval = 500*time.Millisecond, 300*time.Millisecond, 100*time.Millisecond
		}
		one, two := b.service(t, short), b.service(t, short)
		require.NoError(t, one.Start(context.Background()))
		require.NoError(t, two.Start(context.Background()))
		e := stream.Event{EventID: uuid.NewString(), EventType: "user.created", AggregateType: "user", AggregateID: "0",
			Payload: `{"user_id":1000,"email":"dup@example.com","name":"Dup"}`, OccurredAt: time.Now()}
		for i := range 100 {
			b.add(t, int64(i+1), fmt.Sprintf("u%d@example.com", i+1), "U")
			if i%10 == 0 {
				b.addEvent(t, e) // the same event, again and again
			}
		}
		b.smtp.WaitFor(t, 101, 10*time.Second)
		require.Eventually(t, func() bool { return b.pending(t) == 0 }, 10*time.Second, 10*time.Millisecond)
		one.Stop()
		two.Stop()
		got := map[string]int{}
		for _, m := range b.smtp.Messages() {
			got[m.To[0]]++
		}
		require.Len(t, got, 101)
		for to, n := range got {
			require.Equal(t, 1, n, "%s got %d emails", to, n)
		}
	})

	t.Run("writes .eml files into the mailbox when no SMTP server is set", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		dir := t.TempDir()
		s := b.service(t, func(c *Config) { c.SMTPURL, c.MailboxDir = "", dir })
		id := b.add(t, 1, "ada@example.com", "Ada")
		require.Equal(t, Stats{Sent: 1}, pass(t, s))
		files, err := filepath.Glob(filepath.Join(dir, "*.eml"))
		require.NoError(t, err)
		require.Len(t, files, 1)
		raw, err := os.ReadFile(files[0])
		require.NoError(t, err)
		require.Contains(t, string(raw), "Message-ID: <"+id+"@example.com>")
		require.Contains(t, string(raw), "To: \"Ada\" <ada@example.com>")
	})

	t.Run("answers other methods with 405 and a missing token with 401", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		s := b.service(t, func(c *Config) { c.TriggerToken = "s3cret" })
		rec := httptest.NewRecorder()
		s.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
		require.Equal(t, http.StatusMethodNotAllowed, rec.Code)

		b.add(t, 1, "ada@example.com", "Ada")
		rec = httptest.NewRecorder()
		s.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
		require.Equal(t, http.StatusUnauthorized, rec.Code)
		require.Zero(t, b.smtp.Count())

		req := httptest.NewRequest(http.MethodPost, "/", nil)
		req.Header.Set("Authorization", "Bearer s3cret")
		rec = httptest.NewRecorder()
		s.ServeHTTP(rec, req)
		require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
		var body map[string]any
		require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &body))
		require.EqualValues(t, 1, body["sent"])
	})
}
