// Command outboxctl operates the pipeline against the configured PostgreSQL
// and Redis (DATABASE_URL, REDIS_URL, REDIS_CLUSTER, STREAM_PREFIX, STREAM_PARTITIONS,
// SENDEMAIL_GROUP, with the functions' defaults).
//
//	outboxctl migrate                       apply pending migrations
//	outboxctl status [-json]                backlog, dead outbox rows, retained events, streams, groups, consumers, dead letters
//	outboxctl outbox-dead list [-count N] [-json]  events the relay could not publish
//	outboxctl outbox-dead requeue (ID... | -all)   move them back into the outbox, event ids kept
//	outboxctl dlq list [-count N] [-json]   dead letters with their reasons
//	outboxctl dlq redrive (ID... | -all)    move dead letters back to their stream
//	outboxctl dlq drop (ID... | -all)       delete dead letters
//	outboxctl replay (-since T | -event-id ID,...) [-dry-run]  publish retained events again
//	outboxctl purge [-older-than 720h]      delete old send records and idempotency keys
//	outboxctl partitions [N]                let the relay start with a new STREAM_PARTITIONS (N, if given, must be it)
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
	"strconv"
	"strings"
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
  status [-json]               outbox backlog and oldest event, dead outbox rows, retained
                               relayed events and the relay's replays under way, stream lengths,
                               each group's pending count and lag, consumers and their idle
                               times, dead letters
  outbox-dead list [-count N] [-json]
                               events the relay could not publish (outbox_dead), oldest first
  outbox-dead requeue (ID... | -all)
                               move them back into the outbox in one transaction, keeping their
                               event ids; refuses them all if one has an invalid aggregate type
  dlq list [-count N] [-json]  dead letters with their reasons and delivery counts
  dlq redrive (ID... | -all)   move dead letters back to their stream, one MULTI/EXEC each
  dlq drop (ID... | -all)      delete dead letters
                               (with STREAM_PARTITIONS above 1: of every partition; an ID that
                               several partitions' dead letters share is given as PARTITION/ID,
                               as dlq list prints them)
  replay (-since TIME [-until TIME] [-type AGGREGATE] | -event-id UUID[,UUID...]) [-dry-run]
                               publish again, to their streams and with the relay's fields, the
                               relayed events the relay still retains (RELAY_RETENTION), in the
                               order it published them: those of the batches relayed from -since
                               until -until (RFC3339, or a duration meaning that long ago; -until
                               defaults to now), of -type only if given; or the events named (a
                               scan of all retained events; if one is not retained, nothing is
                               published). -dry-run prints how many events each stream would get.
                               Consumers may have these events already: they drop the copies by
                               event_id (sendemail: by its send records, which purge keeps)
  partitions                   let the relay start with a new STREAM_PARTITIONS once the streams
                               of the old number are read: checks that every group acknowledged
                               every entry of them, then deletes the relay's records of them
                               (stop the relay first; see README, Changing STREAM_PARTITIONS)
  purge [-older-than 720h]     delete send records and idempotency keys older than that,
                               1000 rows per statement; refuses an age below the largest of
                               24h, RELAY_DEDUPE_WINDOW and RELAY_RETENTION, and keeps the send
                               records created since the oldest event still retained
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
	case "status", "dlq", "purge", "outbox-dead", "replay", "partitions":
		// outbox-dead needs only PostgreSQL, so it works while Redis is down.
		o, closeOps, err := openOps(ctx, cfg, out, args[0] != "outbox-dead")
		if err != nil {
			return err
		}
		defer closeOps()
		return o.command(ctx, args)
	default:
		return fmt.Errorf("%w: unknown command %q", errUsage, args[0])
	}
}

func openOps(ctx context.Context, cfg Config, out io.Writer, withRedis bool) (*ops, func(), error) {
	pool, err := pgxpool.New(ctx, cfg.DatabaseURL)
	if err != nil {
		return nil, nil, fmt.Errorf("open database: %w", err)
	}
	if err := stream.ValidPartitions(max(cfg.StreamPartitions, 1)); err != nil {
		pool.Close()
		return nil, nil, err
	}
	o := &ops{pool: pool, prefix: cfg.StreamPrefix, partitions: cfg.StreamPartitions, group: cfg.Group, out: out,
		dedupeWindow: cfg.DedupeWindow, retention: cfg.Retention}
	if !withRedis {
		return o, pool.Close, nil
	}
	if o.redis, err = stream.NewClient(cfg.RedisURL, cfg.RedisCluster); err != nil {
		pool.Close()
		return nil, nil, err
	}
	return o, func() { o.redis.Close(); pool.Close() }, nil
}

