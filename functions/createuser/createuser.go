// Package createuser is the HTTP function that creates a user and, in the same
// transaction, writes the user.created event to the outbox.
//
// POST a JSON body {"email": "...", "name": "..."}; the answer is 201 with the
// user, or an error {"error": {"code", "message"}} with a 4xx that says what
// to fix (429 past an abuse limit: per client address and per recipient
// domain, see limiter.go), or 503 when the database is unavailable. A
// request that fails writes nothing, but for a 503 whose message says that
// the COMMIT went unconfirmed. A client that retries with the same
// Idempotency-Key header gets the first answer again, byte for byte, and
// causes no second event.
package createuser

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/GoogleCloudPlatform/functions-framework-go/functions"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/outboxfn/outbox/shared/events"
	"github.com/outboxfn/outbox/shared/httpjson"
	"github.com/outboxfn/outbox/shared/outbox"
	"github.com/outboxfn/outbox/shared/pg"
	"github.com/outboxfn/outbox/shared/serve"
	"github.com/outboxfn/outbox/shared/telemetry"
)

// Name is the function's name in the Functions Framework.
const Name = "CreateUser"

// Function is the function as the Functions Framework and shared/serve run
// it: one service, built lazily from the environment on first use.
var Function = serve.Define(Name, New)

func init() { functions.HTTP(Name, Function.Handler.ServeHTTP) }

// User is a created user as the API returns it.
type User struct {
	ID        int64     `json:"id"`
	Email     string    `json:"email"`
	Name      string    `json:"name"`
	CreatedAt time.Time `json:"created_at"`
}

// Service creates users. It is safe for concurrent use.
type Service struct {
	cfg     Config
	pool    *pgxpool.Pool
	limiter *limiter // nil when both limits are off
	logger  *slog.Logger
	// handler is serveHTTP inside the request's server span and metrics.
	handler http.Handler
	tracer  trace.Tracer
	// commitTimeout bounds a COMMIT that the request's deadline no longer
	// cuts (see create); HandlerTimeout leaves the answer 5s past
	// REQUEST_TIMEOUT. A field, so that tests can shorten it.
	commitTimeout time.Duration
}

// New returns a service using a pool built from cfg. It does not connect
// until the first request, so it starts while the database is still down.
func New(ctx context.Context, cfg Config, logger *slog.Logger) (*Service, error) {
	pool, err := pg.NewPool(ctx, cfg.DatabaseURL, pg.PoolConfig{MaxConns: cfg.DBMaxConns})
	if err != nil {
		return nil, err
	}
	s := &Service{cfg: cfg, pool: pool, logger: logger, tracer: cfg.Telemetry.TracerOf(), commitTimeout: 3 * time.Second}
	s.handler = telemetry.HTTPHandler(Name, cfg.Telemetry, http.HandlerFunc(s.serveHTTP))
	if (cfg.RateLimitPerAddress > 0 || cfg.RateLimitPerDomain > 0) && cfg.RateLimitWindow > 0 {
		s.limiter = &limiter{pool: pool, window: cfg.RateLimitWindow,
			perAddress: cfg.RateLimitPerAddress, perDomain: cfg.RateLimitPerDomain}
	}
	return s, nil
}

// Start does nothing: createuser has no background work.
func (s *Service) Start(context.Context) error { return nil }

// Stop does nothing: createuser has no background work.
func (s *Service) Stop() {}

// HandlerTimeout is the write deadline of this function's requests:
// a request works up to REQUEST_TIMEOUT, and the answer needs a moment after it.
func (s *Service) HandlerTimeout() time.Duration { return s.cfg.RequestTimeout + 5*time.Second }

// Close closes the pool.
func (s *Service) Close() { s.pool.Close() }

// Health pings the database.
func (s *Service) Health(ctx context.Context) serve.Health {
	return serve.Check(ctx, map[string]func(context.Context) error{"postgres": s.pool.Ping})
}

// ServeHTTP handles POST / in a server span that continues the request's
// traceparent, if it has a valid one.
func (s *Service) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.handler.ServeHTTP(w, r) }

func (s *Service) serveHTTP(w http.ResponseWriter, r *http.Request) {
	if !httpjson.Method(w, r, http.MethodPost) {
		return
	}
	status, body, replayed, err := s.handle(r)
	if limited := (*rateLimitedError)(nil); errors.As(err, &limited) {
		w.Header().Set("Retry-After", strconv.Itoa(seconds(limited.retryAfter)))
	}
	if err != nil {
		httpjson.WriteError(w, r, s.logger, err)
		return
	}
	if replayed {
		w.Header().Set("Idempotent-Replayed", "true")
	}
	httpjson.WriteRaw(w, status, body)
}

