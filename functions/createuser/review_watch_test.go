package createuser

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Review (hostile): requests whose deadline or client cancellation races
// every statement of the transaction, commit included. Each answer must
// match what the database holds: a 201 is committed with its event, any
// other answer wrote nothing (README: "nothing was written"), and no
// connection cut off by watchOnce ever serves a later request.
func TestAnswersMatchTheDatabaseWhenDeadlinesRaceTheTransaction(t *testing.T) {
	for _, tc := range []struct {
		name    string
		timeout time.Duration
		cancel  bool // cancel the request's own context at a random moment
		limit   bool // with the rate limiter on (its own statements first)
	}{
		{"request timeout races the transaction", 2 * time.Millisecond, false, false},
		{"request timeout races the transaction and the rate limiter", 10 * time.Millisecond, false, true},
		{"client disconnects race the transaction", 5 * time.Second, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := setup(t, func(c *Config) {
				c.RequestTimeout, c.DBMaxConns = tc.timeout, 4
				if tc.limit {
					c.RateLimitWindow, c.RateLimitPerAddress, c.RateLimitPerDomain = time.Second, 1_000_000, 1_000_000
				}
			})
			const workers, perWorker = 8, 150
			type answer struct {
				email  string
				key    string
				status int
				raw    string
			}
			answers := make(chan answer, workers*perWorker)
			var wg sync.WaitGroup
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range perWorker {
						email := fmt.Sprintf("u%d-%d@example.com", w, i)
						key := ""
						if i%2 == 0 {
							key = fmt.Sprintf("k-%d-%d", w, i)
						}
						ctx, cancel := context.WithCancel(context.Background())
						if tc.cancel {
							time.AfterFunc(time.Duration(rand.IntN(15000))*time.Microsecond, cancel)
						}
						req := httptest.NewRequestWithContext(ctx, http.MethodPost, "/", strings.NewReader(`{"email":"`+email+`","name":"N"}`))
						req.Header.Set("Content-Type", "application/json")
						if key != "" {
							req.Header.Set("Idempotency-Key", key)
						}
						rec := httptest.NewRecorder()
						b.svc.ServeHTTP(rec, req)
						cancel()
						answers <- answer{email, key, rec.Code, rec.Body.String()}
					}
				}()
			}
			wg.Wait()
			close(answers)

			ctx := context.Background()
			committed := map[string]bool{}
			rows, err := b.pool.Query(ctx, `SELECT u.email, EXISTS (SELECT 1 FROM outbox o WHERE o.aggregate_id = u.id::text) FROM users u`)
			require.NoError(t, err)
			for rows.Next() {
				var email string
				var withEvent bool
				require.NoError(t, rows.Scan(&email, &withEvent))
				require.True(t, withEvent, "user %s committed without its event", email)
				committed[email] = true
			}
			require.NoError(t, rows.Err())
			var unanswered int
			require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM idempotency_keys WHERE status = 0`).Scan(&unanswered))
			require.Zero(t, unanswered, "a reserved key was committed without its answer")

			byStatus := map[int]int{}
			var lies []string
			for a := range answers {
				byStatus[a.status]++
				switch {
				case a.status == http.StatusCreated && !committed[a.email]:
					lies = append(lies, fmt.Sprintf("201 but not committed: %s", a.email))
				case a.status != http.StatusCreated && committed[a.email]:
					lies = append(lies, fmt.Sprintf("%d (%s) but committed: %s key=%q", a.status, strings.TrimSpace(a.raw), a.email, a.key))
				}
			}
			t.Logf("answers by status: %v; committed users: %d", byStatus, len(committed))
			for s := range byStatus {
				require.Contains(t, []int{http.StatusCreated, http.StatusServiceUnavailable}, s, "unexpected status")
			}
			// The pool is healthy afterwards: every connection serves.
			b.svc.cfg.RequestTimeout = 5 * time.Second // every worker is done
			for i := range 40 {
				res := b.post(t, fmt.Sprintf(`{"email":"after%d@example.com","name":"N"}`, i))
				require.Equal(t, http.StatusCreated, res.Status, res.Raw)
			}
			require.Empty(t, lies, "answers that do not match the database")

		})
	}
}

// Review (hostile): requests racing for one Idempotency-Key (the later ones
// wait on the first one's row lock) while client disconnects cut them at
// random: each key yields at most one user, every 201 for a key carries the
// same body, and a 503 never hides a commit (its retry replays the answer).
func TestRequestsRacingForOneKeyUnderDisconnectsAgreeOnOneAnswer(t *testing.T) {
	b := setup(t, func(c *Config) { c.DBMaxConns = 8 })
	const keys, racers = 60, 6
	type answer struct {
		status int
		body   string
	}
	got := make([][]answer, keys)
	var mu sync.Mutex
	for k := range keys {
		var wg sync.WaitGroup
		for range racers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				time.AfterFunc(time.Duration(rand.IntN(20000))*time.Microsecond, cancel)
				req := httptest.NewRequestWithContext(ctx, http.MethodPost, "/",
					strings.NewReader(fmt.Sprintf(`{"email":"k%d@example.com","name":"N"}`, k)))
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("Idempotency-Key", fmt.Sprintf("key-%d", k))
				rec := httptest.NewRecorder()
				b.svc.ServeHTTP(rec, req)
				mu.Lock()
				got[k] = append(got[k], answer{rec.Code, rec.Body.String()})
				mu.Unlock()
			}()
		}
		wg.Wait()
	}
	ctx := context.Background()
	for k := range keys {
		var users int
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM users WHERE email = $1`, fmt.Sprintf("k%d@example.com", k)).Scan(&users))
		require.LessOrEqual(t, users, 1)
		var first string
		for _, a := range got[k] {
			require.Contains(t, []int{http.StatusCreated, http.StatusServiceUnavailable}, a.status, a.body)
			if a.status == http.StatusCreated {
				if first == "" {
					first = a.body
				}
				require.Equal(t, first, a.body, "key %d answered two different 201s", k)
			}
		}
		// The retry, undisturbed, gets the committed answer or creates it.
		res := b.post(t, fmt.Sprintf(`{"email":"k%d@example.com","name":"N"}`, k), "Idempotency-Key", fmt.Sprintf("key-%d", k))
		require.Equal(t, http.StatusCreated, res.Status, res.Raw)
		if users == 1 {
			require.Equal(t, "true", res.Header.Get("Idempotent-Replayed"), "key %d: a committed user's retry is a replay", k)
		}
		if first != "" {
			require.JSONEq(t, first, res.Raw)
		}
	}
}
