package relay

import (
	"context"
	"encoding/binary"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/stream"
)

// A relay of the version before per-stream fences kept one epoch and one
// in-flight marker for all streams. During a rolling deploy such a relay
// may leave a batch in doubt (published, not committed) and lose its lock:
// the new relay must fence it off and must not publish that batch twice.
func TestARelayOfTheOlderVersionIsFencedAndItsBatchInDoubtNotPublishedTwice(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	b.insert(t, "item", "a", 0, 30)
	b.insert(t, "order", "b", 0, 20)

	// The older relay published the first 10 items and 5 orders, wrote its
	// global marker, and died before its COMMIT.
	rows, err := b.pool.Query(ctx, `SELECT id, event_id, aggregate_type FROM outbox ORDER BY id`)
	require.NoError(t, err)
	var marker []byte
	published := map[string]int{}
	for rows.Next() {
		var id int64
		var eventID uuid.UUID
		var typ string
		require.NoError(t, rows.Scan(&id, &eventID, &typ))
		if (typ == "item" && published[typ] < 10) || (typ == "order" && published[typ] < 5) {
			published[typ]++
			require.NoError(t, b.redis.Do(ctx, b.redis.B().Xadd().Key(stream.Name(b.prefix, typ)).Id("*").FieldValue().
				FieldValue(stream.FieldEventID, eventID.String()).FieldValue(stream.FieldEventType, typ+".changed").
				FieldValue(stream.FieldAggregateType, typ).FieldValue(stream.FieldPayload, "{}").Build()).Error())
			marker = binary.BigEndian.AppendUint64(marker, uint64(id))
			marker = append(marker, eventID[:]...)
		}
	}
	require.NoError(t, rows.Err())
	require.NoError(t, b.redis.Do(ctx, b.redis.B().Set().Key(b.prefix+legacyMarkerKey).Value(string(marker)).Build()).Error())
	require.NoError(t, b.redis.Do(ctx, b.redis.B().Set().Key(b.prefix+legacyEpochKey).Value("7").Build()).Error())

	res, err := b.relay(t).drainer.Drain(ctx, time.Time{})
	require.NoError(t, err)
	require.Equal(t, 15, res.Duplicates, "the older relay's batch in doubt is not published again")
	require.Equal(t, 35, res.Relayed)
	for typ, n := range map[string]int{"item": 30, "order": 20} {
		ids := map[string]bool{}
		entries := b.entries(t, typ)
		for _, e := range entries {
			ids[e.EventID] = true
		}
		require.Len(t, entries, n, typ)
		require.Len(t, ids, n, "no %s event twice", typ)
	}
	epoch, err := b.redis.Do(ctx, b.redis.B().Get().Key(b.prefix+legacyEpochKey).Build()).AsInt64()
	require.NoError(t, err)
	require.EqualValues(t, 8, epoch, "the older relays' epoch was raised, so their next EXEC fails")
}
