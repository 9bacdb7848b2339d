// Command outboxctl operates the pipeline against the configured PostgreSQL
// and Redis (DATABASE_URL, REDIS_URL, STREAM_PREFIX, SENDEMAIL_GROUP, with
// the functions' defaults).
//
//	outboxctl migrate                       apply pending migrations
//	outboxctl status [-json]                backlog, streams, groups, consumers, dead letters
//	outboxctl dlq list [-count N] [-json]   dead letters with their reasons
//	outboxctl dlq redrive (ID... | -all)    move dead letters back to their stream
//	outboxctl dlq drop (ID... | -all)       delete dead letters
//	outboxctl purge [-older-than 720h]      delete old send records and idempotency keys
//	outboxctl envdoc README.md              regenerate the README's configuration tables
//	outboxctl render [-set|-text N=V]... F  fill a Cloud Run manifest's ${N} placeholders, quoted
//	outboxctl budget [-max-connections N] F...  PostgreSQL connections of the services at full scale
//	outboxctl help                          this list
//
// It exits 2 for a usage error, 1 when the command failed.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outboxfn/outbox/shared/config"
	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/pg"
	"github.com/outboxfn/outbox/shared/stream"
)

const usage = `usage: outboxctl <command> [flags]

commands:
  migrate                      apply pending migrations to DATABASE_URL
  status [-json]               outbox backlog and oldest event, stream lengths, each group's
                               pending count and lag, consumers and their idle times, dead letters
  dlq list [-count N] [-json]  dead letters with their reasons and delivery counts
  dlq redrive (ID... | -all)   move dead letters back to their stream, one MULTI/EXEC each
  dlq drop (ID... | -all)      delete dead letters
  purge [-older-than 720h]     delete send records and idempotency keys older than that,
                               1000 rows per statement
  envdoc FILE                  regenerate the configuration tables in FILE (README.md)
  render [-set NAME=VALUE]... [-text NAME=VALUE]... FILE
                               print a Cloud Run manifest with its ${NAME} placeholders filled
                               and quoted (-set: plain names and images; -text: one line of text)
  budget [-max-connections 100] [-reserve 10] FILE...
                               PostgreSQL connections of the services at full scale; fails
                               when they exceed max_connections
  help                         this text

Exit status: 0 done, 1 failed, 2 usage error.
`

var errUsage = errors.New("usage")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	code := exit(run(ctx, os.Args[1:], os.Stdout), os.Stderr)
	stop()
	os.Exit(code)
}

// exit reports err on stderr (credentials redacted) and returns the exit
// status: 2 for a usage error, as Go's own tools do, 1 for a failure.
func exit(err error, stderr io.Writer) int {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintln(stderr, "outboxctl:", logging.Redact(err.Error()))
		fmt.Fprint(stderr, usage)
		return 2
	default:
		fmt.Fprintln(stderr, "outboxctl:", logging.Redact(err.Error()))
		return 1
	}
}

func run(ctx context.Context, args []string, out io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: no command given", errUsage)
	}
	// Commands that work on files only, and need no configuration.
	switch args[0] {
	case "help", "-h", "-help", "--help":
		_, err := io.WriteString(out, usage)
		return err
	case "render":
		return runRender(args[1:], out)
	case "budget":
		return runBudget(args[1:], out)
	}
	var cfg Config
	if err := config.Load(&cfg); err != nil {
		return err
	}
	switch args[0] {
	case "envdoc":
		if len(args) != 2 {
			return fmt.Errorf("%w: envdoc takes one file", errUsage)
		}
		return writeEnvdoc(args[1])
	case "migrate":
		version, err := pg.Migrate(ctx, cfg.DatabaseURL, logging.New(os.Stderr, logging.Config{LogFormat: "text", LogLevel: "info"}))
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "schema at version %d\n", version)
		return nil
	case "status", "dlq", "purge":
		o, closeOps, err := openOps(ctx, cfg, out)
		if err != nil {
			return err
		}
		defer closeOps()
		return o.command(ctx, args)
	default:
		return fmt.Errorf("%w: unknown command %q", errUsage, args[0])
	}
}

func openOps(ctx context.Context, cfg Config, out io.Writer) (*ops, func(), error) {
	pool, err := pgxpool.New(ctx, cfg.DatabaseURL)
	if err != nil {
		return nil, nil, fmt.Errorf("open database: %w", err)
	}
	client, err := stream.NewClient(cfg.RedisURL)
	if err != nil {
		pool.Close()
		return nil, nil, err
	}
	o := &ops{pool: pool, redis: client, prefix: cfg.StreamPrefix, group: cfg.Group, out: out, dedupeWindow: cfg.DedupeWindow}
	return o, func() { client.Close(); pool.Close() }, nil
}

// command runs status, dlq … or purge with their flags.
func (o *ops) command(ctx context.Context, args []string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	name := args[0]
	if name == "dlq" {
		if len(args) < 2 {
			return fmt.Errorf("%w: dlq needs list, redrive or drop", errUsage)
		}
		name, args = "dlq "+args[1], args[1:]
	}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	asJSON := fs.Bool("json", false, "print JSON")
	count := fs.Int64("count", 100, "at most this many dead letters")
	all := fs.Bool("all", false, "every dead letter")
	olderThan := fs.Duration("older-than", 30*24*time.Hour, "age of the records to delete")
	if err := fs.Parse(args[1:]); err != nil {
		return fmt.Errorf("%w: %s: %v", errUsage, name, err)
	}
	// A stray word is a mistake to point out, not to ignore: "purge 1h"
	// must not purge with the default age.
	if name != "dlq redrive" && name != "dlq drop" && fs.NArg() > 0 {
		return fmt.Errorf("%w: %s takes no arguments, got %q", errUsage, name, fs.Args())
	}
	if *count < 0 {
		return fmt.Errorf("%w: %s: -count must be 0 (all) or more, not %d", errUsage, name, *count)
	}
	switch name {
	case "status":
		s, err := o.status(ctx)
		if err != nil {
			return err
		}
		if *asJSON {
			return json.NewEncoder(o.out).Encode(s)
		}
		printStatus(o.out, s)
		return nil
	case "dlq list":
		letters, err := o.dlqList(ctx, *count)
		if err != nil {
			return err
		}
		if *asJSON {
			return json.NewEncoder(o.out).Encode(letters)
		}
		if len(letters) == 0 {
			fmt.Fprintln(o.out, "no dead letters")
		}
		for _, d := range letters {
			fmt.Fprintf(o.out, "%s  event %s (%s)  %s deliveries  failed %s on %s\n    %s\n",
				d.ID, d.EventID, d.EventType, d.Deliveries, d.FailedAt, d.Consumer, d.Error)
		}
		return nil
	case "dlq redrive", "dlq drop":
		ids := fs.Args()
		if (len(ids) == 0) != *all {
			return fmt.Errorf("%w: %s takes entry ids or -all", errUsage, name)
		}
		act := o.dlqRedrive
		if name == "dlq drop" {
			act = o.dlqDrop
		}
		n, err := act(ctx, ids)
		fmt.Fprintf(o.out, "%s: %d dead letters\n", name, n)
		return err
	case "purge":
		deleted, err := o.purge(ctx, *olderThan)
		for table, n := range deleted {
			fmt.Fprintf(o.out, "purged %d rows of %s older than %s\n", n, table, *olderThan)
		}
		return err
	default:
		return fmt.Errorf("%w: unknown command %q", errUsage, name)
	}
}
