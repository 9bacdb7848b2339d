package relay

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/stream"
)

// trimGroup is what one consumer group has done with a stream: read its
// first read entries and acknowledged all of them but those at pending.
type trimGroup struct {
	name    string
	read    int
	pending []int
}

func TestTrimAllRemovesOnlyOldEntriesThatEveryGroupHasAcknowledged(t *testing.T) {
	t.Parallel()
	client, _ := redistest.New(t)
	now := redisNowMS(t, client)
	// Ids in milliseconds well before and well after the 1h retention's
	// cut-off, by Redis's clock, so that no test has to sleep.
	old, young := now-2*3600_000, now-60_000
	ids := func(ms uint64, n int) []string {
		var s []string
		for i := range n {
			s = append(s, fmt.Sprintf("%d-0", ms+uint64(i)))
		}
		return s
	}
	same := func(ms uint64, seqs ...int) []string {
		var s []string
		for _, q := range seqs {
			s = append(s, fmt.Sprintf("%d-%d", ms, q))
		}
		return s
	}
	tests := []struct {
		name      string
		retention time.Duration
		ids       []string
		groups    []trimGroup
		keptFrom  int // ids[keptFrom:] remain
	}{
		{
			name:      "entries older than retention and acknowledged by every group are removed",
			retention: time.Hour,
			ids:       ids(old, 5),
			groups:    []trimGroup{{name: "g", read: 5}},
			keptFrom:  5,
		},
		{
			name:      "an entry pending in one group is kept with everything after it",
			retention: time.Hour,
			ids:       ids(old, 5),
			groups:    []trimGroup{{name: "g", read: 5, pending: []int{2, 4}}},
			keptFrom:  2,
		},
		{
			name:      "an entry not yet delivered to a group is kept with everything after it",
			retention: time.Hour,
			ids:       ids(old, 5),
			groups:    []trimGroup{{name: "g", read: 3}},
			keptFrom:  3,
		},
		{
			name:      "a stream without groups is kept whole",
			retention: time.Hour,
			ids:       ids(old, 5),
			keptFrom:  0,
		},
		{
			name:      "a group that has read nothing keeps the stream whole",
			retention: time.Hour,
			ids:       ids(old, 5),
			groups:    []trimGroup{{name: "done", read: 5}, {name: "new", read: 0}},
			keptFrom:  0,
		},
		{
			name:      "entries younger than retention are kept though acknowledged",
			retention: time.Hour,
			ids:       append(ids(old, 3), ids(young, 2)...),
			groups:    []trimGroup{{name: "g", read: 5}},
			keptFrom:  3,
		},
		{
			name:      "zero retention removes everything acknowledged, however young",
			retention: 0,
			ids:       append(ids(old, 3), ids(young, 3)...),
			groups:    []trimGroup{{name: "g", read: 5}},
			keptFrom:  5,
		},
		{
			name:      "a stream with two groups trims only to the slower one",
			retention: time.Hour,
			ids:       ids(old, 5),
			groups:    []trimGroup{{name: "fast", read: 5}, {name: "slow", read: 2}},
			keptFrom:  2,
		},
		{
			name:      "a pending entry of the group that has read further holds the trim back",
			retention: time.Hour,
			ids:       ids(old, 5),
			groups:    []trimGroup{{name: "fast", read: 5, pending: []int{1}}, {name: "slow", read: 3}},
			keptFrom:  1,
		},
		{
			name:      "entries of one millisecond are told apart by their sequence",
			retention: time.Hour,
			ids:       same(old, 0, 1, 2, 3),
			groups:    []trimGroup{{name: "g", read: 4, pending: []int{2}}},
			keptFrom:  2,
		},
		{
			name:      "milliseconds compare as numbers, not text",
			retention: time.Hour,
			ids:       []string{"999-0", "999-1", "1000-0", "1000-1"},
			groups:    []trimGroup{{name: "a", read: 4, pending: []int{1}}, {name: "b", read: 4, pending: []int{2}}},
			keptFrom:  1,
		},
		{
			name:      "sequences compare as numbers, not text",
			retention: time.Hour,
			ids:       same(old, 8, 9, 10, 11),
			groups:    []trimGroup{{name: "a", read: 4, pending: []int{1}}, {name: "b", read: 4, pending: []int{2}}},
			keptFrom:  1,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			client, prefix := redistest.New(t)
			key := prefix + "user"
			for _, id := range tc.ids {
				xadd(t, client, key, id)
			}
			for _, g := range tc.groups {
				require.NoError(t, client.Do(ctx, client.B().XgroupCreate().Key(key).Group(g.name).Id("0").Build()).Error())
				if g.read == 0 {
					continue
				}
				read, err := client.Do(ctx, client.B().Xreadgroup().Group(g.name, "c").Count(int64(g.read)).Streams().Key(key).Id(">").Build()).AsXRead()
				require.NoError(t, err)
				require.Len(t, read[key], g.read)
				var ack []string
				for i, e := range read[key] {
					if !slices.Contains(g.pending, i) {
						ack = append(ack, e.ID)
					}
				}
				if len(ack) > 0 {
					require.NoError(t, client.Do(ctx, client.B().Xack().Key(key).Group(g.name).Id(ack...).Build()).Error())
				}
			}

			n, err := NewTrimmer(client, prefix, tc.retention).TrimAll(ctx)
			require.NoError(t, err)
			assert.EqualValues(t, tc.keptFrom, n, "entries removed")
			assert.Equal(t, tc.ids[tc.keptFrom:], streamIDs(t, client, key), "entries left")
		})
	}
}

