package logging_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/pg"
	"github.com/outboxfn/outbox/shared/stream"
)

const password = "hunter2-s3cret"

func TestRedact(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, in, want string }{
		{"a URL's password", "dial redis://:" + password + "@10.0.0.3:6379/0 failed", "dial redis://:xxxxx@10.0.0.3:6379/0 failed"},
		{"a user and password", "smtp://mailer:" + password + "@smtp.example.com:587", "smtp://mailer:xxxxx@smtp.example.com:587"},
		{"a password holding @ and /", `parse "postgres://u:p@ss/w` + password + `@db/outbox": bad`, `parse "postgres://u:xxxxx@db/outbox": bad`},
		{"a key=value password", "host=/cloudsql/x user=app password=" + password + " dbname=outbox", "host=/cloudsql/x user=app password=xxxxx dbname=outbox"},
		{"a quoted key=value password", "password='" + password + " x' dbname=outbox", "password=xxxxx dbname=outbox"},
		{"a password in a query", "smtp://host:587?tls=required&password=" + password + "&x=1", "smtp://host:587?tls=required&password=xxxxx&x=1"},
		{"a URL without a password", "redis://10.0.0.3:6379/0", "redis://10.0.0.3:6379/0"},
	} {
		t.Run("redacts "+tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, logging.Redact(tc.in))
		})
	}
}

// TestLoggerNeverWritesAPassword feeds the logger the errors that malformed
// REDIS_URL, DATABASE_URL and SMTP_URL values really produce, each with a
// password in it.
func TestLoggerNeverWritesAPassword(t *testing.T) {
	t.Parallel()
	_, redisErr := stream.NewClient("redis://:"+password+"@10.0.0.3:port/0", false)
	require.Error(t, redisErr)
	_, redisEscapeErr := stream.NewClient("redis://:"+password+"%zz@10.0.0.3:6379/0", false)
	require.Error(t, redisEscapeErr)
	_, pgErr := pg.NewPool(context.Background(), "postgres://app:"+password+"%zz@db/outbox", pg.PoolConfig{})
	require.Error(t, pgErr)
	_, pgPortErr := pg.NewPool(context.Background(), "postgres://app:"+password+"@db:port/outbox", pg.PoolConfig{})
	require.Error(t, pgPortErr)
	// sendemail parses SMTP_URL with url.Parse.
	_, smtpErr := url.Parse(fmt.Sprintf("smtp://mailer:%s@smtp.example.com:port", password))
	require.Error(t, smtpErr)
	smtpErr = fmt.Errorf("parse SMTP_URL: %w", smtpErr)
	require.Contains(t, smtpErr.Error(), password, "the raw error holds the password")
	for _, err := range []error{redisErr, redisEscapeErr} {
		require.NotContains(t, err.Error(), password, "stream.NewClient repeats no part of a URL it cannot parse")
	}

	for _, format := range []string{"json", "text"} {
		t.Run("in "+format, func(t *testing.T) {
			var buf bytes.Buffer
			logger := logging.New(&buf, logging.Config{LogFormat: format, LogLevel: "debug"})
			for _, err := range []error{redisErr, redisEscapeErr, pgErr, pgPortErr, smtpErr} {
				logger.Error("server stopped", slog.Any("error", err))
				logger.Error("build failed: "+err.Error(), "url", "redis://:"+password+"@h:1/0",
					slog.Group("cfg", slog.String("smtp", "smtp://u:"+password+"@h")))
				logger.With("error", errors.Unwrap(err)).Warn("again")
			}
			require.NotContains(t, buf.String(), password)
			require.NotContains(t, buf.String(), password[:6])
			require.Contains(t, buf.String(), logging.Redacted)
		})
	}
}

func TestRedactionKeepsTheSeverity(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	logging.New(&buf, logging.Config{LogFormat: "json", LogLevel: "info"}).Warn("w")
	require.Contains(t, buf.String(), `"severity":"WARNING"`)
}
