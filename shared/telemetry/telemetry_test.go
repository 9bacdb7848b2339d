package telemetry

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestParseTraceparent(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, in string
		valid    bool
		sampled  bool
	}{
		{"reads a sampled version 00 header", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", true, true},
		{"reads an unsampled one", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", true, false},
		{"reads a later version's first fields", "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", true, true},
		{"refuses version ff", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", false, false},
		{"refuses version 00 with trailing data", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", false, false},
		{"refuses an all-zero trace id", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", false, false},
		{"refuses an all-zero span id", "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", false, false},
		{"refuses upper-case hex", "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", false, false},
		{"refuses an empty string", "", false, false},
		{"refuses garbage", "00-zz-bad", false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sc := ParseTraceparent(tt.in)
			assert.Equal(t, tt.valid, sc.IsValid())
			assert.Equal(t, tt.sampled, sc.IsSampled())
			// The propagator agrees on what is valid.
			assert.Equal(t, tt.valid, SpanContext(tt.in).IsValid(), "propagator")
		})
	}
}

func TestInjectWritesTheSpanOfTheContextAndExtractReadsIt(t *testing.T) {
	t.Parallel()
	tp := sdktrace.NewTracerProvider()
	defer func() { _ = tp.Shutdown(context.Background()) }()

	tp0, ts0 := Inject(context.Background())
	assert.Empty(t, tp0, "no span, nothing to store")
	assert.Empty(t, ts0)

	parent := Extract(context.Background(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "vendor=x")
	ctx, span := tp.Tracer("t").Start(parent, "child")
	defer span.End()
	traceparent, tracestate := Inject(ctx)
	assert.Equal(t, "00-4bf92f3577b34da6a3ce929d0e0e4736-"+span.SpanContext().SpanID().String()+"-01", traceparent)
	assert.Equal(t, "vendor=x", tracestate)
	assert.Equal(t, span.SpanContext().SpanID(), ParseTraceparent(traceparent).SpanID())
}

func TestProvidersRecordOnlyWithAnSDK(t *testing.T) {
	// Before TestSetup…, which installs globals.
	tp := sdktrace.NewTracerProvider()
	defer func() { _ = tp.Shutdown(context.Background()) }()
	mp := sdkmetric.NewMeterProvider()
	defer func() { _ = mp.Shutdown(context.Background()) }()
	tests := []struct {
		name string
		p    Providers
		want bool
	}{
		{"otel's globals before anything is installed", Providers{}, false},
		{"the no-op providers", Providers{Tracer: tracenoop.NewTracerProvider(), Meter: metricnoop.NewMeterProvider()}, false},
		{"an SDK tracer provider", Providers{Tracer: tp}, true},
		{"an SDK meter provider", Providers{Meter: mp}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, tt.p.records())
		})
	}
}

func TestAHandlerWithoutTelemetryStillReadsTheTraceparent(t *testing.T) {
	var got string
	h := HTTPHandler("CreateUser", Providers{}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, _ = Inject(r.Context())
	}))
	for _, tp := range []string{"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "", "00-zz-bad"} {
		req := httptest.NewRequest(http.MethodPost, "/", nil)
		if tp != "" {
			req.Header.Set("Traceparent", tp)
		}
		h.ServeHTTP(httptest.NewRecorder(), req)
		want := tp
		if tp == "00-zz-bad" {
			want = ""
		}
		assert.Equal(t, want, got, "traceparent %q", tp)
	}
}

