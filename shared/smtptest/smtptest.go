// Package smtptest runs a real SMTP server (emersion/go-smtp) inside a test
// or benchmark process. It records every message it accepts and misbehaves
// on command (see [Server.Inject]): slow replies, 4xx/5xx at any stage, the
// connection dropped before or after the reply to the message, on QUIT or
// RSET; with [WithStartTLS] it offers STARTTLS (a self-signed certificate,
// trusted through [Server.RootCAs]) and with [WithAuth] it asks for AUTH.
// Tests exercise the product's real SMTP client against real protocol
// answers.
package smtptest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/mail"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
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
	// TLS says whether the message came over TLS.
	TLS bool
	// AuthUser is the user the client authenticated as, or empty.
	AuthUser string
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

	onAccept           func(Message)
	faults             map[string]*faultState
	delay              time.Duration
	commands           []string
	dropAfterNextReply map[*faultConn]bool
	roots              *x509.CertPool
	auth               bool
}

// Option configures a server at start.
type Option func(*Server, *smtp.Server) error

// WithStartTLS makes the server offer STARTTLS with a self-signed
// certificate for 127.0.0.1 and localhost; clients trust it through
// RootCAs.
func WithStartTLS() Option {
	return func(s *Server, srv *smtp.Server) error {
		cert, roots, err := selfSigned()
		if err != nil {
			return err
		}
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		s.roots = roots
		return nil
	}
}

// WithAuth makes the server offer AUTH PLAIN and CRAM-MD5, in clear text
// too (as a careless or hostile server would), accepting any credentials.
func WithAuth() Option {
	return func(s *Server, srv *smtp.Server) error {
		s.auth = true
		srv.AllowInsecureAuth = true
		return nil
	}
}

// RootCAs trusts the server's certificate (WithStartTLS).
func (s *Server) RootCAs() *x509.CertPool { return s.roots }

// Start starts a server on a free loopback port, closed when t ends.
func Start(t testing.TB, opts ...Option) *Server {
	t.Helper()
	s, err := Listen(opts...)
	if err != nil {
		t.Fatalf("smtptest: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}

// Listen starts a server on a free loopback port; Close stops it.
func Listen(opts ...Option) (*Server, error) {
	s := &Server{changed: make(chan struct{}), faults: map[string]*faultState{}, dropAfterNextReply: map[*faultConn]bool{}}
	s.srv = smtp.NewServer(backend{s})
	s.srv.Domain = "localhost"
	s.srv.ReadTimeout = 10 * time.Second
	s.srv.WriteTimeout = 10 * time.Second
	s.srv.MaxMessageBytes = 1 << 20
	for _, o := range opts {
		if err := o(s, s.srv); err != nil {
			return nil, err
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	s.ln = ln
	go s.srv.Serve(faultListener{Listener: ln, s: s}) //nolint:errcheck // ends with Close
	return s, nil
}

// selfSigned makes a certificate for 127.0.0.1 and localhost and a pool
// that trusts it.
func selfSigned() (tls.Certificate, *x509.CertPool, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("generate key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "smtptest"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, DNSNames: []string{"localhost"},
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA: true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("create certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("parse certificate: %w", err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, roots, nil
}

// Close stops the server.
func (s *Server) Close() {
	_ = s.srv.Close()
	// Serve may not have registered the listener with srv yet.
	_ = s.ln.Close()
}

// URL is the server's address as an SMTP_URL (plain text, no TLS).
func (s *Server) URL() string { return "smtp://" + s.ln.Addr().String() + "?tls=none" }

// Addr is the server's host:port.
func (s *Server) Addr() string { return s.ln.Addr().String() }

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

// OnAccept calls f with each message the server accepts, before it
// answers: the moment to break something else, such as the database.
func (s *Server) OnAccept(f func(Message)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onAccept = f
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

func (b backend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	ss := &session{s: b.s, c: c}
	ss.fc, _ = c.Conn().(*faultConn)
	if b.s.auth {
		return &authSession{ss}, nil
	}
	return ss, nil
}

type session struct {
	s    *Server
	c    *smtp.Conn
	fc   *faultConn
	from string
	to   []string
	user string
}

// authSession is a session that offers AUTH.
type authSession struct{ *session }

func (as *authSession) AuthMechanisms() []string { return []string{sasl.Plain, "CRAM-MD5"} }

func (as *authSession) Auth(mech string) (sasl.Server, error) {
	if mech == "CRAM-MD5" {
		return &cramServer{ss: as.session}, nil
	}
	return sasl.NewPlainServer(func(_, user, _ string) error {
		as.user = user
		return nil
	}), nil
}

// cramServer accepts any CRAM-MD5 response and records the user it names.
type cramServer struct {
	ss   *session
	sent bool
}

func (c *cramServer) Next(response []byte) ([]byte, bool, error) {
	if !c.sent {
		c.sent = true
		return []byte("<1.1@localhost>"), false, nil
	}
	user, _, _ := bytes.Cut(response, []byte(" "))
	c.ss.user = string(user)
	return nil, true, nil
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
	if ss.fc != nil {
		if refuse := ss.fc.endReply(); refuse != nil {
			return refuse
		}
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
	m := Message{From: ss.from, To: ss.to, Raw: raw, Header: msg.Header, Body: body, At: time.Now(), TLS: isTLS(ss.c), AuthUser: ss.user}
	ss.s.messages = append(ss.s.messages, m)
	close(ss.s.changed)
	ss.s.changed = make(chan struct{})
	if f := ss.s.onAccept; f != nil {
		ss.s.mu.Unlock()
		f(m)
		ss.s.mu.Lock()
	}
	return nil
}

func isTLS(c *smtp.Conn) bool {
	_, ok := c.TLSConnectionState()
	return ok
}
