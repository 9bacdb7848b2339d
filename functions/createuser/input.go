package createuser

import (
	"net/http"
	"net/mail"
	"regexp"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/outboxfn/outbox/shared/httpjson"
)

const (
	// maxBodyBytes is the largest request body accepted.
	maxBodyBytes = 64 << 10
	// maxEmailBytes is the longest address SMTP can carry (RFC 5321 path limit).
	maxEmailBytes = 254
	// maxNameRunes is the longest name accepted.
	maxNameRunes = 200
	// maxIdempotencyKeyBytes bounds the Idempotency-Key header.
	maxIdempotencyKeyBytes = 255
)

// request is the body of a createuser call. Pointers tell a missing field
// from an empty one.
type request struct {
	Email *string `json:"email"`
	Name  *string `json:"name"`
}

// parse reads and checks everything a request carries before it reaches
// the database: the body and the Idempotency-Key. Every error is an
// *httpjson.Error with a 4xx status.
func parse(r *http.Request) (u newUser, idempotencyKey string, err error) {
	var req request
	if err := httpjson.Decode(r, maxBodyBytes, &req); err != nil {
		return newUser{}, "", err
	}
	if u, err = req.validate(); err != nil {
		return newUser{}, "", err
	}
	if idempotencyKey, err = readIdempotencyKey(r.Header); err != nil {
		return newUser{}, "", err
	}
	return u, idempotencyKey, nil
}

// newUser is a request that passed validation.
type newUser struct {
	Email string
	Name  string
}

func invalid(code, format string, args ...any) *httpjson.Error {
	return httpjson.Errorf(http.StatusBadRequest, code, format, args...)
}

// validate turns a decoded request into a newUser or a 400 that names the
// field and the rule it broke.
func (r request) validate() (newUser, error) {
	if r.Email == nil {
		return newUser{}, invalid("missing_field", `field "email" is required`)
	}
	if r.Name == nil {
		return newUser{}, invalid("missing_field", `field "name" is required`)
	}
	email, err := validEmail(*r.Email)
	if err != nil {
		return newUser{}, err
	}
	name, err := validName(*r.Name)
	if err != nil {
		return newUser{}, err
	}
	return newUser{Email: email, Name: name}, nil
}

// validEmail accepts exactly one bare address (local@domain), nothing that
// net/mail would read as a display name, group or comment.
func validEmail(s string) (string, error) {
	if s == "" {
		return "", invalid("invalid_email", `field "email" must not be empty`)
	}
	if len(s) > maxEmailBytes {
		return "", invalid("invalid_email", `field "email" must be at most %d bytes`, maxEmailBytes)
	}
	if hasControl(s) {
		return "", invalid("invalid_email", `field "email" must not contain control characters`)
	}
	addr, err := mail.ParseAddress(s)
	if err != nil || addr.Name != "" || addr.Address != s {
		return "", invalid("invalid_email", `field "email" must be a plain address such as ada@example.com`)
	}
	return s, nil
}

// validName trims surrounding white space and rejects anything that could
// break a mail header later: control characters (CR and LF above all), line
// and paragraph separators, and bidirectional overrides that disguise text.
func validName(s string) (string, error) {
	if !utf8.ValidString(s) {
		return "", invalid("invalid_name", `field "name" must be valid UTF-8`)
	}
	if hasControl(s) {
		return "", invalid("invalid_name", `field "name" must not contain control characters or line breaks`)
	}
	s = strings.TrimSpace(s)
	if s == "" {
		return "", invalid("invalid_name", `field "name" must not be empty`)
	}
	if n := utf8.RuneCountInString(s); n > maxNameRunes {
		return "", invalid("invalid_name", `field "name" must be at most %d characters, not %d`, maxNameRunes, n)
	}
	return s, nil
}

func hasControl(s string) bool {
	return strings.IndexFunc(s, func(r rune) bool {
		return unicode.IsControl(r) || unicode.In(r, unicode.Zl, unicode.Zp) ||
			(r >= 0x202A && r <= 0x202E) || (r >= 0x2066 && r <= 0x2069)
	}) >= 0
}

// readIdempotencyKey reads the Idempotency-Key header: absent is fine,
// present must be 1 to 255 visible ASCII characters.
func readIdempotencyKey(h http.Header) (string, error) {
	values := h.Values("Idempotency-Key")
	switch {
	case len(values) == 0:
		return "", nil
	case len(values) > 1:
		return "", invalid("invalid_idempotency_key", "send at most one Idempotency-Key header")
	}
	k := values[0]
	if k == "" || len(k) > maxIdempotencyKeyBytes || strings.IndexFunc(k, func(r rune) bool { return r < 0x21 || r > 0x7e }) >= 0 {
		return "", invalid("invalid_idempotency_key", "Idempotency-Key must be 1 to %d visible ASCII characters", maxIdempotencyKeyBytes)
	}
	return k, nil
}

// traceparentRE is the W3C Trace Context header, version 00 and future ones.
var traceparentRE = regexp.MustCompile(`^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?$`)

// traceparent returns the request's traceparent header if it is well formed.
// A malformed one is dropped, not refused: tracing is never a reason to lose
// a user, and the spec says to restart the trace instead.
func traceparent(h http.Header) string {
	tp := strings.TrimSpace(h.Get("Traceparent"))
	if len(tp) > 512 || !traceparentRE.MatchString(tp) || strings.HasPrefix(tp, "ff-") ||
		tp[3:35] == strings.Repeat("0", 32) || tp[36:52] == strings.Repeat("0", 16) {
		return ""
	}
	return tp
}
