package sendemail

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/textproto"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	gomail "github.com/wneessen/go-mail"
	"github.com/wneessen/go-mail/smtp"
)

// SMTPSender sends over SMTP with go-mail's protocol client driven step by
// step, so that this file decides the three things that matter for sending
// once:
//
//   - The message is sent once the server answered 250 to its data.
//     Whatever fails after that (QUIT, the connection) changes nothing.
//   - Only a failure while waiting for that answer is ambiguous
//     ([errAmbiguous]); that wait gets SMTP_DATA_TIMEOUT (RFC 5321 §4.5.3.2.6
//     asks for 10 minutes).
//   - The whole conversation is bounded: every step but that wait shares one
//     SMTP_TIMEOUT; see [SMTPSender.Limit]. QUIT, on a connection that is
//     not kept, is said in the background within another SMTP_TIMEOUT:
//     the send (and so its mark) never waits for it.
//
// A connection whose last message got its 250 is kept for the next message
// (RFC 5321 §3.3: after a transaction ends the session is ready for the
// next MAIL), so that a message costs four exchanges, not eight and a TCP
// handshake. A kept connection that fails before the message data went out
// (the server closed it while it was idle, or answers 421) is replaced by a
// new one within the same conversation: nothing was sent on it.
//
// TLS cannot be downgraded: without tls=none in the URL, a server that does
// not offer STARTTLS gets nothing, and credentials never travel in clear.
type SMTPSender struct {
	addr        string
	host        string
	implicitTLS bool
	plain       bool // tls=none
	user, pass  string
	timeout     time.Duration
	dataTimeout time.Duration
	tlsConfig   *tls.Config

	mu   sync.Mutex
	idle []*smtpConn // most recently used last
	// quitting holds the connections saying goodbye in the background,
	// each with a channel closed once it is closed.
	quitting map[*smtpConn]chan struct{}
	// closed is set by Close: no connection is kept after it, and a
	// goodbye gets no later than closeBy.
	closed  bool
	closeBy time.Time
}

// smtpConn is a session ready for MAIL.
type smtpConn struct {
	conn     net.Conn // the TCP connection, which carries the deadlines
	client   *smtp.Client
	messages int
	idleFrom time.Time
}

const (
	// keepIdle is how long a connection is kept unused: well inside the
	// 5 minutes RFC 5321 §4.5.3.2.7 asks a server to wait for a command,
	// and short enough not to hold a server's slots long after a burst.
	keepIdle = 30 * time.Second
	// keepMessages is how many messages one connection carries before it
	// is closed: servers limit it, and answer 421 or 452 past their limit.
	keepMessages = 100
	// keepConns bounds the connections kept idle.
	keepConns = 64
)

// ParseSMTPURL checks an SMTP_URL: smtp://[user:pass@]host[:port][?tls=none|required]
// or smtps://[user:pass@]host[:port]. tls=required is the default; tls=none
// turns TLS off and is refused together with credentials.
func ParseSMTPURL(rawURL string) (*url.URL, error) {
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "smtp" && u.Scheme != "smtps") || u.Hostname() == "" {
		return nil, errors.New("SMTP_URL must look like smtp://user:pass@host:587 or smtps://user:pass@host:465")
	}
	for k := range u.Query() {
		if k != "tls" {
			return nil, fmt.Errorf("SMTP_URL: unknown parameter %q (only tls=none or tls=required)", k)
		}
	}
	switch mode := u.Query().Get("tls"); {
	case !u.Query().Has("tls"), mode == "required":
	case mode == "none" && u.Scheme == "smtps":
		return nil, errors.New("SMTP_URL: smtps:// is TLS from the start; tls=none contradicts it")
	case mode == "none" && u.User != nil:
		return nil, errors.New("SMTP_URL: tls=none with credentials would send them in clear text; remove one")
	case mode == "none":
	default:
		return nil, fmt.Errorf("SMTP_URL: tls=%q is not a known value (tls=none, or tls=required, the default)", mode)
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("SMTP_URL: port %q is not a port", p)
		}
	}
	return u, nil
}

// NewSMTPSender reads an SMTP_URL (see [ParseSMTPURL]). timeout bounds the
// conversation up to the end of the message data, dataTimeout the wait for
// the answer to it.
func NewSMTPSender(rawURL string, timeout, dataTimeout time.Duration) (*SMTPSender, error) {
	u, err := ParseSMTPURL(rawURL)
	if err != nil {
		return nil, err
	}
	s := &SMTPSender{
		host: u.Hostname(), implicitTLS: u.Scheme == "smtps", plain: u.Query().Get("tls") == "none",
		timeout: timeout, dataTimeout: dataTimeout,
		tlsConfig: &tls.Config{ServerName: u.Hostname(), MinVersion: tls.VersionTLS12},
	}
	port := u.Port()
	if port == "" {
		port = "587"
		if s.implicitTLS {
			port = "465"
		}
	}
	s.addr = net.JoinHostPort(s.host, port)
	if u.User != nil {
		s.user = u.User.Username()
		s.pass, _ = u.User.Password()
	}
	return s, nil
}

