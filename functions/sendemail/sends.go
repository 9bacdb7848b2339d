package sendemail

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// claimState is the answer to a send claim.
type claimState int

const (
	// claimed: this consumer may send now.
	claimed claimState = iota
	// alreadySent: the email went out before; do not send it again.
	alreadySent
	// leasedElsewhere: another claim on it is still running.
	leasedElsewhere
)

// Sends keeps the send records in PostgreSQL: durable, and shared by every
// consumer instance.
//
// A claim is taken for one email right before each conversation about it,
// under a token drawn for that claim, and lasts the lease. Only the
// token's holder can release it, count a failure or forget it; a mark
// records the email as sent whoever holds the claim, because that is a fact
// (and says whether the claim was still this one's).
type Sends struct {
	pool  *pgxpool.Pool
	lease time.Duration
}

// newToken draws a claim token: the consumer's name, for the operator, and
// a random part, so that two deliveries of one email inside one process
// never pass for each other.
func newToken(consumer string) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return consumer + "/" + hex.EncodeToString(b)
}

// Claim takes the send of key under token unless it was sent already or
// another claim's lease is still running. It returns the failures counted
// so far.
func (s *Sends) Claim(ctx context.Context, key, eventID, token string) (claimState, int64, error) {
	var got, sent bool
	var failures int64
	err := s.pool.QueryRow(ctx, `
		WITH claimed AS (
			INSERT INTO email_sends AS s (key, event_id, claimed_by, lease_until)
			VALUES ($1, $2, $3, now() + $4::interval)
			ON CONFLICT (key) DO UPDATE
			SET claimed_by = EXCLUDED.claimed_by, lease_until = EXCLUDED.lease_until,
			    event_id = EXCLUDED.event_id, attempts = s.attempts + 1
			WHERE s.sent_at IS NULL AND coalesce(s.lease_until, '-infinity') < now()
			RETURNING s.failures)
		SELECT EXISTS (SELECT FROM claimed),
		       coalesce((SELECT sent_at IS NOT NULL FROM email_sends WHERE key = $1), false),
		       coalesce((SELECT failures FROM claimed), 0)`,
		key, eventID, token, s.lease).Scan(&got, &sent, &failures)
	if err != nil {
		return 0, 0, fmt.Errorf("claim send %s: %w", key, err)
	}
	switch {
	case got:
		return claimed, failures, nil
	case sent:
		return alreadySent, 0, nil
	default:
		return leasedElsewhere, 0, nil
	}
}

// Ping checks that the send records can be written: a database that
// answers but refuses writes (read-only, disk full) is as good as down.
func (s *Sends) Ping(ctx context.Context) error {
	if _, err := s.pool.Exec(ctx, `UPDATE email_sends SET key = key WHERE false`); err != nil {
		return fmt.Errorf("reach send records: %w", err)
	}
	return nil
}

// mark is one email the mail server accepted.
type mark struct{ key, token, messageID string }

// MarkSent records that the mail server accepted the messages, in one
// statement, and returns the keys whose claim was no longer the marker's
// (they are recorded as sent all the same).
func (s *Sends) MarkSent(ctx context.Context, marks []mark) (lost []string, err error) {
	keys, tokens, ids := make([]string, len(marks)), make([]string, len(marks)), make([]string, len(marks))
	for i, m := range marks {
		keys[i], tokens[i], ids[i] = m.key, m.token, m.messageID
	}
	rows, err := s.pool.Query(ctx, `
		WITH m AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS m(key, token, id)),
		old AS (SELECT s.key, s.claimed_by, s.sent_at FROM email_sends s JOIN m USING (key) ORDER BY s.key FOR UPDATE OF s),
		upd AS (
			UPDATE email_sends AS s SET sent_at = now(), message_id = m.id, claimed_by = NULL, lease_until = NULL
			FROM m WHERE s.key = m.key AND s.sent_at IS NULL
			RETURNING s.key)
		SELECT m.key FROM m LEFT JOIN old USING (key)
		WHERE old.claimed_by IS DISTINCT FROM m.token AND old.sent_at IS NULL`, // upd runs whether read or not

		keys, tokens, ids)
	if err != nil {
		return nil, fmt.Errorf("mark %d sends sent: %w", len(marks), err)
	}
	lost, err = pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("mark %d sends sent: %w", len(marks), err)
	}
	return lost, nil
}

// Release gives up the claim token holds on key after a transient failure
// that is not counted (another try follows at once).
func (s *Sends) Release(ctx context.Context, key, token string) error {
	if _, err := s.pool.Exec(ctx, `UPDATE email_sends SET lease_until = now()
		WHERE key = $1 AND claimed_by = $2 AND sent_at IS NULL`, key, token); err != nil {
		return fmt.Errorf("release send %s: %w", key, err)
	}
	return nil
}

// Fail counts a failed delivery of key and returns the count. keepLease
// leaves the claim running (a send whose answer never came must not be
// retried before the lease ends); otherwise the claim is released. held is
// false when token no longer held the claim (nothing was counted).
func (s *Sends) Fail(ctx context.Context, key, token string, keepLease bool) (failures int64, held bool, err error) {
	err = s.pool.QueryRow(ctx, `UPDATE email_sends
		SET failures = failures + 1, lease_until = CASE WHEN $3 THEN lease_until ELSE now() END
		WHERE key = $1 AND claimed_by = $2 AND sent_at IS NULL RETURNING failures`, key, token, keepLease).Scan(&failures)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("count failed send %s: %w", key, err)
	}
	return failures, true, nil
}

// Forget deletes token's unsent record of key (the entry goes to the
// dead-letter stream), so that a redriven entry starts afresh.
func (s *Sends) Forget(ctx context.Context, key, token string) error {
	if _, err := s.pool.Exec(ctx, `DELETE FROM email_sends WHERE key = $1 AND claimed_by = $2 AND sent_at IS NULL`, key, token); err != nil {
		return fmt.Errorf("forget send %s: %w", key, err)
	}
	return nil
}

// entryFault says whether a database error is about the values of one
// entry (a data exception or a constraint, classes 22 and 23) rather than
// the database: such an entry can never succeed.
func entryFault(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (pgErr.Code[:2] == "22" || pgErr.Code[:2] == "23")
}
