// Package events defines the events this product publishes, the contract
// between the function that writes one to the outbox and the consumers that
// read it from a stream.
package events

// AggregateUser is the aggregate type of user events; the relay publishes
// them to the stream "<prefix>user".
const AggregateUser = "user"

// TypeUserCreated is the event type written when a user is created.
const TypeUserCreated = "user.created"

// UserCreated is the payload of a user.created event.
type UserCreated struct {
	UserID int64  `json:"user_id"`
	Email  string `json:"email"`
	Name   string `json:"name"`
}
