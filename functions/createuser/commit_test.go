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
	atCommit(t, b, "hold_commit", `PERFORM pg_sleep(2);`)

	const body = `{"email":"held@example.com","name":"Held"}`
	start := time.Now()
	res := b.post(t, body, "Idempotency-Key", "held-1")
	require.Equal(t, http.StatusServiceUnavailable, res.Status, res.Raw)
	assert.Less(t, time.Since(start), 2*time.Second, "given up before the database answered")
	assert.Contains(t, res.Raw, "may or may not exist", "not 'nothing was written'")

	// DROP waits for the held transaction to end, whichever way it ends.
	_, err := b.pool.Exec(ctx, `DROP TRIGGER hold_commit ON users`)
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

// The other outcome of an unconfirmed COMMIT: the database commits after
// the function gave up (a trigger that shrugs off pgx's cancel stands in
// for a commit that had already happened). The answer must not say that
// nothing was written, and the retry with the same key must replay the
// 201, not create a second user.
func TestACommitThatLandsAfterTheFunctionGaveUpIsReplayedToTheRetry(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.svc.commitTimeout = 200 * time.Millisecond
	ctx := context.Background()
	atCommit(t, b, "hold_commit", `BEGIN PERFORM pg_sleep(1); EXCEPTION WHEN query_canceled THEN PERFORM pg_sleep(1); END;`)

	const body = `{"email":"late@example.com","name":"Late"}`
	res := b.post(t, body, "Idempotency-Key", "late-1")
	require.Equal(t, http.StatusServiceUnavailable, res.Status, res.Raw)
	assert.Contains(t, res.Raw, "may or may not exist")

	_, err := b.pool.Exec(ctx, `DROP TRIGGER hold_commit ON users`)
	require.NoError(t, err)
	retry := b.post(t, body, "Idempotency-Key", "late-1")
	require.Equal(t, http.StatusCreated, retry.Status, retry.Raw)
	assert.Equal(t, "true", retry.Header.Get("Idempotent-Replayed"), "the first request's commit landed")
	assert.Equal(t, [3]int{1, 1, 1}, b.counts(t), "one user, one event, one key")
}

// COMMIT runs under a deadline on the connection's socket. Every way a
// request can end must hand the connection back to the pool without it:
// with one connection in the pool, a request after commitTimeout has passed
// reuses it, and would fail with a timeout if the deadline were left.
func TestAConnectionGoesBackToThePoolWithoutTheCommitsDeadline(t *testing.T) {
	t.Parallel()
	b := setup(t, func(c *Config) { c.DBMaxConns = 1 })
	b.svc.commitTimeout = 150 * time.Millisecond
	atCommit(t, b, "refuse_commit", `IF NEW.name = 'Refused' THEN RAISE EXCEPTION 'refused at commit'; END IF;`)

	for i, tt := range []struct {
		name, body, key string
		want            int
	}{
		{"a created user", `{"email":"a@example.com","name":"A"}`, "k-a", http.StatusCreated},
		{"a replayed key", `{"email":"a@example.com","name":"A"}`, "k-a", http.StatusCreated},
		{"a taken email", `{"email":"a@example.com","name":"A"}`, "", http.StatusConflict},
		{"a COMMIT the database refused", `{"email":"r@example.com","name":"Refused"}`, "", http.StatusInternalServerError},
		{"a user after them all", `{"email":"z@example.com","name":"Z"}`, "", http.StatusCreated},
	} {
		time.Sleep(300 * time.Millisecond) // past commitTimeout
		var res response
		if tt.key != "" {
			res = b.post(t, tt.body, "Idempotency-Key", tt.key)
		} else {
			res = b.post(t, tt.body)
		}
		assert.Equal(t, tt.want, res.Status, "%d %s: %s", i, tt.name, res.Raw)
	}
}

// atCommit runs body (PL/pgSQL) at the COMMIT of every transaction that
// inserted a user, as a deferred constraint trigger named name.
func atCommit(t *testing.T, b *testBundle, name, body string) {
	t.Helper()
	_, err := b.pool.Exec(context.Background(), `
		CREATE FUNCTION `+name+`() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN `+body+` RETURN NULL; END $$;
		CREATE CONSTRAINT TRIGGER `+name+` AFTER INSERT ON users
			DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION `+name+`()`)
	require.NoError(t, err)
}
