package telemetry

import "go.opentelemetry.io/otel/trace"

// ParseTraceparent reads a stored W3C traceparent without the propagator's
// allocations, for the relay, which reads one per event. Only what
// [Inject] writes (version 00, 55 characters) and later versions' first 55
// characters are read; anything else gives an invalid span context.
func ParseTraceparent(s string) trace.SpanContext {
	if len(s) < 55 || s[2] != '-' || s[35] != '-' || s[52] != '-' || s[:2] == "ff" || (s[:2] == "00" && len(s) != 55) {
		return trace.SpanContext{}
	}
	tid, err := trace.TraceIDFromHex(s[3:35])
	if err != nil {
		return trace.SpanContext{}
	}
	sid, err := trace.SpanIDFromHex(s[36:52])
	if err != nil {
		return trace.SpanContext{}
	}
	var flags trace.TraceFlags
	switch s[53:55] {
	case "00":
	case "01":
		flags = trace.FlagsSampled
	default:
		return trace.SpanContext{}
	}
	return trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: sid, TraceFlags: flags, Remote: true})
}
