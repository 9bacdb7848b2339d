package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/functions/sendemail"
	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/pgtest"
	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/smtptest"
	"github.com/outboxfn/outbox/shared/stream"
)

type testBundle struct {
	ops  *ops
	out  *bytes.Buffer
	url  string
	smtp *smtptest.Server
}

func setup(t *testing.T) *testBundle {
	t.Helper()
	url, pool := pgtest.NewPool(t)
	client, prefix := redistest.New(t)
	out := &bytes.Buffer{}
	return &testBundle{ops: &ops{pool: pool, redis: client, prefix: prefix, group: "sendemail", out: out}, out: out, url: url, smtp: smtptest.Start(t)}
}

func (b *testBundle) sendemail(t *testing.T) *sendemail.Service {
	t.Helper()
	s, err := sendemail.New(context.Background(), sendemail.Config{
		Config: logging.Config{LogFormat: "text", LogLevel: "info"}, DatabaseURL: b.url, DBMaxConns: 2,
		RedisURL: redistest.URL(), StreamPrefix: b.ops.prefix, Group: "sendemail", BatchSize: 16, Concurrency: 2,
		Block: 100 * time.Millisecond, ClaimIdle: time.Minute, ClaimInterval: time.Hour, MaxDeliveries: 5, SendAttempts: 1,
		Lease: 30 * time.Second, SMTPURL: b.smtp.URL(), SMTPTimeout: 5 * time.Second, From: "Example <welcome@example.com>",
		Subject: "Welcome, {{.Name}}!", DrainTimeout: 10 * time.Second,
	}, logging.Discard())
	require.NoError(t, err)
	t.Cleanup(s.Close)
	return s
}

// pass runs one triggered sendemail pass and returns its counts.
func pass(t *testing.T, s *sendemail.Service) map[string]float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
	var body map[string]float64
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &body), rec.Body.String())
	return body
}

func (b *testBundle) addUser(t *testing.T, id int, email string) {
	t.Helper()
	e := stream.Event{EventID: uuid.NewString(), EventType: "user.created", AggregateType: "user", AggregateID: fmt.Sprint(id),
		Payload: fmt.Sprintf(`{"user_id":%d,"email":%q,"name":"U"}`, id, email), OccurredAt: time.Now()}
	cmd := b.ops.redis.B().Xadd().Key(b.ops.userStream()).Id("*").FieldValue()
	f := e.Fields()
	for i := 0; i < len(f); i += 2 {
		cmd = cmd.FieldValue(f[i], f[i+1])
	}
	require.NoError(t, b.ops.redis.Do(context.Background(), cmd.Build()).Error())
}

