package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
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
	// redisURL and cluster are what sendemail connects to.
	redisURL string
	cluster  bool
}

func setup(t *testing.T) *testBundle {
	t.Helper()
	url, pool := pgtest.NewPool(t)
	client, prefix := redistest.New(t)
	out := &bytes.Buffer{}
	return &testBundle{ops: &ops{pool: pool, redis: client, prefix: prefix, group: "sendemail", out: out}, out: out, url: url, smtp: smtptest.Start(t),
		redisURL: redistest.URL()}
}

// setupOn is setup with the streams on the Redis Cluster c.
func setupOn(t *testing.T, c *redistest.Cluster) *testBundle {
	t.Helper()
	url, pool := pgtest.NewPool(t)
	client, prefix := c.Client(t)
	out := &bytes.Buffer{}
	return &testBundle{ops: &ops{pool: pool, redis: client, prefix: prefix, group: "sendemail", out: out}, out: out, url: url, smtp: smtptest.Start(t),
		redisURL: c.URL(), cluster: true}
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

func (b *testBundle) sendemail(t *testing.T) *sendemail.Service {
	t.Helper()
	s, err := sendemail.New(context.Background(), sendemail.Config{
		Config: logging.Config{LogFormat: "text", LogLevel: "info"}, DatabaseURL: b.url, DBMaxConns: 2,
		RedisURL: b.redisURL, RedisCluster: b.cluster, StreamPrefix: b.ops.prefix, Group: "sendemail", BatchSize: 16, Concurrency: 2,
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
	for _, on := range backends(t) {
		t.Run("on "+on.name, func(t *testing.T) {
			t.Parallel()
			b := on.setup(t)
			ctx := context.Background()
			_, err := b.ops.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at)
		VALUES ('user', '1', 'user.created', '{}', now() - interval '90 seconds'), ('user', '2', 'user.created', '{}', now())`)
			require.NoError(t, err)
			b.insertDead(t, 7, "_relay:epoch", 30*time.Second)
			b.insertDead(t, 8, "user", 0)
			b.smtp.RefuseRecipients(func(to string) bool { return strings.HasPrefix(to, "gone@") }, smtptest.NoSuchUser)
			b.addUser(t, 1, "ada@example.com")
			b.addUser(t, 2, "gone@example.com")
			require.EqualValues(t, 1, pass(t, b.sendemail(t))["sent"])
			b.addUser(t, 3, "late@example.com") // not yet read by the group

			s, err := b.ops.status(ctx)
			require.NoError(t, err)
			require.EqualValues(t, 2, s.Outbox.Events)
			require.InDelta(t, 90, s.Outbox.OldestAgeSeconds, 5)
			require.EqualValues(t, 2, s.OutboxDead.Count)
			require.InDelta(t, 30, s.OutboxDead.OldestAgeSeconds, 5)
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
			require.Contains(t, b.out.String(), "outbox dead: 2 events the relay could not publish")
			require.Contains(t, b.out.String(), "1 dead letters")
			require.Contains(t, b.out.String(), "group sendemail: 0 pending, lag 1")
			b.out.Reset()
			require.NoError(t, b.ops.command(ctx, []string{"status", "-json"}))
			var decoded Status
			require.NoError(t, json.Unmarshal(b.out.Bytes(), &decoded))
			require.Equal(t, s.Outbox.Events, decoded.Outbox.Events)
			require.Equal(t, s.OutboxDead.Count, decoded.OutboxDead.Count)
		})
	}
}

func TestStatusShowsRetainedEventsAndReplays(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	b.retainedFixture(t)
	b.replaying(t, map[string]int64{"user": 3, "order": 0})

	s, err := b.ops.status(ctx)
	require.NoError(t, err)
	require.EqualValues(t, 6, s.Retained.Events)
	require.NotNil(t, s.Retained.OldestRelayedAt)
	require.WithinDuration(t, time.Now().Add(-5*time.Hour), *s.Retained.OldestRelayedAt, 5*time.Second)
	require.Equal(t, []StreamReplay{{AggregateType: "user", Stream: b.ops.prefix + "user", FromBatch: 3}}, s.Replays)

	require.NoError(t, b.ops.command(ctx, []string{"status"}))
	require.Contains(t, b.out.String(), "retained: 6 relayed events, oldest batch relayed ")
	require.Contains(t, b.out.String(), "stream "+b.ops.prefix+"user: replay under way from batch 3\n")
	require.NotContains(t, b.out.String(), "stream "+b.ops.prefix+"order: replay")
	b.out.Reset()
	require.NoError(t, b.ops.command(ctx, []string{"status", "-json"}))
	var decoded Status
	require.NoError(t, json.Unmarshal(b.out.Bytes(), &decoded))
	require.Equal(t, s.Retained.Events, decoded.Retained.Events)
	require.True(t, s.Retained.OldestRelayedAt.Equal(*decoded.Retained.OldestRelayedAt))
	require.Equal(t, s.Replays, decoded.Replays)
	require.Contains(t, b.out.String(), `"retained":{"events":6,"oldest_relayed_at":"`)
}

func TestDeadLetters(t *testing.T) {
	t.Parallel()
	backends := backends(t)

	for _, on := range backends {
		t.Run("redrive sends the email once and empties the dead-letter stream, on "+on.name, func(t *testing.T) {
			t.Parallel()
			b := on.setup(t)
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
	}

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

	t.Run("letters an older sendemail left under <stream>:dead are moved where dlq finds them", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		legacy := sendemail.LegacyDeadLetterStream(b.ops.userStream())
		for i := range 3 {
			require.NoError(t, b.ops.redis.Do(ctx, b.ops.redis.B().Xadd().Key(legacy).Id("*").FieldValue().
				FieldValue("event_type", "user.created").FieldValue("n", fmt.Sprint(i)).
				FieldValue(sendemail.FieldDeadError, "old").Build()).Error())
		}
		letters, err := b.ops.dlqList(ctx, 0)
		require.NoError(t, err)
		require.Len(t, letters, 3)
		for i, l := range letters {
			require.Equal(t, fmt.Sprint(i), l.Fields["n"], "in their order")
			require.Equal(t, "old", l.Error)
		}
		n, err := b.ops.redis.Do(ctx, b.ops.redis.B().Exists().Key(legacy).Build()).AsInt64()
		require.NoError(t, err)
		require.Zero(t, n, "the old stream is gone")
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
		p, err := b.ops.purge(ctx, 30*24*time.Hour)
		require.NoError(t, err)
		require.Equal(t, map[string]int64{"email_sends": 2500, "idempotency_keys": 1}, p.Deleted)
		require.False(t, p.Clamped, "no batch is retained")
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
		p, err := b.ops.purge(ctx, 30*24*time.Hour)
		require.NoError(t, err)
		require.Zero(t, p.Deleted["email_sends"], "unsent records are claims in use or emails still being retried")
	})

	t.Run("refuses an age below RELAY_RETENTION", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		b.ops.dedupeWindow = 24 * time.Hour
		b.ops.retention = 72 * time.Hour
		_, err := b.ops.pool.Exec(ctx, `
			INSERT INTO email_sends (key, event_id, sent_at, created_at) VALUES ('welcome:1', gen_random_uuid(), now(), now() - interval '60 hours')`)
		require.NoError(t, err)
		for _, age := range []time.Duration{24 * time.Hour, 48 * time.Hour, 72*time.Hour - time.Second} {
			err := b.ops.command(ctx, []string{"purge", "-older-than", age.String()})
			require.ErrorIs(t, err, errPurgeTooYoung, "age %s", age)
			require.ErrorContains(t, err, "below 72h0m0s")
			require.ErrorContains(t, err, "RELAY_RETENTION")
			require.ErrorContains(t, err, "RELAY_DEDUPE_WINDOW")
		}
		require.Equal(t, 1, b.count(t, "email_sends"), "a refused purge deletes nothing")
		_, err = b.ops.purge(ctx, 72*time.Hour)
		require.NoError(t, err)
		b.ops.retention = 0 // the relay retains nothing: the day and the dedupe window remain
		_, err = b.ops.purge(ctx, 24*time.Hour)
		require.NoError(t, err)
	})

	t.Run("keeps send records created since the oldest retained event was written, whatever the age", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		b.ops.retention = 24 * time.Hour
		// The relay has not purged for a while: its oldest batch was
		// relayed 35 days ago, and replaying it would re-deliver events
		// whose emails were sent since then.
		oldest := time.Now().Add(-35 * 24 * time.Hour).Truncate(time.Microsecond)
		b.retain(t, 1, stream.Event{EventID: uuid.NewString(), EventType: "user.created", AggregateType: "user",
			AggregateID: "1", Payload: "{}", OccurredAt: oldest, OutboxID: 1}, oldest)
		_, err := b.ops.pool.Exec(ctx, `
			INSERT INTO email_sends (key, event_id, sent_at, created_at) VALUES
				('40 days', gen_random_uuid(), now(), now() - interval '40 days'),
				('at the batch', gen_random_uuid(), now(), $1),
				('34 days', gen_random_uuid(), now(), now() - interval '34 days'),
				('1 day', gen_random_uuid(), now(), now() - interval '1 day')`, oldest)
		require.NoError(t, err)
		_, err = b.ops.pool.Exec(ctx, `INSERT INTO idempotency_keys (key, request_hash, status, response, created_at)
			VALUES ('34 days', '\x00', 201, '{}', now() - interval '34 days')`)
		require.NoError(t, err)

		require.NoError(t, b.ops.command(ctx, []string{"purge", "-older-than", "720h"}))
		var kept []string
		require.NoError(t, b.ops.pool.QueryRow(ctx, `SELECT array_agg(key ORDER BY created_at) FROM email_sends`).Scan(&kept))
		require.Equal(t, []string{"at the batch", "34 days", "1 day"}, kept)
		require.Zero(t, b.count(t, "idempotency_keys"), "idempotency keys go by age alone")
		require.Contains(t, b.out.String(), "keeping the records created since "+oldest.UTC().Format(time.RFC3339))
		require.Contains(t, b.out.String(), "purged 1 rows of email_sends created before")
		require.Contains(t, b.out.String(), "purged 1 rows of idempotency_keys older than 720h0m0s")

		_, err = b.ops.pool.Exec(ctx, `TRUNCATE outbox_relayed_rows, outbox_retained`) // the relay caught up
		require.NoError(t, err)
		p, err := b.ops.purge(ctx, 30*24*time.Hour)
		require.NoError(t, err)
		require.False(t, p.Clamped)
		require.EqualValues(t, 2, p.Deleted["email_sends"], "once nothing older is retained, the age alone decides")
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

// insertDead puts a row into outbox_dead as the relay would, dead for ago.
func (b *testBundle) insertDead(t *testing.T, id int64, aggregateType string, ago time.Duration) {
	t.Helper()
	_, err := b.ops.pool.Exec(context.Background(), `
		INSERT INTO outbox_dead (id, event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at, error, dead_at)
		VALUES ($1, gen_random_uuid(), $2, $4, 'x.happened', '{"n": 1}',
		        '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01', now() - $3::interval - interval '1 hour',
		        'WRONGTYPE Operation against a key holding the wrong kind of value', now() - $3::interval)`,
		id, aggregateType, ago, fmt.Sprint(id))
	require.NoError(t, err)
}

func (b *testBundle) count(t *testing.T, table string) int {
	t.Helper()
	var n int
	require.NoError(t, b.ops.pool.QueryRow(context.Background(), `SELECT count(*) FROM `+table).Scan(&n))
	return n
}

func TestOutboxDead(t *testing.T) {
	t.Parallel()

	t.Run("status says none when nothing is dead", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		require.NoError(t, b.ops.command(context.Background(), []string{"status"}))
		require.Contains(t, b.out.String(), "outbox dead: none")
		require.Contains(t, b.out.String(), "retained: none")
		require.NotContains(t, b.out.String(), "replay under way")
	})

	t.Run("list shows the longest dead first with its error, and -count bounds it", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		b.insertDead(t, 3, "user", time.Minute)
		b.insertDead(t, 1, "order", time.Second)
		b.insertDead(t, 2, "_relay:epoch", time.Hour)

		dead, err := b.ops.outboxDeadList(ctx, 0)
		require.NoError(t, err)
		require.Len(t, dead, 3)
		require.Equal(t, []int64{2, 3, 1}, []int64{dead[0].ID, dead[1].ID, dead[2].ID})
		require.Equal(t, "_relay:epoch", dead[0].AggregateType)
		require.Equal(t, "x.happened", dead[0].EventType)
		require.Contains(t, dead[0].Error, "WRONGTYPE")
		require.Len(t, dead[0].EventID, 36)
		require.WithinDuration(t, time.Now().Add(-time.Hour), dead[0].DeadAt, 5*time.Second)

		dead, err = b.ops.outboxDeadList(ctx, 2)
		require.NoError(t, err)
		require.Len(t, dead, 2)

		require.NoError(t, b.ops.command(ctx, []string{"outbox-dead", "list", "-count", "1"}))
		require.Contains(t, b.out.String(), "2  event ")
		require.Contains(t, b.out.String(), "WRONGTYPE")
		require.NotContains(t, b.out.String(), "\n3  event ", "-count 1 prints one row")
		b.out.Reset()
		require.NoError(t, b.ops.command(ctx, []string{"outbox-dead", "list", "-json"}))
		var decoded []DeadRow
		require.NoError(t, json.Unmarshal(b.out.Bytes(), &decoded))
		require.Len(t, decoded, 3)
	})

	t.Run("requeue moves rows back with their event ids, new row ids and original times", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		// A row the outbox holds now: requeued rows go behind it.
		_, err := b.ops.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('user', 'live', 'x', '{}')`)
		require.NoError(t, err)
		for _, id := range []int64{5, 6, 7} {
			b.insertDead(t, id, "user", time.Minute)
		}
		type snapshot struct {
			EventID, AggregateType, AggregateID, EventType, Payload, Traceparent string
			CreatedAt                                                            time.Time
		}
		const cols = `event_id::text, aggregate_type, aggregate_id, event_type, payload::text, traceparent, created_at`
		read := func(query string, args ...any) []snapshot {
			rows, err := b.ops.pool.Query(ctx, query, args...)
			require.NoError(t, err)
			got, err := pgx.CollectRows(rows, pgx.RowToStructByPos[snapshot])
			require.NoError(t, err)
			return got
		}
		before := read(`SELECT ` + cols + ` FROM outbox_dead WHERE id IN (5, 7) ORDER BY id`)

		require.NoError(t, b.ops.command(ctx, []string{"outbox-dead", "requeue", "7", "5"}))
		require.Contains(t, b.out.String(), "2 rows back in the outbox")

		after := read(`SELECT ` + cols + ` FROM outbox WHERE aggregate_id <> 'live' ORDER BY id`)
		require.Equal(t, before, after, "every column kept, in the old order")
		var liveID, minRequeued int64
		require.NoError(t, b.ops.pool.QueryRow(ctx, `SELECT (SELECT id FROM outbox WHERE aggregate_id = 'live'),
			(SELECT min(id) FROM outbox WHERE aggregate_id <> 'live')`).Scan(&liveID, &minRequeued))
		require.Greater(t, minRequeued, liveID, "new ids from the identity column, behind the current rows")
		var left []int64
		require.NoError(t, b.ops.pool.QueryRow(ctx, `SELECT array_agg(id) FROM outbox_dead`).Scan(&left))
		require.Equal(t, []int64{6}, left, "only the rows named")
	})

	t.Run("requeue refuses an invalid aggregate type and moves nothing", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		b.insertDead(t, 1, "user", time.Minute)
		b.insertDead(t, 2, "_relay:epoch", time.Minute)
		b.insertDead(t, 3, "user:dead", time.Minute)

		for _, args := range [][]string{{"-all"}, {"1", "2"}, {"3"}} {
			err := b.ops.command(ctx, append([]string{"outbox-dead", "requeue"}, args...))
			require.ErrorIs(t, err, errNotRequeuable, "%v", args)
			require.NotErrorIs(t, err, errUsage)
			require.Equal(t, 1, exit(err, io.Discard), "a failure, not a usage error")
		}
		err := b.ops.command(ctx, []string{"outbox-dead", "requeue", "-all"})
		require.ErrorContains(t, err, `2 ("_relay:epoch")`)
		require.ErrorContains(t, err, `3 ("user:dead")`)
		require.Zero(t, b.count(t, "outbox"), "nothing requeued")
		require.Equal(t, 3, b.count(t, "outbox_dead"))

		n, err := b.ops.outboxDeadRequeue(ctx, []int64{1})
		require.NoError(t, err)
		require.EqualValues(t, 1, n, "a valid row named alone still moves")
		require.Equal(t, 1, b.count(t, "outbox"))
	})

	t.Run("requeue refuses an unknown id and moves nothing", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		b.insertDead(t, 1, "user", time.Minute)
		_, err := b.ops.outboxDeadRequeue(ctx, []int64{1, 99})
		require.ErrorIs(t, err, errNoSuchDeadRow)
		require.ErrorContains(t, err, "[99]")
		require.Zero(t, b.count(t, "outbox"))
		require.Equal(t, 1, b.count(t, "outbox_dead"))
	})

	t.Run("requeues at once move each row once", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx := context.Background()
		_, err := b.ops.pool.Exec(ctx, `
			INSERT INTO outbox_dead (id, event_id, aggregate_type, aggregate_id, event_type, payload, created_at, error)
			SELECT i, gen_random_uuid(), 'user', i::text, 'x', '{}', now(), 'WRONGTYPE' FROM generate_series(1, 50) AS i`)
		require.NoError(t, err)
		var wg sync.WaitGroup
		moved := make([]int64, 8)
		for i := range moved {
			wg.Go(func() {
				n, err := b.ops.outboxDeadRequeue(ctx, nil)
				assert.NoError(t, err)
				moved[i] = n
			})
		}
		wg.Wait()
		var total int64
		for _, n := range moved {
			total += n
		}
		require.EqualValues(t, 50, total)
		var rows, events int
		require.NoError(t, b.ops.pool.QueryRow(ctx, `SELECT count(*), count(DISTINCT event_id) FROM outbox`).Scan(&rows, &events))
		require.Equal(t, 50, rows, "each row once")
		require.Equal(t, 50, events)
		require.Zero(t, b.count(t, "outbox_dead"))
	})

	t.Run("usage mistakes are usage errors", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		b.insertDead(t, 1, "user", time.Minute)
		for _, args := range [][]string{
			{"outbox-dead"},
			{"outbox-dead", "drop", "1"},
			{"outbox-dead", "requeue"},
			{"outbox-dead", "requeue", "-all", "1"},
			{"outbox-dead", "requeue", "one"},
			{"outbox-dead", "list", "extra"},
			{"outbox-dead", "list", "-count", "-1"},
		} {
			err := b.ops.command(context.Background(), args)
			require.ErrorIs(t, err, errUsage, "%v", args)
			require.Equal(t, 2, exit(err, io.Discard), "%v", args)
		}
		require.Equal(t, 1, b.count(t, "outbox_dead"), "no mistake moved a row")
	})
}

// TestOutboxDeadNeedsNoRedis cannot run in parallel: it sets the
// environment outboxctl reads its configuration from.
func TestOutboxDeadNeedsNoRedis(t *testing.T) {
	url, pool := pgtest.NewPool(t)
	_, err := pool.Exec(context.Background(), `
		INSERT INTO outbox_dead (id, event_id, aggregate_type, aggregate_id, event_type, payload, created_at, error)
		VALUES (42, gen_random_uuid(), 'user', '1', 'x', '{}', now(), 'WRONGTYPE')`)
	require.NoError(t, err)
	t.Setenv("DATABASE_URL", url)
	t.Setenv("REDIS_URL", "redis://127.0.0.1:1/0") // nothing listens there
	var out bytes.Buffer
	require.NoError(t, run(context.Background(), []string{"outbox-dead", "list"}, &out))
	require.Contains(t, out.String(), "42  event ")
	require.NoError(t, run(context.Background(), []string{"outbox-dead", "requeue", "42"}, &out))
	var n int
	require.NoError(t, pool.QueryRow(context.Background(), `SELECT count(*) FROM outbox`).Scan(&n))
	require.Equal(t, 1, n)
}
