package sendemail

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestWelcomeReadsWellWithAndWithoutAName(t *testing.T) {
	t.Parallel()
	defaultSubject := "Welcome{{with .Name}}, {{.}}{{end}}!"
	tests := []struct {
		name        string
		recipient   Recipient
		wantSubject string
		wantGreet   string
	}{
		{"a named user is greeted by name", Recipient{UserID: 1, Email: "ada@example.com", Name: "Ada"}, "Welcome, Ada!", "Hello Ada,"},
		{"a user whose name createuser left out is greeted without a gap", Recipient{UserID: 2, Email: "bob@example.com"}, "Welcome!", "Hello,"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			m, err := NewMailer("Example <welcome@example.com>", defaultSubject)
			require.NoError(t, err)
			msg, err := m.Welcome(tt.recipient, "4bf92f35-77b3-4da6-a3ce-929d0e0e4736")
			require.NoError(t, err)
			require.Equal(t, []string{tt.wantSubject}, msg.GetGenHeader("Subject"))
			var raw bytes.Buffer
			_, err = msg.WriteTo(&raw)
			require.NoError(t, err)
			require.Contains(t, raw.String(), tt.wantGreet)
		})
	}
}
