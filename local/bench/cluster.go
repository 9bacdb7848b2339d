package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"time"

	"github.com/redis/rueidis"

	"github.com/outboxfn/outbox/functions/relay"
	"github.com/outboxfn/outbox/functions/sendemail"
	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/stream"
)

// clusterShards is the size of the private cluster: three primaries, the
// smallest Redis Cluster, and no replicas, because the single Redis it is
// compared with has none either and a replica would only add its copying
// to the two cores.
const clusterShards = 3

// spreadTypes are the aggregate types of the spread variant: six streams,
// which land on more than one of the three shards (the step reports on how
// many).
var spreadTypes = []string{"user", "order", "payment", "invoice", "account", "shipment"}

// redisTarget is a Redis the step publishes to or consumes from.
type redisTarget struct {
	url     string
	cluster bool
	client  rueidis.Client // fills and empties streams
}

// drainSetup is one relay: where it publishes and what it drains.
type drainSetup struct {
	target redisTarget
	types  []string
	// mutate adjusts the relay's configuration: where partitions
	// (STREAM_PARTITIONS, issue 18) will be set for the N = 6 variant.
	mutate func(*relay.Config)
}

// drainPair is one figure: a relay drain against its baseline, both
// measured once a round, one right after the other.
type drainPair struct {
	label            string // in the log's line for each round
	figure, baseline string
	base, variant    drainSetup
}

// pairedRounds is what a pair measured: each round's baseline and variant.
type pairedRounds struct{ base, variant []float64 }

func (p *pairedRounds) add(base, variant float64) {
	p.base, p.variant = append(p.base, base), append(p.variant, variant)
}

// figure reports the round whose ratio is the median of the rounds'. On
// this shared machine the rate moves by a factor of two or more between
// rounds a minute apart, and the two halves of one round see the same
// load; medians taken apart could pair a baseline and a variant from
// different minutes.
func (p *pairedRounds) figure(name, unit, baseline string) Figure {
	ratios := make([]string, len(p.base))
	best, rs := 0, make([]float64, len(p.base))
	for i := range p.base {
		rs[i] = p.variant[i] / p.base[i]
		ratios[i] = fmt.Sprintf("%.2f", rs[i])
	}
	m := median(rs)
	for i, r := range rs {
		if r == m {
			best = i
		}
	}
	return compare(name, p.variant[best], unit, baseline, p.base[best]).
		note(fmt.Sprintf("the round with the median ratio; rounds' ratios %s", strings.Join(ratios, ", ")))
}

