// Package serve runs the product's functions as one HTTP server with the
// things the Functions Framework's own Start lacks: background loops,
// health and liveness endpoints safe to expose, timeouts that cut off slow
// clients, and a graceful shutdown on SIGTERM.
//
// Every function also registers itself with the Functions Framework
// (functions.HTTP), by name. The mains in this repository serve the handlers
// through [Run], which follows the Framework's routing: with FUNCTION_TARGET
// set only that function is served, at "/"; without it every function is
// served at "/<Name>". Health is at [HealthPath], liveness at [LivePath].
package serve

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/outboxfn/outbox/shared/config"
	"github.com/outboxfn/outbox/shared/httpjson"
	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/telemetry"
)

// Service is a function built from its configuration and ready to work.
type Service interface {
	// Start starts the function's background loop, if it has one, and
	// returns once it is running.
	Start(ctx context.Context) error
	// Stop ends the background loop and waits for it; safe to call twice.
	Stop()
	// Health reports the state of the function's dependencies.
	Health(ctx context.Context) Health
	// Close releases connections; call it after Stop.
	Close()
}

// Function is one of the product's functions as the server sees it.
type Function struct {
	// Name is the name registered with the Functions Framework.
	Name string
	// Handler is the handler registered with the Functions Framework.
	Handler http.Handler
	// Service returns the function's service, built once from the
	// environment; Handler uses the same one.
	Service func() (Service, error)
}

// Config is the server's own configuration.
type Config struct {
	logging.Config
	// Port is where the server listens; Cloud Run sets it.
	Port string `envconfig:"PORT" default:"8080" desc:"TCP port the HTTP server listens on (Cloud Run sets it). Default 8080."`
	// FunctionTarget selects one function to serve at "/".
	FunctionTarget string `envconfig:"FUNCTION_TARGET" desc:"Serve only this function (CreateUser, Relay or SendEmail) at /; when empty every function is served at /<Name>. Default empty."`
	// ShutdownTimeout bounds the graceful shutdown after SIGTERM. Cloud Run
	// kills the container 10 s after SIGTERM, so the default leaves a margin.
	ShutdownTimeout time.Duration `envconfig:"SHUTDOWN_TIMEOUT" default:"8s" desc:"How long in-flight requests and background loops get to finish after SIGTERM (Cloud Run allows 10 s). Default 8s."`
	// ReadTimeout bounds the arrival of a request's headers and body; it is
	// what cuts off a client that trickles its request in (slowloris).
	ReadTimeout time.Duration `envconfig:"HTTP_READ_TIMEOUT" default:"10s" desc:"A request's headers and body must arrive within this; a slower client gets 408 and its connection is closed. Default 10s."`
	// WriteTimeout is the time a function's handler gets to answer unless
	// its service says (see [HandlerTimeout]); the triggers run up to their
	// drain timeout, so the default exceeds its default of 50 s.
	WriteTimeout time.Duration `envconfig:"HTTP_WRITE_TIMEOUT" default:"60s" desc:"Time a function's request gets, after its body has arrived, to be handled and answered, unless the function sets its own (the triggers run up to their drain timeout). Health answers get 10s. Default 60s."`
	// IdleTimeout closes keep-alive connections that carry no request.
	IdleTimeout time.Duration `envconfig:"HTTP_IDLE_TIMEOUT" default:"60s" desc:"A keep-alive connection with no request for this long is closed. Default 60s."`
}

// HandlerTimeout is implemented by a service whose requests need a write
// deadline other than Config.WriteTimeout: its handler's own bound (a
// request timeout, a drain timeout) plus a margin to write the answer.
type HandlerTimeout interface {
	HandlerTimeout() time.Duration
}

// Validate checks the port and timeout.
func (c Config) Validate() error {
	if err := c.Config.Validate(); err != nil {
		return err
	}
	if _, err := net.LookupPort("tcp", c.Port); err != nil {
		return fmt.Errorf("PORT must be a TCP port, not %q", c.Port)
	}
	for _, d := range []struct {
		name  string
		value time.Duration
	}{
		{"SHUTDOWN_TIMEOUT", c.ShutdownTimeout},
		{"HTTP_READ_TIMEOUT", c.ReadTimeout},
		{"HTTP_WRITE_TIMEOUT", c.WriteTimeout},
		{"HTTP_IDLE_TIMEOUT", c.IdleTimeout},
	} {
		if d.value <= 0 {
			return fmt.Errorf("%s must be positive, not %s", d.name, d.value)
		}
	}
	return nil
}

