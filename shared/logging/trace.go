package logging

import (
	"context"
	"log/slog"

	"go.opentelemetry.io/otel/trace"
)

// Cloud Logging's fields that join a log entry to a trace and span; the
// console groups the entries of one trace under it.
const (
	TraceKey        = "logging.googleapis.com/trace"
	SpanIDKey       = "logging.googleapis.com/spanId"
	TraceSampledKey = "logging.googleapis.com/trace_sampled"
)

// traceHandler adds the trace fields to every record logged with a context
// that carries a span: the *Context methods (InfoContext, …) pass it.
type traceHandler struct {
	slog.Handler
	// project prefixes the trace id as Cloud Logging wants it
	// ("projects/<project>/traces/<id>"); empty writes the bare id.
	project string
}

// withTrace wraps h; project is Config.Project.
func withTrace(project string, h slog.Handler) slog.Handler {
	return traceHandler{Handler: h, project: project}
}

// Handle adds the fields at the top level: this product's loggers open no
// groups (WithGroup would nest them, and Cloud Logging would not see them).
func (h traceHandler) Handle(ctx context.Context, r slog.Record) error {
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
		id := sc.TraceID().String()
		if h.project != "" {
			id = "projects/" + h.project + "/traces/" + id
		}
		r.AddAttrs(slog.String(TraceKey, id), slog.String(SpanIDKey, sc.SpanID().String()),
			slog.Bool(TraceSampledKey, sc.IsSampled()))
	}
	return h.Handler.Handle(ctx, r)
}

func (h traceHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return traceHandler{Handler: h.Handler.WithAttrs(attrs), project: h.project}
}

func (h traceHandler) WithGroup(name string) slog.Handler {
	return traceHandler{Handler: h.Handler.WithGroup(name), project: h.project}
}
