package serve

import (
	"crypto/subtle"
	"net/http"
	"strings"

	"github.com/outboxfn/outbox/shared/httpjson"
)

// Authorized checks the bearer token of a trigger request. With an empty
// token every request passes (Cloud Run's IAM is then the only gate);
// otherwise it answers 401 and returns false unless the request carries
// "Authorization: Bearer <token>", the scheme in any letter case (RFC 7235).
// The comparison takes the same time whatever the token's content.
func Authorized(w http.ResponseWriter, r *http.Request, token string) bool {
	if token == "" {
		return true
	}
	scheme, got, ok := strings.Cut(strings.TrimSpace(r.Header.Get("Authorization")), " ")
	got = strings.TrimLeft(got, " ")
	if ok && strings.EqualFold(scheme, "Bearer") && subtle.ConstantTimeCompare([]byte(got), []byte(token)) == 1 {
		return true
	}
	w.Header().Set("WWW-Authenticate", `Bearer realm="outbox trigger"`)
	httpjson.Write(w, http.StatusUnauthorized, map[string]*httpjson.Error{"error": {
		Code: "unauthorized", Message: "send Authorization: Bearer <TRIGGER_TOKEN>",
	}})
	return false
}
