package telemetry

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
)

// plainWriter is a ResponseWriter that cannot flush (a middleware's wrapper
// without Flush or Unwrap): it hides the recorder's Flush.
type plainWriter struct{ http.ResponseWriter }

// FlushError answers http.ErrNotSupported when the writer beneath cannot
// flush: nothing was sent, so the handler's later status is the one the
// client gets, and the span must record it, not the 200 the failed flush
// assumed.
func TestAFlushThatFailedDoesNotFixTheRecordedStatusAt200(t *testing.T) {
	t.Parallel()
	spans, _, p := recording(t)
	var flushErr error
	h := HTTPHandler("Relay", p, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		flushErr = http.NewResponseController(w).Flush()
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	rec := httptest.NewRecorder()
	h.ServeHTTP(plainWriter{rec}, httptest.NewRequest(http.MethodPost, "/", nil))
	require.True(t, errors.Is(flushErr, http.ErrNotSupported), "flush error %v", flushErr)
	require.Equal(t, http.StatusServiceUnavailable, rec.Code, "the client got 503")
	require.Len(t, spans.Ended(), 1)
	set := attribute.NewSet(spans.Ended()[0].Attributes()...)
	v, _ := set.Value("http.response.status_code")
	assert.Equal(t, int64(http.StatusServiceUnavailable), v.AsInt64(), "the span's status code")
}

// The wrapper always has a Flush method, so a handler that asks for an
// http.Flusher is told it can stream although nothing can be flushed.
func TestTheWrapperIsNoFlusherWhenTheWriterBeneathIsNone(t *testing.T) {
	t.Parallel()
	_, _, p := recording(t)
	var isFlusher bool
	h := HTTPHandler("Relay", p, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, isFlusher = w.(http.Flusher)
	}))
	h.ServeHTTP(plainWriter{httptest.NewRecorder()}, httptest.NewRequest(http.MethodGet, "/", nil))
	assert.False(t, isFlusher, "the handler sees an http.Flusher over a writer that cannot flush")
}

// maxClientText bounds the client-chosen strings because net/http admits a
// megabyte of request head; the path is as client-chosen as the query
// (with FUNCTION_TARGET set, "/" matches every path) and is recorded whole.
func TestTheServerSpanBoundsTheClientChosenPathLikeTheQuery(t *testing.T) {
	t.Parallel()
	spans, _, p := recording(t)
	h := HTTPHandler("CreateUser", p, http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	long := "/" + strings.Repeat("a", 100_000)
	h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodPost, long+"?"+strings.Repeat("q", 100_000), nil))
	require.Len(t, spans.Ended(), 1)
	set := attribute.NewSet(spans.Ended()[0].Attributes()...)
	q, _ := set.Value("url.query")
	path, _ := set.Value("url.path")
	require.LessOrEqual(t, len(q.AsString()), maxClientText, "the query is bounded")
	assert.LessOrEqual(t, len(path.AsString()), maxClientText, "the path is bounded as the query is")
}
