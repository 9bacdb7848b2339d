package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/redis/rueidis"

	"github.com/outboxfn/outbox/shared/outbox"
	"github.com/outboxfn/outbox/shared/stream"
)

// replayChunk bounds the events of one read of retained events and of one
// pipelined round trip to Redis.
const replayChunk = 500

var errNotRetained = errors.New("events not retained")

// replaySelection says which retained events replay publishes: those of
// the batches relayed from since until until (zero: now), of aggregateType
// only when it is set; or the events eventIDs names.
type replaySelection struct {
	since, until  time.Time
	aggregateType string
	eventIDs      []string
}

// Replayed is what replay published, or would publish.
type Replayed struct {
	// FirstBatch and LastBatch bound the batches of a time range; both are
	// zero for event ids, and when no batch of the range is retained.
	FirstBatch, LastBatch int64
	// OldestRetained is when the oldest batch still retained was relayed,
	// for a time range; nil when none is.
	OldestRetained *time.Time
	// Events counts the events of each stream.
	Events map[string]int64
	// Replays lists the streams among them that the relay is itself
	// publishing again.
	Replays []StreamReplay
}

// timeFlag is -since or -until: an RFC3339 time, or a duration meaning
// that long ago.
type timeFlag struct{ t time.Time }

func (f *timeFlag) String() string {
	if f == nil || f.t.IsZero() {
		return ""
	}
	return f.t.Format(time.RFC3339)
}

func (f *timeFlag) Set(s string) error {
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		f.t = t
		return nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return fmt.Errorf("%q is neither an RFC3339 time nor a duration ago", s)
	}
	f.t = time.Now().Add(-d)
	return nil
}

// replayCommand parses replay's flags, runs it and prints what it did.
func (o *ops) replayCommand(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("replay", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var since, until timeFlag
	fs.Var(&since, "since", "publish the batches relayed since then")
	fs.Var(&until, "until", "and before then (default now)")
	aggregateType := fs.String("type", "", "only the events of this aggregate type")
	var ids []string
	fs.Func("event-id", "publish these events (comma-separated)", func(s string) error {
		for _, id := range strings.Split(s, ",") {
			u, err := uuid.Parse(strings.TrimSpace(id))
			if err != nil {
				return fmt.Errorf("%q is not a UUID", id)
			}
			ids = append(ids, u.String())
		}
		return nil
	})
	dryRun := fs.Bool("dry-run", false, "count the events of each stream, publish nothing")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: replay: %v", errUsage, err)
	}
	byTime := !since.t.IsZero() || !until.t.IsZero()
	switch {
	case fs.NArg() > 0:
		return fmt.Errorf("%w: replay takes no arguments, got %q (event ids go in -event-id)", errUsage, fs.Args())
	case byTime && len(ids) > 0:
		return fmt.Errorf("%w: replay selects by time (-since, -until) or by -event-id, not both", errUsage)
	case !byTime && len(ids) == 0:
		return fmt.Errorf("%w: replay needs -since (a time range) or -event-id", errUsage)
	case len(ids) > 0 && *aggregateType != "":
		return fmt.Errorf("%w: replay: -type narrows a time range, not -event-id", errUsage)
	case byTime && since.t.IsZero():
		return fmt.Errorf("%w: replay: -until needs -since", errUsage)
	case !until.t.IsZero() && !since.t.Before(until.t):
		return fmt.Errorf("%w: replay: -since %s is not before -until %s", errUsage, since.String(), until.String())
	}
	if err := o.checkPartitions(ctx); err != nil {
		return err
	}
	r, err := o.replay(ctx, replaySelection{since: since.t, until: until.t, aggregateType: *aggregateType, eventIDs: ids}, *dryRun)
	o.printReplayed(r, byTime, since.t, *dryRun)
	return err
}

func (o *ops) printReplayed(r Replayed, byTime bool, since time.Time, dryRun bool) {
	if byTime && r.OldestRetained != nil && since.Before(*r.OldestRetained) {
		fmt.Fprintf(o.out, "note: nothing relayed before %s is retained any more (RELAY_RETENTION)\n",
			r.OldestRetained.UTC().Format(time.RFC3339))
	}
	if byTime && r.FirstBatch != 0 {
		fmt.Fprintf(o.out, "batches %d to %d\n", r.FirstBatch, r.LastBatch)
	}
	names := make([]string, 0, len(r.Events))
	for name := range r.Events {
		names = append(names, name)
	}
	sort.Strings(names)
	verb := "published"
	if dryRun {
		verb = "would be published"
	}
	for _, name := range names {
		fmt.Fprintf(o.out, "%s: %d events %s\n", name, r.Events[name], verb)
	}
	if len(names) == 0 {
		fmt.Fprintln(o.out, "no retained event selected: nothing to publish")
	}
	for _, rp := range r.Replays {
		fmt.Fprintf(o.out, "note: the relay is itself publishing %s again from batch %d\n", rp.Stream, rp.FromBatch)
	}
}

