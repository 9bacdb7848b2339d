// Command chaos runs the whole pipeline (createuser, two relays, two
// sendemail consumers, each its own process) against a private PostgreSQL
// cluster, a private redis-server and an in-process SMTP server, signs up
// users over HTTP while it breaks things (kill -9, SIGTERM, SIGSTOP, a
// PostgreSQL crash, Redis restarts and flushes, a silent network, a long
// transaction, a misbehaving mail server), waits until the pipeline has
// settled and checks the promise: every committed user got exactly one
// welcome email. It prints one line per scenario, a table, and the same as
// JSON (-out), and exits 1 when an email was lost or a user got a second,
// different one.
//
//	go run ./local/chaos                         # every scenario, then a mixed one
//	go run ./local/chaos -scenarios redis,kill9  # names containing either word
//	go run ./local/chaos -short                  # one short mixed scenario
//	go run ./local/chaos -scenarios mixed -seed 42   # replay a mixed schedule
//
// It never touches the shared PostgreSQL (5432) or Redis (6379): everything
// it starts is private, on free loopback ports, in a temporary directory
// removed at the end (also on Ctrl-C).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/outboxfn/outbox/shared/tcpproxy"
)

// options are the command's flags.
type options struct {
	seed      uint64
	scenarios string
	signups   int
	short     bool
	faults    int // faults in a mixed scenario; 0: 5 (3 with -short)
	out       string
	keepLogs  bool
	settle    time.Duration
	stdout    io.Writer
}

func main() {
	var o options
	flag.Uint64Var(&o.seed, "seed", 0, "seed of the mixed scenario's schedule and of each fault's choice of instance (0: from the clock; printed, to replay)")
	flag.StringVar(&o.scenarios, "scenarios", "", "comma-separated scenarios to run; each item selects every scenario whose name contains it (empty: all; see -list)")
	flag.IntVar(&o.signups, "signups", 0, "signups per scenario (0: 300, or 200 with -short)")
	flag.BoolVar(&o.short, "short", false, "run one short mixed scenario only")
	flag.IntVar(&o.faults, "faults", 0, "faults in a mixed scenario (0: 5, or 3 with -short)")
	flag.StringVar(&o.out, "out", "", "write the verdicts as JSON to this file")
	flag.BoolVar(&o.keepLogs, "keep-logs", false, "keep the processes' logs even when every scenario passes (they are kept when one fails)")
	flag.DurationVar(&o.settle, "settle", 90*time.Second, "longest wait for the pipeline to settle after the load and faults")
	list := flag.Bool("list", false, "list the scenarios and exit")
	flag.Parse()
	if *list {
		for _, f := range faults {
			fmt.Printf("%-24s %s\n", f.name, f.what)
		}
		fmt.Printf("%-24s %s\n", "mixed", "several of the above at seeded random moments of one load")
		return
	}
	o.stdout = os.Stdout

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	verdicts, err := run(ctx, o)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "chaos:", err)
		os.Exit(2)
	}
	for _, v := range verdicts {
		if !v.Pass {
			os.Exit(1)
		}
	}
}

// scenario is one named run: a load and the faults planned during it.
type scenario struct {
	name string
	plan []planned
}

// loadDuration spreads n signups at about 25 a second, over at least 10 s.
func loadDuration(n int) time.Duration {
	return max(10*time.Second, time.Duration(n)*time.Second/25)
}

