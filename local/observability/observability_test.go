// Package observability checks, against real PostgreSQL, Redis and an SMTP
// server, that a signup is one trace across the three functions, that the
// metrics count what the pipeline did, and that logs carry the trace.
package observability

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/goleak"

	"github.com/outboxfn/outbox/functions/createuser"
	"github.com/outboxfn/outbox/functions/relay"
	"github.com/outboxfn/outbox/functions/sendemail"
	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/pgtest"
	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/smtptest"
	"github.com/outboxfn/outbox/shared/telemetry"
)

const (
	traceID  = "4bf92f3577b34da6a3ce929d0e0e4736"
	callerID = "00f067aa0ba902b7"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestASignupIsOneTraceAndTheMetricsCountThePipeline(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	spans := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(spans))
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { _ = tp.Shutdown(ctx); _ = mp.Shutdown(ctx) })
	tel := telemetry.Providers{Tracer: tp, Meter: mp}

	dbURL, db := pgtest.NewPool(t)
	_, prefix := redistest.New(t)
	mail := smtptest.Start(t)
	// The forced failure: this recipient is refused for good, so its entry
	// goes to the dead-letter stream.
	mail.RefuseRecipients(func(to string) bool { return strings.HasPrefix(to, "refused") },
		&smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"})
	log := logging.Config{LogFormat: "text", LogLevel: "error"}

	cu, err := createuser.New(ctx, createuser.Config{Config: log, Telemetry: tel, DatabaseURL: dbURL, DBMaxConns: 4,
		RequestTimeout: 5 * time.Second, ForwardedHops: 1}, logging.Discard())
	require.NoError(t, err)
	t.Cleanup(cu.Close)
	rl, err := relay.New(ctx, relay.Config{Config: log, Telemetry: tel, DatabaseURL: dbURL, DBMaxConns: 4, RedisURL: redistest.URL(),
		StreamPrefix: prefix, BatchSize: 1000, PollInterval: time.Second, DedupeWindow: time.Hour,
		DrainTimeout: 10 * time.Second, ReconnectDelay: 100 * time.Millisecond}, logging.Discard())
	require.NoError(t, err)
	t.Cleanup(rl.Close)
	se, err := sendemail.New(ctx, sendemail.Config{Config: log, Telemetry: tel, DatabaseURL: dbURL, DBMaxConns: 4, RedisURL: redistest.URL(),
		StreamPrefix: prefix, Group: "sendemail", ConsumerName: "obs", BatchSize: 64, Concurrency: 4,
		Block: 100 * time.Millisecond, ClaimIdle: time.Minute, ClaimInterval: time.Second, MaxDeliveries: 5, SendAttempts: 2,
		Lease: 30 * time.Second, SMTPURL: mail.URL(), SMTPTimeout: 5 * time.Second, SMTPDataTimeout: 5 * time.Second,
		From: "Example <welcome@example.com>", Subject: "Welcome, {{.Name}}!", DrainTimeout: 10 * time.Second,
		ShutdownTimeout: 5 * time.Second}, logging.Discard())
	require.NoError(t, err)
	t.Cleanup(se.Close)
	require.True(t, se.Health(ctx).OK, "the consumer group exists before the first entry")

	// Five signups: one continuing the caller's trace, three starting their
	// own, one whose email the server refuses.
	caller, callerState := "00-"+traceID+"-"+callerID+"-01", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
	require.Equal(t, http.StatusCreated, post(t, cu, "ada@example.com", caller, callerState))
	for i := range 3 {
		require.Equal(t, http.StatusCreated, post(t, cu, fmt.Sprintf("user%d@example.com", i), ""))
	}
	require.Equal(t, http.StatusCreated, post(t, cu, "refused@example.com", ""))

	// The request span is the server span under the caller's, and the
	// transaction is its child; the outbox row carries the request span.
	server := only(t, spans.GetSpans(), "CreateUser", traceID)
	assert.Equal(t, trace.SpanKindServer, server.SpanKind)
	assert.Equal(t, callerID, server.Parent.SpanID().String())
	assert.True(t, server.Parent.IsRemote())
	tx := only(t, spans.GetSpans(), "createuser transaction", traceID)
	assert.Equal(t, server.SpanContext.SpanID(), tx.Parent.SpanID())
	var stored, storedState string
	require.NoError(t, db.QueryRow(ctx, `SELECT traceparent, tracestate FROM outbox WHERE payload->>'email' = 'ada@example.com'`).
		Scan(&stored, &storedState))
	assert.Equal(t, "00-"+traceID+"-"+server.SpanContext.SpanID().String()+"-01", stored)
	assert.Equal(t, callerState, storedState, "the caller's tracestate travels with the event")
	var untraced int
	require.NoError(t, db.QueryRow(ctx, `SELECT count(*) FROM outbox WHERE traceparent IS NULL`).Scan(&untraced))
	assert.Zero(t, untraced, "a request without a traceparent stores the new trace it started")

	before := collect(t, reader)
	assert.Equal(t, int64(5), gauge(before, "outbox.backlog"), "five events wait")
	assert.Positive(t, gaugeFloat(before, "outbox.backlog.oldest_age"))
	assert.Equal(t, uint64(5), histogramCount(before, "http.server.request.duration",
		attribute.String("faas.name", "CreateUser"), attribute.Int("http.response.status_code", 201)))

	res, err := rl.Drain(ctx, time.Time{})
	require.NoError(t, err)
	require.Equal(t, 5, res.Relayed)

	// One span per batch, linked to each event's request span.
	publish := only(t, spans.GetSpans(), "publish", "")
	assert.Equal(t, trace.SpanKindProducer, publish.SpanKind)
	assert.Len(t, publish.Links, 5)
	assert.True(t, linksTo(publish, server.SpanContext), "the batch links to the request's span")

	rec := httptest.NewRecorder()
	se.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	var stats sendemail.Stats
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &stats))
	require.Equal(t, int64(4), stats.Sent)
	require.Equal(t, int64(1), stats.DeadLettered)

	// sendemail handles the entry as a child of the request span: claim,
	// send and mark under it.
	process := only(t, spans.GetSpans(), "process", traceID)
	assert.Equal(t, trace.SpanKindConsumer, process.SpanKind)
	assert.Equal(t, server.SpanContext.SpanID(), process.Parent.SpanID())
	assert.Equal(t, callerState, process.SpanContext.TraceState().String(), "sendemail continues the caller's tracestate")
	for _, name := range []string{"claim", "smtp send", "mark"} {
		child := only(t, spans.GetSpans(), name, traceID)
		assert.Equal(t, process.SpanContext.SpanID(), child.Parent.SpanID(), "%s is a child of process", name)
	}
	functions := map[string]bool{}
	for _, s := range spans.GetSpans() {
		if s.SpanContext.TraceID().String() == traceID {
			functions[s.Name] = true
		}
	}
	assert.True(t, functions["CreateUser"] && functions["process"], "createuser and sendemail in the trace: %v", functions)

	after := collect(t, reader)
	for _, c := range []struct {
		name  string
		attrs []attribute.KeyValue
		want  int64
	}{
		{"messaging.client.sent.messages", nil, 5},
		{"outbox.relay.batches", nil, 1},
		{"outbox.email.entries", []attribute.KeyValue{attribute.String("outcome", "sent")}, 4},
		{"outbox.email.entries", []attribute.KeyValue{attribute.String("outcome", "dead_lettered")}, 1},
		{"messaging.client.consumed.messages", nil, 5},
	} {
		assert.Equal(t, c.want, sum(after, c.name, c.attrs...), "%s %v", c.name, c.attrs)
	}
	assert.Zero(t, sum(after, "outbox.relay.duplicates"))
	assert.Equal(t, uint64(5), histogramCount(after, "outbox.relay.commit_to_stream.duration"))
	assert.Equal(t, uint64(1), histogramCount(after, "outbox.relay.drain.duration", attribute.String("outcome", "complete")))
	assert.Equal(t, uint64(4), histogramCount(after, "outbox.email.smtp.duration", attribute.String("outcome", "ok")))
	assert.Equal(t, uint64(1), histogramCount(after, "outbox.email.smtp.duration", attribute.String("outcome", "error")))
	assert.Equal(t, uint64(1), histogramCount(after, "http.server.request.duration",
		attribute.String("faas.name", "SendEmail"), attribute.Int("http.response.status_code", 200)))
	assert.Equal(t, int64(0), gauge(after, "outbox.backlog"))
	assert.Equal(t, int64(5), gauge(after, "outbox.stream.length"))
	assert.Equal(t, int64(0), gauge(after, "outbox.stream.pending"))
	assert.Equal(t, int64(0), gauge(after, "outbox.stream.lag"))
}

