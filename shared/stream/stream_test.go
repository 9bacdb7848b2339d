package stream

import (
	"strings"
	"testing"

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
