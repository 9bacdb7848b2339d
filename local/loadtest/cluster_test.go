package loadtest

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/smtptest"
)

// The whole pipeline on a three-shard Redis Cluster, whose primary for the
// user stream dies in the middle of a load before its replica got the last
// writes; the replica takes over without them. Every committed event must
// be in the stream once, and every user must get exactly one email.
func TestEveryUserGetsOneEmailThroughAClusterFailover(t *testing.T) {
	t.Parallel()
	n := 1200
	if testing.Short() {
		n = 300
	}
	ctx := context.Background()
	c := redistest.StartCluster(t, 3, 1)
	client, prefix := c.Client(t)
	mail := smtptest.Start(t)
	p := &forgetfulPipeline{pipeline: startOn(t, mail.URL(), c.URL(), true, client, prefix, time.Hour), mail: mail}

	began := time.Now()
	var created map[string]bool
	done := make(chan struct{})
	go func() {
		defer close(done)
		created = p.signUp(t, n)
	}()
	xlen := func() int64 {
		l, _ := p.redis.Do(ctx, p.redis.B().Xlen().Key(p.stream).Build()).AsInt64()
		return l
	}
	// Waits report, rather than fail, while signUp's goroutine still
	// reports to t.
	wait := func(what string, cond func() bool) bool {
		for deadline := time.Now().Add(time.Minute); !cond(); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Errorf("timed out waiting until %s", what)
				return false
			}
		}
		return true
	}
	var cut, killed int64
	var failing time.Time
	if wait("a third of the users are in the stream", func() bool { return xlen() >= int64(n/3) }) {
		c.FailoverLosingWrites(p.stream, func() {
			cut = xlen()
			wait("the relay publishes more", func() bool { return xlen() >= cut+int64(n/20) })
			killed, failing = xlen(), time.Now()
		})
	}
	failedOver := time.Now()
	t.Logf("the primary of %s died %s into the load; its replica was cut off at %d entries, the primary killed at %d; failover took %s",
		p.stream, failing.Sub(began).Round(time.Millisecond), cut, killed, failedOver.Sub(failing).Round(time.Millisecond))
	<-done
	require.Len(t, created, n, "every signup is created")

	all := p.userIDs(t)
	if p.waitInStream(t, all, time.Minute) {
		t.Logf("every event in the stream %s after the failover", time.Since(failedOver).Round(time.Millisecond))
	}
	if p.settle(t, created, 2*time.Minute) {
		t.Logf("%d signups settled %s after the failover", n, time.Since(failedOver).Round(time.Millisecond))
	}
	p.check(t, created)
	s, err := p.readStream(ctx)
	require.NoError(t, err)
	assert.Equal(t, len(s.events), s.entries, "no event is in the stream twice")
}
