// Package telemetry sets up OpenTelemetry for the product's functions: traces
// and metrics exported over OTLP when the standard OTEL_* environment
// variables ask for it, and no-op providers (which cost next to nothing)
// when they do not. It also carries the one propagation format the pipeline
// uses end to end, W3C trace context, into and out of the outbox row and the
// stream entry.
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"reflect"
	"strings"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetrichttp"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/exporters/stdout/stdoutmetric"
	"go.opentelemetry.io/otel/exporters/stdout/stdouttrace"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.40.0"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
)

// ScopeName is the instrumentation scope of every tracer and meter here.
const ScopeName = "github.com/outboxfn/outbox"

// Providers are the tracer and meter providers a function records with.
// The zero value means otel's global providers, which are no-ops unless
// [Setup] installed others.
type Providers struct {
	Tracer trace.TracerProvider
	Meter  metric.MeterProvider
}

// OrGlobal fills what p leaves nil with otel's global providers.
func (p Providers) OrGlobal() Providers {
	if p.Tracer == nil {
		p.Tracer = otel.GetTracerProvider()
	}
	if p.Meter == nil {
		p.Meter = otel.GetMeterProvider()
	}
	return p
}

// TracerOf returns the product's tracer from p (or the global provider).
func (p Providers) TracerOf() trace.Tracer {
	return p.OrGlobal().Tracer.Tracer(ScopeName)
}

// MeterOf returns the product's meter from p (or the global provider).
func (p Providers) MeterOf() metric.Meter {
	return p.OrGlobal().Meter.Meter(ScopeName)
}

// records reports whether p may record anything: false when both
// providers are no-ops, or otel's globals while nothing is installed (their
// type then is the global package's own delegating provider, replaced by
// the installed one on otel.Set*Provider).
func (p Providers) records() bool {
	p = p.OrGlobal()
	return !noopProvider(p.Tracer) || !noopProvider(p.Meter)
}

func noopProvider(p any) bool {
	switch p.(type) {
	case tracenoop.TracerProvider, metricnoop.MeterProvider:
		return true
	}
	switch reflect.TypeOf(p).String() {
	case "*global.tracerProvider", "*global.meterProvider":
		return true
	}
	return false
}

// Propagator is W3C trace context, the one format the pipeline carries: in
// the traceparent header, the outbox row and the stream entry.
var Propagator propagation.TextMapPropagator = propagation.TraceContext{}

// Setup builds the providers the environment asks for and installs them as
// otel's globals; shutdown flushes and stops them (call it before exit).
//
// Traces are exported when OTEL_TRACES_EXPORTER is "otlp" or "console", or
// when it is unset and an OTLP endpoint is (OTEL_EXPORTER_OTLP_ENDPOINT or
// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT); metrics likewise with
// OTEL_METRICS_EXPORTER and OTEL_EXPORTER_OTLP_METRICS_ENDPOINT.
// OTEL_SDK_DISABLED=true turns both off. The exporters, the sampler
// (OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG; default parent-based
// always-on), the metric interval (OTEL_METRIC_EXPORT_INTERVAL) and the
// resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES) read the rest of
// the standard variables themselves. OTLP goes over HTTP/protobuf (port
// 4318); OTEL_EXPORTER_OTLP_PROTOCOL=grpc is refused.
//
// With nothing configured Setup installs nothing and returns the no-op
// globals.
func Setup(ctx context.Context) (Providers, func(context.Context) error, error) {
	noop := func(context.Context) error { return nil }
	traces, err := exporterKind("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
	if err != nil {
		return Providers{}, noop, err
	}
	metrics, err := exporterKind("OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
	if err != nil {
		return Providers{}, noop, err
	}
	if traces == "" && metrics == "" {
		return Providers{}.OrGlobal(), noop, nil
	}
	for _, v := range []string{"OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"} {
		if p := os.Getenv(v); p != "" && p != "http/protobuf" {
			return Providers{}, noop, fmt.Errorf("%s=%s: only http/protobuf is built in (OTLP on port 4318)", v, p)
		}
	}
	res, err := newResource(ctx)
	if err != nil {
		return Providers{}, noop, err
	}
	var shutdowns []func(context.Context) error
	shutdown := func(ctx context.Context) error {
		var errs []error
		for _, s := range shutdowns {
			errs = append(errs, s(ctx))
		}
		return errors.Join(errs...)
	}
	p := Providers{}.OrGlobal()
	if traces != "" {
		var exp sdktrace.SpanExporter
		if traces == "console" {
			exp, err = stdouttrace.New(stdouttrace.WithWriter(os.Stderr))
		} else {
			exp, err = otlptracehttp.New(ctx)
		}
		if err != nil {
			return Providers{}, noop, fmt.Errorf("create trace exporter: %w", err)
		}
		// The sampler comes from OTEL_TRACES_SAMPLER when no option sets it.
		tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
		shutdowns = append(shutdowns, tp.Shutdown)
		otel.SetTracerProvider(tp)
		p.Tracer = tp
	}
	if metrics != "" {
		var exp sdkmetric.Exporter
		if metrics == "console" {
			exp, err = stdoutmetric.New(stdoutmetric.WithWriter(os.Stderr))
		} else {
			exp, err = otlpmetrichttp.New(ctx)
		}
		if err != nil {
			_ = shutdown(ctx)
			return Providers{}, noop, fmt.Errorf("create metric exporter: %w", err)
		}
		mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewPeriodicReader(exp)), sdkmetric.WithResource(res))
		shutdowns = append(shutdowns, mp.Shutdown)
		otel.SetMeterProvider(mp)
		p.Meter = mp
	}
	otel.SetTextMapPropagator(Propagator)
	return p, shutdown, nil
}

