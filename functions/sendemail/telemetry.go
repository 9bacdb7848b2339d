package sendemail

import (
	"context"
	"errors"
	"time"

	"github.com/redis/rueidis"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/outboxfn/outbox/shared/stream"
	"github.com/outboxfn/outbox/shared/telemetry"
)

// instruments are sendemail's spans and metrics.
type instruments struct {
	tracer trace.Tracer
	// emails counts the entries handled by outcome; consumed follows
	// messaging.client.consumed.messages.
	emails, consumed metric.Int64Counter
	smtpDuration     metric.Float64Histogram
}

func newInstruments(p telemetry.Providers) *instruments {
	m := p.MeterOf()
	in := &instruments{tracer: p.TracerOf()}
	// The API returns a usable no-op instrument with any error.
	in.emails, _ = m.Int64Counter("outbox.email.entries", metric.WithUnit("{entry}"),
		metric.WithDescription("Stream entries sendemail handled, by outcome: sent, duplicate (sent before), skipped (another event type), retry (left pending after a transient failure), dead_lettered, vanished (trimmed before processing)."))
	in.consumed, _ = m.Int64Counter("messaging.client.consumed.messages", metric.WithUnit("{message}"),
		metric.WithDescription("Stream entries sendemail read and handled."))
	in.smtpDuration, _ = m.Float64Histogram("outbox.email.smtp.duration", metric.WithUnit("s"),
		metric.WithDescription("One conversation with the mail server (or one .eml file written), by outcome: ok or error."),
		metric.WithExplicitBucketBoundaries(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
	return in
}

// startEntries starts a span per entry, a child of the trace context the
// entry carries (a new trace when it carries none), and returns the
// contexts that hold them.
func (c *Consumer) startEntries(ctx context.Context, entries []rueidis.XRangeEntry) ([]context.Context, []trace.Span) {
	ctxs, spans := make([]context.Context, len(entries)), make([]trace.Span, len(entries))
	for i, e := range entries {
		ectx := ctx
		if sc := telemetry.ParseTraceparent(e.FieldValues[stream.FieldTraceparent]); sc.IsValid() {
			if ts := e.FieldValues[stream.FieldTracestate]; ts != "" {
				if state, err := trace.ParseTraceState(ts); err == nil {
					sc = sc.WithTraceState(state)
				}
			}
			ectx = trace.ContextWithRemoteSpanContext(ctx, sc)
		}
		ctxs[i], spans[i] = c.tel.tracer.Start(ectx, "process", trace.WithSpanKind(trace.SpanKindConsumer),
			trace.WithAttributes(attribute.String("messaging.system", "redis"),
				attribute.String("messaging.operation.name", "process"),
				attribute.String("messaging.destination.name", c.stream),
				attribute.String("messaging.consumer.group.name", c.group),
				attribute.String("messaging.message.id", e.ID)))
	}
	return ctxs, spans
}

var outcomeNames = [...]string{
	outcomeSent:      "sent",
	outcomeDuplicate: "duplicate",
	outcomeSkipped:   "skipped",
	outcomeRetry:     "retry",
	outcomeDead:      "dead_lettered",
	outcomeVanished:  "vanished",
}

// endEntry ends an entry's span with its outcome.
func endEntry(span trace.Span, o outcome) {
	if !span.IsRecording() {
		span.End()
		return
	}
	span.SetAttributes(attribute.String("outbox.email.outcome", outcomeNames[o.kind]))
	if o.err != nil && (o.kind == outcomeRetry || o.kind == outcomeDead) {
		telemetry.Failed(span, o.err)
	}
	span.End()
}

// count records a batch's stats.
func (in *instruments) count(ctx context.Context, s Stats, entries int, stream, group string) {
	if entries > 0 {
		in.consumed.Add(ctx, int64(entries), metric.WithAttributes(attribute.String("messaging.system", "redis"),
			attribute.String("messaging.destination.name", stream), attribute.String("messaging.consumer.group.name", group)))
	}
	for _, c := range []struct {
		name string
		n    int64
	}{
		{"sent", s.Sent}, {"duplicate", s.Duplicates}, {"skipped", s.Skipped}, {"retry", s.Retried},
		{"dead_lettered", s.DeadLettered}, {"vanished", s.Vanished},
	} {
		if c.n > 0 {
			in.emails.Add(ctx, c.n, metric.WithAttributes(attribute.String("outcome", c.name)))
		}
	}
}

// startChild starts a span under the entry's.
func (in *instruments) startChild(ctx context.Context, name string, kind trace.SpanKind, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	return in.tracer.Start(ctx, name, trace.WithSpanKind(kind), trace.WithAttributes(attrs...))
}

// endSpan ends span, marking it failed when err is not nil.
func endSpan(span trace.Span, err error) {
	if err != nil {
		telemetry.Failed(span, err)
	}
	span.End()
}

// observeStream registers the gauges read at each collection: the
// stream's length and, per consumer group, its pending entries and lag
// (one pipelined XLEN and XINFO GROUPS).
func (s *Service) observeStream(p telemetry.Providers) error {
	m := p.MeterOf()
	length, _ := m.Int64ObservableGauge("outbox.stream.length", metric.WithUnit("{entry}"),
		metric.WithDescription("Entries in the stream (acknowledged ones included, until the relay trims them)."))
	pending, _ := m.Int64ObservableGauge("outbox.stream.pending", metric.WithUnit("{entry}"),
		metric.WithDescription("Entries a consumer group has read and not acknowledged (in delivery, failing, or left by a crashed consumer)."))
	lag, _ := m.Int64ObservableGauge("outbox.stream.lag", metric.WithUnit("{entry}"),
		metric.WithDescription("Entries a consumer group has not read yet."))
	reg, err := m.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		ctx, cancel := context.WithTimeout(ctx, redisTimeout)
		defer cancel()
		cmds := make(rueidis.Commands, 0, 2*len(s.consumers))
		for _, c := range s.consumers {
			cmds = append(cmds, s.redis.B().Xlen().Key(c.stream).Build(), s.redis.B().XinfoGroups().Key(c.stream).Build())
		}
		res := s.redis.DoMulti(ctx, cmds...)
		var errs []error
		for i, c := range s.consumers {
			errs = append(errs, observeOne(o, c.stream, res[2*i], res[2*i+1], length, pending, lag))
		}
		return errors.Join(errs...)
	}, length, pending, lag)
	if err != nil {
		return err
	}
	s.unobserve = reg.Unregister
	return nil
}

