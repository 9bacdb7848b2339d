package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/rueidis"

	"github.com/outboxfn/outbox/functions/sendemail"
	"github.com/outboxfn/outbox/shared/events"
	"github.com/outboxfn/outbox/shared/outbox"
	"github.com/outboxfn/outbox/shared/stream"
)

// Config is what outboxctl reads from the environment: the same variables,
// with the same defaults, as the functions it inspects.
type Config struct {
	DatabaseURL  string `envconfig:"DATABASE_URL" default:"postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable" desc:"PostgreSQL connection URL. Default the local server."`
	RedisURL     string `envconfig:"REDIS_URL" default:"redis://127.0.0.1:6379/0" desc:"Redis URL. Default the local server."`
	RedisCluster bool   `envconfig:"REDIS_CLUSTER" default:"false" desc:"REDIS_URL names a Redis Cluster, as for the functions. Default false."`
	StreamPrefix string `envconfig:"STREAM_PREFIX" default:"outbox:" desc:"Prefix of stream names, as for the functions. Default outbox:."`
	// StreamPartitions must be the functions'.
	StreamPartitions int    `envconfig:"STREAM_PARTITIONS" default:"1" desc:"How many streams each aggregate type is spread over, as for the functions (must be the same): dlq works on every partition's dead letters, replay publishes each event to its partition, partitions switches the relay's records to this number. Default 1."`
	Group            string `envconfig:"SENDEMAIL_GROUP" default:"sendemail" desc:"sendemail's consumer group, whose dead letters dlq works on. Default sendemail."`
	// DedupeWindow is the relay's; purge never goes below it.
	DedupeWindow time.Duration `envconfig:"RELAY_DEDUPE_WINDOW" default:"24h" desc:"The relay's dedupe window: purge refuses -older-than below it (and below 24h). Default 24h."`
	// Retention is the relay's; purge never goes below it either, since
	// a replay re-delivers every event retained.
	Retention time.Duration `envconfig:"RELAY_RETENTION" default:"24h" desc:"How long the relay keeps relayed events to publish them again: purge refuses -older-than below it, and keeps the send records of events still retained. Default 24h."`
}

// ops holds the connections the operating commands work with.
type ops struct {
	pool   *pgxpool.Pool
	redis  rueidis.Client
	prefix string
	// partitions is STREAM_PARTITIONS (0 means 1).
	partitions int
	group      string
	out        io.Writer
	// dedupeWindow and retention raise the smallest age purge accepts.
	dedupeWindow time.Duration
	retention    time.Duration
}

// userStreams are the streams of the user events, one per partition.
func (o *ops) userStreams() []string {
	return stream.Names(o.prefix, events.AggregateUser, o.numPartitions())
}

// userStream is the first (without partitions, the only) user stream, and
// deadStream its dead-letter stream.
func (o *ops) userStream() string { return o.userStreams()[0] }
func (o *ops) deadStream() string { return sendemail.DeadLetterStream(o.userStream()) }

func (o *ops) numPartitions() int { return max(o.partitions, 1) }

// streamOf is the stream of an event of aggregateType and aggregateID.
func (o *ops) streamOf(aggregateType, aggregateID string) string {
	n := o.numPartitions()
	return stream.PartitionName(o.prefix, aggregateType, stream.Partition(aggregateID, n), n)
}

// Status is what `outboxctl status` reports.
type Status struct {
	// Partitions is STREAM_PARTITIONS as outboxctl has it; the relay's
	// records say what the relay wrote with (RecordedPartitions).
	Partitions         int            `json:"partitions"`
	RecordedPartitions []int          `json:"recorded_partitions,omitempty"`
	Outbox             outbox.Backlog `json:"outbox"`
	// OutboxDead is what the relay could not publish (see outbox-dead).
	OutboxDead outbox.Dead `json:"outbox_dead"`
	// Retained is what the relay keeps to publish again (see replay).
	Retained Retained `json:"retained"`
	// Replays lists the streams the relay is publishing again.
	Replays []StreamReplay `json:"replays"`
	Streams []StreamStatus `json:"streams"`
}

