package relay

import (
	"context"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Review (hostile): what a drain of big events costs the relay's heap. 200
// events of 1 MiB in batches of 100: before 9b13af4 the drain allocated
// 212 MiB and kept 206 MiB (the reused row slices still point at the last
// batches' payloads); since, the COPY buffers grow by append from empty
// (1.25x steps past 256 KiB: about 5x a batch's bytes allocated per
// connection slot) and are kept for the drainer's life. (The race
// detector adds about 300 MiB of allocation, hence the bound of 4x.)
func TestADrainOfBigEventsAllocatesAndKeepsLittleMoreThanItsEvents(t *testing.T) {
	b := setup(t)
	ctx := context.Background()
	_, err := b.pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
		SELECT 'user', g::text, 'x', json_build_object('p', repeat('x', 1 << 20)) FROM generate_series(1, 200) g`)
	require.NoError(t, err)
	s := b.relay(t, func(c *Config) { c.Background = false; c.BatchSize = 100 })
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	res, err := s.drainer.Drain(ctx, time.Time{})
	require.NoError(t, err)
	require.Equal(t, 200, res.Relayed)
	runtime.GC()
	runtime.ReadMemStats(&after)
	t.Logf("heap in use after the drain, after GC: %d MiB more than before (total alloc %d MiB)",
		(int64(after.HeapInuse)-int64(before.HeapInuse))>>20, (after.TotalAlloc-before.TotalAlloc)>>20)
	const payloads = 200 << 20
	require.Less(t, after.TotalAlloc-before.TotalAlloc, uint64(4*payloads), "allocated during the drain")
	require.Less(t, int64(after.HeapInuse)-int64(before.HeapInuse), int64(payloads*3/2), "kept after the drain")
	runtime.KeepAlive(s)
}
