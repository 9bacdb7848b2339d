// Package stream defines how an outbox event looks as a Redis Stream entry,
// the contract between the relay that writes entries and the consumers that
// read them, and opens Redis clients the way every function needs them.
package stream

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/rueidis"
)

// Entry field names.
const (
	FieldEventID       = "event_id"
	FieldEventType     = "event_type"
	FieldAggregateType = "aggregate_type"
	FieldAggregateID   = "aggregate_id"
	FieldPayload       = "payload"
	FieldOccurredAt    = "occurred_at"
	FieldTraceparent   = "traceparent"
	// FieldTracestate carries the W3C tracestate that goes with
	// FieldTraceparent, when the producer had one.
	FieldTracestate = "tracestate"
	// FieldOutboxID carries the outbox row id. Stream order is claim order,
	// which can differ from id order when transactions commit out of order;
	// a consumer that cares can compare ids of one aggregate to notice.
	FieldOutboxID = "outbox_id"
)

// Name returns the stream that events of aggregateType go to.
func Name(prefix, aggregateType string) string { return prefix + aggregateType }

// Event is an outbox event as it travels through a stream.
type Event struct {
	// ID is the stream entry id ("1700000000000-0"); empty before XADD.
	ID            string
	EventID       string
	EventType     string
	AggregateType string
	AggregateID   string
	// Payload is the event's JSON exactly as the outbox stored it.
	Payload    string
	OccurredAt time.Time
	// Traceparent is the W3C trace context, or empty.
	Traceparent string
	// Tracestate is the W3C tracestate that goes with Traceparent, or empty.
	Tracestate string
	// OutboxID is the id the event had in the outbox, or zero when the
	// entry does not say (entries written before the field existed).
	OutboxID int64
}

// Fields returns the entry's field-value pairs in XADD order.
func (e Event) Fields() []string {
	f := []string{
		FieldEventID, e.EventID,
		FieldEventType, e.EventType,
		FieldAggregateType, e.AggregateType,
		FieldAggregateID, e.AggregateID,
		FieldPayload, e.Payload,
		FieldOccurredAt, e.OccurredAt.UTC().Format(time.RFC3339Nano),
	}
	if e.Traceparent != "" {
		f = append(f, FieldTraceparent, e.Traceparent)
	}
	if e.Tracestate != "" {
		f = append(f, FieldTracestate, e.Tracestate)
	}
	if e.OutboxID != 0 {
		f = append(f, FieldOutboxID, strconv.FormatInt(e.OutboxID, 10))
	}
	return f
}

// ErrMalformed marks an entry that is not an event: a field is missing or
// unreadable. Such an entry can never succeed and belongs in a dead-letter
// stream.
var ErrMalformed = errors.New("malformed stream entry")

// Decode reads an event from an entry's fields.
func Decode(id string, fields map[string]string) (Event, error) {
	e := Event{
		ID:            id,
		EventID:       fields[FieldEventID],
		EventType:     fields[FieldEventType],
		AggregateType: fields[FieldAggregateType],
		AggregateID:   fields[FieldAggregateID],
		Payload:       fields[FieldPayload],
		Traceparent:   fields[FieldTraceparent],
		Tracestate:    fields[FieldTracestate],
	}
	for _, required := range []struct{ name, value string }{
		{FieldEventID, e.EventID}, {FieldEventType, e.EventType}, {FieldPayload, e.Payload},
	} {
		if required.value == "" {
			return e, fmt.Errorf("%w: field %s is missing", ErrMalformed, required.name)
		}
	}
	if at := fields[FieldOccurredAt]; at != "" {
		t, err := time.Parse(time.RFC3339Nano, at)
		if err != nil {
			return e, fmt.Errorf("%w: field %s: %v", ErrMalformed, FieldOccurredAt, err)
		}
		e.OccurredAt = t
	}
	if id := fields[FieldOutboxID]; id != "" {
		n, err := strconv.ParseInt(id, 10, 64)
		if err != nil {
			return e, fmt.Errorf("%w: field %s: %v", ErrMalformed, FieldOutboxID, err)
		}
		e.OutboxID = n
	}
	return e, nil
}

// ErrBadURL says a Redis URL could not be parsed. It carries no part of the
// URL: url.Parse quotes the text it choked on, which for a password holding
// '/', '?' or '#' is the password itself.
var ErrBadURL = errors.New("redis url is not valid: use redis://[user:password@]host:port/db (rediss:// for TLS), with '/', '?', '#' and '@' in the password percent-encoded")

// ParseURL parses a Redis URL as rueidis does, with an error that never
// repeats the URL.
func ParseURL(url string) (rueidis.ClientOption, error) {
	opt, err := rueidis.ParseURL(url)
	if err != nil {
		return opt, ErrBadURL
	}
	return opt, nil
}

// NewClient opens a Redis client for url. Client-side caching is off because
// nothing here reads cached keys and Memorystore refuses CLIENT TRACKING.
func NewClient(url string) (rueidis.Client, error) {
	opt, err := ParseURL(url)
	if err != nil {
		return nil, err
	}
	opt.DisableCache = true
	opt.Dialer.Timeout = 5 * time.Second
	// Start even while Redis is down; commands fail until it is back.
	opt.ForceSingleClient = true
	client, err := rueidis.NewClient(opt)
	if client == nil {
		return nil, fmt.Errorf("create redis client: %w", err)
	}
	// With ForceSingleClient a failed first dial still yields a client that
	// redials on use; the error only says Redis is down right now.
	return client, nil
}

// Ping checks that Redis answers.
func Ping(ctx context.Context, client rueidis.Client) error {
	return client.Do(ctx, client.B().Ping().Build()).Error()
}