// command runs status, dlq …, outbox-dead …, replay or purge with their
// flags.
func (o *ops) command(ctx context.Context, args []string) error {
	name := args[0]
	if name == "replay" {
		// No time limit: a day of events can take longer than ten
		// minutes, and an interrupted replay only has to be run again.
		return o.replayCommand(ctx, args[1:])
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	if name == "dlq" {
		if len(args) < 2 {
			return fmt.Errorf("%w: dlq needs list, redrive or drop", errUsage)
		}
		name, args = "dlq "+args[1], args[1:]
	}
	if name == "outbox-dead" {
		if len(args) < 2 {
			return fmt.Errorf("%w: outbox-dead needs list or requeue", errUsage)
		}
		name, args = "outbox-dead "+args[1], args[1:]
	}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	asJSON := fs.Bool("json", false, "print JSON")
	count := fs.Int64("count", 100, "at most this many dead letters or rows")
	all := fs.Bool("all", false, "every dead letter or row")
	olderThan := fs.Duration("older-than", 30*24*time.Hour, "age of the records to delete")
	if err := fs.Parse(args[1:]); err != nil {
		return fmt.Errorf("%w: %s: %v", errUsage, name, err)
	}
	// A stray word is a mistake to point out, not to ignore: "purge 1h"
	// must not purge with the default age.
	if name == "partitions" && fs.NArg() == 1 {
		// The relay's refusal names the number; it must be this one.
		if n, err := strconv.Atoi(fs.Arg(0)); err != nil || n != o.numPartitions() {
			return fmt.Errorf("%w: partitions %s: set STREAM_PARTITIONS=%s (now %d) to switch to it", errUsage, fs.Arg(0), fs.Arg(0), o.numPartitions())
		}
	} else if name != "dlq redrive" && name != "dlq drop" && name != "outbox-dead requeue" && fs.NArg() > 0 {
		return fmt.Errorf("%w: %s takes no arguments, got %q", errUsage, name, fs.Args())
	}
	if *count < 0 {
		return fmt.Errorf("%w: %s: -count must be 0 (all) or more, not %d", errUsage, name, *count)
	}
	if strings.HasPrefix(name, "dlq ") {
		if err := o.checkPartitions(ctx); err != nil {
			return err
		}
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
	case "partitions":
		r, err := o.repartition(ctx)
		if err != nil {
			return err
		}
		if len(r.From) == 0 {
			fmt.Fprintf(o.out, "the relay's records are all of %d partitions: nothing to do\n", r.To)
			return nil
		}
		fmt.Fprintf(o.out, "forgot the relay's records of %d streams of %v partitions: start relay, sendemail and outboxctl with STREAM_PARTITIONS=%d\n",
			r.Forgotten, r.From, r.To)
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
			id := d.ID
			if o.numPartitions() > 1 {
				id = fmt.Sprintf("%d/%s", d.Partition, d.ID) // ids repeat across partitions
			}
			fmt.Fprintf(o.out, "%s  event %s (%s)  %s deliveries  failed %s on %s\n    %s\n",
				id, d.EventID, d.EventType, d.Deliveries, d.FailedAt, d.Consumer, d.Error)
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
	case "outbox-dead list":
		dead, err := o.outboxDeadList(ctx, *count)
		if err != nil {
			return err
		}
		if *asJSON {
			return json.NewEncoder(o.out).Encode(dead)
		}
		if len(dead) == 0 {
			fmt.Fprintln(o.out, "no dead outbox rows")
		}
		for _, d := range dead {
			fmt.Fprintf(o.out, "%d  event %s (%s, aggregate %s %s)  dead since %s\n    %s\n",
				d.ID, d.EventID, d.EventType, d.AggregateType, d.AggregateID, d.DeadAt.UTC().Format(time.RFC3339), d.Error)
		}
		return nil
	case "outbox-dead requeue":
		if (fs.NArg() == 0) != *all {
			return fmt.Errorf("%w: %s takes row ids or -all", errUsage, name)
		}
		ids := make([]int64, fs.NArg())
		for i, arg := range fs.Args() {
			id, err := strconv.ParseInt(arg, 10, 64)
			if err != nil {
				return fmt.Errorf("%w: %s: row id %q is not a number", errUsage, name, arg)
			}
			ids[i] = id
		}
		n, err := o.outboxDeadRequeue(ctx, ids)
		if err != nil {
			return err
		}
		fmt.Fprintf(o.out, "%s: %d rows back in the outbox\n", name, n)
		return nil
	case "purge":
		p, err := o.purge(ctx, *olderThan)
		if p.SendsBefore.IsZero() {
			return err // refused, or failed before deleting anything
		}
		if p.Clamped {
			fmt.Fprintf(o.out, "email_sends: keeping the records created since %s, when the oldest event still retained was written "+
				"(outbox_relayed, RELAY_RETENTION): a replay would send those emails again without them\n",
				p.SendsBefore.UTC().Format(time.RFC3339))
		}
		fmt.Fprintf(o.out, "purged %d rows of email_sends created before %s\n", p.Deleted["email_sends"], p.SendsBefore.UTC().Format(time.RFC3339))
		fmt.Fprintf(o.out, "purged %d rows of idempotency_keys older than %s\n", p.Deleted["idempotency_keys"], *olderThan)
		return err
	default:
		return fmt.Errorf("%w: unknown command %q", errUsage, name)
	}
}
