package main

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/functions/sendemail"
)

// Review finding: with a STREAM_PREFIX that carries its own hash tag
// ({outbox}:, which the README documents), the dead-letter stream of the
// current layout, stream.Sibling(name, "dead") = {outbox}:user:dead, is the
// very name of the legacy one, <stream>:dead. moveLegacyDead then moves the
// letters from the stream onto its own end forever: every dlq command and
// status spins until its context ends.
func TestReviewHashTaggedPrefixDeadLetters(t *testing.T) {
	t.Parallel()

	t.Run("dlq list answers with a hash-tagged prefix on one server", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		b.ops.prefix = "{" + b.ops.prefix + "}:"
		require.Equal(t, sendemail.LegacyDeadLetterStream(b.ops.userStream()), b.ops.deadStream(),
			"the two names coincide (precondition of the finding)")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for i := range 3 {
			require.NoError(t, b.ops.redis.Do(ctx, b.ops.redis.B().Xadd().Key(b.ops.deadStream()).Id("*").FieldValue().
				FieldValue("event_type", "user.created").FieldValue("n", fmt.Sprint(i)).
				FieldValue(sendemail.FieldDeadError, "boom").Build()).Error())
		}
		letters, err := b.ops.dlqList(ctx, 0)
		require.NoError(t, err, "dlq list must not spin moving the dead letters onto themselves")
		require.Len(t, letters, 3)
	})
}