func TestALogLineInsideTheHandlerCarriesTheTrace(t *testing.T) {
	t.Parallel()
	for _, project := range []string{"my-project", ""} {
		t.Run("project "+project, func(t *testing.T) {
			t.Parallel()
			var out syncBuffer
			tp := sdktrace.NewTracerProvider()
			t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
			// A database nobody listens on: the handler logs that it is
			// unavailable, and answers 503.
			cu, err := createuser.New(context.Background(), createuser.Config{Telemetry: telemetry.Providers{Tracer: tp},
				DatabaseURL: "postgres://postgres@127.0.0.1:1/postgres?sslmode=disable&connect_timeout=1", DBMaxConns: 1,
				RequestTimeout: 2 * time.Second}, logging.New(&out, logging.Config{LogFormat: "json", LogLevel: "info", Project: project}))
			require.NoError(t, err)
			t.Cleanup(cu.Close)
			require.Equal(t, http.StatusServiceUnavailable, post(t, cu, "ada@example.com", "00-"+traceID+"-"+callerID+"-01"))

			var line map[string]any
			for l := range strings.SplitSeq(strings.TrimSpace(out.String()), "\n") {
				var m map[string]any
				require.NoError(t, json.Unmarshal([]byte(l), &m), l)
				if m["message"] == "database unavailable" {
					line = m
				}
			}
			require.NotNil(t, line, "the handler logged: %s", out.String())
			want := traceID
			if project != "" {
				want = "projects/" + project + "/traces/" + traceID
			}
			assert.Equal(t, want, line[logging.TraceKey])
			assert.Len(t, line[logging.SpanIDKey], 16)
			assert.NotEqual(t, callerID, line[logging.SpanIDKey], "the request's own span, not the caller's")
			assert.Equal(t, true, line[logging.TraceSampledKey])
		})
	}
}

