package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outboxfn/outbox/functions/createuser"
	"github.com/outboxfn/outbox/functions/relay"
	"github.com/outboxfn/outbox/shared/events"
	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/outbox"
	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/serve"
)

var quiet = logging.Config{LogFormat: "text", LogLevel: "error"}

// loadResult is what a closed-loop load produced.
type loadResult struct {
	ok      int
	failed  int
	elapsed time.Duration
	lat     []time.Duration
}

func (r loadResult) rate() float64 { return float64(r.ok) / r.elapsed.Seconds() }

// load runs fn in clients goroutines, back to back, for d.
func load(ctx context.Context, clients int, d time.Duration, fn func(ctx context.Context) error) loadResult {
	var mu sync.Mutex
	var res loadResult
	deadline := time.Now().Add(d)
	start := time.Now()
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			var lat []time.Duration
			failed := 0
			for time.Now().Before(deadline) && ctx.Err() == nil {
				t := time.Now()
				if err := fn(ctx); err != nil {
					failed++
					continue
				}
				lat = append(lat, time.Since(t))
			}
			mu.Lock()
			res.lat = append(res.lat, lat...)
			res.ok += len(lat)
			res.failed += failed
			mu.Unlock()
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	return res
}

func (r *loadResult) add(o loadResult) {
	r.ok += o.ok
	r.failed += o.failed
	r.elapsed += o.elapsed
	r.lat = append(r.lat, o.lat...)
}

// keepAliveClients is the load generator: plain HTTP/1.1 over kept-alive
// connections, one request at a time on each, like wrk. net/http's client
// spends two goroutines and several channel hand-offs per request, CPU that
// a 2-core machine would otherwise give to the server and the database.
type keepAliveClients struct {
	addr string
	idle chan *keepAliveConn
}

type keepAliveConn struct {
	conn net.Conn
	r    *bufio.Reader
}

func newKeepAliveClients(addr string) *keepAliveClients {
	return &keepAliveClients{addr: addr, idle: make(chan *keepAliveConn, 1024)}
}

// post sends body and fails unless the answer is 201.
func (c *keepAliveClients) post(body string) error {
	var kc *keepAliveConn
	select {
	case kc = <-c.idle:
	default:
		conn, err := net.Dial("tcp", c.addr)
		if err != nil {
			return err
		}
		kc = &keepAliveConn{conn: conn, r: bufio.NewReader(conn)}
	}
	req := "POST / HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: " +
		strconv.Itoa(len(body)) + "\r\n\r\n" + body
	if _, err := io.WriteString(kc.conn, req); err != nil {
		kc.conn.Close()
		return err
	}
	status, closing, err := readResponse(kc.r)
	if err != nil {
		kc.conn.Close()
		return err
	}
	if closing {
		kc.conn.Close()
	} else {
		c.idle <- kc
	}
	if status != http.StatusCreated {
		return fmt.Errorf("status %d", status)
	}
	return nil
}

// readResponse reads one response with a Content-Length body, which every
// answer of createuser has, and returns its status and whether the server
// closes the connection after it (Connection: close). It reads no more than
// wrk's parser does: http.ReadResponse would build a header map and a body
// reader per request, CPU the load generator takes from the server on the
// same cores.
func readResponse(r *bufio.Reader) (status int, closing bool, err error) {
	line, err := r.ReadSlice('\n')
	if err != nil {
		return 0, false, fmt.Errorf("read status line: %w", err)
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.1 ")) {
		return 0, false, fmt.Errorf("malformed status line %q", line)
	}
	if status, err = strconv.Atoi(string(line[9:12])); err != nil {
		return 0, false, fmt.Errorf("malformed status line %q", line)
	}
	length := -1
	for {
		h, err := r.ReadSlice('\n')
		if err != nil {
			return 0, false, fmt.Errorf("read header: %w", err)
		}
		if len(bytes.TrimSpace(h)) == 0 {
			break
		}
		name, value, ok := bytes.Cut(h, []byte(":"))
		switch {
		case !ok:
		case bytes.EqualFold(name, []byte("Content-Length")):
			if length, err = strconv.Atoi(string(bytes.TrimSpace(value))); err != nil {
				return 0, false, fmt.Errorf("malformed Content-Length %q", value)
			}
		case bytes.EqualFold(name, []byte("Connection")):
			closing = bytes.EqualFold(bytes.TrimSpace(value), []byte("close"))
		}
	}
	if length < 0 {
		return 0, false, errors.New("response without Content-Length")
	}
	if _, err := r.Discard(length); err != nil {
		return 0, false, fmt.Errorf("read body: %w", err)
	}
	return status, closing, nil
}

func (c *keepAliveClients) close() {
	for {
		select {
		case kc := <-c.idle:
			kc.conn.Close()
		default:
			return
		}
	}
}