func TestStatus(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	_, err := b.ops.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at)
		VALUES ('user', '1', 'user.created', '{}', now() - interval '90 seconds'), ('user', '2', 'user.created', '{}', now())`)
	require.NoError(t, err)
	b.smtp.RefuseRecipients(func(to string) bool { return strings.HasPrefix(to, "gone@") }, smtptest.NoSuchUser)
	b.addUser(t, 1, "ada@example.com")
	b.addUser(t, 2, "gone@example.com")
	require.EqualValues(t, 1, pass(t, b.sendemail(t))["sent"])
	b.addUser(t, 3, "late@example.com") // not yet read by the group

	s, err := b.ops.status(ctx)
	require.NoError(t, err)
	require.EqualValues(t, 2, s.Outbox.Events)
	require.InDelta(t, 90, s.Outbox.OldestAgeSeconds, 5)
	require.Len(t, s.Streams, 1, "the dead-letter stream is reported with its stream, not as one")
	st := s.Streams[0]
	require.Equal(t, b.ops.userStream(), st.Name)
	require.EqualValues(t, 3, st.Length)
	require.EqualValues(t, 1, st.DeadLetters)
	require.Len(t, st.Groups, 1)
	require.Equal(t, "sendemail", st.Groups[0].Name)
	require.EqualValues(t, 0, st.Groups[0].Pending)
	require.EqualValues(t, 1, st.Groups[0].Lag)
	require.Len(t, st.Groups[0].Consumers, 1)

	require.NoError(t, b.ops.command(ctx, []string{"status"}))
	require.Contains(t, b.out.String(), "outbox: 2 events waiting")
	require.Contains(t, b.out.String(), "1 dead letters")
	require.Contains(t, b.out.String(), "group sendemail: 0 pending, lag 1")
	b.out.Reset()
	require.NoError(t, b.ops.command(ctx, []string{"status", "-json"}))
	var decoded Status
	require.NoError(t, json.Unmarshal(b.out.Bytes(), &decoded))
	require.Equal(t, s.Outbox.Events, decoded.Outbox.Events)
}

func TestDeadLetters(t *testing.T) {
	t.Parallel()

	t.Run("redrive sends the email once and empties the dead-letter stream", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		se := b.sendemail(t)
		b.smtp.FailData(1, smtptest.NoSuchUser) // the mailbox did not exist yet
		b.addUser(t, 1, "ada@example.com")
		require.EqualValues(t, 1, pass(t, se)["dead_lettered"])

		letters, err := b.ops.dlqList(ctx, 10)
		require.NoError(t, err)
		require.Len(t, letters, 1)
		require.Contains(t, letters[0].Error, "550")
		require.Equal(t, "1", letters[0].Deliveries)
		require.Equal(t, "user.created", letters[0].EventType)
		require.NoError(t, b.ops.command(ctx, []string{"dlq", "list"}))
		require.Contains(t, b.out.String(), letters[0].ID)

		n, err := b.ops.dlqRedrive(ctx, []string{letters[0].ID})
		require.NoError(t, err)
		require.Equal(t, 1, n)
		letters, err = b.ops.dlqList(ctx, 10)
		require.NoError(t, err)
		require.Empty(t, letters)

		require.EqualValues(t, 1, pass(t, se)["sent"])
		require.EqualValues(t, 0, pass(t, se)["sent"], "nothing is left to send")
		require.Equal(t, 1, b.smtp.Count(), "one email")
		require.Equal(t, []string{"ada@example.com"}, b.smtp.Messages()[0].To)
	})

	t.Run("drop deletes all dead letters and redrive refuses an unknown id", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		se := b.sendemail(t)
		for i := range 3 {
			b.addRaw(t, i) // undecodable
		}
		require.EqualValues(t, 3, pass(t, se)["dead_lettered"])
		_, err := b.ops.dlqRedrive(ctx, []string{"1-1"})
		require.ErrorIs(t, err, errNoSuchEntry)
		require.ErrorIs(t, b.ops.command(ctx, []string{"dlq", "drop"}), errUsage, "drop needs ids or -all")
		require.NoError(t, b.ops.command(ctx, []string{"dlq", "drop", "-all"}))
		letters, err := b.ops.dlqList(ctx, 10)
		require.NoError(t, err)
		require.Empty(t, letters)
	})
}

func (b *testBundle) addRaw(t *testing.T, i int) {
	t.Helper()
	require.NoError(t, b.ops.redis.Do(context.Background(), b.ops.redis.B().Xadd().Key(b.ops.userStream()).Id("*").
		FieldValue().FieldValue("event_type", "user.created").FieldValue("n", fmt.Sprint(i)).Build()).Error())
}

func TestPurge(t *testing.T) {
	t.Parallel()

	t.Run("deletes old sent records and idempotency keys, in batches", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		_, err := b.ops.pool.Exec(ctx, `
			INSERT INTO email_sends (key, event_id, sent_at, created_at)
			SELECT 'welcome:' || i, gen_random_uuid(), now(), now() - (CASE WHEN i <= 2500 THEN interval '40 days' ELSE interval '1 day' END)
			FROM generate_series(1, 3000) AS i;
			INSERT INTO idempotency_keys (key, request_hash, status, response, created_at)
			VALUES ('old', '\x00', 201, '{}', now() - interval '31 days'), ('new', '\x00', 201, '{}', now())`)
		require.NoError(t, err)
		deleted, err := b.ops.purge(ctx, 30*24*time.Hour)
		require.NoError(t, err)
		require.Equal(t, map[string]int64{"email_sends": 2500, "idempotency_keys": 1}, deleted)
		var sends, keys int
		require.NoError(t, b.ops.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM email_sends), (SELECT count(*) FROM idempotency_keys)`).Scan(&sends, &keys))
		require.Equal(t, 500, sends)
		require.Equal(t, 1, keys)
	})

	t.Run("refuses an age below a day or the dedupe window and never deletes a live claim", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		b.ops.dedupeWindow = 48 * time.Hour
		_, err := b.ops.pool.Exec(ctx, `
			INSERT INTO email_sends (key, event_id, claimed_by, lease_until, created_at)
			SELECT 'welcome:' || i, gen_random_uuid(), 'c/1', now() + interval '1 minute', now() - interval '40 days'
			FROM generate_series(1, 10) AS i`)
		require.NoError(t, err)
		for _, age := range []time.Duration{0, time.Hour, 36 * time.Hour} {
			_, err := b.ops.purge(ctx, age)
			require.ErrorIs(t, err, errPurgeTooYoung, "age %s", age)
		}
		deleted, err := b.ops.purge(ctx, 30*24*time.Hour)
		require.NoError(t, err)
		require.Zero(t, deleted["email_sends"], "unsent records are claims in use or emails still being retried")
	})
}

