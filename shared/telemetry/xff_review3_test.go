package telemetry

import (
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
)

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
