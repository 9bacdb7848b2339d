package sendemail

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/smtptest"
)

func TestAConnectionCarriesTheNextMessage(t *testing.T) {
	t.Parallel()
	closing := &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "closing the connection"}
	for _, tc := range []struct {
		name  string
		stage string
		fault smtptest.Fault
		// sent is the second send's answer; accepted and ehlo are the
		// messages the server recorded and the connections it greeted.
		sent           func(*testing.T, error)
		accepted, ehlo int
	}{
		{"when the server keeps it open", "", smtptest.Fault{},
			func(t *testing.T, err error) { require.NoError(t, err) }, 2, 1},
		{"on a new connection when the server closed the kept one", "MAIL", smtptest.Fault{Drop: true, Times: 1},
			func(t *testing.T, err error) { require.NoError(t, err) }, 2, 2},
		{"on a new connection when the server answers 421 on the kept one", "MAIL", smtptest.Fault{Reply: closing, Times: 1},
			func(t *testing.T, err error) { require.NoError(t, err) }, 2, 2},
		{"nowhere when the server refuses it for now on the kept one", "MAIL", smtptest.Fault{Reply: smtptest.TempFailure, Times: 1},
			func(t *testing.T, err error) { require.ErrorContains(t, err, "451") }, 1, 1},
		{"nowhere else when the answer to its data never came on the kept one", smtptest.EndOfData, smtptest.Fault{Drop: true, Times: 1},
			func(t *testing.T, err error) { require.ErrorIs(t, err, errAmbiguous) }, 2, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := smtptest.Start(t)
			sender, err := NewSMTPSender(srv.URL(), 5*time.Second, 5*time.Second)
			require.NoError(t, err)
			t.Cleanup(func() { _ = sender.Close() })
			m, err := NewMailer("Example <welcome@example.com>", "Hi")
			require.NoError(t, err)
			send := func(to string) error {
				msg, err := m.Welcome(Recipient{UserID: 1, Email: to, Name: "U"}, uuid.NewString())
				require.NoError(t, err)
				return sender.Send(context.Background(), msg)
			}
			require.NoError(t, send("first@example.com"))
			if tc.stage != "" {
				srv.Inject(tc.stage, tc.fault)
			}
			tc.sent(t, send("second@example.com"))
			msgs := srv.Messages()
			require.Len(t, msgs, tc.accepted)
			for i, m := range msgs {
				require.Equal(t, []string{[]string{"first@example.com", "second@example.com"}[i]}, m.To, "each message to its own recipient")
			}
			ehlo := 0
			for _, c := range srv.Commands() {
				if c == "EHLO" {
					ehlo++
				}
			}
			require.Equal(t, tc.ehlo, ehlo, "connections opened: %v", srv.Commands())
		})
	}
}

func TestAClaimTakenWithItsBatchIsRenewedWhenItNoLongerCoversASend(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	// A conversation may last 2 × 600 ms + 100 ms, the lease 1.4 s: a
	// claim taken ahead is used for the sends that start within 50 ms (it
	// must leave the mark half of the 100 ms a fresh claim leaves).
	// Sixteen messages one at a time (4 delayed replies each on a kept
	// connection, 11 on a new one) take 1.8 s.
	b.smtp.SetReplyDelay(25 * time.Millisecond)
	var mu sync.Mutex
	var stale []string
	b.smtp.OnAccept(func(m smtptest.Message) {
		mu.Lock()
		defer mu.Unlock()
		var held bool
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT lease_until > clock_timestamp() FROM email_sends WHERE key = $1`,
			"welcome:"+strings.TrimSuffix(m.To[0][1:], "@example.com")).Scan(&held))
		if !held {
			stale = append(stale, m.To[0])
		}
	})
	s := b.service(t, func(c *Config) {
		c.BatchSize, c.Concurrency, c.SMTPTimeout, c.SMTPDataTimeout, c.Lease = 16, 1, 600*time.Millisecond, 100*time.Millisecond, 1400*time.Millisecond
	})
	require.NoError(t, s.cfg.Validate())
	for i := range 16 {
		b.add(t, int64(i+1), fmt.Sprintf("u%d@example.com", i+1), "U")
	}
	start := time.Now()
	require.Equal(t, Stats{Sent: 16}, pass(t, s))
	require.Greater(t, time.Since(start), s.cfg.Lease, "the batch outlasts the lease")
	mu.Lock()
	require.Empty(t, stale, "accepted while the claim was held")
	mu.Unlock()
	require.Equal(t, 16, b.smtp.Count())
	var renewed bool
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT bool_and(attempts = 1) FROM email_sends`).Scan(&renewed))
	require.True(t, renewed, "a renewal is not another claim")
}

func TestClaimsOfSendsNotStartedAreReleasedAtShutdown(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.smtp.SetReplyDelay(200 * time.Millisecond)
	s := b.service(t, func(c *Config) { c.BatchSize, c.Concurrency, c.ShutdownTimeout = 8, 1, 2*time.Second })
	require.NoError(t, s.consumer.EnsureGroup(context.Background()))
	for i := range 8 {
		b.add(t, int64(i+1), fmt.Sprintf("u%d@example.com", i+1), "U")
	}
	require.NoError(t, s.Start(context.Background()))
	b.smtp.WaitFor(t, 1, 10*time.Second)
	s.Stop()
	sent := b.smtp.Count()
	require.Less(t, sent, 8)
	b.smtp.SetReplyDelay(0)
	time.Sleep(20 * time.Millisecond)
	next := b.service(t, func(c *Config) { c.ClaimIdle = 10 * time.Millisecond })
	stats := pass(t, next)
	require.EqualValues(t, 8-sent, stats.Sent, "the rest go out at once, not after the 30 s lease: %+v", stats)
	got := map[string]int{}
	for _, m := range b.smtp.Messages() {
		got[m.To[0]]++
	}
	require.Len(t, got, 8)
	require.False(t, slices.ContainsFunc(b.smtp.Messages(), func(m smtptest.Message) bool { return got[m.To[0]] > 1 }), "one email each")
}