// handle validates the request and creates the user, or finds the answer
// already given to the same Idempotency-Key.
func (s *Service) handle(r *http.Request) (status int, body json.RawMessage, replayed bool, err error) {
	u, key, err := parse(r)
	if err != nil {
		return 0, nil, false, err
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.cfg.RequestTimeout)
	defer cancel()
	if s.limiter != nil {
		err = s.limiter.allow(ctx, clientAddress(r, s.cfg.ForwardedHops), u.Domain)
	}
	if err == nil {
		// The event carries the request span's context: the incoming
		// traceparent's trace, or the new trace a request without one
		// started (none while tracing is off).
		tp, ts := telemetry.Inject(ctx)
		status, body, replayed, err = s.create(ctx, u, key, tp, ts)
	}
	if errors.Is(err, errCommitUnconfirmed) {
		s.logger.WarnContext(ctx, "commit unconfirmed", slog.Any("error", err))
		return 0, nil, false, httpjson.Errorf(http.StatusServiceUnavailable, "unavailable",
			"the database did not confirm the commit, so the user may or may not exist; retry later with the same "+
				"Idempotency-Key to get the answer (without one, a retry answers 409 email_taken if it was created)")
	}
	if err != nil && (pg.IsUnavailable(err) || errors.Is(err, context.Canceled)) {
		s.logger.WarnContext(ctx, "database unavailable", slog.Any("error", err))
		return 0, nil, false, httpjson.Errorf(http.StatusServiceUnavailable, "unavailable",
			"the database is unavailable; nothing was written, retry later (with the same Idempotency-Key)")
	}
	return status, body, replayed, err
}

var errEmailTaken = httpjson.Errorf(http.StatusConflict, "email_taken", "a user with this email exists already")

// create runs the one transaction: remember the idempotency key, insert the
// user, insert the event, store the answer under the key, commit.
func (s *Service) create(ctx context.Context, u newUser, key, traceparent, tracestate string) (status int, body json.RawMessage, replayed bool, err error) {
	ctx, span := s.tracer.Start(ctx, "createuser transaction", trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(attribute.String("db.system.name", "postgresql")))
	defer func() {
		if err != nil && !errors.Is(err, errEmailTaken) {
			telemetry.Failed(span, err)
		}
		span.End()
	}()
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return 0, nil, false, fmt.Errorf("acquire connection: %w", err)
	}
	defer conn.Release()
	ctx, w := watchOnce(ctx, conn)
	defer w.end()
	tx, err := conn.Begin(ctx)
	if err != nil {
		return 0, nil, false, fmt.Errorf("begin: %w", err)
	}
	// Rollback after Commit is a no-op; it must run even if ctx has expired.
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // the error of interest is Commit's

	hash := requestHash(u)
	if key != "" {
		// A concurrent request with the same key blocks here until the first
		// one ends; then the key exists (it committed) or not (it failed).
		tag, err := tx.Exec(ctx,
			`INSERT INTO idempotency_keys (key, request_hash, status, response) VALUES ($1, $2, 0, '')
			 ON CONFLICT (key) DO NOTHING`, key, hash[:])
		if err != nil {
			return 0, nil, false, fmt.Errorf("reserve idempotency key: %w", err)
		}
		if tag.RowsAffected() == 0 {
			return s.replay(ctx, tx, key, hash)
		}
	}

	var user User
	err = tx.QueryRow(ctx,
		`INSERT INTO users (email, name) VALUES ($1, $2) RETURNING id, email, name, created_at`,
		u.Email, u.Name).Scan(&user.ID, &user.Email, &user.Name, &user.CreatedAt)
	if pg.IsUniqueViolation(err, "users_email_lower_key") {
		return 0, nil, false, errEmailTaken
	}
	if err != nil {
		return 0, nil, false, fmt.Errorf("insert user: %w", err)
	}
	ev := events.UserCreated{UserID: user.ID, Email: user.Email, Name: user.Name}
	if s.cfg.OmitNameFromEvent {
		ev.Name = ""
	}
	payload, err := json.Marshal(ev)
	if err != nil {
		return 0, nil, false, fmt.Errorf("encode event: %w", err)
	}
	err = outbox.Insert(ctx, tx, outbox.Event{
		AggregateType: events.AggregateUser,
		AggregateID:   strconv.FormatInt(user.ID, 10),
		EventType:     events.TypeUserCreated,
		Payload:       payload,
		Traceparent:   traceparent,
		Tracestate:    tracestate,
	})
	if err != nil {
		return 0, nil, false, err
	}
	body, err = json.Marshal(user)
	if err != nil {
		return 0, nil, false, fmt.Errorf("encode user: %w", err)
	}
	if key != "" {
		if _, err := tx.Exec(ctx, `UPDATE idempotency_keys SET status = $2, response = $3 WHERE key = $1`,
			key, http.StatusCreated, body); err != nil {
			return 0, nil, false, fmt.Errorf("store idempotent response: %w", err)
		}
	}
	// The request's deadline may stop every statement but COMMIT: once it
	// is sent, only its answer tells whether the user exists, and a cut
	// would answer 503 ("nothing was written") for a committed user.
	if !w.detach() {
		return 0, nil, false, fmt.Errorf("commit: %w", context.DeadlineExceeded)
	}
	// The socket's deadline bounds the COMMIT instead: a timeout fails it
	// as a network error, and pgx closes the connection.
	w.bound(s.commitTimeout)
	sent := !conn.Conn().IsClosed()
	if err := tx.Commit(ctx); err != nil {
		var pgErr *pgconn.PgError
		if sent && !(errors.As(err, &pgErr) && pgErr.Severity == "ERROR") {
			// Only the server's ERROR says it rolled back. Any other failure
			// may have come after the server committed: a FATAL that ends
			// the session (a backend terminated while COMMIT waited for a
			// standby has committed locally), or even pgx's "safe to retry"
			// conn closed, when the answer's read found the socket at its end.
			return 0, nil, false, fmt.Errorf("commit: %w: %w", errCommitUnconfirmed, err)
		}
		return 0, nil, false, fmt.Errorf("commit: %w", err)
	}
	return http.StatusCreated, body, false, nil
}

