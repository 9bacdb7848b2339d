package createuser

import (
	"fmt"
	"time"

	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/telemetry"
)

// Config is createuser's configuration, read from the environment.
type Config struct {
	logging.Config
	// Telemetry is where traces and metrics go; the zero value means
	// otel's global providers (no-ops unless telemetry.Setup ran).
	Telemetry telemetry.Providers `ignored:"true"`
	// DatabaseURL is a pgx connection string; a pooler in transaction mode is
	// fine for createuser.
	DatabaseURL string `envconfig:"DATABASE_URL" default:"postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable" desc:"PostgreSQL connection URL (pgx syntax; a Cloud SQL unix socket is host=/cloudsql/PROJECT:REGION:INSTANCE). Default the local server."`
	// DBMaxConns caps the connection pool of one instance.
	DBMaxConns int32 `envconfig:"DB_MAX_CONNS" default:"16" desc:"Largest number of PostgreSQL connections one instance opens. Default 16."`
	// RequestTimeout bounds the database work of one request; past it the
	// request fails with 503 and nothing is written.
	RequestTimeout time.Duration `envconfig:"REQUEST_TIMEOUT" default:"5s" desc:"Deadline for the database work of one request; past it the answer is 503 and nothing is written. A COMMIT already sent is not cut: it may run up to 3s past it, and its answer says what it did. Default 5s."`
	// RateLimitWindow is the period both abuse limits count over; a bucket
	// refills steadily, one request every window/limit.
	RateLimitWindow time.Duration `envconfig:"RATE_LIMIT_WINDOW" default:"1h" desc:"Period the abuse limits count over; each refills steadily (one request every window/limit), shared by all instances through PostgreSQL. Default 1h."`
	// RateLimitPerAddress caps the sign-ups one client address (an IPv6
	// client's /64) may make per window; 0 turns the limit off.
	RateLimitPerAddress int `envconfig:"RATE_LIMIT_PER_ADDRESS" default:"20" desc:"Most sign-ups per RATE_LIMIT_WINDOW from one client address (IPv6: one /64); past it the answer is 429 with Retry-After. 0 turns the limit off. Default 20."`
	// RateLimitPerDomain caps the sign-ups per window for addresses at one
	// recipient domain; 0 turns the limit off.
	RateLimitPerDomain int `envconfig:"RATE_LIMIT_PER_DOMAIN" default:"200" desc:"Most sign-ups per RATE_LIMIT_WINDOW for addresses at one email domain (after IDNA mapping), counted only for requests the address limit let through. 0 turns the limit off. Default 200."`
	// ForwardedHops is how many trusted proxies append to X-Forwarded-For
	// in front of createuser; the client address is the entry that many
	// from the end. 0 uses the connection's peer address.
	ForwardedHops int `envconfig:"FORWARDED_HOPS" default:"1" desc:"Proxies in front of createuser that append to X-Forwarded-For; the client address is the entry this many from the end (1: Cloud Run at its own URL; 2: behind a Google external Application Load Balancer; 0: ignore the header, use the connection's peer). Default 1."`
	// OmitNameFromEvent leaves the user's name out of the user.created
	// event, so that no text the user typed reaches the welcome email.
	OmitNameFromEvent bool `envconfig:"EVENT_OMIT_NAME" default:"false" desc:"Leave the name out of the user.created event (it is still stored with the user), so that the welcome email carries no text the user typed except the address. Default false."`
}

// Validate checks ranges envconfig cannot.
func (c Config) Validate() error {
	if err := c.Config.Validate(); err != nil {
		return err
	}
	if c.DBMaxConns < 1 {
		return fmt.Errorf("DB_MAX_CONNS must be at least 1, not %d", c.DBMaxConns)
	}
	if c.RequestTimeout <= 0 {
		return fmt.Errorf("REQUEST_TIMEOUT must be positive, not %s", c.RequestTimeout)
	}
	if c.RateLimitPerAddress < 0 {
		return fmt.Errorf("RATE_LIMIT_PER_ADDRESS must be 0 (off) or more, not %d", c.RateLimitPerAddress)
	}
	if c.RateLimitPerDomain < 0 {
		return fmt.Errorf("RATE_LIMIT_PER_DOMAIN must be 0 (off) or more, not %d", c.RateLimitPerDomain)
	}
	if (c.RateLimitPerAddress > 0 || c.RateLimitPerDomain > 0) && c.RateLimitWindow < time.Second {
		return fmt.Errorf("RATE_LIMIT_WINDOW must be at least 1s while a rate limit is on, not %s", c.RateLimitWindow)
	}
	if c.ForwardedHops < 0 || c.ForwardedHops > 16 {
		return fmt.Errorf("FORWARDED_HOPS must be 0 to 16, not %d", c.ForwardedHops)
	}
	return nil
}
