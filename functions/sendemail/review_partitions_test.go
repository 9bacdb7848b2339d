package sendemail

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/smtptest"
	"github.com/outboxfn/outbox/shared/stream"
)

// REVIEW (hostile): the README says a partition whose sends hang "holds
// back none of the others". The partitions share one bound of
// 2 x SENDEMAIL_CONCURRENCY unmarked sends, and a hanging SMTP conversation
// holds its slot; each partition may hold SENDEMAIL_CONCURRENCY of them, so
// two hanging partitions take the whole bound and every other partition
// waits for SMTP_TIMEOUT.
func TestReviewTwoHangingPartitionsHoldBackNoOther(t *testing.T) {
	t.Parallel()
	b := setup(t)
	stuck := map[int]bool{3: true, 4: true}
	release := make(chan struct{})
	var hanging atomic.Int32
	b.smtp.RefuseRecipients(func(to string) bool {
		var u int64
		if _, err := fmt.Sscanf(strings.TrimSuffix(to, "@example.com"), "u%d", &u); err != nil {
			return false
		}
		if !stuck[stream.Partition(fmt.Sprint(u), partitions)] {
			return false
		}
		hanging.Add(1)
		defer hanging.Add(-1)
		select {
		case <-release:
		case <-time.After(time.Minute):
		}
		return true
	}, smtptest.TempFailure)
	const concurrency = 2
	s := b.service(t, withPartitions, func(c *Config) { c.SendAttempts = 1; c.Concurrency = concurrency })
	t.Cleanup(func() { close(release) })
	require.NoError(t, s.Start(context.Background()))
	for u := int64(1); u <= 120; u++ {
		if stuck[stream.Partition(fmt.Sprint(u), partitions)] {
			b.addToPartition(t, u)
		}
	}
	waitUntil(t, 10*time.Second, "both stuck partitions' sends hang", func() bool { return hanging.Load() >= 2*concurrency })
	others := 0
	for u := int64(1); u <= 120; u++ {
		if !stuck[stream.Partition(fmt.Sprint(u), partitions)] {
			b.addToPartition(t, u)
			others++
		}
	}
	start := time.Now()
	msgs := b.smtp.WaitFor(t, others, 30*time.Second)
	require.Len(t, recipients(msgs), others)
	// SMTP_TIMEOUT is 5 s here: the other partitions' emails must not have
	// waited for the hung conversations to time out.
	require.Less(t, time.Since(start), 3*time.Second, "the other partitions' emails waited for the hung ones to time out")
}
