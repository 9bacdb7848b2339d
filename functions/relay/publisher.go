package relay

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/redis/rueidis"

	"github.com/outboxfn/outbox/shared/outbox"
	"github.com/outboxfn/outbox/shared/stream"
)

// eventID is an outbox event's UUID in binary form.
type eventID = [16]byte

// ErrSuperseded is returned by a publish when another relay has taken over
// the streams since this one took the drain lock: this relay lost the lock
// without noticing (its connection died while it was publishing), and its
// batch, claimed by a transaction that no longer exists, is refused.
var ErrSuperseded = errors.New("another relay has taken over the streams")

// Publisher writes batches of events to their streams.
//
// Each batch goes out as one MULTI … EXEC per stream it has events for,
// all in one round trip: the stream's XADDs, and a SET of the stream's
// "in-flight marker", the event and row ids of every event of that stream
// the batch holds. The relay deletes the batch's rows only after every
// EXEC succeeded; if it dies or fails before its COMMIT, the rows are
// claimed again later, by it or by another relay, and each stream's marker
// says which of them are in that stream already. Because one relay drains
// at a time and commits each batch before publishing the next, only the
// last batch can ever be in doubt, so one key per stream suffices. The
// bookkeeping costs one SET per stream and batch, not one command per
// event.
//
// One MULTI per stream, not one for the batch, because a Redis Cluster
// runs a transaction only on keys of one hash slot: each stream's marker
// and fence (below) are named with the stream's name as their hash tag
// (stream.Sibling: {outbox:user}:relay-in-flight), so that they live in
// its slot, and the stream's name itself is unchanged. Nothing needs the
// streams to change together: each stream's part carries its own marker
// and fence, so a batch half published (one EXEC ran, the other failed) is
// sorted out per stream by the next takeover. On a single server it is the
// same code.
//
// The marker a relay finds when it takes over usually describes a batch
// that was committed: its rows are gone and it needs no protection. Carried
// forward, such ids would pile up from one drain to the next, so a new
// session keeps only the records whose rows still exist (one primary-key
// lookup, while the first batch is claimed). The marker therefore never
// holds more than the batch in doubt and the one being published.
//
// "One relay at a time" is the drain lock's promise, and a lock held by a
// connection can be lost without its holder knowing until its next query.
// So each relay that takes the lock also takes, for each stream before it
// first writes to it, a new epoch of that stream in Redis (INCR) before it
// reads the stream's marker, and publishes to the stream only while the
// epoch is still its own: the stream's MULTI runs under a WATCH of it, on
// a connection of the session's own to the stream's node. A relay that
// lost the lock mid-publish either published before the new holder read
// the marker (which then covers its batch) or its EXEC fails; and the new
// holder writes to no stream it has not fenced first. The WATCH for the
// next batch is set in the same round trip as this batch's EXEC, so the
// fence costs no round trip (a Lua script doing the same measured 30%
// slower). The streams a session expects to write to (those PostgreSQL
// has records of, and those the publisher wrote to before) are taken over
// while the first batch is claimed; any other on its first batch.
type Publisher struct {
	client rueidis.Client
	prefix string
	// window is how long a marker lives.
	window time.Duration
	// waitReplicas, when positive, is how many replicas must acknowledge a
	// batch (WAIT) before its rows are deleted, waiting up to waitTimeout.
	waitReplicas int64
	waitTimeout  time.Duration
	// track reads each stream back (XINFO STREAM) in every batch, for
	// PostgreSQL's record of it; set when relayed events are retained.
	track bool
	// timeout bounds each round trip; rueidis retries reads until the
	// context ends, which must not be the caller's whole deadline.
	timeout time.Duration
	// streams caches each stream's keys, to spare allocations; its
	// streams are also the ones a new session takes over at once. Only the
	// one drain of a process at a time uses it. It is keyed, as everything
	// here that is per stream, by the stream's key (stream.PartitionKey):
	// the aggregate type, with its partition when there are several.
	streams map[string]streamKeys
	// partitions is how many streams each aggregate type is spread over
	// (STREAM_PARTITIONS; 0 means 1); each stream is handled on its own.
	partitions int
}

// streamKeys are a stream's name and the relay's keys in its hash slot.
type streamKeys struct {
	name   string
	epoch  string // counts takeovers of the stream
	marker string // the stream's in-flight marker, which expires after window
}

// Key roles of the relay's keys beside each stream (stream.Sibling).
const (
	epochRole  = "relay-epoch"
	markerRole = "relay-in-flight"
)

// NewPublisher returns a publisher writing to streams named prefix+aggregate.
// A zero window turns duplicate suppression off.
func NewPublisher(client rueidis.Client, prefix string, window time.Duration) *Publisher {
	return &Publisher{
		client:  client,
		prefix:  prefix,
		window:  window,
		timeout: 5 * time.Second,
		streams: make(map[string]streamKeys),
	}
}