// benchCluster measures the relay's drain and sendemail (no-op sender)
// against a private 3-shard Redis Cluster started for the step, each
// against the same measurement on the single local Redis right before or
// after it, in the same round.
func benchCluster(ctx context.Context, e *env, s Settings) ([]Figure, error) {
	c, err := redistest.NewCluster(clusterShards, 0)
	if errors.Is(err, redistest.ErrNotInstalled) {
		e.logf("skipped: %v (the cluster figures need redis-server and redis-cli)", err)
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("start a %d-shard cluster: %w", clusterShards, err)
	}
	defer c.Close()
	client, err := stream.NewClient(c.URL(), true)
	if err != nil {
		return nil, err
	}
	defer client.Close()
	single := redisTarget{url: redistest.URL(), client: e.redis}
	cluster := redisTarget{url: c.URL(), cluster: true, client: client}

	// Partitions: the cluster with one partition against the cluster with
	// six (STREAM_PARTITIONS=6), one aggregate type.
	one := []string{"user"}
	six := func(c *relay.Config) { c.StreamPartitions = 6 }
	pairs := []drainPair{
		{label: "one stream", figure: fmt.Sprintf("relay drain of %d rows on a %d-shard Redis Cluster", s.Backlog, clusterShards),
			baseline: "the same drain on the single Redis",
			base:     drainSetup{target: single, types: one}, variant: drainSetup{target: cluster, types: one}},
		{label: "six streams", figure: fmt.Sprintf("relay drain of %d rows over %d aggregate types on a %d-shard Redis Cluster", s.Backlog, len(spreadTypes), clusterShards),
			baseline: fmt.Sprintf("the same %d types on the single Redis", len(spreadTypes)),
			base:     drainSetup{target: single, types: spreadTypes}, variant: drainSetup{target: cluster, types: spreadTypes}},
		{label: "six partitions", figure: fmt.Sprintf("relay drain of %d rows, STREAM_PARTITIONS=6, on a %d-shard Redis Cluster", s.Backlog, clusterShards),
			baseline: "the same drain with one partition on the cluster",
			base:     drainSetup{target: cluster, types: one}, variant: drainSetup{target: cluster, types: one, mutate: six}},
	}
	drains, shards, err := clusterDrains(ctx, e, s, pairs)
	if err != nil {
		return nil, err
	}
	e.logf("the %d types' streams landed on %d of the %d shards", len(spreadTypes), shards, clusterShards)

	// sendemail: the single Redis, the cluster, and the cluster with six
	// partitions, in an order that turns from round to round.
	var se, se6 pairedRounds
	targets := []struct {
		target     redisTarget
		partitions int
	}{{single, 1}, {cluster, 1}, {cluster, 6}}
	for round := range s.Rounds {
		var rate [3]float64
		for k := range targets {
			i := (k + round) % len(targets)
			r, err := noopSendemail(ctx, e, s, targets[i].target, targets[i].partitions)
			if err != nil {
				return nil, err
			}
			rate[i] = r
		}
		se.add(rate[0], rate[1])
		se6.add(rate[1], rate[2])
		e.logf("round %d: sendemail with a no-op sender: %.0f entries/s on the single Redis, %.0f on the cluster (%.2f), %.0f with six partitions (%.2f)",
			round+1, rate[0], rate[1], rate[1]/rate[0], rate[2], rate[2]/rate[1])
	}

	var figures []Figure
	for i, p := range pairs {
		f := drains[i].figure(p.figure, "events/s", p.baseline)
		if len(p.variant.types) > 1 {
			f.Notes += fmt.Sprintf("; %d streams on %d of the %d shards", len(p.variant.types), shards, clusterShards)
		}
		figures = append(figures, f)
	}
	return append(figures, se.figure(fmt.Sprintf("sendemail, no-op sender, on a %d-shard Redis Cluster", clusterShards), "entries/s",
		"the same on the single Redis"),
		se6.figure(fmt.Sprintf("sendemail, no-op sender, STREAM_PARTITIONS=6, on a %d-shard Redis Cluster", clusterShards), "entries/s",
			"the same with one partition on the cluster")), nil
}

// order is the order of a pair's baseline (0) and variant (1) in a round:
// they take turns going first.
func order(round int) []int {
	if round%2 == 0 {
		return []int{0, 1}
	}
	return []int{1, 0}
}

// clusterDrains drains s.Backlog rows with each pair's two relays once a
// round, and returns each pair's rates and on how many shards a setup of
// more than one stream put its streams on the cluster.
func clusterDrains(ctx context.Context, e *env, s Settings, pairs []drainPair) ([]pairedRounds, int, error) {
	type running struct {
		drainSetup
		prefix string
		relay  *relay.Service
	}
	var relays [][2]running
	defer func() {
		for _, p := range relays {
			p[0].relay.Close()
			p[1].relay.Close()
		}
	}()
	for _, p := range pairs {
		var two [2]running
		for i, d := range []drainSetup{p.base, p.variant} {
			prefix := e.freshPrefix("cluster")
			cfg := drainConfig(e, prefix, d.target.url, d.target.cluster)
			if d.mutate != nil {
				d.mutate(&cfg)
			}
			rl, err := relay.New(ctx, cfg, logging.New(nopWriter{}, quiet))
			if err != nil {
				if i == 1 {
					two[0].relay.Close()
				}
				return nil, 0, fmt.Errorf("relay for %s: %w", p.figure, err)
			}
			two[i] = running{d, prefix, rl}
		}
		relays = append(relays, two)
	}
	if _, err := e.pool.Exec(ctx, `TRUNCATE outbox`); err != nil {
		return nil, 0, err
	}
	drain := func(r running) (float64, error) {
		if err := fillTypes(ctx, e, "outbox", s.Backlog, r.types); err != nil {
			return 0, err
		}
		t := time.Now()
		res, err := r.relay.Drain(ctx, time.Time{})
		if err != nil {
			return 0, fmt.Errorf("relay drain: %w", err)
		}
		rate := float64(res.Relayed) / time.Since(t).Seconds()
		if res.Relayed != s.Backlog {
			return 0, fmt.Errorf("relay drained %d of %d rows", res.Relayed, s.Backlog)
		}
		// A fresh start for the next drain, as in the relay drain step:
		// no entries left to fill Redis, no retained rows, no records of
		// the streams just emptied.
		if err := unlinkPrefix(ctx, r.target.client, r.prefix); err != nil {
			return 0, err
		}
		_, err = e.pool.Exec(ctx, `TRUNCATE outbox_retained, outbox_relayed_rows, outbox_relay_batches, outbox_streams`)
		return rate, err
	}
	out := make([]pairedRounds, len(pairs))
	shards := 0
	for round := range s.Rounds {
		var line []string
		for i, two := range relays {
			var rate [2]float64
			for _, j := range order(round) {
				r, err := drain(two[j])
				if err != nil {
					return nil, 0, fmt.Errorf("%s: %w", pairs[i].figure, err)
				}
				rate[j] = r
			}
			out[i].add(rate[0], rate[1])
			line = append(line, fmt.Sprintf("%s %.0f vs %.0f (%.2f)", pairs[i].label, rate[1], rate[0], rate[1]/rate[0]))
		}
		e.logf("round %d: relay drain, events/s, variant vs baseline: %s", round+1, strings.Join(line, "; "))
	}
	// Where a drain of several streams put them: drain once more and look
	// before emptying the cluster.
	for _, two := range relays {
		if r := two[1]; r.target.cluster && len(r.types) > 1 && shards == 0 {
			if err := fillTypes(ctx, e, "outbox", len(r.types), r.types); err != nil {
				return nil, 0, err
			}
			if _, err := r.relay.Drain(ctx, time.Time{}); err != nil {
				return nil, 0, err
			}
			var err error
			if shards, err = nodesWithStreams(ctx, r.target.client, r.prefix); err != nil {
				return nil, 0, err
			}
			if _, err := e.pool.Exec(ctx, `TRUNCATE outbox_retained, outbox_relayed_rows, outbox_relay_batches, outbox_streams`); err != nil {
				return nil, 0, err
			}
		}
	}
	return out, shards, nil
}

