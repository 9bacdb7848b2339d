// Command bench measures the pipeline on the local PostgreSQL and
// Redis, each figure against a baseline measured in the same run, because
// absolute numbers on a shared machine drift. `make bench` runs it; it prints
// one table and writes the same figures as JSON.
//
//	bench [-out bench-results.json] [-smoke] [-telemetry [-trace-ratio 1]]
//
// -telemetry turns tracing (every trace sampled, or the share -trace-ratio
// gives) and metrics on, exported over OTLP to a sink in the process, to
// measure what they cost.
//
// -smoke runs every measurement on tiny sizes, to prove it still works; its
// figures mean nothing.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"time"
)

func main() {
	out := flag.String("out", "bench-results.json", "where to write the figures as JSON")
	smoke := flag.Bool("smoke", false, "tiny sizes: check that every measurement runs, not how fast")
	rssChild := flag.String("rss-child", "", "internal: drain the outbox of this database URL and report peak RSS")
	rssPrefix := flag.String("rss-prefix", "", "internal: stream prefix for -rss-child")
	only := flag.String("only", "", "run only the measurement whose name contains this")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the run to this file")
	withTelemetry := flag.Bool("telemetry", false, "trace every request, event and batch, and record metrics, exported over OTLP to a sink in this process")
	traceRatio := flag.Float64("trace-ratio", 1, "with -telemetry, the share of traces sampled")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if *rssChild != "" {
		if err := rssChildMain(ctx, *rssChild, *rssPrefix); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench: cpu profile:", err)
			os.Exit(1)
		}
		defer pprof.StopCPUProfile()
	}
	if *withTelemetry {
		stopTelemetry, err := startTelemetry(ctx, *traceRatio)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench: telemetry:", err)
			os.Exit(1)
		}
		defer func() { fmt.Printf("telemetry: %d bytes of OTLP exported\n", stopTelemetry()) }()
	}
	settings := fullSettings
	if *smoke {
		settings = smokeSettings
	}
	settings.Traced, settings.TraceRatio = *withTelemetry, *traceRatio
	report, err := Run(ctx, settings, *only, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	b, err := json.MarshalIndent(report, "", "  ")
	if err == nil {
		err = os.WriteFile(*out, append(b, '\n'), 0o644)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench: write results:", err)
		os.Exit(1)
	}
	fmt.Printf("\nfigures written to %s\n", *out)
}

// Settings sizes a run.
type Settings struct {
	// Clients is the concurrency of the createuser measurements.
	Clients int `json:"clients"`
	// Round is the length of one timed round; Rounds how many per variant.
	Round  time.Duration `json:"round"`
	Rounds int           `json:"rounds"`
	// PoolSize is the pool of both createuser and the direct baseline.
	PoolSize int32 `json:"pool_size"`
	// Backlog is the outbox rows drained by the relay and the raw drain;
	// NaiveBacklog is smaller because the naive relay is slow.
	Backlog      int `json:"backlog"`
	NaiveBacklog int `json:"naive_backlog"`
	// WakeRate is events per second for the latency measurements, over
	// WakeDuration (NaiveWakeDuration for the naive relay).
	WakeRate          int           `json:"wake_rate"`
	WakeDuration      time.Duration `json:"wake_duration"`
	NaiveWakeDuration time.Duration `json:"naive_wake_duration"`
	// Entries are stream entries for the consumer throughput; SMTPEntries
	// for the run through a real SMTP server.
	Entries     int `json:"entries"`
	SMTPEntries int `json:"smtp_entries"`
	// E2ERate and E2EDuration drive the end-to-end latency.
	E2ERate     int           `json:"e2e_rate"`
	E2EDuration time.Duration `json:"e2e_duration"`
	// RSSBacklogs are the backlogs whose drain's peak RSS is measured, in a
	// child process each; none in smoke runs.
	RSSBacklogs []int `json:"rss_backlogs"`
	// IdleBaseline and IdleDuration are how long the idle relay's CPU is
	// measured alone and with transactions held open.
	IdleBaseline time.Duration `json:"idle_baseline"`
	// Traced says that tracing is on (-telemetry), sampling TraceRatio of
	// the traces. The direct baseline then stores a traceparent with each
	// event, as createuser does, sampled at the same ratio.
	Traced     bool    `json:"traced"`
	TraceRatio float64 `json:"trace_ratio"`
	// WaitBacklog is the backlog drained with and without WAIT.
	WaitBacklog  int           `json:"wait_backlog"`
	IdleDuration time.Duration `json:"idle_duration"`
}

var fullSettings = Settings{
	Clients: 32, Round: 4 * time.Second, Rounds: 3, PoolSize: 16,
	Backlog: 200_000, NaiveBacklog: 10_000,
	WakeRate: 200, WakeDuration: 8 * time.Second, NaiveWakeDuration: 4 * time.Second,
	Entries: 10_000, SMTPEntries: 2_000,
	E2ERate: 50, E2EDuration: 5 * time.Second,
	RSSBacklogs:  []int{250_000, 1_000_000},
	IdleBaseline: 10 * time.Second, IdleDuration: 60 * time.Second,
	WaitBacklog: 100_000,
}

var smokeSettings = Settings{
	Clients: 4, Round: 150 * time.Millisecond, Rounds: 1, PoolSize: 4,
	Backlog: 2_000, NaiveBacklog: 200,
	WakeRate: 100, WakeDuration: 300 * time.Millisecond, NaiveWakeDuration: 1500 * time.Millisecond,
	Entries: 200, SMTPEntries: 50,
	E2ERate: 20, E2EDuration: 300 * time.Millisecond,
	IdleBaseline: 300 * time.Millisecond, IdleDuration: 500 * time.Millisecond,
	WaitBacklog: 2_000,
}