// Retained counts the relayed events the relay keeps for RELAY_RETENTION.
type Retained struct {
	Events int64 `json:"events"`
	// OldestRelayedAt is when the oldest batch still retained was relayed;
	// nil when none is.
	OldestRelayedAt *time.Time `json:"oldest_relayed_at"`
}

// StreamReplay is a stream whose retained events the relay is publishing
// again, because Redis lost some of them.
type StreamReplay struct {
	AggregateType string `json:"aggregate_type"`
	// Partition is the stream's partition of its type (0 without
	// partitions).
	Partition int    `json:"partition"`
	Stream    string `json:"stream"`
	// FromBatch is the first batch still to publish again.
	FromBatch int64 `json:"from_batch"`
}

// StreamStatus describes one stream and its groups.
type StreamStatus struct {
	Name   string        `json:"name"`
	Length int64         `json:"length"`
	Groups []GroupStatus `json:"groups"`
	// DeadLetters is the length of the stream's dead-letter stream.
	DeadLetters int64 `json:"dead_letters"`
}

// GroupStatus describes one consumer group.
type GroupStatus struct {
	Name    string `json:"name"`
	Pending int64  `json:"pending"`
	// Lag is the number of entries not yet delivered to the group; -1 when
	// Redis cannot tell (after deletions in the stream).
	Lag       int64            `json:"lag"`
	Consumers []ConsumerStatus `json:"consumers"`
}

// ConsumerStatus describes one consumer of a group.
type ConsumerStatus struct {
	Name        string  `json:"name"`
	Pending     int64   `json:"pending"`
	IdleSeconds float64 `json:"idle_seconds"`
}

// errPartitionsDiffer refuses a command whose STREAM_PARTITIONS differs from
// the number the relay's records were written with: it would read or write
// streams that no function uses.
var errPartitionsDiffer = errors.New("STREAM_PARTITIONS differs from the relay's")

// recordedPartitions returns the numbers of partitions the relay's records
// were written with, ascending (none before its first drain).
func (o *ops) recordedPartitions(ctx context.Context) ([]int, error) {
	rows, err := o.pool.Query(ctx, `SELECT DISTINCT partitions FROM outbox_streams ORDER BY 1`)
	if err != nil {
		return nil, fmt.Errorf("read the relay's number of partitions: %w", err)
	}
	recorded, err := pgx.CollectRows(rows, pgx.RowTo[int])
	if err != nil {
		return nil, fmt.Errorf("read the relay's number of partitions: %w", err)
	}
	return recorded, nil
}

// checkPartitions refuses, with errPartitionsDiffer, when the relay's
// records show another number of partitions than STREAM_PARTITIONS.
func (o *ops) checkPartitions(ctx context.Context) error {
	recorded, err := o.recordedPartitions(ctx)
	if err != nil {
		return err
	}
	for _, n := range recorded {
		if n != o.numPartitions() {
			return fmt.Errorf("%w: STREAM_PARTITIONS=%d here, the relay's records say %v; run outboxctl with the relay's number "+
				"(or, to change it, see README: Changing STREAM_PARTITIONS)", errPartitionsDiffer, o.numPartitions(), recorded)
		}
	}
	return nil
}

