package relay

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
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
		_, err := pgx.ForEachRow(rows, []any{&r.ID, &r.EventID, &r.AggregateType, &r.AggregateID, &r.EventType, &r.Payload, &r.Traceparent, &r.CreatedAt, &r.Tracestate}, func() error {
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
		if micros == math.MaxInt64 || micros == math.MinInt64 {
			return batch, errors.New("read claimed row: created_at is infinite")
		}
		r := row{
			ID:            int64(be.Uint64(v[0])),
			EventID:       eventID(v[1]),
			AggregateType: d.intern(v[2]),
			AggregateID:   string(v[3]),
			EventType:     d.intern(v[4]),
			Payload:       bytes.Clone(v[5]),
			CreatedAt:     time.UnixMicro(micros + pgEpochMicros),
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

// copyRelayedSQL copies retained rows in PostgreSQL's binary COPY format,
// which appendRelayedCopy writes.
const copyRelayedSQL = `COPY outbox_relayed (batch, id, event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at, tracestate) FROM STDIN (FORMAT binary)`

// copySignature opens a binary COPY stream: the signature, then flags and
// header extension length, both zero.
var copySignature = []byte("PGCOPY\n\xff\r\n\x00\x00\x00\x00\x00\x00\x00\x00\x00")

// pgEpochMicros is 2000-01-01 00:00 UTC, PostgreSQL's timestamp zero, in
// Unix microseconds.
const pgEpochMicros = 946_684_800_000_000

// appendRelayedCopy appends rows, as batch, to buf in the binary COPY format
// of copyRelayedSQL. Every value is already in the form PostgreSQL stores
// (text is UTF-8 as the claim read it, json is its text), so encoding is a
// copy: pgx's CopyFrom, which looks up an encoder for every value, spent
// more of the relay's CPU on this than on the claim.
func appendRelayedCopy(buf []byte, batch int64, rows []row) []byte {
	buf = append(buf, copySignature...)
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
		buf = be.AppendUint16(buf, 10) // columns
		buf = be.AppendUint32(buf, 8)
		buf = be.AppendUint64(buf, uint64(batch))
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
		buf = be.AppendUint64(buf, uint64(r.CreatedAt.UnixMicro()-pgEpochMicros))
		buf = nullable(buf, r.Tracestate)
	}
	return be.AppendUint16(buf, math.MaxUint16) // -1: end of data
}

// retain copies the claimed rows to outbox_relayed, in the batch's
// transaction, so that they are retained exactly when their delete commits.
// COPY from the rows in hand costs less than a copy in the claim statement,
// and it runs while Redis takes the batch, off the drain's critical path.
func (d *Drainer) retain(ctx context.Context, c *claimed) error {
	d.copyBufs[c.slot] = appendRelayedCopy(d.copyBufs[c.slot][:0], c.batch, c.rows)
	if _, err := c.conn.Conn().PgConn().CopyFrom(ctx, bytes.NewReader(d.copyBufs[c.slot]), copyRelayedSQL); err != nil {
		return fmt.Errorf("retain batch: %w", err)
	}
	return nil
}

// partitions is the number of streams each aggregate type is spread over.
func (d *Drainer) partitions() int { return max(d.publisher.partitions, 1) }
