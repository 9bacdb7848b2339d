package stream

import (
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