func (o *ops) status(ctx context.Context) (Status, error) {
	s := Status{Partitions: o.numPartitions()}
	var err error
	if s.RecordedPartitions, err = o.recordedPartitions(ctx); err != nil {
		return s, err
	}
	if s.Outbox, err = outbox.MeasureBacklog(ctx, o.pool); err != nil {
		return s, err
	}
	if s.OutboxDead, err = outbox.MeasureDead(ctx, o.pool); err != nil {
		return s, err
	}
	if s.Retained, err = o.retained(ctx); err != nil {
		return s, err
	}
	if s.Replays, err = o.replays(ctx, nil); err != nil {
		return s, err
	}
	if err := o.moveLegacyDead(ctx); err != nil {
		return s, err
	}
	keys, err := o.streams(ctx)
	if err != nil {
		return s, err
	}
	for _, key := range keys {
		st := StreamStatus{Name: key}
		if st.Length, err = o.redis.Do(ctx, o.redis.B().Xlen().Key(key).Build()).AsInt64(); err != nil {
			return s, fmt.Errorf("length of %s: %w", key, err)
		}
		if st.DeadLetters, err = o.redis.Do(ctx, o.redis.B().Xlen().Key(sendemail.DeadLetterStream(key)).Build()).AsInt64(); err != nil {
			return s, fmt.Errorf("length of %s: %w", sendemail.DeadLetterStream(key), err)
		}
		groups, err := o.redis.Do(ctx, o.redis.B().XinfoGroups().Key(key).Build()).ToArray()
		if err != nil {
			return s, fmt.Errorf("groups of %s: %w", key, err)
		}
		for _, g := range groups {
			info, err := g.AsMap()
			if err != nil {
				return s, fmt.Errorf("group of %s: %w", key, err)
			}
			gs := GroupStatus{Name: str(info["name"]), Pending: num(info["pending"]), Lag: -1}
			if lag, ok := info["lag"]; ok && !lag.IsNil() {
				gs.Lag = num(lag)
			}
			consumers, err := o.redis.Do(ctx, o.redis.B().XinfoConsumers().Key(key).Group(gs.Name).Build()).ToArray()
			if err != nil {
				return s, fmt.Errorf("consumers of %s/%s: %w", key, gs.Name, err)
			}
			for _, c := range consumers {
				ci, err := c.AsMap()
				if err != nil {
					continue
				}
				gs.Consumers = append(gs.Consumers, ConsumerStatus{Name: str(ci["name"]), Pending: num(ci["pending"]),
					IdleSeconds: float64(num(ci["idle"])) / 1000})
			}
			st.Groups = append(st.Groups, gs)
		}
		s.Streams = append(s.Streams, st)
	}
	return s, nil
}

