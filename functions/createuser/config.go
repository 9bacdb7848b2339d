package createuser

import (
	"fmt"
	"time"

	"github.com/outboxfn/outbox/shared/logging"
)

// Config is createuser's configuration, read from the environment.
type Config struct {
	logging.Config
	// DatabaseURL is a pgx connection string; a pooler in transaction mode is
	// fine for createuser.
	DatabaseURL string `envconfig:"DATABASE_URL" default:"postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable" desc:"PostgreSQL connection URL (pgx syntax; a Cloud SQL unix socket is host=/cloudsql/PROJECT:REGION:INSTANCE). Default the local server."`
	// DBMaxConns caps the connection pool of one instance.
	DBMaxConns int32 `envconfig:"DB_MAX_CONNS" default:"16" desc:"Largest number of PostgreSQL connections one instance opens. Default 16."`
	// RequestTimeout bounds the database work of one request; past it the
	// request fails with 503 and nothing is written.
	RequestTimeout time.Duration `envconfig:"REQUEST_TIMEOUT" default:"5s" desc:"Deadline for the database work of one request; past it the answer is 503 and nothing is written. Default 5s."`
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
	return nil
}
