// Package outbox writes events into the transactional outbox: the table whose
// rows the relay moves to Redis Streams. Writing an event in the same
// transaction as the state change it describes is the whole point: both
// commit, or neither does.
package outbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Channel is the LISTEN/NOTIFY channel the outbox's insert trigger rings.
const Channel = "outbox"

// Event is an event to be written to the outbox.
type Event struct {
	// AggregateType names the kind of entity, e.g. "user". The relay
	// publishes each aggregate type to its own stream.
	AggregateType string
	// AggregateID identifies the entity; events of one aggregate are
	// delivered in the order they were written.
	AggregateID string
	// EventType names what happened, e.g. "user.created".
	EventType string
	// Payload is the event's JSON body, stored and relayed byte for byte.
	Payload json.RawMessage
	// Traceparent is the W3C trace context of the request, or empty.
	Traceparent string
	// Tracestate is the W3C tracestate that goes with Traceparent, or empty.
	Tracestate string
}

// Execer is the part of pgx.Tx that Insert needs.
type Execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// ErrInvalidAggregateType is returned by Insert for an aggregate type that
// ValidAggregateType refuses.
var ErrInvalidAggregateType = errors.New("invalid aggregate type")

// aggregateType is the outbox table's CHECK constraint
// outbox_aggregate_type_check (migration 00011), which explains the rule.
var aggregateType = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$`)

// ValidAggregateType reports whether s may be an event's aggregate type: 1 to
// 100 ASCII letters, digits, '_', '.' and '-', starting with a letter or
// digit. The relay publishes to a stream named after the type, and this rule
// keeps that name off the relay's own keys and dead-letter streams (which
// contain ':'). The database enforces the same rule.
func ValidAggregateType(s string) bool {
	return aggregateType.MatchString(s)
}

// Insert writes e through tx, which should be the transaction that makes the
// change e describes. The event's id (a UUID consumers dedupe on) is assigned
// by the database.
//
// An aggregate type that ValidAggregateType refuses is an
// ErrInvalidAggregateType, returned before tx is used, so that the
// transaction is not aborted by the CHECK constraint's error.
func Insert(ctx context.Context, tx Execer, e Event) error {
	if !ValidAggregateType(e.AggregateType) {
		return fmt.Errorf("insert outbox event %s: %w %q", e.EventType, ErrInvalidAggregateType, e.AggregateType)
	}
	_, err := tx.Exec(ctx,
		`INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, traceparent, tracestate)
		 VALUES ($1, $2, $3, $4, $5, $6)`,
		e.AggregateType, e.AggregateID, e.EventType, string(e.Payload), nullIfEmpty(e.Traceparent), nullIfEmpty(e.Tracestate))
	if err != nil {
		return fmt.Errorf("insert outbox event %s: %w", e.EventType, err)
	}
	return nil
}

// nullIfEmpty stores an absent trace field as NULL, not as "".
func nullIfEmpty(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// Backlog is what waits in the outbox for the relay.
type Backlog struct {
	// Events counts the rows not yet relayed.
	Events int64 `json:"backlog"`
	// OldestAgeSeconds is the age of the oldest of them; zero when none wait.
	OldestAgeSeconds float64 `json:"oldest_age_seconds"`
}

// Querier is the part of a pool, connection or transaction that
// MeasureBacklog and MeasureDead need.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// MeasureBacklog counts the outbox. The relay deletes what it relays, so the
// count stays cheap while the relay keeps up.
func MeasureBacklog(ctx context.Context, q Querier) (Backlog, error) {
	var b Backlog
	err := q.QueryRow(ctx,
		`SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM outbox`).
		Scan(&b.Events, &b.OldestAgeSeconds)
	if err != nil {
		return b, fmt.Errorf("measure outbox backlog: %w", err)
	}
	return b, nil
}

// Dead is what lies in outbox_dead: rows the relay could not publish,
// waiting for an operator.
type Dead struct {
	// Count counts the dead rows.
	Count int64 `json:"dead"`
	// OldestAgeSeconds is how long the oldest of them has been dead (since
	// dead_at, not since the event was written); zero when there are none.
	OldestAgeSeconds float64 `json:"oldest_dead_age_seconds"`
}

// MeasureDead counts outbox_dead. The table holds only what an operator has
// yet to deal with, so a full count is cheap; any row at all is worth an
// alert.
func MeasureDead(ctx context.Context, q Querier) (Dead, error) {
	var d Dead
	err := q.QueryRow(ctx,
		`SELECT count(*), coalesce(extract(epoch FROM now() - min(dead_at)), 0)::float8 FROM outbox_dead`).
		Scan(&d.Count, &d.OldestAgeSeconds)
	if err != nil {
		return d, fmt.Errorf("measure dead outbox rows: %w", err)
	}
	return d, nil
}
