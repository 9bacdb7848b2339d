package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/outboxfn/outbox/functions/createuser"
	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/pgtest"
	"github.com/outboxfn/outbox/shared/telemetry"
)

// directCreate is documented to write the same rows as createuser, so that
// only the function's own work tells the two apart. With -telemetry the
// tracer provider is startTelemetry's ParentBased(TraceIDRatioBased(ratio)):
// createuser's span context is valid at every ratio, so every event it
// writes carries a traceparent (flags 00 when unsampled). The baseline must
// store one at the same ratios, or the HTTP side writes (and the relay
// reads) bytes the baseline does not.
func TestTheBaselineStoresATraceparentWheneverCreateuserDoes(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name  string
		ratio float64
	}{{"with no trace sampled (-trace-ratio 0)", 0}, {"with one in ten sampled", 0.1}, {"with every trace sampled", 1}} {
		ratio := tt.ratio
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			url, pool := pgtest.NewPool(t)
			tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(ratio))))
			defer func() { _ = tp.Shutdown(ctx) }()
			svc, err := createuser.New(ctx, createuser.Config{Config: quiet, DatabaseURL: url, DBMaxConns: 2,
				RequestTimeout: 10 * time.Second, Telemetry: telemetry.Providers{Tracer: tp}}, logging.New(nopWriter{}, quiet))
			require.NoError(t, err)
			defer svc.Close()
			req := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(`{"email":"h@example.com","name":"Bench User"}`))
			req.Header.Set("Content-Type", "application/json")
			rec := httptest.NewRecorder()
			svc.ServeHTTP(rec, req)
			require.Equal(t, http.StatusCreated, rec.Code, rec.Body.String())
			require.NoError(t, directCreate(ctx, pool, "d@example.com", tracing{on: true, ratio: ratio}))

			var viaHTTP, viaPgx string
			require.NoError(t, pool.QueryRow(ctx, `SELECT
				(SELECT coalesce(traceparent, '') FROM outbox WHERE payload->>'email' = 'h@example.com'),
				(SELECT coalesce(traceparent, '') FROM outbox WHERE payload->>'email' = 'd@example.com')`).Scan(&viaHTTP, &viaPgx))
			assert.NotEmpty(t, viaHTTP, "createuser stores a traceparent")
			assert.Equal(t, len(viaHTTP), len(viaPgx), "the baseline stores one of the same size (HTTP %q, pgx %q)", viaHTTP, viaPgx)
		})
	}
}
