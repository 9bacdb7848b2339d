package main

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/rueidis"

	"github.com/outboxfn/outbox/shared/pg"
	"github.com/outboxfn/outbox/shared/smtptest"
	"github.com/outboxfn/outbox/shared/tcpproxy"
)

// Timeouts the functions run with: short, so that whatever a fault leaves
// behind (an entry pending on a dead consumer, an ambiguous send waiting
// for its lease) is retried within a scenario.
const (
	smtpTimeout     = 3 * time.Second
	smtpDataTimeout = 3 * time.Second
	// sendLease must exceed 2 × smtpTimeout + smtpDataTimeout (9 s).
	sendLease     = 12 * time.Second
	claimIdle     = 5 * time.Second
	claimInterval = time.Second
	// shutdownTimeout is every process's SHUTDOWN_TIMEOUT.
	shutdownTimeout = 5 * time.Second
	// streamName is the stream of user events (STREAM_PREFIX is the
	// default; every scenario has its own Redis and database).
	streamName = "outbox:user"
	deadStream = streamName + ":dead"
)

// infra is what a whole run shares: the private servers, the binaries, and
// the proxies between each relay and PostgreSQL.
type infra struct {
	dir   string
	pg    *postgres
	redis *redisServer
	bins  map[string]string
	// proxies[i] stands between relay i+1 and PostgreSQL; senderPG[i] and
	// senderRedis[i] between sendemail i+1 and PostgreSQL and Redis.
	proxies, senderPG, senderRedis []*tcpproxy.Proxy
	tb                             *proxyTB
	logf                           func(format string, args ...any)
	// logDir holds one directory of process logs per scenario.
	logDir string
}

// stage is the running system of one scenario: its database, the function
// processes, the SMTP server and the run's own connections.
type stage struct {
	*infra
	index int
	name  string
	// tag marks this scenario's emails; signups is the size of its load.
	tag     string
	signups int
	dbName  string
	dbURL   string
	db      *pgxpool.Pool
	redisC  rueidis.Client
	mail    *smtptest.Server
	logDir  string

	createuser *proc
	relays     []*proc
	senders    []*proc
	all        []*proc
}

