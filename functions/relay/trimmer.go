package relay

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/redis/rueidis"

	"github.com/outboxfn/outbox/shared/stream"
)

// trimBatch is the most entries one XTRIM call may remove. Approximate
// trimming (~) only frees whole radix-tree nodes, and LIMIT stops it before
// it would free more entries than this; an exact trim cannot take a LIMIT.
// Freeing is not free: measured on Redis 7.0, one exact XTRIM of 200k relay
// entries (33 MB) blocks Redis for about 4 ms, so one call over the 4.7M
// entries that fill 1 GB would block it for about 90 ms. In calls of 10,000
// (Redis's own default for ~ with the default stream-node-max-entries) the
// same 200k took 23 calls of at most 0.4 ms each (1.8 ms once, cold), other
// clients' commands running between them, for 4 to 6 ms in all. Naming the
// limit keeps that bound as long as a node holds at most 10,000 entries
// (stream-node-max-entries, 100 by default); with larger nodes the
// approximate calls free nothing and the exact call does all the work.
const trimBatch = 10_000

// deadLetterSuffix ends the name of a dead-letter stream (see
// sendemail.DeadLetterStream). Such streams have no group and so are left
// alone anyway; skipping them by name keeps it so if someone ever reads one
// through a group, because a dead letter waits for an operator, not for a
// retention period.
const deadLetterSuffix = ":dead"

// Trimmer removes, from the streams under a prefix, the entries that are
// older than a retention period and that every consumer group has read and
// acknowledged. XADD's MAXLEN cannot promise the second part: it drops
// entries whatever the groups have done with them.
//
// It never reads entries: per stream it sends one XINFO GROUPS, one
// XPENDING per group that has pending entries, and a few XTRIM MINID.
type Trimmer struct {
	client    rueidis.Client
	prefix    string
	retention time.Duration
}

// NewTrimmer returns a trimmer for the streams named prefix+<aggregate type>.
// Entries younger than retention are kept even when every group has
// acknowledged them, so a new consumer group, or a replay, can still read
// the recent past; retention zero or less keeps nothing once acknowledged.
func NewTrimmer(client rueidis.Client, prefix string, retention time.Duration) *Trimmer {
	return &Trimmer{client: client, prefix: prefix, retention: max(retention, 0)}
}

// TrimAll trims every stream under the prefix and returns how many entries
// it removed. Keys of other types under the prefix are skipped.
//
// Listing uses SCAN … MATCH prefix* TYPE stream, on every node of a
// cluster (stream.Keys): Redis applies MATCH and
// TYPE after walking the keyspace, so a full pass costs O(keys in the
// database), streams or not, in calls of about 1,000 keys each. The relay's
// database holds a handful of streams and bookkeeping keys, so this is
// cheap there; it is not in a database shared with millions of other keys.
func (t *Trimmer) TrimAll(ctx context.Context) (int64, error) {
	cut, err := t.cutoff(ctx)
	if err != nil {
		return 0, err
	}
	var total int64
	var errs []error
	keys, err := stream.Keys(ctx, t.client, t.prefix+"*", "stream")
	if err != nil {
		return 0, fmt.Errorf("list streams under %s: %w", t.prefix, err)
	}
	for _, key := range keys {
		// One stream that cannot be trimmed must not let the others grow.
		n, err := t.trim(ctx, key, cut)
		total += n
		if err != nil {
			errs = append(errs, err)
		}
		if ctx.Err() != nil {
			break
		}
	}
	return total, errors.Join(errs...)
}

// Trim trims one stream and returns how many entries it removed. A stream
// without consumer groups is left whole: nobody has read it yet. A key that
// does not exist, is not a stream or is a dead-letter stream is left alone
// without error.
func (t *Trimmer) Trim(ctx context.Context, key string) (int64, error) {
	cut, err := t.cutoff(ctx)
	if err != nil {
		return 0, err
	}
	return t.trim(ctx, key, cut)
}