// selectScenarios returns the scenarios o asks for: each fault alone, at a
// third of the load, then one mixed scenario drawn from rnd.
func selectScenarios(o options, rnd *rand.Rand) ([]scenario, error) {
	load := loadDuration(o.signups)
	mixed := scenario{name: "mixed", plan: mixedPlan(rnd, min(o.faults, len(faults)), load)}
	if o.short {
		return []scenario{mixed}, nil
	}
	var all []scenario
	for _, f := range faults {
		all = append(all, scenario{name: f.name, plan: []planned{{At: load / 3, Fault: f.name}}})
	}
	all = append(all, mixed)
	if o.scenarios == "" {
		return all, nil
	}
	var out []scenario
	for _, s := range all {
		for _, want := range strings.Split(o.scenarios, ",") {
			if want = strings.TrimSpace(want); want != "" && strings.Contains(s.name, want) {
				out = append(out, s)
				break
			}
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no scenario matches -scenarios %q (see -list)", o.scenarios)
	}
	return out, nil
}

// run sets up the private servers, runs the scenarios o selects one after
// another, prints and writes the verdicts, and tears everything down.
func run(ctx context.Context, o options) (verdicts []*verdict, err error) {
	if o.seed == 0 {
		o.seed = uint64(time.Now().UnixNano())
	}
	if o.signups == 0 {
		o.signups = 300
		if o.short {
			o.signups = 200
		}
	}
	if o.faults == 0 {
		o.faults = 5
		if o.short {
			o.faults = 3
		}
	}
	if o.settle == 0 {
		o.settle = 90 * time.Second
	}
	out := o.stdout
	if out == nil {
		out = io.Discard
	}
	// Faults report from their own goroutines.
	var outMu sync.Mutex
	logf := func(format string, args ...any) {
		outMu.Lock()
		defer outMu.Unlock()
		fmt.Fprintf(out, time.Now().Format("15:04:05 ")+format+"\n", args...)
	}
	scenarios, err := selectScenarios(o, rand.New(rand.NewPCG(o.seed, 0)))
	if err != nil {
		return nil, err
	}
	if err := checkInstalled(); err != nil {
		return nil, err
	}
	logf("chaos: seed %d (replay with -seed %d), %d scenarios, %d signups each", o.seed, o.seed, len(scenarios), o.signups)

	dir, err := os.MkdirTemp("", "chaos-")
	if err != nil {
		return nil, fmt.Errorf("create the run's directory: %w", err)
	}
	defer os.RemoveAll(dir)
	logs, err := os.MkdirTemp("", "chaos-logs-")
	if err != nil {
		return nil, fmt.Errorf("create the log directory: %w", err)
	}
	defer func() {
		failed := err != nil && !errors.Is(err, errMissing)
		for _, v := range verdicts {
			failed = failed || !v.Pass
		}
		if failed || o.keepLogs {
			logf("chaos: process logs kept in %s", logs)
			return
		}
		os.RemoveAll(logs)
	}()

	in := &infra{dir: dir, logf: logf}
	logf("chaos: building the three functions")
	if in.bins, err = buildFunctions(ctx, filepath.Join(dir, "bin")); err != nil {
		return nil, err
	}
	logf("chaos: starting a private PostgreSQL 15 cluster and redis-server")
	if in.pg, err = startPostgres(ctx, dir); err != nil {
		return nil, err
	}
	defer in.pg.Stop()
	if in.redis, err = startRedis(ctx, dir); err != nil {
		return nil, err
	}
	defer in.redis.Stop()
	in.tb = &proxyTB{logf: func(string, ...any) {}}
	defer in.tb.close()
	redisAddr := strings.TrimSuffix(strings.TrimPrefix(in.redis.URL(), "redis://"), "/0")
	for range 2 {
		in.proxies = append(in.proxies, tcpproxy.Start(in.tb, in.pg.Addr()))
		in.senderPG = append(in.senderPG, tcpproxy.Start(in.tb, in.pg.Addr()))
		in.senderRedis = append(in.senderRedis, tcpproxy.Start(in.tb, redisAddr))
	}
	in.logDir = logs

	runStart := time.Now()
	for i, sc := range scenarios {
		if ctx.Err() != nil {
			return verdicts, ctx.Err()
		}
		v, err := in.runScenario(ctx, i+1, sc, o)
		if err != nil {
			return verdicts, fmt.Errorf("scenario %s: %w", sc.name, err)
		}
		verdicts = append(verdicts, v)
		outMu.Lock()
		fmt.Fprintln(out, v.line())
		outMu.Unlock()
	}
	fmt.Fprintf(out, "\nchaos: seed %d, %d scenarios in %s\n\n", o.seed, len(verdicts), time.Since(runStart).Round(time.Second))
	writeTable(out, verdicts)
	if o.out != "" {
		b, err := json.MarshalIndent(map[string]any{"seed": o.seed, "signups": o.signups, "verdicts": verdicts}, "", "  ")
		if err != nil {
			return verdicts, fmt.Errorf("encode verdicts: %w", err)
		}
		if err := os.WriteFile(o.out, append(b, '\n'), 0o644); err != nil {
			return verdicts, fmt.Errorf("write %s: %w", o.out, err)
		}
	}
	return verdicts, nil
}

// runScenario starts a fresh pipeline, drives the load while the planned
// faults happen, waits until it settles, and judges it.
func (in *infra) runScenario(ctx context.Context, index int, sc scenario, o options) (*verdict, error) {
	began := time.Now()
	s, err := in.newStage(ctx, index, sc.name, o.signups)
	if err != nil {
		return nil, err
	}
	defer s.close()
	v := &verdict{Scenario: sc.name, Seed: o.seed, Plan: sc.plan, Signups: o.signups, Logs: s.logDir}
	desc := make([]string, len(sc.plan))
	for i, p := range sc.plan {
		f, _ := findFault(p.Fault)
		if f.ambiguous {
			v.Ambiguous = true
			v.AmbiguousBudget += ambiguousCopies(o.signups)
		}
		desc[i] = fmt.Sprintf("%s at %s", p.Fault, p.At)
	}
	in.logf("chaos: %s: %d signups over %s; %s", sc.name, o.signups, loadDuration(o.signups), strings.Join(desc, ", "))

	loadStart := time.Now()
	var wg sync.WaitGroup
	var mu sync.Mutex
	for j, p := range sc.plan {
		f, ok := findFault(p.Fault)
		if !ok {
			return nil, fmt.Errorf("no fault named %q", p.Fault)
		}
		// Each fault its own generator: the same seed picks the same
		// instances whatever the timing.
		rnd := rand.New(rand.NewPCG(o.seed, uint64(index*100+j+1)))
		wg.Go(func() {
			sleep(ctx, time.Until(loadStart.Add(p.At)))
			if ctx.Err() != nil {
				return
			}
			t := time.Now()
			err := f.apply(ctx, s, rnd)
			in.logf("chaos: %s: %s done in %s", sc.name, f.name, time.Since(t).Round(time.Millisecond))
			if err != nil {
				mu.Lock()
				v.FaultErrors = append(v.FaultErrors, fmt.Sprintf("%s: %v", f.name, err))
				mu.Unlock()
			}
		})
	}
	load := signUp(ctx, s.createuser.base(), s.tag, o.signups, loadDuration(o.signups))
	wg.Wait()
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	v.Acked, v.GaveUp, v.Refused, v.Retries = len(load.created), load.gaveUp, load.refused, load.retries
	for _, e := range load.examples {
		v.FaultErrors = append(v.FaultErrors, "signup refused: "+e)
	}

	settled, took, why := s.settle(ctx, o.settle, time.Now())
	v.Settled, v.SettleSeconds, v.NotSettled = settled, took.Seconds(), why
	for _, p := range s.all {
		if err := p.live(ctx, 3*time.Second); err != nil {
			p.record("hung: /health/live did not answer: %v", err)
		}
	}
	if err := s.judge(ctx, v, load); err != nil {
		return nil, err
	}
	// Stop the processes before reading their problems: an unclean
	// shutdown is one.
	for _, p := range s.all {
		p.Stop()
	}
	v.Problems = s.problems()
	v.LogWarnings = logWarnings(s.all)
	for what, n := range v.LogWarnings {
		if strings.HasPrefix(what, "sendemail WARNING: no answer to the message data") {
			v.AmbiguousSends += n
		}
	}
	v.TotalSeconds = time.Since(began).Seconds()
	v.decide()
	if errors.Is(ctx.Err(), context.Canceled) {
		return nil, ctx.Err()
	}
	return v, nil
}

// mkdirAll creates dir and its parents.
func mkdirAll(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	return nil
}
