package loadtest

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/smtptest"
	"github.com/outboxfn/outbox/shared/stream"
)

// The whole pipeline with STREAM_PARTITIONS=6 on a three-shard Redis
// Cluster: createuser, a relay spreading the user events over six streams
// by user id, and two sendemail instances reading every partition. Every
// user gets exactly one email, and each event sits in its user's partition.
func TestEveryUserGetsOneEmailThroughSixPartitions(t *testing.T) {
	t.Parallel()
	const partitions, n = 6, 300
	c := redistest.StartCluster(t, 3, 0)
	client, prefix := c.Client(t)
	mail := smtptest.Start(t)
	p := startPartitioned(t, mail.URL(), c.URL(), true, client, prefix, time.Hour, partitions)

	created := p.signUp(t, n)
	require.Len(t, created, n)
	mail.WaitFor(t, n, time.Minute)
	ctx := context.Background()
	deadline := time.Now().Add(30 * time.Second)
	for {
		settled := true
		for _, key := range stream.Names(prefix, "user", partitions) {
			groups, err := client.Do(ctx, client.B().XinfoGroups().Key(key).Build()).ToArray()
			if err != nil || len(groups) != 1 {
				settled = false
				break
			}
			g, err := groups[0].AsMap()
			require.NoError(t, err)
			pendingMsg, lagMsg := g["pending"], g["lag"]
			pending, _ := pendingMsg.AsInt64()
			lag, lagErr := lagMsg.AsInt64()
			settled = settled && pending == 0 && lagErr == nil && lag == 0
		}
		if settled {
			break
		}
		require.False(t, time.Now().After(deadline), "every partition is read and acknowledged")
		time.Sleep(50 * time.Millisecond)
	}

	byRecipient := messagesByRecipient(mail)
	for email := range created {
		require.Len(t, byRecipient[strings.ToLower(email)], 1, "%s gets exactly one email", email)
	}
	require.Len(t, byRecipient, n, "nobody else gets an email")
	total, used := 0, 0
	for part, key := range stream.Names(prefix, "user", partitions) {
		entries, err := client.Do(ctx, client.B().Xrange().Key(key).Start("-").End("+").Build()).AsXRange()
		require.NoError(t, err)
		for _, e := range entries {
			require.Equal(t, part, stream.Partition(e.FieldValues[stream.FieldAggregateID], partitions), "the event is in its user's partition")
		}
		total += len(entries)
		if len(entries) > 0 {
			used++
		}
	}
	require.Equal(t, n, total, "every event once")
	require.Equal(t, partitions, used, "300 users spread over every partition")
}
