package createuser

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A COMMIT that waits for a synchronous standby has its commit record on
// disk already. When the backend is terminated then (pg_terminate_backend,
// or a fast shutdown's SIGTERM: a Cloud SQL maintenance restart), the
// server answers with its own error, FATAL 57P01, after a WARNING that "the
// transaction has already committed locally". The server's own error is no
// proof of a rollback: the answer must not say "nothing was written" for a
// user who exists.
func TestACommitTerminatedWhileWaitingForTheStandbyDoesNotSayNothingWasWritten(t *testing.T) {
	b, url, _ := behindAGhostStandby(t) // the termination, not the commit's bound, ends the wait

	const body = `{"email":"terminated@example.com","name":"Terminated"}`
	done := make(chan response, 1)
	go func() { done <- b.post(t, body, "Idempotency-Key", "term-1") }()
	time.Sleep(1500 * time.Millisecond) // the COMMIT is waiting for the ghost standby

	admin, err := pgx.Connect(context.Background(), url)
	require.NoError(t, err)
	defer admin.Close(context.Background())
	var n int
	require.NoError(t, admin.QueryRow(context.Background(),
		`SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE wait_event = 'SyncRep'`).Scan(&n))
	require.Equal(t, 1, n, "one backend waited for the standby")
	first := <-done

	var users int
	require.NoError(t, admin.QueryRow(context.Background(), `SELECT count(*) FROM users`).Scan(&users))
	require.Equal(t, 1, users, "the user exists: the COMMIT was on disk")
	require.Equal(t, http.StatusServiceUnavailable, first.Status, first.Raw)
	assert.NotContains(t, first.Raw, "nothing was written", "the answer to a request whose user exists")
	assert.Contains(t, first.Raw, "may or may not exist")
}
