package relay

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/outboxfn/outbox/shared/stream"
)

// row is one claimed outbox row.
type row struct {
	ID            int64
	EventID       eventID
	AggregateType string
	AggregateID   string
	EventType     string
	Payload       []byte
	Traceparent   *string
	Tracestate    *string
	CreatedAt     time.Time
	// Infinite says created_at is 'infinity' or '-infinity' (CreatedAt is
	// then zero): a row only another producer can write, which the relay
	// moves to outbox_dead rather than let it stop the outbox.
	Infinite pgtype.InfinityModifier
	// stream is the key of the row's stream (stream.PartitionKey): its
	// aggregate type, and its partition when there are several.
	stream string
}

func (r *row) eventIDString() string { return uuid.UUID(r.EventID).String() }

// readRows appends claimSQL's rows to batch. The extended protocol brings
// the id, the UUID and the time in binary, and every other column is text;
// then the relay reads the values itself, which costs a fraction of
// pgx's Scan with its per-column lookups. Under the simple protocol (chosen
// in the URL), everything comes as text and Scan reads it.
func (d *Drainer) readRows(rows pgx.Rows, batch []row) ([]row, error) {
	fd := rows.FieldDescriptions()
	if len(fd) != 9 || fd[0].Format != pgtype.BinaryFormatCode || fd[1].Format != pgtype.BinaryFormatCode || fd[7].Format != pgtype.BinaryFormatCode {
		var r row
		var created pgtype.Timestamptz
		_, err := pgx.ForEachRow(rows, []any{&r.ID, &r.EventID, &r.AggregateType, &r.AggregateID, &r.EventType, &r.Payload, &r.Traceparent, &created, &r.Tracestate}, func() error {
			r.CreatedAt, r.Infinite = created.Time, created.InfinityModifier
			r.stream = d.streamOf(r.AggregateType, r.AggregateID)
			batch = append(batch, r)
			r.Payload, r.Traceparent, r.Tracestate = nil, nil, nil // scanned into fresh memory next time
			return nil
		})
		return batch, err
	}
	defer rows.Close()
	be := binary.BigEndian
	for rows.Next() {
		v := rows.RawValues()
		if len(v) != 9 || len(v[0]) != 8 || len(v[1]) != 16 || len(v[7]) != 8 || v[2] == nil || v[3] == nil || v[4] == nil || v[5] == nil {
			return batch, errors.New("read claimed row: unexpected value")
		}
		micros := int64(be.Uint64(v[7]))
		r := row{
			ID:            int64(be.Uint64(v[0])),
			EventID:       eventID(v[1]),
			AggregateType: d.intern(v[2]),
			AggregateID:   string(v[3]),
			EventType:     d.intern(v[4]),
			Payload:       bytes.Clone(v[5]),
			// Split, as pgx does: micros + pgEpochMicros overflows int64
			// for the last 29 years of PostgreSQL's range.
			CreatedAt: time.Unix(pgEpochSeconds+micros/1_000_000, micros%1_000_000*1_000),
		}
		switch micros {
		case math.MaxInt64:
			r.CreatedAt, r.Infinite = time.Time{}, pgtype.Infinity
		case math.MinInt64:
			r.CreatedAt, r.Infinite = time.Time{}, pgtype.NegativeInfinity
		}
		r.stream = d.streamOf(r.AggregateType, r.AggregateID)
		if v[6] != nil {
			tp := string(v[6])
			r.Traceparent = &tp
		}
		if v[8] != nil {
			ts := string(v[8])
			r.Tracestate = &ts
		}
		batch = append(batch, r)
	}
	return batch, rows.Err()
}

// intern returns b as a string, the same string every time for up to a few
// hundred distinct values.
func (d *Drainer) intern(b []byte) string {
	if s, ok := d.names[string(b)]; ok {
		return s
	}
	s := string(b)
	if len(d.names) < 256 {
		d.names[s] = s
	}
	return s
}

