package relay

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/stream"
)

// countByEvent counts the entries of each event id.
func countByEvent(entries []stream.Event) map[string]int {
	n := map[string]int{}
	for _, e := range entries {
		n[e.EventID]++
	}
	return n
}

// An interrupted re-publication must be taken up where it stopped
// (outbox_streams.replay_from), as the README promises: the batches already
// published again must not be published again from the first batch.
func TestAnInterruptedReplayIsResumedWhereItStopped(t *testing.T) {
	t.Parallel()
	l := newLossBundle(t)
	ctx := context.Background()
	l.relayNew(t, 50) // five batches of ten
	batches := l.batches(t)
	require.Len(t, batches, 5)

	l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Flushall().Build() })

	// The relay is stopped after two runs of its re-publication have
	// reached Redis, only the first recorded (a crash, a deadline, a
	// failing database: the record of the second run fails).
	_, err := l.pool.Exec(ctx, fmt.Sprintf(`
		CREATE FUNCTION review_stop() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
		  IF NEW.replay_from IS NOT NULL AND NEW.replay_from > %d THEN
		    RAISE EXCEPTION 'review: relay stopped mid-replay';
		  END IF;
		  RETURN NEW;
		END $$;
		CREATE TRIGGER review_stop BEFORE UPDATE ON outbox_streams FOR EACH ROW EXECUTE FUNCTION review_stop();`,
		batches[1]))
	require.NoError(t, err)
	_, err = l.drain()
	require.Error(t, err, "the replay was interrupted")
	var from *int64
	require.NoError(t, l.pool.QueryRow(ctx, `SELECT replay_from FROM outbox_streams`).Scan(&from))
	require.NotNil(t, from)
	t.Logf("interrupted: %d entries in the stream, replay_from = %d (batches %v)", len(l.entries(t, "item")), *from, batches)

	_, err = l.pool.Exec(ctx, `DROP TRIGGER review_stop ON outbox_streams`)
	require.NoError(t, err)
	res, err := l.drain()
	require.NoError(t, err)
	t.Logf("resumed: replayed %d", res.Replayed)

	counts := countByEvent(l.entries(t, "item"))
	require.Len(t, counts, 50)
	// The second run was published but not recorded: it may be there
	// twice. The first run was recorded; it must be there once.
	require.LessOrEqual(t, res.Replayed, 40, "the resumed replay starts at replay_from (batch %d), not at the first batch", *from)
	dup := 0
	for _, n := range counts {
		if n > 1 {
			dup++
		}
	}
	require.LessOrEqual(t, dup, 10, "only the unrecorded run may be duplicated; %d events are in the stream more than once", dup)
}

