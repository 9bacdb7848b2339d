package sendemail

import (
	"fmt"
	"net/mail"
	"text/template"
	"time"

	"github.com/outboxfn/outbox/shared/logging"
	"github.com/outboxfn/outbox/shared/stream"
	"github.com/outboxfn/outbox/shared/telemetry"
)

// Config is sendemail's configuration, read from the environment.
type Config struct {
	logging.Config
	// Telemetry is where traces and metrics go; the zero value means
	// otel's global providers (no-ops unless telemetry.Setup ran).
	Telemetry telemetry.Providers `ignored:"true"`
	// DatabaseURL holds the send records.
	DatabaseURL string `envconfig:"DATABASE_URL" default:"postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable" desc:"PostgreSQL connection URL; the send records (table email_sends) live there. Default the local server."`
	// DBMaxConns caps the pool.
	DBMaxConns int32 `envconfig:"DB_MAX_CONNS" default:"8" desc:"Largest number of PostgreSQL connections one instance opens. Default 8."`
	// RedisURL is the Redis the streams live in.
	RedisURL string `envconfig:"REDIS_URL" default:"redis://127.0.0.1:6379/0" desc:"Redis URL (redis://[:password@]host:port/db, rediss:// for TLS). With REDIS_CLUSTER, the nodes to learn the cluster from: redis://host:port?addr=host2:port2&addr=host3:port3, or Memorystore for Redis Cluster's discovery endpoint alone. Default the local server."`
	// RedisCluster chooses a Redis Cluster client.
	RedisCluster bool `envconfig:"REDIS_CLUSTER" default:"false" desc:"REDIS_URL names a Redis Cluster (Memorystore for Redis Cluster, Valkey or Redis in cluster mode): commands are routed by hash slot and follow failovers. At least one node must answer at start-up. false: a single primary (Memorystore for Redis, a standalone server), which may be down at start-up; a cluster node that answers is refused. Default false."`
	// StreamPrefix must match the relay's.
	StreamPrefix string `envconfig:"STREAM_PREFIX" default:"outbox:" desc:"Prefix of stream names, as for the relay; sendemail reads <prefix>user and dead-letters to {<prefix>user}:dead. Default outbox:."`
	// StreamPartitions must match the relay's.
	StreamPartitions int `envconfig:"STREAM_PARTITIONS" default:"1" desc:"How many streams the user events are spread over, as for the relay (must be the same): 1 reads <prefix>user; N above 1 reads <prefix>user:0 … <prefix>user:N-1, each through the group with a loop of its own (an empty or stuck partition holds back no other), and dead-letters to {<prefix>user:<p>}:dead. SENDEMAIL_CONCURRENCY is per partition; the emails sent and not yet marked stay bounded by 2 × SENDEMAIL_CONCURRENCY for the instance. Default 1."`
	// Group is the consumer group; every sendemail instance joins it.
	Group string `envconfig:"SENDEMAIL_GROUP" default:"sendemail" desc:"Consumer group name shared by all sendemail instances. Default sendemail."`
	// ConsumerName names this instance in the group.
	ConsumerName string `envconfig:"SENDEMAIL_CONSUMER" desc:"This instance's consumer name; must differ between instances. Default <hostname>-<random>, fixed for the life of the process."`
	// BatchSize is the COUNT of each read.
	BatchSize int64 `envconfig:"SENDEMAIL_BATCH_SIZE" default:"64" desc:"Entries read (or claimed) per round trip and acknowledged together. Default 64."`
	// Concurrency bounds the emails sent at once.
	Concurrency int `envconfig:"SENDEMAIL_CONCURRENCY" default:"8" desc:"Emails sent in parallel by one instance. Default 8."`
	// Block is how long a read waits for new entries.
	Block time.Duration `envconfig:"SENDEMAIL_BLOCK" default:"5s" desc:"How long a read blocks waiting for new entries (XREADGROUP BLOCK). Default 5s."`
	// ClaimIdle is how long an entry stays pending before another consumer
	// may take it over; it is also the delay before a transient failure is
	// retried.
	ClaimIdle time.Duration `envconfig:"SENDEMAIL_CLAIM_IDLE" default:"60s" desc:"An entry pending this long (its consumer crashed, or it failed transiently) is claimed by another consumer (XAUTOCLAIM) and retried. Default 60s."`
	// ClaimInterval is how often the claim loop runs.
	ClaimInterval time.Duration `envconfig:"SENDEMAIL_CLAIM_INTERVAL" default:"15s" desc:"How often the background loop looks for idle entries to claim. Default 15s."`
	// MaxDeliveries is the number of failed deliveries, counted in the send
	// record, after which an entry is dead-lettered.
	MaxDeliveries int64 `envconfig:"SENDEMAIL_MAX_DELIVERIES" default:"5" desc:"An email whose deliveries failed this many times (counted in its send record, not by Redis, so an outage or a lost claim never counts) goes to the dead-letter stream. Default 5."`
	// SendAttempts is how often one delivery tries a transient SMTP failure.
	SendAttempts int `envconfig:"SENDEMAIL_SEND_ATTEMPTS" default:"3" desc:"Tries per delivery on a transient SMTP failure (4xx, network), with exponential backoff from 200ms, before the entry is left pending. Default 3."`
	// Lease is how long a send claim keeps other consumers off one email.
	Lease time.Duration `envconfig:"SENDEMAIL_LEASE" default:"15m" desc:"How long a consumer's claim on one email keeps others from sending it; must exceed one whole conversation (2 × SMTP_TIMEOUT + SMTP_DATA_TIMEOUT). Claims are taken ahead of the sends, 2 × SENDEMAIL_CONCURRENCY emails at a time, and renewed right before a send unless what is left still covers the conversation and half the rest of the lease for the mark. A send whose answer never came is retried only after it. Default 15m."`
	// SMTPURL is the mail server; empty writes .eml files to MailboxDir.
	SMTPURL string `envconfig:"SMTP_URL" desc:"Mail server, smtp://user:pass@host:port (STARTTLS required; ?tls=none for a local catcher without TLS and without credentials) or smtps://… (TLS from the start). Any other tls= value is refused. Empty writes each email as an .eml file into MAILBOX_DIR. Default empty."`
	// SMTPTimeout bounds an SMTP conversation up to the end of the data.
	SMTPTimeout time.Duration `envconfig:"SMTP_TIMEOUT" default:"10s" desc:"Longest an SMTP conversation may take up to the end of the message data (connect, TLS and AUTH when a new connection is needed, MAIL, RCPT, DATA, the data), and again for QUIT. Default 10s."`
	// SMTPDataTimeout bounds the wait for the answer to the message data.
	SMTPDataTimeout time.Duration `envconfig:"SMTP_DATA_TIMEOUT" default:"10m" desc:"Longest wait for the server's answer to the end of the message data (RFC 5321 asks for 10 minutes); a send without that answer is ambiguous and retried only after SENDEMAIL_LEASE. Default 10m."`
	// MailboxDir receives .eml files when SMTPURL is empty.
	MailboxDir string `envconfig:"MAILBOX_DIR" default:"local/mailbox" desc:"Directory that receives one .eml file per email when SMTP_URL is empty. Default local/mailbox."`
	// From is the sender of the welcome email.
	From string `envconfig:"MAIL_FROM" default:"Outbox Demo <welcome@example.com>" desc:"From address of the welcome email. Its domain also names the Message-ID. Default Outbox Demo <welcome@example.com>."`
	// Subject is a text/template over the user (.Name, .Email, .UserID).
	Subject string `envconfig:"MAIL_SUBJECT" default:"Welcome{{with .Name}}, {{.}}{{end}}!" desc:"Subject of the welcome email, a Go text/template over .Name, .Email and .UserID (.Name is empty when createuser runs with EVENT_OMIT_NAME). Default Welcome{{with .Name}}, {{.}}{{end}}!."`
	// DrainTimeout bounds one HTTP-triggered pass.
	DrainTimeout time.Duration `envconfig:"SENDEMAIL_DRAIN_TIMEOUT" default:"50s" desc:"Longest an HTTP-triggered pass runs (it also stops 1s before the request's own deadline). Default 50s."`
	// ShutdownTimeout is the server's; sendemail fits its stop into it.
	ShutdownTimeout time.Duration `envconfig:"SHUTDOWN_TIMEOUT" default:"8s" desc:"The server's shutdown time (see Every server): after SIGTERM no send starts, and a send under way gets this less 2s (at least half of it) to finish before it is cut. Default 8s."`
	// Background runs the read and claim loops.
	Background bool `envconfig:"BACKGROUND" default:"true" desc:"Run the background read and claim loops while the process lives; false leaves only the HTTP trigger. Default true."`
	// TriggerToken, when set, is required as a bearer token on the trigger.
	TriggerToken string `envconfig:"TRIGGER_TOKEN" desc:"When set, POST requests must carry Authorization: Bearer <token>; otherwise 401. Default empty (rely on Cloud Run IAM)."`
}