// streamOf returns the key of the stream of an event of aggregateType and
// aggregateID, from a cache of each type's keys: with one partition the
// aggregate type itself.
func (d *Drainer) streamOf(aggregateType, aggregateID string) string {
	n := d.partitions()
	if n <= 1 {
		return aggregateType
	}
	keys, ok := d.partitionKeys[aggregateType]
	if !ok {
		keys = make([]string, n)
		for p := range keys {
			keys[p] = stream.PartitionKey(aggregateType, p, n)
		}
		if len(d.partitionKeys) < 256 {
			d.partitionKeys[aggregateType] = keys
		}
	}
	return keys[stream.Partition(aggregateID, n)]
}

// retainSQL stores a batch's events in outbox_retained (migration 00015):
// one row per batch, the events encoded by appendRetained, sent as a
// binary COPY of that one row, which streams the buffer to the server
// where a parameter would be copied whole into pgx's.
const retainSQL = `COPY outbox_retained (batch, events, oldest, data) FROM STDIN (FORMAT binary)`

// copySignature opens a binary COPY stream: the signature, then flags and
// header extension length, both zero.
var copySignature = []byte("PGCOPY\n\xff\r\n\x00\x00\x00\x00\x00\x00\x00\x00\x00")

// retainHead is the length of the COPY stream before a batch's data: the
// signature, the field count, batch, events and oldest, and data's length.
var retainHead = len(copySignature) + 2 + (4 + 8) + (4 + 4) + (4 + 8) + 4

// pgEpochSeconds is 2000-01-01 00:00 UTC, PostgreSQL's timestamp zero, in
// Unix seconds.
const pgEpochSeconds = 946_684_800

// pgMicros is t in PostgreSQL's binary timestamp form, microseconds since
// its zero, computed without going through Unix microseconds (which
// overflow int64 before PostgreSQL's range ends).
func pgMicros(t time.Time) int64 {
	return (t.Unix()-pgEpochSeconds)*1_000_000 + int64(t.Nanosecond()/1_000)
}

// appendRetainCopy appends the COPY stream of retainSQL: the batch's row,
// its data encoded by appendRetained.
func appendRetainCopy(buf []byte, batch int64, rows []row) []byte {
	be := binary.BigEndian
	buf = append(buf, copySignature...)
	buf = be.AppendUint16(buf, 4) // fields
	buf = be.AppendUint32(buf, 8)
	buf = be.AppendUint64(buf, uint64(batch))
	buf = be.AppendUint32(buf, 4)
	buf = be.AppendUint32(buf, uint32(len(rows)))
	buf = be.AppendUint32(buf, 8)
	buf = be.AppendUint64(buf, uint64(pgTimestamp(oldestOf(rows))))
	lenAt := len(buf)
	buf = be.AppendUint32(buf, 0) // data's length, known after it
	buf = appendRetained(buf, rows)
	be.PutUint32(buf[lenAt:], uint32(len(buf)-lenAt-4))
	return be.AppendUint16(buf, math.MaxUint16) // -1: end of data
}

// pgTimestamp is t in PostgreSQL's binary timestamptz form.
func pgTimestamp(t pgtype.Timestamptz) int64 {
	switch t.InfinityModifier {
	case pgtype.Infinity:
		return math.MaxInt64
	case pgtype.NegativeInfinity:
		return math.MinInt64
	}
	return pgMicros(t.Time)
}

// retainedSize is the length of rows in appendRetained's format, so that
// the buffer is allocated once, not grown by append (1.25x steps past
// 256 KiB: about five times a big batch's bytes).
func retainedSize(rows []row) int {
	n := 0
	for i := range rows {
		r := &rows[i]
		n += 2 + 9*4 + 8 + 16 + 8 + len(r.AggregateType) + len(r.AggregateID) + len(r.EventType) + len(r.Payload)
		if r.Traceparent != nil {
			n += len(*r.Traceparent)
		}
		if r.Tracestate != nil {
			n += len(*r.Tracestate)
		}
	}
	return n
}