func TestSetupIsOffUnlessTheEnvironmentAsks(t *testing.T) {
	// t.Setenv: not parallel.
	for _, v := range []string{"OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
		"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_SDK_DISABLED", "OTEL_EXPORTER_OTLP_PROTOCOL"} {
		t.Setenv(v, "")
	}
	p, shutdown, err := Setup(context.Background())
	require.NoError(t, err)
	require.NoError(t, shutdown(context.Background()))
	_, sdk := p.Tracer.(*sdktrace.TracerProvider)
	assert.False(t, sdk, "nothing set: no SDK")
	_, span := p.TracerOf().Start(context.Background(), "x")
	assert.False(t, span.IsRecording())

	t.Run("refuses an unknown exporter", func(t *testing.T) {
		t.Setenv("OTEL_TRACES_EXPORTER", "zipkin")
		_, _, err := Setup(context.Background())
		require.ErrorContains(t, err, "OTEL_TRACES_EXPORTER")
	})
	t.Run("refuses grpc, which is not built in", func(t *testing.T) {
		t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
		t.Setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
		_, _, err := Setup(context.Background())
		require.ErrorContains(t, err, "http/protobuf")
	})
	t.Run("OTEL_SDK_DISABLED wins over an endpoint", func(t *testing.T) {
		t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
		t.Setenv("OTEL_SDK_DISABLED", "true")
		p, _, err := Setup(context.Background())
		require.NoError(t, err)
		_, sdk := p.Tracer.(*sdktrace.TracerProvider)
		assert.False(t, sdk)
	})
	t.Run("an endpoint turns both on, sampled as OTEL_TRACES_SAMPLER says", func(t *testing.T) {
		prevT, prevM := otel.GetTracerProvider(), otel.GetMeterProvider()
		defer func() { otel.SetTracerProvider(prevT); otel.SetMeterProvider(prevM) }()
		t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
		t.Setenv("OTEL_TRACES_SAMPLER", "always_off")
		p, shutdown, err := Setup(context.Background())
		require.NoError(t, err)
		defer func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			_ = shutdown(ctx) // nothing listens; the flush may fail
		}()
		_, sdk := p.Tracer.(*sdktrace.TracerProvider)
		require.True(t, sdk)
		assert.Equal(t, p.Tracer, otel.GetTracerProvider(), "installed as the global")
		_, span := p.TracerOf().Start(context.Background(), "x")
		assert.False(t, span.SpanContext().IsSampled(), "always_off")
		assert.NotEqual(t, trace.SpanContext{}, span.SpanContext())
	})
}

// BenchmarkHTTPHandler measures what the server span and metrics add to a
// request that also opens a child span and reads its trace context, as
// createuser does: off (no-op providers) and on (every trace sampled,
// exported over OTLP/HTTP to a sink in the process). cpu-µs/op is the
// process's CPU, so the batch processor's export and the garbage
// collector count as well.
func BenchmarkHTTPHandler(b *testing.B) {
	sink := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
	}))
	defer sink.Close()
	exp, err := otlptracehttp.New(context.Background(), otlptracehttp.WithEndpointURL(sink.URL+"/v1/traces"))
	require.NoError(b, err)
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp))
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
	defer func() { _ = tp.Shutdown(context.Background()); _ = mp.Shutdown(context.Background()) }()
	handler := func(p Providers) http.Handler {
		tracer := p.TracerOf()
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			ctx, span := tracer.Start(r.Context(), "createuser transaction", trace.WithSpanKind(trace.SpanKindClient))
			traceparent, _ := Inject(ctx)
			_ = traceparent
			span.End()
			w.WriteHeader(http.StatusCreated)
		})
	}
	off := Providers{Tracer: tracenoop.NewTracerProvider(), Meter: metricnoop.NewMeterProvider()}
	on := Providers{Tracer: tp, Meter: mp}
	for _, c := range []struct {
		name string
		h    http.Handler
	}{
		{"bare", handler(off)},
		{"off", HTTPHandler("CreateUser", off, handler(off))},
		{"on", HTTPHandler("CreateUser", on, handler(on))},
	} {
		b.Run(c.name, func(b *testing.B) {
			req := httptest.NewRequest(http.MethodPost, "/", nil)
			req.Header.Set("Traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
			b.ReportAllocs()
			before := processCPU()
			for b.Loop() {
				c.h.ServeHTTP(httptest.NewRecorder(), req)
			}
			_ = tp.ForceFlush(context.Background())
			b.ReportMetric(float64((processCPU()-before).Microseconds())/float64(b.N), "cpu-µs/op")
		})
	}
}

