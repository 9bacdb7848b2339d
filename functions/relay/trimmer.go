package relay

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/redis/rueidis"
)

// Trimmer bounds the length of the streams under a prefix without ever
// dropping an entry that a consumer group has not acknowledged or not yet
// read. XADD's own MAXLEN cannot promise that: on Redis 7 it drops pending
// entries too.
type Trimmer struct {
	client rueidis.Client
	prefix string
	maxLen int64
	logger *slog.Logger
}

// Run trims every interval until ctx is done.
func (t *Trimmer) Run(ctx context.Context, interval time.Duration) {
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		if err := t.TrimAll(ctx); err != nil && ctx.Err() == nil {
			t.logger.WarnContext(ctx, "trim streams", slog.Any("error", err))
		}
	}
}

// TrimAll trims each stream under the prefix.
func (t *Trimmer) TrimAll(ctx context.Context) error {
	var cursor uint64
	for {
		scan, err := t.client.Do(ctx, t.client.B().Scan().Cursor(cursor).Match(t.prefix+"*").Count(1000).Type("stream").Build()).AsScanEntry()
		if err != nil {
			return fmt.Errorf("list streams: %w", err)
		}
		for _, key := range scan.Elements {
			if _, err := t.Trim(ctx, key); err != nil {
				return err
			}
		}
		if scan.Cursor == 0 {
			return nil
		}
		cursor = scan.Cursor
	}
}

// Trim removes the oldest entries of key beyond maxLen, stopping short of
// the oldest entry any group still needs. A stream without groups is left
// alone: nobody has read it yet. It returns how many entries it removed.
func (t *Trimmer) Trim(ctx context.Context, key string) (int64, error) {
	length, err := t.client.Do(ctx, t.client.B().Xlen().Key(key).Build()).AsInt64()
	if err != nil || length <= t.maxLen {
		return 0, err
	}
	// The first entry to keep if only the length mattered.
	keep, err := t.client.Do(ctx, t.client.B().Xrevrange().Key(key).End("+").Start("-").Count(t.maxLen).Build()).AsXRange()
	if err != nil || len(keep) == 0 {
		return 0, err
	}
	minID := keep[len(keep)-1].ID
	groups, err := t.client.Do(ctx, t.client.B().XinfoGroups().Key(key).Build()).ToArray()
	if err != nil {
		return 0, fmt.Errorf("list groups of %s: %w", key, err)
	}
	if len(groups) == 0 {
		return 0, nil
	}
	for _, g := range groups {
		info, err := g.AsMap()
		if err != nil {
			return 0, fmt.Errorf("read group of %s: %w", key, err)
		}
		nameMsg, deliveredMsg := info["name"], info["last-delivered-id"]
		name, _ := nameMsg.ToString()
		// Entries after last-delivered-id have not been read by the group.
		delivered, _ := deliveredMsg.ToString()
		if next := nextID(delivered); lessID(next, minID) {
			minID = next
		}
		pending, err := t.client.Do(ctx, t.client.B().Xpending().Key(key).Group(name).Build()).ToArray()
		if err != nil {
			return 0, fmt.Errorf("read pending of %s/%s: %w", key, name, err)
		}
		if len(pending) >= 2 {
			if oldest, err := pending[1].ToString(); err == nil && lessID(oldest, minID) {
				minID = oldest
			}
		}
	}
	n, err := t.client.Do(ctx, t.client.B().Xtrim().Key(key).Minid().Threshold(minID).Build()).AsInt64()
	if err != nil {
		return 0, fmt.Errorf("trim %s: %w", key, err)
	}
	return n, nil
}

// parseID splits a stream id "ms-seq".
func parseID(id string) (ms, seq uint64) {
	a, b, _ := strings.Cut(id, "-")
	ms, _ = strconv.ParseUint(a, 10, 64)
	seq, _ = strconv.ParseUint(b, 10, 64)
	return ms, seq
}

func lessID(a, b string) bool {
	am, as := parseID(a)
	bm, bs := parseID(b)
	return am < bm || am == bm && as < bs
}

// nextID is the smallest id after id.
func nextID(id string) string {
	ms, seq := parseID(id)
	return strconv.FormatUint(ms, 10) + "-" + strconv.FormatUint(seq+1, 10)
}