// cutoff returns the first id that is not older than the retention, by
// Redis's clock: entry ids are Redis's milliseconds, and the relay's clock
// may disagree with it by more than a short retention.
func (t *Trimmer) cutoff(ctx context.Context) (streamID, error) {
	reply, err := t.client.Do(ctx, t.client.B().Time().Build()).AsStrSlice()
	if err != nil {
		return streamID{}, fmt.Errorf("read redis time: %w", err)
	}
	if len(reply) != 2 {
		return streamID{}, fmt.Errorf("read redis time: want 2 fields, got %d", len(reply))
	}
	sec, err1 := strconv.ParseUint(reply[0], 10, 64)
	usec, err2 := strconv.ParseUint(reply[1], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return streamID{}, fmt.Errorf("read redis time: %w", err)
	}
	now := sec*1000 + usec/1000
	ret := uint64(t.retention.Milliseconds())
	if ret >= now {
		return streamID{}, nil
	}
	return streamID{ms: now - ret}, nil
}

// trim removes the entries of key before cut that every group has
// acknowledged.
func (t *Trimmer) trim(ctx context.Context, key string, cut streamID) (int64, error) {
	if strings.HasSuffix(key, deadLetterSuffix) {
		return 0, nil
	}
	first, ok, err := t.firstNeeded(ctx, key)
	if err != nil || !ok {
		return 0, err
	}
	if cut.less(first) {
		first = cut
	}
	if first == (streamID{}) {
		return 0, nil
	}
	threshold := first.String()
	// Approximate calls free whole nodes in bounded batches; they return 0
	// once the oldest node holds an entry at or after threshold. The exact
	// call then removes the rest of that one node, at most
	// stream-node-max-entries entries, so the stream starts exactly at
	// threshold and no call does unbounded work.
	var total int64
	for {
		n, err := t.client.Do(ctx, t.client.B().Xtrim().Key(key).Minid().Almost().Threshold(threshold).Limit(trimBatch).Build()).AsInt64()
		if gone(err) {
			return total, nil
		}
		if err != nil {
			return total, fmt.Errorf("trim %s to %s: %w", key, threshold, err)
		}
		total += n
		if n == 0 {
			break
		}
	}
	n, err := t.client.Do(ctx, t.client.B().Xtrim().Key(key).Minid().Exact().Threshold(threshold).Build()).AsInt64()
	if gone(err) {
		return total, nil
	}
	if err != nil {
		return total, fmt.Errorf("trim %s to %s: %w", key, threshold, err)
	}
	return total + n, nil
}

