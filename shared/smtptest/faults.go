package smtptest

import (
	"bytes"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
)

// EndOfData names the stage of the server's reply to the end of the message
// data (the final dot), for [Server.Inject].
const EndOfData = "."

// Greeting names the stage of the server's first reply, for [Server.Inject].
const Greeting = "220"

// Fault is how the server misbehaves at one stage of a conversation. Faults
// act on plain-text conversations: after STARTTLS the server behaves.
type Fault struct {
	// Reply answers the command with this instead of handling it (at
	// EndOfData: the message is refused and not recorded).
	Reply *smtp.SMTPError
	// Drop closes the connection instead of answering. At EndOfData the
	// message has been accepted and recorded: the client just never hears.
	Drop bool
	// DropAfterReply answers normally, then closes the connection.
	DropAfterReply bool
	// Times limits the fault to the first Times conversations that reach
	// the stage; 0 means every one.
	Times int
}

// Inject makes the server misbehave at stage: a command verb ("EHLO",
// "MAIL", "RCPT", "DATA", "RSET", "QUIT", "AUTH", "STARTTLS", "NOOP"),
// Greeting or EndOfData. A later Inject for the same stage replaces it.
func (s *Server) Inject(stage string, f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults[strings.ToUpper(stage)] = &faultState{Fault: f}
}

// SetReplyDelay makes the server wait d before each reply.
func (s *Server) SetReplyDelay(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.delay = d
}

// Commands returns the verbs of the plain-text commands clients sent so
// far, in order (across connections). AUTH seen here went in clear text.
func (s *Server) Commands() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.commands...)
}

type faultState struct {
	Fault
	hits int
}

// fault returns the fault at stage if it still applies, counting the hit.
func (s *Server) fault(stage string) *Fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.faults[stage]
	if f == nil {
		return nil
	}
	f.hits++
	if f.Times > 0 && f.hits > f.Times {
		return nil
	}
	return &f.Fault
}

func (s *Server) replyDelay() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.delay
}

func formatReply(e *smtp.SMTPError) []byte {
	if e.EnhancedCode == (smtp.EnhancedCode{}) || e.EnhancedCode == smtp.NoEnhancedCode {
		return fmt.Appendf(nil, "%d %s\r\n", e.Code, e.Message)
	}
	return fmt.Appendf(nil, "%d %d.%d.%d %s\r\n", e.Code, e.EnhancedCode[0], e.EnhancedCode[1], e.EnhancedCode[2], e.Message)
}

// faultConn sits between the server and a client's connection. It reads
// the client's commands before go-smtp does, so that it can answer or drop
// in go-smtp's place, and delays or drops the server's replies. SMTP is
// lock-step (the client waits for each reply), which makes that possible.
type faultConn struct {
	net.Conn
	s *Server

	mu       sync.Mutex
	pending  []byte // client bytes read but not yet handed to go-smtp
	line     []byte // a command line being assembled
	inData   bool   // between DATA's 354 and the final dot
	tail     []byte // last bytes of the data, to spot the final dot
	awaitEnd bool   // the next server write answers the final dot
	endFault *Fault
	greeted  bool
	tls      bool // after STARTTLS: pass everything through
	closed   bool
}

func (c *faultConn) Read(p []byte) (int, error) {
	for {
		c.mu.Lock()
		if len(c.pending) > 0 {
			n := copy(p, c.pending)
			c.pending = c.pending[n:]
			c.mu.Unlock()
			return n, nil
		}
		passthrough := c.tls
		c.mu.Unlock()
		if passthrough {
			return c.Conn.Read(p)
		}
		buf := make([]byte, 4096)
		n, err := c.Conn.Read(buf)
		if n > 0 {
			if ferr := c.feed(buf[:n]); ferr != nil {
				return 0, ferr
			}
		}
		if err != nil {
			c.mu.Lock()
			left := len(c.pending)
			c.mu.Unlock()
			if left == 0 {
				return 0, err
			}
		}
	}
}

