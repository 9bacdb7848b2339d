package loadtest

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/smtptest"
	"github.com/outboxfn/outbox/shared/stream"
)

// Redis forgets in ordinary operation: a server without persistence
// restarts empty, a Memorystore Basic Tier maintenance flushes everything, an
// operator deletes a stream, a failover to a lagging replica drops the last
// writes. PostgreSQL is the record: every committed event must end up in the
// stream again and every user must still get exactly one email.
func TestEveryUserGetsOneEmailWhenRedisForgets(t *testing.T) {
	t.Parallel()
	n, m := 300, 200
	if testing.Short() {
		n, m = 100, 50
	}
	ctx := context.Background()
	tests := []struct {
		name string
		// forget makes the private Redis lose what it holds, and returns
		// the users it signed up on the way, if any.
		forget func(t *testing.T, p *forgetfulPipeline) map[string]bool
	}{
		{name: "a Redis restarted without persistence", forget: func(t *testing.T, p *forgetfulPipeline) map[string]bool {
			p.server.Stop()
			p.server.Start()
			return nil
		}},
		{name: "a FLUSHALL", forget: func(t *testing.T, p *forgetfulPipeline) map[string]bool {
			require.NoError(t, p.redis.Do(ctx, p.redis.B().Flushall().Build()).Error(), "FLUSHALL")
			return nil
		}},
		{name: "a stream deleted by hand", forget: func(t *testing.T, p *forgetfulPipeline) map[string]bool {
			require.NoError(t, p.redis.Do(ctx, p.redis.B().Del().Key(p.stream).Build()).Error(), "DEL %s", p.stream)
			return nil
		}},
		{name: "a Redis that lost only its last few batches", forget: func(t *testing.T, p *forgetfulPipeline) map[string]bool {
			// The dump is what a lagging replica would hold: everything up
			// to now, and none of the next m users' events.
			require.NoError(t, p.redis.Do(ctx, p.redis.B().Save().Build()).Error(), "SAVE")
			later := p.signUp(t, m)
			require.Len(t, later, m, "every signup after the SAVE is created")
			p.waitRelayedAndEmailed(t, later, time.Minute)
			p.server.Stop()
			p.server.Start() // loads the older dump.rdb
			return later
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			p := startForgetful(t)
			created := p.signUp(t, n)
			require.Len(t, created, n, "every signup before the fault is created")
			p.waitRelayedAndEmailed(t, created, time.Minute)

			maps.Copy(created, tt.forget(t, p))
			back := time.Now()
			lost := p.userIDs(t)
			// Usually before the relay's next drain: what Redis came back
			// with, to show that the fault did lose events.
			if left, err := p.redis.Do(ctx, p.redis.B().Xlen().Key(p.stream).Build()).AsInt64(); err == nil {
				t.Logf("Redis came back with %d of the %d events in the stream", left, len(lost))
			}
			if p.waitInStream(t, lost, 30*time.Second) {
				t.Logf("%d events committed before the fault: back in the stream after %s",
					len(lost), time.Since(back).Round(time.Millisecond))
			}

			after := p.signUp(t, n)
			require.Len(t, after, n, "every signup after the fault is created")
			maps.Copy(created, after)
			if p.settle(t, created, 90*time.Second) {
				t.Logf("settled %s after Redis was back", time.Since(back).Round(time.Millisecond))
			}
			p.check(t, created)
		})
	}
}