func TestTrimmerRemovesABacklogLargerThanOneCallInFullUpToTheFirstNeededEntry(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	client, prefix := redistest.New(t)
	key := prefix + "user"
	old := redisNowMS(t, client) - 2*3600_000
	const total, delivered = 25_000, 23_456 // more than two calls' worth, not on a node boundary
	ids := fillStream(t, client, key, old, total)
	// The group has read and acknowledged the first entries: as after
	// XREADGROUP and XACK, without moving 23k entries to the test.
	require.NoError(t, client.Do(ctx, client.B().XgroupCreate().Key(key).Group("g").Id(ids[delivered-1]).Build()).Error())

	n, err := NewTrimmer(client, prefix, time.Hour).Trim(ctx, key)
	require.NoError(t, err)
	assert.EqualValues(t, delivered, n, "entries removed")
	first, err := client.Do(ctx, client.B().Xrange().Key(key).Start("-").End("+").Count(1).Build()).AsXRange()
	require.NoError(t, err)
	require.Len(t, first, 1)
	assert.Equal(t, ids[delivered], first[0].ID, "the first entry left is the first one the group has not read")
	length, err := client.Do(ctx, client.B().Xlen().Key(key).Build()).AsInt64()
	require.NoError(t, err)
	assert.EqualValues(t, total-delivered, length)
}