// withDefaults fills zero timeouts with the defaults envconfig would give.
func (c Config) withDefaults() Config {
	for _, d := range []struct {
		value *time.Duration
		def   time.Duration
	}{
		{&c.ShutdownTimeout, 8 * time.Second},
		{&c.ReadTimeout, 10 * time.Second},
		{&c.WriteTimeout, 60 * time.Second},
		{&c.IdleTimeout, 60 * time.Second},
	} {
		if *d.value <= 0 {
			*d.value = d.def
		}
	}
	return c
}

// Main runs fns until SIGTERM or SIGINT and exits the process; it is the
// whole body of each main package.
func Main(fns ...Function) {
	var cfg Config
	if err := config.Load(&cfg); err != nil {
		fmt.Fprintln(os.Stderr, logging.Redact(err.Error()))
		os.Exit(2)
	}
	logger := logging.New(os.Stderr, cfg.Config)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	// Traces and metrics go where the OTEL_* variables say; with none set
	// the providers are no-ops. The services read otel's globals.
	_, shutdownTelemetry, err := telemetry.Setup(ctx)
	if err != nil {
		logger.Error("telemetry", slog.Any("error", err))
		os.Exit(2)
	}
	err = Run(ctx, cfg, logger, fns...)
	// Flush what is buffered within the time Cloud Run leaves after SIGTERM.
	flushCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	if ferr := shutdownTelemetry(flushCtx); ferr != nil {
		logger.Warn("flush telemetry", slog.Any("error", ferr))
	}
	cancel()
	if err != nil {
		logger.Error("server stopped", slog.Any("error", err))
		stop()
		os.Exit(1)
	}
}

// Run builds the services of fns, starts their background loops, serves
// their handlers until ctx is done, then shuts down within
// cfg.ShutdownTimeout: the listener closes, in-flight requests and loops
// finish, and connections are released.
func Run(ctx context.Context, cfg Config, logger *slog.Logger, fns ...Function) error {
	ln, err := net.Listen("tcp", ":"+cfg.Port)
	if err != nil {
		return fmt.Errorf("listen on port %s: %w", cfg.Port, err)
	}
	return Serve(ctx, ln, cfg, logger, fns...)
}

// Serve is Run on a listener the caller opened, for tests. A zero timeout
// in cfg means its default.
func Serve(ctx context.Context, ln net.Listener, cfg Config, logger *slog.Logger, fns ...Function) error {
	cfg = cfg.withDefaults()
	if cfg.FunctionTarget != "" {
		var target []Function
		for _, fn := range fns {
			if fn.Name == cfg.FunctionTarget {
				target = append(target, fn)
			}
		}
		if len(target) == 0 {
			_ = ln.Close()
			return fmt.Errorf("FUNCTION_TARGET %q names no function of this binary", cfg.FunctionTarget)
		}
		fns = target
	}

	services := make([]Service, 0, len(fns))
	defer func() {
		for _, s := range services {
			s.Close()
		}
	}()
	mux := http.NewServeMux()
	for _, fn := range fns {
		s, err := fn.Service()
		if err != nil {
			_ = ln.Close()
			return fmt.Errorf("build %s: %w", fn.Name, err)
		}
		services = append(services, s)
		path := "/" + fn.Name
		if cfg.FunctionTarget != "" {
			path = "/"
		}
		timeout := cfg.WriteTimeout
		if ht, ok := s.(HandlerTimeout); ok && ht.HandlerTimeout() > 0 {
			timeout = ht.HandlerTimeout()
		}
		mux.Handle(path, guard(logger, timeout, recoverPanic(logger, fn.Handler)))
	}
	health := guard(logger, healthTimeout, &healthHandler{fns: fns, services: services, logger: logger, failing: map[string]bool{}})
	mux.Handle(HealthPath, health)
	mux.Handle(legacyHealthPath, health)
	mux.Handle(LivePath, guard(logger, healthTimeout, liveHandler(fns, services, logger)))
	if cfg.FunctionTarget == "" {
		// Go's own answer to an unknown path is plain text; every answer of
		// this server is JSON.
		mux.Handle("/", guard(logger, healthTimeout, notFound(fns)))
	}

	for i, s := range services {
		if err := s.Start(ctx); err != nil {
			stopAll(services[:i])
			_ = ln.Close()
			return fmt.Errorf("start %s: %w", fns[i].Name, err)
		}
	}

	srv := &http.Server{
		Handler: mux,
		// ReadTimeout bounds headers and body together; net/http lifts it
		// once guard has read the body.
		ReadHeaderTimeout: cfg.ReadTimeout,
		ReadTimeout:       cfg.ReadTimeout,
		// guard sets each endpoint's own write deadline; this one covers
		// what the server answers by itself (a malformed request).
		WriteTimeout: cfg.ReadTimeout + healthTimeout,
		IdleTimeout:  cfg.IdleTimeout,
		// Derive request contexts from ctx's values but not its cancellation:
		// a SIGTERM must let in-flight requests finish, not cancel them.
		BaseContext: func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
		ErrorLog:    slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	names := make([]string, len(fns))
	for i, fn := range fns {
		names[i] = fn.Name
	}
	logger.InfoContext(ctx, "serving", slog.String("addr", ln.Addr().String()), slog.Any("functions", names))

	select {
	case err := <-served:
		stopAll(services)
		return fmt.Errorf("serve http: %w", err)
	case <-ctx.Done():
	}

	logger.Info("shutting down", slog.Duration("timeout", cfg.ShutdownTimeout))
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cfg.ShutdownTimeout)
	defer cancel()
	var wg sync.WaitGroup
	var shutdownErr error
	wg.Go(func() { shutdownErr = srv.Shutdown(shutdownCtx) })
	wg.Go(func() { stopAll(services) })
	wg.Wait()
	if shutdownErr != nil {
		return fmt.Errorf("shut down http server: %w", shutdownErr)
	}
	logger.Info("stopped")
	return nil
}

