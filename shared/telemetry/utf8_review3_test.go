package telemetry

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// rawRequest sends one request as the bytes a client wrote, past any
// client-side validation, and returns the status line.
func rawRequest(t *testing.T, addr, req string) string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer c.Close()
	_, err = io.WriteString(c, req)
	require.NoError(t, err)
	line, err := bufio.NewReader(c).ReadString('\n')
	require.NoError(t, err)
	return line
}

// A client chooses its User-Agent bytes, and net/http accepts obs-text
// (0x80-0xFF) in header values. OTLP's protobuf strings must be valid UTF-8:
// the exporter's proto.Marshal fails on the whole batch, so one client's
// header drops every span exported with it (the span processor batches up
// to 512).
func TestAUserAgentThatIsNotUTF8DoesNotStopTheSpansFromBeingExported(t *testing.T) {
	t.Parallel()
	spans, _, p := recording(t)
	srv := httptest.NewServer(HTTPHandler("CreateUser", p, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusCreated)
	})))
	innocent := rawRequest(t, srv.Listener.Addr().String(),
		"POST / HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8.5.0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
	status := rawRequest(t, srv.Listener.Addr().String(),
		"POST / HTTP/1.1\r\nHost: x\r\nUser-Agent: bot\xff\xfe\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
	srv.Close()
	require.Contains(t, innocent, "201", "net/http served the innocent request")
	require.Contains(t, status, "201", "net/http served the request")
	require.Len(t, spans.Ended(), 2, "one innocent span, one with the client's bytes, in one batch")

	set := attribute.NewSet(spans.Ended()[1].Attributes()...)
	ua, _ := set.Value("user_agent.original")
	assert.NoError(t, exportOTLP(t, spans.Ended()),
		"the batch (an innocent span and one with user_agent.original %q) must reach the collector", ua.AsString())
}

// An error's text can carry another server's bytes (an SMTP reply): a span
// failed with it must export as well.
func TestASpanFailedWithBytesThatAreNotUTF8IsStillExported(t *testing.T) {
	t.Parallel()
	spans, _, p := recording(t)
	_, span := p.TracerOf().Start(context.Background(), "smtp send")
	Failed(span, errors.New("550 mailbox \xff\xfe unavailable"))
	span.End()
	require.Len(t, spans.Ended(), 1)
	assert.NoError(t, exportOTLP(t, spans.Ended()))
}

// exportOTLP sends spans over OTLP/HTTP to a collector in the test and
// fails unless exactly one request reached it.
func exportOTLP(t *testing.T, spans []sdktrace.ReadOnlySpan) error {
	t.Helper()
	var received atomic.Int32
	collector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		received.Add(1)
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/x-protobuf")
		w.WriteHeader(http.StatusOK)
	}))
	defer collector.Close()
	exp, err := otlptracehttp.New(context.Background(), otlptracehttp.WithEndpointURL(collector.URL+"/v1/traces"))
	require.NoError(t, err)
	defer exp.Shutdown(context.Background()) //nolint:errcheck
	err = exp.ExportSpans(context.Background(), spans)
	assert.EqualValues(t, 1, received.Load(), "requests the collector received")
	return err
}

// clientText promises a cut on a rune boundary; a value whose bytes past the
// limit are continuation bytes (not UTF-8) is cut to nothing, and the
// operator loses the whole attribute instead of its first 256 bytes.
func TestATruncatedClientTextKeepsItsFirstBytesEvenWhenItIsNotUTF8(t *testing.T) {
	t.Parallel()
	s := strings.Repeat("\x80", 300)
	assert.NotEmpty(t, clientText(s), "clientText(%d continuation bytes)", len(s))
	// and whatever it keeps, an exporter needs it to be valid UTF-8
	in := "ok" + strings.Repeat("\xff", 10)
	out := clientText(in)
	assert.True(t, strings.ToValidUTF8(out, "") == out, fmt.Sprintf("clientText(%q) = %q is not valid UTF-8", in, out))
}
