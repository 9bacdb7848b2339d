package config_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/functions/relay"
	"github.com/outboxfn/outbox/functions/sendemail"
	"github.com/outboxfn/outbox/shared/config"
	"github.com/outboxfn/outbox/shared/serve"
)

func TestLoad(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		spec any
		want string // substring of the error; empty for success
	}{
		{"accepts the defaults", nil, &relay.Config{}, ""},
		{"names a variable that does not parse", map[string]string{"RELAY_BATCH_SIZE": "lots"}, &relay.Config{}, "RELAY_BATCH_SIZE"},
		{"names a variable out of range", map[string]string{"RELAY_BATCH_SIZE": "0"}, &relay.Config{}, "RELAY_BATCH_SIZE"},
		{"names a bad duration", map[string]string{"RELAY_POLL_INTERVAL": "5"}, &relay.Config{}, "RELAY_POLL_INTERVAL"},
		{"names a bad log level", map[string]string{"LOG_LEVEL": "loud"}, &serve.Config{}, "LOG_LEVEL"},
		{"names a bad port", map[string]string{"PORT": "http-ish"}, &serve.Config{}, "PORT"},
		{"rejects a lease longer than the claim time", map[string]string{"SENDEMAIL_LEASE": "2m"}, &sendemail.Config{}, "SENDEMAIL_LEASE"},
		{"rejects an SMTP URL of another scheme", map[string]string{"SMTP_URL": "http://mail"}, &sendemail.Config{}, "SMTP_URL"},
		{"rejects a subject that is not a template", map[string]string{"MAIL_SUBJECT": "{{.Name"}, &sendemail.Config{}, "MAIL_SUBJECT"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			err := config.Load(tt.spec)
			if tt.want == "" {
				require.NoError(t, err)
				return
			}
			require.Error(t, err)
			require.Contains(t, err.Error(), tt.want)
		})
	}
}

func TestMarkdownListsEveryVariableWithItsDefault(t *testing.T) {
	var b strings.Builder
	require.NoError(t, config.Markdown(&b, &relay.Config{}))
	require.Contains(t, b.String(), "| `RELAY_BATCH_SIZE` | Integer | `1000` |")
	require.Contains(t, b.String(), "| `TRIGGER_TOKEN` | String |  |")
}