// session publishes for the relay that holds the drain lock, from the
// moment it took the lock until it lets go, over connections of its own,
// one per stream (WATCH belongs to a connection, and on a cluster each
// stream may live on another node). Its methods are not safe for
// concurrent use.
type session struct {
	p *Publisher
	// conns holds, by stream key, the streams taken over.
	conns map[string]*streamConn
	// exist is asked which marker rows still exist.
	exist rowsExist
	// ready is closed once the expected streams are taken over; the round
	// trips run while the first batch is claimed.
	ready chan struct{}
	// inFlight maps the events that may be in a stream while their rows
	// are still in the outbox to those rows: the markers', then the batch
	// being published until its rows are deleted.
	inFlight map[eventID]flight
	// added is each stream's entries-added counter (by stream key) as
	// this session last saw it; a batch that finds it lower than that plus
	// what it added wrote into a stream that was deleted and created again.
	added map[string]int64
	// lost lists the streams Redis no longer holds all of: they are
	// published again (see Drainer.replay) before anything else.
	lost []lostStream
	// mu guards conns, lost, added and inFlight while the takeovers at the
	// session's start run side by side; after ready, one goroutine uses
	// them.
	mu sync.Mutex
	// err, once set, fails every later publish: a connection's WATCH
	// state is unknown, or another relay took over.
	err error
	// epoch is the drain's number (see Drainer.lockDrain), which each
	// stream's epoch key takes when the session takes the stream over.
	epoch string
	// legacy is the marker a relay of an older version left (see
	// fenceLegacy), read with each stream's own.
	legacy []byte
	// records are PostgreSQL's records of the streams, by stream key,
	// which a takeover compares the streams with.
	records map[string]*streamRecord
}

// streamConn is a session's connection for one stream, fenced by the
// stream's epoch.
type streamConn struct {
	conn    rueidis.DedicatedClient
	release func()
	cmds    rueidis.Commands // reused between batches
}

// flight is an event published by a batch whose commit is not confirmed.
type flight struct {
	row   int64
	typ   string   // the stream's key (see Publisher.streams)
	entry streamID // the entry it got; zero when not known
}

// streamRecord is where PostgreSQL recorded a stream stood after the newest
// batch that wrote to it (the outbox_streams table).
type streamRecord struct {
	aggregateType string // the stream's key (see Publisher.streams)
	last          streamID
	added         int64 // entries-added
	// replayFrom is the first batch of an unfinished re-publication, or -1.
	replayFrom int64
}

// lostStream is a stream Redis no longer holds all of.
type lostStream struct {
	aggregateType string // the stream's key (see Publisher.streams)
	// kept is the stream's last-generated-id when Redis kept a prefix of it
	// (a failover dropped the last writes): the batches recorded at or
	// before it are still there. Zero when none are: the stream is gone, or
	// it was deleted and created again.
	kept streamID
	// deleted, first and current are the stream's max-deleted-entry-id,
	// recorded-first-entry-id and last-generated-id; gone is set when
	// there is no stream.
	deleted, first, current streamID
	gone                    bool
	// replayFrom is the first batch of an unfinished re-publication, or -1.
	replayFrom int64
	why        string
}

// rowsExist returns, for those of ids that are still rows of the outbox,
// the keys of their streams.
type rowsExist func(ctx context.Context, ids []int64) (map[int64]string, error)

// markerRecord is the size of one event in the marker: the outbox row id
// (8 bytes, big-endian) and the event id (16 bytes).
const markerRecord = 8 + 16

// verifyTail is how many entries beyond the batch in doubt a takeover reads
// from the end of a stream to find that batch's events: room for entries
// other writers (a dead-letter redrive) added since.
const verifyTail = 1000

// open starts a session: it takes over the streams it expects to write to
// (see takeOverStream), and the others when it first writes to them. It
// must be called only with the drain lock held, and the session closed
// before the lock is let go. streams are PostgreSQL's records of the
// streams (none without retention).
func (p *Publisher) open(ctx context.Context, epoch int64, streams []streamRecord, exist rowsExist) *session {
	s := &session{p: p, epoch: strconv.FormatInt(epoch, 10), conns: make(map[string]*streamConn), exist: exist, ready: make(chan struct{}),
		records:  make(map[string]*streamRecord, len(streams)),
		inFlight: make(map[eventID]flight), added: make(map[string]int64, len(streams))}
	known := make([]string, 0, len(p.streams))
	for t := range p.streams {
		known = append(known, t)
	}
	go func() {
		defer close(s.ready)
		s.err = s.takeOver(ctx, streams, known)
	}()
	return s
}

