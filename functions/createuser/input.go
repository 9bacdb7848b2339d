package createuser

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/mail"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"

	"golang.org/x/net/idna"
	"golang.org/x/text/unicode/norm"

	"github.com/outboxfn/outbox/shared/httpjson"
)

const (
	// maxBodyBytes is the largest request body accepted.
	maxBodyBytes = 64 << 10
	// maxEmailBytes is the longest address SMTP can carry (RFC 5321 path limit).
	maxEmailBytes = 254
	// maxLocalBytes is RFC 5321's limit on the local part; mail servers
	// refuse longer ones, so such a sign-up could never get its email.
	maxLocalBytes = 64
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
	body, err := httpjson.ReadBody(r, maxBodyBytes)
	if err != nil {
		return newUser{}, "", err
	}
	var req request
	if err := httpjson.DecodeBody(body, &req); err != nil {
		return newUser{}, "", err
	}
	// encoding/json replaces invalid UTF-8 and lone surrogates with U+FFFD
	// and lets the last of two equal keys win, so those checks look at the
	// body itself, not at what it decoded to.
	if err := checkRaw(body); err != nil {
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
	// Email is the canonical form: NFC, the domain in lower-case A-labels.
	Email string
	// Domain is Email's domain, the key of the per-domain rate limit.
	Domain string
	Name   string
}

// checkRaw holds an object that encoding/json decoded without complaint to
// what it silently glosses over: bytes that are not UTF-8 (415, as for a
// declared charset other than UTF-8), escapes of lone UTF-16 surrogates, and
// field names that are repeated or match a field only by letter case (400).
// Any of these lets the same body mean one thing to us and another to a
// proxy or log reader in front of us.
func checkRaw(body []byte) error {
	if !utf8.Valid(body) {
		return httpjson.Errorf(http.StatusUnsupportedMediaType, "unsupported_media_type",
			"the body must be UTF-8; byte %d is not", invalidUTF8At(body))
	}
	if at := loneSurrogateAt(body); at >= 0 {
		return invalid("malformed_json", `the escape at byte %d is half of a UTF-16 surrogate pair; send valid Unicode`, at)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if _, err := dec.Token(); err != nil { // the opening '{', which Decode checked
		return invalid("malformed_json", "the body must be a JSON object")
	}
	seen := map[string]bool{}
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return invalid("malformed_json", "the body is not valid JSON")
		}
		name, _ := t.(string)
		if name != "email" && name != "name" {
			return invalid("unknown_field", "unknown field %q (field names are case-sensitive)", name)
		}
		if seen[name] {
			return invalid("duplicate_field", "field %q appears more than once", name)
		}
		seen[name] = true
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return invalid("malformed_json", "the body is not valid JSON")
		}
	}
	return nil
}

func invalidUTF8At(b []byte) int {
	for i := 0; i < len(b); {
		r, n := utf8.DecodeRune(b[i:])
		if r == utf8.RuneError && n == 1 {
			return i
		}
		i += n
	}
	return -1
}

// loneSurrogateAt returns the offset of the first \uXXXX escape of a UTF-16
// surrogate that is not half of a pair, or -1. body must be valid JSON, so
// every backslash in it starts an escape inside a string.
func loneSurrogateAt(body []byte) int {
	hex4 := func(i int) rune {
		if i+6 > len(body) || body[i] != '\\' || body[i+1] != 'u' {
			return -1
		}
		v, err := strconv.ParseUint(string(body[i+2:i+6]), 16, 16)
		if err != nil {
			return -1
		}
		return rune(v)
	}
	for i := 0; i < len(body); i++ {
		if body[i] != '\\' {
			continue
		}
		r := hex4(i)
		switch {
		case r < 0: // another escape: \n, \", \\ ...
			i++
		case !utf16.IsSurrogate(r):
			i += 5
		case r < 0xDC00 && utf16.DecodeRune(r, hex4(i+6)) != unicode.ReplacementChar:
			i += 11
		default:
			return i
		}
	}
	return -1
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
	_, domain, _ := strings.Cut(email, "@")
	return newUser{Email: email, Domain: domain, Name: name}, nil
}