// errCommitUnconfirmed is a COMMIT that was sent and not answered with an
// ERROR: the user may exist or not, and only a retry tells.
var errCommitUnconfirmed = errors.New("commit sent but not confirmed")

// watchOnce returns a context for conn's statements that cannot be
// cancelled, and ends conn's statement in progress itself once ctx is done,
// by moving its socket's deadline to now, as pgx would; the statement then
// fails with a timeout, which handle answers with 503. pgx watches each
// statement's context on its own (a context.AfterFunc registered and removed
// per statement, four per request here), which measured as much CPU as the
// request's JSON parsing; one watch per transaction does the same job.
func watchOnce(ctx context.Context, conn *pgxpool.Conn) (context.Context, *watch) {
	netConn := conn.Conn().PgConn().Conn()
	w := &watch{conn: conn, netConn: netConn}
	w.stop = context.AfterFunc(ctx, func() { _ = netConn.SetDeadline(time.Now()) })
	return context.WithoutCancel(ctx), w
}

// watch is one transaction's watch on its request's context.
type watch struct {
	conn    *pgxpool.Conn
	netConn net.Conn
	stop    func() bool
	stopped bool
	fired   bool
	bounded bool
}

// detach ends the watch; it reports whether the connection is still whole
// (the watch never moved its deadline).
func (w *watch) detach() bool {
	if !w.stopped {
		w.stopped, w.fired = true, !w.stop()
	}
	return !w.fired
}

// bound gives the statements after detach a deadline of their own, on the
// socket: it costs less than a context with a timeout, which pgx would
// watch as well.
func (w *watch) bound(d time.Duration) {
	w.bounded = true
	_ = w.netConn.SetDeadline(time.Now().Add(d))
}

// end ends the watch. It closes the connection if the watch cut it off, so
// that the pool drops it, and clears a deadline bound set, so that the
// connection goes back to the pool as it came.
func (w *watch) end() {
	switch {
	case !w.detach():
		w.conn.Conn().Close(context.Background()) //nolint:errcheck // closing a connection already cut off
	case w.bounded && !w.conn.Conn().IsClosed():
		// A closed connection's socket belongs to pgx's closing goroutine,
		// which gives it a deadline of its own.
		_ = w.netConn.SetDeadline(time.Time{})
	}
}

// replay answers a request whose Idempotency-Key was used before.
func (s *Service) replay(ctx context.Context, tx pgx.Tx, key string, hash [sha256.Size]byte) (int, json.RawMessage, bool, error) {
	var stored []byte
	var status int
	var body []byte // exactly the bytes first sent (a bytea column, not jsonb)
	err := tx.QueryRow(ctx, `SELECT request_hash, status, response FROM idempotency_keys WHERE key = $1`, key).
		Scan(&stored, &status, &body)
	if errors.Is(err, pgx.ErrNoRows) {
		// Purged between our insert and this read; the client may retry.
		return 0, nil, false, httpjson.Errorf(http.StatusConflict, "idempotency_key_busy", "retry the request")
	}
	if err != nil {
		return 0, nil, false, fmt.Errorf("read idempotent response: %w", err)
	}
	if string(stored) != string(hash[:]) {
		return 0, nil, false, httpjson.Errorf(http.StatusUnprocessableEntity, "idempotency_key_reused",
			"this Idempotency-Key was used with a different request body; use a new key")
	}
	return status, body, true, nil
}

// requestHash identifies a request's meaning, not its bytes, so that a retry
// that re-encodes the same fields still matches.
func requestHash(u newUser) [sha256.Size]byte {
	return sha256.Sum256([]byte(u.Email + "\x00" + u.Name))
}
