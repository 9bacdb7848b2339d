package outbox

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// retainedRunSQL: see RetainedRun.
const retainedRunSQL = `
SELECT min(batch), coalesce(max(batch) FILTER (WHERE upto <= $3), min(batch)) FROM (
  SELECT batch, sum(events) OVER (ORDER BY batch) AS upto FROM outbox_relay_batches
  WHERE ($1 = '' OR aggregate_type = $1) AND batch >= $2 AND batch <= $4
    AND ($5 < 0 OR (partition = $5 AND partitions = $6))
  ORDER BY batch LIMIT $3) AS s`

// RetainedRun finds the next run of retained batches (migration 00012): the
// batches numbered from from to upTo, of aggregateType (every type when it
// is empty), that together hold at most events retained events, or the
// first one alone if it holds more. ok is false when there is none.
//
// Readers take one run at a time (ReadRetained), so that no read holds a
// day of events in memory.
func RetainedRun(ctx context.Context, q Querier, aggregateType string, from, upTo int64, events int) (first, last int64, ok bool, err error) {
	return RetainedPartitionRun(ctx, q, aggregateType, -1, 0, from, upTo, events)
}

// RetainedPartitionRun is RetainedRun for the batches of one stream:
// partition of aggregateType's partitions (migration 00014). A negative
// partition means every stream of the type. The run's range of batches
// may hold events of other partitions too, which the reader leaves out.
func RetainedPartitionRun(ctx context.Context, q Querier, aggregateType string, partition, partitions int, from, upTo int64, events int) (first, last int64, ok bool, err error) {
	var f, l *int64
	if err := q.QueryRow(ctx, retainedRunSQL, aggregateType, from, events, upTo, partition, partitions).Scan(&f, &l); err != nil {
		return 0, 0, false, fmt.Errorf("find retained batches: %w", err)
	}
	if f == nil || l == nil {
		return 0, 0, false, nil
	}
	return *f, *l, true, nil
}

// RetainedEvent is an event the relay retains after publishing it: a row of
// outbox_relayed_rows, or one of a batch's events in outbox_retained
// (migration 00015).
type RetainedEvent struct {
	Batch         int64
	ID            int64
	EventID       [16]byte
	AggregateType string
	AggregateID   string
	EventType     string
	// Payload is the event's json text.
	Payload     []byte
	Traceparent *string
	Tracestate  *string
	// CreatedAt is zero when Infinite is set.
	CreatedAt time.Time
	Infinite  pgtype.InfinityModifier
}

// retainedFields is the number of fields each event of outbox_retained.data
// has, in this order: id, event_id, aggregate_type, aggregate_id,
// event_type, payload, traceparent, created_at, tracestate.
const retainedFields = 9

// pgEpochSeconds is 2000-01-01 00:00 UTC, PostgreSQL's timestamp zero, in
// Unix seconds.
const pgEpochSeconds = 946_684_800

// errRetainedData reports data that is not in outbox_retained's encoding.
var errRetainedData = errors.New("retained events: malformed data")

// DecodeRetained calls fn with each event of data, a batch's events in
// outbox_retained's encoding (see migration 00015), in the order they were
// encoded. The strings and the payload of an event share no memory with
// data.
func DecodeRetained(batch int64, data []byte, fn func(e *RetainedEvent) error) error {
	return decodeRetained(batch, data, "", fn)
}

