package stream

import (
	"hash/fnv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestNewClientNeverRepeatsAPasswordItCannotParse(t *testing.T) {
	t.Parallel()
	for _, url := range []string{
		"rediss://default:AbC+s3cret/xyz=@10.0.0.3:6378/0",
		"redis://u:s3cret#pw@127.0.0.1:2/0",
		"redis://:s3cret/pw@127.0.0.1:2/0",
		"redis://u:s3cret?pw@127.0.0.1:2/0",
	} {
		_, err := NewClient(url, false)
		require.ErrorIs(t, err, ErrBadURL, url)
		require.NotContains(t, err.Error(), "s3cret", url)
	}
}

func TestAnEventReadsBackAsItWasWritten(t *testing.T) {
	t.Parallel()
	at := time.Date(2026, 11, 23, 10, 0, 0, 123456000, time.UTC)
	for _, tc := range []struct {
		name string
		e    Event
	}{
		{"without trace context", Event{EventID: "e1", EventType: "user.created", AggregateType: "user", AggregateID: "1",
			Payload: `{"n":1}`, OccurredAt: at, OutboxID: 7}},
		{"with a traceparent", Event{EventID: "e2", EventType: "user.created", AggregateType: "user", AggregateID: "2",
			Payload: `{}`, OccurredAt: at, Traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}},
		{"with a traceparent and its tracestate", Event{EventID: "e3", EventType: "user.created", AggregateType: "user", AggregateID: "3",
			Payload: `{}`, OccurredAt: at, Traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
			Tracestate: "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := tc.e.Fields()
			fields := make(map[string]string, len(f)/2)
			for i := 0; i < len(f); i += 2 {
				fields[f[i]] = f[i+1]
			}
			got, err := Decode("1-0", fields)
			require.NoError(t, err)
			want := tc.e
			want.ID = "1-0"
			require.Equal(t, want, got)
		})
	}
}

func TestSiblingsShareTheirStreamsHashSlot(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name, stream, want string
	}{
		{"a plain name becomes the tag, so the stream keeps its name", "outbox:user", "{outbox:user}:dead"},
		{"a name with a tag of its own keeps it", "{outbox}:user", "{outbox}:user:dead"},
		{"an unclosed brace is no tag", "out{box:user", "{out{box:user}:dead"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := Sibling(tt.stream, "dead")
			require.Equal(t, tt.want, got)
			require.Equal(t, slot(tt.stream), slot(got), "same hash slot")
		})
	}
}

// slot is Redis Cluster's hash slot of key: CRC16 (XMODEM) of its hash tag,
// or of the whole key, modulo 16384.
func slot(key string) uint16 {
	if open := strings.IndexByte(key, '{'); open >= 0 {
		if end := strings.IndexByte(key[open+1:], '}'); end > 0 {
			key = key[open+1 : open+1+end]
		}
	}
	var crc uint16
	for i := 0; i < len(key); i++ {
		crc ^= uint16(key[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc % 16384
}

func TestAPrefixWithABraceOutsideAHashTagIsRefused(t *testing.T) {
	t.Parallel()
	for prefix, ok := range map[string]bool{"outbox:": true, "{outbox}:": true, "out{box:": true, "outbox:{}x:": false, "out}box:": false} {
		require.Equal(t, ok, ValidPrefix(prefix) == nil, prefix)
	}
}

// The partition of an aggregate is a contract between the relay and the
// consumers and between deployments over time: these values must never
// change.
func TestPartitionIsFNV1a32ModuloNAndNeverChanges(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		id   string
		n    int
		want int
	}{
		{"", 6, 1},  // 2166136261, the FNV offset basis
		{"1", 6, 4}, // 873244444
		{"42", 6, 5},
		{"42", 4, 3}, // 2279835011
		{"user-7", 6, 0},
		{"user-7", 4, 2}, // 4082333262
		{"9007199254740993", 6, 1},
		{"42", 1, 0},
		{"42", 0, 0},
	} {
		require.Equal(t, tc.want, Partition(tc.id, tc.n), "Partition(%q, %d)", tc.id, tc.n)
		h := fnv.New32a()
		h.Write([]byte(tc.id))
		if tc.n > 1 {
			require.Equal(t, int(h.Sum32()%uint32(tc.n)), Partition(tc.id, tc.n))
		}
	}
}

func TestOnePartitionKeepsTheStreamNameOfUnpartitionedDeployments(t *testing.T) {
	t.Parallel()
	require.Equal(t, "outbox:user", PartitionName("outbox:", "user", 0, 1))
	require.Equal(t, Name("outbox:", "user"), PartitionName("outbox:", "user", 0, 1))
	require.Equal(t, []string{"outbox:user"}, Names("outbox:", "user", 1))
	require.Equal(t, []string{"outbox:user:0", "outbox:user:1", "outbox:user:2"}, Names("outbox:", "user", 3))
	require.Equal(t, "{outbox:user:2}:dead", Sibling(PartitionName("outbox:", "user", 2, 3), "dead"))
}

func TestSplitKeyReversesPartitionKey(t *testing.T) {
	t.Parallel()
	for _, n := range []int{1, 2, 6} {
		for p := range n {
			for _, typ := range []string{"user", "a:b"} {
				gotType, gotP, err := SplitKey(PartitionKey(typ, p, n), n)
				require.NoError(t, err)
				require.Equal(t, typ, gotType)
				require.Equal(t, p, gotP)
			}
		}
	}
	_, _, err := SplitKey("user", 6)
	require.Error(t, err)
	_, _, err = SplitKey("user:6", 6)
	require.Error(t, err)
}