// maxKeptRetainBuf is the largest encoding buffer kept for the next batch
// (4 MiB holds 1000 events of 4 KiB); a bigger one, a batch of big events,
// is left to the garbage collector.
const maxKeptRetainBuf = 4 << 20

// appendRetained appends rows to buf in outbox_retained's encoding (see
// migration 00015 and outbox.DecodeRetained): each row as PostgreSQL's
// binary COPY writes it. Every value is already in the form PostgreSQL
// sends (text is UTF-8 as the claim read it, json is its text), so encoding
// is a copy.
func appendRetained(buf []byte, rows []row) []byte {
	be := binary.BigEndian
	text := func(buf []byte, s string) []byte {
		buf = be.AppendUint32(buf, uint32(len(s)))
		return append(buf, s...)
	}
	nullable := func(buf []byte, s *string) []byte {
		if s == nil {
			return be.AppendUint32(buf, math.MaxUint32) // -1: NULL
		}
		return text(buf, *s)
	}
	for i := range rows {
		r := &rows[i]
		buf = be.AppendUint16(buf, 9) // fields
		buf = be.AppendUint32(buf, 8)
		buf = be.AppendUint64(buf, uint64(r.ID))
		buf = be.AppendUint32(buf, 16)
		buf = append(buf, r.EventID[:]...)
		buf = text(buf, r.AggregateType)
		buf = text(buf, r.AggregateID)
		buf = text(buf, r.EventType)
		buf = be.AppendUint32(buf, uint32(len(r.Payload)))
		buf = append(buf, r.Payload...)
		buf = nullable(buf, r.Traceparent)
		buf = be.AppendUint32(buf, 8)
		switch r.Infinite {
		case pgtype.Infinity:
			buf = be.AppendUint64(buf, math.MaxInt64)
		case pgtype.NegativeInfinity:
			buf = be.AppendUint64(buf, 1<<63) // math.MinInt64
		default:
			buf = be.AppendUint64(buf, uint64(pgMicros(r.CreatedAt)))
		}
		buf = nullable(buf, r.Tracestate)
	}
	return buf
}

// oldestOf is the earliest created_at of rows, for outbox_retained.oldest.
func oldestOf(rows []row) pgtype.Timestamptz {
	oldest := pgtype.Timestamptz{InfinityModifier: pgtype.Infinity, Valid: true}
	for i := range rows {
		r := &rows[i]
		switch {
		case r.Infinite == pgtype.NegativeInfinity:
			return pgtype.Timestamptz{InfinityModifier: pgtype.NegativeInfinity, Valid: true}
		case r.Infinite == pgtype.Infinity:
		case oldest.InfinityModifier == pgtype.Infinity || r.CreatedAt.Before(oldest.Time):
			oldest = pgtype.Timestamptz{Time: r.CreatedAt, Valid: true}
		}
	}
	return oldest
}

// retain stores the claimed rows in outbox_retained, in the batch's
// transaction, so that they are retained exactly when their delete commits.
// It runs while Redis takes the batch, off the drain's critical path. One
// row per batch, not per event: a row per event cost the drain more
// PostgreSQL time than the claim.
func (d *Drainer) retain(ctx context.Context, c *claimed) error {
	buf := appendRetainCopy(slices.Grow(d.retainBufs[c.slot][:0], retainHead+retainedSize(c.rows)+2), c.batch, c.rows)
	if cap(buf) <= maxKeptRetainBuf {
		d.retainBufs[c.slot] = buf
	} else {
		d.retainBufs[c.slot] = nil
	}
	if _, err := c.conn.Conn().PgConn().CopyFrom(ctx, bytes.NewReader(buf), retainSQL); err != nil {
		return fmt.Errorf("retain batch: %w", err)
	}
	return nil
}

// partitions is the number of streams each aggregate type is spread over.
func (d *Drainer) partitions() int { return max(d.publisher.partitions, 1) }