// Limit is the longest one conversation can last: SMTP_TIMEOUT up to the
// end of the data, SMTP_DATA_TIMEOUT for the answer, and SMTP_TIMEOUT
// more, which QUIT once took before Send returned (it no longer does; the
// margin is kept, so that the settings Validate accepts do not change).
func (s *SMTPSender) Limit() time.Duration { return SendLimit(s.timeout, s.dataTimeout) }

// SendLimit is [SMTPSender.Limit] for these settings.
func SendLimit(timeout, dataTimeout time.Duration) time.Duration {
	return 2*timeout + dataTimeout
}

// Send has one conversation about msg. nil means the server answered 250
// to the data. ctx ending cuts the conversation at once.
func (s *SMTPSender) Send(ctx context.Context, msg *gomail.Msg) error {
	from, err := msg.GetSender(false)
	if err != nil {
		return fmt.Errorf("%w: sender: %v", errPermanent, err)
	}
	rcpts, err := msg.GetRecipients()
	if err != nil {
		return fmt.Errorf("%w: recipients: %v", errPermanent, err)
	}
	stepsBy := time.Now().Add(s.timeout)
	if sc := s.take(); sc != nil {
		err, fresh := s.transact(ctx, sc, stepsBy, msg, from, rcpts)
		if !fresh {
			return err
		}
		// The kept connection failed before the data went out.
	}
	sc, err := s.dial(ctx, stepsBy)
	if err != nil {
		return err
	}
	err, _ = s.transact(ctx, sc, stepsBy, msg, from, rcpts)
	return err
}

// take returns a kept connection, or nil.
func (s *SMTPSender) take() *smtpConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.idle) > 0 {
		sc := s.idle[len(s.idle)-1]
		s.idle = s.idle[:len(s.idle)-1]
		if time.Since(sc.idleFrom) < keepIdle {
			return sc
		}
		_ = sc.conn.Close()
	}
	return nil
}

// keep puts a connection whose last message got its 250 back for the next
// message, or says goodbye to it (in the background: the message is sent,
// and its mark must not wait for a courtesy). Once Close was called no
// connection is kept: nothing would ever close it.
func (s *SMTPSender) keep(sc *smtpConn) {
	sc.messages++
	sc.idleFrom = time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		// Close has returned or is waiting for others: nothing would
		// wait for a goodbye started now.
		_ = sc.conn.Close()
		return
	}
	if sc.messages < keepMessages && len(s.idle) < keepConns {
		s.idle = append(s.idle, sc)
		return
	}
	s.goodbye(sc, time.Now().Add(s.timeout))
}

// goodbye sends QUIT on sc and closes it in the background, by by (by
// closeBy once Close was called). s.mu is held.
func (s *SMTPSender) goodbye(sc *smtpConn, by time.Time) {
	if s.closed && s.closeBy.Before(by) {
		by = s.closeBy
	}
	// Set here, under s.mu, so that Close's earlier deadline cannot be
	// overwritten by a later one.
	_ = sc.conn.SetDeadline(by)
	if s.quitting == nil {
		s.quitting = make(map[*smtpConn]chan struct{})
	}
	done := make(chan struct{})
	s.quitting[sc] = done
	go func() {
		defer close(done)
		_ = sc.client.Quit()
		_ = sc.conn.Close()
		s.mu.Lock()
		delete(s.quitting, sc)
		s.mu.Unlock()
	}()
}

// Close says goodbye to the kept connections and to those already saying
// it, within a second in all. A send under way when Close is called does
// not keep its connection.
func (s *SMTPSender) Close() error {
	s.mu.Lock()
	s.closed = true
	s.closeBy = time.Now().Add(time.Second)
	for sc := range s.quitting {
		_ = sc.conn.SetDeadline(s.closeBy)
	}
	for _, sc := range s.idle {
		s.goodbye(sc, s.closeBy)
	}
	s.idle = nil
	waits := make([]chan struct{}, 0, len(s.quitting))
	for _, done := range s.quitting {
		waits = append(waits, done)
	}
	s.mu.Unlock()
	for _, done := range waits {
		<-done
	}
	return nil
}

// dial opens a session up to the point of MAIL: connect, TLS, EHLO, AUTH,
// all by stepsBy.
func (s *SMTPSender) dial(ctx context.Context, stepsBy time.Time) (*smtpConn, error) {
	dialer := net.Dialer{Deadline: stepsBy}
	conn, err := dialer.DialContext(ctx, "tcp", s.addr)
	if err != nil {
		return nil, fmt.Errorf("smtp connect %s: %w", s.addr, err)
	}
	ok := false
	defer func() {
		if !ok {
			_ = conn.Close()
		}
	}()
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := setDeadline(ctx, conn, stepsBy); err != nil {
		return nil, err
	}
	var c net.Conn = conn
	if s.implicitTLS {
		tc := tls.Client(conn, s.tlsConfig)
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, fmt.Errorf("smtp tls handshake: %w", err)
		}
		c = tc
	}
	client, err := smtp.NewClient(c, s.host)
	if err != nil {
		return nil, classify("greeting", err)
	}
	if err := client.Hello("localhost"); err != nil {
		return nil, classify("EHLO", err)
	}
	if !s.implicitTLS && !s.plain {
		if ok, _ := client.Extension("STARTTLS"); !ok {
			// A man in the middle strips STARTTLS: send nothing.
			return nil, errors.New("smtp: the server does not offer STARTTLS and SMTP_URL does not say tls=none; nothing was sent")
		}
		if err := client.StartTLS(s.tlsConfig); err != nil {
			return nil, classify("STARTTLS", err)
		}
	}
	if s.user != "" {
		if err := client.Auth(s.auth(client)); err != nil {
			return nil, classify("AUTH", err)
		}
	}
	ok = true
	return &smtpConn{conn: conn, client: client}, nil
}