// replay publishes retained events again (or, dryRun, only counts them),
// in the order the relay published them: (batch, id). Each becomes a new
// entry with the fields the relay writes, its event id among them, so
// consumers recognise the events they already have. It stops at the first
// round trip Redis refused part of; what it published is in the result.
func (o *ops) replay(ctx context.Context, sel replaySelection, dryRun bool) (Replayed, error) {
	r := Replayed{Events: map[string]int64{}}
	handle := func(page []retainedEvent) error {
		if !dryRun {
			return o.publishRetained(ctx, page, r.Events)
		}
		for i := range page {
			r.Events[o.streamOf(page[i].AggregateType, page[i].AggregateID)]++
		}
		return nil
	}
	var err error
	if len(sel.eventIDs) > 0 {
		err = o.replayByID(ctx, sel.eventIDs, handle)
	} else {
		err = o.replayByTime(ctx, sel, &r, handle)
	}
	if err != nil {
		return r, err
	}
	types := make([]string, 0, len(r.Events))
	for name := range r.Events {
		t := strings.TrimPrefix(name, o.prefix)
		if o.numPartitions() > 1 {
			t = t[:strings.LastIndexByte(t, ':')]
		}
		if !slices.Contains(types, t) {
			types = append(types, t)
		}
	}
	r.Replays, err = o.replays(ctx, types)
	return r, err
}

// retainedEvent is a row of outbox_relayed.
type retainedEvent struct {
	Batch         int64
	ID            int64
	EventID       string
	AggregateType string
	AggregateID   string
	EventType     string
	Payload       string
	Traceparent   *string
	CreatedAt     time.Time
	Tracestate    *string
}

// readRetained reads the retained events of batches first to last, of
// aggregateType (every type when it is empty) and, when ids is not nil, of
// those event ids only, in publication order.
func readRetained(ctx context.Context, q outbox.Reader, aggregateType string, first, last int64, ids map[[16]byte]bool) ([]retainedEvent, error) {
	all, err := outbox.ReadRetained(ctx, q, aggregateType, first, last)
	if err != nil {
		return nil, err
	}
	events := make([]retainedEvent, 0, len(all))
	for i := range all {
		e := &all[i]
		if ids != nil && !ids[e.EventID] {
			continue
		}
		events = append(events, retainedEvent{Batch: e.Batch, ID: e.ID, EventID: uuid.UUID(e.EventID).String(),
			AggregateType: e.AggregateType, AggregateID: e.AggregateID, EventType: e.EventType, Payload: string(e.Payload),
			Traceparent: e.Traceparent, CreatedAt: e.CreatedAt, Tracestate: e.Tracestate})
	}
	return events, nil
}

// replayByTime hands handle the retained events of the batches relayed in
// [sel.since, sel.until), page by page. The batches are found by their time
// in outbox_relay_batches, and the events by batch number, which follows
// publication order: a batch numbered inside the range is included even if
// its clock said otherwise.
func (o *ops) replayByTime(ctx context.Context, sel replaySelection, r *Replayed, handle func([]retainedEvent) error) error {
	var until *time.Time
	if !sel.until.IsZero() {
		until = &sel.until
	}
	var first, last *int64
	err := o.pool.QueryRow(ctx, `
		SELECT min(batch), max(batch), (SELECT min(relayed_at) FROM outbox_relay_batches)
		FROM outbox_relay_batches
		WHERE relayed_at >= $1 AND ($2::timestamptz IS NULL OR relayed_at < $2) AND ($3 = '' OR aggregate_type = $3)`,
		sel.since, until, sel.aggregateType).Scan(&first, &last, &r.OldestRetained)
	if err != nil {
		return fmt.Errorf("find the batches relayed in the range: %w", err)
	}
	if first == nil {
		return nil
	}
	r.FirstBatch, r.LastBatch = *first, *last
	// A run of batches at a time (relayed events are indexed by batch
	// with BRIN): no transaction held open while Redis is written, and the
	// relay's purge of old batches goes on.
	for from := r.FirstBatch; ; {
		first, last, ok, err := outbox.RetainedRun(ctx, o.pool, sel.aggregateType, from, r.LastBatch, replayChunk)
		if err != nil || !ok {
			return err
		}
		page, err := readRetained(ctx, o.pool, sel.aggregateType, first, last, nil)
		if err != nil {
			return fmt.Errorf("read retained events from batch %d to %d: %w", first, last, err)
		}
		if len(page) > 0 {
			if err := handle(page); err != nil {
				return err
			}
		}
		from = last + 1
	}
}