// domainProfile is IDNA2008 as browsers and mail systems look names up
// (UTS #46 mapping: case folded, width and compatibility forms mapped, NFC),
// strict about letters, digits and hyphens and about DNS lengths.
var domainProfile = idna.New(idna.MapForLookup(), idna.BidiRule(), idna.VerifyDNSLength(true))

// reservedTLDs are special-use names (RFC 6761, RFC 6762, RFC 7686 and
// ICANN's .internal) that no public mail server answers for; a relay that
// tried them would deliver inside its own network, or nowhere.
var reservedTLDs = map[string]bool{
	"localhost": true, "local": true, "internal": true, "invalid": true, "test": true,
	"example": true, "onion": true, "arpa": true, "localdomain": true, "lan": true, "home": true, "corp": true,
}

// validEmail accepts exactly one bare address (local@domain), nothing that
// net/mail would read as a display name, group or comment, and returns its
// canonical form: NFC throughout and the domain as lower-case A-labels, so
// that ada@exämple.com and ada@XN--EXMPLE-CUA.com are one user. The domain
// must be one a public mail server could answer for: no address literal
// ([10.0.0.5]), no IP address, no single label (localhost) and no
// special-use name (.internal, .local, ...).
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
	at := strings.LastIndexByte(s, '@')
	local, domain := norm.NFC.String(s[:at]), s[at+1:]
	if len(local) > maxLocalBytes {
		return "", invalid("invalid_email", `the part of field "email" before the @ must be at most %d bytes (RFC 5321)`, maxLocalBytes)
	}
	if strings.HasPrefix(domain, "[") {
		return "", invalid("invalid_email", `field "email" must name a domain, not an address literal such as [10.0.0.5]`)
	}
	ascii, err := domainProfile.ToASCII(domain)
	if err != nil {
		return "", invalid("invalid_email", `the domain of field "email" is not a valid domain name`)
	}
	labels := strings.Split(ascii, ".")
	tld := labels[len(labels)-1]
	switch {
	case len(labels) < 2:
		return "", invalid("invalid_email", `the domain of field "email" must have a dot: a single label such as localhost is a local host`)
	case strings.Trim(tld, "0123456789") == "":
		return "", invalid("invalid_email", `field "email" must name a domain, not an IP address`)
	case reservedTLDs[tld]:
		return "", invalid("invalid_email", `the domain of field "email" is a special-use name (.%s) that public mail cannot reach`, tld)
	}
	canonical := local + "@" + ascii
	if len(canonical) > maxEmailBytes {
		return "", invalid("invalid_email", `field "email" must be at most %d bytes with its domain in ASCII (punycode) form`, maxEmailBytes)
	}
	if addr, err := mail.ParseAddress(canonical); err != nil || addr.Address != canonical || hasControl(canonical) {
		return "", invalid("invalid_email", `field "email" must be a plain address such as ada@example.com`)
	}
	return canonical, nil
}

// validName trims surrounding white space and rejects anything that could
// break a mail header later: control characters (CR and LF above all), line
// and paragraph separators, and bidirectional overrides that disguise text.
func validName(s string) (string, error) {
	if hasControl(s) {
		return "", invalid("invalid_name", `field "name" must not contain control characters or line breaks`)
	}
	s = strings.TrimSpace(s)
	// A name of nothing but invisible format characters (U+200B, U+FEFF)
	// is as empty as a blank one; inside a name they stay, since ZWJ and
	// ZWNJ are part of emoji and of some scripts.
	if strings.TrimFunc(s, func(r rune) bool { return unicode.IsSpace(r) || unicode.Is(unicode.Cf, r) }) == "" {
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
			(r >= 0x202A && r <= 0x202E) || (r >= 0x2066 && r <= 0x2069) ||
			r == 0x200E || r == 0x200F || r == 0x061C // direction marks
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
