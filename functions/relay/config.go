package relay

import (
	"fmt"
	"time"

	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/stream"
	"github.com/outboxfn/outbox/shared/telemetry"
)

// Config is the relay's configuration, read from the environment.
type Config struct {
	logging.Config
	// Telemetry is where traces and metrics go; the zero value means
	// otel's global providers (no-ops unless telemetry.Setup ran).
	Telemetry telemetry.Providers `ignored:"true"`
	// DatabaseURL must reach PostgreSQL directly: LISTEN and the relay's
	// session-level advisory locks do not survive a transaction pooler.
	DatabaseURL string `envconfig:"DATABASE_URL" default:"postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable" desc:"PostgreSQL connection URL. The relay needs a direct connection (not PgBouncer in transaction mode) for LISTEN and its advisory locks. Default the local server."`
	// DBMaxConns caps the pool: a drain holds two connections (its own and
	// the batch claimed ahead) and needs a third beside them when it takes
	// over the streams; health checks and the backlog use what is left.
	DBMaxConns int32 `envconfig:"DB_MAX_CONNS" default:"4" desc:"Largest number of pooled PostgreSQL connections, besides the one LISTEN connection; at least 3 (a drain uses two, and a third beside them when it starts). Default 4."`
	// RedisURL is the Redis the streams live in.
	RedisURL string `envconfig:"REDIS_URL" default:"redis://127.0.0.1:6379/0" desc:"Redis URL (redis://[:password@]host:port/db, rediss:// for TLS). With REDIS_CLUSTER, the nodes to learn the cluster from: redis://host:port?addr=host2:port2&addr=host3:port3, or Memorystore for Redis Cluster's discovery endpoint alone. Default the local server."`
	// RedisCluster chooses a Redis Cluster client.
	RedisCluster bool `envconfig:"REDIS_CLUSTER" default:"false" desc:"REDIS_URL names a Redis Cluster (Memorystore for Redis Cluster, Valkey or Redis in cluster mode): commands are routed by hash slot and follow failovers. At least one node must answer at start-up. false: a single primary (Memorystore for Redis, a standalone server), which may be down at start-up; a cluster node that answers is refused. Default false."`
	// StreamPrefix is prepended to the aggregate type to name a stream.
	StreamPrefix string `envconfig:"STREAM_PREFIX" default:"outbox:" desc:"Prefix of stream names: events of aggregate type T go to the stream <prefix>T (user events to outbox:user). Default outbox:."`
	// StreamPartitions spreads each aggregate type over that many streams.
	StreamPartitions int `envconfig:"STREAM_PARTITIONS" default:"1" desc:"How many streams each aggregate type is spread over, by a hash of aggregate_id (FNV-1a 32-bit, modulo the number), so that one aggregate's events stay in one stream, in order: 1 keeps the one stream <prefix>T; N above 1 writes <prefix>T:0 … <prefix>T:N-1, each in its own Redis Cluster slot. Must be the same for relay, sendemail and outboxctl; the relay refuses to drain while its records show another number (see README, Changing STREAM_PARTITIONS). At most 256. Default 1."`
	// BatchSize is how many outbox rows one transaction claims and publishes.
	BatchSize int `envconfig:"RELAY_BATCH_SIZE" default:"1000" desc:"Outbox rows claimed, published in one Redis round trip and deleted per transaction. Default 1000."`
	// PollInterval is the fallback poll: the relay drains this often even
	// when no notification arrived, with ±20% jitter.
	PollInterval time.Duration `envconfig:"RELAY_POLL_INTERVAL" default:"5s" desc:"Fallback poll: drain at least this often (±20% jitter) even without a notification. Default 5s."`
	// DedupeWindow is how long the relay remembers the events of a batch
	// whose commit it could not confirm; zero turns duplicate suppression off.
	DedupeWindow time.Duration `envconfig:"RELAY_DEDUPE_WINDOW" default:"24h" desc:"How long the ids of a batch published but not confirmed committed are kept in Redis to suppress re-publication; 0 turns suppression off. Default 24h."`
	// Retention is how long relayed events stay in PostgreSQL, so that
	// what Redis loses can be published again.
	Retention time.Duration `envconfig:"RELAY_RETENTION" default:"24h" desc:"How long relayed events stay in PostgreSQL (table outbox_retained, shown by the view outbox_relayed) after they reached their stream, so that the relay can publish them again when Redis loses them (a flush, a failover, a restart without persistence, a deleted stream) and outboxctl replay can. Purged by the relay, oldest first. outboxctl purge never deletes send records younger than the oldest retained event. 0 turns retention off (what Redis loses is then lost). Default 24h."`
	// StreamRetention is how long an entry every consumer group has
	// acknowledged stays in its stream.
	StreamRetention time.Duration `envconfig:"RELAY_STREAM_RETENTION" default:"1h" desc:"How long a stream keeps an entry that every consumer group of it has read and acknowledged; entries a group still needs, and streams without groups, are never trimmed. Default 1h."`
	// TrimInterval is how often the draining relay trims the streams.
	TrimInterval time.Duration `envconfig:"RELAY_TRIM_INTERVAL" default:"1m" desc:"How often the relay that holds the drain lock trims the streams, after a drain; 0 turns trimming off. Default 1m."`
	// StreamMaxLen is the removed length bound, kept so that a deployment
	// still setting it fails loudly instead of silently trimming otherwise.
	StreamMaxLen int64 `envconfig:"RELAY_STREAM_MAXLEN" default:"0" desc:"Removed: streams are trimmed by RELAY_STREAM_RETENTION. Start-up fails unless this is 0 or unset."`
	// WaitReplicas asks Redis to confirm each batch on replicas before the
	// relay deletes its rows.
	WaitReplicas int `envconfig:"RELAY_REDIS_WAIT_REPLICAS" default:"0" desc:"When positive, each batch waits (Redis WAIT) until this many replicas have it, up to RELAY_REDIS_WAIT_TIMEOUT, before its rows are deleted, so that a failover cannot drop it. For a Standard Tier Memorystore (one replica): 1. A batch not confirmed in time (or whose WAIT Redis refuses) is committed anyway, logged and counted. 0 turns it off. Default 0."`
	// WaitTimeout bounds that wait.
	WaitTimeout time.Duration `envconfig:"RELAY_REDIS_WAIT_TIMEOUT" default:"100ms" desc:"Longest wait for RELAY_REDIS_WAIT_REPLICAS replicas to confirm a batch; at most 1s. Default 100ms."`
	// DrainTimeout bounds one HTTP-triggered drain.
	DrainTimeout time.Duration `envconfig:"RELAY_DRAIN_TIMEOUT" default:"50s" desc:"Longest an HTTP-triggered drain runs (it also stops 1s before the request's own deadline). Default 50s."`
	// ReconnectDelay is the pause before the listener reconnects.
	ReconnectDelay time.Duration `envconfig:"RELAY_RECONNECT_DELAY" default:"1s" desc:"Pause before the LISTEN connection is re-established after it broke. Default 1s."`
	// Background runs the LISTEN/poll loop; without it the relay only drains
	// when its HTTP trigger is called.
	Background bool `envconfig:"BACKGROUND" default:"true" desc:"Run the background loop (LISTEN, fallback poll, trimming) while the process lives; false leaves only the HTTP trigger. Default true."`
	// TriggerToken, when set, is required as a bearer token on the trigger.
	TriggerToken string `envconfig:"TRIGGER_TOKEN" desc:"When set, POST requests must carry Authorization: Bearer <token>; otherwise 401. Default empty (rely on Cloud Run IAM)."`
}

