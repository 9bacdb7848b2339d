// Package smtptest runs a real SMTP server (emersion/go-smtp) inside a test
// or benchmark process. It records every message it accepts and can be told
// to refuse recipients or messages, so tests exercise the product's real
// SMTP client against real protocol answers.
package smtptest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/mail"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// Message is one accepted message.
type Message struct {
	From string
	To   []string
	// Raw is the message as received, headers and body.
	Raw []byte
	// Header is Raw's header, parsed.
	Header mail.Header
	// Body is Raw's body, undecoded.
	Body []byte
	// At is when the server accepted the message.
	At time.Time
}

// Server is a running SMTP server.
type Server struct {
	srv *smtp.Server
	ln  net.Listener

	mu       sync.Mutex
	messages []Message
	attempts int
	changed  chan struct{}
	// rcpt, if set, answers each RCPT TO; a non-nil error refuses it.
	rcpt func(to string) error
	// data, if set, answers each DATA with the attempt number (1-based).
	data func(attempt int) error
}

// Start starts a server on a free loopback port, closed when t ends.
func Start(t testing.TB) *Server {
	t.Helper()
	s, err := Listen()
	if err != nil {
		t.Fatalf("smtptest: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}

// Listen starts a server on a free loopback port; Close stops it.
func Listen() (*Server, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	s := &Server{ln: ln, changed: make(chan struct{})}
	s.srv = smtp.NewServer(backend{s})
	s.srv.Domain = "localhost"
	s.srv.ReadTimeout = 10 * time.Second
	s.srv.WriteTimeout = 10 * time.Second
	s.srv.MaxMessageBytes = 1 << 20
	go s.srv.Serve(ln) //nolint:errcheck // ends with Close
	return s, nil
}

// Close stops the server.
func (s *Server) Close() { _ = s.srv.Close() }

// URL is the server's address as an SMTP_URL (plain text, no TLS).
func (s *Server) URL() string { return "smtp://" + s.ln.Addr().String() + "?tls=none" }

// RefuseRecipients makes RCPT TO fail with err for addresses where refuse
// returns true.
func (s *Server) RefuseRecipients(refuse func(to string) bool, err *smtp.SMTPError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rcpt = func(to string) error {
		if refuse(to) {
			return err
		}
		return nil
	}
}

// FailData makes DATA fail with err for the first n attempts.
func (s *Server) FailData(n int, err *smtp.SMTPError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.data = func(attempt int) error {
		if attempt <= n {
			return err
		}
		return nil
	}
}

// TempFailure is a 451, a transient refusal.
var TempFailure = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try again later"}

// NoSuchUser is a 550 for a recipient, a permanent refusal.
var NoSuchUser = &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}

// Messages returns the accepted messages so far.
func (s *Server) Messages() []Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Message(nil), s.messages...)
}

// Count returns how many messages were accepted.
func (s *Server) Count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.messages)
}

// WaitFor waits until at least n messages arrived, or fails t after timeout.
func (s *Server) WaitFor(t testing.TB, n int, timeout time.Duration) []Message {
	t.Helper()
	deadline := time.After(timeout)
	for {
		s.mu.Lock()
		got, changed := len(s.messages), s.changed
		s.mu.Unlock()
		if got >= n {
			return s.Messages()
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("smtptest: %d of %d messages after %s", got, n, timeout)
		}
	}
}

type backend struct{ s *Server }

func (b backend) NewSession(*smtp.Conn) (smtp.Session, error) { return &session{s: b.s}, nil }

type session struct {
	s    *Server
	from string
	to   []string
}

func (ss *session) Reset()        { ss.from, ss.to = "", nil }
func (ss *session) Logout() error { return nil }

func (ss *session) Mail(from string, _ *smtp.MailOptions) error {
	ss.from = from
	return nil
}

func (ss *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	ss.s.mu.Lock()
	rcpt := ss.s.rcpt
	ss.s.mu.Unlock()
	if rcpt != nil {
		if err := rcpt(to); err != nil {
			return err
		}
	}
	ss.to = append(ss.to, to)
	return nil
}

func (ss *session) Data(r io.Reader) error {
	raw, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	ss.s.mu.Lock()
	defer ss.s.mu.Unlock()
	ss.s.attempts++
	if ss.s.data != nil {
		if err := ss.s.data(ss.s.attempts); err != nil {
			return err
		}
	}
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		return errors.New("unparseable message")
	}
	body, _ := io.ReadAll(msg.Body)
	ss.s.messages = append(ss.s.messages, Message{From: ss.from, To: ss.to, Raw: raw, Header: msg.Header, Body: body, At: time.Now()})
	close(ss.s.changed)
	ss.s.changed = make(chan struct{})
	return nil
}
