// Package stream defines how an outbox event looks as a Redis Stream entry,
// the contract between the relay that writes entries and the consumers that
// read them, and opens Redis clients the way every function needs them.
package stream

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/rueidis"
)

// Entry field names.
const (
	FieldEventID       = "event_id"
	FieldEventType     = "event_type"
	FieldAggregateType = "aggregate_type"
	FieldAggregateID   = "aggregate_id"
	FieldPayload       = "payload"
	FieldOccurredAt    = "occurred_at"
	FieldTraceparent   = "traceparent"
	// FieldTracestate carries the W3C tracestate that goes with
	// FieldTraceparent, when the producer had one.
	FieldTracestate = "tracestate"
	// FieldOutboxID carries the outbox row id. Stream order is claim order,
	// which can differ from id order when transactions commit out of order;
	// a consumer that cares can compare ids of one aggregate to notice.
	FieldOutboxID = "outbox_id"
)

// Name returns the stream that events of aggregateType go to.
func Name(prefix, aggregateType string) string { return prefix + aggregateType }

// Event is an outbox event as it travels through a stream.
type Event struct {
	// ID is the stream entry id ("1700000000000-0"); empty before XADD.
	ID            string
	EventID       string
	EventType     string
	AggregateType string
	AggregateID   string
	// Payload is the event's JSON exactly as the outbox stored it.
	Payload    string
	OccurredAt time.Time
	// Traceparent is the W3C trace context, or empty.
	Traceparent string
	// Tracestate is the W3C tracestate that goes with Traceparent, or empty.
	Tracestate string
	// OutboxID is the id the event had in the outbox, or zero when the
	// entry does not say (entries written before the field existed).
	OutboxID int64
}

// Fields returns the entry's field-value pairs in XADD order.
func (e Event) Fields() []string {
	f := []string{
		FieldEventID, e.EventID,
		FieldEventType, e.EventType,
		FieldAggregateType, e.AggregateType,
		FieldAggregateID, e.AggregateID,
		FieldPayload, e.Payload,
		FieldOccurredAt, e.OccurredAt.UTC().Format(time.RFC3339Nano),
	}
	if e.Traceparent != "" {
		f = append(f, FieldTraceparent, e.Traceparent)
	}
	if e.Tracestate != "" {
		f = append(f, FieldTracestate, e.Tracestate)
	}
	if e.OutboxID != 0 {
		f = append(f, FieldOutboxID, strconv.FormatInt(e.OutboxID, 10))
	}
	return f
}

// ErrMalformed marks an entry that is not an event: a field is missing or
// unreadable. Such an entry can never succeed and belongs in a dead-letter
// stream.
var ErrMalformed = errors.New("malformed stream entry")

// Decode reads an event from an entry's fields.
func Decode(id string, fields map[string]string) (Event, error) {
	e := Event{
		ID:            id,
		EventID:       fields[FieldEventID],
		EventType:     fields[FieldEventType],
		AggregateType: fields[FieldAggregateType],
		AggregateID:   fields[FieldAggregateID],
		Payload:       fields[FieldPayload],
		Traceparent:   fields[FieldTraceparent],
		Tracestate:    fields[FieldTracestate],
	}
	for _, required := range []struct{ name, value string }{
		{FieldEventID, e.EventID}, {FieldEventType, e.EventType}, {FieldPayload, e.Payload},
	} {
		if required.value == "" {
			return e, fmt.Errorf("%w: field %s is missing", ErrMalformed, required.name)
		}
	}
	if at := fields[FieldOccurredAt]; at != "" {
		t, err := time.Parse(time.RFC3339Nano, at)
		if err != nil {
			return e, fmt.Errorf("%w: field %s: %v", ErrMalformed, FieldOccurredAt, err)
		}
		e.OccurredAt = t
	}
	if id := fields[FieldOutboxID]; id != "" {
		n, err := strconv.ParseInt(id, 10, 64)
		if err != nil {
			return e, fmt.Errorf("%w: field %s: %v", ErrMalformed, FieldOutboxID, err)
		}
		e.OutboxID = n
	}
	return e, nil
}

// ErrBadURL says a Redis URL could not be parsed. It carries no part of the
// URL: url.Parse quotes the text it choked on, which for a password holding
// '/', '?' or '#' is the password itself.
var ErrBadURL = errors.New("redis url is not valid: use redis://[user:password@]host:port/db (rediss:// for TLS), with '/', '?', '#' and '@' in the password percent-encoded")

// ParseURL parses a Redis URL as rueidis does, with an error that never
// repeats the URL.
func ParseURL(url string) (rueidis.ClientOption, error) {
	opt, err := rueidis.ParseURL(url)
	if err != nil {
		return opt, ErrBadURL
	}
	return opt, nil
}