// takeOver takes over the recorded streams, comparing each with its
// record, and then the other known ones. A stream it cannot reach (its
// shard is down) is left for publish to take over when a batch has events
// for it, so that one shard does not hold back the streams of the others;
// the takeover fails only when another relay has taken over, or Redis
// itself refuses the fence.
func (s *session) takeOver(ctx context.Context, streams []streamRecord, known []string) error {
	if err := s.fenceLegacy(ctx); err != nil {
		return err
	}
	for i := range streams {
		s.records[streams[i].aggregateType] = &streams[i]
	}
	try := func(t string) error {
		err := s.takeOverStream(ctx, t, s.records[t], startTakeOverTimeout)
		if err == nil || takeOverIsFinal(ctx, err) {
			return err
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if c, ok := s.conns[t]; ok {
			c.release()
			delete(s.conns, t)
		}
		return nil
	}
	types := make([]string, 0, len(streams)+len(known))
	for i := range streams {
		types = append(types, streams[i].aggregateType)
	}
	for _, t := range known {
		if _, ok := s.records[t]; !ok {
			types = append(types, t)
		}
	}
	for _, t := range types {
		s.p.keys(t) // cached before the takeovers read the cache side by side
	}
	// Side by side: a drain pays one round trip for all its streams, and a
	// shard that does not answer costs it startTakeOverTimeout once.
	errs := make([]error, len(types))
	var wg sync.WaitGroup
	for i, t := range types {
		wg.Go(func() { errs[i] = try(t) })
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// startTakeOverTimeout bounds the takeovers at a drain's start. A stream
// not taken over by then is taken over when a batch first has events for
// it, within the publisher's timeout; meanwhile the drain goes on with the
// others.
const startTakeOverTimeout = time.Second

// takeOverStream takes a new epoch of the stream of key t, which
// from then on fails the EXEC of any relay that held the lock before, reads
// the marker those relays left, keeping the records whose rows exist, and,
// given PostgreSQL's record of the stream, compares the stream with it.
func (s *session) takeOverStream(ctx context.Context, t string, rec *streamRecord, timeout time.Duration) error {
	p := s.p
	keys := p.keys(t)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for attempt := 1; ; attempt++ {
		err := s.takeOverStreamOnce(ctx, t, keys, rec)
		if err == nil || attempt == takeOverAttempts || takeOverIsFinal(ctx, err) {
			return err
		}
		// A connection from the pool found broken (Redis restarted since
		// it was last used): each stream's takeover takes one, so without
		// another try a restart would fail a drain per stream.
		s.mu.Lock()
		s.conns[t].conn.Close()
		s.mu.Unlock()
	}
}

// maxSessionStreams bounds the streams one drain writes to: each holds a
// dedicated connection (its fence's WATCH) for the drain, and rueidis keeps
// 1024 of them per node (BlockingPoolSize).
const maxSessionStreams = 1000

// errTooManyStreams fails a drain that would write to more streams than
// maxSessionStreams.
var errTooManyStreams = fmt.Errorf("a drain writes to more than %d streams (aggregate types × STREAM_PARTITIONS): lower STREAM_PARTITIONS", maxSessionStreams)

// takeOverIsFinal reports whether a takeover's error is one that another try cannot
// mend: another relay took over, Redis refused (an answer, not a broken
// connection), the session has too many streams, or ctx is done.
func takeOverIsFinal(ctx context.Context, err error) bool {
	var redisErr *rueidis.RedisError
	return errors.Is(err, ErrSuperseded) || errors.As(err, &redisErr) || errors.Is(err, errTooManyStreams) || ctx.Err() != nil
}

// takeOverAttempts bounds the tries of a takeover that fails for want of
// a connection.
const takeOverAttempts = 3

func (s *session) takeOverStreamOnce(ctx context.Context, t string, keys streamKeys, rec *streamRecord) error {
	p := s.p
	s.mu.Lock()
	_, known := s.conns[t]
	full := !known && len(s.conns) >= maxSessionStreams
	s.mu.Unlock()
	if full {
		// Dedicate would wait, without a deadline, for a connection the
		// session itself holds.
		return fmt.Errorf("take over %s: %w", keys.name, errTooManyStreams)
	}
	c, release := p.client.Dedicate()
	sc := &streamConn{conn: c, release: release}
	s.mu.Lock()
	if old, ok := s.conns[t]; ok {
		old.release()
	}
	s.conns[t] = sc // released by close, even if the takeover fails
	s.mu.Unlock()
	// UNWATCH: the connection comes from a pool and may still watch the
	// epoch for an earlier session, whose EXEC never came; a change since
	// would fail this session's first EXEC. The script raises the stream's
	// epoch to the session's and reads the marker in one step: a batch of
	// an older epoch either landed before, and is in the marker read, or
	// its EXEC fails; and a relay whose epoch is older than the stream's
	// is refused. The GET after WATCH proves that nobody took over between
	// the script and the WATCH.
	cmds := rueidis.Commands{
		c.B().Unwatch().Build(),
		c.B().Eval().Script(takeOverScript).Numkeys(2).Key(keys.epoch, keys.marker).Arg(s.epoch).Build(),
	}
	// With a record, the stream's XINFO, the entry recorded last, the
	// newest entry at or before it and the entries after it: counters
	// alone cannot tell a stream that lost its end and was then written to
	// by someone else.
	if rec != nil {
		last := rec.last.String()
		cmds = append(cmds, c.B().XinfoStream().Key(keys.name).Build(),
			c.B().Xrange().Key(keys.name).Start(last).End(last).Build(),
			c.B().Xrevrange().Key(keys.name).End(last).Start("-").Count(1).Build(),
			c.B().Xrange().Key(keys.name).Start("("+last).End("+").Count(followingEntries).Build())
	}
	cmds = append(cmds, c.B().Watch().Key(keys.epoch).Build(), c.B().Get().Key(keys.epoch).Build())
	results := c.DoMulti(ctx, cmds...)
	if err := results[1].Error(); err != nil && !rueidis.IsRedisNil(err) {
		if re, ok := rueidis.IsRedisErr(err); ok && strings.HasPrefix(re.Error(), "SUPERSEDED") {
			c.Close()
			behind := &epochBehindError{stream: keys.name}
			if f := strings.Fields(re.Error()); len(f) > 1 {
				behind.epoch, _ = strconv.ParseInt(f[1], 10, 64)
			}
			return behind
		}
	}
	for i, r := range results {
		if i >= 2 && rec != nil && i < 6 {
			continue // a stream's XINFO fails when the stream is gone
		}
		if err := r.Error(); err != nil && !rueidis.IsRedisNil(err) {
			c.Close()
			return fmt.Errorf("take over %s: %w", keys.name, err)
		}
	}
	// What follows changes the session's state, which takeovers of other
	// streams share.
	s.mu.Lock()
	defer s.mu.Unlock()
	if rec != nil {
		if err := s.compare(*rec, results[2], results[3], results[4], results[5]); err != nil {
			c.Close()
			return err
		}
		results = append(results[:2], results[6:]...)
	}
	if current, _ := results[3].ToString(); current != s.epoch {
		return fmt.Errorf("take over %s: %w", keys.name, ErrSuperseded)
	}
	if p.window == 0 {
		return nil
	}
	marker, _ := results[1].AsBytes() // nil when there is none
	if len(s.legacy) > 0 {
		marker = append(append(make([]byte, 0, len(marker)+len(s.legacy)), marker...), s.legacy...)
	}
	if len(marker) == 0 {
		return nil
	}
	byRow := make(map[int64]eventID, len(marker)/markerRecord)
	rows := make([]int64, 0, len(marker)/markerRecord)
	for i := 0; i+markerRecord <= len(marker); i += markerRecord {
		row := int64(binary.BigEndian.Uint64(marker[i:]))
		byRow[row] = eventID(marker[i+8 : i+markerRecord])
		rows = append(rows, row)
	}
	// A row that is gone was committed (deleted) by whoever published it;
	// only the rows still there can be claimed, and published, again.
	types, err := s.exist(ctx, rows)
	if err != nil {
		return fmt.Errorf("check in-flight rows: %w", err)
	}
	if len(types) == 0 {
		return nil
	}
	// The marker says what was sent, not what Redis took: MULTI … EXEC runs
	// the marker's SET even when an XADD before it fails. So the batch in
	// doubt counts as published only for the events found at the end of
	// the stream.
	entries, err := c.Do(ctx, c.B().Xrevrange().Key(keys.name).End("+").Start("-").Count(int64(len(types)+verifyTail)).Build()).AsXRange()
	if isWrongType(err) {
		// A key of another type holds the name: no XADD landed there,
		// and the events go to outbox_dead when claimed again.
		return nil
	}
	if err != nil && !rueidis.IsRedisNil(err) {
		return fmt.Errorf("find in-flight events in %s: %w", keys.name, err)
	}
	found := make(map[string]streamID, len(entries))
	for _, e := range entries {
		if id, err := parseID(e.ID); err == nil {
			found[e.FieldValues[stream.FieldEventID]] = id
		}
	}
	for row, typ := range types {
		id := byRow[row]
		if entry, ok := found[uuid.UUID(id).String()]; ok && typ == t && !s.isLost(t) {
			// In a stream that lost events, the batch in doubt may sit
			// before them: it is published again after them instead.
			s.inFlight[id] = flight{row: row, typ: t, entry: entry}
		}
	}
	return nil
}

// epochBehindError is a takeover refused because the stream's epoch in
// Redis is later than the session's: another relay has taken over
// (ErrSuperseded), unless this one still holds the drain lock, in which case
// PostgreSQL's sequence went back in time (see Drainer.raiseEpoch).
type epochBehindError struct {
	stream string
	epoch  int64 // the stream's; zero when Redis did not say
}

func (e *epochBehindError) Error() string {
	return fmt.Sprintf("take over %s: %v (its epoch is %d)", e.stream, ErrSuperseded, e.epoch)
}

func (e *epochBehindError) Unwrap() error { return ErrSuperseded }

// takeOverScript sets a stream's epoch (KEYS[1]) to the session's
// (ARGV[1]) unless a later session has taken the stream over, and returns
// the stream's marker (KEYS[2]).
const takeOverScript = `
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current and current > tonumber(ARGV[1]) then
  return redis.error_reply('SUPERSEDED ' .. current .. ' a relay with a later epoch has taken the stream over')
end
redis.call('SET', KEYS[1], ARGV[1])
return redis.call('GET', KEYS[2])`

// Keys of relays before 2026-11-24, which published every batch in one
// MULTI under one epoch for all streams. On a single server the session
// raises that epoch too, so that a relay of the older version that lost
// its lock during a rolling deploy is fenced off as well, and reads the
// marker such a relay left.
const (
	legacyEpochKey  = "_relay:epoch"
	legacyMarkerKey = "_relay:in-flight"
)

// fenceLegacy fences relays of the older version (see legacyEpochKey).
// A Redis Cluster never had one.
func (s *session) fenceLegacy(ctx context.Context) error {
	p := s.p
	if p.client.Mode() == rueidis.ClientModeCluster {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	var results []rueidis.RedisResult
	for attempt := 1; ; attempt++ {
		results = p.client.DoMulti(ctx,
			p.client.B().Incr().Key(p.prefix+legacyEpochKey).Build(),
			p.client.B().Get().Key(p.prefix+legacyMarkerKey).Build())
		err := errors.Join(results[0].NonRedisError(), results[1].NonRedisError())
		if err == nil {
			break
		}
		// The connection found broken (Redis restarted) is dialled again
		// by the next command.
		if attempt == takeOverAttempts || ctx.Err() != nil {
			return fmt.Errorf("fence relays of the older version: %w", err)
		}
	}
	for _, r := range results {
		if err := r.Error(); err != nil && !rueidis.IsRedisNil(err) {
			return fmt.Errorf("fence relays of the older version: %w", err)
		}
	}
	if p.window > 0 {
		s.legacy, _ = results[1].AsBytes()
	}
	return nil
}

func (s *session) isLost(t string) bool {
	for _, l := range s.lost {
		if l.aggregateType == t {
			return true
		}
	}
	return false
}

// compare checks a stream against what PostgreSQL recorded of it (the
// replies of takeOver's four reads), and adds it to s.lost when Redis no
// longer holds every recorded batch.
func (s *session) compare(r streamRecord, infoReply, lastReply, belowReply, afterReply rueidis.RedisResult) error {
	name := s.p.keys(r.aggregateType).name
	lost := lostStream{aggregateType: r.aggregateType, replayFrom: r.replayFrom}
	info, err := infoReply.AsMap()
	switch {
	case isNoSuchKey(err):
		lost.gone, lost.why = true, "the stream is gone"
	case isWrongType(err):
		// A key of another type holds the name: nothing can be published
		// there, and events for it go to outbox_dead.
		return nil
	case err != nil:
		return fmt.Errorf("read stream %s: %w", name, err)
	default:
		lastID, err := infoID(info, "last-generated-id")
		if err != nil {
			return fmt.Errorf("read stream %s: %w", name, err)
		}
		lost.current = lastID
		// An entry that is not there may have been deleted (at or below
		// max-deleted-entry-id) or trimmed (below recorded-first-entry-id,
		// or every entry when the stream is empty): its absence proves a
		// loss only otherwise.
		lost.deleted, _ = infoID(info, "max-deleted-entry-id")
		lost.first, _ = infoID(info, "recorded-first-entry-id")
		added, addedErr := infoInt(info, "entries-added") // Redis 7 and later
		if addedErr == nil {
			s.added[r.aggregateType] = added
		}
		entries, _ := lastReply.AsXRange()
		// Is it the stream the relay wrote to, trimmed perhaps? One created
		// again counts its entries from zero; and every entry after the
		// recorded one was added after it, so more of them than
		// entries-added grew by means the counter went back (a failover).
		after, _ := afterReply.AsXRange()
		same := addedErr == nil && added >= r.added && int64(len(after)) <= added-r.added
		absent := len(entries) == 0 && !(same && lost.mayHaveRemoved(r.last))
		switch {
		case lastID.less(r.last):
			// A failover to a replica that lagged: Redis kept a prefix.
			lost.kept, lost.why = lastID, "the stream lost its last entries"
		case absent:
			// Never removed, yet gone: the stream lost its end and
			// someone wrote to it since, or it was created again.
			below, _ := belowReply.AsXRange()
			if len(below) > 0 {
				lost.kept, _ = parseID(below[0].ID)
			}
			lost.why = "the stream no longer holds the last entry recorded in it"
		case r.replayFrom >= 0:
			lost.kept, lost.why = r.last, "a re-publication was interrupted"
		default:
			return nil
		}
	}
	s.lost = append(s.lost, lost)
	return nil
}

// infoID reads a stream id field of an XINFO STREAM reply.
func infoID(info map[string]rueidis.RedisMessage, field string) (streamID, error) {
	m, ok := info[field]
	if !ok {
		return streamID{}, fmt.Errorf("no %s", field)
	}
	str, err := m.ToString()
	if err != nil {
		return streamID{}, fmt.Errorf("%s: %w", field, err)
	}
	return parseID(str)
}

// mayHaveRemoved reports whether entry id may be missing from the stream
// because it was deleted (XDEL) or trimmed rather than lost.
// It is asked only of the stream the relay wrote to.
func (l *lostStream) mayHaveRemoved(id streamID) bool {
	return !l.deleted.less(id) || id.less(l.first) || l.first == (streamID{})
}

// needsReplay waits for the takeover and reports whether streams must be
// published again before the next batch.
func (s *session) needsReplay() bool {
	<-s.ready
	return s.err == nil && len(s.lost) > 0
}

func isNoSuchKey(err error) bool {
	re, ok := rueidis.IsRedisErr(err)
	return ok && strings.Contains(re.Error(), "no such key")
}

func isWrongType(err error) bool {
	re, ok := rueidis.IsRedisErr(err)
	return ok && strings.HasPrefix(re.Error(), "WRONGTYPE")
}

// close waits for the takeover to finish and returns the connections.
func (s *session) close() {
	<-s.ready
	for _, sc := range s.conns {
		sc.release()
	}
}

// published is what one publish did.
type published struct {
	// added counts the events added to a stream.
	added int
	// unreplicated is set when fewer replicas than asked for acknowledged
	// the batch within the wait.
	unreplicated bool
	// refused maps the index of each event that could not be published to
	// the reason: its aggregate type names no valid stream, or Redis
	// refused its XADD. Its row belongs in outbox_dead.
	refused map[int]string
	// streams says where each stream the batch has events in stood after
	// it, for PostgreSQL's record.
	streams []batchRecord
}

// batchRecord is where one stream stood after a batch: the last entry the
// batch has in it, and its entries-added counter.
type batchRecord struct {
	aggregateType string // the stream's key (see Publisher.streams)
	last          streamID
	added         int64
}

// errReplayNeeded is returned by publish when Redis no longer holds
// everything the relay published to a stream: the stream must be published
// again first. The batch was not published (or, when the loss showed in its
// own reply, its events are no longer counted in flight, so that they are
// published again after the older ones).
var errReplayNeeded = errors.New("a stream lost events; publishing them again first")

// publish adds the events, in order, to their streams, except those in
// flight (published before by a batch whose commit was not confirmed), and
// records them in the streams' markers. The events stay in flight until
// committed is called.
//
// With retention on, each stream the batch writes to is read back (XINFO
// STREAM) inside its MULTI: if its entries-added counter is lower than
// this session last saw plus what the batch added, the stream was deleted
// (and created again by this XADD or another client) since, and the events
// it held are published again before the batch.
func (s *session) publish(ctx context.Context, events []row) (published, error) {
	var res published
	<-s.ready
	if s.err != nil {
		return res, s.err
	}
	if len(s.lost) > 0 {
		return res, errReplayNeeded
	}
	p := s.p
	// Each stream's part of the batch: the index of each event it sends,
	// in order.
	parts := make(map[string]*streamPart)
	var order []string           // stream keys, in the order of their first event
	invalid := map[string]bool{} // aggregate types checked once per batch
	for i := range events {
		e := &events[i]
		if e.Infinite != pgtype.Finite {
			// Written by a producer other than createuser: no time to
			// carry, and no place in the stream's order of time.
			res.refuse(i, "created_at is infinite")
			continue
		}
		if _, ok := parts[e.stream]; !ok && !invalid[e.AggregateType] {
			if !outbox.ValidAggregateType(e.AggregateType) {
				invalid[e.AggregateType] = true
			} else {
				parts[e.stream] = &streamPart{}
				order = append(order, e.stream)
			}
		}
		if invalid[e.AggregateType] {
			// Its stream name could be one of the relay's own keys, or a
			// dead-letter stream.
			res.refuse(i, fmt.Sprintf("aggregate type %q does not name a valid stream", e.AggregateType))
		}
	}
	// A stream not taken over yet is taken over now, before anything is
	// written to it; its marker may put events in flight.
	for _, t := range order {
		if _, ok := s.conns[t]; !ok {
			if err := s.takeOverStream(ctx, t, s.records[t], p.timeout); err != nil {
				return res, s.fail(err)
			}
		}
	}
	if len(s.lost) > 0 {
		return res, errReplayNeeded // found by a takeover just now
	}
	for i := range events {
		e := &events[i]
		part, ok := parts[e.stream]
		if _, refused := res.refused[i]; refused || !ok {
			continue
		}
		if p.window > 0 {
			if _, seen := s.inFlight[e.EventID]; seen {
				continue
			}
		}
		part.sent = append(part.sent, i)
	}
	if p.window > 0 {
		for i := range events {
			if _, refused := res.refused[i]; !refused {
				e := &events[i]
				if f, ok := s.inFlight[e.EventID]; !ok || f.row != e.ID {
					s.inFlight[e.EventID] = flight{row: e.ID, typ: e.stream}
				}
			}
		}
	}
	for _, t := range order {
		s.build(t, parts[t], events)
	}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	// The streams' transactions go out side by side: one round trip in
	// all, whatever node each stream is on.
	if len(order) == 1 {
		t := order[0]
		parts[t].results = s.conns[t].conn.DoMulti(ctx, s.conns[t].cmds...)
	} else {
		var wg sync.WaitGroup
		for _, t := range order {
			wg.Add(1)
			go func() {
				defer wg.Done()
				parts[t].results = s.conns[t].conn.DoMulti(ctx, s.conns[t].cmds...)
			}()
		}
		wg.Wait()
	}
	lastOf := make(map[string]streamID, len(order))
	for _, t := range order {
		if err := s.read(t, parts[t], events, &res, lastOf); err != nil {
			return res, s.fail(err)
		}
	}
	for i := range events {
		// Events in flight are in their streams already, at the entry
		// the takeover found or an earlier publish got.
		if f, ok := s.inFlight[events[i].EventID]; ok && lastOf[f.typ].less(f.entry) {
			lastOf[f.typ] = f.entry
		}
	}
	kept := make(map[string]bool, len(order))
	for i := range events {
		if _, refused := res.refused[i]; !refused {
			kept[events[i].stream] = true
		}
	}
	for _, t := range order {
		if !kept[t] {
			continue // every event of the batch for that stream was refused
		}
		part := parts[t]
		rec := batchRecord{aggregateType: t, last: lastOf[t], added: s.added[t]}
		if part.hasAdded {
			if before, known := s.added[t]; known && part.entriesAdded < before+int64(part.added) {
				s.lost = append(s.lost, lostStream{aggregateType: t, replayFrom: -1, current: lastOf[t],
					why: "the stream was deleted and created again"})
			}
			s.added[t], rec.added = part.entriesAdded, part.entriesAdded
		}
		res.streams = append(res.streams, rec)
	}
	if len(s.lost) > 0 {
		// The batch landed in a stream that lost what came before it: it
		// is rolled back, and published again after the older events.
		for i := range events {
			if s.isLost(events[i].stream) {
				delete(s.inFlight, events[i].EventID)
			}
		}
		return res, errReplayNeeded
	}
	return res, nil
}

// streamPart is one stream's share of a batch: what it sends, and what
// came back.
type streamPart struct {
	sent []int // index of the event each XADD carries
	// exec, info and wait are the indexes of EXEC, of XINFO within the
	// EXEC reply, and of WAIT in the round trip (-1 when not sent).
	exec, info, wait int
	queued           int // commands inside the MULTI
	results          []rueidis.RedisResult
	added            int // events the stream took
	entriesAdded     int64
	hasAdded         bool
}

// build writes the round trip of stream t's part of a batch into its
// connection's command buffer: its transaction, the WAIT for replicas, and
// the next batch's WATCH, which rides along with this one's EXEC.
func (s *session) build(t string, part *streamPart, events []row) {
	p, sc := s.p, s.conns[t]
	c, keys := sc.conn, p.keys(t)
	cmds := append(sc.cmds[:0], c.B().Multi().Build())
	for _, i := range part.sent {
		cmds = append(cmds, s.xadd(c, &events[i]))
	}
	part.info = -1
	if len(part.sent) > 0 && p.track {
		part.info = len(cmds) - 1
		cmds = append(cmds, c.B().XinfoStream().Key(keys.name).Build())
	}
	if p.window > 0 {
		cmds = append(cmds, c.B().Set().Key(keys.marker).Value(rueidis.BinaryString(s.marker(t))).
			Px(p.window).Build())
	}
	part.queued = len(cmds) - 1
	cmds = append(cmds, c.B().Exec().Build())
	part.exec, part.wait = len(cmds)-1, -1
	if p.waitReplicas > 0 {
		// Before the rows are deleted, the batch should be on a replica
		// too: a failover then cannot drop it. WAIT has no key: it goes
		// to this connection's node, the stream's primary.
		part.wait = len(cmds)
		cmds = append(cmds, c.B().Wait().Numreplicas(p.waitReplicas).Timeout(p.waitTimeout.Milliseconds()).Build())
	}
	cmds = append(cmds, c.B().Watch().Key(keys.epoch).Build(), c.B().Get().Key(keys.epoch).Build())
	sc.cmds = cmds
}

// read checks the replies of stream t's part of a batch, records the
// entries its events got, and refuses those Redis refused.
func (s *session) read(t string, part *streamPart, events []row, res *published, lastOf map[string]streamID) error {
	for i, r := range part.results {
		// A refused or failed WAIT leaves the batch published and the
		// connection usable: the batch counts as unreplicated.
		if err := r.Error(); err != nil && i != part.wait && !(i == part.exec && rueidis.IsRedisNil(err)) {
			return fmt.Errorf("publish batch: %w", err)
		}
	}
	replies, err := part.results[part.exec].ToArray()
	if rueidis.IsRedisNil(err) { // the epoch changed under the WATCH
		return fmt.Errorf("publish batch: %w", ErrSuperseded)
	}
	if err != nil {
		return fmt.Errorf("publish batch: read EXEC reply: %w", err)
	}
	if len(replies) != part.queued {
		return fmt.Errorf("publish batch: EXEC answered %d replies for %d commands", len(replies), part.queued)
	}
	// A runtime error fails only its own command: an XADD refused (a key
	// of another type holds the stream's name) is skipped, the rest ran.
	for j, i := range part.sent {
		e := &events[i]
		id, err := replies[j].ToString()
		if err == nil {
			var entry streamID
			if entry, err = parseID(id); err == nil {
				lastOf[t] = entry
				if f, ok := s.inFlight[e.EventID]; ok {
					f.entry = entry
					s.inFlight[e.EventID] = f
				}
				res.added++
				part.added++
				continue
			}
		}
		res.refuse(i, err.Error())
		delete(s.inFlight, e.EventID)
	}
	if s.p.window > 0 {
		if err := replies[len(replies)-1].Error(); err != nil {
			return fmt.Errorf("publish batch: write in-flight marker: %w", err)
		}
	}
	if part.info >= 0 {
		// An XINFO fails only when the stream's XADDs were refused.
		part.entriesAdded, part.hasAdded = entriesAdded(replies[part.info])
	}
	if part.wait >= 0 {
		acked, _ := part.results[part.wait].AsInt64()
		res.unreplicated = res.unreplicated || acked < s.p.waitReplicas
	}
	if current, _ := part.results[len(part.results)-1].ToString(); current != s.epoch {
		s.err = fmt.Errorf("publish batch: %w", ErrSuperseded)
	}
	return nil
}

// entriesAdded reads the entries-added counter from an XINFO STREAM reply;
// Redis before 7.0 has none.
func entriesAdded(reply rueidis.RedisMessage) (int64, bool) {
	info, err := reply.AsMap()
	if err != nil {
		return 0, false
	}
	added, err := infoInt(info, "entries-added")
	return added, err == nil
}

// infoInt reads an integer field of an XINFO STREAM reply.
func infoInt(info map[string]rueidis.RedisMessage, field string) (int64, error) {
	m, ok := info[field]
	if !ok {
		return 0, fmt.Errorf("no %s", field)
	}
	return m.AsInt64()
}

func (r *published) refuse(i int, reason string) {
	if r.refused == nil {
		r.refused = make(map[int]string)
	}
	r.refused[i] = reason
}

// marker encodes the events in flight to the stream of key t.
func (s *session) marker(t string) []byte {
	marker := make([]byte, 0, markerRecord*len(s.inFlight))
	for id, f := range s.inFlight {
		if f.typ == t {
			marker = binary.BigEndian.AppendUint64(marker, uint64(f.row))
			marker = append(marker, id[:]...)
		}
	}
	return marker
}

// fail ends the session: its connections may be left inside a MULTI or
// watching, so they are closed rather than returned to the pool.
func (s *session) fail(err error) error {
	s.err = err
	for _, sc := range s.conns {
		sc.conn.Close()
	}
	return err
}

// committed forgets events whose rows are deleted: they can no longer be
// claimed again.
func (s *session) committed(events []row) {
	for i := range events {
		delete(s.inFlight, events[i].EventID)
	}
}

// republish adds retained events, in order, to the stream of aggregate
// type t, under the session's fence, and returns the entry each got and the
// stream's entries-added counter after them (-1 when Redis has none). It is
// for events whose rows are deleted: no marker covers them, because
// PostgreSQL's record of the stream does.
func (s *session) republish(ctx context.Context, t string, events []row) ([]streamID, int64, error) {
	<-s.ready
	if s.err != nil {
		return nil, 0, s.err
	}
	p := s.p
	if _, ok := s.conns[t]; !ok {
		if err := s.takeOverStream(ctx, t, s.records[t], p.timeout); err != nil {
			return nil, 0, s.fail(err)
		}
	}
	sc, keys := s.conns[t], p.keys(t)
	c := sc.conn
	cmds := make(rueidis.Commands, 0, len(events)+6)
	cmds = append(cmds, c.B().Multi().Build())
	for i := range events {
		cmds = append(cmds, s.xadd(c, &events[i]))
	}
	cmds = append(cmds, c.B().XinfoStream().Key(keys.name).Build(), c.B().Exec().Build(),
		c.B().Watch().Key(keys.epoch).Build(), c.B().Get().Key(keys.epoch).Build())
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	results := c.DoMulti(ctx, cmds...)
	exec := len(events) + 2
	for i, r := range results {
		if err := r.Error(); err != nil && !(i == exec && rueidis.IsRedisNil(err)) {
			return nil, 0, s.fail(fmt.Errorf("publish events again: %w", err))
		}
	}
	replies, err := results[exec].ToArray()
	if rueidis.IsRedisNil(err) {
		return nil, 0, s.fail(fmt.Errorf("publish events again: %w", ErrSuperseded))
	}
	if err != nil || len(replies) != len(events)+1 {
		return nil, 0, s.fail(fmt.Errorf("publish events again: EXEC answered %d replies for %d commands (%v)", len(replies), len(events)+1, err))
	}
	ids := make([]streamID, len(events))
	for i := range events {
		str, err := replies[i].ToString()
		if err == nil {
			ids[i], err = parseID(str)
		}
		if err != nil {
			return nil, 0, s.fail(fmt.Errorf("publish events again to %s: %w", keys.name, err))
		}
	}
	added, ok := entriesAdded(replies[len(events)])
	if !ok {
		added = -1
	}
	if current, _ := results[len(results)-1].ToString(); current != s.epoch {
		return ids, added, s.fail(fmt.Errorf("publish events again: %w", ErrSuperseded))
	}
	return ids, added, nil
}

// keys returns the keys of the stream of key t, from a cache that
// spares the allocations.
func (p *Publisher) keys(t string) streamKeys {
	k, ok := p.streams[t]
	if !ok {
		name := stream.Name(p.prefix, t)
		k = streamKeys{name: name, epoch: stream.Sibling(name, epochRole), marker: stream.Sibling(name, markerRole)}
		p.streams[t] = k
	}
	return k
}

// streamName returns the stream of key t.
func (p *Publisher) streamName(t string) string { return p.keys(t).name }

func (s *session) xadd(c rueidis.DedicatedClient, e *row) rueidis.Completed {
	b := c.B().Xadd().Key(s.p.streamName(e.stream)).Id("*").FieldValue().
		FieldValue(stream.FieldEventID, e.eventIDString()).
		FieldValue(stream.FieldEventType, e.EventType).
		FieldValue(stream.FieldAggregateType, e.AggregateType).
		FieldValue(stream.FieldAggregateID, e.AggregateID).
		FieldValue(stream.FieldPayload, rueidis.BinaryString(e.Payload)).
		FieldValue(stream.FieldOccurredAt, e.CreatedAt.UTC().Format(time.RFC3339Nano)).
		FieldValue(stream.FieldOutboxID, strconv.FormatInt(e.ID, 10))
	if e.Traceparent != nil {
		b = b.FieldValue(stream.FieldTraceparent, *e.Traceparent)
	}
	if e.Tracestate != nil {
		b = b.FieldValue(stream.FieldTracestate, *e.Tracestate)
	}
	return b.Build()
}

// followingEntries bounds the read of the entries after the one recorded
// last, which tells a stream that went on from that entry from one whose
// entries-added counter went back and grew again: more than this many
// writes by others since the relay's last batch can hide a loss.
const followingEntries = 1001
