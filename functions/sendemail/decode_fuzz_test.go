package sendemail

import (
	"strings"
	"testing"

	"github.com/google/uuid"
)

// FuzzDecode feeds arbitrary stream entries through what sendemail does
// with one before any network: decode it, render the welcome email. It must
// never panic; an entry it accepts has a send key for a positive user id, a
// canonical event id, and renders an email without a header line over 998
// characters or a control character in the display name. `go test` runs
// the seeds; `go test -fuzz FuzzDecode` explores.
func FuzzDecode(f *testing.F) {
	good := `{"user_id":1,"email":"ada@example.com","name":"Ada"}`
	id := "0b6c2f1e-4a43-4f7e-9f0e-2b1a6c8d9e10"
	for _, seed := range []struct{ eventID, eventType, payload, occurredAt string }{
		{id, "user.created", good, "2026-11-23T01:16:04.486341Z"},
		{"urn:uuid:" + id, "user.created", good, ""},
		{"{" + id + "}", "user.created", good, ""},
		{"not-a-uuid", "user.created", good, ""},
		{id, "user.renamed", good, ""},
		{id, "user.created", `{"user_id":0,"email":"a@b.c"}`, ""},
		{id, "user.created", `{"user_id":-1}`, ""},
		{id, "user.created", `{"user_id":1,"email":"a@b.c, d@e.f","name":"X"}`, ""},
		{id, "user.created", `{"user_id":1,"email":"eve@example.com","name":"Eve\r\nBcc: spy@evil.example"}`, ""},
		{id, "user.created", `{"user_id":1,"email":"eve@example.com","name":"\u202egpj.exe"}`, ""},
		{id, "user.created", `{"user_id":9223372036854775807,"email":"x@example.com","name":"` + strings.Repeat("a", 1200) + `"}`, ""},
		{id, "user.created", `not json`, ""},
		{id, "user.created", `{}`, "yesterday"},
		{"", "", "", ""},
	} {
		f.Add(seed.eventID, seed.eventType, seed.payload, seed.occurredAt)
	}
	mailer, err := NewMailer("Example <welcome@example.com>", "Welcome, {{.Name}}!")
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, eventID, eventType, payload, occurredAt string) {
		fields := map[string]string{"event_id": eventID, "event_type": eventType, "payload": payload}
		if occurredAt != "" {
			fields["occurred_at"] = occurredAt
		}
		key, canonical, r, skip, err := Decode("1-0", fields)
		if err != nil || skip {
			return
		}
		if !strings.HasPrefix(key, "welcome:") || r.UserID <= 0 {
			t.Fatalf("accepted key %q for user %d", key, r.UserID)
		}
		if u, err := uuid.Parse(canonical); err != nil || u.String() != canonical {
			t.Fatalf("event id %q is not canonical", canonical)
		}
		msg, err := mailer.Welcome(r, canonical)
		if err != nil {
			return
		}
		var raw strings.Builder
		if _, err := msg.WriteTo(&raw); err != nil {
			t.Fatalf("render: %v", err)
		}
		head, _, _ := strings.Cut(raw.String(), "\r\n\r\n")
		for _, line := range strings.Split(head, "\r\n") {
			if len(line) > 998 {
				t.Fatalf("header line of %d bytes", len(line))
			}
		}
	})
}