// decodeRetained is DecodeRetained, passing over without a copy the events
// of aggregate types other than aggregateType unless it is empty.
func decodeRetained(batch int64, data []byte, aggregateType string, fn func(e *RetainedEvent) error) error {
	be := binary.BigEndian
	var fields [retainedFields][]byte
	var null [retainedFields]bool
	for len(data) > 0 {
		if len(data) < 2 || be.Uint16(data) != retainedFields {
			return errRetainedData
		}
		data = data[2:]
		for i := range fields {
			if len(data) < 4 {
				return errRetainedData
			}
			n := int32(be.Uint32(data))
			data = data[4:]
			if null[i] = n < 0; null[i] {
				fields[i] = nil
				continue
			}
			if int(n) > len(data) {
				return errRetainedData
			}
			fields[i], data = data[:n], data[n:]
		}
		if null[0] || null[1] || null[7] || len(fields[0]) != 8 || len(fields[1]) != 16 || len(fields[7]) != 8 {
			return errRetainedData
		}
		if aggregateType != "" && string(fields[2]) != aggregateType {
			continue
		}
		e := RetainedEvent{Batch: batch, ID: int64(be.Uint64(fields[0])),
			AggregateType: string(fields[2]), AggregateID: string(fields[3]), EventType: string(fields[4]),
			Payload: bytes.Clone(fields[5])}
		copy(e.EventID[:], fields[1])
		if !null[6] {
			s := string(fields[6])
			e.Traceparent = &s
		}
		if !null[8] {
			s := string(fields[8])
			e.Tracestate = &s
		}
		switch micros := int64(be.Uint64(fields[7])); micros {
		case math.MaxInt64:
			e.Infinite = pgtype.Infinity
		case math.MinInt64:
			e.Infinite = pgtype.NegativeInfinity
		default:
			e.CreatedAt = time.Unix(pgEpochSeconds+micros/1_000_000, micros%1_000_000*1_000).UTC()
		}
		if err := fn(&e); err != nil {
			return err
		}
	}
	return nil
}

// Reader is the part of a pool, connection or transaction that
// ReadRetained needs.
type Reader interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// ReadRetained returns the retained events of the batches numbered first to
// last, of aggregateType (every type when it is empty), ordered by batch
// and id: the order the relay published them in. It reads the rows
// retained before migration 00015 and the batches of outbox_retained, and
// decodes those here, which is far cheaper than the outbox_relayed view's
// decoding in SQL.
func ReadRetained(ctx context.Context, q Reader, aggregateType string, first, last int64) ([]RetainedEvent, error) {
	var events []RetainedEvent
	rows, err := q.Query(ctx, `
		SELECT batch, id, event_id, aggregate_type, aggregate_id, event_type, payload::text, traceparent, created_at, tracestate
		FROM outbox_relayed_rows WHERE batch BETWEEN $1 AND $2 AND ($3 = '' OR aggregate_type = $3)`, first, last, aggregateType)
	if err != nil {
		return nil, fmt.Errorf("read retained rows: %w", err)
	}
	var e RetainedEvent
	var created pgtype.Timestamptz
	_, err = pgx.ForEachRow(rows, []any{&e.Batch, &e.ID, &e.EventID, &e.AggregateType, &e.AggregateID, &e.EventType,
		&e.Payload, &e.Traceparent, &created, &e.Tracestate}, func() error {
		e.CreatedAt, e.Infinite = created.Time, created.InfinityModifier
		events = append(events, e)
		e.Payload, e.Traceparent, e.Tracestate = nil, nil, nil
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read retained rows: %w", err)
	}
	// A batch holds the events of every stream it wrote to; those with
	// none of aggregateType's (outbox_relay_batches has a record of every
	// stream a batch retained events of) are not read.
	rows, err = q.Query(ctx, `SELECT batch, data FROM outbox_retained
		WHERE batch BETWEEN $1 AND $2 AND ($3 = '' OR batch IN (
		  SELECT batch FROM outbox_relay_batches WHERE aggregate_type = $3 AND batch BETWEEN $1 AND $2))`, first, last, aggregateType)
	if err != nil {
		return nil, fmt.Errorf("read retained batches: %w", err)
	}
	var batch int64
	var data []byte
	_, err = pgx.ForEachRow(rows, []any{&batch, &data}, func() error {
		return decodeRetained(batch, data, aggregateType, func(e *RetainedEvent) error {
			events = append(events, *e)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("read retained batches: %w", err)
	}
	slices.SortFunc(events, func(a, b RetainedEvent) int {
		return cmp.Or(cmp.Compare(a.Batch, b.Batch), cmp.Compare(a.ID, b.ID))
	})
	return events, nil
}
