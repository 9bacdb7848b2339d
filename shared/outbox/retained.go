package outbox

import (
	"context"
	"fmt"
)

// retainedRunSQL: see RetainedRun.
const retainedRunSQL = `
SELECT min(batch), coalesce(max(batch) FILTER (WHERE upto <= $3), min(batch)) FROM (
  SELECT batch, sum(events) OVER (ORDER BY batch) AS upto FROM outbox_relay_batches
  WHERE ($1 = '' OR aggregate_type = $1) AND batch >= $2 AND batch <= $4
    AND ($5 < 0 OR (partition = $5 AND partitions = $6))
  ORDER BY batch LIMIT $3) AS s`

// RetainedRun finds the next run of retained batches (migration 00012): the
// batches numbered from from to upTo, of aggregateType (every type when it
// is empty), that together hold at most events retained events, or the
// first one alone if it holds more. ok is false when there is none.
//
// Relayed events are indexed by batch with BRIN, which is cheap to keep but
// gives no order: readers take one run at a time, WHERE batch BETWEEN first
// AND last, and sort it by (batch, id), the order the relay published in.
func RetainedRun(ctx context.Context, q Querier, aggregateType string, from, upTo int64, events int) (first, last int64, ok bool, err error) {
	return RetainedPartitionRun(ctx, q, aggregateType, -1, 0, from, upTo, events)
}

// RetainedPartitionRun is RetainedRun for the batches of one stream:
// partition of aggregateType's partitions (migration 00014). A negative
// partition means every stream of the type. The run's range of batches
// may hold events of other partitions too, which the reader leaves out.
func RetainedPartitionRun(ctx context.Context, q Querier, aggregateType string, partition, partitions int, from, upTo int64, events int) (first, last int64, ok bool, err error) {
	var f, l *int64
	if err := q.QueryRow(ctx, retainedRunSQL, aggregateType, from, events, upTo, partition, partitions).Scan(&f, &l); err != nil {
		return 0, 0, false, fmt.Errorf("find retained batches: %w", err)
	}
	if f == nil || l == nil {
		return 0, 0, false, nil
	}
	return *f, *l, true, nil
}
