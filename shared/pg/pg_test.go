package pg_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/pg"
	"github.com/outboxfn/outbox/shared/pgtest"
)

func TestIsUnavailable(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"a deadline", fmt.Errorf("insert: %w", context.DeadlineExceeded), true},
		{"an admin shutdown", &pgconn.PgError{Code: "57P01"}, true},
		{"too many connections", &pgconn.PgError{Code: "53300"}, true},
		{"a serialization failure", &pgconn.PgError{Code: "40001"}, true},
		{"a unique violation", &pgconn.PgError{Code: "23505"}, false},
		{"a syntax error", &pgconn.PgError{Code: "42601"}, false},
		{"an unrelated error", errors.New("boom"), false},
		{"no error", nil, false},
	}
	for _, tt := range tests {
		require.Equal(t, tt.want, pg.IsUnavailable(tt.err), tt.name)
	}
}

func TestIsUniqueViolationChecksTheConstraint(t *testing.T) {
	err := fmt.Errorf("insert: %w", &pgconn.PgError{Code: "23505", ConstraintName: "users_email_lower_key"})
	require.True(t, pg.IsUniqueViolation(err, "users_email_lower_key"))
	require.True(t, pg.IsUniqueViolation(err, ""))
	require.False(t, pg.IsUniqueViolation(err, "other_key"))
	require.False(t, pg.IsUniqueViolation(errors.New("x"), ""))
}

// tcpURL is the test server's URL with params added; the keepalive settings
// read 0 over a unix socket, so the test needs TCP.
func tcpURL(t *testing.T, params ...string) string {
	t.Helper()
	u, err := url.Parse(pgtest.AdminURL())
	require.NoError(t, err)
	if u.Query().Get("host") != "" || u.Hostname() == "" {
		t.Skip("DATABASE_URL is not a TCP address")
	}
	q := u.Query()
	for i := 0; i+1 < len(params); i += 2 {
		q.Set(params[i], params[i+1])
	}
	// pgx does not read "+" as a space, as Encode writes it.
	u.RawQuery = strings.ReplaceAll(q.Encode(), "+", "%20")
	return u.String()
}

// serverSettings returns, for each of the settings this package may send,
// its value in the session and where the value came from.
func serverSettings(t *testing.T, q interface {
	Query(context.Context, string, ...any) (pgx.Rows, error)
}) map[string]string {
	t.Helper()
	rows, err := q.Query(context.Background(), `SELECT name, setting || ' (' || source || ')' FROM pg_settings
		WHERE name IN ('tcp_keepalives_idle', 'tcp_keepalives_interval', 'tcp_keepalives_count', 'tcp_user_timeout',
		               'idle_in_transaction_session_timeout', 'client_connection_check_interval')`)
	require.NoError(t, err)
	got := map[string]string{}
	var name, value string
	_, err = pgx.ForEachRow(rows, []any{&name, &value}, func() error {
		got[name] = value
		return nil
	})
	require.NoError(t, err)
	return got
}