// post creates a user; traceContext is the traceparent header's value and,
// if given, the tracestate's.
func post(t *testing.T, cu *createuser.Service, email string, traceContext ...string) int {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, "/", bytes.NewBufferString(fmt.Sprintf(`{"email": %q, "name": "Someone"}`, email)))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Forwarded-For", "10.0.0.1")
	if len(traceContext) > 0 && traceContext[0] != "" {
		req.Header.Set("Traceparent", traceContext[0])
	}
	if len(traceContext) > 1 {
		req.Header.Set("Tracestate", traceContext[1])
	}
	rec := httptest.NewRecorder()
	cu.ServeHTTP(rec, req)
	return rec.Code
}

// only returns the one span named name (in trace traceID, if not empty).
func only(t *testing.T, spans tracetest.SpanStubs, name, traceID string) tracetest.SpanStub {
	t.Helper()
	var found []tracetest.SpanStub
	for _, s := range spans {
		if s.Name == name && (traceID == "" || s.SpanContext.TraceID().String() == traceID) {
			found = append(found, s)
		}
	}
	require.Len(t, found, 1, "spans named %q in trace %q", name, traceID)
	return found[0]
}

func linksTo(s tracetest.SpanStub, sc trace.SpanContext) bool {
	for _, l := range s.Links {
		if l.SpanContext.TraceID() == sc.TraceID() && l.SpanContext.SpanID() == sc.SpanID() {
			return true
		}
	}
	return false
}

func collect(t *testing.T, r sdkmetric.Reader) metricdata.ResourceMetrics {
	t.Helper()
	var rm metricdata.ResourceMetrics
	require.NoError(t, r.Collect(context.Background(), &rm))
	return rm
}

func find(rm metricdata.ResourceMetrics, name string) metricdata.Aggregation {
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name == name {
				return m.Data
			}
		}
	}
	return nil
}

func has(set attribute.Set, attrs []attribute.KeyValue) bool {
	for _, a := range attrs {
		if v, ok := set.Value(a.Key); !ok || v != a.Value {
			return false
		}
	}
	return true
}

// sum adds the points of a counter whose attributes include attrs.
func sum(rm metricdata.ResourceMetrics, name string, attrs ...attribute.KeyValue) int64 {
	var n int64
	if s, ok := find(rm, name).(metricdata.Sum[int64]); ok {
		for _, p := range s.DataPoints {
			if has(p.Attributes, attrs) {
				n += p.Value
			}
		}
	}
	return n
}

// gauge adds the points of an integer gauge.
func gauge(rm metricdata.ResourceMetrics, name string) int64 {
	var n int64
	if g, ok := find(rm, name).(metricdata.Gauge[int64]); ok {
		for _, p := range g.DataPoints {
			n += p.Value
		}
	}
	return n
}

func gaugeFloat(rm metricdata.ResourceMetrics, name string) float64 {
	var n float64
	if g, ok := find(rm, name).(metricdata.Gauge[float64]); ok {
		for _, p := range g.DataPoints {
			n += p.Value
		}
	}
	return n
}

// histogramCount adds the counts of a histogram's points whose attributes
// include attrs.
func histogramCount(rm metricdata.ResourceMetrics, name string, attrs ...attribute.KeyValue) uint64 {
	var n uint64
	if h, ok := find(rm, name).(metricdata.Histogram[float64]); ok {
		for _, p := range h.DataPoints {
			if has(p.Attributes, attrs) {
				n += p.Count
			}
		}
	}
	return n
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
