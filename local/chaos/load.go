package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// loadResult is what the clients saw.
type loadResult struct {
	// created maps each email whose 201 a client saw to the user id in it.
	created map[string]int64
	// ackedAt is when each of those 201s arrived.
	ackedAt map[string]time.Time
	// gaveUp counts signups abandoned after retrying for signupPatience.
	gaveUp int
	// refused counts answers other than 201 and 503 (none are expected).
	refused  int
	retries  int
	examples []string // a few of the refusals, for the report
}

// signupPatience is how long one signup is retried (503, connection
// refused or reset, timeout) with its Idempotency-Key before the client
// gives up: longer than any outage a fault causes.
const signupPatience = 60 * time.Second

// signUp creates n users through createuser over HTTP, spread evenly over
// duration, eight clients at a time. Each retries 503s and connection
// errors with the same Idempotency-Key (the email), so a request whose
// answer was lost is answered again, not created twice.
func signUp(ctx context.Context, base, tag string, n int, duration time.Duration) loadResult {
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	defer client.CloseIdleConnections()
	res := loadResult{created: make(map[string]int64, n), ackedAt: make(map[string]time.Time, n)}
	var mu sync.Mutex
	var next atomic.Int64
	start := time.Now()
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(n) || ctx.Err() != nil {
					return
				}
				// Paced: signup i is sent at start + i × duration / n.
				if wait := time.Until(start.Add(time.Duration(i) * duration / time.Duration(n))); wait > 0 {
					select {
					case <-ctx.Done():
						return
					case <-time.After(wait):
					}
				}
				email := fmt.Sprintf("user%05d.%s@mail.example.com", i, tag)
				id, retries, err := signUpOne(ctx, client, base, email, fmt.Sprintf("User %d", i), fmt.Sprintf("10.%d.%d.%d", w, i/250%250, i%250))
				mu.Lock()
				res.retries += retries
				switch {
				case err == nil:
					res.created[email] = id
					res.ackedAt[email] = time.Now()
				case err == errGaveUp:
					res.gaveUp++
				default:
					res.refused++
					if len(res.examples) < 3 {
						res.examples = append(res.examples, err.Error())
					}
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return res
}

var errGaveUp = fmt.Errorf("gave up after %s", signupPatience)

// signUpOne posts one signup until it gets an answer other than 503 or a
// connection error, or signupPatience passes.
func signUpOne(ctx context.Context, client *http.Client, base, email, name, forwardedFor string) (id int64, retries int, err error) {
	body, _ := json.Marshal(map[string]string{"email": email, "name": name})
	deadline := time.Now().Add(signupPatience)
	for ; ; retries++ {
		if retries > 0 {
			if time.Now().After(deadline) {
				return 0, retries, errGaveUp
			}
			select {
			case <-ctx.Done():
				return 0, retries, errGaveUp
			case <-time.After(200 * time.Millisecond):
			}
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/", bytes.NewReader(body))
		if err != nil {
			return 0, retries, err
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", email)
		req.Header.Set("X-Forwarded-For", forwardedFor)
		res, err := client.Do(req)
		if err != nil {
			continue // refused, reset, timed out: the same key again
		}
		answer, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10))
		res.Body.Close()
		switch res.StatusCode {
		case http.StatusCreated:
			var u struct {
				ID int64 `json:"id"`
			}
			if err := json.Unmarshal(answer, &u); err != nil || u.ID == 0 {
				return 0, retries, fmt.Errorf("%s: 201 with an unreadable body %q", email, answer)
			}
			return u.ID, retries, nil
		case http.StatusServiceUnavailable, http.StatusBadGateway:
			continue
		default:
			return 0, retries, fmt.Errorf("%s: %d %s", email, res.StatusCode, bytes.TrimSpace(answer))
		}
	}
}