// observeOne observes one stream's length and its groups' pending entries
// and lag, from the replies of its XLEN and XINFO GROUPS.
func observeOne(o metric.Observer, key string, xlen, xinfo rueidis.RedisResult, length, pending, lag metric.Int64ObservableGauge) error {
	n, err := xlen.AsInt64()
	if err != nil {
		return err
	}
	streamAttr := attribute.String("messaging.destination.name", key)
	o.ObserveInt64(length, n, metric.WithAttributes(streamAttr))
	groups, err := xinfo.ToArray()
	if err != nil {
		if rueidis.IsRedisNil(err) {
			return nil
		}
		if _, answered := rueidis.IsRedisErr(err); answered {
			return nil // no such key yet: no groups
		}
		return err
	}
	for _, g := range groups {
		info, err := g.AsMap()
		if err != nil {
			return err
		}
		nameMsg, pendingMsg, lagMsg := info["name"], info["pending"], info["lag"]
		name, _ := nameMsg.ToString()
		attrs := metric.WithAttributes(streamAttr, attribute.String("messaging.consumer.group.name", name))
		if p, err := pendingMsg.AsInt64(); err == nil {
			o.ObserveInt64(pending, p, attrs)
		}
		// lag is nil when Redis cannot tell (entries deleted mid-way).
		if l, err := lagMsg.AsInt64(); err == nil {
			o.ObserveInt64(lag, l, attrs)
		}
	}
	return nil
}

// timeSMTP records one conversation's duration.
func (in *instruments) timeSMTP(ctx context.Context, start time.Time, err error) {
	outcome := "ok"
	if err != nil {
		outcome = "error"
	}
	in.smtpDuration.Record(ctx, time.Since(start).Seconds(), metric.WithAttributes(attribute.String("outcome", outcome)))
}
