// Command outboxctl operates the pipeline against the configured PostgreSQL
// and Redis: it applies migrations, and reports and repairs what the
// functions are doing.
//
//	outboxctl migrate        apply pending migrations
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"

	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/pg"
)

const usage = `usage: outboxctl <command>

commands:
  migrate          apply pending migrations to DATABASE_URL
  envdoc FILE      regenerate the configuration tables in FILE (README.md)
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "outboxctl:", err)
		stop()
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return fmt.Errorf("no command given")
	}
	url := os.Getenv("DATABASE_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	switch args[0] {
	case "migrate":
		version, err := pg.Migrate(ctx, url, logging.New(os.Stderr, logging.Config{LogFormat: "text", LogLevel: "info"}))
		if err != nil {
			return err
		}
		fmt.Printf("schema at version %d\n", version)
		return nil
	case "envdoc":
		if len(args) != 2 {
			return fmt.Errorf("usage: outboxctl envdoc README.md")
		}
		return writeEnvdoc(args[1])
	default:
		fmt.Fprint(os.Stderr, usage)
		return fmt.Errorf("unknown command %q", args[0])
	}
}