// noopSendemail fills a stream of target with s.Entries entries and
// returns how fast sendemail with a sender that does nothing empties it,
// as the sendemail step measures it.
func noopSendemail(ctx context.Context, e *env, s Settings, target redisTarget, partitions int) (float64, error) {
	prefix := e.freshPrefix("secluster")
	defer unlinkPrefix(context.WithoutCancel(ctx), target.client, prefix) //nolint:errcheck // the run's prefix is deleted at the end
	if _, err := e.pool.Exec(ctx, `TRUNCATE email_sends`); err != nil {
		return 0, err
	}
	if err := fillPartitions(ctx, target.client, prefix, s.Entries, partitions); err != nil {
		return 0, err
	}
	cfg := sendemailConfig(e, prefix, "")
	cfg.RedisURL, cfg.RedisCluster, cfg.StreamPartitions = target.url, target.cluster, partitions
	svc, err := sendemail.NewWithSender(ctx, cfg, noopSender{}, logging.New(nopWriter{}, quiet))
	if err != nil {
		return 0, err
	}
	defer svc.Close()
	t := time.Now()
	resp := httptest.NewRecorder()
	svc.ServeHTTP(resp, httptest.NewRequest(http.MethodPost, "/", nil))
	rate := float64(s.Entries) / time.Since(t).Seconds()
	if resp.Code != http.StatusOK || !strings.Contains(resp.Body.String(), fmt.Sprintf(`"sent":%d`, s.Entries)) {
		return 0, fmt.Errorf("no-op pass (cluster %t): %d %s", target.cluster, resp.Code, resp.Body.String())
	}
	return rate, nil
}

// unlinkPrefix deletes every key under prefix, on every node of a cluster.
func unlinkPrefix(ctx context.Context, client rueidis.Client, prefix string) error {
	keys, err := stream.Keys(ctx, client, prefix+"*", "")
	if err != nil {
		return err
	}
	// One key a command: a cluster routes each to its own shard.
	cmds := make(rueidis.Commands, 0, len(keys))
	for _, k := range keys {
		cmds = append(cmds, client.B().Unlink().Key(k).Build())
	}
	for _, r := range client.DoMulti(ctx, cmds...) {
		if err := r.Error(); err != nil {
			return fmt.Errorf("delete keys under %s: %w", prefix, err)
		}
	}
	return nil
}

// nodesWithStreams counts the nodes that hold a stream under prefix.
func nodesWithStreams(ctx context.Context, client rueidis.Client, prefix string) (int, error) {
	n := 0
	for addr, node := range client.Nodes() {
		keys, err := stream.Keys(ctx, node, prefix+"*", "stream")
		if err != nil {
			return 0, fmt.Errorf("streams on %s: %w", addr, err)
		}
		if len(keys) > 0 {
			n++
		}
	}
	return n, nil
}