// Restarts in the middle of a load: batches are in flight, the consumer
// group is mid-read, and Redis comes back empty twice.
func TestLoadWithTwoRedisRestarts(t *testing.T) {
	t.Parallel()
	n := 3000
	if testing.Short() {
		n = 300
	}
	ctx := context.Background()
	p := startForgetful(t)

	began := time.Now()
	var created map[string]bool
	done := make(chan struct{})
	go func() {
		defer close(done)
		created = p.signUp(t, n)
	}()
	// restart restarts Redis as soon as at users exist. It must not end
	// the test while signUp's goroutine still reports to t, so it returns
	// what went wrong instead of failing.
	restart := func(at int) (time.Time, error) {
		for deadline := time.Now().Add(2 * time.Minute); ; {
			var users int
			if err := p.db.QueryRow(ctx, `SELECT count(*) FROM users`).Scan(&users); err != nil {
				return time.Time{}, fmt.Errorf("count users: %w", err)
			}
			if users >= at {
				break
			}
			select {
			case <-done:
				return time.Time{}, fmt.Errorf("the signups ended with %d users, before the restart at %d", users, at)
			default:
			}
			if time.Now().After(deadline) {
				return time.Time{}, fmt.Errorf("stuck before the restart at %d users: %d users created", at, users)
			}
			time.Sleep(5 * time.Millisecond)
		}
		p.server.Stop()
		p.server.Start()
		t.Logf("Redis restarted without persistence after %d users (%s into the load)", at, time.Since(began).Round(time.Millisecond))
		return time.Now(), nil
	}
	var lastRestart time.Time
	var restartErr error
	for _, at := range []int{n / 3, 2 * n / 3} {
		if lastRestart, restartErr = restart(at); restartErr != nil {
			break
		}
	}
	<-done
	require.NoError(t, restartErr)
	require.Len(t, created, n, "every signup is eventually created")
	signedUp := time.Since(began)

	all := p.userIDs(t)
	if p.waitInStream(t, all, time.Minute) {
		t.Logf("every event back in the stream %s after the second restart", time.Since(lastRestart).Round(time.Millisecond))
	}
	if p.settle(t, created, 3*time.Minute) {
		t.Logf("%d signups in %s; settled %s after the second restart, %s after the start",
			n, signedUp.Round(time.Millisecond), time.Since(lastRestart).Round(time.Millisecond), time.Since(began).Round(time.Millisecond))
	}
	// The mail server here is never ambiguous (it answers every DATA), so
	// even an extra copy with the same Message-ID is a failure.
	p.check(t, created)
}

// forgetfulPipeline is the pipeline of one scenario with a Redis of its own,
// which the test restarts, flushes or cuts down. Its redis client talks to
// that server.
type forgetfulPipeline struct {
	*pipeline
	server *redistest.Server
	mail   *smtptest.Server
}

// startForgetful is start with a private Redis and an SMTP server of its own,
// and a relay that retains what it relayed.
func startForgetful(t *testing.T) *forgetfulPipeline {
	t.Helper()
	// Started before the functions, so stopped after them.
	server := redistest.StartServer(t)
	client, err := stream.NewClient(server.URL(), false)
	require.NoError(t, err)
	t.Cleanup(client.Close)
	mail := smtptest.Start(t)
	p := startOn(t, mail.URL(), server.URL(), false, client, "outbox:", time.Hour)
	return &forgetfulPipeline{pipeline: p, server: server, mail: mail}
}

// inStream is what the stream holds: how many entries carry each event id,
// and the aggregate ids (user ids) of the entries.
type inStream struct {
	entries int
	events  map[string]int
	users   map[string]bool
}

// readStream reads the whole stream, 1000 entries per XRANGE. A missing
// stream reads as empty.
func (p *forgetfulPipeline) readStream(ctx context.Context) (inStream, error) {
	s := inStream{events: make(map[string]int), users: make(map[string]bool)}
	start := "-"
	for {
		entries, err := p.redis.Do(ctx, p.redis.B().Xrange().Key(p.stream).Start(start).End("+").Count(1000).Build()).AsXRange()
		if err != nil {
			return s, fmt.Errorf("XRANGE %s %s +: %w", p.stream, start, err)
		}
		for _, e := range entries {
			s.entries++
			s.events[e.FieldValues[stream.FieldEventID]]++
			s.users[e.FieldValues[stream.FieldAggregateID]] = true
		}
		if len(entries) < 1000 {
			return s, nil
		}
		start = "(" + entries[len(entries)-1].ID
	}
}

