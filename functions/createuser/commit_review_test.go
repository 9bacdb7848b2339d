package createuser

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

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
	_, err := b.pool.Exec(ctx, `
		CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			BEGIN PERFORM pg_sleep(1); EXCEPTION WHEN query_canceled THEN PERFORM pg_sleep(1); END;
			RETURN NULL;
		END $$;
		CREATE CONSTRAINT TRIGGER hold_commit AFTER INSERT ON users
			DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION hold_commit()`)
	require.NoError(t, err)

	const body = `{"email":"late@example.com","name":"Late"}`
	res := b.post(t, body, "Idempotency-Key", "late-1")
	require.Equal(t, http.StatusServiceUnavailable, res.Status, res.Raw)
	assert.Contains(t, res.Raw, "may or may not exist")

	_, err = b.pool.Exec(ctx, `DROP TRIGGER hold_commit ON users`)
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
	ctx := context.Background()
	_, err := b.pool.Exec(ctx, `
		CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN IF NEW.name = 'Refused' THEN RAISE EXCEPTION 'refused at commit'; END IF; RETURN NULL; END $$;
		CREATE CONSTRAINT TRIGGER refuse_commit AFTER INSERT ON users
			DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_commit()`)
	require.NoError(t, err)

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