// NewClient opens a Redis client for url. Client-side caching is off because
// nothing here reads cached keys and Memorystore refuses CLIENT TRACKING.
//
// With cluster false the client talks to one server (a primary, or
// Memorystore's primary endpoint) and starts even while it is down:
// commands fail until it is back. With cluster true it is a Redis Cluster
// client: the URL names one or more nodes to learn the cluster's layout
// from (redis://host:port?addr=host2:port2&addr=host3:port3, or a
// discovery endpoint), and at least one of them must answer now, because
// the client needs the slot map before it can route anything. From then on
// it follows the cluster through failovers and resharding by itself.
func NewClient(url string, cluster bool) (rueidis.Client, error) {
	opt, err := ParseURL(url)
	if err != nil {
		return nil, err
	}
	opt.DisableCache = true
	opt.Dialer.Timeout = 5 * time.Second
	if cluster {
		if opt.SelectDB != 0 {
			return nil, ErrClusterDB
		}
		// Ask the seed nodes in random order, so that instances do not all
		// ask the first one.
		opt.ShuffleInit = true
		client, err := rueidis.NewClient(opt)
		if err != nil {
			return nil, fmt.Errorf("connect to redis cluster: %w", err)
		}
		if client.Mode() != rueidis.ClientModeCluster {
			client.Close()
			return nil, ErrNotCluster
		}
		return client, nil
	}
	// Start even while Redis is down; commands fail until it is back.
	opt.ForceSingleClient = true
	client, err := rueidis.NewClient(opt)
	if client == nil {
		return nil, fmt.Errorf("create redis client: %w", err)
	}
	// With ForceSingleClient a failed first dial still yields a client that
	// redials on use; the error only says Redis is down right now. A server
	// that answers is asked whether it is a cluster node, whose keys a
	// single-server client would find scattered (MOVED) across its shards.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if info, err := client.Do(ctx, client.B().Info().Section("cluster").Build()).ToString(); err == nil &&
		strings.Contains(info, "cluster_enabled:1") {
		client.Close()
		return nil, ErrIsCluster
	}
	return client, nil
}

// ErrIsCluster says REDIS_CLUSTER is false but the server at REDIS_URL is a
// Redis Cluster node.
var ErrIsCluster = errors.New("the server at REDIS_URL is a Redis Cluster node: set REDIS_CLUSTER=true")

// ErrClusterDB says a cluster URL selects a database other than 0; a
// Redis Cluster has only database 0.
var ErrClusterDB = errors.New("redis cluster has only database 0: drop the /db part of REDIS_URL or make it /0")

// ErrNotCluster says REDIS_CLUSTER is true but the server is not a Redis
// Cluster node (cluster_enabled:0).
var ErrNotCluster = errors.New("REDIS_CLUSTER is true but the server at REDIS_URL is not in cluster mode")

// Sibling names a key that lives in the same Redis Cluster hash slot as the
// key name, for the state that must change together with it in one MULTI
// or script (a stream's dead letters, the relay's fence and marker).
//
// Redis hashes only the part of a key between the first '{' and the next
// '}' when that part is not empty (the hash tag), and the whole key
// otherwise. So a name without a hash tag, such as outbox:user, is in the
// slot of the tag {outbox:user}: its siblings are {outbox:user}:<role>,
// and the name itself does not change. A name that has a hash tag of its
// own keeps it: {outbox}:user's siblings are {outbox}:user:<role>. A name
// with a '}' outside a hash tag has no sibling (ValidPrefix refuses such
// prefixes).
func Sibling(name, role string) string {
	if hasHashTag(name) {
		return name + ":" + role
	}
	return "{" + name + "}:" + role
}

// ErrPrefixBraces says a stream prefix holds a '}' that no sibling name can
// share a hash slot with (see ValidPrefix).
var ErrPrefixBraces = errors.New("STREAM_PREFIX may hold '{' and '}' only as a hash tag before any other '}' ({outbox}: is one)")

// ValidPrefix checks that every stream under prefix has siblings in its
// hash slot: a name with a '}' but no hash tag (outbox:{}x:) has none,
// because a sibling's tag would end at that '}'. Aggregate types hold no
// braces, so the prefix decides.
func ValidPrefix(prefix string) error {
	if strings.IndexByte(prefix, '}') >= 0 && !hasHashTag(prefix) {
		return ErrPrefixBraces
	}
	return nil
}

// hasHashTag reports whether Redis Cluster hashes only part of key.
func hasHashTag(key string) bool {
	open := strings.IndexByte(key, '{')
	if open < 0 {
		return false
	}
	end := strings.IndexByte(key[open+1:], '}')
	return end > 0
}