// Validate checks ranges envconfig cannot.
func (c Config) Validate() error {
	if err := c.Config.Validate(); err != nil {
		return err
	}
	switch {
	case c.DBMaxConns < 3:
		return fmt.Errorf("DB_MAX_CONNS must be at least 3 for the relay, not %d", c.DBMaxConns)
	case c.BatchSize < 1 || c.BatchSize > 10000:
		return fmt.Errorf("RELAY_BATCH_SIZE must be between 1 and 10000, not %d", c.BatchSize)
	case c.PollInterval < 10*time.Millisecond:
		return fmt.Errorf("RELAY_POLL_INTERVAL must be at least 10ms, not %s", c.PollInterval)
	case c.DedupeWindow < 0:
		return fmt.Errorf("RELAY_DEDUPE_WINDOW must not be negative, not %s", c.DedupeWindow)
	case c.StreamMaxLen != 0:
		return fmt.Errorf("RELAY_STREAM_MAXLEN is no longer supported: unset it; streams are trimmed to what every consumer group acknowledged, after RELAY_STREAM_RETENTION")
	case c.WaitReplicas < 0:
		return fmt.Errorf("RELAY_REDIS_WAIT_REPLICAS must not be negative, not %d", c.WaitReplicas)
	case c.WaitReplicas > 0 && (c.WaitTimeout <= 0 || c.WaitTimeout > time.Second):
		// The wait shares the publish's 5 s with the batch's XADDs, and the
		// batch's transaction sits idle meanwhile.
		return fmt.Errorf("RELAY_REDIS_WAIT_TIMEOUT must be positive and at most 1s, not %s", c.WaitTimeout)
	case c.Retention < 0:
		return fmt.Errorf("RELAY_RETENTION must not be negative, not %s", c.Retention)
	case c.StreamRetention < 0:
		return fmt.Errorf("RELAY_STREAM_RETENTION must not be negative, not %s", c.StreamRetention)
	case c.TrimInterval < 0:
		return fmt.Errorf("RELAY_TRIM_INTERVAL must not be negative, not %s", c.TrimInterval)
	case c.DrainTimeout <= 0:
		return fmt.Errorf("RELAY_DRAIN_TIMEOUT must be positive, not %s", c.DrainTimeout)
	case c.ReconnectDelay <= 0:
		return fmt.Errorf("RELAY_RECONNECT_DELAY must be positive, not %s", c.ReconnectDelay)
	case c.StreamPartitions != 0 && stream.ValidPartitions(c.StreamPartitions) != nil: // 0: a Config built in code means 1
		return stream.ValidPartitions(c.StreamPartitions)
	case c.StreamPrefix == "":
		return fmt.Errorf("STREAM_PREFIX must not be empty")
	case stream.ValidPrefix(c.StreamPrefix) != nil:
		return stream.ValidPrefix(c.StreamPrefix)
	}
	return nil
}