func TestRedrive(t *testing.T) {
	t.Parallel()

	t.Run("two redrives at once move each dead letter once", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		for i := range 50 {
			require.NoError(t, b.ops.redis.Do(ctx, b.ops.redis.B().Xadd().Key(b.ops.deadStream()).Id("*").FieldValue().
				FieldValue("event_type", "user.created").FieldValue("n", fmt.Sprint(i)).
				FieldValue(sendemail.FieldDeadStream, b.ops.userStream()).Build()).Error())
		}
		var wg sync.WaitGroup
		moved := make([]int, 2)
		for i := range moved {
			wg.Go(func() {
				n, err := b.ops.dlqRedrive(ctx, nil)
				assert.NoError(t, err)
				moved[i] = n
			})
		}
		wg.Wait()
		require.Equal(t, 50, moved[0]+moved[1])
		n, err := b.ops.redis.Do(ctx, b.ops.redis.B().Xlen().Key(b.ops.userStream()).Build()).AsInt64()
		require.NoError(t, err)
		require.EqualValues(t, 50, n, "each letter once in the stream")
		letters, err := b.ops.dlqList(ctx, 0)
		require.NoError(t, err)
		require.Empty(t, letters)
	})

	t.Run("keeps a dead letter its stream refuses", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		require.NoError(t, b.ops.redis.Do(ctx, b.ops.redis.B().Set().Key(b.ops.userStream()).Value("not a stream").Build()).Error())
		require.NoError(t, b.ops.redis.Do(ctx, b.ops.redis.B().Xadd().Key(b.ops.deadStream()).Id("*").FieldValue().
			FieldValue("event_type", "user.created").FieldValue(sendemail.FieldDeadStream, b.ops.userStream()).Build()).Error())
		n, err := b.ops.dlqRedrive(ctx, nil)
		require.Error(t, err)
		require.Zero(t, n)
		letters, err := b.ops.dlqList(ctx, 0)
		require.NoError(t, err)
		require.Len(t, letters, 1, "still a dead letter, not lost")
	})

	t.Run("lists every dead letter with -count 0", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		for range 3 {
			require.NoError(t, b.ops.redis.Do(ctx, b.ops.redis.B().Xadd().Key(b.ops.deadStream()).Id("*").FieldValue().
				FieldValue("event_type", "user.created").Build()).Error())
		}
		require.NoError(t, b.ops.command(ctx, []string{"dlq", "list", "-count", "0"}))
		letters, err := b.ops.dlqList(ctx, 0)
		require.NoError(t, err)
		require.Len(t, letters, 3)
	})
}
