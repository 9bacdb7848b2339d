package telemetry

import (
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
)

// Semantic conventions v1.40 (the version this handler records): url.query
// values of AWSAccessKeyId, Signature, sig and X-Goog-Signature SHOULD be
// redacted by default, keeping the key ("sig=REDACTED"). The span records
// the query verbatim, so a signed URL's signature lands in the trace store.
func TestTheServerSpanRedactsTheQueryValuesTheConventionsCallSensitive(t *testing.T) {
	t.Parallel()
	spans, _, p := recording(t)
	h := HTTPHandler("CreateUser", p, http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodPost, "/?q=a&sig=s3cr3t&X-Goog-Signature=abcdef", nil))
	require.Len(t, spans.Ended(), 1)
	set := attribute.NewSet(spans.Ended()[0].Attributes()...)
	v, _ := set.Value("url.query")
	assert.Equal(t, "q=a&sig=REDACTED&X-Goog-Signature=REDACTED", v.AsString())
}