// feed sorts client bytes into commands (checked for faults) and data.
func (c *faultConn) feed(b []byte) error {
	for len(b) > 0 {
		c.mu.Lock()
		if c.tls {
			c.pending = append(c.pending, b...)
			c.mu.Unlock()
			return nil
		}
		if c.inData {
			i := bytes.Index(append(append([]byte(nil), c.tail...), b...), []byte("\r\n.\r\n"))
			if i < 0 {
				c.pending = append(c.pending, b...)
				all := append(c.tail, b...)
				if len(all) > 4 {
					all = all[len(all)-4:]
				}
				c.tail = append([]byte(nil), all...)
				c.mu.Unlock()
				return nil
			}
			end := i + 5 - len(c.tail)
			c.pending = append(c.pending, b[:end]...)
			b = b[end:]
			c.inData, c.tail, c.awaitEnd = false, nil, true
			c.mu.Unlock()
			f := c.s.fault(EndOfData)
			c.mu.Lock()
			c.endFault = f
			c.mu.Unlock()
			continue
		}
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			c.line = append(c.line, b...)
			c.mu.Unlock()
			return nil
		}
		line := append(c.line, b[:i+1]...)
		c.line, b = nil, b[i+1:]
		c.mu.Unlock()
		verb := strings.ToUpper(strings.TrimSpace(string(line)))
		if sp := strings.IndexByte(verb, ' '); sp >= 0 {
			verb = verb[:sp]
		}
		c.s.mu.Lock()
		c.s.commands = append(c.s.commands, verb)
		c.s.mu.Unlock()
		f := c.s.fault(verb)
		switch {
		case f != nil && f.Drop:
			c.drop()
			return net.ErrClosed
		case f != nil && f.Reply != nil:
			time.Sleep(c.s.replyDelay())
			if _, err := c.Conn.Write(formatReply(f.Reply)); err != nil {
				return err
			}
			if f.DropAfterReply {
				c.drop()
				return net.ErrClosed
			}
			continue
		}
		c.mu.Lock()
		c.pending = append(c.pending, line...)
		switch verb {
		case "DATA":
			c.inData = true
		case "STARTTLS":
			c.tls = true
		}
		c.mu.Unlock()
		if f != nil && f.DropAfterReply {
			c.s.mu.Lock()
			c.s.dropAfterNextReply[c] = true
			c.s.mu.Unlock()
		}
	}
	return nil
}

func (c *faultConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	if c.tls && c.greeted && !bytes.HasPrefix(p, []byte("220 ")) && !bytes.HasPrefix(p, []byte("220-")) {
		c.mu.Unlock()
		return c.Conn.Write(p)
	}
	first := !c.greeted
	c.greeted = true
	end := c.awaitEnd
	c.awaitEnd = false
	endFault := c.endFault
	c.endFault = nil
	c.mu.Unlock()

	time.Sleep(c.s.replyDelay())
	if first {
		if f := c.s.fault(Greeting); f != nil {
			if f.Reply != nil {
				_, _ = c.Conn.Write(formatReply(f.Reply))
			}
			c.drop()
			return 0, net.ErrClosed
		}
	}
	if end && endFault != nil && endFault.Drop {
		c.drop()
		return 0, net.ErrClosed
	}
	n, err := c.Conn.Write(p)
	c.s.mu.Lock()
	after := c.s.dropAfterNextReply[c]
	delete(c.s.dropAfterNextReply, c)
	c.s.mu.Unlock()
	if (end && endFault != nil && endFault.DropAfterReply) || after {
		c.drop()
	}
	return n, err
}

func (c *faultConn) drop() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	_ = c.Conn.Close()
}

// faultListener wraps each accepted connection in a faultConn.
type faultListener struct {
	net.Listener
	s *Server
}

func (l faultListener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &faultConn{Conn: conn, s: l.s}, nil
}

// endReply is the refusal the final dot gets instead of acceptance, if any.
func (c *faultConn) endReply() *smtp.SMTPError {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.endFault != nil && c.endFault.Reply != nil {
		return c.endFault.Reply
	}
	return nil
}
