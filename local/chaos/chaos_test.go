package main

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestShortMixedScenario runs what `go run ./local/chaos -short` runs: one
// load of 200 signups through five real processes while three faults drawn
// from the catalogue happen, and fails on a lost email, a lost signup, a
// second email with another Message-ID, or copies where no fault made a
// send ambiguous. CHAOS_SEED replays a schedule; the seed is logged.
func TestShortMixedScenario(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos takes about a minute; skipped with -short")
	}
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("CHAOS_SEED"); v != "" {
		var err error
		if seed, err = strconv.ParseUint(v, 10, 64); err != nil {
			t.Fatalf("CHAOS_SEED: %v", err)
		}
	}
	var out strings.Builder
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	verdicts, err := run(ctx, options{seed: seed, short: true, signups: 200, faults: 3, settle: 60 * time.Second, stdout: &out})
	t.Log("\n" + out.String())
	if errors.Is(err, errMissing) {
		t.Skipf("chaos needs PostgreSQL 15's server programs and redis-server: %v", err)
	}
	if err != nil {
		t.Fatalf("chaos run (seed %d): %v", seed, err)
	}
	if len(verdicts) != 1 {
		t.Fatalf("got %d verdicts, want the one mixed scenario", len(verdicts))
	}
	v := verdicts[0]
	if !v.Pass {
		t.Errorf("seed %d (replay: CHAOS_SEED=%d): %s", seed, seed, strings.Join(v.Failures, "; "))
	}
	if v.Committed < v.Signups {
		t.Errorf("%d users committed of %d signups: the load did not get through", v.Committed, v.Signups)
	}
}

// The verdict is the point of the tool: each way of breaking the promise
// must fail a scenario, and what the faults are allowed to cause must not.
func TestVerdictFailsOnlyWhatBreaksThePromise(t *testing.T) {
	tests := []struct {
		name string
		v    verdict
		pass bool
	}{
		{name: "every user emailed once passes", v: verdict{Settled: true}, pass: true},
		{name: "a committed user without an email fails", v: verdict{Settled: true, Lost: 1}},
		{name: "a 201 whose user is not in the database fails", v: verdict{Settled: true, AckedNotCommitted: 1}},
		{name: "a second email with another Message-ID fails", v: verdict{Settled: true, CopiesOtherID: 1, Ambiguous: true}},
		{name: "a copy with the same Message-ID fails when no send was ambiguous", v: verdict{Settled: true, CopiesSameID: 1}},
		{name: "a copy with the same Message-ID passes after an ambiguous fault", v: verdict{Settled: true, CopiesSameID: 2, Ambiguous: true}, pass: true},
		{name: "a copy with the same Message-ID passes when sendemail logged its send as ambiguous", v: verdict{Settled: true, CopiesSameID: 1, AmbiguousSends: 1}, pass: true},
		{name: "more copies than sends logged as ambiguous fail", v: verdict{Settled: true, CopiesSameID: 2, AmbiguousSends: 1}},
		{name: "a committed event missing from the stream fails", v: verdict{Settled: true, MissingFromStream: 1}},
		{name: "a pipeline that never settled fails", v: verdict{}},
		{name: "dead letters and process crashes alone are reported, not failed", v: verdict{Settled: true, DeadLetters: 3, Problems: []string{"crashed"}}, pass: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.v.decide()
			if tt.v.Pass != tt.pass {
				t.Errorf("Pass = %v (failures %q), want %v", tt.v.Pass, tt.v.Failures, tt.pass)
			}
		})
	}
}

func TestTheSameSeedPlansTheSameMixedScenario(t *testing.T) {
	plan := func(seed uint64) []planned {
		return mixedPlan(rand.New(rand.NewPCG(seed, 0)), 4, 12*time.Second)
	}
	a, b := plan(7), plan(7)
	if len(a) != 4 {
		t.Fatalf("planned %d faults, want 4", len(a))
	}
	seen := map[string]bool{}
	for i := range a {
		if a[i] != b[i] {
			t.Errorf("fault %d: %v, then %v with the same seed", i, a[i], b[i])
		}
		if seen[a[i].Fault] {
			t.Errorf("fault %s planned twice", a[i].Fault)
		}
		seen[a[i].Fault] = true
		if _, ok := findFault(a[i].Fault); !ok {
			t.Errorf("planned fault %q is not in the catalogue", a[i].Fault)
		}
		if a[i].At <= 0 || a[i].At > 12*time.Second {
			t.Errorf("fault %s at %s, outside the load", a[i].Fault, a[i].At)
		}
	}
}
