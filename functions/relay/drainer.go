package relay

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outboxfn/outbox/shared/outbox"
	"github.com/outboxfn/outbox/shared/stream"
	"github.com/outboxfn/outbox/shared/telemetry"
)

// The relay's three advisory locks, keyed by hashtext of a name so that
// they are easy to document and to find in pg_locks: as one bigint key,
// classid holds its high 32 bits and objid its low ones, so match them with
// objid::int = hashtext('…').
//
//   - drainLock is held, at session level, by the one relay that drains. It
//     keeps stream order equal to claim order when several relays run.
//   - busyLock is held exclusively while that relay drains with the doorbell
//     off; the outbox trigger's WHEN clause tries it in shared mode and only
//     notifies when it gets it (migration 00002).
//   - claimLock is held in shared mode by every batch's transaction. A relay
//     that has just taken the drain lock waits for it exclusively: the
//     session that held the drain lock may be gone while the batch it
//     claimed ahead, on another connection, is still open, and claiming
//     past that batch's locked rows would publish later rows first. A batch
//     claimed ahead checks, holding the claim lock, that its drain session
//     still holds the drain lock, so that one claimed late cannot slip in
//     after a new drainer has started either.
const (
	drainLock = "hashtext('outbox.relay.drain')"
	busyLock  = "hashtext('outbox.relay.busy')"
	claimLock = "hashtext('outbox.relay.claim')"
)

// Deadlines of the drainer's statements. A silent network must cost a
// statement its deadline, not the relay its drain lock for hours: the
// statement fails, pgx closes the connection, and the server ends the
// session once idle_session_timeout (set while the drain lock is held) or
// idle_in_transaction_session_timeout (set on the relay's pool) passes,
// which releases the locks for a standby.
const (
	statementTimeout = 10 * time.Second
	// SessionIdleTimeout is how long the server keeps the session holding
	// the drain lock when the relay goes silent outside a transaction.
	SessionIdleTimeout = 10 * time.Second
	// busyWait is how long a relay waits for inserters that rang the
	// doorbell to commit before it drains without the busy lock.
	busyWait = 10 * time.Millisecond
	// busyRetry is how long after a timed-out wait for the busy lock the
	// relay only tries it: a transaction that stays open costs one wait a
	// second, not one per drain.
	busyRetry = time.Second
)

// errPastDeadline stops a re-publication at the drain's deadline; its
// progress is recorded, and the next drain goes on from there.
var errPastDeadline = errors.New("past the drain's deadline")

// ErrBusy is returned by Drain when another relay kept the drain lock for
// the whole wait; that relay is draining.
var ErrBusy = errors.New("another relay is draining")

// claimSQL takes the oldest rows and deletes them in the same statement; the
// transaction that runs it commits only after the rows are in the stream.
//
// It says id = ANY(ARRAY(…)), not id IN (…): with IN, the planner joins the
// claimed ids against a sequential scan of the whole table (measured: 54 ms
// per batch of 1000 with 200k rows waiting, so a backlog drains in quadratic
// time); ARRAY(…) runs once as an InitPlan and the delete is an index scan
// (2.3 ms).
const claimSQL = `
DELETE FROM outbox
WHERE id = ANY (ARRAY (SELECT id FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED))
RETURNING id, event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at, tracestate`

// claimAfterSQL is claimSQL for the rows with ids above $2.
const claimAfterSQL = `
DELETE FROM outbox
WHERE id = ANY (ARRAY (SELECT id FROM outbox WHERE id > $2 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED))
RETURNING id, event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at, tracestate`

// recordSQL records, in the batch's transaction, where each stream it wrote
// to stood after it: per batch, for re-publishing the batches a stream lost,
// and per stream, for noticing that it lost any.
const recordSQL = `
WITH u AS (
  SELECT * FROM unnest($1::text[], $3::int[], $4::bigint[], $5::bigint[], $6::bigint[], $7::int[]) AS u (t, events, ms, seq, added, p)),
r AS (
  INSERT INTO outbox_relay_batches (batch, aggregate_type, partition, partitions, events, last_ms, last_seq)
  SELECT $2, t, p, $8, events, ms, seq FROM u)
INSERT INTO outbox_streams AS s (aggregate_type, partition, partitions, batch, last_ms, last_seq, entries_added)
SELECT t, p, $8, $2, ms, seq, added FROM u
ON CONFLICT (aggregate_type, partition) DO UPDATE
SET batch = excluded.batch, last_ms = excluded.last_ms, last_seq = excluded.last_seq,
    entries_added = excluded.entries_added, partitions = excluded.partitions, updated_at = now()`

// Result tells what one drain did.
type Result struct {
	// Relayed counts events added to a stream.
	Relayed int `json:"relayed"`
	// Duplicates counts claimed rows that an interrupted batch had published
	// already; they were deleted without being published again.
	Duplicates int `json:"duplicates_skipped"`
	// Dead counts claimed rows that could not be published (Redis refused
	// them, or their aggregate type names no valid stream); they were moved
	// to the outbox_dead table.
	Dead int `json:"dead"`
	// Batches counts transactions that claimed at least one row.
	Batches int `json:"batches"`
	// Replayed counts retained events published again because Redis had
	// lost them.
	Replayed int `json:"replayed,omitempty"`
	// Unreplicated counts batches that fewer replicas than
	// RELAY_REDIS_WAIT_REPLICAS acknowledged in time; they were committed
	// anyway, and a failover may drop them.
	Unreplicated int `json:"unreplicated_batches,omitempty"`
	// Complete is false when the drain stopped at its deadline with rows
	// possibly left.
	Complete bool `json:"complete"`
	// Writers are the transactions that held a write lock on the outbox
	// when the drain released the busy lock; any of them may commit a row
	// whose doorbell it skipped, so the caller drains again when one ends.
	Writers writers `json:"-"`
}

func (r *Result) add(o Result) {
	r.Relayed += o.Relayed
	r.Duplicates += o.Duplicates
	r.Dead += o.Dead
	r.Batches += o.Batches
	r.Unreplicated += o.Unreplicated
	r.Replayed += o.Replayed
	r.Complete, r.Writers = o.Complete, o.Writers
}