// retained measures what the relay keeps in outbox_retained (and, from
// before migration 00015, outbox_relayed_rows).
func (o *ops) retained(ctx context.Context) (Retained, error) {
	var r Retained
	// Reads every retained batch's count, a day of traffic by default:
	// slow for a health check, fine for an operator's command.
	err := o.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM outbox_relayed_rows) + (SELECT coalesce(sum(events), 0) FROM outbox_retained),
		(SELECT min(relayed_at) FROM outbox_relay_batches)`).Scan(&r.Events, &r.OldestRelayedAt)
	if err != nil {
		return r, fmt.Errorf("measure retained events: %w", err)
	}
	return r, nil
}

// streams lists the streams under the prefix, dead-letter streams and the
// relay's own keys left out.
func (o *ops) streams(ctx context.Context) ([]string, error) {
	all, err := stream.Keys(ctx, o.redis, o.prefix+"*", "stream")
	if err != nil {
		return nil, fmt.Errorf("list streams: %w", err)
	}
	keys := make([]string, 0, len(all))
	for _, k := range all {
		if !strings.HasSuffix(k, ":dead") {
			keys = append(keys, k)
		}
	}
	return keys, nil
}

func str(m rueidis.RedisMessage) string {
	s, _ := m.ToString()
	return s
}

func num(m rueidis.RedisMessage) int64 {
	n, _ := m.AsInt64()
	return n
}

func printStatus(w io.Writer, s Status) {
	if s.Partitions > 1 || len(s.RecordedPartitions) > 1 || (len(s.RecordedPartitions) == 1 && s.RecordedPartitions[0] != s.Partitions) {
		fmt.Fprintf(w, "partitions: STREAM_PARTITIONS=%d, the relay's records %v\n", s.Partitions, s.RecordedPartitions)
	}
	fmt.Fprintf(w, "outbox: %d events waiting, oldest %.1fs old\n", s.Outbox.Events, s.Outbox.OldestAgeSeconds)
	if s.OutboxDead.Count == 0 {
		fmt.Fprintln(w, "outbox dead: none")
	} else {
		fmt.Fprintf(w, "outbox dead: %d events the relay could not publish, oldest dead %.1fs (outboxctl outbox-dead list)\n",
			s.OutboxDead.Count, s.OutboxDead.OldestAgeSeconds)
	}
	switch {
	case s.Retained.OldestRelayedAt == nil && s.Retained.Events == 0:
		fmt.Fprintln(w, "retained: none")
	case s.Retained.OldestRelayedAt == nil:
		fmt.Fprintf(w, "retained: %d relayed events\n", s.Retained.Events)
	default:
		fmt.Fprintf(w, "retained: %d relayed events, oldest batch relayed %s (%.1fs ago)\n", s.Retained.Events,
			s.Retained.OldestRelayedAt.UTC().Format(time.RFC3339), time.Since(*s.Retained.OldestRelayedAt).Seconds())
	}
	for _, r := range s.Replays {
		fmt.Fprintf(w, "stream %s: replay under way from batch %d\n", r.Stream, r.FromBatch)
	}
	if len(s.Streams) == 0 {
		fmt.Fprintln(w, "no streams yet")
	}
	for _, st := range s.Streams {
		fmt.Fprintf(w, "stream %s: %d entries, %d dead letters\n", st.Name, st.Length, st.DeadLetters)
		for _, g := range st.Groups {
			lag := strconv.FormatInt(g.Lag, 10)
			if g.Lag < 0 {
				lag = "unknown"
			}
			fmt.Fprintf(w, "  group %s: %d pending, lag %s\n", g.Name, g.Pending, lag)
			for _, c := range g.Consumers {
				fmt.Fprintf(w, "    consumer %s: %d pending, idle %.1fs\n", c.Name, c.Pending, c.IdleSeconds)
			}
		}
	}
}

// DeadLetter is one entry of a dead-letter stream.
type DeadLetter struct {
	ID string `json:"id"`
	// Stream is the stream the letter came from, and Partition its
	// partition (STREAM_PARTITIONS); the letter sits in that stream's
	// dead-letter stream. Partitions' letters can share an id (added in
	// the same millisecond): dlq redrive and drop take P/ID for them.
	Stream     string            `json:"stream"`
	Partition  int               `json:"partition"`
	OriginalID string            `json:"original_id"`
	EventID    string            `json:"event_id"`
	EventType  string            `json:"event_type"`
	Error      string            `json:"error"`
	Deliveries string            `json:"deliveries"`
	Consumer   string            `json:"consumer"`
	FailedAt   string            `json:"failed_at"`
	Fields     map[string]string `json:"fields"`
}

// dlqList lists up to count dead letters, oldest first, of every
// partition's dead-letter stream; count 0 or less lists them all.
func (o *ops) dlqList(ctx context.Context, count int64) ([]DeadLetter, error) {
	if err := o.moveLegacyDead(ctx); err != nil {
		return nil, err
	}
	var out []DeadLetter
	for p, name := range o.userStreams() {
		dead := sendemail.DeadLetterStream(name)
		cmd := o.redis.B().Xrange().Key(dead).Start("-").End("+").Build()
		if count > 0 {
			cmd = o.redis.B().Xrange().Key(dead).Start("-").End("+").Count(count).Build()
		}
		entries, err := o.redis.Do(ctx, cmd).AsXRange()
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", dead, err)
		}
		for _, e := range entries {
			f := e.FieldValues
			out = append(out, DeadLetter{ID: e.ID, Stream: name, Partition: p, OriginalID: f[sendemail.FieldDeadOriginalID], EventID: f[stream.FieldEventID],
				EventType: f[stream.FieldEventType], Error: f[sendemail.FieldDeadError], Deliveries: f[sendemail.FieldDeadDeliveries],
				Consumer: f[sendemail.FieldDeadConsumer], FailedAt: f[sendemail.FieldDeadFailedAt], Fields: f})
		}
	}
	// Oldest first across the partitions: ids are Redis's milliseconds.
	slices.SortStableFunc(out, func(a, b DeadLetter) int { return compareIDs(a.ID, b.ID) })
	if count > 0 && int64(len(out)) > count {
		out = out[:count]
	}
	return out, nil
}

// compareIDs orders two stream entry ids (<ms>-<seq>) as Redis does.
func compareIDs(a, b string) int {
	split := func(id string) (uint64, uint64) {
		ms, seq, _ := strings.Cut(id, "-")
		m, _ := strconv.ParseUint(ms, 10, 64)
		n, _ := strconv.ParseUint(seq, 10, 64)
		return m, n
	}
	am, as := split(a)
	bm, bs := split(b)
	if c := cmp.Compare(am, bm); c != 0 {
		return c
	}
	return cmp.Compare(as, bs)
}

var errNoSuchEntry = errors.New("no such dead letter")

// errAmbiguousEntry says an id names dead letters of several partitions.
var errAmbiguousEntry = errors.New("dead letters of several partitions have this id")

// redriveScript moves one dead letter back to its stream, if it is still
// there: two redrives of the same letter at once move it once. A failing
// XADD stops the script before the XDEL, so a letter is never lost.
//
// KEYS: dead-letter stream, target stream. ARGV: letter id, field, value, …
var redriveScript = rueidis.NewLuaScript(`
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], ARGV[1])
return 1`)

// moveLegacyScript moves up to ARGV[1] entries from the dead-letter stream
// of an older sendemail (KEYS[1], <stream>:dead) to the current one
// (KEYS[2], {<stream>}:dead), each as a new entry with the same fields, and
// answers how many it moved. Only on a single server: the two names are in
// different slots of a cluster, where the older sendemail never ran.
var moveLegacyScript = rueidis.NewLuaScript(`
local entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[1])
for _, e in ipairs(entries) do
  redis.call('XADD', KEYS[2], '*', unpack(e[2]))
  redis.call('XDEL', KEYS[1], e[1])
