package sendemail

import (
	"bytes"
	"context"
	"embed"
	"errors"
	"fmt"
	htmltemplate "html/template"
	"net/mail"
	"os"
	"path/filepath"
	"strings"
	texttemplate "text/template"
	"time"
	"unicode"

	gomail "github.com/wneessen/go-mail"
)

//go:embed templates
var templates embed.FS

// Recipient is what the welcome templates see.
type Recipient struct {
	UserID int64
	Email  string
	Name   string
}

// Mailer renders welcome emails.
type Mailer struct {
	from    string
	domain  string
	subject *texttemplate.Template
	text    *texttemplate.Template
	html    *htmltemplate.Template
}

// NewMailer parses the templates. from is the From address, subject a
// text/template.
func NewMailer(from, subject string) (*Mailer, error) {
	addr, err := mail.ParseAddress(from)
	if err != nil {
		return nil, fmt.Errorf("parse MAIL_FROM: %w", err)
	}
	_, domain, _ := strings.Cut(addr.Address, "@")
	subj, err := texttemplate.New("subject").Parse(subject)
	if err != nil {
		return nil, fmt.Errorf("parse subject template: %w", err)
	}
	text, err := texttemplate.ParseFS(templates, "templates/welcome.txt")
	if err != nil {
		return nil, fmt.Errorf("parse text template: %w", err)
	}
	html, err := htmltemplate.ParseFS(templates, "templates/welcome.html")
	if err != nil {
		return nil, fmt.Errorf("parse html template: %w", err)
	}
	return &Mailer{from: addr.String(), domain: domain, subject: subj, text: text, html: html}, nil
}

// maxNameRunes is createuser's limit on a name.
const maxNameRunes = 200

// errBadRecipient marks a recipient no email can be sent to.
var errBadRecipient = errors.New("bad recipient")

// Welcome renders the welcome email for r. The Message-ID is derived from
// eventID so that a receiving system can drop a duplicate too.
//
// Header injection is impossible by construction: the address must parse as
// one bare address without control characters, and the name, which only
// ever appears as an encoded display name and in the subject, has every
// control character replaced by a space, whatever route it took to the
// stream.
func (m *Mailer) Welcome(r Recipient, eventID string) (*gomail.Msg, error) {
	addr, err := mail.ParseAddress(r.Email)
	if err != nil || addr.Name != "" || addr.Address != r.Email || strings.ContainsFunc(r.Email, unicode.IsControl) {
		return nil, fmt.Errorf("%w: %q is not a single plain address", errBadRecipient, r.Email)
	}
	// Format characters (bidi overrides such as U+202E, zero-width ones)
	// go too: createuser refuses them, and an entry may not come from it.
	r.Name = strings.Join(strings.FieldsFunc(r.Name, func(c rune) bool {
		return unicode.IsControl(c) || unicode.IsSpace(c) || unicode.In(c, unicode.Zl, unicode.Zp, unicode.Cf)
	}), " ")
	// A header line may not exceed 998 characters (RFC 5322 §2.1.1); a name
	// longer than createuser allows is cut, so every encoded line fits.
	if rs := []rune(r.Name); len(rs) > maxNameRunes {
		r.Name = string(rs[:maxNameRunes])
	}

	var subject, text, html bytes.Buffer
	if err := m.subject.Execute(&subject, r); err != nil {
		return nil, fmt.Errorf("render subject: %w", err)
	}
	if err := m.text.ExecuteTemplate(&text, "welcome.txt", r); err != nil {
		return nil, fmt.Errorf("render text part: %w", err)
	}
	if err := m.html.ExecuteTemplate(&html, "welcome.html", r); err != nil {
		return nil, fmt.Errorf("render html part: %w", err)
	}

	msg := gomail.NewMsg()
	if err := msg.From(m.from); err != nil {
		return nil, fmt.Errorf("set From: %w", err)
	}
	to := (&mail.Address{Name: r.Name, Address: addr.Address}).String()
	if err := msg.To(to); err != nil {
		return nil, fmt.Errorf("%w: %v", errBadRecipient, err)
	}
	msg.Subject(strings.Map(func(c rune) rune {
		if unicode.IsControl(c) {
			return ' '
		}
		return c
	}, subject.String()))
	msg.SetMessageIDWithValue(eventID + "@" + m.domain)
	msg.SetDate()
	msg.SetBodyString(gomail.TypeTextPlain, text.String())
	msg.AddAlternativeString(gomail.TypeTextHTML, html.String())
	return msg, nil
}

// Sender delivers one rendered message. Errors that can never succeed for
// this message are wrapped in errPermanent; anything else is worth a retry.
type Sender interface {
	Send(ctx context.Context, msg *gomail.Msg) error
}

// errPermanent marks a delivery failure that retrying cannot fix, such as a
// 5xx answer to the recipient.
var errPermanent = errors.New("permanent delivery failure")

// errAmbiguous marks a send whose message data went out but whose answer
// never came (a timeout or a dropped connection while waiting for it): the
// server may have accepted the message. Retrying may send it twice.
var errAmbiguous = errors.New("no answer to the message data; the server may have accepted it")

// MailboxSender writes each message as an .eml file, for running locally
// without a mail server.
type MailboxSender struct {
	dir string
}

// NewMailboxSender creates dir if needed.
func NewMailboxSender(dir string) (*MailboxSender, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create mailbox %s: %w", dir, err)
	}
	return &MailboxSender{dir: dir}, nil
}

// Send writes msg to <dir>/<time>-<message id>.eml, atomically: a reader
// never sees half a message.
func (s *MailboxSender) Send(_ context.Context, msg *gomail.Msg) error {
	id := strings.Trim(strings.Join(msg.GetGenHeader(gomail.HeaderMessageID), ""), "<>")
	name := time.Now().UTC().Format("20060102T150405.000000000") + "-" + strings.ReplaceAll(id, "/", "_") + ".eml"
	tmp, err := os.CreateTemp(s.dir, ".tmp-*")
	if err != nil {
		return fmt.Errorf("write to mailbox: %w", err)
	}
	defer os.Remove(tmp.Name()) //nolint:errcheck // gone after the rename
	if _, err := msg.WriteTo(tmp); err != nil {
		tmp.Close() //nolint:errcheck // the write error matters more
		return fmt.Errorf("write to mailbox: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write to mailbox: %w", err)
	}
	if err := os.Rename(tmp.Name(), filepath.Join(s.dir, name)); err != nil {
		return fmt.Errorf("write to mailbox: %w", err)
	}
	return nil
}