// newStage creates the scenario's database (migrated), resets Redis,
// starts an SMTP server and the five function processes, and waits until
// every one is healthy.
func (in *infra) newStage(ctx context.Context, index int, name string, signups int) (_ *stage, err error) {
	s := &stage{infra: in, index: index, name: name, dbName: fmt.Sprintf("chaos_%02d", index),
		tag: fmt.Sprintf("s%02d", index), signups: signups}
	s.dbURL = in.pg.URL(s.dbName)
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	if err := in.redis.Reset(ctx); err != nil {
		return nil, fmt.Errorf("reset redis: %w", err)
	}
	admin, err := pgx.Connect(ctx, in.pg.URL("postgres"))
	if err != nil {
		return nil, fmt.Errorf("connect to the private cluster: %w", err)
	}
	_, err = admin.Exec(ctx, "CREATE DATABASE "+s.dbName)
	admin.Close(ctx)
	if err != nil {
		return nil, fmt.Errorf("create database %s: %w", s.dbName, err)
	}
	if _, err := pg.Migrate(ctx, s.dbURL, slog.New(slog.DiscardHandler)); err != nil {
		return nil, fmt.Errorf("migrate %s: %w", s.dbName, err)
	}
	if s.db, err = pgxpool.New(ctx, s.dbURL+"&pool_max_conns=4"); err != nil {
		return nil, fmt.Errorf("connect to %s: %w", s.dbName, err)
	}
	if s.redisC, err = in.redis.client(); err != nil {
		return nil, err
	}
	if s.mail, err = smtptest.Listen(); err != nil {
		return nil, fmt.Errorf("start the SMTP server: %w", err)
	}
	s.logDir = filepath.Join(in.logDir, fmt.Sprintf("%02d-%s", index, name))
	if err := mkdirAll(s.logDir); err != nil {
		return nil, err
	}

	common := func(kind string) map[string]string {
		return map[string]string{
			"LOG_FORMAT": "json", "LOG_LEVEL": "info",
			"FUNCTION_TARGET":  map[string]string{"createuser": "CreateUser", "relay": "Relay", "sendemail": "SendEmail"}[kind],
			"SHUTDOWN_TIMEOUT": shutdownTimeout.String(), "BACKGROUND": "true",
		}
	}
	add := func(name, kind string, vars map[string]string) (*proc, error) {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		env := common(kind)
		for k, v := range vars {
			env[k] = v
		}
		p := &proc{name: name, kind: kind, bin: in.bins[kind], env: processEnv(env),
			logPath: filepath.Join(s.logDir, name+".log"), shutdownTimeout: shutdownTimeout}
		p.port.Store(int32(port))
		s.all = append(s.all, p)
		p.mu.Lock()
		defer p.mu.Unlock()
		return p, p.startLocked()
	}

	if s.createuser, err = add("createuser", "createuser", map[string]string{
		"DATABASE_URL": s.dbURL, "DB_MAX_CONNS": "8", "REQUEST_TIMEOUT": "3s",
		// Thousands of signups from one machine: the abuse limits are not
		// what this run tests.
		"RATE_LIMIT_PER_ADDRESS": "0", "RATE_LIMIT_PER_DOMAIN": "0",
	}); err != nil {
		return nil, err
	}
	for i, proxy := range in.proxies {
		r, err := add(fmt.Sprintf("relay-%d", i+1), "relay", map[string]string{
			// Through its own proxy, so that a fault can silence the
			// network between this relay and PostgreSQL alone.
			"DATABASE_URL": fmt.Sprintf("postgres://postgres@%s/%s?sslmode=disable&application_name=relay-%d", proxy.Addr(), s.dbName, i+1),
			"REDIS_URL":    in.redis.URL(), "RELAY_POLL_INTERVAL": "1s", "RELAY_BATCH_SIZE": "100",
			"RELAY_RECONNECT_DELAY": "200ms", "RELAY_RETENTION": "1h", "RELAY_DEDUPE_WINDOW": "1h",
			"RELAY_DRAIN_TIMEOUT": "10s",
		})
		if err != nil {
			return nil, err
		}
		s.relays = append(s.relays, r)
	}
	for i := range 2 {
		c, err := add(fmt.Sprintf("sendemail-%d", i+1), "sendemail", map[string]string{
			"DATABASE_URL": fmt.Sprintf("postgres://postgres@%s/%s?sslmode=disable", in.senderPG[i].Addr(), s.dbName),
			"REDIS_URL":    fmt.Sprintf("redis://%s/0", in.senderRedis[i].Addr()), "SMTP_URL": s.mail.URL(),
			"SENDEMAIL_CONSUMER": fmt.Sprintf("chaos-%d", i+1), "SENDEMAIL_BLOCK": "500ms",
			"SENDEMAIL_CLAIM_IDLE": claimIdle.String(), "SENDEMAIL_CLAIM_INTERVAL": claimInterval.String(),
			"SENDEMAIL_LEASE": sendLease.String(), "SENDEMAIL_MAX_DELIVERIES": "10",
			"SMTP_TIMEOUT": smtpTimeout.String(), "SMTP_DATA_TIMEOUT": smtpDataTimeout.String(),
			"MAIL_FROM": "Chaos <welcome@chaos.example.com>", "SENDEMAIL_DRAIN_TIMEOUT": "10s",
		})
		if err != nil {
			return nil, err
		}
		c.consumer = fmt.Sprintf("chaos-%d", i+1)
		s.senders = append(s.senders, c)
	}
	if err := waitHealthy(ctx, s.all, 30*time.Second); err != nil {
		return nil, err
	}
	return s, nil
}

// close stops the processes and the SMTP server and closes connections;
// the database stays until the cluster goes.
func (s *stage) close() {
	for _, p := range s.all {
		p.Stop()
	}
	if s.mail != nil {
		s.mail.Close()
	}
	if s.redisC != nil {
		s.redisC.Close()
	}
	if s.db != nil {
		s.db.Close()
	}
	for _, p := range slices.Concat(s.proxies, s.senderPG, s.senderRedis) {
		p.Thaw()
	}
}

// problems lists what went wrong with the processes during the scenario.
func (s *stage) problems() []string {
	var out []string
	for _, p := range s.all {
		out = append(out, p.problems()...)
	}
	return out
}
