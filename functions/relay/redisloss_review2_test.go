package relay

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/stream"
)

// review2Seqs counts the entries of the stream per event seq (events only).
func review2Seqs(t *testing.T, entries []stream.Event) map[int]int {
	t.Helper()
	n := map[int]int{}
	for _, e := range events(entries) {
		var p struct {
			Seq int `json:"seq"`
		}
		require.NoError(t, json.Unmarshal([]byte(e.Payload), &p))
		n[p.Seq]++
	}
	return n
}

// review2Missing lists the seqs below want that the stream does not hold.
func review2Missing(seqs map[int]int, want int) []int {
	var out []int
	for i := 0; i < want; i++ {
		if seqs[i] == 0 {
			out = append(out, i)
		}
	}
	sort.Ints(out)
	return out
}

// review2Write adds n entries of someone else (a dead-letter redrive) to
// the stream and returns their ids.
func review2Write(t *testing.T, l *lossBundle, n int) []string {
	t.Helper()
	var ids []string
	for i := 0; i < n; i++ {
		e := stream.Event{EventID: fmt.Sprintf("00000000-0000-4000-9000-%012d", i+1), EventType: "item.changed",
			AggregateType: "item", AggregateID: "z", Payload: `{"redriven": true}`, OccurredAt: time.Now()}
		cmd := l.private.B().Xadd().Key(l.prefix + "item").Id("*").FieldValue()
		f := e.Fields()
		for j := 0; j < len(f); j += 2 {
			cmd = cmd.FieldValue(f[j], f[j+1])
		}
		c := cmd.Build().Pin() // retried below after a reconnection
		id, err := l.private.Do(context.Background(), c).ToString()
		if err != nil {
			id, err = l.private.Do(context.Background(), c).ToString()
		}
		require.NoError(t, err)
		ids = append(ids, id)
	}
	return ids
}

// review2Failover restarts the private Redis from its last SAVE, as a
// failover to a replica that lagged does, and reconnects.
func review2Failover(l *lossBundle) {
	l.server.Stop()
	l.server.Start()
	_ = l.private.Do(context.Background(), l.private.B().Ping().Build()).Error() // reconnect
}

// A stream that the retention trimmer emptied (every entry acknowledged and
// old), then a batch, then a failover to a replica that had the emptied
// stream, then as many writes of someone else as the failover lost: the
// recorded last entry is below recorded-first-entry-id and entries-added is
// not behind, so the loss is taken for trimming and never repaired.
func TestAFailoverOfATrimmedStreamMaskedByOtherWritesIsRepaired(t *testing.T) {
	t.Parallel()
	l := newLossBundle(t)
	l.relayNew(t, 30)
	l.do(t, func(b rueidis.Builder) rueidis.Completed {
		return b.Xtrim().Key(l.prefix + "item").Maxlen().Threshold("0").Build()
	})
	l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Save().Build() })
	l.relayNew(t, 10) // seqs 30..39, lost by the failover
	review2Failover(l)
	review2Write(t, l, 10)
	res := l.relayNew(t, 10)
	seqs := review2Seqs(t, l.entries(t, "item"))
	var missing []int
	for i := 30; i < 50; i++ {
		if seqs[i] == 0 {
			missing = append(missing, i)
		}
	}
	t.Logf("replayed %d; seqs 30..49 missing from the stream: %v", res.Replayed, missing)
	require.Empty(t, missing, "every event relayed since the trim is in the stream")
}

// Same failover, but an operator then removes one bad entry of the other
// writer with XDEL: max-deleted-entry-id is now past the recorded last
// entry, which is taken for deleted, and the 20 lost events never return,
// although the other writer wrote only 2 entries.
func TestAnXDELOfANewerEntryDoesNotHideAFailover(t *testing.T) {
	t.Parallel()
	l := newLossBundle(t)
	l.relayNew(t, 30)
	l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Save().Build() })
	l.relayNew(t, 20) // seqs 30..49, lost by the failover
	review2Failover(l)
	ids := review2Write(t, l, 2)
	l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Xdel().Key(l.prefix + "item").Id(ids[1]).Build() })
	res := l.relayNew(t, 10)
	missing := review2Missing(review2Seqs(t, l.entries(t, "item")), 60)
	t.Logf("replayed %d; missing seqs %v", res.Replayed, missing)
	require.Empty(t, missing)
}

