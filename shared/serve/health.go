package serve

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/outboxfn/outbox/shared/httpjson"
)

// Health paths. Cloud Run reserves some paths that end in "z" (and tells
// users to avoid all of them), so /healthz never reaches a deployed
// container; it stays as an alias of HealthPath for local use only.
const (
	// HealthPath reports each function's dependencies: 200 when all answer,
	// 503 otherwise. Unauthenticated, so it says only which one is down.
	HealthPath = "/health"
	// LivePath is the startup and liveness probe: 200 while the process
	// serves and no function reports itself stuck. It does not look at
	// PostgreSQL or Redis: an outage must not restart every instance at once.
	LivePath = "/health/live"
	// legacyHealthPath is HealthPath's old name, unreachable on Cloud Run.
	legacyHealthPath = "/healthz"
)

// Health is what a function says about itself on [HealthPath].
type Health struct {
	// OK is false when a dependency the function needs is unreachable.
	OK bool `json:"ok"`
	// Checks maps each dependency ("postgres", "redis") to "ok" or the
	// error. The errors go to the log (redacted); the public answer shows
	// "unavailable" in their place.
	Checks map[string]string `json:"checks"`
	// Details carries figures worth seeing at a glance, such as a backlog.
	// The public answer keeps only its numbers and booleans: strings may
	// name hosts.
	Details any `json:"details,omitempty"`
}

// Liveness is implemented by a service that can tell it is stuck in a way
// only a restart fixes (a loop that stopped while its dependencies answer).
// Live must not fail because PostgreSQL or Redis is down.
type Liveness interface {
	Live(ctx context.Context) error
}

// checkTimeout bounds each check of [Check].
const checkTimeout = 2 * time.Second

// Unavailable is what the public health answer shows for a failed check.
const Unavailable = "unavailable"

// Check runs each named check with a short deadline and gathers a Health.
func Check(ctx context.Context, checks map[string]func(context.Context) error) Health {
	h := Health{OK: true, Checks: make(map[string]string, len(checks))}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for name, check := range checks {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(ctx, checkTimeout)
			defer cancel()
			result := "ok"
			if err := check(ctx); err != nil {
				result = err.Error()
			}
			mu.Lock()
			defer mu.Unlock()
			h.Checks[name] = result
			h.OK = h.OK && result == "ok"
		})
	}
	wg.Wait()
	return h
}

// healthReport is the public answer of HealthPath.
type healthReport struct {
	Status    string            `json:"status"`
	Functions map[string]Health `json:"functions"`
}

// healthHandler answers HealthPath. It logs a failing check once when it
// starts failing and once when it recovers, with the error the public answer
// leaves out.
type healthHandler struct {
	fns      []Function
	services []Service
	logger   *slog.Logger

	mu      sync.Mutex
	failing map[string]bool // function/check → failing at the last look
}

func (hh *healthHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !httpjson.Method(w, r, http.MethodGet, http.MethodHead) {
		return
	}
	report := healthReport{Status: "ok", Functions: make(map[string]Health, len(hh.services))}
	status := http.StatusOK
	for i, s := range hh.services {
		h := s.Health(r.Context())
		hh.logChanges(r.Context(), hh.fns[i].Name, h)
		report.Functions[hh.fns[i].Name] = public(h)
		if !h.OK {
			report.Status, status = Unavailable, http.StatusServiceUnavailable
		}
	}
	httpjson.Write(w, status, report)
}

func (hh *healthHandler) logChanges(ctx context.Context, fn string, h Health) {
	hh.mu.Lock()
	defer hh.mu.Unlock()
	for check, result := range h.Checks {
		key := fn + "/" + check
		failing := result != "ok"
		switch {
		case failing && !hh.failing[key]:
			hh.logger.WarnContext(ctx, "health check failing", slog.String("function", fn),
				slog.String("check", check), slog.String("error", result))
		case !failing && hh.failing[key]:
			hh.logger.InfoContext(ctx, "health check recovered", slog.String("function", fn), slog.String("check", check))
		}
		hh.failing[key] = failing
	}
}

// public strips what an unauthenticated caller must not see: error texts
// (hosts, users, database names) and string details (host names).
func public(h Health) Health {
	out := Health{OK: h.OK, Checks: make(map[string]string, len(h.Checks))}
	for name, result := range h.Checks {
		if result != "ok" {
			result = Unavailable
		}
		out.Checks[name] = result
	}
	out.Details = figures(h.Details)
	return out
}

// figures keeps the numbers and booleans of a JSON object and nothing else.
func figures(details any) map[string]any {
	if details == nil {
		return nil
	}
	raw, err := json.Marshal(details)
	if err != nil {
		return nil
	}
	var all map[string]any
	if json.Unmarshal(raw, &all) != nil {
		return nil
	}
	kept := make(map[string]any, len(all))
	for k, v := range all {
		switch v.(type) {
		case float64, bool:
			kept[k] = v
		}
	}
	if len(kept) == 0 {
		return nil
	}
	return kept
}

// liveHandler answers LivePath: 200 unless a service implementing
// [Liveness] reports itself stuck.
func liveHandler(fns []Function, services []Service, logger *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !httpjson.Method(w, r, http.MethodGet, http.MethodHead) {
			return
		}
		for i, s := range services {
			l, ok := s.(Liveness)
			if !ok {
				continue
			}
			ctx, cancel := context.WithTimeout(r.Context(), checkTimeout)
			err := l.Live(ctx)
			cancel()
			if err != nil {
				logger.ErrorContext(r.Context(), "liveness check failed; the platform will restart this instance",
					slog.String("function", fns[i].Name), slog.Any("error", err))
				httpjson.Write(w, http.StatusServiceUnavailable, map[string]string{"status": "stuck", "function": fns[i].Name})
				return
			}
		}
		httpjson.Write(w, http.StatusOK, map[string]string{"status": "ok"})
	})
}
