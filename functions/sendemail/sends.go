package sendemail

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// claimState is the answer to a send claim.
type claimState int

const (
	// claimed: this consumer may send now.
	claimed claimState = iota
	// alreadySent: the email went out before; do not send it again.
	alreadySent
	// leasedElsewhere: another consumer is sending it right now.
	leasedElsewhere
)

// Sends keeps the send records in PostgreSQL: durable, and shared by every
// consumer instance.
type Sends struct {
	pool  *pgxpool.Pool
	lease time.Duration
}

// Claim takes the send of key for consumer, unless it was sent already or
// another consumer's lease on it is still running.
func (s *Sends) Claim(ctx context.Context, key, eventID, consumer string) (claimState, error) {
	var ok bool
	err := s.pool.QueryRow(ctx, `
		INSERT INTO email_sends AS s (key, event_id, claimed_by, lease_until)
		VALUES ($1, $2, $3, now() + $4::interval)
		ON CONFLICT (key) DO UPDATE
		SET claimed_by = EXCLUDED.claimed_by, lease_until = EXCLUDED.lease_until,
		    event_id = EXCLUDED.event_id, attempts = s.attempts + 1
		WHERE s.sent_at IS NULL AND s.lease_until < now()
		RETURNING true`, key, eventID, consumer, s.lease).Scan(&ok)
	if err == nil {
		return claimed, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return 0, fmt.Errorf("claim send %s: %w", key, err)
	}
	var sent bool
	if err := s.pool.QueryRow(ctx, `SELECT sent_at IS NOT NULL FROM email_sends WHERE key = $1`, key).Scan(&sent); err != nil {
		return 0, fmt.Errorf("read send %s: %w", key, err)
	}
	if sent {
		return alreadySent, nil
	}
	return leasedElsewhere, nil
}

// MarkSent records that the mail server accepted the message.
func (s *Sends) MarkSent(ctx context.Context, key, messageID string) error {
	_, err := s.pool.Exec(ctx, `
		UPDATE email_sends SET sent_at = now(), message_id = $2, claimed_by = NULL, lease_until = NULL
		WHERE key = $1 AND sent_at IS NULL`, key, messageID)
	if err != nil {
		return fmt.Errorf("mark %s sent: %w", key, err)
	}
	return nil
}

// Release gives up consumer's claim on key after a failed attempt, so that
// the next attempt need not wait for the lease to run out. forget deletes
// the record altogether (a permanent failure), so that a redriven entry
// starts afresh.
func (s *Sends) Release(ctx context.Context, key, consumer string, forget bool) error {
	sql := `UPDATE email_sends SET lease_until = now() WHERE key = $1 AND claimed_by = $2 AND sent_at IS NULL`
	if forget {
		sql = `DELETE FROM email_sends WHERE key = $1 AND claimed_by = $2 AND sent_at IS NULL`
	}
	if _, err := s.pool.Exec(ctx, sql, key, consumer); err != nil {
		return fmt.Errorf("release send %s: %w", key, err)
	}
	return nil
}