// Drainer moves outbox rows to streams, one batch per transaction.
type Drainer struct {
	pool      *pgxpool.Pool
	publisher *Publisher
	batchSize int
	logger    *slog.Logger

	// sem serialises drains within the process; the drain lock does so
	// across processes.
	sem chan struct{}
	// lockWait bounds the wait for another relay's drain lock.
	lockWait time.Duration
	// busyPause is the pause between short batches while the relay is
	// busy: long enough to let rows accumulate, short enough to keep
	// latency low, and the doorbell off the whole time.
	busyPause time.Duration
	// finish bounds publishing and committing a claimed batch, which runs
	// even after ctx is cancelled so that a batch ends committed or rolled
	// back, never abandoned half-way.
	finish time.Duration
	// busyContended is when the last wait for the busy lock timed out: a
	// transaction that rang the doorbell is staying open. For a while after
	// that the relay only tries the lock, so that each drain does not pay
	// busyWait again.
	busyContended time.Time

	// trimmer, when set, trims the streams after a complete drain, at most
	// every trimEvery: only the relay holding the drain lock trims, so
	// standbys cost Redis nothing.
	trimmer   *Trimmer
	trimEvery time.Duration
	trimmed   time.Time

	// retention is how long relayed events stay in outbox_retained, for
	// publishing again what Redis lost; zero turns retention off.
	retention time.Duration
	purged    time.Time

	// afterPublish, when set by a test, runs between XADD and COMMIT; an
	// error abandons the batch there, as a crash would. beforePublish runs
	// between the claim and XADD.
	afterPublish  func() error
	beforePublish func()

	rows [2][]row // reused between batches, one per connection
	// names interns aggregate and event types, which repeat in every batch.
	names map[string]string
	// partitionKeys caches the stream keys of each aggregate type's
	// partitions (see streamOf), for the claims.
	partitionKeys map[string][]string
	// retainBufs hold each connection's batch encoded for outbox_retained
	// (see retain).
	retainBufs [2][]byte

	tel *instruments
}

// NewDrainer returns a drainer; lockWait bounds the wait for the drain lock.
func NewDrainer(pool *pgxpool.Pool, publisher *Publisher, batchSize int, lockWait time.Duration, logger *slog.Logger) *Drainer {
	return &Drainer{
		pool:          pool,
		publisher:     publisher,
		batchSize:     batchSize,
		logger:        logger,
		sem:           make(chan struct{}, 1),
		lockWait:      lockWait,
		busyPause:     2 * time.Millisecond,
		finish:        5 * time.Second,
		rows:          [2][]row{make([]row, 0, batchSize), make([]row, 0, batchSize)},
		names:         make(map[string]string),
		partitionKeys: make(map[string][]string),
		tel:           newInstruments(telemetry.Providers{}),
	}
}

// Drain moves rows until the outbox is empty, or stopBy (if not zero) has
// passed. This is the protocol, step by step:
//
//  1. Take the drain lock, waiting up to lockWait for another relay's drain.
//  2. Take the busy lock, so that inserters skip the doorbell, if it is
//     free within busyWait. It is not free while a transaction that rang
//     the doorbell stays open (a forgotten BEGIN): then the relay drains
//     with the doorbell on, which costs inserters a NOTIFY each and nobody
//     a delay.
//  3. Drain batches. With the busy lock, a short batch is followed after
//     busyPause by another, and only an empty one ends the phase, so that
//     under steady load the doorbell stays off.
//  4. Release the busy lock, then read which transactions hold a write lock
//     on the outbox (Result.Writers). An inserter that skipped the doorbell
//     did so while the busy lock was held, after it had locked the outbox:
//     now it has either ended, and its commit is visible, or it is listed.
//  5. Drain once more, for rows committed before step 4. If that moved a
//     full batch a burst is on, and the drain goes back to step 2.
//
// The caller watches Result.Writers and drains again when one of them ends.
// Transactions that lock the outbox after step 4 find the busy lock free,
// ring the doorbell, and need no watching.
//
// A drain with a deadline (the HTTP trigger's) waits for another drain of
// this process as for another relay's: up to lockWait and never past
// stopBy, then it returns ErrBusy. A drain without a deadline (the
// background loop's) waits its turn.
func (d *Drainer) Drain(ctx context.Context, stopBy time.Time) (res Result, err error) {
	defer func(start time.Time) { d.tel.drained(ctx, start, res, err) }(time.Now())
	wait := d.lockWait
	var gaveUp <-chan time.Time // never, without a deadline
	if !stopBy.IsZero() {
		wait = min(wait, time.Until(stopBy))
		t := time.NewTimer(wait)
		defer t.Stop()
		gaveUp = t.C
	}
	select {
	case d.sem <- struct{}{}:
	case <-gaveUp:
		return res, ErrBusy
	case <-ctx.Done():
		return res, ctx.Err()
	}
	defer func() { <-d.sem }()
	err = d.drainLocked(ctx, stopBy, wait, &res)
	for range 3 { // a stream each, at most, behind the sequence
		if !errors.Is(err, errEpochRaised) {
			break
		}
		err = d.drainLocked(ctx, stopBy, wait, &res)
	}
	return res, err
}

// errEpochRaised ends a drain whose epoch was behind a stream's in Redis
// although it held the drain lock; the sequence has been moved past it, and
// the next drain's epoch is later.
var errEpochRaised = errors.New("the drain's epoch was behind Redis's and has been raised; drain again")

// drainLocked takes the drain lock and drains (see Drain).
func (d *Drainer) drainLocked(ctx context.Context, stopBy time.Time, wait time.Duration, res *Result) (err error) {
	conn, err := d.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("acquire connection: %w", err)
	}
	defer conn.Release()
	epoch, streams, err := d.lockDrain(ctx, conn, wait)
	if err != nil {
		return err
	}
	// From here on, a failure closes the connection: the server then ends
	// the session and releases its locks, whatever state it was left in.
	defer func() { d.unlock(ctx, conn, err) }()
	defer func() {
		var behind *epochBehindError
		if errors.As(err, &behind) && d.raiseEpoch(ctx, conn, behind) {
			err = errEpochRaised
		}
	}()
	// Only now, holding the drain lock, may the relay take over the
	// streams; the round trip to Redis runs while the first batch is
	// claimed.
	sess := d.publisher.open(ctx, epoch, streams, d.rowsExist)
	defer sess.close()

	for {
		var busy, complete bool
		if busy, err = d.takeBusy(ctx, conn); err != nil {
			return err
		}
		pause := time.Duration(0)
		if busy {
			pause = d.busyPause
		}
		complete, err = d.drainBatches(ctx, conn, sess, stopBy, pause, res)
		if busy {
			if rerr := d.releaseBusy(ctx, conn); err == nil {
				err = rerr
			}
		}
		if err != nil || !complete {
			return err
		}
		if res.Writers, err = outboxWriters(ctx, conn); err != nil {
			return err
		}
		before := res.Relayed + res.Duplicates + res.Dead
		if complete, err = d.drainBatches(ctx, conn, sess, stopBy, 0, res); err != nil || !complete {
			return err
		}
		if res.Relayed+res.Duplicates+res.Dead-before < d.batchSize {
			res.Complete = true
			d.trim(ctx)
			d.purge(ctx, conn)
			return nil
		}
	}
}