func TestTrimmerLeavesKeysThatAreNotItsStreamsAloneWithoutError(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	client, prefix := redistest.New(t)
	old := redisNowMS(t, client) - 2*3600_000
	do := func(cmd rueidis.Completed) {
		t.Helper()
		require.NoError(t, client.Do(ctx, cmd).Error())
	}
	// What the relay and sendemail keep next to the streams.
	do(client.B().Set().Key(prefix + "_relay:epoch").Value("7").Build())
	do(client.B().Set().Key(prefix + "_relay:in-flight").Value("1700000000000-0").Build())
	do(client.B().Hset().Key(prefix+"sends").FieldValue().FieldValue("k", "v").Build())
	do(client.B().Rpush().Key(prefix + "list").Element("a").Build())
	do(client.B().Sadd().Key(prefix + "set").Member("a").Build())
	do(client.B().Zadd().Key(prefix+"zset").ScoreMember().ScoreMember(1, "a").Build())
	// Dead-letter streams: one as sendemail leaves it, without a group, and
	// one that someone reads through a group that has acknowledged it all.
	fillStream(t, client, prefix+"user:dead", old, 3)
	fillStream(t, client, prefix+"order:dead", old, 3)
	do(client.B().XgroupCreate().Key(prefix + "order:dead").Group("g").Id("$").Build())
	// A stream just outside the prefix, acknowledged in full.
	outside := strings.TrimSuffix(prefix, ":") + "-other:user"
	t.Cleanup(func() { client.Do(context.Background(), client.B().Del().Key(outside).Build()) })
	fillStream(t, client, outside, old, 3)
	do(client.B().XgroupCreate().Key(outside).Group("g").Id("$").Build())
	// The one stream to trim, so that the test sees TrimAll did run.
	fillStream(t, client, prefix+"user", old, 4)
	do(client.B().XgroupCreate().Key(prefix + "user").Group("g").Id("$").Build())

	trimmer := NewTrimmer(client, prefix, time.Hour)
	n, err := trimmer.TrimAll(ctx)
	require.NoError(t, err)
	assert.EqualValues(t, 4, n, "only the stream under the prefix is trimmed")

	for _, key := range []string{prefix + "_relay:epoch", prefix + "sends", prefix + "zset", prefix + "missing", prefix + "user:dead", prefix + "order:dead"} {
		n, err := trimmer.Trim(ctx, key)
		assert.NoError(t, err, "trim %s", key)
		assert.Zero(t, n, "trim %s", key)
	}

	epoch, err := client.Do(ctx, client.B().Get().Key(prefix+"_relay:epoch").Build()).ToString()
	require.NoError(t, err)
	assert.Equal(t, "7", epoch)
	inFlight, err := client.Do(ctx, client.B().Get().Key(prefix+"_relay:in-flight").Build()).ToString()
	require.NoError(t, err)
	assert.Equal(t, "1700000000000-0", inFlight)
	for key, want := range map[string]string{
		prefix + "sends": "hash", prefix + "list": "list", prefix + "set": "set", prefix + "zset": "zset",
	} {
		typ, err := client.Do(ctx, client.B().Type().Key(key).Build()).ToString()
		require.NoError(t, err)
		assert.Equal(t, want, typ, key)
	}
	for key, want := range map[string]int{prefix + "user:dead": 3, prefix + "order:dead": 3, outside: 3, prefix + "user": 0} {
		assert.Len(t, streamIDs(t, client, key), want, key)
	}
}

func TestStreamIDs(t *testing.T) {
	t.Parallel()
	for _, s := range []string{"", "5", "-1", "1-", "a-1", "1-b", "1-2-3", "18446744073709551616-0"} {
		_, err := parseID(s)
		assert.Error(t, err, "parse %q", s)
	}
	id, err := parseID("18446744073709551615-18446744073709551615")
	require.NoError(t, err)
	assert.Equal(t, streamID{math.MaxUint64, math.MaxUint64}, id, "both halves are uint64")
	tests := []struct {
		id, next string
	}{
		{"0-0", "0-1"},
		{"1700000000000-9", "1700000000000-10"},
		{"5-18446744073709551615", "6-0"},
		{"18446744073709551615-18446744073709551615", "18446744073709551615-18446744073709551615"},
	}
	for _, tc := range tests {
		id, err := parseID(tc.id)
		require.NoError(t, err)
		assert.Equal(t, tc.next, id.next().String(), "the id after %s", tc.id)
	}
}

