package sendemail

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
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
// A claim is taken for one email ahead of its conversation, together with
// a few others in one statement (ClaimAhead), or right before it (Claim,
// also to renew a claim taken ahead under the same token), under a token
// drawn for that claim, and lasts the lease. Only the
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

// claimRequest asks for the send of key under token.
type claimRequest struct{ key, eventID, token string }

// Claim takes the sends of reqs, each under its own token, in one
// statement: a key is claimed unless it was sent already or another
// claim's lease on it is still running. A claim asked for again under the
// token that holds it is renewed (its lease starts again), whether or not
// the lease ran out meanwhile: nobody else took it, or the token would be
// another's. Keys are locked in sorted order, so two consumers claiming
// overlapping keys cannot deadlock; each key appears once.
//
// Claim commits without waiting for its WAL flush, which suits a claim
// whose send follows at once; ClaimAhead waits for it.
func (s *Sends) Claim(ctx context.Context, reqs []claimRequest) ([]claimState, error) {
	return s.claim(ctx, reqs, false)
}

// ClaimAhead is Claim for the claims of a window of a batch, taken ahead
// of sends that may start a while later: its commit waits for the WAL
// flush (one flush for the window), so that a PostgreSQL crash cannot lose a claim
// that sends are still to rely on.
func (s *Sends) ClaimAhead(ctx context.Context, reqs []claimRequest) ([]claimState, error) {
	return s.claim(ctx, reqs, true)
}

func (s *Sends) claim(ctx context.Context, reqs []claimRequest, flush bool) ([]claimState, error) {
	sorted := slices.Clone(reqs)
	slices.SortFunc(sorted, func(a, b claimRequest) int { return strings.Compare(a.key, b.key) })
	keys, ids, tokens := make([]string, len(sorted)), make([]string, len(sorted)), make([]string, len(sorted))
	for i, r := range sorted {
		keys[i], ids[i], tokens[i] = r.key, r.eventID, r.token
	}
	// Every part of the statement sees the table as it was before the
	// INSERT, so "sent" describes the keys that were not claimed.
	//
	// Unless flush is set, the claim commits without waiting for its WAL
	// flush (synchronous_commit off for this transaction only): it is
	// visible to every other consumer at once, and the mark that follows
	// it (which does wait) flushes it too. Only a PostgreSQL crash within
	// the WAL writer's delay (200 ms) of a claim can lose it; that costs a
	// duplicate only if another consumer then claims the email while its
	// send is still under way.
	commit := "off"
	if flush {
		commit = "on"
	}
	rows, err := s.pool.Query(ctx, `
		WITH want AS (SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[]) WITH ORDINALITY AS w(key, event_id, token, n)),
		claimed AS (
			INSERT INTO email_sends AS s (key, event_id, claimed_by, lease_until)
			SELECT key, event_id, token, now() + $4::interval FROM want ORDER BY n
			ON CONFLICT (key) DO UPDATE
			SET claimed_by = EXCLUDED.claimed_by, lease_until = EXCLUDED.lease_until, event_id = EXCLUDED.event_id,
			    attempts = s.attempts + CASE WHEN s.claimed_by = EXCLUDED.claimed_by THEN 0 ELSE 1 END
			WHERE s.sent_at IS NULL
			  AND (s.claimed_by = EXCLUDED.claimed_by OR coalesce(s.lease_until, '-infinity') < now())
			RETURNING s.key)
		SELECT w.key, c.key IS NOT NULL, coalesce(e.sent_at IS NOT NULL, false)
		FROM want w LEFT JOIN claimed c USING (key) LEFT JOIN email_sends e ON e.key = w.key
		CROSS JOIN (SELECT set_config('synchronous_commit', $5, true)) AS commit`,
		keys, ids, tokens, s.lease, commit)
	if err != nil {
		return nil, fmt.Errorf("claim %d sends: %w", len(reqs), err)
	}
	byKey := make(map[string]claimState, len(reqs))
	var key string
	var got, sent bool
	_, err = pgx.ForEachRow(rows, []any{&key, &got, &sent}, func() error {
		switch {
		case got:
			byKey[key] = claimed
		case sent:
			byKey[key] = alreadySent
		default:
			byKey[key] = leasedElsewhere
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("claim %d sends: %w", len(reqs), err)
	}
	states := make([]claimState, len(reqs))
	for i, r := range reqs {
		states[i] = byKey[r.key]
	}
	return states, nil
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

// ReleaseUnstarted gives up claims taken ahead of sends that never
// started (shutdown, or a database failure stopped the batch), in one
// statement, so that the emails wait for nobody's lease.
func (s *Sends) ReleaseUnstarted(ctx context.Context, reqs []claimRequest) error {
	keys, tokens := make([]string, len(reqs)), make([]string, len(reqs))
	for i, r := range reqs {
		keys[i], tokens[i] = r.key, r.token
	}
	// Rows are locked in key order, as Claim locks them.
	if _, err := s.pool.Exec(ctx, `
		WITH r AS (SELECT * FROM unnest($1::text[], $2::text[]) AS r(key, token)),
		held AS (SELECT s.key FROM email_sends s JOIN r ON s.key = r.key AND s.claimed_by = r.token
			WHERE s.sent_at IS NULL ORDER BY s.key FOR UPDATE OF s)
		UPDATE email_sends AS s SET lease_until = now()
		FROM r JOIN held USING (key)
		WHERE s.key = r.key AND s.claimed_by = r.token AND s.sent_at IS NULL`, keys, tokens); err != nil {
		return fmt.Errorf("release %d unstarted sends: %w", len(reqs), err)
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