// firstNeeded returns the oldest id of key that some group has not yet
// read or not yet acknowledged. ok is false when the stream must be left
// alone: it has no group, or it vanished or changed type since it was
// listed.
//
// Order matters: each group's last-delivered-id is read before its pending
// entries. An entry delivered between the two reads is after the
// last-delivered-id already read, so it is kept either way; reading the
// other way round, an entry could be delivered after XPENDING and counted
// as read by a later XINFO, and be trimmed while still pending.
func (t *Trimmer) firstNeeded(ctx context.Context, key string) (first streamID, ok bool, err error) {
	groups, err := t.client.Do(ctx, t.client.B().XinfoGroups().Key(key).Build()).ToArray()
	if gone(err) {
		return streamID{}, false, nil
	}
	if err != nil {
		return streamID{}, false, fmt.Errorf("list groups of %s: %w", key, err)
	}
	if len(groups) == 0 {
		return streamID{}, false, nil
	}
	first = streamID{ms: math.MaxUint64, seq: math.MaxUint64}
	var (
		names   []string
		pending rueidis.Commands
	)
	for _, g := range groups {
		info, err := g.AsMap()
		if err != nil {
			return streamID{}, false, fmt.Errorf("read group of %s: %w", key, err)
		}
		nameMsg, deliveredMsg, pendingMsg := info["name"], info["last-delivered-id"], info["pending"]
		name, err := nameMsg.ToString()
		if err != nil {
			return streamID{}, false, fmt.Errorf("read group name of %s: %w", key, err)
		}
		s, err := deliveredMsg.ToString()
		if err != nil {
			return streamID{}, false, fmt.Errorf("read last-delivered-id of %s/%s: %w", key, name, err)
		}
		delivered, err := parseID(s)
		if err != nil {
			return streamID{}, false, fmt.Errorf("read last-delivered-id of %s/%s: %w", key, name, err)
		}
		// Entries after last-delivered-id have not been read by the group.
		if next := delivered.next(); next.less(first) {
			first = next
		}
		// A group with nothing pending has acknowledged everything it
		// read; it needs no XPENDING.
		if n, err := pendingMsg.AsInt64(); err == nil && n == 0 {
			continue
		}
		names = append(names, name)
		pending = append(pending, t.client.B().Xpending().Key(key).Group(name).Build())
	}
	for i, r := range t.client.DoMulti(ctx, pending...) {
		// Summary form: count, smallest id, greatest id, consumers.
		summary, err := r.ToArray()
		if gone(err) {
			return streamID{}, false, nil
		}
		if err != nil {
			return streamID{}, false, fmt.Errorf("read pending of %s/%s: %w", key, names[i], err)
		}
		if len(summary) < 2 {
			return streamID{}, false, fmt.Errorf("read pending of %s/%s: short reply", key, names[i])
		}
		s, err := summary[1].ToString()
		if rueidis.IsRedisNil(err) {
			continue // acknowledged everything since XINFO GROUPS
		}
		if err != nil {
			return streamID{}, false, fmt.Errorf("read pending of %s/%s: %w", key, names[i], err)
		}
		oldest, err := parseID(s)
		if err != nil {
			return streamID{}, false, fmt.Errorf("read pending of %s/%s: %w", key, names[i], err)
		}
		if oldest.less(first) {
			first = oldest
		}
	}
	return first, true, nil
}

// gone reports whether err says a key or group that was just listed no
// longer exists or is no longer a stream: another client deleted or
// replaced it in between, and there is nothing to trim.
func gone(err error) bool {
	re, ok := rueidis.IsRedisErr(err)
	if !ok || re.IsNil() {
		return false
	}
	// XINFO GROUPS of a missing key says "no such key", with or without
	// the ERR prefix depending on the server version.
	msg := re.Error()
	return strings.Contains(msg, "no such key") ||
		strings.HasPrefix(msg, "WRONGTYPE") ||
		strings.HasPrefix(msg, "NOGROUP")
}

// streamID is a stream entry id, "<ms>-<seq>".
type streamID struct{ ms, seq uint64 }

// parseID parses a full stream id such as "1700000000000-3".
func parseID(s string) (streamID, error) {
	a, b, ok := strings.Cut(s, "-")
	if !ok {
		return streamID{}, fmt.Errorf("stream id %q: no '-'", s)
	}
	ms, err := strconv.ParseUint(a, 10, 64)
	if err != nil {
		return streamID{}, fmt.Errorf("stream id %q: %w", s, err)
	}
	seq, err := strconv.ParseUint(b, 10, 64)
	if err != nil {
		return streamID{}, fmt.Errorf("stream id %q: %w", s, err)
	}
	return streamID{ms: ms, seq: seq}, nil
}

func (id streamID) less(o streamID) bool {
	return id.ms < o.ms || id.ms == o.ms && id.seq < o.seq
}

// next is the smallest id after id. The largest id has none; it is its own
// next, which only keeps that one entry too.
func (id streamID) next() streamID {
	switch {
	case id.seq < math.MaxUint64:
		return streamID{id.ms, id.seq + 1}
	case id.ms < math.MaxUint64:
		return streamID{id.ms + 1, 0}
	default:
		return id
	}
}

func (id streamID) String() string {
	return strconv.FormatUint(id.ms, 10) + "-" + strconv.FormatUint(id.seq, 10)
}
