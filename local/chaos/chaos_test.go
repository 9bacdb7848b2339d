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
// ok completes v as a settled scenario whose 300 signups all got their 201.
func ok(v verdict) verdict {
	v.Settled, v.Signups, v.Acked = true, 300, 300
	return v
}

func TestVerdictFailsOnlyWhatBreaksThePromise(t *testing.T) {
	tests := []struct {
		name string
		v    verdict
		fail bool
	}{
		{name: "every user emailed once passes", v: ok(verdict{})},
		{name: "a committed user without an email fails", v: ok(verdict{Lost: 1}), fail: true},
		{name: "a 201 whose user is not in the database fails", v: ok(verdict{AckedNotCommitted: 1}), fail: true},
		{name: "a second email with another Message-ID fails", v: ok(verdict{CopiesOtherID: 1, Ambiguous: true, AmbiguousBudget: 32}), fail: true},
		{name: "a copy with the same Message-ID fails when no send was ambiguous", v: ok(verdict{CopiesSameID: 1}), fail: true},
		{name: "copies with the same Message-ID pass within what the ambiguous faults explain", v: ok(verdict{CopiesSameID: 32, Ambiguous: true, AmbiguousBudget: 32})},
		{name: "more copies than the ambiguous faults explain fail", v: ok(verdict{CopiesSameID: 33, Ambiguous: true, AmbiguousBudget: 32}), fail: true},
		{name: "a copy with the same Message-ID passes when sendemail logged its send as ambiguous", v: ok(verdict{CopiesSameID: 1, AmbiguousSends: 1})},
		{name: "more copies than sends logged as ambiguous fail", v: ok(verdict{CopiesSameID: 2, AmbiguousSends: 1}), fail: true},
		{name: "a committed event missing from the stream fails", v: ok(verdict{MissingFromStream: 1}), fail: true},
		{name: "signups that never got their 201 fail", v: verdict{Settled: true, Signups: 300, Acked: 290, GaveUp: 10}, fail: true},
		{name: "a fault that could not be applied fails", v: ok(verdict{FaultErrors: []string{"redis-pause: not running"}}), fail: true},
		{name: "a pipeline that never settled fails", v: verdict{Signups: 300, Acked: 300}, fail: true},
		{name: "dead letters and process crashes alone are reported, not failed", v: ok(verdict{DeadLetters: 3, Problems: []string{"crashed"}})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.v.decide()
			if tt.v.Pass == tt.fail {
				t.Errorf("Pass = %v (failures %q), want %v", tt.v.Pass, tt.v.Failures, !tt.fail)
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