// transact sends msg on sc, whose session is ready for MAIL, and keeps sc
// for the next message if the server answered 250 to the data; otherwise sc
// is closed. retry is true when sc was a kept one that failed before any of
// the message went out (a broken connection, or 421: the server closes
// it), so that a new connection may carry the message instead.
func (s *SMTPSender) transact(ctx context.Context, sc *smtpConn, stepsBy time.Time, msg *gomail.Msg, from string, rcpts []string) (err error, retry bool) {
	kept := sc.messages > 0
	accepted := false
	stop := context.AfterFunc(ctx, func() { _ = sc.conn.SetDeadline(time.Unix(1, 0)) })
	defer func() {
		// A connection whose cut may have fired is never kept, nor told
		// goodbye: its deadline is in the past.
		if stop() && accepted && ctx.Err() == nil {
			s.keep(sc)
			return
		}
		_ = sc.conn.Close()
	}()
	before := func(step string, err error, classify func(string, error) error) (error, bool) {
		var tpErr *textproto.Error
		if kept && (!errors.As(err, &tpErr) || tpErr.Code == 421) && ctx.Err() == nil && time.Now().Before(stepsBy) {
			return fmt.Errorf("smtp %s on a kept connection: %w", step, err), true
		}
		return classify(step, err), false
	}
	if err := setDeadline(ctx, sc.conn, stepsBy); err != nil {
		return err, false
	}
	if err := sc.client.Mail(from); err != nil {
		return before("MAIL FROM", err, classify)
	}
	for _, r := range rcpts {
		if err := sc.client.Rcpt(r); err != nil {
			return before("RCPT TO", err, permanentIf5xx)
		}
	}
	w, err := sc.client.Data()
	if err != nil {
		return before("DATA", err, permanentIf5xx)
	}
	if _, err := msg.WriteTo(w); err != nil {
		// The final dot never went out: the server discards what it got.
		return fmt.Errorf("smtp write data: %w", err), false
	}
	if err := setDeadline(ctx, sc.conn, time.Now().Add(s.dataTimeout)); err != nil {
		return err, false
	}
	if err := w.Close(); err != nil {
		var tpErr *textproto.Error
		if errors.As(err, &tpErr) {
			return permanentIf5xx("end of data", err), false
		}
		return fmt.Errorf("%w: %v", errAmbiguous, err), false
	}
	accepted = true
	return nil, false
}

// setDeadline sets every deadline of conn (TLS passes them down), unless
// ctx was cancelled before it replaced the cut.
func setDeadline(ctx context.Context, conn net.Conn, t time.Time) error {
	if err := conn.SetDeadline(t); err != nil {
		return fmt.Errorf("smtp: %w", err)
	}
	if ctx.Err() != nil {
		_ = conn.SetDeadline(time.Unix(1, 0))
	}
	return nil
}

// auth picks PLAIN (the connection is encrypted: Send never gets here
// otherwise), or CRAM-MD5 or LOGIN when PLAIN is not offered.
func (s *SMTPSender) auth(client *smtp.Client) smtp.Auth {
	_, mechs := client.Extension("AUTH")
	offered := strings.Fields(strings.ToUpper(mechs))
	has := func(m string) bool {
		for _, o := range offered {
			if o == m {
				return true
			}
		}
		return false
	}
	switch {
	case has("PLAIN"):
		return smtp.PlainAuth("", s.user, s.pass, s.host, false)
	case has("CRAM-MD5"):
		return smtp.CRAMMD5Auth(s.user, s.pass)
	default:
		return smtp.LoginAuth(s.user, s.pass, s.host, false)
	}
}

// classify wraps an error of a step before the recipient: never permanent
// for the message (a 5xx there is our configuration; retrying after it is
// fixed must work).
func classify(step string, err error) error {
	return fmt.Errorf("smtp %s: %w", step, err)
}

// permanentIf5xx makes a 5xx answer about the recipient or the message
// permanent; anything else can be retried.
func permanentIf5xx(step string, err error) error {
	var tpErr *textproto.Error
	if errors.As(err, &tpErr) && tpErr.Code >= 500 {
		return fmt.Errorf("%w: smtp %s: %v", errPermanent, step, err)
	}
	return fmt.Errorf("smtp %s: %w", step, err)
}
