package createuser

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"net/mail"
	"strings"
	"testing"
	"unicode"
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
		{"{\"email\":\"inv2@exa\xffmple.com\",\"name\":\"A\"}", "application/json", ""},
		{`{"email":"a@example.com","name":"A","email":"evil@example.com"}`, "application/json", ""},
		{`{"email":"a@example.com","EMAIL":"evil@example.com","name":"A"}`, "application/json", ""},
		{`{"email":"a@example.com","name":"A\ud800 \\ud800 \ud83d\ude00"}`, "application/json", ""},
		{`{"email":"ada@exämple.com","name":"Ada"}`, "application/json", ""},
		{`{"email":"ada@XN--EXMPLE-CUA.COM","name":"Ada"}`, "application/json", ""},
		{`{"email":"x@[10.0.0.5]","name":"A"}`, "application/json", ""},
		{`{"email":"x@localhost","name":"A"}`, "application/json", ""},
		{`{"email":"x@10.0.0.5","name":"A"}`, "application/json", ""},
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
		if !utf8.ValidString(body) || strings.ContainsRune(u.Email+u.Name, utf8.RuneError) && !strings.Contains(body, "\uFFFD") &&
			!strings.Contains(strings.ToLower(body), `\ufffd`) {
			t.Fatalf("accepted a body that was not valid Unicode: %q", body)
		}
		local, domain, _ := strings.Cut(u.Email, "@")
		if again, err := validEmail(u.Email); err != nil || again != u.Email {
			t.Fatalf("canonical email %q is not its own canonical form (%q, %v)", u.Email, again, err)
		}
		if domain != u.Domain || strings.ContainsFunc(domain, func(r rune) bool { return r > unicode.MaxASCII || unicode.IsUpper(r) }) ||
			!strings.Contains(domain, ".") || local == "" {
			t.Fatalf("accepted email %q has domain %q, not lower-case ASCII with a dot", u.Email, u.Domain)
		}
	})
}
