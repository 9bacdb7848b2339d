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
const claimSQL = `
DELETE FROM outbox
WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
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
	// settle bounds the wait for open transactions after the busy phase.
	settle time.Duration
	// finish bounds publishing and committing a claimed batch, which runs
	// even after ctx is cancelled so that a batch ends committed or rolled
	// back, never abandoned half-way.
	finish time.Duration

	// afterPublish, when set by a test, runs between XADD and COMMIT; an
	// error abandons the batch there, as a crash would.
	afterPublish func() error

	rows []row // reused between batches
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
		settle:    20 * time.Millisecond,
		finish:    5 * time.Second,
		rows:      make([]row, 0, batchSize),
	}
}

// Drain moves rows until a batch comes back short, or stopBy (if not zero)
// has passed.
//
// It works in two phases. First, holding busyLock so that inserters skip the
// doorbell, it drains until a batch is short. Then it releases busyLock,
// takes a snapshot, waits (briefly) for the transactions in progress in it to
// end, and drains again with the doorbell on. Any transaction whose trigger
// skipped the doorbell did so while busyLock was held, so it had an xid
// before the snapshot: it is either committed before the second phase reads,
// or it is in Result.Lingering, which the caller watches. Transactions that
// start later ring the doorbell as usual.
func (d *Drainer) Drain(ctx context.Context, stopBy time.Time) (Result, error) {
	var res Result
	select {
	case d.sem <- struct{}{}:
		defer func() { <-d.sem }()
	case <-ctx.Done():
		return res, ctx.Err()
	}
	conn, err := d.pool.Acquire(ctx)
	if err != nil {
		return res, fmt.Errorf("acquire connection: %w", err)
	}
	defer conn.Release()
	if err := d.lockDrain(ctx, conn); err != nil {
		return res, err
	}
	defer d.unlock(ctx, conn, drainLock)

	inFlight, err := d.publisher.LoadInFlight(ctx)
	if err != nil {
		return res, err
	}
	for {
		if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock("+busyLock+")"); err != nil {
			return res, fmt.Errorf("take busy lock: %w", err)
		}
		complete, err := d.drainBatches(ctx, conn, inFlight, stopBy, &res)
		d.unlock(ctx, conn, busyLock)
		if err != nil || !complete {
			return res, err
		}
		lingering, err := d.settleOpen(ctx, conn)
		if err != nil {
			return res, err
		}
		before := res.Relayed + res.Duplicates
		complete, err = d.drainBatches(ctx, conn, inFlight, stopBy, &res)
		if err != nil || !complete {
			return res, err
		}
		// A full batch after the settle means a burst is on: drain it with
		// the doorbell off again rather than let every insert ring.
		if res.Relayed+res.Duplicates-before < d.batchSize {
			res.Complete, res.Lingering = true, lingering
			return res, nil
		}
	}
}

// lockDrain takes the drain lock, waiting at most lockWait for another relay
// to release it.
func (d *Drainer) lockDrain(ctx context.Context, conn *pgxpool.Conn) error {
	var ok bool
	if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock("+drainLock+")").Scan(&ok); err != nil {
		return fmt.Errorf("take drain lock: %w", err)
	}
	if ok {
		return nil
	}
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

// unlock releases a session lock. If that fails the connection is closed,
// which releases it too, so a lock can never outlive its drain.
func (d *Drainer) unlock(ctx context.Context, conn *pgxpool.Conn, lock string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_unlock("+lock+")"); err != nil {
		conn.Conn().Close(ctx) //nolint:errcheck // the pool discards a closed connection
	}
}

// drainBatches runs batches until one is short (complete) or stopBy passed.
func (d *Drainer) drainBatches(ctx context.Context, conn *pgxpool.Conn, inFlight map[eventID]struct{}, stopBy time.Time, res *Result) (complete bool, err error) {
	for {
		if !stopBy.IsZero() && time.Now().After(stopBy) {
			return false, nil
		}
		n, err := d.batch(ctx, conn, inFlight, res)
		if err != nil {
			return false, err
		}
		if n < d.batchSize {
			return true, nil
		}
	}
}

// batch claims up to batchSize rows, publishes them, and commits the delete.
func (d *Drainer) batch(ctx context.Context, conn *pgxpool.Conn, inFlight map[eventID]struct{}, res *Result) (int, error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return 0, fmt.Errorf("begin batch: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // after Commit this is a no-op

	rows, err := tx.Query(ctx, claimSQL, d.batchSize)
	if err != nil {
		return 0, fmt.Errorf("claim batch: %w", err)
	}
	batch := d.rows[:0]
	var r row
	_, err = pgx.ForEachRow(rows, []any{&r.ID, &r.EventID, &r.AggregateType, &r.AggregateID, &r.EventType, &r.Payload, &r.Traceparent, &r.CreatedAt}, func() error {
		batch = append(batch, r)
		r.Payload, r.Traceparent = nil, nil // scanned into fresh memory next time
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("claim batch: %w", err)
	}
	if len(batch) == 0 {
		return 0, nil
	}
	// DELETE … RETURNING does not promise an order.
	slices.SortFunc(batch, func(a, b row) int { return cmp.Compare(a.ID, b.ID) })

	// The rows are claimed: from here on, finish the batch even if ctx is
	// cancelled (SIGTERM), within a bound.
	finishCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), d.finish)
	defer cancel()
	added, err := d.publisher.Publish(finishCtx, batch, inFlight)
	if err != nil {
		return 0, err
	}
	if d.afterPublish != nil {
		if err := d.afterPublish(); err != nil {
			return 0, err
		}
	}
	if err := tx.Commit(finishCtx); err != nil {
		// The rows may or may not be gone; they stay in inFlight, and the
		// marker in Redis, so a re-claim does not publish them again.
		return 0, fmt.Errorf("commit batch: %w", err)
	}
	for i := range batch {
		delete(inFlight, batch[i].EventID)
	}
	res.Batches++
	res.Relayed += added
	res.Duplicates += len(batch) - added
	d.rows = batch[:0]
	return len(batch), nil
}

// settleOpen waits up to d.settle for the transactions open right now to
// end, and returns those still open after that.
func (d *Drainer) settleOpen(ctx context.Context, conn *pgxpool.Conn) ([]int64, error) {
	var open []int64
	err := conn.QueryRow(ctx,
		`SELECT coalesce(array_agg(x::text::bigint), '{}') FROM pg_snapshot_xip(pg_current_snapshot()) AS x`).Scan(&open)
	if err != nil {
		return nil, fmt.Errorf("read open transactions: %w", err)
	}
	deadline := time.Now().Add(d.settle)
	wait := 200 * time.Microsecond
	for len(open) > 0 && time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, 5*time.Millisecond)
		if open, err = stillOpen(ctx, conn, open); err != nil {
			return nil, err
		}
	}
	return open, nil
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