// TestTrimmingTwoHundredThousandAcknowledgedEntriesIsCheap measures one
// TrimAll of a stream of 200k entries, about 212 bytes each, that its
// group has acknowledged, on a private redis-server so that Redis's
// statistics count only this test's commands.
func TestTrimmingTwoHundredThousandAcknowledgedEntriesIsCheap(t *testing.T) {
	if testing.Short() {
		t.Skip("builds 200k entries")
	}
	ctx := context.Background()
	server := redistest.StartServer(t)
	opt, err := rueidis.ParseURL(server.URL())
	require.NoError(t, err)
	opt.DisableCache = true
	client, err := rueidis.NewClient(opt)
	require.NoError(t, err)
	t.Cleanup(client.Close)
	const prefix, entries = "outbox:", 200_000
	key := prefix + "user"
	old := redisNowMS(t, client) - 2*3600_000
	do := func(cmd rueidis.Completed) {
		t.Helper()
		require.NoError(t, client.Do(ctx, cmd).Error())
	}

	build := func() {
		t.Helper()
		do(client.B().Del().Key(key).Build())
		fillStream(t, client, key, old, entries)
		do(client.B().XgroupCreate().Key(key).Group("sendemail").Id("$").Build())
		do(client.B().ConfigResetstat().Build())
		do(client.B().SlowlogReset().Build())
	}
	// Every command goes to the slow log, so the longest single call shows.
	do(client.B().ConfigSet().ParameterValue().ParameterValue("slowlog-log-slower-than", "0").ParameterValue("slowlog-max-len", "1000").Build())

	build()
	before := usedMemory(t, client)
	began := time.Now()
	n, err := NewTrimmer(client, prefix, time.Hour).TrimAll(ctx)
	elapsed := time.Since(began)
	require.NoError(t, err)
	after := usedMemory(t, client)
	stats := commandStats(t, client)
	longest := longestCall(t, client)
	require.EqualValues(t, entries, n)
	require.Empty(t, streamIDs(t, client, key), "every acknowledged entry is removed")
	var calls, usec int64
	for _, s := range stats {
		calls += s.calls
		usec += s.usec
	}
	t.Logf("TrimAll of %d entries: %s wall, %d commands, %d µs of Redis time, longest call %s (%d µs); used_memory %.1f MB -> %.1f MB",
		entries, elapsed, calls, usec, longest.cmd, longest.usec, float64(before)/1e6, float64(after)/1e6)
	for name, s := range stats {
		t.Logf("  %-8s %3d calls %6d µs", name, s.calls, s.usec)
	}
	for _, read := range []string{"xrange", "xrevrange", "xread", "xreadgroup"} {
		assert.NotContains(t, stats, read, "the trimmer reads no entries")
	}
	// A call frees whole nodes while they fit under LIMIT, so it stops
	// short of it by less than a node: allow calls half full, then the
	// approximate call that finds nothing and the exact one.
	assert.LessOrEqual(t, stats["xtrim"].calls, int64(2*entries/trimBatch+2), "XTRIM calls")
	assert.LessOrEqual(t, stats["xinfo"].calls+stats["xpending"].calls, int64(2), "group commands: one XINFO GROUPS, at most one XPENDING per group")
	assert.Less(t, after, before/4, "the memory of the entries is freed")

	// For comparison, what one exact XTRIM without LIMIT costs.
	build()
	do(client.B().Xtrim().Key(key).Minid().Exact().Threshold(fmt.Sprintf("%d-0", old+entries)).Build())
	longest = longestCall(t, client)
	t.Logf("one exact XTRIM MINID of %d entries, for comparison: %d µs", entries, longest.usec)
}

// redisNowMS is Redis's clock, in the milliseconds of stream ids.
func redisNowMS(t testing.TB, client rueidis.Client) uint64 {
	t.Helper()
	now, err := client.Do(context.Background(), client.B().Time().Build()).AsStrSlice()
	require.NoError(t, err)
	sec, err := strconv.ParseUint(now[0], 10, 64)
	require.NoError(t, err)
	usec, err := strconv.ParseUint(now[1], 10, 64)
	require.NoError(t, err)
	return sec*1000 + usec/1000
}

func xadd(t testing.TB, client rueidis.Client, key, id string) {
	t.Helper()
	err := client.Do(context.Background(), client.B().Xadd().Key(key).Id(id).FieldValue().FieldValue("n", id).Build()).Error()
	require.NoError(t, err, "XADD %s %s", key, id)
}

