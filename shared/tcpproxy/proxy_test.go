package tcpproxy

import (
	"bufio"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// echo starts a server that writes back every line it reads, closed with t.
func echo(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() {
				defer c.Close()
				io.Copy(c, c) //nolint:errcheck // ends when either side closes
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

type client struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func dial(t *testing.T, addr string) *client {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return &client{t: t, conn: conn, r: bufio.NewReader(conn)}
}

func (c *client) send(line string) {
	c.t.Helper()
	_, err := c.conn.Write([]byte(line + "\n"))
	require.NoError(c.t, err)
}

// recv reads a line, waiting at most wait.
func (c *client) recv(wait time.Duration) (string, error) {
	c.conn.SetReadDeadline(time.Now().Add(wait)) //nolint:errcheck
	line, err := c.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	return line[:len(line)-1], nil
}

func (c *client) requireEcho(line string) {
	c.t.Helper()
	c.send(line)
	got, err := c.recv(2 * time.Second)
	require.NoError(c.t, err)
	require.Equal(c.t, line, got)
}

// requireSilent checks that nothing arrives for a while and that the
// connection is still open: the read times out, it does not end.
func (c *client) requireSilent() {
	c.t.Helper()
	got, err := c.recv(300 * time.Millisecond)
	require.ErrorIs(c.t, err, os.ErrDeadlineExceeded, "read %q", got)
}

func TestProxy(t *testing.T) {
	t.Parallel()

	t.Run("forwards bytes both ways", func(t *testing.T) {
		t.Parallel()
		p := Start(t, echo(t))
		c := dial(t, p.Addr())
		c.requireEcho("hello")
		c.requireEcho("again")
		require.Equal(t, 1, p.Conns())
	})

	t.Run("holds bytes while frozen, keeps the connection, and delivers them after a thaw", func(t *testing.T) {
		t.Parallel()
		p := Start(t, echo(t))
		c := dial(t, p.Addr())
		c.requireEcho("before")
		p.Freeze()
		c.send("during")
		c.requireSilent()
		c.requireSilent()
		require.Equal(t, 1, p.Conns(), "the connection stays open")
		p.Thaw()
		got, err := c.recv(2 * time.Second)
		require.NoError(t, err)
		require.Equal(t, "during", got, "the bytes held while frozen arrive")
		c.requireEcho("after")
	})

	t.Run("accepts connections while frozen but forwards nothing on them until a thaw", func(t *testing.T) {
		t.Parallel()
		p := Start(t, echo(t))
		p.Freeze()
		c := dial(t, p.Addr())
		c.send("hello")
		c.requireSilent()
		p.Thaw()
		got, err := c.recv(2 * time.Second)
		require.NoError(t, err)
		require.Equal(t, "hello", got)
	})

	t.Run("does not pass on a close while frozen", func(t *testing.T) {
		t.Parallel()
		p := Start(t, echo(t))
		c := dial(t, p.Addr())
		c.requireEcho("one")
		p.Freeze()
		require.NoError(t, c.conn.Close())
		time.Sleep(300 * time.Millisecond)
		require.Equal(t, 1, p.Conns(), "the server's side stays open while frozen")
		p.Thaw()
		require.Eventually(t, func() bool { return p.Conns() == 0 }, 2*time.Second, 5*time.Millisecond,
			"the close reaches the server after the thaw")
	})

	t.Run("closes every connection on a cut and accepts new ones", func(t *testing.T) {
		t.Parallel()
		p := Start(t, echo(t))
		c1, c2 := dial(t, p.Addr()), dial(t, p.Addr())
		c1.requireEcho("one")
		c2.requireEcho("two")
		p.Cut()
		for _, c := range []*client{c1, c2} {
			_, err := c.recv(2 * time.Second)
			require.Error(t, err)
			require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the connection ends, it does not just go quiet: %v", err)
		}
		c3 := dial(t, p.Addr())
		c3.requireEcho("three")
	})

	t.Run("ends a frozen connection on a cut", func(t *testing.T) {
		t.Parallel()
		p := Start(t, echo(t))
		c := dial(t, p.Addr())
		c.requireEcho("one")
		p.Freeze()
		c.send("held")
		c.requireSilent()
		p.Cut()
		_, err := c.recv(2 * time.Second)
		require.Error(t, err)
		require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "%v", err)
		require.Eventually(t, func() bool { return p.Conns() == 0 }, 2*time.Second, 5*time.Millisecond)
	})
}

func TestURLPointsAtTheProxy(t *testing.T) {
	t.Parallel()
	p := Start(t, echo(t))
	tests := []struct{ in, want string }{
		{"postgres://app:s3cret@db.internal:5432/outbox?sslmode=disable", "postgres://app:s3cret@" + p.Addr() + "/outbox?sslmode=disable"},
		{"postgres://postgres@127.0.0.1/postgres", "postgres://postgres@" + p.Addr() + "/postgres"},
		{"redis://:pw@127.0.0.1:6379/0", "redis://:pw@" + p.Addr() + "/0"},
	}
	for _, tt := range tests {
		require.Equal(t, tt.want, p.URL(tt.in))
	}
}