// raiseEpoch handles a takeover refused for a later epoch in Redis. If this
// session still holds the drain lock, no other relay drains (a session-level
// lock ends only with its session), so the later epoch comes from a
// PostgreSQL that went back in time: restored to an earlier point, or a new
// database. Then it moves the sequence past the stream's epoch and reports
// true. A relay that lost the lock finds so here and stays superseded.
func (d *Drainer) raiseEpoch(ctx context.Context, conn *pgxpool.Conn, behind *epochBehindError) bool {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), statementTimeout)
	defer cancel()
	if _, err := conn.Exec(ctx, drainLockHeldSQL, conn.Conn().PgConn().PID()); err != nil {
		return false
	}
	if _, err := conn.Exec(ctx, `SELECT setval('outbox_relay_batch', greatest($1::bigint, last_value)) FROM outbox_relay_batch`, behind.epoch); err != nil {
		return false
	}
	d.logger.WarnContext(ctx, "the drain's epoch was behind a stream's in Redis while it held the drain lock: PostgreSQL went back in time (restored, or a new database); moved the sequence outbox_relay_batch past it",
		slog.String("stream", behind.stream), slog.Int64("stream_epoch", behind.epoch))
	return true
}

// trim trims the streams if it is time to. A failure is logged, not
// returned: the drain it follows succeeded, and the next one tries again.
func (d *Drainer) trim(ctx context.Context) {
	if d.trimmer == nil || time.Since(d.trimmed) < d.trimEvery {
		return
	}
	d.trimmed = time.Now()
	ctx, cancel := context.WithTimeout(ctx, statementTimeout)
	defer cancel()
	n, err := d.trimmer.TrimAll(ctx)
	if err != nil {
		d.logger.WarnContext(ctx, "trim streams", slog.Any("error", err))
		return
	}
	if n > 0 {
		d.logger.DebugContext(ctx, "trimmed streams", slog.Int64("entries", n))
	}
}

// lockDrain takes the drain lock, waiting at most wait for another relay
// to let it go, and returns the drain's epoch: a number taken while the
// lock is held, from a sequence, so larger than that of every relay that
// held the lock before (see Publisher). Holding it, the session is ended by
// the server if it stays idle for SessionIdleTimeout, so that a relay cut
// off by the network cannot keep it.
func (d *Drainer) lockDrain(ctx context.Context, conn *pgxpool.Conn, wait time.Duration) (int64, []streamRecord, error) {
	// lock_timeout turns a long wait into an error without cancelling the
	// query, which would cost the connection; SET LOCAL lasts as long as
	// the statements sent together, one implicit transaction. The epoch
	// and the streams' records come in the same round trip, for the
	// takeover.
	sql := fmt.Sprintf(`SET LOCAL lock_timeout = %d; SELECT pg_advisory_lock(%s);
		SELECT pg_advisory_xact_lock(%s); SET idle_session_timeout = %d; %s`,
		max(wait.Milliseconds(), 1), drainLock, claimLock, SessionIdleTimeout.Milliseconds(), epochSQL)
	if d.retention > 0 {
		sql += "; " + recordedStreamsSQL
	}
	ctx, cancel := context.WithTimeout(ctx, wait+statementTimeout)
	defer cancel()
	results, err := conn.Conn().PgConn().Exec(ctx, sql).ReadAll()
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr) && pgErr.Code == "55P03": // lock_not_available
		// A session lock outlives the failed statement that took it: if it
		// was the claim lock that timed out, the drain lock is held.
		if _, err := conn.Exec(ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
			conn.Conn().Close(context.WithoutCancel(ctx)) //nolint:errcheck // the pool discards a closed connection
		}
		return 0, nil, ErrBusy
	case err != nil:
		// Whether the lock was taken is unknown; closing the connection
		// releases it if it was.
		conn.Conn().Close(context.WithoutCancel(ctx)) //nolint:errcheck // the pool discards a closed connection
		return 0, nil, fmt.Errorf("take drain lock: %w", err)
	}
	epoch, err := parseEpoch(results[4].Rows)
	if err != nil {
		d.unlock(ctx, conn, err)
		return 0, nil, fmt.Errorf("take drain epoch: %w", err)
	}
	if d.retention == 0 {
		return epoch, nil, nil
	}
	streams, err := parseStreamRecords(results[len(results)-1].Rows, d.partitions())
	if err != nil {
		d.unlock(ctx, conn, err)
		return 0, nil, fmt.Errorf("read recorded streams: %w", err)
	}
	return epoch, streams, nil
}

// epochSQL numbers a drain. The batches' sequence serves: any number that
// grows from one drain to the next would, and this one lives where the
// drain lock does, so a Redis that forgets cannot take it back.
const epochSQL = `SELECT nextval('outbox_relay_batch')`

func parseEpoch(rows [][][]byte) (int64, error) {
	if len(rows) != 1 || len(rows[0]) != 1 {
		return 0, fmt.Errorf("want one value, got %d rows", len(rows))
	}
	return strconv.ParseInt(string(rows[0][0]), 10, 64)
}

// recordedStreamsSQL reads where PostgreSQL recorded each stream stood.
const recordedStreamsSQL = `SELECT aggregate_type, last_ms, last_seq, entries_added, coalesce(replay_from, -1), partition, partitions FROM outbox_streams`

// ErrPartitionsChanged says PostgreSQL's records show streams written with
// another STREAM_PARTITIONS than the relay's: events of one aggregate would
// go to two streams, and their order between them would be lost.
var ErrPartitionsChanged = errors.New("STREAM_PARTITIONS differs from the number of partitions the relay's records in outbox_streams were written with")

// parseStreamRecords reads recordedStreamsSQL's rows, in the text format
// of the simple protocol that lockDrain's statements go in. A record of
// another number of partitions than partitions is an ErrPartitionsChanged.
func parseStreamRecords(rows [][][]byte, partitions int) ([]streamRecord, error) {
	out := make([]streamRecord, 0, len(rows))
	for _, r := range rows {
		if len(r) != 7 {
			return nil, fmt.Errorf("want 7 columns, got %d", len(r))
		}
		var n [6]int64
		for i := range n {
			v, err := strconv.ParseInt(string(r[i+1]), 10, 64)
			if err != nil {
				return nil, err
			}
			n[i] = v
		}
		if int(n[5]) != partitions {
			return nil, partitionsChanged(partitions, int(n[5]))
		}
		out = append(out, streamRecord{aggregateType: stream.PartitionKey(string(r[0]), int(n[4]), partitions),
			last: streamID{ms: uint64(n[0]), seq: uint64(n[1])}, added: n[2], replayFrom: n[3]})
	}
	return out, nil
}

// checkPartitions returns an ErrPartitionsChanged when PostgreSQL's
// records show a stream written with another number of partitions.
func (d *Drainer) checkPartitions(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, statementTimeout)
	defer cancel()
	var recorded int
	err := d.pool.QueryRow(ctx, `SELECT partitions FROM outbox_streams WHERE partitions <> $1 LIMIT 1`, d.partitions()).Scan(&recorded)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return nil
	case err != nil:
		return fmt.Errorf("check the streams' number of partitions: %w", err)
	}
	return partitionsChanged(d.partitions(), recorded)
}