// replayByID hands handle the retained events with these event ids, in
// publication order. Retained events have no index on event_id (each would
// cost every relayed event a write), so this reads every retained batch. If one of
// the events is not retained, it hands over none.
func (o *ops) replayByID(ctx context.Context, ids []string, handle func([]retainedEvent) error) error {
	want := make(map[[16]byte]bool, len(ids))
	for _, id := range ids {
		u, err := uuid.Parse(id)
		if err != nil {
			return fmt.Errorf("event id %q: %w", id, err)
		}
		want[u] = true
	}
	var events []retainedEvent
	for from := int64(math.MinInt64); ; {
		first, last, ok, err := outbox.RetainedRun(ctx, o.pool, "", from, math.MaxInt64, replayChunk)
		if err != nil {
			return err
		}
		if !ok {
			break
		}
		page, err := readRetained(ctx, o.pool, "", first, last, want)
		if err != nil {
			return fmt.Errorf("find events in retained batches %d to %d: %w", first, last, err)
		}
		events = append(events, page...)
		from = last + 1
	}
	found := make(map[string]bool, len(events))
	for i := range events {
		found[events[i].EventID] = true
	}
	var missing []string
	for _, id := range ids {
		if !found[id] && !slices.Contains(missing, id) {
			missing = append(missing, id)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w (never relayed, or purged after RELAY_RETENTION): %s; nothing published",
			errNotRetained, strings.Join(missing, ", "))
	}
	for page := range slices.Chunk(events, replayChunk) {
		if err := handle(page); err != nil {
			return err
		}
	}
	return nil
}

// event is the stream entry the relay wrote for the row.
func (e *retainedEvent) event() stream.Event {
	ev := stream.Event{EventID: e.EventID, EventType: e.EventType, AggregateType: e.AggregateType,
		AggregateID: e.AggregateID, Payload: e.Payload, OccurredAt: e.CreatedAt, OutboxID: e.ID}
	if e.Traceparent != nil {
		ev.Traceparent = *e.Traceparent
	}
	if e.Tracestate != nil {
		ev.Tracestate = *e.Tracestate
	}
	return ev
}

// publishRetained XADDs the events to their streams in one pipelined round
// trip, in order, and counts in published those Redis accepted.
func (o *ops) publishRetained(ctx context.Context, page []retainedEvent, published map[string]int64) error {
	cmds := make(rueidis.Commands, len(page))
	for i := range page {
		cmd := o.redis.B().Xadd().Key(o.streamOf(page[i].AggregateType, page[i].AggregateID)).Id("*").FieldValue()
		f := page[i].event().Fields()
		for j := 0; j < len(f); j += 2 {
			cmd = cmd.FieldValue(f[j], f[j+1])
		}
		cmds[i] = cmd.Build()
	}
	var first error
	failed := 0
	for i, resp := range o.redis.DoMulti(ctx, cmds...) {
		name := o.streamOf(page[i].AggregateType, page[i].AggregateID)
		if err := resp.Error(); err != nil {
			if first == nil {
				first = fmt.Errorf("publish event %s (batch %d, id %d) to %s: %w", page[i].EventID, page[i].Batch, page[i].ID, name, err)
			}
			failed++
			continue
		}
		published[name]++
	}
	if failed > 1 {
		return fmt.Errorf("%w; %d events of that round trip failed, nothing after it was published", first, failed)
	}
	if first != nil {
		return fmt.Errorf("%w; nothing after that round trip was published", first)
	}
	return nil
}

// replays lists the streams whose retained events the relay is publishing
// again: all of them when aggregateTypes is nil, else those of these types.
func (o *ops) replays(ctx context.Context, aggregateTypes []string) ([]StreamReplay, error) {
	rows, err := o.pool.Query(ctx, `
		SELECT aggregate_type, partition, partitions, replay_from FROM outbox_streams
		WHERE replay_from IS NOT NULL AND ($1::text[] IS NULL OR aggregate_type = ANY($1))
		ORDER BY aggregate_type, partition`, aggregateTypes)
	if err != nil {
		return nil, fmt.Errorf("list the relay's replays: %w", err)
	}
	var replays []StreamReplay
	var r StreamReplay
	var partitions int
	_, err = pgx.ForEachRow(rows, []any{&r.AggregateType, &r.Partition, &partitions, &r.FromBatch}, func() error {
		r.Stream = stream.PartitionName(o.prefix, r.AggregateType, r.Partition, partitions)
		replays = append(replays, r)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list the relay's replays: %w", err)
	}
	return replays, nil
}