// userIDs returns the id of every committed user.
func (p *forgetfulPipeline) userIDs(t *testing.T) []string {
	t.Helper()
	rows, _ := p.db.Query(context.Background(), `SELECT id::text FROM users`)
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err, "read user ids")
	return ids
}

// progress is where the pipeline stands, for a test that waits on it.
type progress struct {
	outbox      int
	stream      inStream
	streamErr   error
	pending     int64
	lag         int64 // -1: unknown (no group, or Redis cannot tell)
	users       int   // committed users
	usersIn     int   // of them, with an entry in the stream
	emailed     int   // created users with at least one email
	created     int
	messages    int
	groupStatus string
}

func (p *forgetfulPipeline) progress(t *testing.T, created map[string]bool, users []string) progress {
	t.Helper()
	ctx := context.Background()
	pr := progress{lag: -1, created: len(created), users: len(users), messages: p.mail.Count()}
	require.NoError(t, p.db.QueryRow(ctx, `SELECT count(*) FROM outbox`).Scan(&pr.outbox))
	pr.stream, pr.streamErr = p.readStream(ctx)
	for _, id := range users {
		if pr.stream.users[id] {
			pr.usersIn++
		}
	}
	byUser := messagesByRecipient(p.mail)
	for email := range created {
		if len(byUser[email]) > 0 {
			pr.emailed++
		}
	}
	groups, err := p.redis.Do(ctx, p.redis.B().XinfoGroups().Key(p.stream).Build()).ToArray()
	switch {
	case err != nil:
		pr.groupStatus = "XINFO GROUPS: " + err.Error()
	case len(groups) != 1:
		pr.groupStatus = fmt.Sprintf("%d consumer groups", len(groups))
	default:
		g, err := groups[0].AsMap()
		require.NoError(t, err)
		pendingMsg, lagMsg := g["pending"], g["lag"]
		pr.pending, _ = pendingMsg.AsInt64()
		if lag, err := lagMsg.AsInt64(); err == nil {
			pr.lag = lag
		}
		pr.groupStatus = fmt.Sprintf("group pending %d, lag %d", pr.pending, pr.lag)
	}
	return pr
}

// quiet says that nothing is left to do: the outbox is empty and the group
// has read and acknowledged every entry.
func (pr progress) quiet() bool { return pr.outbox == 0 && pr.pending == 0 && pr.lag == 0 }

func (pr progress) String() string {
	s := fmt.Sprintf("outbox %d rows; stream %d entries (%d distinct events), holding %d of %d committed users; %s; emails for %d of %d users (%d messages)",
		pr.outbox, pr.stream.entries, len(pr.stream.events), pr.usersIn, pr.users, pr.groupStatus, pr.emailed, pr.created, pr.messages)
	if pr.streamErr != nil {
		s += "; " + pr.streamErr.Error()
	}
	return s
}

