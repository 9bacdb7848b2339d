package sendemail

import (
	"context"
	"fmt"
	"slices"
	"strings"
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

// Claim takes the sends of keys (with their event ids) for consumer, one
// statement and one commit for a whole batch. A key is claimed unless it was
// sent already or another consumer's lease on it is still running. Keys are
// locked in sorted order, so two consumers claiming overlapping batches
// cannot deadlock.
func (s *Sends) Claim(ctx context.Context, keys, eventIDs []string, consumer string) (map[string]claimState, error) {
	type pair struct{ key, eventID string }
	pairs := make([]pair, len(keys))
	for i := range keys {
		pairs[i] = pair{keys[i], eventIDs[i]}
	}
	slices.SortFunc(pairs, func(a, b pair) int { return strings.Compare(a.key, b.key) })
	sortedKeys, sortedIDs := make([]string, len(pairs)), make([]string, len(pairs))
	for i, p := range pairs {
		sortedKeys[i], sortedIDs[i] = p.key, p.eventID
	}
	// Every part of the statement sees the table as it was before the
	// INSERT, so "sent" describes the keys that were not claimed.
	rows, err := s.pool.Query(ctx, `
		WITH want AS (SELECT * FROM unnest($1::text[], $2::uuid[]) WITH ORDINALITY AS w(key, event_id, n)),
		claimed AS (
			INSERT INTO email_sends AS s (key, event_id, claimed_by, lease_until)
			SELECT key, event_id, $3, now() + $4::interval FROM want ORDER BY n
			ON CONFLICT (key) DO UPDATE
			SET claimed_by = EXCLUDED.claimed_by, lease_until = EXCLUDED.lease_until,
			    event_id = EXCLUDED.event_id, attempts = s.attempts + 1
			WHERE s.sent_at IS NULL AND s.lease_until < now()
			RETURNING s.key)
		SELECT w.key, c.key IS NOT NULL, coalesce(e.sent_at IS NOT NULL, false)
		FROM want w LEFT JOIN claimed c USING (key) LEFT JOIN email_sends e ON e.key = w.key`,
		sortedKeys, sortedIDs, consumer, s.lease)
	if err != nil {
		return nil, fmt.Errorf("claim %d sends: %w", len(keys), err)
	}
	states := make(map[string]claimState, len(keys))
	var key string
	var got, sent bool
	_, err = pgx.ForEachRow(rows, []any{&key, &got, &sent}, func() error {
		switch {
		case got:
			states[key] = claimed
		case sent:
			states[key] = alreadySent
		default:
			states[key] = leasedElsewhere
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("claim %d sends: %w", len(keys), err)
	}
	return states, nil
}

// Ping checks that the send records can be reached.
func (s *Sends) Ping(ctx context.Context) error {
	if err := s.pool.Ping(ctx); err != nil {
		return fmt.Errorf("reach send records: %w", err)
	}
	return nil
}

// MarkSent records that the mail server accepted the messages of keys (with
// their Message-IDs), in one statement.
func (s *Sends) MarkSent(ctx context.Context, keys, messageIDs []string) error {
	_, err := s.pool.Exec(ctx, `
		UPDATE email_sends AS s SET sent_at = now(), message_id = m.id, claimed_by = NULL, lease_until = NULL
		FROM unnest($1::text[], $2::text[]) AS m(key, id)
		WHERE s.key = m.key AND s.sent_at IS NULL`, keys, messageIDs)
	if err != nil {
		return fmt.Errorf("mark %d sends sent: %w", len(keys), err)
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