// A relay killed between the EXEC of a batch (into a stream that had been
// deleted and created again) and its COMMIT leaves the in-flight marker
// covering that batch. The next relay must not leave those newer events in
// front of the older events it publishes again.
func TestABatchInDoubtInARecreatedStreamIsPublishedAgainAfterTheOlderEvents(t *testing.T) {
	t.Parallel()
	l := newLossBundle(t)
	ctx := context.Background()
	l.relayNew(t, 30)
	key := l.prefix + "item"
	l.insert(t, "item", "a", l.next, 10)
	l.next += 10
	calls := 0
	l.relay.drainer.beforePublish = func() {
		if calls++; calls != 1 {
			return
		}
		// The stream is deleted (by hand, or a consumer's MKSTREAM after
		// a flush)...
		if err := l.private.Do(ctx, l.private.B().Del().Key(key).Build()).Error(); err != nil {
			t.Errorf("del: %v", err)
		}
		// ... and the relay dies right after its EXEC (its session, and
		// with it the batch's transaction, ends).
		if _, err := l.pool.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_locks
			WHERE locktype = 'advisory' AND granted AND objsubid = 1
			  AND objid::bigint = (`+drainLock+`::bigint & 4294967295)
			  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`); err != nil {
			t.Errorf("terminate: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	_, err := l.drain()
	require.Error(t, err, "the relay died mid-batch")
	l.relay.drainer.beforePublish = nil

	res, err := l.drain()
	if err != nil {
		res, err = l.drain()
	}
	require.NoError(t, err)
	t.Logf("replayed %d, relayed %d, duplicates skipped %d", res.Replayed, res.Relayed, res.Duplicates)
	require.Zero(t, l.outboxCount(t))
	var seqs []string
	for _, e := range l.entries(t, "item") {
		seqs = append(seqs, e.Payload)
	}
	t.Logf("stream: first %s, last %s", seqs[0], seqs[len(seqs)-1])
	// The batch in doubt landed before the older events; it is published
	// again after them (consumers drop the first copies by event_id).
	entries := l.entries(t, "item")
	require.Len(t, entries, 50, "the batch in doubt twice, the rest once")
	requireExactlyOnceInOrder(t, lastCopies(entries), 40)
}

// A trigger-only relay (BACKGROUND=false) whose re-publication does not fit
// in one RELAY_DRAIN_TIMEOUT must finish it over several triggers, each
// taking up where the last stopped, and publish each event once more at
// most, not once per trigger.
func TestATriggeredReplayLongerThanTheDrainTimeoutMakesProgress(t *testing.T) {
	t.Parallel()
	const n = 20000
	l := newLossBundle(t, func(c *Config) { c.BatchSize, c.DrainTimeout = 100, 200*time.Millisecond })
	l.insertBulk(t, "item", n)
	_, err := l.drain()
	require.NoError(t, err)
	l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Flushall().Build() })

	attempts, code := 0, 0
	var body map[string]any
	start := time.Now()
	for attempts < 30 {
		attempts++
		code, body = trigger(t, l.relay)
		if code == 200 && body["complete"] == true {
			break
		}
	}
	xlen, err := l.private.Do(context.Background(), l.private.B().Xlen().Key(l.prefix+"item").Build()).AsInt64()
	require.NoError(t, err)
	t.Logf("%d triggers in %s, last answered %d %v; the stream holds %d entries for %d events",
		attempts, time.Since(start).Round(time.Millisecond), code, body, xlen, n)
	require.Equal(t, 200, code, "the re-publication finished")
	require.Len(t, countByEvent(l.entries(t, "item")), n, "every event is back")
	require.LessOrEqual(t, xlen, int64(n+100*attempts), "each interrupted trigger may re-publish at most one run twice")
}

// The same, for a stream with a history longer than the retention window
// (its entries-added counter counts every entry since it was created, not
// only those retained): the trigger-only relay must still finish the
// re-publication, and relay new events after it.
func TestATriggeredReplayOfAStreamWithALongHistoryFinishes(t *testing.T) {
	t.Parallel()
	const n = 20000
	l := newLossBundle(t, func(c *Config) { c.BatchSize, c.DrainTimeout = 100, 200*time.Millisecond })
	l.insertBulk(t, "item", n)
	_, err := l.drain()
	require.NoError(t, err)
	// Months of events went through this stream before; a day is retained.
	_, err = l.pool.Exec(context.Background(), `UPDATE outbox_streams SET entries_added = entries_added + 50000000`)
	require.NoError(t, err)
	l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Flushall().Build() })
	l.insertBulk(t, "item", 1) // a new sign-up waits behind the replay

	attempts, code := 0, 0
	var body map[string]any
	for attempts < 20 {
		attempts++
		code, body = trigger(t, l.relay)
		if code == 200 && body["complete"] == true {
			break
		}
	}
	xlen, err := l.private.Do(context.Background(), l.private.B().Xlen().Key(l.prefix+"item").Build()).AsInt64()
	require.NoError(t, err)
	t.Logf("%d triggers, last answered %d %v; the stream holds %d entries, %d distinct, outbox backlog %d",
		attempts, code, body, xlen, len(countByEvent(l.entries(t, "item"))), l.outboxCount(t))
	require.True(t, code == 200 && body["complete"] == true, "the re-publication finished within 20 triggers")
	require.Zero(t, l.outboxCount(t), "the new event was relayed")
}

// A failover that kept a prefix of the stream, followed by any other write
// to it before the relay's next drain (outboxctl dlq redrive writes to the
// stream): only the batches the stream lost may be published again.
func TestAFailoverFollowedByAnotherWriterRepublishesOnlyWhatWasLost(t *testing.T) {
	t.Parallel()
	l := newLossBundle(t)
	l.relayNew(t, 30)
	l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Save().Build() })
	l.relayNew(t, 20)
	l.server.Stop()
	l.server.Start()                                                             // the replica had the first 30 events
	_ = l.private.Do(context.Background(), l.private.B().Ping().Build()).Error() // reconnect
	redriven := stream.Event{EventID: "00000000-0000-4000-8000-000000000001", EventType: "item.changed",
		AggregateType: "item", AggregateID: "z", Payload: `{"redriven": true}`, OccurredAt: time.Now()}
	l.do(t, func(b rueidis.Builder) rueidis.Completed {
		cmd := b.Xadd().Key(l.prefix + "item").Id("*").FieldValue()
		f := redriven.Fields()
		for i := 0; i < len(f); i += 2 {
			cmd = cmd.FieldValue(f[i], f[i+1])
		}
		return cmd.Build()
	})
	res := l.relayNew(t, 10)
	counts := countByEvent(events(l.entries(t, "item")))
	dup := 0
	for _, n := range counts {
		if n > 1 {
			dup++
		}
	}
	t.Logf("replayed %d (lost 20), %d events twice in the stream", res.Replayed, dup)
	require.Len(t, counts, 60)
	require.Equal(t, 20, res.Replayed, "only the two lost batches are published again")
}

// A failover that lost the last batches, each carrying events of two
// aggregate types: both streams get back what they lost, once, in order.
func TestAFailoverLosingBatchesOfTwoStreams(t *testing.T) {
	t.Parallel()
	l := newLossBundle(t)
	both := func(n int) {
		for i := 0; i < n; i++ {
			l.insert(t, "item", "a", l.next+i, 1)
			l.insert(t, "order", "b", l.next+i, 1)
		}
		l.next += n
		_, err := l.drain()
		if err != nil {
			_, err = l.drain()
		}
		require.NoError(t, err)
	}
	both(15)
	l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Save().Build() })
	both(15)
	l.server.Stop()
	l.server.Start()
	both(5)
	requireExactlyOnceInOrder(t, l.entries(t, "item"), 35)
	requireExactlyOnceInOrder(t, l.entries(t, "order"), 35)
}

// A failover that dropped the last 20 events, followed by 20 writes of
// someone else to the stream (a dlq redrive -all, outboxctl replay of other
// events, a relay of an older version during a rolling deploy) before the
// relay's next drain: the 20 lost events must still come back.
func TestAFailoverMaskedByOtherWritesIsStillRepaired(t *testing.T) {
	t.Parallel()
	l := newLossBundle(t)
	l.relayNew(t, 30)
	l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Save().Build() })
	l.relayNew(t, 20)
	l.server.Stop()
	l.server.Start()
	_ = l.private.Do(context.Background(), l.private.B().Ping().Build()).Error() // reconnect
	for i := 0; i < 20; i++ {
		e := stream.Event{EventID: fmt.Sprintf("00000000-0000-4000-8000-%012d", i+1), EventType: "item.changed",
			AggregateType: "item", AggregateID: "z", Payload: `{"redriven": true}`, OccurredAt: time.Now()}
		l.do(t, func(b rueidis.Builder) rueidis.Completed {
			cmd := b.Xadd().Key(l.prefix + "item").Id("*").FieldValue()
			f := e.Fields()
			for j := 0; j < len(f); j += 2 {
				cmd = cmd.FieldValue(f[j], f[j+1])
			}
			return cmd.Build()
		})
	}
	res := l.relayNew(t, 10)
	t.Logf("replayed %d of the 20 lost", res.Replayed)
	requireExactlyOnceInOrder(t, events(l.entries(t, "item")), 60)
}

// Combinations that held up.
func TestRedisLossesCombinedWithOtherFaults(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		mutate func(*Config)
		// run relays events and makes Redis lose some; it returns how many
		// events the stream must end with.
		run func(t *testing.T, l *lossBundle) int
	}{
		{"a flush with RELAY_DEDUPE_WINDOW=0", func(c *Config) { c.DedupeWindow = 0 }, func(t *testing.T, l *lossBundle) int {
			l.relayNew(t, 30)
			l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Flushall().Build() })
			l.relayNew(t, 10)
			return 40
		}},
		{"a failover with RELAY_DEDUPE_WINDOW=0", func(c *Config) { c.DedupeWindow = 0 }, func(t *testing.T, l *lossBundle) int {
			l.relayNew(t, 10)
			l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Save().Build() })
			l.relayNew(t, 20)
			l.server.Stop()
			l.server.Start()
			l.relayNew(t, 10)
			return 40
		}},
		{"a stream trimmed to empty is not a loss", nil, func(t *testing.T, l *lossBundle) int {
			l.relayNew(t, 30)
			l.do(t, func(b rueidis.Builder) rueidis.Completed {
				return b.Xtrim().Key(l.prefix + "item").Maxlen().Threshold("0").Build()
			})
			res := l.relayNew(t, 10)
			require.Zero(t, res.Replayed)
			l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Del().Key(l.prefix + "item").Build() })
			l.relayNew(t, 10)
			return 50
		}},
		{"a batch in doubt (crash after EXEC), then a flush", nil, func(t *testing.T, l *lossBundle) int {
			l.relayNew(t, 30)
			l.crashAfterPublish(t, 10)
			l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Flushall().Build() })
			l.relayNew(t, 10)
			return 50
		}},
		{"a batch whose events were all in flight, then the stream deleted", nil, func(t *testing.T, l *lossBundle) int {
			l.relayNew(t, 30)
			l.crashAfterPublish(t, 10)
			res, err := l.drain()
			require.NoError(t, err)
			require.Equal(t, 10, res.Duplicates)
			l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Del().Key(l.prefix + "item").Build() })
			res = l.relayNew(t, 10)
			require.Equal(t, 40, res.Replayed)
			return 50
		}},
		{"a key of another type at the stream's name, then repaired", nil, func(t *testing.T, l *lossBundle) int {
			l.relayNew(t, 30)
			key := l.prefix + "item"
			l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Del().Key(key).Build() })
			l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Set().Key(key).Value("x").Build() })
			res := l.relayNew(t, 10)
			require.Equal(t, 10, res.Dead)
			l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Del().Key(key).Build() })
			_, err := l.pool.Exec(context.Background(), `WITH d AS (DELETE FROM outbox_dead RETURNING *)
				INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at)
				SELECT event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at FROM d ORDER BY id`)
			require.NoError(t, err)
			res = l.relayNew(t, 0)
			require.Equal(t, 30, res.Replayed)
			return 40
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var l *lossBundle
			if tt.mutate != nil {
				l = newLossBundle(t, tt.mutate)
			} else {
				l = newLossBundle(t)
			}
			want := tt.run(t, l)
			requireExactlyOnceInOrder(t, l.entries(t, "item"), want)
			res, err := l.drain()
			require.NoError(t, err)
			require.Zero(t, res.Replayed)
		})
	}
}
