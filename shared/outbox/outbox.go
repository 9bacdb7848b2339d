// Package outbox writes events into the transactional outbox: the table whose
// rows the relay moves to Redis Streams. Writing an event in the same
// transaction as the state change it describes is the whole point: both
// commit, or neither does.
package outbox

import (
	"context"
	"encoding/json"
	"fmt"

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
}

// Execer is the part of pgx.Tx that Insert needs.
type Execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// Insert writes e through tx, which should be the transaction that makes the
// change e describes. The event's id (a UUID consumers dedupe on) is assigned
// by the database.
func Insert(ctx context.Context, tx Execer, e Event) error {
	var traceparent *string
	if e.Traceparent != "" {
		traceparent = &e.Traceparent
	}
	_, err := tx.Exec(ctx,
		`INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, traceparent)
		 VALUES ($1, $2, $3, $4, $5)`,
		e.AggregateType, e.AggregateID, e.EventType, string(e.Payload), traceparent)
	if err != nil {
		return fmt.Errorf("insert outbox event %s: %w", e.EventType, err)
	}
	return nil
}

// Backlog is what waits in the outbox for the relay.
type Backlog struct {
	// Events counts the rows not yet relayed.
	Events int64 `json:"backlog"`
	// OldestAgeSeconds is the age of the oldest of them; zero when none wait.
	OldestAgeSeconds float64 `json:"oldest_age_seconds"`
}

// Querier is the part of a pool, connection or transaction that
// MeasureBacklog needs.
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
