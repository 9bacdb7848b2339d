// Package httpjson writes JSON responses and the product's one error shape,
//
//	{"error": {"code": "email_taken", "message": "…what to fix…"}}
//
// and reads JSON request bodies strictly, turning every way a body can be
// wrong into an *Error with the right 4xx status.
package httpjson

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"strconv"
	"strings"
)

// Error is an error meant for the client: an HTTP status, a stable
// machine-readable code, and a message that says what to fix.
type Error struct {
	Status  int    `json:"-"`
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return fmt.Sprintf("%d %s: %s", e.Status, e.Code, e.Message) }

// Errorf returns an *Error with a formatted message.
func Errorf(status int, code, format string, args ...any) *Error {
	return &Error{Status: status, Code: code, Message: fmt.Sprintf(format, args...)}
}

// Write sends v as JSON with status. Encoding errors are not reported: by
// then the status line has gone out and nothing better can be said.
func Write(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		body = []byte(`{"error":{"code":"internal","message":"response could not be encoded"}}`)
	}
	WriteRaw(w, status, body)
}

// WriteRaw sends body, which must be one JSON value already encoded, with
// status: an answer built (or stored) as bytes is not decoded and encoded
// again on its way out.
func WriteRaw(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)+1))
	w.WriteHeader(status)
	_, _ = w.Write(body)
	_, _ = io.WriteString(w, "\n")
}

// WriteError sends err in the error shape. An *Error anywhere in err's chain
// is sent as it is; anything else is logged and sent as a bare 500, because
// its text may hold details the client must not see.
func WriteError(w http.ResponseWriter, r *http.Request, logger *slog.Logger, err error) {
	var e *Error
	if !errors.As(err, &e) {
		logger.ErrorContext(r.Context(), "request failed", slog.String("path", r.URL.Path), slog.Any("error", err))
		e = &Error{Status: http.StatusInternalServerError, Code: "internal", Message: "internal error; it has been logged"}
	}
	if e.Status == http.StatusServiceUnavailable && w.Header().Get("Retry-After") == "" {
		w.Header().Set("Retry-After", "1")
	}
	Write(w, e.Status, map[string]*Error{"error": e})
}

// Method answers 405 with an Allow header unless r uses one of allowed.
func Method(w http.ResponseWriter, r *http.Request, allowed ...string) bool {
	for _, m := range allowed {
		if r.Method == m {
			return true
		}
	}
	allow := strings.Join(allowed, ", ")
	w.Header().Set("Allow", allow)
	Write(w, http.StatusMethodNotAllowed, map[string]*Error{"error": {
		Code: "method_not_allowed", Message: fmt.Sprintf("use %s", allow),
	}})
	return false
}

// ReadBody checks that r's body is declared application/json (in UTF-8, if
// a charset is given) and reads it, refusing more than limit bytes; each
// failure is an *Error the client can act on (400, 413 or 415). A caller
// may inspect the bytes before or after DecodeBody.
func ReadBody(r *http.Request, limit int64) ([]byte, error) {
	ct := r.Header.Get("Content-Type")
	mt, params, err := mime.ParseMediaType(ct)
	if ct == "" || err != nil || mt != "application/json" {
		return nil, Errorf(http.StatusUnsupportedMediaType, "unsupported_media_type",
			"send the body as Content-Type: application/json")
	}
	if cs, ok := params["charset"]; ok && !strings.EqualFold(cs, "utf-8") {
		return nil, Errorf(http.StatusUnsupportedMediaType, "unsupported_media_type",
			"the body must be UTF-8, not %q", cs)
	}
	// Read one byte past the limit to tell "exactly at the limit" from "over".
	body, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	if err != nil {
		var maxErr *http.MaxBytesError
		if errors.As(err, &maxErr) {
			return nil, tooLarge(limit)
		}
		return nil, Errorf(http.StatusBadRequest, "unreadable_body", "the request body could not be read")
	}
	if int64(len(body)) > limit {
		return nil, tooLarge(limit)
	}
	return body, nil
}

// DecodeBody decodes body into v strictly: one JSON object, no unknown
// fields, nothing after it; each failure is a 400 *Error that says which.
func DecodeBody(body []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return decodeError(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return Errorf(http.StatusBadRequest, "malformed_json", "the body must hold one JSON object and nothing after it")
	}
	return nil
}

func tooLarge(limit int64) *Error {
	return Errorf(http.StatusRequestEntityTooLarge, "body_too_large", "the body must be at most %d bytes", limit)
}

func decodeError(err error) *Error {
	var syntaxErr *json.SyntaxError
	var typeErr *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syntaxErr):
		return Errorf(http.StatusBadRequest, "malformed_json", "malformed JSON at byte %d", syntaxErr.Offset)
	case errors.Is(err, io.EOF):
		return Errorf(http.StatusBadRequest, "malformed_json", "the body is empty; send a JSON object")
	case errors.Is(err, io.ErrUnexpectedEOF):
		return Errorf(http.StatusBadRequest, "malformed_json", "the JSON ends early")
	case errors.As(err, &typeErr):
		if typeErr.Field == "" {
			return Errorf(http.StatusBadRequest, "malformed_json", "the body must be a JSON object")
		}
		return Errorf(http.StatusBadRequest, "invalid_field", "field %q must be a JSON %s", typeErr.Field, typeErr.Type.Kind())
	default:
		// encoding/json has no typed error for unknown fields; its message is
		// the only thing that tells them apart, so match its fixed prefix.
		if name, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
			return Errorf(http.StatusBadRequest, "unknown_field", "unknown field %s", name)
		}
		return Errorf(http.StatusBadRequest, "malformed_json", "the body is not valid JSON")
	}
}
