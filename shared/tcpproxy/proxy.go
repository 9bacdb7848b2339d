// Package tcpproxy is a loopback TCP proxy for fault tests: put it between
// a client and PostgreSQL or Redis, then make the network between them go
// silent (Freeze) or break (Cut).
package tcpproxy

import (
	"errors"
	"net"
	"net/url"
	"sync"
	"testing"
)

// Proxy forwards every connection made to Addr to the target, both ways.
type Proxy struct {
	t        testing.TB
	target   string
	listener net.Listener

	mu     sync.Mutex
	links  map[*link]struct{}
	thawed chan struct{} // closed while bytes flow; open while frozen
	closed bool
	wg     sync.WaitGroup
}

// link is one proxied connection: the client's side and the target's.
type link struct {
	client, target net.Conn
	once           sync.Once
	done           chan struct{}
}

func (l *link) close() {
	l.once.Do(func() {
		close(l.done)
		l.client.Close()
		l.target.Close()
	})
}

// Start listens on 127.0.0.1 and forwards to target (host:port) until t ends.
func Start(t testing.TB, target string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("tcpproxy: listen: %v", err)
	}
	thawed := make(chan struct{})
	close(thawed)
	p := &Proxy{t: t, target: target, listener: ln, links: map[*link]struct{}{}, thawed: thawed}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

// Addr is the proxy's host:port.
func (p *Proxy) Addr() string { return p.listener.Addr().String() }

// URL returns u (a postgres:// or redis:// URL) with its host and port
// replaced by the proxy's.
func (p *Proxy) URL(u string) string {
	p.t.Helper()
	parsed, err := url.Parse(u)
	if err != nil || parsed.Host == "" {
		p.t.Fatalf("tcpproxy: %q is not a URL with a host", u)
	}
	parsed.Host = p.Addr()
	return parsed.String()
}

// Freeze stops forwarding, both ways, on every connection, present and
// future, while keeping each open: a network gone silent. Bytes sent
// meanwhile wait in the proxy and the kernels' buffers, and a side that
// closes its connection is not heard by the other until Thaw. The proxy's
// kernel still acknowledges every segment and answers keepalive probes, so
// TCP keepalive cannot tell a frozen proxy from a quiet peer; only
// deadlines and idle timeouts can. A write already under way when Freeze
// is called may still complete.
func (p *Proxy) Freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.thawed:
		p.thawed = make(chan struct{})
	default: // already frozen
	}
}

// Thaw resumes forwarding, starting with the bytes held while frozen.
func (p *Proxy) Thaw() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.thawed:
	default:
		close(p.thawed)
	}
}

// Cut closes every connection, as a network that resets them; new
// connections are still accepted.
func (p *Proxy) Cut() {
	p.mu.Lock()
	links := make([]*link, 0, len(p.links))
	for l := range p.links {
		links = append(links, l)
	}
	p.mu.Unlock()
	for _, l := range links {
		l.close()
	}
}

// Conns is the number of connections open through the proxy.
func (p *Proxy) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.links)
}

func (p *Proxy) close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.listener.Close()
	p.Cut()
	p.wg.Wait()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.listener.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				p.t.Logf("tcpproxy: accept: %v", err)
			}
			return
		}
		target, err := net.Dial("tcp", p.target)
		if err != nil {
			// To the client, as it would be without the proxy: refused.
			client.Close()
			continue
		}
		l := &link{client: client, target: target, done: make(chan struct{})}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			l.close()
			return
		}
		p.links[l] = struct{}{}
		p.wg.Add(1)
		p.mu.Unlock()
		go p.serve(l)
	}
}

// serve forwards both ways until either side ends or the link is cut.
func (p *Proxy) serve(l *link) {
	defer p.wg.Done()
	var up sync.WaitGroup
	up.Go(func() { p.pump(l, l.target, l.client) })
	p.pump(l, l.client, l.target)
	up.Wait()
	p.mu.Lock()
	delete(p.links, l)
	p.mu.Unlock()
}

// pump copies src to dst, holding whatever it read while the proxy is
// frozen. When src ends, the whole link is closed (a half-closed connection
// is not a fault these tests need), but not while frozen: the other side
// learns of the close only when the network is back, as it would from a FIN
// lost in a partition.
func (p *Proxy) pump(l *link, dst, src net.Conn) {
	defer l.close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if !p.wait(l) {
			return
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// wait blocks while the proxy is frozen; it reports false if the link was
// closed meanwhile.
func (p *Proxy) wait(l *link) bool {
	p.mu.Lock()
	thawed := p.thawed
	p.mu.Unlock()
	select {
	case <-thawed:
		return true
	case <-l.done:
		return false
	}
}
