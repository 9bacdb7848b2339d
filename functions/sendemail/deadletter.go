package sendemail

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/rueidis"
)

// Dead-letter entries carry the original fields plus these.
const (
	FieldDeadOriginalID = "dlq_original_id"
	FieldDeadStream     = "dlq_stream"
	FieldDeadError      = "dlq_error"
	FieldDeadDeliveries = "dlq_deliveries"
	FieldDeadConsumer   = "dlq_consumer"
	FieldDeadFailedAt   = "dlq_failed_at"
)

// OriginalFields returns, sorted, the names of an entry's fields that are
// not dead-letter bookkeeping: what to copy when an entry moves to the
// dead-letter stream, or back from it.
func OriginalFields(fields map[string]string) []string {
	keys := make([]string, 0, len(fields))
	for k := range fields {
		if !strings.HasPrefix(k, "dlq_") {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	return keys
}

// deadLetterScript adds an entry to the dead-letter stream, then
// acknowledges it, atomically. In a script a failing command (the
// dead-letter key of the wrong type, out of memory) stops it before the
// acknowledgement, which MULTI … EXEC does not: there the XACK runs
// whatever became of the XADD.
//
// KEYS: dead-letter stream, stream. ARGV: group, entry id, field, value, …
var deadLetterScript = rueidis.NewLuaScript(`
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
return redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])`)

// deadLetterEntry moves e to the dead-letter stream, with why it failed,
// and acknowledges it only once it is there.
func (c *Consumer) deadLetterEntry(ctx context.Context, e rueidis.XRangeEntry, deliveries int64, reason error) error {
	args := []string{c.group, e.ID}
	for _, k := range OriginalFields(e.FieldValues) {
		args = append(args, k, e.FieldValues[k])
	}
	args = append(args,
		FieldDeadOriginalID, e.ID,
		FieldDeadStream, c.stream,
		FieldDeadError, reason.Error(),
		FieldDeadDeliveries, strconv.FormatInt(deliveries, 10),
		FieldDeadConsumer, c.name,
		FieldDeadFailedAt, time.Now().UTC().Format(time.RFC3339Nano))
	if err := deadLetterScript.Exec(ctx, c.client, []string{c.deadLetter, c.stream}, args).Error(); err != nil {
		return fmt.Errorf("dead-letter %s: %w", e.ID, err)
	}
	return nil
}
