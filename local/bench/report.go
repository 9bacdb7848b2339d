package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/rueidis"

	"github.com/outboxfn/outbox/shared/pgtest"
	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/stream"
)

// Figure is one measured figure and, where there is one, the baseline it is
// compared with.
type Figure struct {
	Name     string  `json:"name"`
	Value    float64 `json:"value"`
	Unit     string  `json:"unit"`
	Baseline string  `json:"baseline,omitempty"`
	// BaselineValue is in the same unit as Value.
	BaselineValue float64 `json:"baseline_value,omitempty"`
	// Ratio is Value / BaselineValue.
	Ratio float64 `json:"ratio,omitempty"`
	// Target is the goal, as text ("ratio >= 0.8", "<= 3 ms").
	Target string `json:"target,omitempty"`
	// Met says whether the target was met; nil when there is none.
	Met   *bool  `json:"met,omitempty"`
	Notes string `json:"notes,omitempty"`
}

func compare(name string, value float64, unit, baseline string, baseValue float64) Figure {
	f := Figure{Name: name, Value: value, Unit: unit, Baseline: baseline, BaselineValue: baseValue}
	if baseValue > 0 {
		f.Ratio = value / baseValue
	}
	return f
}

func (f Figure) target(text string, met bool) Figure {
	f.Target, f.Met = text, &met
	return f
}

func (f Figure) note(text string) Figure {
	f.Notes = text
	return f
}

// Machine is what the figures were measured on.
type Machine struct {
	Cores    int    `json:"cores"`
	Go       string `json:"go"`
	Postgres string `json:"postgres"`
	Redis    string `json:"redis"`
	// SynchronousCommit matters for every commit-bound figure.
	SynchronousCommit string `json:"synchronous_commit"`
}

// Report is the whole run.
type Report struct {
	StartedAt time.Time     `json:"started_at"`
	Duration  time.Duration `json:"duration_ns"`
	Machine   Machine       `json:"machine"`
	Settings  Settings      `json:"settings"`
	Figures   []Figure      `json:"figures"`
}

// env is the database and Redis prefix of one run.
type env struct {
	dbURL  string
	pool   *pgxpool.Pool
	redis  rueidis.Client
	prefix string
	drop   func(context.Context) error
	out    io.Writer
}

func newEnv(ctx context.Context, out io.Writer) (*env, error) {
	// A database of its own per run: a benchmark and the smoke run of
	// make test may run at the same time, and creating a database drops any
	// of the same name.
	url, drop, err := pgtest.Create(ctx, "outbox_bench_"+randomHex(4))
	if err != nil {
		return nil, err
	}
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		return nil, err
	}
	client, err := stream.NewClient(redistest.URL(), false)
	if err != nil {
		pool.Close()
		return nil, err
	}
	return &env{dbURL: url, pool: pool, redis: client, prefix: "bench:" + randomHex(4) + ":", drop: drop, out: out}, nil
}

func (e *env) close(ctx context.Context) {
	e.deleteKeys(ctx, e.prefix)
	e.redis.Close()
	e.pool.Close()
	_ = e.drop(ctx)
}

// freshPrefix returns a new stream prefix under the run's prefix.
func (e *env) freshPrefix(name string) string { return e.prefix + name + ":" + randomHex(2) + ":" }

func (e *env) deleteKeys(ctx context.Context, prefix string) {
	var cursor uint64
	for {
		scan, err := e.redis.Do(ctx, e.redis.B().Scan().Cursor(cursor).Match(prefix+"*").Count(1000).Build()).AsScanEntry()
		if err != nil {
			return
		}
		if len(scan.Elements) > 0 {
			_ = e.redis.Do(ctx, e.redis.B().Unlink().Key(scan.Elements...).Build()).Error()
		}
		if scan.Cursor == 0 {
			return
		}
		cursor = scan.Cursor
	}
}

func (e *env) logf(format string, args ...any) {
	fmt.Fprintf(e.out, "  "+format+"\n", args...)
}

func (e *env) machine(ctx context.Context) Machine {
	m := Machine{Cores: runtime.NumCPU(), Go: runtime.Version()}
	_ = e.pool.QueryRow(ctx, `SELECT current_setting('server_version'), current_setting('synchronous_commit')`).
		Scan(&m.Postgres, &m.SynchronousCommit)
	if info, err := e.redis.Do(ctx, e.redis.B().Info().Section("server").Build()).ToString(); err == nil {
		for _, line := range strings.Split(info, "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "redis_version:"); ok {
				m.Redis = v
			}
		}
	}
	return m
}