// serveAsDeployed serves svc as the function's binary does on Cloud Run
// (serve.Serve with FUNCTION_TARGET, so at "/", with the default timeouts,
// the body guard and the panic recovery) on a free loopback port, and
// returns its address and how to stop it.
func serveAsDeployed(ctx context.Context, name string, svc interface {
	serve.Service
	http.Handler
}) (addr string, stop func(), err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, fmt.Errorf("listen: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() {
		served <- serve.Serve(ctx, ln, serve.Config{Config: quiet, FunctionTarget: name}, logging.New(nopWriter{}, quiet), serve.Built(name, svc))
	}()
	return ln.Addr().String(), func() { cancel(); <-served }, nil
}

// startRelay runs a relay with its background loop on the bench database.
func startRelay(ctx context.Context, e *env, prefix string, mutate ...func(*relay.Config)) (*relay.Service, error) {
	cfg := relay.Config{
		Config: quiet, DatabaseURL: e.dbURL, DBMaxConns: 4, RedisURL: redistest.URL(), StreamPrefix: prefix,
		BatchSize: 1000, PollInterval: 5 * time.Second, DedupeWindow: 24 * time.Hour, Retention: 24 * time.Hour, TrimInterval: time.Minute,
		DrainTimeout: time.Minute, ReconnectDelay: time.Second, Background: true,
	}
	for _, m := range mutate {
		m(&cfg)
	}
	s, err := relay.New(ctx, cfg, logging.New(nopWriter{}, quiet))
	if err != nil {
		return nil, err
	}
	if err := s.Start(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

type nopWriter struct{}

func (nopWriter) Write(p []byte) (int, error) { return len(p), nil }

var emailSeq atomic.Int64

func nextEmail(run string) string {
	return fmt.Sprintf("u%d-%s@example.com", emailSeq.Add(1), run)
}

// directCreate is createuser's transaction run straight over pgx: the user
// and its event in one transaction, the same statements and the same rows.
// With tracing on the event carries a traceparent as createuser's does (a
// new trace per request, as for a caller that sends none, sampled at
// tr.ratio), so that the two write and relay the same bytes and only the
// function's own work tells them apart.
func directCreate(ctx context.Context, pool *pgxpool.Pool, email string, tr tracing) error {
	tx, err := pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	var user createuser.User
	if err := tx.QueryRow(ctx, `INSERT INTO users (email, name) VALUES ($1, $2) RETURNING id, email, name, created_at`,
		email, "Bench User").Scan(&user.ID, &user.Email, &user.Name, &user.CreatedAt); err != nil {
		return err
	}
	payload, _ := json.Marshal(events.UserCreated{UserID: user.ID, Email: user.Email, Name: user.Name})
	ev := outbox.Event{AggregateType: events.AggregateUser, AggregateID: strconv.FormatInt(user.ID, 10),
		EventType: events.TypeUserCreated, Payload: payload}
	if tr.on {
		ev.Traceparent = newTraceparent(rand.Float64() < tr.ratio)
	}
	if err := outbox.Insert(ctx, tx, ev); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

// newTraceparent returns a W3C traceparent with random ids.
func newTraceparent(sampled bool) string {
	var ids [24]byte
	for i := 0; i < len(ids); i += 8 {
		v := rand.Uint64() | 1 // never all zero
		for j := range 8 {
			ids[i+j] = byte(v >> (8 * j))
		}
	}
	flags := "-00"
	if sampled {
		flags = "-01"
	}
	return "00-" + hex.EncodeToString(ids[:16]) + "-" + hex.EncodeToString(ids[16:]) + flags
}

func benchCreateUser(ctx context.Context, e *env, s Settings) ([]Figure, error) {
	rl, err := startRelay(ctx, e, e.freshPrefix("cu"))
	if err != nil {
		return nil, err
	}
	defer func() { rl.Stop(); rl.Close() }()
	svc, err := createuser.New(ctx, createuser.Config{Config: quiet, DatabaseURL: e.dbURL, DBMaxConns: s.PoolSize,
		RequestTimeout: 10 * time.Second}, logging.New(nopWriter{}, quiet))
	if err != nil {
		return nil, err
	}
	defer svc.Close()
	addr, stopServing, err := serveAsDeployed(ctx, createuser.Name, svc)
	if err != nil {
		return nil, err
	}
	defer stopServing()
	clients := newKeepAliveClients(addr)
	defer clients.close()
	poolCfg, err := pgxpool.ParseConfig(e.dbURL)
	if err != nil {
		return nil, err
	}
	poolCfg.MaxConns = s.PoolSize
	direct, err := pgxpool.NewWithConfig(ctx, poolCfg)
	if err != nil {
		return nil, err
	}
	defer direct.Close()

	viaHTTP := func(ctx context.Context) error {
		return clients.post(`{"email":"` + nextEmail("http") + `","name":"Bench User"}`)
	}
	viaPgx := func(ctx context.Context) error { return directCreate(ctx, direct, nextEmail("pgx"), s.tracing()) }

	// Unmeasured, each side first fills its pool and the server's caches;
	// and the order alternates, so that neither always runs on what the
	// other left behind (the relay's backlog, dirty pages, a grown heap).
	load(ctx, s.Clients, s.Round/4, viaHTTP)
	load(ctx, s.Clients, s.Round/4, viaPgx)
	var h, d loadResult
	for round := range s.Rounds {
		var hr, dr loadResult
		if round%2 == 0 {
			hr = load(ctx, s.Clients, s.Round, viaHTTP)
			dr = load(ctx, s.Clients, s.Round, viaPgx)
		} else {
			dr = load(ctx, s.Clients, s.Round, viaPgx)
			hr = load(ctx, s.Clients, s.Round, viaHTTP)
		}
		e.logf("round %d: HTTP %.0f req/s, pgx %.0f tx/s", round+1, hr.rate(), dr.rate())
		h.add(hr)
		d.add(dr)
	}
	if h.failed+d.failed > 0 {
		e.logf("failed requests: HTTP %d, pgx %d", h.failed, d.failed)
	}
	ratio := h.rate() / d.rate()
	return []Figure{
		compare("createuser throughput, 32 clients", h.rate(), "req/s", "same tx over pgx", d.rate()).
			target("ratio >= 0.8", ratio >= 0.8),
		compare("createuser latency p50", ms(percentile(h.lat, 50)), "ms", "same tx over pgx", ms(percentile(d.lat, 50))),
		compare("createuser latency p99", ms(percentile(h.lat, 99)), "ms", "same tx over pgx", ms(percentile(d.lat, 99))),
	}, nil
}

// Trigger variants for the doorbell measurement.
const (
	triggerQuiet = `CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT
		WHEN (pg_try_advisory_xact_lock_shared(hashtext('outbox.relay.busy'))) EXECUTE FUNCTION outbox_notify()`
	triggerAlways = `CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify()`
)

func benchDoorbell(ctx context.Context, e *env, s Settings) ([]Figure, error) {
	// Without a trigger nothing wakes the relay; a 10 ms poll keeps it as
	// busy as the doorbell does, so that only the trigger differs.
	rl, err := startRelay(ctx, e, e.freshPrefix("bell"), func(c *relay.Config) { c.PollInterval = 10 * time.Millisecond })
	if err != nil {
		return nil, err
	}
	defer func() { rl.Stop(); rl.Close() }()
	poolCfg, err := pgxpool.ParseConfig(e.dbURL)
	if err != nil {
		return nil, err
	}
	poolCfg.MaxConns = int32(s.Clients)
	pool, err := pgxpool.NewWithConfig(ctx, poolCfg)
	if err != nil {
		return nil, err
	}
	defer pool.Close()
	setTrigger := func(create string) error {
		_, err := e.pool.Exec(ctx, `DROP TRIGGER IF EXISTS outbox_notify ON outbox`)
		if err == nil && create != "" {
			_, err = e.pool.Exec(ctx, create)
		}
		return err
	}
	defer setTrigger(triggerQuiet) //nolint:errcheck // the database is dropped after the run
	tx := func(ctx context.Context) error { return directCreate(ctx, pool, nextEmail("bell"), s.tracing()) }

	variants := []struct {
		name, create string
		res          loadResult
	}{{"none", "", loadResult{}}, {"quiet", triggerQuiet, loadResult{}}, {"always", triggerAlways, loadResult{}}}
	for round := range s.Rounds {
		line := fmt.Sprintf("round %d:", round+1)
		for i := range variants {
			if err := setTrigger(variants[i].create); err != nil {
				return nil, fmt.Errorf("set trigger %s: %w", variants[i].name, err)
			}
			r := load(ctx, s.Clients, s.Round, tx)
			variants[i].res.add(r)
			line += fmt.Sprintf(" %s %.0f tx/s", variants[i].name, r.rate())
		}
		e.logf("%s", line)
	}
	none, quietRes, always := variants[0].res.rate(), variants[1].res.rate(), variants[2].res.rate()
	return []Figure{
		compare("tx/s with the quiet doorbell, relay running", quietRes, "tx/s", "no trigger", none).
			target("ratio >= 0.95", quietRes/none >= 0.95),
		compare("tx/s with an unconditional NOTIFY (for contrast)", always, "tx/s", "no trigger", none).
			note("what the quiet doorbell avoids"),
	}, nil
}

// tracing is whether the baseline stores trace context, and at what ratio
// it is sampled.
type tracing struct {
	on    bool
	ratio float64
}

func (s Settings) tracing() tracing { return tracing{on: s.Traced, ratio: s.TraceRatio} }
