package relay

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The relay's two advisory locks, keyed by hashtext of a name so that they
// are easy to find in pg_locks (objid holds the key) and to document:
//
//   - drainLock is held, at session level, by the one relay that drains. It
//     keeps stream order equal to outbox order when several relays run.
//   - busyLock is held exclusively while that relay drains with the doorbell
//     off; the outbox trigger's WHEN clause tries it in shared mode and only
//     notifies when it gets it (migration 00002).
const (
	drainLock = "hashtext('outbox.relay.drain')"
	busyLock  = "hashtext('outbox.relay.busy')"
)

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
RETURNING id, event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at`

// row is one claimed outbox row.
type row struct {
	ID            int64
	EventID       eventID
	AggregateType string
	AggregateID   string
	EventType     string
	Payload       []byte
	Traceparent   *string
	CreatedAt     time.Time
}

func (r *row) eventIDString() string { return uuid.UUID(r.EventID).String() }

// Result tells what one drain did.
type Result struct {
	// Relayed counts events added to a stream.
	Relayed int `json:"relayed"`
	// Duplicates counts claimed rows that an interrupted batch had published
	// already; they were deleted without being published again.
	Duplicates int `json:"duplicates_skipped"`
	// Batches counts transactions that claimed at least one row.
	Batches int `json:"batches"`
	// Complete is false when the drain stopped at its deadline with rows
	// possibly left.
	Complete bool `json:"complete"`
	// Lingering holds transactions that were still open when the drain
	// ended; any of them may have written a row without ringing the doorbell.
	Lingering []int64 `json:"-"`
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

	// afterPublish, when set by a test, runs between XADD and COMMIT; an
	// error abandons the batch there, as a crash would. beforePublish runs
	// between the claim and XADD.
	afterPublish  func() error
	beforePublish func()

	rows [2][]row // reused between batches, one per connection
}

// NewDrainer returns a drainer; lockWait bounds the wait for the drain lock.
func NewDrainer(pool *pgxpool.Pool, publisher *Publisher, batchSize int, lockWait time.Duration, logger *slog.Logger) *Drainer {
	return &Drainer{
		pool:      pool,
		publisher: publisher,
		batchSize: batchSize,
		logger:    logger,
		sem:       make(chan struct{}, 1),
		lockWait:  lockWait,
		busyPause: 2 * time.Millisecond,
		finish:    5 * time.Second,
		rows:      [2][]row{make([]row, 0, batchSize), make([]row, 0, batchSize)},
	}
}

// Drain moves rows until the outbox is empty, or stopBy (if not zero) has
// passed.
//
// It works in two phases. First, holding busyLock so that inserters skip the
// doorbell, it drains; while batches keep coming back non-empty it stays in
// this phase, pausing busyPause between short batches, so that a relay under
// steady load keeps the doorbell off altogether. Once a batch comes back
// empty it releases busyLock, takes a snapshot, and drains again with the
// doorbell on. Any transaction whose trigger skipped the doorbell did so
// while busyLock was held, so it had an xid before that snapshot: either it
// committed before the second phase reads, or it is in Result.Lingering,
// which the caller watches and drains again for when it ends. Transactions
// that start later ring the doorbell as usual.
//
// A drain with a deadline (the HTTP trigger's) waits for another drain of
// this process as it waits for another relay's drain lock: up to lockWait,
// and never past stopBy, then it returns ErrBusy. A drain that keeps going
// that long drains until the outbox is empty; one that is failing (Redis
// down) ends at once and lets this one try, and fail, for itself. A drain
// without a deadline (the background loop's) waits its turn.
func (d *Drainer) Drain(ctx context.Context, stopBy time.Time) (Result, error) {
	var res Result
	var gaveUp <-chan time.Time
	if !stopBy.IsZero() {
		t := time.NewTimer(min(d.lockWait, time.Until(stopBy)))
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
	conn, err := d.pool.Acquire(ctx)
	if err != nil {
		return res, fmt.Errorf("acquire connection: %w", err)
	}
	defer conn.Release()
	busy, err := d.lock(ctx, conn)
	if err != nil {
		return res, err
	}
	defer d.unlock(ctx, conn, drainLock)
	// Only now, holding the drain lock, may the relay take over the
	// streams; the round trip to Redis runs while the first batch is
	// claimed.
	sess := d.publisher.open(ctx, d.rowsExist)
	defer sess.close()

	for {
		if !busy {
			if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock("+busyLock+")"); err != nil {
				return res, fmt.Errorf("take busy lock: %w", err)
			}
		}
		complete, err := d.drainBatches(ctx, conn, sess, stopBy, d.busyPause, &res)
		releaseErr := d.releaseBusy(ctx, conn)
		busy = false
		if err != nil || !complete {
			return res, err
		}
		if releaseErr != nil {
			return res, releaseErr
		}
		var open []int64
		if err := conn.QueryRow(ctx,
			`SELECT coalesce(array_agg(x::text::bigint), '{}') FROM pg_snapshot_xip(pg_current_snapshot()) AS x`).Scan(&open); err != nil {
			return res, fmt.Errorf("read open transactions: %w", err)
		}
		before := res.Relayed + res.Duplicates
		complete, err = d.drainBatches(ctx, conn, sess, stopBy, 0, &res)
		if err != nil || !complete {
			return res, err
		}
		// A full batch after the busy phase means a burst is on: drain it
		// with the doorbell off again rather than let every insert ring.
		if res.Relayed+res.Duplicates-before < d.batchSize {
			res.Complete, res.Lingering = true, open
			return res, nil
		}
	}
}

// lock takes the drain lock and, if it got it at once, the busy lock, in
// one round trip; otherwise it waits for the drain lock (up to lockWait)
// and reports busy as false.
func (d *Drainer) lock(ctx context.Context, conn *pgxpool.Conn) (busy bool, err error) {
	// CASE evaluates its condition first, so the busy lock is only taken
	// with the drain lock.
	err = conn.QueryRow(ctx, `SELECT CASE WHEN pg_try_advisory_lock(`+drainLock+`)
		THEN (SELECT true FROM pg_advisory_lock(`+busyLock+`)) ELSE false END`).Scan(&busy)
	if err != nil {
		return false, fmt.Errorf("take drain lock: %w", err)
	}
	if busy {
		return true, nil
	}
	return false, d.lockDrain(ctx, conn)
}

// lockDrain waits at most lockWait for another relay to release the drain
// lock, and takes it.
func (d *Drainer) lockDrain(ctx context.Context, conn *pgxpool.Conn) error {
	if d.lockWait <= 0 {
		return ErrBusy
	}
	// lock_timeout turns a long wait into an error without cancelling the
	// query, which would cost the connection.
	_, err := conn.Exec(ctx, fmt.Sprintf("SET lock_timeout = %d; SELECT pg_advisory_lock(%s); RESET lock_timeout",
		d.lockWait.Milliseconds(), drainLock))
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "55P03" { // lock_not_available
		if _, rerr := conn.Exec(ctx, "RESET lock_timeout"); rerr != nil {
			conn.Conn().Close(ctx) //nolint:errcheck // the pool discards a closed connection
		}
		return ErrBusy
	}
	if err != nil {
		return fmt.Errorf("wait for drain lock: %w", err)
	}
	return nil
}

// releaseBusy releases busyLock, turning the doorbell back on.
//
// A snapshot lists in xip only the transactions below its xmax, which is
// one past the latest xid to complete, not the next xid to be assigned. An
// inserter that skipped the doorbell may hold the newest xid of all, and no
// later one may have completed yet: it would be in progress without being
// listed, and its row would wait for the next wake-up. So the statement
// that releases the lock then takes an xid and commits (one round trip, and
// no WAL flush, as it writes nothing): that xid is above every skipper's,
// and once it has completed, so is the xmax of any later snapshot. If it
// fails, the connection is closed, which releases the lock too.
func (d *Drainer) releaseBusy(ctx context.Context, conn *pgxpool.Conn) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_unlock("+busyLock+"); SELECT pg_current_xact_id()"); err != nil {
		conn.Conn().Close(ctx) //nolint:errcheck // the pool discards a closed connection
		return fmt.Errorf("release busy lock: %w", err)
	}
	return nil
}

// unlock releases a session lock. If that fails the connection is closed,
// which releases it too, so a lock can never outlive its drain.
func (d *Drainer) unlock(ctx context.Context, conn *pgxpool.Conn, lock string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_unlock("+lock+")"); err != nil {
		conn.Conn().Close(ctx) //nolint:errcheck // the pool discards a closed connection
	}
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
			if cur, err = d.claim(ctx, &conns, 0); err != nil {
				return false, err
			}
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
				return d.claim(ctx, &conns, 1-cur.slot)
			})
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
	conn *pgxpool.Conn
	slot int // which of the drain's connections, and row buffers, it uses
	rows []row
	open bool
}

func (c *claimed) rollback(ctx context.Context) {
	if c.open {
		c.open = false
		c.conn.Exec(context.WithoutCancel(ctx), "ROLLBACK") //nolint:errcheck // a broken connection is discarded by the pool
	}
}

// claim begins a transaction on connection slot (acquiring it from the pool
// the first time) and claims up to batchSize rows, sorted by id.
func (d *Drainer) claim(ctx context.Context, conns *[2]*pgxpool.Conn, slot int) (*claimed, error) {
	if conns[slot] == nil {
		conn, err := d.pool.Acquire(ctx)
		if err != nil {
			return nil, fmt.Errorf("acquire connection: %w", err)
		}
		conns[slot] = conn
	}
	c := &claimed{conn: conns[slot], slot: slot, open: true}
	// BEGIN goes out with the claim, in one round trip.
	b := &pgx.Batch{}
	b.Queue("BEGIN")
	b.Queue(claimSQL, d.batchSize)
	results := c.conn.SendBatch(ctx, b)
	if _, err := results.Exec(); err != nil {
		results.Close()
		c.rollback(ctx)
		return nil, fmt.Errorf("begin batch: %w", err)
	}
	rows, err := results.Query()
	if err != nil {
		results.Close()
		c.rollback(ctx)
		return nil, fmt.Errorf("claim batch: %w", err)
	}
	batch := d.rows[slot][:0]
	var r row
	_, err = pgx.ForEachRow(rows, []any{&r.ID, &r.EventID, &r.AggregateType, &r.AggregateID, &r.EventType, &r.Payload, &r.Traceparent, &r.CreatedAt}, func() error {
		batch = append(batch, r)
		r.Payload, r.Traceparent = nil, nil // scanned into fresh memory next time
		return nil
	})
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

// publishAndCommit publishes cur and commits its delete; while the publish
// is under way it calls claimNext, whose batch it returns. It finishes cur
// even if ctx is cancelled (SIGTERM), within d.finish: a claimed batch ends
// committed or rolled back, never abandoned half-way.
func (d *Drainer) publishAndCommit(ctx context.Context, cur *claimed, sess *session, res *Result, claimNext func() (*claimed, error)) (*claimed, error) {
	finishCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), d.finish)
	defer cancel()
	type published struct {
		added int
		err   error
	}
	done := make(chan published, 1)
	go func() {
		if d.beforePublish != nil {
			d.beforePublish()
		}
		added, err := sess.publish(finishCtx, cur.rows)
		done <- published{added, err}
	}()
	next, claimErr := claimNext()
	p := <-done
	if p.err == nil && d.afterPublish != nil {
		p.err = d.afterPublish()
	}
	if p.err != nil {
		cur.rollback(ctx)
		if next != nil {
			next.rollback(ctx)
		}
		return nil, p.err
	}
	tag, err := cur.conn.Exec(finishCtx, "COMMIT")
	if err == nil && tag.String() != "COMMIT" {
		err = fmt.Errorf("transaction was rolled back (%s)", tag)
	}
	cur.open = false
	if err != nil {
		// The rows may or may not be gone; they stay in flight, in the
		// session and in the marker in Redis, so a re-claim does not publish them again.
		if next != nil {
			next.rollback(ctx)
		}
		return nil, fmt.Errorf("commit batch: %w", err)
	}
	sess.committed(cur.rows)
	res.Batches++
	res.Relayed += p.added
	res.Duplicates += len(cur.rows) - p.added
	return next, claimErr
}

// rowsExist returns those of ids that are rows of the outbox, on a pooled
// connection of its own: it runs beside the first claim of a drain.
func (d *Drainer) rowsExist(ctx context.Context, ids []int64) ([]int64, error) {
	var exist []int64
	err := d.pool.QueryRow(ctx, `SELECT coalesce(array_agg(id), '{}') FROM outbox WHERE id = ANY ($1)`, ids).Scan(&exist)
	return exist, err
}

// querier is the part of a connection or pool that stillOpen needs.
type querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// stillOpen returns the transactions of xids that are still in progress.
func stillOpen(ctx context.Context, q querier, xids []int64) ([]int64, error) {
	var open []int64
	err := q.QueryRow(ctx,
		`SELECT coalesce(array_agg(x), '{}') FROM unnest($1::bigint[]) AS x
		 WHERE pg_xact_status(x::text::xid8) = 'in progress'`, xids).Scan(&open)
	if err != nil {
		return nil, fmt.Errorf("check open transactions: %w", err)
	}
	return open, nil
}
