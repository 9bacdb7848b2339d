package serve

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"os"
	"time"

	"github.com/outboxfn/outbox/shared/httpjson"
)

// healthTimeout is the write deadline of the health, liveness and not-found
// answers: their checks take at most checkTimeout.
const healthTimeout = 10 * time.Second

// maxBody bounds what guard reads before the handler runs. createuser
// refuses more than 64 KiB itself; the triggers read no body.
const maxBody = 1 << 20

// guard gives an endpoint its timeouts. The server's ReadTimeout covers the
// headers and body; guard reads the whole body within it, so a client that
// trickles its body gets 408 and a closed connection instead of holding a
// handler. Once the body is in, net/http lifts the read deadline itself (a
// deadline passing while the handler runs would cancel the request's
// context), and guard gives the handler timeout to answer.
func guard(logger *slog.Logger, timeout time.Duration, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		if r.Body != nil && r.Body != http.NoBody {
			body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				w.Header().Set("Connection", "close")
				_ = rc.SetWriteDeadline(time.Now().Add(time.Second))
				httpjson.Write(w, http.StatusRequestTimeout, map[string]*httpjson.Error{"error": {
					Code: "request_timeout", Message: "the request did not arrive in time (HTTP_READ_TIMEOUT)",
				}})
				return
			case err != nil:
				w.Header().Set("Connection", "close")
				httpjson.WriteError(w, r, logger, httpjson.Errorf(http.StatusBadRequest, "unreadable_body", "the request body could not be read"))
				return
			case len(body) > maxBody:
				w.Header().Set("Connection", "close")
				httpjson.WriteError(w, r, logger, httpjson.Errorf(http.StatusRequestEntityTooLarge, "body_too_large", "the body must be at most %d bytes", maxBody))
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		// An error means the writer cannot take deadlines (a test recorder).
		_ = rc.SetWriteDeadline(time.Now().Add(timeout))
		h.ServeHTTP(w, r)
	})
}