// Keys lists, sorted and without repeats, the keys that match pattern
// (SCAN … MATCH) and are of type typ (all types when empty). A SCAN
// covers one server, so on a cluster it runs on every node; a replica lists
// its primary's keys again, which the list drops. A cluster node that
// cannot be reached is passed over (its keys are on its replica, which
// takes over), unless no node can be.
func Keys(ctx context.Context, client rueidis.Client, pattern, typ string) ([]string, error) {
	seen := make(map[string]struct{})
	cluster := client.Mode() == rueidis.ClientModeCluster
	var unreachable error
	answered := 0
	for addr, node := range client.Nodes() {
		err := scanNode(ctx, node, pattern, typ, seen)
		if _, isRedis := rueidis.IsRedisErr(err); err != nil && (!cluster || isRedis) {
			return nil, fmt.Errorf("list keys %s on %s: %w", pattern, addr, err)
		}
		if err != nil {
			unreachable = fmt.Errorf("list keys %s on %s: %w", pattern, addr, err)
			continue
		}
		answered++
	}
	if answered == 0 && unreachable != nil {
		return nil, unreachable
	}
	keys := make([]string, 0, len(seen))
	for k := range seen {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys, nil
}

func scanNode(ctx context.Context, node rueidis.Client, pattern, typ string, seen map[string]struct{}) error {
	var cursor uint64
	for {
		b := node.B().Scan().Cursor(cursor).Match(pattern).Count(1000)
		var cmd rueidis.Completed
		if typ != "" {
			cmd = b.Type(typ).Build()
		} else {
			cmd = b.Build()
		}
		scan, err := node.Do(ctx, cmd).AsScanEntry()
		if err != nil {
			return err
		}
		for _, k := range scan.Elements {
			seen[k] = struct{}{}
		}
		if scan.Cursor == 0 {
			return nil
		}
		cursor = scan.Cursor
	}
}

// Ping checks that Redis answers.
func Ping(ctx context.Context, client rueidis.Client) error {
	return client.Do(ctx, client.B().Ping().Build()).Error()
}

// MaxPartitions bounds STREAM_PARTITIONS: a consumer runs one reader per
// partition, and a relay's drain holds a Redis connection per stream it
// writes to (its fence's WATCH), of which a client has about a thousand
// per node: partitions × aggregate types must stay below that.
const MaxPartitions = 64

// Partition returns which of n partitions the events of aggregateID go to:
// the FNV-1a 32-bit hash of the id's bytes, modulo n (0 when n is 1 or
// less). The relay and every consumer must agree on it, and a change would
// send an aggregate's next events to another stream than its earlier ones,
// out of order: it must never change (stream_test.go pins known values).
func Partition(aggregateID string, n int) int {
	if n <= 1 {
		return 0
	}
	const offset, prime = 2166136261, 16777619
	h := uint32(offset)
	for i := 0; i < len(aggregateID); i++ {
		h ^= uint32(aggregateID[i])
		h *= prime
	}
	return int(h % uint32(n))
}

// PartitionKey names partition p of aggregateType's n partitions without
// the prefix: the aggregate type itself when n is 1 or less (the stream a
// deployment without partitions has always had), and <type>:<p> otherwise.
// Each such name is hashed whole, so on a cluster the partitions of a type
// spread over the slots (unless the prefix has a hash tag).
func PartitionKey(aggregateType string, p, n int) string {
	if n <= 1 {
		return aggregateType
	}
	return aggregateType + ":" + strconv.Itoa(p)
}

// PartitionName is the stream of partition p of aggregateType's n
// partitions: Name(prefix, aggregateType) when n is 1 or less,
// <prefix><type>:<p> otherwise (outbox:user:3).
func PartitionName(prefix, aggregateType string, p, n int) string {
	return prefix + PartitionKey(aggregateType, p, n)
}

// Names lists the n streams of aggregateType, partition 0 first.
func Names(prefix, aggregateType string, n int) []string {
	n = max(n, 1)
	names := make([]string, n)
	for p := range names {
		names[p] = PartitionName(prefix, aggregateType, p, n)
	}
	return names
}

// SplitKey reverses PartitionKey for n partitions: it returns the
// aggregate type and the partition of key, which must be a PartitionKey of
// the same n.
func SplitKey(key string, n int) (aggregateType string, p int, err error) {
	if n <= 1 {
		return key, 0, nil
	}
	i := strings.LastIndexByte(key, ':')
	if i < 0 {
		return "", 0, fmt.Errorf("stream key %q has no partition", key)
	}
	p, err = strconv.Atoi(key[i+1:])
	if err != nil || p < 0 || p >= n {
		return "", 0, fmt.Errorf("stream key %q has no partition below %d", key, n)
	}
	return key[:i], p, nil
}

// ValidPartitions checks a STREAM_PARTITIONS value.
func ValidPartitions(n int) error {
	if n < 1 || n > MaxPartitions {
		return fmt.Errorf("STREAM_PARTITIONS must be between 1 and %d, not %d", MaxPartitions, n)
	}
	return nil
}