func TestNewPoolSendsServerSettingsUnlessTheURLDoes(t *testing.T) {
	t.Parallel()
	keepalives := map[string]string{
		"tcp_keepalives_idle":     "10 (client)",
		"tcp_keepalives_interval": "5 (client)",
		"tcp_keepalives_count":    "3 (client)",
		"tcp_user_timeout":        "25000 (client)",
	}
	with := func(m map[string]string, kv ...string) map[string]string {
		out := map[string]string{}
		for k, v := range m {
			out[k] = v
		}
		for i := 0; i+1 < len(kv); i += 2 {
			out[kv[i]] = kv[i+1]
		}
		return out
	}
	tests := []struct {
		name   string
		params []string
		pc     pg.PoolConfig
		want   map[string]string
	}{
		{
			name: "a direct pool gets the keepalives and the timeouts it asks for",
			pc:   pg.PoolConfig{Direct: true, IdleInTransactionTimeout: 10 * time.Second, ClientCheckInterval: 2 * time.Second},
			want: with(keepalives,
				"idle_in_transaction_session_timeout", "10000 (client)",
				"client_connection_check_interval", "2000 (client)"),
		},
		{
			name:   "a setting in the URL's options wins",
			params: []string{"options", "-c tcp_keepalives_idle=30 --idle-in-transaction-session-timeout=7000"},
			pc:     pg.PoolConfig{Direct: true, IdleInTransactionTimeout: 10 * time.Second},
			want: with(keepalives,
				"tcp_keepalives_idle", "30 (client)",
				"idle_in_transaction_session_timeout", "7000 (client)"),
		},
		{
			name:   "a setting given as a URL parameter wins",
			params: []string{"tcp_keepalives_count", "7"},
			pc:     pg.PoolConfig{Direct: true},
			want:   with(keepalives, "tcp_keepalives_count", "7 (client)"),
		},
		{
			name: "a pool that may go through a pooler sends nothing a pooler would refuse",
			pc:   pg.PoolConfig{},
			want: map[string]string{},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			pool, err := pg.NewPool(context.Background(), tcpURL(t, tt.params...), tt.pc)
			require.NoError(t, err)
			defer pool.Close()
			got := serverSettings(t, pool)
			for name, value := range got {
				if want, ok := tt.want[name]; ok {
					require.Equal(t, want, value, name)
				} else {
					require.NotContains(t, value, "(client)", "%s was sent though not asked for", name)
				}
			}
		})
	}
}

func TestConnectSendsTheServerKeepalives(t *testing.T) {
	t.Parallel()
	conn, err := pg.Connect(context.Background(), tcpURL(t), time.Second)
	require.NoError(t, err)
	defer conn.Close(context.Background())
	got := serverSettings(t, conn)
	require.Equal(t, "10 (client)", got["tcp_keepalives_idle"])
	require.Equal(t, "5 (client)", got["tcp_keepalives_interval"])
	require.Equal(t, "3 (client)", got["tcp_keepalives_count"])
	require.Equal(t, "25000 (client)", got["tcp_user_timeout"])
}

func TestConnectionsKeepTheirClientSocketAlive(t *testing.T) {
	t.Parallel()
	if runtime.GOOS != "linux" {
		t.Skip("reads Linux socket options")
	}
	ctx := context.Background()
	pool, err := pg.NewPool(ctx, tcpURL(t), pg.PoolConfig{})
	require.NoError(t, err)
	defer pool.Close()
	pooled, err := pool.Acquire(ctx)
	require.NoError(t, err)
	defer pooled.Release()
	direct, err := pg.Connect(ctx, tcpURL(t), time.Second)
	require.NoError(t, err)
	defer direct.Close(ctx)

	for name, conn := range map[string]*pgx.Conn{"a pooled connection": pooled.Conn(), "a direct connection": direct} {
		tcp, ok := conn.PgConn().Conn().(*net.TCPConn)
		require.True(t, ok, "%s is not TCP but %T", name, conn.PgConn().Conn())
		raw, err := tcp.SyscallConn()
		require.NoError(t, err)
		// SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL and TCP_KEEPCNT on Linux.
		got := map[string]int{}
		var sockErr error
		require.NoError(t, raw.Control(func(fd uintptr) {
			for opt, level := range map[string][2]int{
				"keepalive": {syscall.SOL_SOCKET, 0x9}, "idle": {syscall.IPPROTO_TCP, 4},
				"interval": {syscall.IPPROTO_TCP, 5}, "count": {syscall.IPPROTO_TCP, 6},
			} {
				v, err := syscall.GetsockoptInt(int(fd), level[0], level[1])
				sockErr = errors.Join(sockErr, err)
				got[opt] = v
			}
		}))
		require.NoError(t, sockErr)
		require.Equal(t, map[string]int{"keepalive": 1, "idle": 10, "interval": 5, "count": 3}, got, name)
	}
}