// Validate checks ranges and relations envconfig cannot.
func (c Config) Validate() error {
	if err := c.Config.Validate(); err != nil {
		return err
	}
	switch {
	case c.DBMaxConns < 1:
		return fmt.Errorf("DB_MAX_CONNS must be at least 1, not %d", c.DBMaxConns)
	case c.StreamPrefix == "":
		return fmt.Errorf("STREAM_PREFIX must not be empty")
	case stream.ValidPrefix(c.StreamPrefix) != nil:
		return stream.ValidPrefix(c.StreamPrefix)
	case c.StreamPartitions != 0 && stream.ValidPartitions(c.StreamPartitions) != nil: // 0: a Config built in code means 1
		return stream.ValidPartitions(c.StreamPartitions)
	case c.Group == "":
		return fmt.Errorf("SENDEMAIL_GROUP must not be empty")
	case c.BatchSize < 1 || c.BatchSize > 10000:
		return fmt.Errorf("SENDEMAIL_BATCH_SIZE must be between 1 and 10000, not %d", c.BatchSize)
	case c.Concurrency < 1:
		return fmt.Errorf("SENDEMAIL_CONCURRENCY must be at least 1, not %d", c.Concurrency)
	case c.Block < time.Millisecond:
		return fmt.Errorf("SENDEMAIL_BLOCK must be at least 1ms, not %s", c.Block)
	case c.ClaimInterval <= 0:
		return fmt.Errorf("SENDEMAIL_CLAIM_INTERVAL must be positive, not %s", c.ClaimInterval)
	case c.MaxDeliveries < 1:
		return fmt.Errorf("SENDEMAIL_MAX_DELIVERIES must be at least 1, not %d", c.MaxDeliveries)
	case c.SendAttempts < 1:
		return fmt.Errorf("SENDEMAIL_SEND_ATTEMPTS must be at least 1, not %d", c.SendAttempts)
	case c.SMTPTimeout <= 0:
		return fmt.Errorf("SMTP_TIMEOUT must be positive, not %s", c.SMTPTimeout)
	case c.SMTPDataTimeout <= 0:
		return fmt.Errorf("SMTP_DATA_TIMEOUT must be positive, not %s", c.SMTPDataTimeout)
	case c.ClaimIdle <= 0:
		return fmt.Errorf("SENDEMAIL_CLAIM_IDLE must be positive, not %s", c.ClaimIdle)
	case c.Lease <= SendLimit(c.SMTPTimeout, c.SMTPDataTimeout):
		return fmt.Errorf("SENDEMAIL_LEASE (%s) must exceed one whole SMTP conversation, 2 × SMTP_TIMEOUT + SMTP_DATA_TIMEOUT (%s), or another consumer could take over an email still being sent",
			c.Lease, SendLimit(c.SMTPTimeout, c.SMTPDataTimeout))
	case c.DrainTimeout <= 0:
		return fmt.Errorf("SENDEMAIL_DRAIN_TIMEOUT must be positive, not %s", c.DrainTimeout)
	case c.SMTPURL == "" && c.MailboxDir == "":
		return fmt.Errorf("set SMTP_URL, or MAILBOX_DIR to write emails to files")
	}
	if c.SMTPURL != "" {
		if _, err := ParseSMTPURL(c.SMTPURL); err != nil {
			return err
		}
	}
	if _, err := mail.ParseAddress(c.From); err != nil {
		return fmt.Errorf("MAIL_FROM is not an address: %v", err)
	}
	if _, err := template.New("subject").Parse(c.Subject); err != nil {
		return fmt.Errorf("MAIL_SUBJECT is not a valid template: %v", err)
	}
	return nil
}

// withDefaults fills the settings added after callers that build a Config
// in code (tests, the benchmark) were written: zero means the default.
func (c Config) withDefaults() Config {
	if c.SMTPDataTimeout <= 0 {
		c.SMTPDataTimeout = 10 * time.Minute
	}
	if c.ShutdownTimeout <= 0 {
		c.ShutdownTimeout = 8 * time.Second
	}
	if c.StreamPartitions <= 0 {
		c.StreamPartitions = 1
	}
	return c
}
