package createuser

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/pgtest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

type testBundle struct {
	svc  *Service
	cfg  Config
	pool *pgxpool.Pool // a separate pool for the test's own queries
}

func setup(t testing.TB, mutate ...func(*Config)) *testBundle {
	t.Helper()
	url, pool := pgtest.NewPool(t)
	cfg := Config{
		Config:         logging.Config{LogFormat: "text", LogLevel: "info"},
		DatabaseURL:    url,
		DBMaxConns:     8,
		RequestTimeout: 5 * time.Second,
	}
	for _, m := range mutate {
		m(&cfg)
	}
	svc, err := New(context.Background(), cfg, logging.Discard())
	require.NoError(t, err)
	t.Cleanup(svc.Close)
	return &testBundle{svc: svc, cfg: cfg, pool: pool}
}

type response struct {
	Status int
	Header http.Header
	Body   map[string]any
	Raw    string
}

func (b *testBundle) post(t *testing.T, body string, header ...string) response {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	return do(t, b.svc, req)
}

func do(t *testing.T, h http.Handler, req *http.Request) response {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	res := response{Status: rec.Code, Header: rec.Header(), Raw: rec.Body.String()}
	require.Equal(t, "application/json", rec.Header().Get("Content-Type"), "every answer is JSON: %s", res.Raw)
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &res.Body), "body: %s", res.Raw)
	return res
}

func errorCode(t *testing.T, r response) string {
	t.Helper()
	e, ok := r.Body["error"].(map[string]any)
	require.True(t, ok, "an error body has an error object: %s", r.Raw)
	require.NotEmpty(t, e["message"], "an error says what to fix")
	return e["code"].(string)
}

// counts returns the number of users, outbox rows and idempotency keys.
func (b *testBundle) counts(t *testing.T) [3]int {
	t.Helper()
	var c [3]int
	err := b.pool.QueryRow(context.Background(),
		`SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM outbox), (SELECT count(*) FROM idempotency_keys)`).
		Scan(&c[0], &c[1], &c[2])
	require.NoError(t, err)
	return c
}

