package relay

import (
	"context"
	"fmt"
	"time"

	"github.com/redis/rueidis"

	"github.com/outboxfn/outbox/shared/stream"
)

// eventID is an outbox event's UUID in binary form.
type eventID = [16]byte

// Publisher writes batches of events to their streams.
//
// Each batch goes out as one MULTI … EXEC in one round trip: the XADDs, and a
// SET of the "in-flight marker", the ids of every event the batch holds. The
// relay deletes the batch's rows only after EXEC succeeded; if it dies or
// fails before its COMMIT, the rows are claimed again later, by it or by
// another relay, and the marker says which of them are in the stream
// already. Because one relay drains at a time and commits each batch before
// publishing the next, only the last batch can ever be in doubt, so one key
// suffices. The bookkeeping costs one SET per batch, not one command per
// event.
type Publisher struct {
	client rueidis.Client
	prefix string
	// markerKey holds the in-flight marker; it expires after window.
	markerKey string
	window    time.Duration
	// timeout bounds each round trip; rueidis retries reads until the
	// context ends, which must not be the caller's whole deadline.
	timeout time.Duration
	streams map[string]string // aggregate type → stream name, to spare allocations
}

// NewPublisher returns a publisher writing to streams named prefix+aggregate.
// A zero window turns duplicate suppression off.
func NewPublisher(client rueidis.Client, prefix string, window time.Duration) *Publisher {
	return &Publisher{
		client:    client,
		prefix:    prefix,
		markerKey: prefix + "_relay:in-flight",
		window:    window,
		timeout:   5 * time.Second,
		streams:   make(map[string]string),
	}
}

// LoadInFlight reads the marker left by the last batch published by any
// relay, so that its events are not published twice.
func (p *Publisher) LoadInFlight(ctx context.Context) (map[eventID]struct{}, error) {
	inFlight := make(map[eventID]struct{})
	if p.window == 0 {
		return inFlight, nil
	}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	b, err := p.client.Do(ctx, p.client.B().Get().Key(p.markerKey).Build()).AsBytes()
	if rueidis.IsRedisNil(err) {
		return inFlight, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read in-flight marker: %w", err)
	}
	for i := 0; i+16 <= len(b); i += 16 {
		inFlight[eventID(b[i:i+16])] = struct{}{}
	}
	return inFlight, nil
}

// Publish adds the events, in order, to their streams, except those in
// inFlight (published before by a batch whose commit was not confirmed), and
// records all of them in the marker. It adds every event to inFlight; the
// caller removes them once their rows are deleted. It returns how many events
// it added to a stream.
func (p *Publisher) Publish(ctx context.Context, events []row, inFlight map[eventID]struct{}) (int, error) {
	cmds := make(rueidis.Commands, 0, len(events)+3)
	cmds = append(cmds, p.client.B().Multi().Build())
	added := 0
	for i := range events {
		e := &events[i]
		if p.window > 0 {
			if _, seen := inFlight[e.EventID]; seen {
				continue
			}
		}
		cmds = append(cmds, p.xadd(e))
		added++
	}
	if p.window > 0 {
		for i := range events {
			inFlight[events[i].EventID] = struct{}{}
		}
		marker := make([]byte, 0, 16*len(inFlight))
		for id := range inFlight {
			marker = append(marker, id[:]...)
		}
		cmds = append(cmds, p.client.B().Set().Key(p.markerKey).Value(rueidis.BinaryString(marker)).
			Px(p.window).Build())
	}
	cmds = append(cmds, p.client.B().Exec().Build())
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	results := p.client.DoMulti(ctx, cmds...)
	for _, r := range results {
		if err := r.Error(); err != nil {
			return 0, fmt.Errorf("publish batch: %w", err)
		}
	}
	replies, err := results[len(results)-1].ToArray()
	if err != nil {
		return 0, fmt.Errorf("publish batch: read EXEC reply: %w", err)
	}
	for _, r := range replies {
		if err := r.Error(); err != nil {
			return 0, fmt.Errorf("publish batch: %w", err)
		}
	}
	return added, nil
}

func (p *Publisher) xadd(e *row) rueidis.Completed {
	name, ok := p.streams[e.AggregateType]
	if !ok {
		name = stream.Name(p.prefix, e.AggregateType)
		p.streams[e.AggregateType] = name
	}
	b := p.client.B().Xadd().Key(name).Id("*").FieldValue().
		FieldValue(stream.FieldEventID, e.eventIDString()).
		FieldValue(stream.FieldEventType, e.EventType).
		FieldValue(stream.FieldAggregateType, e.AggregateType).
		FieldValue(stream.FieldAggregateID, e.AggregateID).
		FieldValue(stream.FieldPayload, rueidis.BinaryString(e.Payload)).
		FieldValue(stream.FieldOccurredAt, e.CreatedAt.UTC().Format(time.RFC3339Nano))
	if e.Traceparent != nil {
		b = b.FieldValue(stream.FieldTraceparent, *e.Traceparent)
	}
	return b.Build()
}