// partitionsChanged explains an ErrPartitionsChanged and how to switch.
func partitionsChanged(want, recorded int) error {
	return fmt.Errorf("%w: the relay runs with %d, the records say %d. To change the number of partitions: "+
		"stop the relay, let sendemail acknowledge every entry of the old streams (outboxctl status), "+
		"run outboxctl partitions %d with STREAM_PARTITIONS=%d, then start relay, sendemail and outboxctl with it; "+
		"to keep %d, set STREAM_PARTITIONS=%d everywhere", ErrPartitionsChanged, want, recorded, want, want, recorded, recorded)
}

// takeBusy takes the busy lock if it is free within busyWait (or at once,
// while it is contended) and reports whether it did.
func (d *Drainer) takeBusy(ctx context.Context, conn *pgxpool.Conn) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, statementTimeout)
	defer cancel()
	if time.Since(d.busyContended) < busyRetry {
		var got bool
		if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock(`+busyLock+`)`).Scan(&got); err != nil {
			return false, fmt.Errorf("take busy lock: %w", err)
		}
		return got, nil
	}
	_, err := conn.Exec(ctx, fmt.Sprintf(`SET LOCAL lock_timeout = %d; SELECT pg_advisory_lock(%s)`,
		busyWait.Milliseconds(), busyLock))
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "55P03" {
		d.busyContended = time.Now()
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("take busy lock: %w", err)
	}
	return true, nil
}

// releaseBusy releases the busy lock, turning the doorbell back on.
func (d *Drainer) releaseBusy(ctx context.Context, conn *pgxpool.Conn) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), statementTimeout)
	defer cancel()
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_unlock("+busyLock+")"); err != nil {
		return fmt.Errorf("release busy lock: %w", err)
	}
	return nil
}

// unlock ends a drain: it releases every lock of the session and restores
// its idle timeout, or, after a failure or if that fails, closes the
// connection, which does the same. A lock never outlives its drain.
func (d *Drainer) unlock(ctx context.Context, conn *pgxpool.Conn, failed error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if failed == nil {
		if _, err := conn.Exec(ctx, "SELECT pg_advisory_unlock_all(); RESET idle_session_timeout"); err == nil {
			return
		}
	}
	conn.Conn().Close(ctx) //nolint:errcheck // the pool discards a closed connection
}

// writers is a set of transactions that hold a write lock on the outbox,
// by virtual transaction id (unique among running transactions, and not
// soon reused).
type writers map[string]struct{}

// writersSQL lists the transactions, other than the caller's own and those
// of the server pids $1 (the drain's other connection, whose deletes hold
// the lock too but insert nothing), that hold a write lock on this
// database's outbox: those that insert into it. Every INSERT locks the table
// first, and keeps the lock until its transaction ends, after its commit is
// visible. Transactions of other databases, and ones that never touched the
// outbox, are not listed.
const writersSQL = `
SELECT coalesce(array_agg(DISTINCT virtualtransaction), '{}') FROM pg_locks
WHERE locktype = 'relation' AND mode = 'RowExclusiveLock' AND relation = 'outbox'::regclass
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND pid IS DISTINCT FROM pg_backend_pid() AND (pid IS NULL OR pid <> ALL ($1::int[]))`

// querier is the part of a connection or pool that outboxWriters needs.
type querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

func outboxWriters(ctx context.Context, q querier) (writers, error) {
	ctx, cancel := context.WithTimeout(ctx, statementTimeout)
	defer cancel()
	var ids []string
	if err := q.QueryRow(ctx, writersSQL, []int32{}).Scan(&ids); err != nil {
		return nil, fmt.Errorf("read outbox writers: %w", err)
	}
	return writersOf(ids), nil
}

// writersOf is the set of virtual transaction ids ids.
func writersOf(ids []string) writers {
	if len(ids) == 0 {
		return nil
	}
	w := make(writers, len(ids))
	for _, id := range ids {
		w[id] = struct{}{}
	}
	return w
}

// allocatedSQL reads the last id the outbox's sequence handed out: 0 if it
// hands out ids a session caches (which may be used later, below it), or if
// the relay may not read it. It runs before writersSQL, in a statement of
// its own: a writer that takes the outbox's write lock after writersSQL read
// the locks takes its id after this read, above what it returned.
const allocatedSQL = `
SELECT coalesce((SELECT CASE WHEN seqcache = 1 AND has_sequence_privilege(seqrelid, 'SELECT,USAGE')
    THEN pg_sequence_last_value(seqrelid) END
  FROM pg_sequence WHERE seqrelid = pg_get_serial_sequence('outbox', 'id')::regclass), 0)`

// ownPIDs are the server pids of the drain's connections, for writersSQL.
func (d *Drainer) ownPIDs(conns *[2]*pgxpool.Conn) []int32 {
	pids := make([]int32, 0, 2)
	for _, c := range conns {
		if c != nil {
			pids = append(pids, int32(c.Conn().PgConn().PID()))
		}
	}
	return pids
}

// holdsAll reports whether every writer of o is in w.
func (w writers) holdsAll(o writers) bool {
	for id := range o {
		if _, ok := w[id]; !ok {
			return false
		}
	}
	return true
}

// anyEnded reports whether a transaction of w has ended, given the writers
// now.
func (w writers) anyEnded(now writers) bool {
	for id := range w {
		if _, open := now[id]; !open {
			return true
		}
	}
	return false
}

// drainBatches runs batches until one is short (complete) or stopBy
// passed. With a pause, a short batch that was not empty is followed, after
// the pause, by another, and only an empty batch ends the run.
//
// While a full batch is being published to Redis, the next one is claimed on
// a second connection (SKIP LOCKED passes over the rows still locked by the
// first), so the database and Redis work side by side. The next batch is
// published only after the first has committed: stream order is claim
// order, and at most one batch is ever in doubt, which the in-flight marker
// covers. If publishing fails, the batch claimed ahead is rolled back.
func (d *Drainer) drainBatches(ctx context.Context, conn *pgxpool.Conn, sess *session, stopBy time.Time, pause time.Duration, res *Result) (complete bool, err error) {
	conns := [2]*pgxpool.Conn{conn, nil}
	defer func() {
		if conns[1] != nil {
			conns[1].Release()
		}
	}()
	var next *claimed
	defer func() {
		if next != nil {
			next.rollback(ctx)
		}
	}()
	past := func() bool { return !stopBy.IsZero() && time.Now().After(stopBy) }
	for {
		if past() {
			return false, nil
		}
		cur := next
		next = nil
		if cur == nil {
			if cur, err = d.claim(ctx, &conns, 0, 0); err != nil {
				return false, err
			}
		}
		if sess.needsReplay() {
			// What Redis lost goes first; the batch is claimed again after.
			cur.rollback(ctx)
			if err := d.replay(ctx, conn, sess, res, past); err != nil {
				if errors.Is(err, errPastDeadline) {
					return false, nil // the next drain goes on from replay_from
				}
				return false, err
			}
			continue
		}
		n := len(cur.rows)
		if n == 0 {
			cur.rollback(ctx)
		} else {
			var claimErr error
			next, claimErr = d.publishAndCommit(ctx, cur, sess, res, func() (*claimed, error) {
				if n < d.batchSize || past() {
					return nil, nil
				}
				// The batch being published holds its rows locked: a claim
				// from the outbox's start would step over every one of
				// them (SKIP LOCKED), which cost as much PostgreSQL time as
				// retaining the batch. A claim after its last id does not;
				// publishBatch then makes sure it took what a claim from
				// the start would have (see lateBelowSQL).
				return d.claim(ctx, &conns, 1-cur.slot, cur.rows[n-1].ID)
			})
			if errors.Is(claimErr, errReplayNeeded) {
				continue // the batch was rolled back; the replay comes next
			}
			if claimErr != nil {
				return false, claimErr
			}
		}
		switch {
		case n == d.batchSize:
		case n == 0 || pause == 0:
			return true, nil
		default:
			select {
			case <-ctx.Done():
				return false, ctx.Err()
			case <-time.After(pause):
			}
		}
	}
}

// claimed is a batch of rows claimed by an open transaction.
type claimed struct {
	conn  *pgxpool.Conn
	slot  int // which of the drain's connections, and row buffers, it uses
	rows  []row
	open  bool
	batch int64 // its number in outbox_retained; zero without retention
	// after is the id the batch was claimed above; zero for a claim from
	// the outbox's start.
	after int64
	// allocated and writers are what allocatedSQL and writersSQL read
	// just before the claim (see lateBelowSQL).
	writers   writers
	allocated int64
}

func (c *claimed) rollback(ctx context.Context) {
	if !c.open {
		return
	}
	c.open = false
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if _, err := c.conn.Exec(ctx, "ROLLBACK"); err != nil {
		c.conn.Conn().Close(ctx) //nolint:errcheck // the pool discards a closed connection
	}
}

// drainLockHeldSQL fails (division by zero) unless the session with pid $1
// holds the drain lock.
const drainLockHeldSQL = `SELECT 1 / count(*) FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND pid = $1::int
  AND objid::bigint = (` + drainLock + `::bigint & 4294967295)
  AND classid::bigint = (` + drainLock + `::bigint >> 32 & 4294967295)
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`

// claim begins a transaction on connection slot (acquiring it from the pool
// the first time) and claims up to batchSize rows with ids above after (any
// when it is zero), sorted by id.
func (d *Drainer) claim(ctx context.Context, conns *[2]*pgxpool.Conn, slot int, after int64) (*claimed, error) {
	if conns[slot] == nil {
		conn, err := d.pool.Acquire(ctx)
		if err != nil {
			return nil, fmt.Errorf("acquire connection: %w", err)
		}
		conns[slot] = conn
	}
	c := &claimed{conn: conns[slot], slot: slot, open: true, after: after}
	ctx, cancel := context.WithTimeout(ctx, statementTimeout)
	defer cancel()
	// BEGIN and the claim lock go out with the claim, in one round trip.
	b := &pgx.Batch{}
	b.Queue("BEGIN")
	b.Queue("SELECT pg_advisory_xact_lock_shared(" + claimLock + ")")
	if slot != 0 {
		b.Queue(drainLockHeldSQL, conns[0].Conn().PgConn().PID())
	}
	if d.retention > 0 {
		b.Queue("SELECT nextval('outbox_relay_batch')")
	}
	allocatedAt := b.Len()
	b.Queue(allocatedSQL)
	b.Queue(writersSQL, d.ownPIDs(conns))
	if after > 0 {
		b.Queue(claimAfterSQL, d.batchSize, after)
	} else {
		b.Queue(claimSQL, d.batchSize)
	}
	results := c.conn.SendBatch(ctx, b)
	for i := range b.Len() - 1 {
		var err error
		switch {
		case i == allocatedAt:
			err = results.QueryRow().Scan(&c.allocated)
		case i == allocatedAt+1:
			var ids []string
			if err = results.QueryRow().Scan(&ids); err == nil {
				c.writers = writersOf(ids)
			}
		case d.retention > 0 && i == allocatedAt-1:
			err = results.QueryRow().Scan(&c.batch)
		default:
			_, err = results.Exec()
		}
		if err != nil {
			results.Close()
			c.rollback(ctx)
			return nil, fmt.Errorf("begin batch: %w", err)
		}
	}
	rows, err := results.Query()
	if err != nil {
		results.Close()
		c.rollback(ctx)
		return nil, fmt.Errorf("claim batch: %w", err)
	}
	batch, err := d.readRows(rows, d.rows[slot][:0])
	if err == nil {
		err = results.Close()
	}
	if err != nil {
		c.rollback(ctx)
		return nil, fmt.Errorf("claim batch: %w", err)
	}
	// DELETE … RETURNING does not promise an order.
	slices.SortFunc(batch, func(a, b row) int { return cmp.Compare(a.ID, b.ID) })
	c.rows, d.rows[slot] = batch, batch[:0]
	return c, nil
}

// publishBatch publishes cur and commits its delete; while the publish
// is under way it calls claimNext, whose batch it returns. It finishes cur
// even if ctx is cancelled (SIGTERM), within d.finish: a claimed batch ends
// committed or rolled back, never abandoned half-way.
func (d *Drainer) publishBatch(ctx context.Context, cur *claimed, sess *session, res *Result, claimNext func() (*claimed, error)) (*claimed, error) {
	finishCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), d.finish)
	defer cancel()
	type outcome struct {
		published
		err error
	}
	done := make(chan outcome, 1)
	go func() {
		if d.beforePublish != nil {
			d.beforePublish()
		}
		p, err := sess.publish(finishCtx, cur.rows)
		done <- outcome{p, err}
	}()
	retained := make(chan error, 1)
	if d.retention > 0 {
		// The batch's transaction is idle while Redis takes the batch:
		// it keeps the copy meanwhile.
		go func() { retained <- d.retain(finishCtx, cur) }()
	} else {
		retained <- nil
	}
	next, claimErr := claimNext()
	p := <-done
	if err := <-retained; p.err == nil {
		p.err = err
	}
	if p.err == nil && d.afterPublish != nil {
		p.err = d.afterPublish()
	}
	if p.err == nil && len(p.refused) > 0 {
		p.err = d.bury(finishCtx, cur, p.refused)
	}
	if p.err != nil {
		cur.rollback(ctx)
		if next != nil {
			next.rollback(ctx)
		}
		return nil, p.err
	}
	var ahead *claimed
	if next != nil && next.after > 0 {
		ahead = next
	}
	late, err := d.commit(finishCtx, cur, p.streams, p.refused, ahead)
	cur.open = false
	if err == nil && late {
		// A row below the batch claimed ahead committed after the batch
		// just committed was claimed: it goes first, so the batch ahead is
		// given back and claimed again from the start.
		next.rollback(ctx)
		next = nil
	}
	if err != nil {
		// The rows may or may not be gone; they stay in flight, in the
		// session and in the marker in Redis, so a re-claim does not
		// publish them again.
		cur.conn.Conn().Close(finishCtx) //nolint:errcheck // the pool discards a closed connection
		if next != nil {
			next.rollback(ctx)
		}
		return nil, fmt.Errorf("commit batch: %w", err)
	}
	sess.committed(cur.rows)
	res.Batches++
	if p.unreplicated {
		res.Unreplicated++
	}
	res.Relayed += p.added
	res.Dead += len(p.refused)
	res.Duplicates += len(cur.rows) - p.added - len(p.refused)
	return next, claimErr
}

// lateBelowSQL tells whether a row with an id up to $1 is left in the
// outbox. It runs right after a batch commits, when the batch claimed ahead
// of it (the rows above $1) is in hand and not yet published. Every row up
// to $1 was then either in the batch just committed, or is a row that
// committed after that batch was claimed: its writer began before (its id is
// lower) and committed late. A claim from the start would have taken such a
// row first, and a writer of the same aggregate who began after it
// committed may have its event in the batch ahead; so the batch ahead is
// published only if there is none. With this check the claim after the
// batch in flight takes exactly what a claim from the start would have,
// without stepping over the batch's locked rows.
//
// It reads the index from the start (as the planner would not for
// EXISTS (…) with a generic plan: a scan of the whole table per batch),
// passing the batch just committed, whose entries cannot be marked dead
// while the batch ahead's older snapshot is open: about as costly as the
// claim from the start it replaces. So it runs only when a late row is
// possible (needsLateCheck): a late row's writer held the outbox's write
// lock when the committed batch was claimed (writersSQL; it had its id by
// then, since ids are handed out in order and the batch's last id was
// committed before the claim), unless it took the lock after allocatedSQL
// read the sequence, and with it an id above the value read; and it has
// ended since. With a snapshot held open somewhere in the database the scan
// passes every row deleted since, as the claim from the start did.
//
// A row another transaction holds locked is passed over (SKIP LOCKED), as a
// claim from the start would: it must not send every batch ahead back.
const lateBelowSQL = `SELECT id FROM outbox WHERE id <= $1 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED`

// needsLateCheck reports whether rows up to ahead.after may have committed
// late (see lateBelowSQL), given the outbox's writers now.
func needsLateCheck(cur, ahead *claimed, now writers) bool {
	return cur.allocated <= 0 || ahead.after > cur.allocated || cur.writers.anyEnded(now)
}

// commit records where the batch left each stream (with retention on) and
// commits, in one round trip. With a batch claimed ahead after c's last id,
// it also reports whether a row up to that id is left in the outbox
// (lateBelowSQL): in the same round trip it reads the outbox's writers, and
// only if a late row is possible does it look, in a second.
func (d *Drainer) commit(ctx context.Context, c *claimed, streams []batchRecord, refused map[int]string, ahead *claimed) (late bool, err error) {
	b := &pgx.Batch{}
	if d.retention > 0 && len(streams) > 0 {
		n := len(streams)
		retained := make(map[string]int32, n)
		for i := range c.rows {
			if _, dead := refused[i]; !dead {
				retained[c.rows[i].stream]++
			}
		}
		types, events, parts := make([]string, n), make([]int32, n), make([]int32, n)
		ms, seqs, added := make([]int64, n), make([]int64, n), make([]int64, n)
		for i, r := range streams {
			t, p, err := stream.SplitKey(r.aggregateType, d.partitions())
			if err != nil {
				return false, fmt.Errorf("record streams: %w", err)
			}
			types[i], events[i], parts[i] = t, retained[r.aggregateType], int32(p)
			ms[i], seqs[i], added[i] = int64(r.last.ms), int64(r.last.seq), r.added
		}
		b.Queue(recordSQL, types, c.batch, events, ms, seqs, added, parts, d.partitions())
	}
	b.Queue("COMMIT")
	records := b.Len() - 1
	// The writers now matter only if there were some at the claim.
	readNow := ahead != nil && len(c.writers) > 0
	if readNow {
		b.Queue(writersSQL, []int32{int32(ahead.conn.Conn().PgConn().PID())})
	}
	results := c.conn.SendBatch(ctx, b)
	defer results.Close()
	for range records {
		if _, err := results.Exec(); err != nil {
			return false, fmt.Errorf("record streams: %w", err)
		}
	}
	tag, err := results.Exec()
	if err == nil && tag.String() != "COMMIT" {
		err = fmt.Errorf("transaction was rolled back (%s)", tag)
	}
	var now []string
	if err == nil && readNow {
		if err = results.QueryRow().Scan(&now); err != nil {
			err = fmt.Errorf("read the outbox's writers: %w", err)
		}
	}
	if err == nil {
		err = results.Close()
	}
	if err == nil && ahead != nil && needsLateCheck(c, ahead, writersOf(now)) {
		// The batch has committed: a failed look only means the batch
		// ahead is given back, as if it had found a row.
		var id int64
		switch lerr := c.conn.QueryRow(ctx, lateBelowSQL, ahead.after).Scan(&id); {
		case errors.Is(lerr, pgx.ErrNoRows):
		case lerr != nil:
			d.logger.WarnContext(ctx, "look for rows below the batch claimed ahead; claiming from the start", slog.Any("error", lerr))
			late = true
		default:
			late = true
		}
	}
	return late, err
}

// bury moves the rows that could not be published to outbox_dead, in the
// transaction that claimed them: they leave the outbox only for a place
// where `outboxctl status` shows them and `outboxctl outbox-dead requeue`
// returns them.
func (d *Drainer) bury(ctx context.Context, c *claimed, refused map[int]string) error {
	n := len(refused)
	ids, eventIDs, reasons := make([]int64, 0, n), make([]string, 0, n), make([]string, 0, n)
	types, aggregates, eventTypes := make([]string, 0, n), make([]string, 0, n), make([]string, 0, n)
	payloads, traceparents, created := make([]string, 0, n), make([]*string, 0, n), make([]pgtype.Timestamptz, 0, n)
	tracestates := make([]*string, 0, n)
	for i, reason := range refused {
		r := &c.rows[i]
		ids, eventIDs, reasons = append(ids, r.ID), append(eventIDs, r.eventIDString()), append(reasons, reason)
		types, aggregates, eventTypes = append(types, r.AggregateType), append(aggregates, r.AggregateID), append(eventTypes, r.EventType)
		payloads, traceparents, created = append(payloads, string(r.Payload)), append(traceparents, r.Traceparent), append(created, pgtype.Timestamptz{Time: r.CreatedAt, InfinityModifier: r.Infinite, Valid: true})
		tracestates = append(tracestates, r.Tracestate)
	}
	_, err := c.conn.Exec(ctx, `
		INSERT INTO outbox_dead (id, event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at, error, tracestate)
		SELECT id, event_id, aggregate_type, aggregate_id, event_type, payload::json, traceparent, created_at, error, tracestate
		FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::timestamptz[], $9::text[], $10::text[])
		  AS t (id, event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at, error, tracestate)`,
		ids, eventIDs, types, aggregates, eventTypes, payloads, traceparents, created, reasons, tracestates)
	if err == nil && d.retention > 0 {
		// They were retained with the batch (see retain); not being in a
		// stream, they must not be published again from there.
		err = d.unretain(ctx, c, refused)
	}
	if err != nil {
		return fmt.Errorf("move %d unpublishable events to outbox_dead: %w", n, err)
	}
	d.logger.ErrorContext(ctx, "events could not be published; moved to outbox_dead (see outboxctl outbox-dead list)",
		slog.Int("events", n), slog.String("first_error", reasons[0]))
	return nil
}

// unretain stores the batch's events again without the refused ones, or
// removes the batch from outbox_retained if it keeps none.
func (d *Drainer) unretain(ctx context.Context, c *claimed, refused map[int]string) error {
	kept := make([]row, 0, len(c.rows)-len(refused))
	for i := range c.rows {
		if _, dead := refused[i]; !dead {
			kept = append(kept, c.rows[i])
		}
	}
	var err error
	if len(kept) == 0 {
		_, err = c.conn.Exec(ctx, `DELETE FROM outbox_retained WHERE batch = $1`, c.batch)
	} else {
		_, err = c.conn.Exec(ctx, `UPDATE outbox_retained SET events = $2, oldest = $3, data = $4 WHERE batch = $1`,
			c.batch, len(kept), oldestOf(kept), appendRetained(nil, kept))
	}
	if err != nil {
		return fmt.Errorf("retain the batch without them: %w", err)
	}
	return nil
}

// rowsExist returns the aggregate types of those of ids that are rows of
// the outbox, on a pooled connection of its own: it runs beside the first
// claim of a drain.
func (d *Drainer) rowsExist(ctx context.Context, ids []int64) (map[int64]string, error) {
	rows, err := d.pool.Query(ctx, `SELECT id, aggregate_type, aggregate_id FROM outbox WHERE id = ANY ($1)`, ids)
	if err != nil {
		return nil, err
	}
	exist := make(map[int64]string)
	var id int64
	var t, aggregate string
	n := d.partitions()
	_, err = pgx.ForEachRow(rows, []any{&id, &t, &aggregate}, func() error {
		// Not streamOf: its cache belongs to the claim running beside.
		exist[id] = stream.PartitionKey(t, stream.Partition(aggregate, n), n)
		return nil
	})
	return exist, err
}

// replay publishes again, in order, the retained events of every stream the
// session found short of what PostgreSQL recorded, and records where the
// streams stand then. It runs between batches on the drain's own
// connection, which must not sit idle meanwhile: the server would end its
// session after SessionIdleTimeout, and the drain lock with it.
func (d *Drainer) replay(ctx context.Context, conn *pgxpool.Conn, sess *session, res *Result, past func() bool) error {
	for len(sess.lost) > 0 {
		l := sess.lost[0]
		n, err := d.replayStream(ctx, conn, sess, l, past)
		res.Replayed += n
		if err != nil {
			return fmt.Errorf("publish %s again: %w", d.publisher.streamName(l.aggregateType), err)
		}
		sess.lost = sess.lost[1:]
	}
	return nil
}

// replayStream publishes again the batches of one stream that Redis lost:
// every retained batch after the newest one recorded at or before what the
// stream kept (all of them when it kept nothing), from the first unfinished
// one if an earlier re-publication was interrupted. outbox_streams.replay_from
// says how far it got, so that an interrupted one is taken up again by the
// next drain, of this relay or another.
func (d *Drainer) replayStream(ctx context.Context, conn *pgxpool.Conn, sess *session, l lostStream, past func() bool) (int, error) {
	start := time.Now()
	t := l.aggregateType
	typ, part, err := stream.SplitKey(t, d.partitions())
	if err != nil {
		return 0, err
	}
	parts := d.partitions()
	exec := func(sql string, args ...any) error {
		ctx, cancel := context.WithTimeout(ctx, statementTimeout)
		defer cancel()
		_, err := conn.Exec(ctx, sql, args...)
		return err
	}
	// Batches are recorded in the order they were published: the stream
	// kept those whose last entry is at or below what it kept, except the
	// ones an unfinished re-publication had not yet reached.
	var newest int64
	qctx, cancel := context.WithTimeout(ctx, statementTimeout)
	err = conn.QueryRow(qctx, `SELECT coalesce((SELECT batch FROM outbox_relay_batches
		WHERE aggregate_type = $1 AND partition = $5 AND partitions = $6
		  AND (last_ms, last_seq) <= ($2, $3) AND ($4 < 0 OR batch < $4) ORDER BY batch DESC LIMIT 1), -1)`,
		typ, int64(l.kept.ms), int64(l.kept.seq), l.replayFrom, part, parts).Scan(&newest)
	cancel()
	if err != nil {
		return 0, fmt.Errorf("find the first lost batch: %w", err)
	}
	from := newest + 1
	if l.replayFrom >= 0 && l.replayFrom < from {
		from = l.replayFrom
	}
	if err := exec(`UPDATE outbox_streams SET replay_from = $2, updated_at = now() WHERE aggregate_type = $1 AND partition = $3`, typ, from, part); err != nil {
		return 0, fmt.Errorf("mark the re-publication: %w", err)
	}
	n, batches := 0, 0
	last, added := l.kept, sess.added[t]
	for next := from; ; {
		if past() {
			d.logger.WarnContext(ctx, "publishing lost events again: stopped at the drain's deadline; the next drain goes on",
				slog.String("stream", d.publisher.streamName(t)), slog.Int("events", n), slog.Int64("next_batch", next))
			return n, errPastDeadline
		}
		events, numbers, end, err := d.retained(ctx, conn, t, next)
		if err != nil {
			return n, err
		}
		if end < 0 {
			break
		}
		next = end + 1
		if len(events) == 0 {
			continue
		}
		ids, a, err := sess.republish(ctx, t, events)
		if err != nil {
			return n, err
		}
		// Each batch's record now points at where its events are.
		var bs, ms, seqs []int64
		for i, b := range numbers {
			if len(bs) == 0 || bs[len(bs)-1] != b {
				bs, ms, seqs = append(bs, b), append(ms, 0), append(seqs, 0)
				batches++
			}
			ms[len(ms)-1], seqs[len(seqs)-1] = int64(ids[i].ms), int64(ids[i].seq)
		}
		if err := exec(`
			WITH u AS (UPDATE outbox_relay_batches b SET last_ms = u.ms, last_seq = u.seq
			  FROM unnest($2::bigint[], $3::bigint[], $4::bigint[]) AS u (batch, ms, seq)
			  WHERE b.aggregate_type = $1 AND b.partition = $9 AND b.batch = u.batch)
			UPDATE outbox_streams SET replay_from = $5, last_ms = $6, last_seq = $7, entries_added = $8, updated_at = now()
			WHERE aggregate_type = $1 AND partition = $9`,
			typ, bs, ms, seqs, next, int64(ids[len(ids)-1].ms), int64(ids[len(ids)-1].seq), max(a, 0), part); err != nil {
			return n, fmt.Errorf("record the re-publication: %w", err)
		}
		n += len(events)
		last, added = ids[len(ids)-1], a
	}
	switch {
	case n == 0 && l.gone:
		// Nothing retained to publish; forget the stream, so that the
		// next event creates it afresh.
		err = exec(`DELETE FROM outbox_streams WHERE aggregate_type = $1 AND partition = $2`, typ, part)
		delete(sess.added, t)
	case n == 0:
		// Nothing retained to publish: the stream as it is becomes the
		// reference.
		last = l.current
		fallthrough
	default:
		err = exec(`UPDATE outbox_streams SET replay_from = NULL, last_ms = $2, last_seq = $3, entries_added = $4, updated_at = now()
			WHERE aggregate_type = $1 AND partition = $5`, typ, int64(last.ms), int64(last.seq), max(added, 0), part)
		sess.added[t] = max(added, 0)
	}
	if err != nil {
		return n, fmt.Errorf("record the re-publication: %w", err)
	}
	d.logger.WarnContext(ctx, "Redis had lost events; published them again from PostgreSQL",
		slog.String("stream", d.publisher.streamName(t)), slog.String("why", l.why),
		slog.Int("events", n), slog.Int("batches", batches), slog.Int64("from_batch", from),
		slog.Duration("took", time.Since(start)))
	return n, nil
}

// retained reads the retained events of the stream of key t in the run of
// batches that starts at from and holds about a batch of events, in
// publication order, with their batch numbers. It returns the run's last
// batch, or -1 when no batch is retained from there on. With partitions,
// the run's batches hold events of the type's other streams too, which it
// leaves out.
func (d *Drainer) retained(ctx context.Context, conn *pgxpool.Conn, t string, from int64) ([]row, []int64, int64, error) {
	n := d.partitions()
	typ, part, err := stream.SplitKey(t, n)
	if err != nil {
		return nil, nil, -1, err
	}
	ctx, cancel := context.WithTimeout(ctx, statementTimeout)
	defer cancel()
	_, last, ok, err := outbox.RetainedPartitionRun(ctx, conn, typ, part, n, from, math.MaxInt64, d.batchSize)
	if err != nil || !ok {
		return nil, nil, -1, err
	}
	retained, err := outbox.ReadRetained(ctx, conn, typ, from, last)
	if err != nil {
		return nil, nil, -1, err
	}
	events := make([]row, 0, len(retained))
	numbers := make([]int64, 0, len(retained))
	for i := range retained {
		e := &retained[i]
		if stream.Partition(e.AggregateID, n) != part {
			continue
		}
		events = append(events, row{ID: e.ID, EventID: e.EventID, AggregateType: e.AggregateType, AggregateID: e.AggregateID,
			EventType: e.EventType, Payload: e.Payload, Traceparent: e.Traceparent, Tracestate: e.Tracestate,
			CreatedAt: e.CreatedAt, Infinite: e.Infinite, stream: t})
		numbers = append(numbers, e.Batch)
	}
	return events, numbers, last, nil
}

// Purging: the draining relay deletes retained events past the retention
// window at most every purgeEvery, purgeChunk rows per statement, for at
// most purgeFor each time, so that no statement holds locks or writes WAL
// for long and a backlog of purging is worked off over several drains.
const (
	purgeEvery = time.Minute
	purgeChunk = 5000
	purgeFor   = time.Second
)

// purge deletes retained events, and their batches' records, past the
// retention window (all of them when retention is off). A failure is
// logged: the drain it follows succeeded, and the next purge tries again.
func (d *Drainer) purge(ctx context.Context, conn *pgxpool.Conn) {
	if time.Since(d.purged) < purgeEvery {
		return
	}
	d.purged = time.Now()
	deleted, err := d.purgeOld(ctx, conn)
	if err != nil {
		d.logger.WarnContext(ctx, "purge retained events", slog.Any("error", err))
		return
	}
	if deleted > 0 {
		d.logger.DebugContext(ctx, "purged retained events", slog.Int64("events", deleted))
	}
}

func (d *Drainer) purgeOld(ctx context.Context, conn *pgxpool.Conn) (int64, error) {
	stop := time.Now().Add(purgeFor)
	horizon := fmt.Sprintf("%d milliseconds", d.retention.Milliseconds())
	ctx, cancel := context.WithTimeout(ctx, purgeFor+statementTimeout)
	defer cancel()
	var newest *int64
	if err := conn.QueryRow(ctx, `SELECT max(batch) FROM outbox_relay_batches WHERE relayed_at < now() - $1::interval`,
		horizon).Scan(&newest); err != nil {
		return 0, fmt.Errorf("find the purge horizon: %w", err)
	}
	if newest == nil {
		return 0, nil
	}
	// Oldest first, a run of batches of about purgeChunk events at a time;
	// the batches' records go after their events.
	var deleted int64
	for time.Now().Before(stop) {
		first, last, ok, err := outbox.RetainedRun(ctx, conn, "", math.MinInt64, *newest, purgeChunk)
		if err != nil {
			return deleted, fmt.Errorf("purge: %w", err)
		}
		if !ok {
			break
		}
		// From the run's first batch: a BRIN scan of "batch <= last" would
		// read again every range purged before and not yet vacuumed.
		tag, err := conn.Exec(ctx, `DELETE FROM outbox_relayed_rows WHERE batch BETWEEN $1 AND $2`, first, last)
		if err != nil {
			return deleted, fmt.Errorf("purge outbox_relayed_rows: %w", err)
		}
		deleted += tag.RowsAffected()
		var events int64
		if err := conn.QueryRow(ctx, `WITH d AS (DELETE FROM outbox_retained WHERE batch BETWEEN $1 AND $2 RETURNING events)
			SELECT coalesce(sum(events), 0) FROM d`, first, last).Scan(&events); err != nil {
			return deleted, fmt.Errorf("purge outbox_retained: %w", err)
		}
		deleted += events
		if _, err := conn.Exec(ctx, `DELETE FROM outbox_relay_batches WHERE batch <= $1`, last); err != nil {
			return deleted, fmt.Errorf("purge outbox_relay_batches: %w", err)
		}
	}
	return deleted, nil
}
