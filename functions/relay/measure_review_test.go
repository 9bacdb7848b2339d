package relay

import (
	"context"
	"fmt"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Review measurement (not a check): the cost of the relay on one server
// with events of one aggregate type or of many, throughput of a backlog and
// latency of a drain of one event. Run with REVIEW_MEASURE=1.
func TestReviewMeasureStreams(t *testing.T) {
	if os.Getenv("REVIEW_MEASURE") == "" {
		t.Skip("REVIEW_MEASURE not set")
	}
	for _, k := range []int{1, 10} {
		b := setup(t)
		ctx := context.Background()
		s := b.relay(t, func(cfg *Config) { cfg.BatchSize = 1000 })
		_, err := b.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
			SELECT 't' || (i % $1), i::text, 'bulk', json_build_object('seq', i) FROM generate_series(1, 50000) AS i`, k)
		require.NoError(t, err)
		_, err = b.pool.Exec(ctx, `VACUUM ANALYZE outbox`)
		require.NoError(t, err)
		began := time.Now()
		total := 0
		for total < 50000 {
			res, err := s.drainer.Drain(ctx, time.Time{})
			require.NoError(t, err)
			total += res.Relayed
		}
		el := time.Since(began)
		var lat []time.Duration
		for i := range 200 {
			_, err := b.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('t0', $1, 'one', '{}')`, fmt.Sprint(i))
			require.NoError(t, err)
			began := time.Now()
			res, err := s.drainer.Drain(ctx, time.Time{})
			require.NoError(t, err)
			require.Equal(t, 1, res.Relayed)
			lat = append(lat, time.Since(began))
		}
		slices.Sort(lat)
		t.Logf("types=%d backlog 50000 in %s = %.0f events/s; one-event drain p50 %s p90 %s",
			k, el.Round(time.Millisecond), 50000/el.Seconds(), lat[100].Round(10*time.Microsecond), lat[180].Round(10*time.Microsecond))
	}
}

// Review measurement: for RELAY_DEDUPE_WINDOW (24 h) after an upgrade, the
// marker an older relay left is read by every drain and appended to each
// stream's marker, whose rows are looked up once per stream taken over.
func TestReviewMeasureLegacyMarker(t *testing.T) {
	if os.Getenv("REVIEW_MEASURE") == "" {
		t.Skip("REVIEW_MEASURE not set")
	}
	for _, legacy := range []bool{false, true, false, true} {
		b := setup(t)
		ctx := context.Background()
		s := b.relay(t, func(cfg *Config) { cfg.BatchSize = 1000 })
		_, err := b.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
			SELECT 't' || (i % 10), i::text, 'bulk', '{}' FROM generate_series(1, 100) AS i`)
		require.NoError(t, err)
		_, err = s.drainer.Drain(ctx, time.Time{})
		require.NoError(t, err)
		if legacy {
			marker := make([]byte, 0, 24*1000)
			for i := range 1000 {
				var rec [24]byte
				rec[7] = byte(i)
				rec[6] = byte(i >> 8)
				rec[5] = 0x7f // row ids that are long gone
				marker = append(marker, rec[:]...)
			}
			require.NoError(t, b.redis.Do(ctx, b.redis.B().Set().Key(b.prefix+legacyMarkerKey).Value(string(marker)).Build()).Error())
		}
		var lat []time.Duration
		for i := range 200 {
			_, err := b.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('t0', $1, 'one', '{}')`, fmt.Sprint(i))
			require.NoError(t, err)
			began := time.Now()
			res, err := s.drainer.Drain(ctx, time.Time{})
			require.NoError(t, err)
			require.Equal(t, 1, res.Relayed)
			lat = append(lat, time.Since(began))
		}
		slices.Sort(lat)
		t.Logf("legacy marker of 1000 %v, 10 known streams: one-event drain p50 %s p90 %s", legacy, lat[100].Round(10*time.Microsecond), lat[180].Round(10*time.Microsecond))
	}
}

// Review measurement: the latency of a drain of one event when the relay
// has published to many streams before (each recorded stream is taken over
// by every drain, one round trip after the other).
func TestReviewMeasureManyRecordedStreams(t *testing.T) {
	if os.Getenv("REVIEW_MEASURE") == "" {
		t.Skip("REVIEW_MEASURE not set")
	}
	for _, k := range []int{1, 50, 1, 50} {
		b := setup(t)
		ctx := context.Background()
		s := b.relay(t, func(cfg *Config) { cfg.BatchSize = 1000 })
		_, err := b.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
			SELECT 't' || (i % $1), i::text, 'bulk', '{}' FROM generate_series(1, 200) AS i`, k)
		require.NoError(t, err)
		_, err = s.drainer.Drain(ctx, time.Time{})
		require.NoError(t, err)
		var lat []time.Duration
		for i := range 200 {
			_, err := b.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('t0', $1, 'one', '{}')`, fmt.Sprint(i))
			require.NoError(t, err)
			began := time.Now()
			res, err := s.drainer.Drain(ctx, time.Time{})
			require.NoError(t, err)
			require.Equal(t, 1, res.Relayed)
			lat = append(lat, time.Since(began))
		}
		slices.Sort(lat)
		t.Logf("streams used before %d: one-event drain p50 %s p90 %s", k, lat[100].Round(10*time.Microsecond), lat[180].Round(10*time.Microsecond))
	}
}
