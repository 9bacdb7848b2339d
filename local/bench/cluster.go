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

// drainSetup is one relay drain, measured once a round.
type drainSetup struct {
	name   string
	target redisTarget
	types  []string
	// mutate adjusts the relay's configuration: where partitions
	// (STREAM_PARTITIONS, issue 18) will be set for the N = 6 variant.
	mutate func(*relay.Config)
}

// benchCluster measures the relay's drain and sendemail (no-op sender)
// against a private 3-shard Redis Cluster started for the step, each
// against the same measurement on the single local Redis, rounds
// interleaved so that each ratio comes from the same minutes.
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

	// Each setup's baseline is the setup it is compared with in figures
	// below. Partitions will be one more setup: the cluster with its
	// mutate setting N = 6, against the cluster with one.
	setups := []drainSetup{
		{name: "single", target: single, types: []string{"user"}},
		{name: "cluster", target: cluster, types: []string{"user"}},
		{name: "single, 6 types", target: single, types: spreadTypes},
		{name: "cluster, 6 types", target: cluster, types: spreadTypes},
	}
	rates, shards, err := clusterDrains(ctx, e, s, setups)
	if err != nil {
		return nil, err
	}
	e.logf("the %d types' streams landed on %d of the %d shards", len(spreadTypes), shards, clusterShards)

	var seSingle, seCluster []float64
	for round := range s.Rounds {
		targets := []redisTarget{single, cluster}
		if round%2 == 1 {
			targets = []redisTarget{cluster, single}
		}
		for _, t := range targets {
			r, err := noopSendemail(ctx, e, s, t)
			if err != nil {
				return nil, err
			}
			if t.cluster {
				seCluster = append(seCluster, r)
			} else {
				seSingle = append(seSingle, r)
			}
		}
		e.logf("round %d: sendemail with a no-op sender: %.0f entries/s on the single Redis, %.0f on the cluster",
			round+1, seSingle[round], seCluster[round])
	}

	med := func(name string) float64 { return median(rates[name]) }
	return []Figure{
		compare(fmt.Sprintf("relay drain of %d rows on a %d-shard Redis Cluster", s.Backlog, clusterShards),
			med("cluster"), "events/s", "the same drain on the single Redis", med("single")).
			note("one stream (one aggregate type); retention on; private cluster without replicas on this machine"),
		compare(fmt.Sprintf("relay drain of %d rows over %d aggregate types on a %d-shard Redis Cluster", s.Backlog, len(spreadTypes), clusterShards),
			med("cluster, 6 types"), "events/s", fmt.Sprintf("the same %d types on the single Redis", len(spreadTypes)), med("single, 6 types")).
			note(fmt.Sprintf("%d streams on %d of the %d shards", len(spreadTypes), shards, clusterShards)),
		compare(fmt.Sprintf("sendemail, no-op sender, on a %d-shard Redis Cluster", clusterShards), median(seCluster), "entries/s",
			"the same on the single Redis", median(seSingle)),
	}, nil
}

// clusterDrains drains s.Backlog rows with each setup's relay once a
// round, the setups in a rotating order so that none always follows the
// same one, and returns the rates by setup name and on how many shards the
// spread setup's streams landed.
func clusterDrains(ctx context.Context, e *env, s Settings, setups []drainSetup) (map[string][]float64, int, error) {
	type running struct {
		drainSetup
		prefix string
		relay  *relay.Service
	}
	var relays []running
	defer func() {
		for _, r := range relays {
			r.relay.Close()
		}
	}()
	for _, d := range setups {
		prefix := e.freshPrefix("cluster")
		cfg := drainConfig(e, prefix, d.target.url, d.target.cluster)
		if d.mutate != nil {
			d.mutate(&cfg)
		}
		rl, err := relay.New(ctx, cfg, logging.New(nopWriter{}, quiet))
		if err != nil {
			return nil, 0, fmt.Errorf("relay for %s: %w", d.name, err)
		}
		relays = append(relays, running{d, prefix, rl})
	}
	if _, err := e.pool.Exec(ctx, `TRUNCATE outbox`); err != nil {
		return nil, 0, err
	}
	rates := map[string][]float64{}
	shards := 0
	for round := range s.Rounds {
		var line []string
		for i := range relays {
			r := relays[(i+round)%len(relays)]
			if err := fillTypes(ctx, e, "outbox", s.Backlog, r.types); err != nil {
				return nil, 0, err
			}
			t := time.Now()
			res, err := r.relay.Drain(ctx, time.Time{})
			if err != nil {
				return nil, 0, fmt.Errorf("relay drain, %s: %w", r.name, err)
			}
			rate := float64(res.Relayed) / time.Since(t).Seconds()
			if res.Relayed != s.Backlog {
				return nil, 0, fmt.Errorf("relay drain, %s: %d of %d rows", r.name, res.Relayed, s.Backlog)
			}
			if r.target.cluster && len(r.types) > 1 && shards == 0 {
				if shards, err = nodesWithStreams(ctx, r.target.client, r.prefix); err != nil {
					return nil, 0, err
				}
			}
			// A fresh start for the next drain, as in the relay drain
			// step: no entries left to fill Redis, no retained rows, no
			// records of the streams just emptied.
			if err := unlinkPrefix(ctx, r.target.client, r.prefix); err != nil {
				return nil, 0, err
			}
			if _, err := e.pool.Exec(ctx, `TRUNCATE outbox_relayed, outbox_relay_batches, outbox_streams`); err != nil {
				return nil, 0, err
			}
			rates[r.name] = append(rates[r.name], rate)
			line = append(line, fmt.Sprintf("%s %.0f", r.name, rate))
		}
		e.logf("round %d: relay drain, events/s: %s", round+1, strings.Join(line, "; "))
	}
	return rates, shards, nil
}

// noopSendemail fills a stream of target with s.Entries entries and
// returns how fast sendemail with a sender that does nothing empties it,
// as the sendemail step measures it.
func noopSendemail(ctx context.Context, e *env, s Settings, target redisTarget) (float64, error) {
	prefix := e.freshPrefix("secluster")
	defer unlinkPrefix(context.WithoutCancel(ctx), target.client, prefix) //nolint:errcheck // the run's prefix is deleted at the end
	if _, err := e.pool.Exec(ctx, `TRUNCATE email_sends`); err != nil {
		return 0, err
	}
	if err := fillStream(ctx, target.client, prefix, s.Entries); err != nil {
		return 0, err
	}
	cfg := sendemailConfig(e, prefix, "")
	cfg.RedisURL, cfg.RedisCluster = target.url, target.cluster
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