func stopAll(services []Service) {
	var wg sync.WaitGroup
	for _, s := range services {
		wg.Go(s.Stop)
	}
	wg.Wait()
}

func notFound(fns []Function) http.Handler {
	paths := make([]string, len(fns))
	for i, fn := range fns {
		paths[i] = "/" + fn.Name
	}
	msg := fmt.Sprintf("no such path; this server has %s and %s", strings.Join(paths, ", "), HealthPath)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		httpjson.WriteError(w, r, slog.Default(), httpjson.Errorf(http.StatusNotFound, "not_found", "%s", msg))
	})
}

// recoverPanic answers a panicking request with a JSON 500 and keeps the
// server up, as the Functions Framework's own wrapper does.
func recoverPanic(logger *slog.Logger, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				httpjson.WriteError(w, r, logger, fmt.Errorf("panic: %v", v))
			}
		}()
		h.ServeHTTP(w, r)
	})
}

// Built is the Function of a service built already, by a caller that
// configures it itself (a test, a benchmark): served as Define's would be,
// with no lazy build from the environment.
func Built(name string, s interface {
	Service
	http.Handler
}) Function {
	return Function{Name: name, Handler: s, Service: func() (Service, error) { return s, nil }}
}

// ErrStopped is returned by a background loop's Start after its Stop.
var ErrStopped = errors.New("stopped")

// Define describes a function whose service is built once, lazily, from the
// environment: config.Load fills a C, and build turns it into the service.
// The returned Function's Handler is what the function registers with the
// Functions Framework; until the service is built, or if building it
// failed (a bad configuration), the handler answers with a JSON 500.
func Define[C any, S interface {
	Service
	http.Handler
}](name string, build func(context.Context, C, *slog.Logger) (S, error)) Function {
	// Until the service is built there is no configured logger; this one
	// redacts credentials as every logger of this product does.
	fallback := logging.New(os.Stderr, logging.Config{})
	lazy := sync.OnceValues(func() (Service, error) {
		var cfg C
		if err := config.Load(&cfg); err != nil {
			return nil, err
		}
		var lc logging.Config
		if c, ok := any(cfg).(interface{ Logging() logging.Config }); ok {
			lc = c.Logging()
		}
		s, err := build(context.Background(), cfg, logging.New(os.Stderr, lc))
		if err != nil {
			return nil, err
		}
		return s, nil
	})
	return Function{
		Name: name,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			s, err := lazy()
			if err != nil {
				httpjson.WriteError(w, r, fallback, fmt.Errorf("build %s: %w", name, err))
				return
			}
			s.(http.Handler).ServeHTTP(w, r)
		}),
		Service: lazy,
	}
}
