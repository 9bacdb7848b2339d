package createuser

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"net/mail"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/outboxfn/outbox/shared/httpjson"
)

// FuzzRequest holds the input path to its promise: whatever the body and
// headers, the answer is a user fit for an email header or a 4xx that
// explains itself, never anything that would become a 5xx. `go test` runs
// the seeds; `go test -fuzz FuzzRequest ./functions/createuser` explores.
func FuzzRequest(f *testing.F) {
	for _, seed := range []struct{ body, contentType, key string }{
		{`{"email":"ada@example.com","name":"Ada Lovelace"}`, "application/json", ""},
		{`{"email":"ada@example.com","name":"Ada\r\nBcc: x@evil.com"}`, "application/json", "k1"},
		{`{"email":"Ada <ada@example.com>","name":"A"}`, "application/json; charset=utf-8", ""},
		{`{"email":"a@b","name":"\u202eA"} []`, "application/json", "a b"},
		{`[{"email":null}]`, "text/json", ""},
		{`{"email":"\"a\"@example.com","name":"  x  "}`, "application/json", strings.Repeat("k", 300)},
		{"\xff\xfe{", "application/json", "\x00"},
	} {
		f.Add(seed.body, seed.contentType, seed.key)
	}
	f.Fuzz(func(t *testing.T, body, contentType, key string) {
		req := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(body))
		req.Header.Set("Content-Type", contentType)
		if key != "" {
			req.Header["Idempotency-Key"] = []string{key}
		}
		u, _, err := parse(req)
		if err != nil {
			var e *httpjson.Error
			if !errors.As(err, &e) || e.Status < 400 || e.Status > 499 || e.Code == "" || e.Message == "" {
				t.Fatalf("input answered with %v, not a 4xx the client can act on", err)
			}
			return
		}
		if addr, err := mail.ParseAddress(u.Email); err != nil || addr.Address != u.Email || addr.Name != "" {
			t.Fatalf("accepted email %q is not one plain address", u.Email)
		}
		if len(u.Email) > maxEmailBytes || utf8.RuneCountInString(u.Name) > maxNameRunes || strings.TrimSpace(u.Name) == "" {
			t.Fatalf("accepted out-of-range user %q %q", u.Email, u.Name)
		}
		if hasControl(u.Email) || hasControl(u.Name) {
			t.Fatalf("accepted control characters in %q %q", u.Email, u.Name)
		}
	})
}