// A failover of a stream the trimmer had cut (its oldest entries gone),
// then fewer writes of someone else than were lost: only the 20 lost events
// must be published again, as for a stream that was never trimmed
// (TestAFailoverFollowedByAnotherWriterRepublishesOnlyWhatWasLost).
func TestAFailoverOfATrimmedStreamRepublishesOnlyWhatWasLost(t *testing.T) {
	t.Parallel()
	l := newLossBundle(t)
	l.relayNew(t, 30)
	l.do(t, func(b rueidis.Builder) rueidis.Completed {
		return b.Xtrim().Key(l.prefix + "item").Maxlen().Threshold("10").Build()
	})
	l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Save().Build() })
	l.relayNew(t, 20) // seqs 30..49, lost
	review2Failover(l)
	review2Write(t, l, 5)
	res := l.relayNew(t, 10)
	seqs := review2Seqs(t, l.entries(t, "item"))
	dup := 0
	for _, n := range seqs {
		if n > 1 {
			dup++
		}
	}
	// Seqs 0..19 were trimmed (read and acknowledged): they may be gone.
	var missing []int
	for _, s := range review2Missing(seqs, 60) {
		if s >= 20 {
			missing = append(missing, s)
		}
	}
	t.Logf("replayed %d (lost 20); %d events twice; missing %v", res.Replayed, dup, missing)
	require.Empty(t, missing)
	require.Equal(t, 20, res.Replayed, "only the two lost batches are published again")
}

// A re-publication after a flush is stopped after its third MULTI (the
// third record fails); Redis had been saved after the first MULTI, and a
// failover then loses the second. The next drain must publish the second
// batch again: its record points at entries Redis no longer holds.
func TestASecondLossDuringAReplayLosesNothing(t *testing.T) {
	t.Parallel()
	l := newLossBundle(t)
	ctx := context.Background()
	l.relayNew(t, 50) // five batches of ten
	batches := l.batches(t)
	require.Len(t, batches, 5)
	l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Flushall().Build() })

	const lockKey = 7702417
	_, err := l.pool.Exec(ctx, fmt.Sprintf(`
		CREATE FUNCTION review2_stop() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
		  IF NEW.replay_from IS NOT NULL AND NEW.replay_from = %[1]d AND NEW.last_ms <> 0 THEN
		    PERFORM pg_advisory_xact_lock(%[3]d); -- after the first MULTI
		  END IF;
		  IF NEW.replay_from IS NOT NULL AND NEW.replay_from > %[2]d THEN
		    RAISE EXCEPTION 'review2: relay stopped mid-replay';
		  END IF;
		  RETURN NEW;
		END $$;
		CREATE TRIGGER review2_stop BEFORE UPDATE ON outbox_streams FOR EACH ROW EXECUTE FUNCTION review2_stop();`,
		batches[1], batches[2], lockKey))
	require.NoError(t, err)
	holder, err := l.pool.Acquire(ctx)
	require.NoError(t, err)
	_, err = holder.Exec(ctx, `SELECT pg_advisory_lock($1)`, lockKey)
	require.NoError(t, err)

	done := make(chan error, 1)
	go func() {
		_, err := l.drain()
		done <- err
	}()
	waitFor(t, 20*time.Second, "the replay waits after its first MULTI", func() bool {
		var waiting bool
		require.NoError(t, l.pool.QueryRow(ctx, `SELECT EXISTS (SELECT FROM pg_locks
			WHERE locktype = 'advisory' AND objid = $1 AND NOT granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))`,
			lockKey).Scan(&waiting))
		return waiting
	})
	t.Logf("saved with %d entries", len(l.entries(t, "item")))
	l.do(t, func(b rueidis.Builder) rueidis.Completed { return b.Save().Build() })
	_, err = holder.Exec(ctx, `SELECT pg_advisory_unlock($1)`, lockKey)
	require.NoError(t, err)
	holder.Release()
	require.Error(t, <-done, "the replay was stopped")
	var from *int64
	var lastMS, lastSeq int64
	require.NoError(t, l.pool.QueryRow(ctx, `SELECT replay_from, last_ms, last_seq FROM outbox_streams`).Scan(&from, &lastMS, &lastSeq))
	require.NotNil(t, from)
	t.Logf("stopped: %d entries, replay_from %d, recorded last %d-%d (batches %v)",
		len(l.entries(t, "item")), *from, lastMS, lastSeq, batches)
	_, err = l.pool.Exec(ctx, `DROP TRIGGER review2_stop ON outbox_streams`)
	require.NoError(t, err)

	review2Failover(l)
	t.Logf("after the failover: %d entries", len(l.entries(t, "item")))
	res := l.relayNew(t, 10)
	missing := review2Missing(review2Seqs(t, l.entries(t, "item")), 60)
	t.Logf("replayed %d; missing seqs %v", res.Replayed, missing)
	require.Empty(t, missing)
}
