package telemetry

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
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
// request, off (no-op providers) and on (every trace sampled).
func BenchmarkHTTPHandler(b *testing.B) {
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(tracetest.NewNoopExporter()))
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
	defer func() { _ = tp.Shutdown(context.Background()); _ = mp.Shutdown(context.Background()) }()
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		traceparent, _ := Inject(r.Context())
		_ = traceparent
		w.WriteHeader(http.StatusCreated)
	})
	for _, c := range []struct {
		name string
		h    http.Handler
	}{
		{"bare", ok},
		{"off", HTTPHandler("CreateUser", Providers{Tracer: tracenoop.NewTracerProvider(), Meter: metricnoop.NewMeterProvider()}, ok)},
		{"on", HTTPHandler("CreateUser", Providers{Tracer: tp, Meter: mp}, ok)},
	} {
		b.Run(c.name, func(b *testing.B) {
			req := httptest.NewRequest(http.MethodPost, "/", nil)
			req.Header.Set("Traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
			for b.Loop() {
				c.h.ServeHTTP(httptest.NewRecorder(), req)
			}
		})
	}
}
