package createuser

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A COMMIT that the database holds (here a deferred constraint trigger that
// sleeps; in production a synchronous standby that has gone away) is given
// up after commitTimeout. The answer cannot say that nothing was written:
// pgx sends a cancel as it drops the connection, which rolls this one back,
// but a commit waiting for a standby has committed locally and stays. Either
// way the retry with the same key must end with exactly one user and event.
func TestACommitLeftUnansweredIsGivenUpAndSaysTheUserMayExist(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.svc.commitTimeout = 200 * time.Millisecond
	ctx := context.Background()
	_, err := b.pool.Exec(ctx, `
		CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$;
		CREATE CONSTRAINT TRIGGER hold_commit AFTER INSERT ON users
			DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION hold_commit()`)
	require.NoError(t, err)

	const body = `{"email":"held@example.com","name":"Held"}`
	start := time.Now()
	res := b.post(t, body, "Idempotency-Key", "held-1")
	require.Equal(t, http.StatusServiceUnavailable, res.Status, res.Raw)
	assert.Less(t, time.Since(start), 2*time.Second, "given up before the database answered")
	assert.Contains(t, res.Raw, "may or may not exist", "not 'nothing was written'")

	// DROP waits for the held transaction to end, whichever way it ends.
	_, err = b.pool.Exec(ctx, `DROP TRIGGER hold_commit ON users`)
	require.NoError(t, err)
	retry := b.post(t, body, "Idempotency-Key", "held-1")
	require.Equal(t, http.StatusCreated, retry.Status, "the retry learns the outcome: %s", retry.Raw)
	var users, events int
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM outbox)`).Scan(&users, &events))
	assert.Equal(t, 1, users)
	assert.Equal(t, 1, events)

	// And the pool did not keep the connection it gave up on.
	again := b.post(t, `{"email":"after@example.com","name":"After"}`)
	assert.Equal(t, http.StatusCreated, again.Status, again.Raw)
}
