// Package outbox writes events into the transactional outbox: the table whose
// rows the relay moves to Redis Streams. Writing an event in the same
// transaction as the state change it describes is the whole point: both
// commit, or neither does.
package outbox

import (
	"context"
	"encoding/json"
	"fmt"

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