// processCPU is the CPU this process has used, user and system.
func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func TestHTTPHandlerRecordsTheServerSpanAndTheDurationByTheConventions(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		method      string
		traceparent string
		respond     func(w http.ResponseWriter)
		wantStatus  int
		wantMethod  string
		wantError   bool
		wantParent  bool
	}{
		{"a created user continues the caller's trace", http.MethodPost, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
			func(w http.ResponseWriter) { w.WriteHeader(http.StatusCreated) }, 201, "POST", false, true},
		{"a request without a traceparent starts a trace", http.MethodPost, "",
			func(w http.ResponseWriter) { w.WriteHeader(http.StatusCreated) }, 201, "POST", false, false},
		{"a malformed traceparent starts a trace", http.MethodPost, "00-zz-bad",
			func(w http.ResponseWriter) { w.WriteHeader(http.StatusCreated) }, 201, "POST", false, false},
		{"a body without a status is a 200", http.MethodGet, "",
			func(w http.ResponseWriter) { _, _ = w.Write([]byte("{}")) }, 200, "GET", false, false},
		{"a handler that writes nothing is a 200", http.MethodGet, "",
			func(http.ResponseWriter) {}, 200, "GET", false, false},
		{"a 4xx is the client's error, not the span's", http.MethodPost, "",
			func(w http.ResponseWriter) { w.WriteHeader(http.StatusBadRequest) }, 400, "POST", false, false},
		{"a 5xx marks the span as failed", http.MethodPost, "",
			func(w http.ResponseWriter) { w.WriteHeader(http.StatusServiceUnavailable) }, 503, "POST", true, false},
		{"an invented method is recorded as _OTHER", "BREW", "",
			func(w http.ResponseWriter) { w.WriteHeader(http.StatusMethodNotAllowed) }, 405, "_OTHER", false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			spans, reader, p := recording(t)

			var inner trace.SpanContext
			h := HTTPHandler("CreateUser", p, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				inner = trace.SpanContextFromContext(r.Context())
				tt.respond(w)
			}))
			req := httptest.NewRequest(tt.method, "/users", nil)
			if tt.traceparent != "" {
				req.Header.Set("Traceparent", tt.traceparent)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			assert.Equal(t, tt.wantStatus, rec.Code, "the response is the handler's")

			ended := spans.Ended()
			require.Len(t, ended, 1)
			s := ended[0]
			assert.Equal(t, "CreateUser", s.Name())
			assert.Equal(t, trace.SpanKindServer, s.SpanKind())
			assert.Equal(t, s.SpanContext(), inner, "the handler runs inside the span")
			if tt.wantParent {
				assert.Equal(t, "4bf92f3577b34da6a3ce929d0e0e4736", s.SpanContext().TraceID().String())
				assert.Equal(t, "00f067aa0ba902b7", s.Parent().SpanID().String())
			} else {
				assert.False(t, s.Parent().IsValid(), "a new trace")
			}
			attrs := attribute.NewSet(s.Attributes()...)
			for k, want := range map[attribute.Key]any{
				"faas.name": "CreateUser", "http.request.method": tt.wantMethod, "url.scheme": "http",
				"url.path": "/users", "http.response.status_code": int64(tt.wantStatus),
			} {
				v, ok := attrs.Value(k)
				if assert.True(t, ok, "span attribute %s", k) {
					assert.Equal(t, want, v.AsInterface(), "span attribute %s", k)
				}
			}
			if tt.wantMethod == "_OTHER" {
				v, _ := attrs.Value("http.request.method_original")
				assert.Equal(t, tt.method, v.AsString())
			}
			_, hasErrorType := attrs.Value("error.type")
			assert.Equal(t, tt.wantError, hasErrorType, "error.type")
			if tt.wantError {
				assert.Equal(t, codes.Error, s.Status().Code)
			} else {
				assert.Equal(t, codes.Unset, s.Status().Code)
			}

			var rm metricdata.ResourceMetrics
			require.NoError(t, reader.Collect(context.Background(), &rm))
			points := durationPoints(t, rm)
			require.Len(t, points, 1, "one series")
			assert.Equal(t, uint64(1), points[0].Count)
			want := []attribute.KeyValue{attribute.String("faas.name", "CreateUser"),
				attribute.String("http.request.method", tt.wantMethod), attribute.String("url.scheme", "http"),
				attribute.Int("http.response.status_code", tt.wantStatus)}
			if tt.wantError {
				want = append(want, attribute.String("error.type", strconv.Itoa(tt.wantStatus)))
			}
			assert.Equal(t, attribute.NewSet(want...), points[0].Attributes, "only bounded attributes: no path, no original method")
		})
	}
}

func TestHTTPHandlerRecordsAPanickingRequestAsA500(t *testing.T) {
	t.Parallel()
	spans, _, p := recording(t)
	h := HTTPHandler("Relay", p, http.HandlerFunc(func(http.ResponseWriter, *http.Request) {
		panic(http.ErrAbortHandler)
	}))
	assert.PanicsWithValue(t, http.ErrAbortHandler, func() {
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodPost, "/", nil))
	}, "the panic goes on to net/http")
	require.Len(t, spans.Ended(), 1)
	assert.Equal(t, codes.Error, spans.Ended()[0].Status().Code)
}

func durationPoints(t *testing.T, rm metricdata.ResourceMetrics) []metricdata.HistogramDataPoint[float64] {
	t.Helper()
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name == "http.server.request.duration" {
				assert.Equal(t, "s", m.Unit)
				h, ok := m.Data.(metricdata.Histogram[float64])
				require.True(t, ok, "a float histogram")
				return h.DataPoints
			}
		}
	}
	t.Fatal("no http.server.request.duration")
	return nil
}

// recording returns providers that keep every span and metric for the test
// to read.
func recording(t *testing.T) (*tracetest.SpanRecorder, *sdkmetric.ManualReader, Providers) {
	t.Helper()
	spans := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()); _ = mp.Shutdown(context.Background()) })
	return spans, reader, Providers{Tracer: tp, Meter: mp}
}