// exporterKind reads OTEL_<SIGNAL>_EXPORTER: "" (off), "otlp" or "console".
func exporterKind(variable, signalEndpoint string) (string, error) {
	if strings.EqualFold(os.Getenv("OTEL_SDK_DISABLED"), "true") {
		return "", nil
	}
	switch v := strings.TrimSpace(os.Getenv(variable)); v {
	case "none":
		return "", nil
	case "otlp", "console":
		return v, nil
	case "":
		if os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || os.Getenv(signalEndpoint) != "" {
			return "otlp", nil
		}
		return "", nil
	default:
		return "", fmt.Errorf("%s must be otlp, console or none, not %q", variable, v)
	}
}

// newResource describes this process: OTEL_SERVICE_NAME, or else Cloud
// Run's K_SERVICE, or "outbox"; and OTEL_RESOURCE_ATTRIBUTES.
func newResource(ctx context.Context) (*resource.Resource, error) {
	name := os.Getenv("K_SERVICE")
	if name == "" {
		name = "outbox"
	}
	attrs := []attribute.KeyValue{semconv.ServiceName(name)}
	if rev := os.Getenv("K_REVISION"); rev != "" {
		attrs = append(attrs, semconv.ServiceVersion(rev))
	}
	// WithFromEnv comes last so that OTEL_SERVICE_NAME wins.
	res, err := resource.New(ctx, resource.WithTelemetrySDK(), resource.WithAttributes(attrs...), resource.WithFromEnv())
	if err != nil {
		return nil, fmt.Errorf("describe the telemetry resource: %w", err)
	}
	return res, nil
}

// HTTPHandler wraps a function's handler with its server span (the request's
// traceparent honoured) and the http.server.request.duration metric, which
// carries the function's name as faas.name beside the method, scheme and
// status (see serverHandler).
//
// With nothing to record to (no-op providers, or otel's globals before
// Setup installed any) it only reads the request's traceparent into its
// context, at a tenth of the cost: the event still carries the caller's
// trace, and log lines its ids.
func HTTPHandler(name string, p Providers, h http.Handler) http.Handler {
	p = p.OrGlobal()
	if !p.records() {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("Traceparent") != "" {
				r = r.WithContext(Propagator.Extract(r.Context(), propagation.HeaderCarrier(r.Header)))
			}
			h.ServeHTTP(w, r)
		})
	}
	return newServerHandler(name, p, h)
}

// Inject returns the W3C trace context of ctx's span: the traceparent and
// tracestate values to store with an event, or "" when ctx has no valid
// span context.
func Inject(ctx context.Context) (traceparent, tracestate string) {
	sc := trace.SpanContextFromContext(ctx)
	if !sc.IsValid() {
		return "", ""
	}
	c := propagation.MapCarrier{}
	Propagator.Inject(ctx, c)
	return c["traceparent"], c["tracestate"]
}

// Extract returns ctx carrying the remote span context that traceparent and
// tracestate describe; a missing or malformed traceparent leaves ctx as it
// is.
func Extract(ctx context.Context, traceparent, tracestate string) context.Context {
	if traceparent == "" {
		return ctx
	}
	c := propagation.MapCarrier{"traceparent": traceparent}
	if tracestate != "" {
		c["tracestate"] = tracestate
	}
	return Propagator.Extract(ctx, c)
}

// SpanContext parses a stored traceparent; the result is invalid when s is
// empty or malformed.
func SpanContext(traceparent string) trace.SpanContext {
	return trace.SpanContextFromContext(Extract(context.Background(), traceparent, ""))
}

// Failed marks span as failed with err's text, made valid UTF-8: an error
// can carry bytes from outside (a server's reply), and the OTLP exporter
// refuses invalid UTF-8, and with it the whole batch the span is in.
func Failed(span trace.Span, err error) {
	span.SetStatus(codes.Error, strings.ToValidUTF8(err.Error(), "\uFFFD"))
}
