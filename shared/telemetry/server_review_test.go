package telemetry

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// The server span is what an operator reads when a request went wrong. The
// conventions make url.query conditionally required (a query was received),
// and otelhttp, which this handler replaced, recorded the client's address
// and its user agent: an abuse investigation that used them would find them
// gone. (Not kept: the protocol version, always 1.1 behind Cloud Run, and the
// server address, the service's own name.)
func TestTheServerSpanKeepsTheRequestAttributesTheConventionsAndOtelhttpGave(t *testing.T) {
	t.Parallel()
	spans, _, p := recording(t)
	h := HTTPHandler("CreateUser", p, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusCreated)
	}))
	req := httptest.NewRequest(http.MethodPost, "/?source=signup", nil)
	req.RemoteAddr = "203.0.113.7:40000"
	req.Header.Set("User-Agent", "curl/8.5.0")
	h.ServeHTTP(httptest.NewRecorder(), req)
	require.Len(t, spans.Ended(), 1)
	attrs := attribute.NewSet(spans.Ended()[0].Attributes()...)

	for _, tt := range []struct {
		name string
		key  attribute.Key
		want string
	}{
		{"records the query it received (conditionally required)", "url.query", "source=signup"},
		{"records the client's address (otelhttp did)", "client.address", "203.0.113.7"},
		{"records the user agent (otelhttp did)", "user_agent.original", "curl/8.5.0"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			v, ok := attrs.Value(tt.key)
			if assert.True(t, ok, "span attribute %s missing; span has %v", tt.key, attrs.Encoded(attribute.DefaultEncoder())) {
				assert.Equal(t, tt.want, v.AsString())
			}
		})
	}
}

// http.ResponseController reaches the server's writer through Unwrap: a
// Flush sends the header with 200, and net/http ignores a WriteHeader after
// it ("superfluous WriteHeader call"). The span and the metric must say
// what the client got, not what the handler asked for too late.
func TestAStatusAfterAFlushThroughTheResponseControllerIsNotTheOneRecorded(t *testing.T) {
	t.Parallel()
	spans, reader, p := recording(t)
	h := HTTPHandler("Relay", p, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		require.NoError(t, http.NewResponseController(w).Flush())
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	srv := httptest.NewServer(h)
	res, err := http.Post(srv.URL, "application/json", nil)
	require.NoError(t, err)
	res.Body.Close()
	srv.Close() // waits for the handler, and so for its span, to end
	require.Equal(t, http.StatusOK, res.StatusCode, "the client got 200")

	require.Len(t, spans.Ended(), 1)
	s := spans.Ended()[0]
	sa := attribute.NewSet(s.Attributes()...)
	v, _ := sa.Value("http.response.status_code")
	assert.Equal(t, int64(http.StatusOK), v.AsInt64(), "the span's status code is the one sent")
	assert.Equal(t, codes.Unset, s.Status().Code, "a 200 is not a failed span")
	var rm metricdata.ResourceMetrics
	require.NoError(t, reader.Collect(context.Background(), &rm))
	points := durationPoints(t, rm)
	require.Len(t, points, 1)
	pa := points[0].Attributes
	code, _ := pa.Value("http.response.status_code")
	assert.Equal(t, int64(http.StatusOK), code.AsInt64(), "the metric's status code is the one sent")
}

// shared/serve mounts each function on a ServeMux pattern ("/" or
// "/CreateUser"), so the route is known (r.Pattern). The conventions make
// http.route conditionally required on the span and the metric when it is
// available, and otelhttp v0.72 recorded it from r.Pattern.
func TestTheRouteTheMuxMatchedIsRecordedOnTheSpanAndTheMetric(t *testing.T) {
	t.Parallel()
	spans, reader, p := recording(t)
	mux := http.NewServeMux()
	mux.Handle("/CreateUser", HTTPHandler("CreateUser", p,
		http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusCreated) })))
	mux.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodPost, "/CreateUser", nil))

	require.Len(t, spans.Ended(), 1)
	sa := attribute.NewSet(spans.Ended()[0].Attributes()...)
	route, ok := sa.Value("http.route")
	assert.True(t, ok, "span attribute http.route; span has %v", sa.Encoded(attribute.DefaultEncoder()))
	assert.Equal(t, "/CreateUser", route.AsString())

	var rm metricdata.ResourceMetrics
	require.NoError(t, reader.Collect(context.Background(), &rm))
	points := durationPoints(t, rm)
	require.Len(t, points, 1)
	pa := points[0].Attributes
	mroute, ok := pa.Value("http.route")
	assert.True(t, ok, "metric attribute http.route; metric has %v", pa.Encoded(attribute.DefaultEncoder()))
	assert.Equal(t, "/CreateUser", mroute.AsString())
}

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

// Some proxies (Azure Application Gateway, a few ingress controllers) write
// the client's port into X-Forwarded-For, and IPv6 then comes bracketed.
// The client is still the first entry; recording the peer instead names the
// proxy as the client, with nothing on the span to say so.
func TestTheClientAddressOfAnXForwardedForEntryWithAPortIsTheClientNotThePeer(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct{ xff, want string }{
		{"203.0.113.9:5678", "203.0.113.9"},
		{"[2001:db8::9]:5678, 10.0.0.1", "2001:db8::9"},
	} {
		t.Run(tt.xff, func(t *testing.T) {
			spans, _, p := recording(t)
			h := HTTPHandler("CreateUser", p, http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
			req := httptest.NewRequest(http.MethodPost, "/", nil)
			req.RemoteAddr = "10.99.0.1:40000" // the proxy
			req.Header.Set("X-Forwarded-For", tt.xff)
			h.ServeHTTP(httptest.NewRecorder(), req)
			require.Len(t, spans.Ended(), 1)
			set := attribute.NewSet(spans.Ended()[0].Attributes()...)
			v, _ := set.Value("client.address")
			assert.Equal(t, tt.want, v.AsString())
		})
	}
}