// Run measures everything (or the steps whose name contains only) and
// prints the table to out.
func Run(ctx context.Context, s Settings, only string, out io.Writer) (*Report, error) {
	start := time.Now()
	e, err := newEnv(ctx, out)
	if err != nil {
		return nil, err
	}
	defer e.close(context.WithoutCancel(ctx))
	r := &Report{StartedAt: start.UTC(), Machine: e.machine(ctx), Settings: s}
	fmt.Fprintf(out, "machine: %d cores, %s, PostgreSQL %s (synchronous_commit=%s), Redis %s\n",
		r.Machine.Cores, r.Machine.Go, r.Machine.Postgres, r.Machine.SynchronousCommit, r.Machine.Redis)
	fmt.Fprintf(out, "settings: %d clients, %d rounds of %s, pool %d, backlog %d (naive %d), wake-up %d/s for %s, %d entries (%d over SMTP), RSS at %v\n\n",
		s.Clients, s.Rounds, s.Round, s.PoolSize, s.Backlog, s.NaiveBacklog, s.WakeRate, s.WakeDuration, s.Entries, s.SMTPEntries, s.RSSBacklogs)

	steps := []struct {
		name string
		run  func(context.Context, *env, Settings) ([]Figure, error)
	}{
		{"createuser over HTTP vs the same transaction over pgx", benchCreateUser},
		{"doorbell cost", benchDoorbell},
		{"relay drain", benchDrain},
		{"relay WAIT", benchWait},
		{"wake-up latency", benchWakeup},
		{"idle relay", benchIdle},
		{"sendemail", benchSendEmail},
		// Not named after the relay or sendemail, so that -only drain or
		// -only sendemail does not start a cluster too.
		{"cluster (3 shards vs the single Redis)", benchCluster},
		{"relay memory", benchMemory},
	}
	for _, step := range steps {
		if !strings.Contains(step.name, only) {
			continue
		}
		fmt.Fprintf(out, "%s...\n", step.name)
		// A step must not pay for the previous one's dead rows: a drain of
		// 400k rows leaves an index full of dead entries, and autovacuum
		// cleaning them up would run during the next measurement.
		// Nor inherit its retained events: the relay keys its records by
		// aggregate type, and a relay of the next step, with streams of
		// another prefix, would find them gone and publish them again.
		if _, err := e.pool.Exec(ctx, `TRUNCATE outbox_retained, outbox_relayed_rows, outbox_relay_batches, outbox_streams`); err != nil {
			return nil, fmt.Errorf("clear retained events before %s: %w", step.name, err)
		}
		if _, err := e.pool.Exec(ctx, `VACUUM ANALYZE`); err != nil {
			return nil, fmt.Errorf("vacuum before %s: %w", step.name, err)
		}
		figures, err := step.run(ctx, e, s)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", step.name, err)
		}
		r.Figures = append(r.Figures, figures...)
	}
	r.Duration = time.Since(start)
	fmt.Fprintf(out, "\nresults (%s):\n\n", r.Duration.Round(time.Second))
	printTable(out, r.Figures)
	return r, nil
}

func printTable(out io.Writer, figures []Figure) {
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "figure\tvalue\tbaseline\tratio\ttarget\t")
	for _, f := range figures {
		base, ratio := "", ""
		if f.Baseline != "" {
			base = fmt.Sprintf("%s %s (%s)", num(f.BaselineValue), f.Unit, f.Baseline)
		}
		if f.Ratio != 0 {
			ratio = fmt.Sprintf("%.2f", f.Ratio)
		}
		target := f.Target
		if f.Met != nil {
			target += map[bool]string{true: " ✓", false: " ✗ MISSED"}[*f.Met]
		}
		fmt.Fprintf(tw, "%s\t%s %s\t%s\t%s\t%s\t\n", f.Name, num(f.Value), f.Unit, base, ratio, target)
	}
	_ = tw.Flush()
}

func num(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

// percentile returns the p-th percentile (0-100) of ds, sorting it.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	i := int(float64(len(ds)-1) * p / 100)
	return ds[i]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
