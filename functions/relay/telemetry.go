package relay

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/outboxfn/outbox/shared/outbox"
	"github.com/outboxfn/outbox/shared/telemetry"
)

// maxLinks bounds the links of a batch's span: the SDK keeps 128 by
// default (OTEL_SPAN_LINK_COUNT_LIMIT), and so does Cloud Trace. Only
// sampled events are linked.
const maxLinks = 128

// instruments are the relay's spans and metrics. With the no-op providers
// (tracing and metrics off) each costs a few nanoseconds per batch.
type instruments struct {
	tracer trace.Tracer
	// relayed follows messaging.client.sent.messages.
	relayed, duplicates, dead, batches, replayed metric.Int64Counter
	drainDuration, commitToStream                metric.Float64Histogram
}

// messagingAttrs name the messaging system on every relay metric and span.
var messagingAttrs = []attribute.KeyValue{
	attribute.String("messaging.system", "redis"),
	attribute.String("messaging.operation.name", "publish"),
}

func newInstruments(p telemetry.Providers) *instruments {
	m := p.MeterOf()
	in := &instruments{tracer: p.TracerOf()}
	// The API returns a usable no-op instrument with any error, and the
	// names here are valid; nothing to handle.
	in.relayed, _ = m.Int64Counter("messaging.client.sent.messages", metric.WithUnit("{message}"),
		metric.WithDescription("Outbox events the relay added to a stream."))
	in.duplicates, _ = m.Int64Counter("outbox.relay.duplicates", metric.WithUnit("{event}"),
		metric.WithDescription("Claimed outbox events an interrupted batch had published already; deleted without publishing again."))
	in.dead, _ = m.Int64Counter("outbox.relay.dead", metric.WithUnit("{event}"),
		metric.WithDescription("Outbox events Redis refused, moved to outbox_dead."))
	in.batches, _ = m.Int64Counter("outbox.relay.batches", metric.WithUnit("{batch}"),
		metric.WithDescription("Batches the relay committed (one transaction and one Redis round trip each)."))
	in.replayed, _ = m.Int64Counter("outbox.relay.replayed", metric.WithUnit("{event}"),
		metric.WithDescription("Retained events published again because Redis had lost them."))
	in.drainDuration, _ = m.Float64Histogram("outbox.relay.drain.duration", metric.WithUnit("s"),
		metric.WithDescription("Duration of one drain: until the outbox was empty, the deadline passed or it failed."))
	in.commitToStream, _ = m.Float64Histogram("outbox.relay.commit_to_stream.duration", metric.WithUnit("s"),
		metric.WithDescription("From an event's created_at (its transaction's start) to the commit of the batch that published it."),
		metric.WithExplicitBucketBoundaries(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
	return in
}

// publishAndCommit is publishBatch in a span per batch, linked to the
// trace of each sampled event (up to maxLinks), and counted.
func (d *Drainer) publishAndCommit(ctx context.Context, cur *claimed, sess *session, res *Result, claimNext func() (*claimed, error)) (*claimed, error) {
	in := d.tel
	_, span := in.tracer.Start(ctx, "publish", trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(append(messagingAttrs, attribute.Int("messaging.batch.message_count", len(cur.rows)))...))
	if span.IsRecording() {
		links := 0
		for i := 0; i < len(cur.rows) && links < maxLinks; i++ {
			if tp := cur.rows[i].Traceparent; tp != nil {
				if sc := telemetry.ParseTraceparent(*tp); sc.IsValid() && sc.IsSampled() {
					span.AddLink(trace.Link{SpanContext: sc})
					links++
				}
			}
		}
	}
	before := *res
	next, err := d.publishBatch(ctx, cur, sess, res, claimNext)
	if res.Batches == before.Batches {
		// The batch did not commit; err is its error.
		if err != nil {
			telemetry.Failed(span, err)
		}
		span.End()
		return next, err
	}
	now := time.Now()
	relayed, duplicates, dead := res.Relayed-before.Relayed, res.Duplicates-before.Duplicates, res.Dead-before.Dead
	span.SetAttributes(attribute.Int("outbox.relay.relayed", relayed), attribute.Int("outbox.relay.duplicates", duplicates),
		attribute.Int("outbox.relay.dead", dead))
	span.End(trace.WithTimestamp(now))
	attrs := metric.WithAttributes(messagingAttrs...)
	in.batches.Add(ctx, 1, attrs)
	in.relayed.Add(ctx, int64(relayed), attrs)
	if duplicates > 0 {
		in.duplicates.Add(ctx, int64(duplicates), attrs)
	}
	if dead > 0 {
		in.dead.Add(ctx, int64(dead), attrs)
	}
	if in.commitToStream.Enabled(ctx) {
		for i := range cur.rows {
			if cur.rows[i].Infinite == pgtype.Finite {
				in.commitToStream.Record(ctx, now.Sub(cur.rows[i].CreatedAt).Seconds(), attrs)
			}
		}
	}
	return next, err
}

// drained records a drain's duration and what it replayed.
func (in *instruments) drained(ctx context.Context, start time.Time, res Result, err error) {
	outcome := "complete"
	switch {
	case errors.Is(err, ErrBusy):
		outcome = "busy"
	case err != nil:
		outcome = "error"
	case !res.Complete:
		outcome = "incomplete"
	}
	in.drainDuration.Record(ctx, time.Since(start).Seconds(), metric.WithAttributes(attribute.String("outcome", outcome)))
	if res.Replayed > 0 {
		in.replayed.Add(ctx, int64(res.Replayed), metric.WithAttributes(messagingAttrs...))
	}
}

// observeOutbox registers the gauges read at each collection: the backlog
// and age of its oldest row (outbox.MeasureBacklog) and outbox_dead.
func (s *Service) observeOutbox(p telemetry.Providers) error {
	m := p.MeterOf()
	backlog, _ := m.Int64ObservableGauge("outbox.backlog", metric.WithUnit("{event}"),
		metric.WithDescription("Outbox rows not yet relayed."))
	oldest, _ := m.Float64ObservableGauge("outbox.backlog.oldest_age", metric.WithUnit("s"),
		metric.WithDescription("Age of the oldest outbox row not yet relayed; 0 when none waits."))
	dead, _ := m.Int64ObservableGauge("outbox.dead", metric.WithUnit("{event}"),
		metric.WithDescription("Rows in outbox_dead: events Redis refused, waiting for an operator."))
	reg, err := m.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		ctx, cancel := context.WithTimeout(ctx, statementTimeout)
		defer cancel()
		b, err := outbox.MeasureBacklog(ctx, s.pool)
		if err != nil {
			return err
		}
		o.ObserveInt64(backlog, b.Events)
		o.ObserveFloat64(oldest, b.OldestAgeSeconds)
		dd, err := outbox.MeasureDead(ctx, s.pool)
		if err != nil {
			return err
		}
		o.ObserveInt64(dead, dd.Count)
		return nil
	}, backlog, oldest, dead)
	if err != nil {
		return err
	}
	s.unobserve = reg.Unregister
	return nil
}