func TestCreateUser(t *testing.T) {
	t.Parallel()

	t.Run("creates the user and its event in one transaction", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		tp := "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
		res := b.post(t, `{"email":"Ada@Example.com","name":"  Ada Lovelace "}`, "Traceparent", tp)
		require.Equal(t, http.StatusCreated, res.Status, res.Raw)
		require.Equal(t, "Ada@example.com", res.Body["email"], "the domain is stored in its canonical lower-case form")
		require.Equal(t, "Ada Lovelace", res.Body["name"], "surrounding space is trimmed")
		id := int64(res.Body["id"].(float64))
		require.Positive(t, id)
		_, err := time.Parse(time.RFC3339Nano, res.Body["created_at"].(string))
		require.NoError(t, err)

		var aggType, aggID, eventType, payload, traceparent string
		var eventID string
		err = b.pool.QueryRow(context.Background(),
			`SELECT event_id::text, aggregate_type, aggregate_id, event_type, payload::text, traceparent FROM outbox`).
			Scan(&eventID, &aggType, &aggID, &eventType, &payload, &traceparent)
		require.NoError(t, err)
		require.Len(t, eventID, 36)
		require.Equal(t, "user", aggType)
		require.Equal(t, fmt.Sprint(id), aggID)
		require.Equal(t, "user.created", eventType)
		require.JSONEq(t, fmt.Sprintf(`{"user_id":%d,"email":"Ada@example.com","name":"Ada Lovelace"}`, id), payload)
		require.Equal(t, tp, traceparent)
		require.Equal(t, [3]int{1, 1, 0}, b.counts(t))
	})

	t.Run("keeps the name out of the event when told to, and stores it with the user", func(t *testing.T) {
		t.Parallel()
		b := setup(t, func(c *Config) { c.OmitNameFromEvent = true })
		res := b.post(t, `{"email":"ada@example.com","name":"Click https://evil.example now"}`)
		require.Equal(t, http.StatusCreated, res.Status, res.Raw)
		require.Equal(t, "Click https://evil.example now", res.Body["name"])
		var payload, name string
		require.NoError(t, b.pool.QueryRow(context.Background(),
			`SELECT (SELECT payload::text FROM outbox), (SELECT name FROM users)`).Scan(&payload, &name))
		require.JSONEq(t, fmt.Sprintf(`{"user_id":%d,"email":"ada@example.com","name":""}`, int64(res.Body["id"].(float64))), payload)
		require.Equal(t, "Click https://evil.example now", name)
	})

	t.Run("drops a malformed traceparent instead of refusing the user", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		res := b.post(t, `{"email":"a@example.com","name":"A"}`, "Traceparent", "00-zz-bad")
		require.Equal(t, http.StatusCreated, res.Status, res.Raw)
		var traceparent *string
		require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT traceparent FROM outbox`).Scan(&traceparent))
		require.Nil(t, traceparent)
	})

	t.Run("refuses bad input with a 4xx and writes nothing", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		long := strings.Repeat("a", 250) + "@example.com"
		// 254 bytes as sent; each label grows by "xn--" and more as punycode.
		label := strings.Repeat("b", 50) + "ä"
		punyLong := strings.Repeat("a", 38) + "@" + strings.Repeat(label+".", 4) + "com"
		require.Len(t, punyLong, 254)
		tests := []struct {
			name        string
			body        string
			contentType string
			header      []string
			status      int
			code        string
		}{
			{"malformed JSON", `{"email":`, "", nil, 400, "malformed_json"},
			{"an empty body", ``, "", nil, 400, "malformed_json"},
			{"a JSON array", `[1,2]`, "", nil, 400, "malformed_json"},
			{"trailing data", `{"email":"a@example.com","name":"A"} {}`, "", nil, 400, "malformed_json"},
			{"an unknown field", `{"email":"a@example.com","name":"A","admin":true}`, "", nil, 400, "unknown_field"},
			{"a missing email", `{"name":"A"}`, "", nil, 400, "missing_field"},
			{"a missing name", `{"email":"a@example.com"}`, "", nil, 400, "missing_field"},
			{"a number for the email", `{"email":5,"name":"A"}`, "", nil, 400, "invalid_field"},
			{"an empty email", `{"email":"","name":"A"}`, "", nil, 400, "invalid_email"},
			{"an email with a display name", `{"email":"Ada <ada@example.com>","name":"A"}`, "", nil, 400, "invalid_email"},
			{"two addresses", `{"email":"a@example.com, b@example.com","name":"A"}`, "", nil, 400, "invalid_email"},
			{"an address without a domain", `{"email":"ada","name":"A"}`, "", nil, 400, "invalid_email"},
			{"an address with CRLF", `{"email":"a@example.com\r\nBcc: x@evil.com","name":"A"}`, "", nil, 400, "invalid_email"},
			{"an address over 254 bytes", `{"email":"` + long + `","name":"A"}`, "", nil, 400, "invalid_email"},
			{"an address literal for a domain", `{"email":"x@[10.0.0.5]","name":"A"}`, "", nil, 400, "invalid_email"},
			{"an IPv6 address literal", `{"email":"x@[IPv6:::1]","name":"A"}`, "", nil, 400, "invalid_email"},
			{"a domain without a dot", `{"email":"x@localhost","name":"A"}`, "", nil, 400, "invalid_email"},
			{"an IP address for a domain", `{"email":"x@10.0.0.5","name":"A"}`, "", nil, 400, "invalid_email"},
			{"a special-use domain", `{"email":"x@metadata.google.internal","name":"A"}`, "", nil, 400, "invalid_email"},
			{"an underscore in the domain", `{"email":"x@exa_mple.com","name":"A"}`, "", nil, 400, "invalid_email"},
			{"a bad punycode label", `{"email":"x@xn--a.com","name":"A"}`, "", nil, 400, "invalid_email"},
			{"an address over 254 bytes once its domain is punycode", `{"email":"` + punyLong + `","name":"A"}`, "", nil, 400, "invalid_email"},
			{"a repeated field", `{"email":"a@example.com","name":"A","email":"evil@example.com"}`, "", nil, 400, "duplicate_field"},
			{"a field name in another letter case", `{"email":"a@example.com","EMAIL":"evil@example.com","name":"A"}`, "", nil, 400, "unknown_field"},
			{"a field name matched only by Unicode case folding", `{"email":"a@example.com","name":"A","\u017fame":"B"}`, "", nil, 400, "unknown_field"},
			{"invalid UTF-8 in the email", "{\"email\":\"inv2@exa\xffmple.com\",\"name\":\"A\"}", "", nil, 415, "unsupported_media_type"},
			{"invalid UTF-8 in the name", "{\"email\":\"a@example.com\",\"name\":\"A\xc3\"}", "", nil, 415, "unsupported_media_type"},
			{"invalid UTF-8 between fields", "{\"email\":\"a@example.com\",\xff\"name\":\"A\"}", "", nil, 400, "malformed_json"},
			{"an escaped lone high surrogate", `{"email":"a@example.com","name":"A\ud800"}`, "", nil, 400, "malformed_json"},
			{"an escaped lone low surrogate", `{"email":"a@example.com","name":"A\udc00B"}`, "", nil, 400, "malformed_json"},
			{"an escaped surrogate pair in the wrong order", `{"email":"a@example.com","name":"\udc00\ud800"}`, "", nil, 400, "malformed_json"},
			{"an empty name", `{"email":"a@example.com","name":""}`, "", nil, 400, "invalid_name"},
			{"a blank name", `{"email":"a@example.com","name":"   "}`, "", nil, 400, "invalid_name"},
			{"a name of 201 characters", `{"email":"a@example.com","name":"` + strings.Repeat("é", 201) + `"}`, "", nil, 400, "invalid_name"},
			{"a name with CRLF", `{"email":"a@example.com","name":"Ada\r\nBcc: x@evil.com"}`, "", nil, 400, "invalid_name"},
			{"a name with a NUL", `{"email":"a@example.com","name":"Ada\u0000"}`, "", nil, 400, "invalid_name"},
			{"a name with a bidi override", `{"email":"a@example.com","name":"Ada\u202e"}`, "", nil, 400, "invalid_name"},
			{"a name with a line separator", `{"email":"a@example.com","name":"Ada\u2028Bcc"}`, "", nil, 400, "invalid_name"},
			{"a name of only a zero-width space", `{"email":"a@example.com","name":"\u200b"}`, "", nil, 400, "invalid_name"},
			{"a name of only a byte order mark", `{"email":"a@example.com","name":" \ufeff "}`, "", nil, 400, "invalid_name"},
			{"a name with a right-to-left mark", `{"email":"a@example.com","name":"Ada\u200f"}`, "", nil, 400, "invalid_name"},
			{"a local part of 65 bytes", `{"email":"` + strings.Repeat("a", 65) + `@example.com","name":"Ada"}`, "", nil, 400, "invalid_email"},
			{"a text body", `email=a@example.com`, "text/plain", nil, 415, "unsupported_media_type"},
			{"no content type", `{"email":"a@example.com","name":"A"}`, "-", nil, 415, "unsupported_media_type"},
			{"a latin-1 body", `{"email":"a@example.com","name":"A"}`, "application/json; charset=latin1", nil, 415, "unsupported_media_type"},
			{"a body over 64 KiB", `{"email":"a@example.com","name":"` + strings.Repeat("a", 64<<10) + `"}`, "", nil, 413, "body_too_large"},
			{"an idempotency key with spaces", `{"email":"a@example.com","name":"A"}`, "", []string{"Idempotency-Key", "a b"}, 400, "invalid_idempotency_key"},
			{"an idempotency key over 255 bytes", `{"email":"a@example.com","name":"A"}`, "", []string{"Idempotency-Key", strings.Repeat("k", 256)}, 400, "invalid_idempotency_key"},
		}
		for _, tt := range tests {
			req := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(tt.body))
			switch tt.contentType {
			case "":
				req.Header.Set("Content-Type", "application/json")
			case "-":
			default:
				req.Header.Set("Content-Type", tt.contentType)
			}
			for i := 0; i+1 < len(tt.header); i += 2 {
				req.Header.Set(tt.header[i], tt.header[i+1])
			}
			res := do(t, b.svc, req)
			require.Equal(t, tt.status, res.Status, "%s: %s", tt.name, res.Raw)
			require.Equal(t, tt.code, errorCode(t, res), tt.name)
		}
		require.Equal(t, [3]int{0, 0, 0}, b.counts(t))
	})

	t.Run("accepts a name of exactly 200 characters and a body of exactly 64 KiB", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		res := b.post(t, `{"email":"a@example.com","name":"`+strings.Repeat("é", 200)+`"}`)
		require.Equal(t, http.StatusCreated, res.Status, res.Raw)
		body := `{"email":"b@example.com","name":"B"}`
		body += strings.Repeat(" ", 64<<10-len(body))
		res = b.post(t, body)
		require.Equal(t, http.StatusCreated, res.Status, res.Raw)
	})

	t.Run("accepts escapes of whole characters, and an escaped backslash before u", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		res := b.post(t, `{"email":"a@example.com","name":"A \ud83d\ude00 \\ud800 \u00e9"}`)
		require.Equal(t, http.StatusCreated, res.Status, res.Raw)
		require.Equal(t, `A 😀 \ud800 é`, res.Body["name"])
	})

	t.Run("treats a domain in Unicode and in punycode as one user and stores the punycode", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		res := b.post(t, `{"email":"ada@exämple.com","name":"Ada"}`)
		require.Equal(t, http.StatusCreated, res.Status, res.Raw)
		require.Equal(t, "ada@xn--exmple-cua.com", res.Body["email"])
		for _, email := range []string{
			"ada@xn--exmple-cua.com",
			"ada@XN--EXMPLE-CUA.COM",
			"ada@EXÄMPLE.com",
			"ada@exa\u0308mple.com", // a combining diaeresis: NFC makes it ä
			"ada@ｅｘäｍｐｌｅ.com",       // full-width letters map to ASCII
		} {
			res := b.post(t, fmt.Sprintf(`{"email":%q,"name":"Other"}`, email))
			require.Equal(t, http.StatusConflict, res.Status, "%s: %s", email, res.Raw)
			require.Equal(t, "email_taken", errorCode(t, res))
		}
		var stored, payload string
		require.NoError(t, b.pool.QueryRow(context.Background(),
			`SELECT (SELECT email FROM users), (SELECT payload::text FROM outbox)`).Scan(&stored, &payload))
		require.Equal(t, "ada@xn--exmple-cua.com", stored)
		require.Contains(t, payload, `"email":"ada@xn--exmple-cua.com"`, "the welcome email goes to the stored form")
		require.Equal(t, [3]int{1, 1, 0}, b.counts(t))
	})

	t.Run("answers other methods with 405 and an Allow header", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		for _, m := range []string{http.MethodGet, http.MethodPut, http.MethodDelete} {
			res := do(t, b.svc, httptest.NewRequest(m, "/", nil))
			require.Equal(t, http.StatusMethodNotAllowed, res.Status)
			require.Equal(t, "POST", res.Header.Get("Allow"))
			require.Equal(t, "method_not_allowed", errorCode(t, res))
		}
	})

	t.Run("refuses an email that exists in any letter case with 409", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		require.Equal(t, http.StatusCreated, b.post(t, `{"email":"ada@example.com","name":"Ada"}`).Status)
		res := b.post(t, `{"email":"ADA@example.COM","name":"Other"}`)
		require.Equal(t, http.StatusConflict, res.Status)
		require.Equal(t, "email_taken", errorCode(t, res))
		require.Equal(t, [3]int{1, 1, 0}, b.counts(t), "the failed attempt left no event behind")
	})

	t.Run("lets exactly one of many concurrent requests for one email succeed", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		const n = 20
		statuses := make(chan int, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				email := "Race@Example.com"
				if i%2 == 1 {
					email = "race@example.com"
				}
				statuses <- b.post(t, fmt.Sprintf(`{"email":%q,"name":"R%d"}`, email, i)).Status
			})
		}
		wg.Wait()
		close(statuses)
		got := map[int]int{}
		for s := range statuses {
			got[s]++
		}
		require.Equal(t, map[int]int{http.StatusCreated: 1, http.StatusConflict: n - 1}, got)
		require.Equal(t, [3]int{1, 1, 0}, b.counts(t))
	})

	t.Run("replays the first answer to a retry with the same Idempotency-Key", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		body := `{"email":"ada@example.com","name":"Ada"}`
		first := b.post(t, body, "Idempotency-Key", "req-1")
		require.Equal(t, http.StatusCreated, first.Status)
		again := b.post(t, `{"name":"Ada", "email":"ada@example.com"}`, "Idempotency-Key", "req-1")
		require.Equal(t, http.StatusCreated, again.Status, "not 409: %s", again.Raw)
		require.Equal(t, first.Raw, again.Raw, "the replay is the first answer byte for byte")
		require.Equal(t, "true", again.Header.Get("Idempotent-Replayed"))
		require.Equal(t, [3]int{1, 1, 1}, b.counts(t), "no second user and no second event")

		other := b.post(t, `{"email":"bob@example.com","name":"Bob"}`, "Idempotency-Key", "req-1")
		require.Equal(t, http.StatusUnprocessableEntity, other.Status)
		require.Equal(t, "idempotency_key_reused", errorCode(t, other))

		noKey := b.post(t, body)
		require.Equal(t, http.StatusConflict, noKey.Status, "without the key a repeat is a conflict")
	})

	t.Run("gives concurrent retries with one Idempotency-Key one user and one answer", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		const n = 10
		results := make(chan response, n)
		var wg sync.WaitGroup
		for range n {
			wg.Go(func() {
				results <- b.post(t, `{"email":"ada@example.com","name":"Ada"}`, "Idempotency-Key", "same")
			})
		}
		wg.Wait()
		close(results)
		var ids []any
		for r := range results {
			require.Equal(t, http.StatusCreated, r.Status, r.Raw)
			ids = append(ids, r.Body["id"])
		}
		for _, id := range ids {
			require.Equal(t, ids[0], id)
		}
		require.Equal(t, [3]int{1, 1, 1}, b.counts(t))
	})

	t.Run("does not remember a key whose request failed", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		require.Equal(t, http.StatusCreated, b.post(t, `{"email":"ada@example.com","name":"Ada"}`).Status)
		res := b.post(t, `{"email":"ada@example.com","name":"Ada"}`, "Idempotency-Key", "k")
		require.Equal(t, http.StatusConflict, res.Status)
		require.Equal(t, [3]int{1, 1, 0}, b.counts(t))
	})

	t.Run("answers 503 and writes nothing when the database times out", func(t *testing.T) {
		t.Parallel()
		b := setup(t, func(c *Config) { c.RequestTimeout = 300 * time.Millisecond })
		ctx := context.Background()
		// Hold a lock that the outbox insert needs, past the request deadline.
		blocker, err := b.pool.Begin(ctx)
		require.NoError(t, err)
		_, err = blocker.Exec(ctx, `LOCK TABLE outbox IN EXCLUSIVE MODE`)
		require.NoError(t, err)
		res := b.post(t, `{"email":"ada@example.com","name":"Ada"}`, "Idempotency-Key", "k")
		require.NoError(t, blocker.Rollback(ctx))
		require.Equal(t, http.StatusServiceUnavailable, res.Status, res.Raw)
		require.Equal(t, "unavailable", errorCode(t, res))
		require.NotEmpty(t, res.Header.Get("Retry-After"))
		require.Equal(t, [3]int{0, 0, 0}, b.counts(t), "the user insert was rolled back with the event")

		retry := b.post(t, `{"email":"ada@example.com","name":"Ada"}`, "Idempotency-Key", "k")
		require.Equal(t, http.StatusCreated, retry.Status, "the retry succeeds once the database answers")
	})

	t.Run("answers 503 when the database is unreachable", func(t *testing.T) {
		t.Parallel()
		svc, err := New(context.Background(), Config{
			Config:         logging.Config{LogFormat: "text", LogLevel: "info"},
			DatabaseURL:    "postgres://postgres@127.0.0.1:1/postgres?sslmode=disable&connect_timeout=1",
			DBMaxConns:     2,
			RequestTimeout: 2 * time.Second,
		}, logging.Discard())
		require.NoError(t, err, "the service starts while the database is down")
		t.Cleanup(svc.Close)
		req := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(`{"email":"a@example.com","name":"A"}`))
		req.Header.Set("Content-Type", "application/json")
		res := do(t, svc, req)
		require.Equal(t, http.StatusServiceUnavailable, res.Status, res.Raw)
		require.Equal(t, "unavailable", errorCode(t, res))
		require.False(t, svc.Health(context.Background()).OK)
	})
}