// waitRelayedAndEmailed waits until the outbox is empty, every committed
// user's event is in the stream and every user in created has an email, or
// fails the test saying which of those is stuck.
func (p *forgetfulPipeline) waitRelayedAndEmailed(t *testing.T, created map[string]bool, timeout time.Duration) {
	t.Helper()
	users := p.userIDs(t)
	for deadline := time.Now().Add(timeout); ; {
		pr := p.progress(t, created, users)
		if pr.outbox == 0 && pr.usersIn == pr.users && pr.emailed == pr.created {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not relayed and emailed within %s: %s", timeout, pr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitInStream waits until every user in users has an entry in the stream,
// and says whether that happened within timeout; if not, it marks the test
// failed with where the stream stands, and lets it go on so that the
// final counts show the damage.
func (p *forgetfulPipeline) waitInStream(t *testing.T, users []string, timeout time.Duration) bool {
	t.Helper()
	ctx := context.Background()
	var s inStream
	var err error
	for deadline := time.Now().Add(timeout); ; {
		s, err = p.readStream(ctx)
		missing := 0
		for _, id := range users {
			if !s.users[id] {
				missing++
			}
		}
		if err == nil && missing == 0 {
			return true
		}
		if time.Now().After(deadline) {
			t.Errorf("%d of %d committed events not back in the stream within %s (stream: %d entries; %v)",
				missing, len(users), timeout, s.entries, err)
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// settle waits until the pipeline is quiet and every user in created has an
// email. It gives up after timeout, or when the pipeline has been quiet for
// quietFor with users still without an email (nothing would send them), and
// then marks the test failed with where things stand. It says whether the
// pipeline settled.
func (p *forgetfulPipeline) settle(t *testing.T, created map[string]bool, timeout time.Duration) bool {
	t.Helper()
	const quietFor = 10 * time.Second // ten fallback polls of the relay
	users := p.userIDs(t)
	var quietSince time.Time
	for deadline := time.Now().Add(timeout); ; {
		pr := p.progress(t, created, users)
		if pr.quiet() && pr.emailed == pr.created && pr.usersIn == pr.users {
			return true
		}
		switch {
		case !pr.quiet():
			quietSince = time.Time{}
		case quietSince.IsZero():
			quietSince = time.Now()
		case time.Since(quietSince) > quietFor:
			t.Errorf("the pipeline has been quiet for %s with work left undone: %s", quietFor, pr)
			return false
		}
		if time.Now().After(deadline) {
			t.Errorf("the pipeline did not settle within %s: %s", timeout, pr)
			return false
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// check asserts the outcome: every user in created got exactly one email,
// and every committed event is in the stream and retained in PostgreSQL.
func (p *forgetfulPipeline) check(t *testing.T, created map[string]bool) {
	t.Helper()
	ctx := context.Background()
	byUser := messagesByRecipient(p.mail)
	var missing, extraSameID, extraOtherID int
	for email := range created {
		ids := byUser[email]
		if len(ids) == 0 {
			missing++
		}
		for _, id := range ids[min(1, len(ids)):] {
			if id == ids[0] {
				extraSameID++
			} else {
				extraOtherID++
			}
		}
	}
	t.Logf("%d users: %d messages accepted; %d users without an email; %d extra copies with the same Message-ID, %d with another",
		len(created), p.mail.Count(), missing, extraSameID, extraOtherID)
	assert.Zero(t, missing, "users without an email")
	assert.Zero(t, extraOtherID, "users with two different emails")
	assert.Zero(t, extraSameID, "users with two copies of one email (the SMTP server is never ambiguous here)")

	s, err := p.readStream(ctx)
	require.NoError(t, err)
	users := p.userIDs(t)
	var notInStream []string
	for _, id := range users {
		if !s.users[id] {
			notInStream = append(notInStream, id)
		}
	}
	var backlog int
	require.NoError(t, p.db.QueryRow(ctx, `SELECT count(*) FROM outbox`).Scan(&backlog))
	rows, _ := p.db.Query(ctx, `SELECT event_id::text FROM outbox_relayed`)
	relayed, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err, "read outbox_relayed")
	var relayedNotInStream int
	for _, id := range relayed {
		if s.events[id] == 0 {
			relayedNotInStream++
		}
	}
	var copies int
	for _, c := range s.events {
		copies += c - 1
	}
	t.Logf("stream: %d entries, %d distinct events (%d extra copies); %d committed users, %d of them not in the stream; outbox_relayed: %d rows, %d not in the stream; outbox: %d rows",
		s.entries, len(s.events), copies, len(users), len(notInStream), len(relayed), relayedNotInStream, backlog)
	assert.Empty(t, firstFew(notInStream), "committed users whose event is not in the stream (first few)")
	assert.Zero(t, relayedNotInStream, "events in outbox_relayed that are not in the stream")
	assert.Len(t, relayed, len(users), "outbox_relayed holds one event per committed user")
	assert.Zero(t, backlog, "rows left in the outbox")
}

func firstFew(ids []string) []string {
	slices.Sort(ids)
	return ids[:min(len(ids), 10)]
}
