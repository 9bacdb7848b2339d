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

// An older sendemail keeps dead-lettering to <stream>:dead while outboxctl
// (of this version) moves those letters to {<stream>}:dead: every letter
// must arrive once, none lost between a move and the DEL of the emptied
// stream.
func TestReviewMovingLegacyDeadLettersRacesAnOlderSendemail(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	legacy := sendemail.LegacyDeadLetterStream(b.ops.userStream())
	const letters = 600
	done := make(chan error, 1)
	go func() {
		for i := range letters {
			if err := b.ops.redis.Do(ctx, b.ops.redis.B().Xadd().Key(legacy).Id("*").FieldValue().
				FieldValue("event_type", "user.created").FieldValue("n", fmt.Sprint(i)).
				FieldValue(sendemail.FieldDeadError, "old").Build()).Error(); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	for writing := true; writing; {
		select {
		case err := <-done:
			require.NoError(t, err)
			writing = false
		default:
		}
		_, err := b.ops.dlqList(ctx, 1)
		require.NoError(t, err)
	}
	all, err := b.ops.dlqList(ctx, 0)
	require.NoError(t, err)
	seen := map[string]bool{}
	for _, l := range all {
		require.False(t, seen[l.Fields["n"]], "letter %s twice", l.Fields["n"])
		seen[l.Fields["n"]] = true
	}
	require.Len(t, seen, letters)
}
