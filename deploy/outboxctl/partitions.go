package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/redis/rueidis"

	"github.com/outboxfn/outbox/shared/stream"
)

// errStreamsUnread says the streams of the old number of partitions still
// hold entries a consumer group has not acknowledged.
var errStreamsUnread = errors.New("the streams of the old number of partitions are not fully read")

// Repartitioned is what `outboxctl partitions` did.
type Repartitioned struct {
	// From lists the numbers of partitions the relay's records had.
	From []int
	To   int
	// Forgotten counts the relay's records of streams it deleted.
	Forgotten int64
}

// repartition lets the relay start with STREAM_PARTITIONS=o.partitions
// when its records (outbox_streams) were written with another number: it
// checks that every consumer group has read and acknowledged every entry
// of the streams recorded, then deletes those records, holding the relay's
// drain lock so that no drain runs meanwhile. The relay must be stopped
// first: one still running with the old number writes records of it
// again, and the new relays refuse to start until this is run again.
//
// The old streams and their retained events stay: the relay no longer
// watches them, so what Redis loses of them is not published again, and
// outboxctl replay publishes retained events to the new partitions.
func (o *ops) repartition(ctx context.Context) (Repartitioned, error) {
	r := Repartitioned{To: o.numPartitions()}
	rows, err := o.pool.Query(ctx, `SELECT aggregate_type, partition, partitions FROM outbox_streams
		WHERE partitions <> $1 ORDER BY aggregate_type, partition`, r.To)
	if err != nil {
		return r, fmt.Errorf("read the relay's records: %w", err)
	}
	var names []string
	var typ string
	var p, n int
	_, err = pgx.ForEachRow(rows, []any{&typ, &p, &n}, func() error {
		names = append(names, stream.PartitionName(o.prefix, typ, p, n))
		if len(r.From) == 0 || r.From[len(r.From)-1] != n {
			r.From = append(r.From, n)
		}
		return nil
	})
	if err != nil {
		return r, fmt.Errorf("read the relay's records: %w", err)
	}
	if len(names) == 0 {
		return r, nil
	}
	for _, name := range names {
		if err := o.requireRead(ctx, name); err != nil {
			return r, err
		}
	}
	tx, err := o.pool.Begin(ctx)
	if err != nil {
		return r, fmt.Errorf("forget the old streams: %w", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit it does nothing
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('outbox.relay.drain'))`); err != nil {
		return r, fmt.Errorf("take the relay's drain lock: %w", err)
	}
	tag, err := tx.Exec(ctx, `DELETE FROM outbox_streams WHERE partitions <> $1`, r.To)
	if err != nil {
		return r, fmt.Errorf("forget the old streams: %w", err)
	}
	r.Forgotten = tag.RowsAffected()
	return r, tx.Commit(ctx)
}

// requireRead checks that every group of the stream has read and
// acknowledged all of it. A stream that is gone has nothing left to read.
func (o *ops) requireRead(ctx context.Context, name string) error {
	groups, err := o.redis.Do(ctx, o.redis.B().XinfoGroups().Key(name).Build()).ToArray()
	if re, ok := rueidis.IsRedisErr(err); ok && !rueidis.IsRedisNil(err) && isNoSuchKey(re) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("groups of %s: %w", name, err)
	}
	if len(groups) == 0 {
		// No group has read it: whatever it holds would be stranded.
		n, err := o.redis.Do(ctx, o.redis.B().Xlen().Key(name).Build()).AsInt64()
		if err != nil {
			return fmt.Errorf("length of %s: %w", name, err)
		}
		if n > 0 {
			return fmt.Errorf("%w: %s holds %d entries and no consumer group has read them; keep the relay stopped and "+
				"start sendemail until outboxctl status shows its group at 0 pending and lag 0, then run this again", errStreamsUnread, name, n)
		}
	}
	for _, g := range groups {
		info, err := g.AsMap()
		if err != nil {
			return fmt.Errorf("group of %s: %w", name, err)
		}
		gs := GroupStatus{Name: str(info["name"]), Pending: num(info["pending"]), Lag: -1}
		if lag, ok := info["lag"]; ok && !lag.IsNil() {
			gs.Lag = num(lag)
		}
		if gs.Pending != 0 || gs.Lag != 0 {
			lag := fmt.Sprint(gs.Lag)
			if gs.Lag < 0 {
				lag = "unknown"
			}
			return fmt.Errorf("%w: group %s of %s has %d pending and lag %s; keep the relay stopped and sendemail running until "+
				"outboxctl status shows 0 for both (dead-letter what cannot be sent), then run this again", errStreamsUnread, gs.Name, name, gs.Pending, lag)
		}
	}
	return nil
}

func isNoSuchKey(err *rueidis.RedisError) bool {
	return err != nil && err.Error() == "ERR no such key"
}