end
if redis.call('XLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return #entries`)

// moveLegacyDead moves the dead letters an older sendemail left under
// <stream>:dead to {<stream>}:dead, in scripts of 100 letters, so that
// every dlq command sees them. A key of that name that is not a stream is
// left alone. Older sendemails had no partitions: only the stream of one
// partition can have such letters.
func (o *ops) moveLegacyDead(ctx context.Context) error {
	if o.redis.Mode() == rueidis.ClientModeCluster || o.numPartitions() > 1 {
		return nil
	}
	name := o.userStreams()[0]
	legacy, dead := sendemail.LegacyDeadLetterStream(name), sendemail.DeadLetterStream(name)
	if legacy == dead {
		return nil // a hash-tagged STREAM_PREFIX: the old name is the new one
	}
	wrongType := func(err error) bool {
		re, ok := rueidis.IsRedisErr(err)
		return ok && strings.Contains(re.Error(), "WRONGTYPE")
	}
	// At most the letters there now: an older sendemail still writing to
	// the old stream cannot keep this going.
	left, err := o.redis.Do(ctx, o.redis.B().Xlen().Key(legacy).Build()).AsInt64()
	if wrongType(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("count dead letters in %s: %w", legacy, err)
	}
	for left > 0 {
		n, err := moveLegacyScript.Exec(ctx, o.redis, []string{legacy, dead}, []string{"100"}).AsInt64()
		if wrongType(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("move dead letters from %s to %s: %w", legacy, dead, err)
		}
		if n == 0 {
			return nil
		}
		left -= n
	}
	return nil
}

// dropScript deletes one dead letter; it answers 0 if it was gone.
var dropScript = rueidis.NewLuaScript(`return redis.call('XDEL', KEYS[1], ARGV[1])`)

// deadEntry is a dead letter and the stream it came from.
type deadEntry struct {
	rueidis.XRangeEntry
	stream string
}

// dlqRedrive moves dead letters (ids, or all when ids is empty) back to the
// stream they came from, each as a new entry with its original fields, in
// one script per letter: atomic, and safe to run twice at once (each
// letter is moved by whichever redrive gets to it first).
func (o *ops) dlqRedrive(ctx context.Context, ids []string) (int, error) {
	return o.dlqEach(ctx, ids, func(e deadEntry) (bool, error) {
		target := e.FieldValues[sendemail.FieldDeadStream]
		if target == "" {
			target = e.stream
		}
		args := []string{e.ID}
		for _, k := range sendemail.OriginalFields(e.FieldValues) {
			args = append(args, k, e.FieldValues[k])
		}
		n, err := redriveScript.Exec(ctx, o.redis, []string{sendemail.DeadLetterStream(e.stream), target}, args).AsInt64()
		return n == 1, err
	})
}

// dlqDrop deletes dead letters (ids, or all when ids is empty).
func (o *ops) dlqDrop(ctx context.Context, ids []string) (int, error) {
	return o.dlqEach(ctx, ids, func(e deadEntry) (bool, error) {
		n, err := dropScript.Exec(ctx, o.redis, []string{sendemail.DeadLetterStream(e.stream)}, []string{e.ID}).AsInt64()
		return n == 1, err
	})
}

// dlqEach runs act on each selected dead letter, of whichever partition,
// and counts those it moved. An id is looked up in every partition's dead
// letters, P/ID in partition P's only; an id found in two partitions'
// (letters added in the same millisecond) is refused.
func (o *ops) dlqEach(ctx context.Context, ids []string, act func(deadEntry) (bool, error)) (int, error) {
	if err := o.moveLegacyDead(ctx); err != nil {
		return 0, err
	}
	var entries []deadEntry
	for _, name := range o.userStreams() {
		dead := sendemail.DeadLetterStream(name)
		if len(ids) == 0 {
			all, err := o.redis.Do(ctx, o.redis.B().Xrange().Key(dead).Start("-").End("+").Build()).AsXRange()
			if err != nil {
				return 0, fmt.Errorf("read %s: %w", dead, err)
			}
			for _, e := range all {
				entries = append(entries, deadEntry{e, name})
			}
		}
	}
	for _, id := range ids {
		var found []deadEntry
		names := o.userStreams()
		if p, plain, ok := strings.Cut(id, "/"); ok {
			n, err := strconv.Atoi(p)
			if err != nil || n < 0 || n >= len(names) {
				return 0, fmt.Errorf("%w: %s: no partition %q of %d", errNoSuchEntry, id, p, len(names))
			}
			names, id = names[n:n+1], plain
		}
		for _, name := range names {
			dead := sendemail.DeadLetterStream(name)
			got, err := o.redis.Do(ctx, o.redis.B().Xrange().Key(dead).Start(id).End(id).Build()).AsXRange()
			if err != nil {
				return 0, fmt.Errorf("read %s %s: %w", dead, id, err)
			}
			for _, e := range got {
				found = append(found, deadEntry{e, name})
			}
		}
		switch len(found) {
		case 0:
			return 0, fmt.Errorf("%w: %s", errNoSuchEntry, id)
		case 1:
			entries = append(entries, found[0])
		default:
			return 0, fmt.Errorf("%w: %s; name one as PARTITION/%s (dlq list shows them so)", errAmbiguousEntry, id, id)
		}
	}
	done := 0
	for _, e := range entries {
		moved, err := act(e)
		if err != nil {
			return done, fmt.Errorf("move %s: %w", e.ID, err)
		}
		if moved {
			done++
		}
	}
	return done, nil
}

// purgeBatch bounds the rows one purge statement deletes, so that no
// statement holds locks or generates WAL for long.
const purgeBatch = 1000

// minPurgeAge is the smallest age purge accepts whatever the relay's
// dedupe window and retention: a day, well past any lease or claim time.
const minPurgeAge = 24 * time.Hour

var errPurgeTooYoung = errors.New("purge age too small")

// Purged is what purge did.
type Purged struct {
	// Deleted counts the rows deleted from each table.
	Deleted map[string]int64
	// SendsBefore is the creation time before which send records were
	// deleted: now less the age, or when the oldest retained event was
	// written if that is earlier (Clamped).
	SendsBefore time.Time
	Clamped     bool
}

// purge deletes send records of emails that were sent, and idempotency
// keys, older than age, in small batches. A send record that is not
// finished (a claim, an email still being retried) is never deleted: that
// would let a second consumer send the same email. A record of an email
// that went to the dead-letter stream is deleted when it gets there.
//
// Nor is a send record created since the oldest event the relay retains
// (outbox_relayed) was written, whatever the age: a replay, the relay's or
// outboxctl's, re-delivers retained events, and without their records their
// emails would go out again. An event is written before it is emailed; its
// batch's relayed_at is no bound, since a batch in doubt may be emailed long
// before the batch that retains it commits. Each retained batch records its
// oldest event; the rows retained before migration 00015 are read whole. Relayed events
// themselves are purged by the relay after RELAY_RETENTION.
func (o *ops) purge(ctx context.Context, age time.Duration) (Purged, error) {
	p := Purged{Deleted: map[string]int64{}}
	if least := max(minPurgeAge, o.dedupeWindow, o.retention); age < least {
		return p, fmt.Errorf("%w: -older-than %s is below %s (the largest of a day, RELAY_DEDUPE_WINDOW and RELAY_RETENTION); "+
			"younger records still guard against duplicates of events the relay may publish again", errPurgeTooYoung, age, least)
	}
	var horizon time.Time
	var oldest *time.Time
	err := o.pool.QueryRow(ctx, `SELECT now() - $1::interval, least((SELECT min(created_at) FROM outbox_relayed_rows), (SELECT min(oldest) FROM outbox_retained))`, age).
		Scan(&horizon, &oldest)
	if err != nil {
		return p, fmt.Errorf("find the oldest retained event: %w", err)
	}
	p.SendsBefore = horizon
	if oldest != nil && oldest.Before(horizon) {
		p.SendsBefore, p.Clamped = *oldest, true
	}
	for _, t := range []struct {
		table, finished string
		before          time.Time
	}{
		{"email_sends", " AND sent_at IS NOT NULL", p.SendsBefore},
		{"idempotency_keys", "", horizon},
	} {
		for {
			tag, err := o.pool.Exec(ctx, `DELETE FROM `+t.table+` WHERE key IN (
				SELECT key FROM `+t.table+` WHERE created_at < $1`+t.finished+` LIMIT $2)`, t.before, purgeBatch)
			if err != nil {
				return p, fmt.Errorf("purge %s: %w", t.table, err)
			}
			p.Deleted[t.table] += tag.RowsAffected()
			if tag.RowsAffected() < purgeBatch {
				break
			}
		}
	}
	return p, nil
}

// DeadRow is one row of outbox_dead: an event the relay could not publish.
type DeadRow struct {
	// ID is the row's id in the outbox when it died.
	ID            int64     `json:"id"`
	EventID       string    `json:"event_id"`
	AggregateType string    `json:"aggregate_type"`
	AggregateID   string    `json:"aggregate_id"`
	EventType     string    `json:"event_type"`
	Error         string    `json:"error"`
	DeadAt        time.Time `json:"dead_at"`
}

// outboxDeadList lists up to count dead outbox rows, oldest first; count 0
// or less lists them all.
func (o *ops) outboxDeadList(ctx context.Context, count int64) ([]DeadRow, error) {
	var limit *int64 // LIMIT NULL is no limit
	if count > 0 {
		limit = &count
	}
	rows, err := o.pool.Query(ctx, `
		SELECT id, event_id::text, aggregate_type, aggregate_id, event_type, error, dead_at
		FROM outbox_dead ORDER BY dead_at, id LIMIT $1`, limit)
	if err != nil {
		return nil, fmt.Errorf("list outbox_dead: %w", err)
	}
	dead, err := pgx.CollectRows(rows, pgx.RowToStructByPos[DeadRow])
	if err != nil {
		return nil, fmt.Errorf("list outbox_dead: %w", err)
	}
	return dead, nil
}

var (
	errNoSuchDeadRow = errors.New("no such dead outbox row")
	errNotRequeuable = errors.New("aggregate type the outbox would refuse again")
)

// outboxDeadRequeue moves dead outbox rows (ids, or all when ids is empty)
// back into the outbox, in one transaction, and returns how many it moved.
// It moves all of them or none: it refuses unknown ids, and rows whose
// aggregate type the outbox would refuse again (they need fixing or
// deleting first).
//
// Each row keeps its event_id, so a consumer that did get the event after
// all drops the copy, and its created_at, the event's time. It gets a new
// id: reusing the old one (OVERRIDING SYSTEM VALUE) could match a record of
// the relay's in-flight marker, which pairs row ids with event ids and
// counts a row that still exists as possibly published; a fresh id matches
// no such record. Rows go back in their old order, behind the outbox's
// current rows: order within an aggregate is already lost for an event that
// was held back while later ones went out.
func (o *ops) outboxDeadRequeue(ctx context.Context, ids []int64) (int64, error) {
	var moved int64
	err := pgx.BeginFunc(ctx, o.pool, func(tx pgx.Tx) error {
		// FOR UPDATE: of two requeues at once, the second waits and then
		// no longer sees the rows the first moved, so each moves once.
		rows, err := tx.Query(ctx, `
			SELECT id, aggregate_type FROM outbox_dead
			WHERE $1::bigint[] IS NULL OR id = ANY($1)
			ORDER BY id FOR UPDATE`, nilIfEmpty(ids))
		if err != nil {
			return fmt.Errorf("lock outbox_dead rows: %w", err)
		}
		var found []int64
		var refused []string
		var id int64
		var typ string
		_, err = pgx.ForEachRow(rows, []any{&id, &typ}, func() error {
			found = append(found, id)
			if !outbox.ValidAggregateType(typ) {
				refused = append(refused, fmt.Sprintf("%d (%q)", id, typ))
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("lock outbox_dead rows: %w", err)
		}
		if missing := missingIDs(ids, found); len(missing) > 0 {
			return fmt.Errorf("%w: %v; nothing requeued", errNoSuchDeadRow, missing)
		}
		if len(refused) > 0 {
			return fmt.Errorf("rows %s: %w; fix their aggregate_type or delete them; nothing requeued",
				strings.Join(refused, ", "), errNotRequeuable)
		}
		if len(found) == 0 {
			return nil
		}
		tag, err := tx.Exec(ctx, `
			INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, tracestate, created_at)
			SELECT event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, tracestate, created_at
			FROM outbox_dead WHERE id = ANY($1) ORDER BY id`, found)
		if err != nil {
			return fmt.Errorf("requeue into outbox: %w", err)
		}
		moved = tag.RowsAffected()
		if _, err := tx.Exec(ctx, `DELETE FROM outbox_dead WHERE id = ANY($1)`, found); err != nil {
			return fmt.Errorf("delete requeued rows from outbox_dead: %w", err)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("requeue dead outbox rows: %w", err)
	}
	return moved, nil
}

// missingIDs returns the ids in want that are not in got.
func missingIDs(want, got []int64) []int64 {
	have := make(map[int64]bool, len(got))
	for _, id := range got {
		have[id] = true
	}
	var missing []int64
	for _, id := range want {
		if !have[id] {
			missing = append(missing, id)
		}
	}
	return missing
}

// nilIfEmpty makes an empty list SQL NULL, which selects every row.
func nilIfEmpty(ids []int64) []int64 {
	if len(ids) == 0 {
		return nil
	}
	return ids
}