// fillStream adds n entries shaped like the relay's, starting at
// millisecond ms, 50 to a millisecond, and returns their ids.
func fillStream(t testing.TB, client rueidis.Client, key string, ms uint64, n int) []string {
	t.Helper()
	ids := make([]string, 0, n)
	cmds := make(rueidis.Commands, 0, 1000)
	flush := func() {
		for _, r := range client.DoMulti(context.Background(), cmds...) {
			require.NoError(t, r.Error())
		}
		cmds = cmds[:0]
	}
	for i := range n {
		id := fmt.Sprintf("%d-%d", ms+uint64(i/50), i%50)
		e := stream.Event{
			EventID: fmt.Sprintf("0190a3c4-7e5f-7a1b-9c2d-%012d", i), EventType: "user.created",
			AggregateType: "user", AggregateID: strconv.Itoa(i),
			Payload:    fmt.Sprintf(`{"id":%d,"email":"user%d@example.com"}`, i, i),
			OccurredAt: time.UnixMilli(int64(ms)), OutboxID: int64(i + 1),
		}
		fv := client.B().Xadd().Key(key).Id(id).FieldValue()
		for f := e.Fields(); len(f) >= 2; f = f[2:] {
			fv = fv.FieldValue(f[0], f[1])
		}
		cmds = append(cmds, fv.Build())
		ids = append(ids, id)
		if len(cmds) == cap(cmds) {
			flush()
		}
	}
	flush()
	return ids
}

func streamIDs(t testing.TB, client rueidis.Client, key string) []string {
	t.Helper()
	entries, err := client.Do(context.Background(), client.B().Xrange().Key(key).Start("-").End("+").Build()).AsXRange()
	require.NoError(t, err)
	ids := []string{}
	for _, e := range entries {
		ids = append(ids, e.ID)
	}
	return ids
}

func usedMemory(t testing.TB, client rueidis.Client) int64 {
	t.Helper()
	info, err := client.Do(context.Background(), client.B().Info().Section("memory").Build()).ToString()
	require.NoError(t, err)
	for line := range strings.Lines(info) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "used_memory:"); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			require.NoError(t, err)
			return n
		}
	}
	t.Fatal("INFO memory has no used_memory")
	return 0
}

type commandStat struct{ calls, usec int64 }

// commandStats reads INFO commandstats, by command name ("xinfo" for
// XINFO GROUPS).
func commandStats(t testing.TB, client rueidis.Client) map[string]commandStat {
	t.Helper()
	info, err := client.Do(context.Background(), client.B().Info().Section("commandstats").Build()).ToString()
	require.NoError(t, err)
	stats := map[string]commandStat{}
	for line := range strings.Lines(info) {
		// cmdstat_xtrim:calls=21,usec=1234,usec_per_call=58.76,...
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), "cmdstat_")
		if !ok {
			continue
		}
		name, fields, _ := strings.Cut(rest, ":")
		name, _, _ = strings.Cut(name, "|") // "xinfo|groups"
		if name == "info" || name == "config" || name == "slowlog" {
			continue
		}
		s := stats[name]
		for f := range strings.SplitSeq(fields, ",") {
			k, v, _ := strings.Cut(f, "=")
			n, _ := strconv.ParseInt(v, 10, 64)
			switch k {
			case "calls":
				s.calls += n
			case "usec":
				s.usec += n
			}
		}
		stats[name] = s
	}
	return stats
}

type slowCall struct {
	cmd  string
	usec int64
}

// longestCall is the slowest command in the slow log.
func longestCall(t testing.TB, client rueidis.Client) slowCall {
	t.Helper()
	entries, err := client.Do(context.Background(), client.B().SlowlogGet().Count(-1).Build()).ToArray()
	require.NoError(t, err)
	var longest slowCall
	for _, e := range entries {
		// id, timestamp, microseconds, arguments, client address, name
		f, err := e.ToArray()
		require.NoError(t, err)
		usec, err := f[2].AsInt64()
		require.NoError(t, err)
		args, err := f[3].AsStrSlice()
		require.NoError(t, err)
		if strings.EqualFold(args[0], "slowlog") || strings.EqualFold(args[0], "info") || usec <= longest.usec {
			continue
		}
		longest = slowCall{cmd: strings.Join(args, " "), usec: usec}
	}
	return longest
}
