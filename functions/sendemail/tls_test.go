package sendemail

import (
	"context"
	"net/url"
	"slices"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"
	gomail "github.com/wneessen/go-mail"

	"github.com/outboxfn/outbox/shared/smtptest"
)

// TLS that cannot be downgraded (issue 15, finding 1).

func welcomeMsg(t *testing.T) *gomail.Msg {
	t.Helper()
	m, err := NewMailer("Example <welcome@example.com>", "Hi")
	require.NoError(t, err)
	msg, err := m.Welcome(Recipient{UserID: 1, Email: "ada@example.com", Name: "Ada"}, uuid.NewString())
	require.NoError(t, err)
	return msg
}

func sendTo(t *testing.T, rawURL string, srv *smtptest.Server) error {
	t.Helper()
	sender, err := NewSMTPSender(rawURL, 5*time.Second, 5*time.Second)
	require.NoError(t, err)
	if roots := srv.RootCAs(); roots != nil {
		sender.tlsConfig.RootCAs = roots
	}
	return sender.Send(context.Background(), welcomeMsg(t))
}

func TestTLSCannotBeDowngraded(t *testing.T) {
	t.Parallel()

	t.Run("sends nothing to a server that does not offer STARTTLS unless the URL says tls=none", func(t *testing.T) {
		t.Parallel()
		srv := smtptest.Start(t)
		require.ErrorContains(t, sendTo(t, "smtp://"+srv.Addr(), srv), "STARTTLS")
		require.Zero(t, srv.Count())
		require.NotContains(t, srv.Commands(), "MAIL")
		require.NoError(t, sendTo(t, "smtp://"+srv.Addr()+"?tls=none", srv))
		require.Equal(t, 1, srv.Count())
	})

	t.Run("never sends credentials in clear text, even when the server offers AUTH", func(t *testing.T) {
		t.Parallel()
		srv := smtptest.Start(t, smtptest.WithAuth())
		require.Error(t, sendTo(t, "smtp://user:secret@"+srv.Addr(), srv))
		require.Zero(t, srv.Count())
		require.NotContains(t, srv.Commands(), "AUTH")
	})

	t.Run("authenticates and sends over STARTTLS", func(t *testing.T) {
		t.Parallel()
		srv := smtptest.Start(t, smtptest.WithStartTLS(), smtptest.WithAuth())
		require.NoError(t, sendTo(t, "smtp://user:secret@"+srv.Addr(), srv))
		msgs := srv.Messages()
		require.Len(t, msgs, 1)
		require.True(t, msgs[0].TLS)
		require.Equal(t, "user", msgs[0].AuthUser)
		require.False(t, slices.Contains(srv.Commands(), "AUTH"), "AUTH went inside TLS")
	})

	t.Run("refuses a certificate it cannot verify", func(t *testing.T) {
		t.Parallel()
		srv := smtptest.Start(t, smtptest.WithStartTLS())
		sender, err := NewSMTPSender("smtp://"+srv.Addr(), 5*time.Second, 5*time.Second)
		require.NoError(t, err)
		require.Error(t, sender.Send(context.Background(), welcomeMsg(t)))
		require.Zero(t, srv.Count())
	})
}

func TestSMTPURLIsCheckedAtStartUp(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, url, want string
	}{
		{"refuses an unknown tls value", "smtp://mail.example.com:587?tls=require", "tls="},
		{"refuses tls=none with credentials", "smtp://u:p@mail.example.com:587?tls=none", "clear text"},
		{"refuses an unknown parameter", "smtp://mail.example.com:587?tsl=none", "unknown parameter"},
		{"refuses another scheme", "http://mail.example.com", "SMTP_URL"},
		{"accepts STARTTLS by default", "smtp://u:p@mail.example.com:587", ""},
		{"accepts tls=none without credentials", "smtp://127.0.0.1:1025?tls=none", ""},
		{"accepts smtps", "smtps://u:p@mail.example.com", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := &testBundle{url: "postgres://x", prefix: "p:", smtp: smtptest.Start(t)}
			cfg := b.config(func(c *Config) { c.SMTPURL, c.SMTPDataTimeout, c.Lease = tc.url, time.Minute, time.Hour })
			err := cfg.Validate()
			if tc.want == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.want)
			require.ErrorContains(t, err, "SMTP_URL", "the error names the variable")
			_, perr := url.Parse(tc.url)
			require.NoError(t, perr)
		})
	}
}
