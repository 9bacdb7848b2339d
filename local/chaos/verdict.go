package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/redis/rueidis"
)

// verdict is what one scenario did to the promise "a committed user ⇒
// exactly one welcome email".
type verdict struct {
	Scenario string    `json:"scenario"`
	Seed     uint64    `json:"seed"`
	Plan     []planned `json:"plan"`
	// Ambiguous: one of the faults can make a send ambiguous, so copies
	// with the same Message-ID are allowed.
	Ambiguous bool `json:"ambiguous"`
	// AmbiguousBudget is how many same-Message-ID copies those faults may
	// explain (see ambiguousCopies).
	AmbiguousBudget int      `json:"ambiguous_budget"`
	FaultErrors     []string `json:"fault_errors,omitempty"`

	Signups int `json:"signups"`
	// Acked is how many signups got their 201; GaveUp and Refused the
	// others.
	Acked   int `json:"acked"`
	GaveUp  int `json:"gave_up"`
	Refused int `json:"refused"`
	Retries int `json:"retries"`
	// Committed is every user row, including the long transaction's.
	Committed int `json:"committed"`
	// AckedNotCommitted are users whose 201 a client saw and whose row is
	// not there: lost signups.
	AckedNotCommitted int `json:"acked_not_committed"`
	Emailed           int `json:"emailed"`
	Messages          int `json:"messages"`
	// Lost are committed users without an email; Stuck says where their
	// events are.
	Lost         int            `json:"lost"`
	Stuck        map[string]int `json:"stuck,omitempty"`
	LostExamples []string       `json:"lost_examples,omitempty"`
	// CopiesSameID and CopiesOtherID count extra messages to one user,
	// with the first message's Message-ID and with another.
	CopiesSameID  int `json:"copies_same_message_id"`
	CopiesOtherID int `json:"copies_other_message_id"`
	// AmbiguousSends counts the sends sendemail itself logged as ambiguous
	// (no answer to the message data): on a loaded machine a reply can
	// miss SMTP_DATA_TIMEOUT without any fault, and each such send may
	// give one copy.
	AmbiguousSends int `json:"ambiguous_sends_logged"`
	// MaxDelaySeconds is the longest time from a 201 to its user's first
	// email; P99DelaySeconds the 99th percentile.
	MaxDelaySeconds float64 `json:"max_delay_seconds"`
	P99DelaySeconds float64 `json:"p99_delay_seconds"`
	DeadLetters     int     `json:"dead_letters"`
	OutboxDead      int     `json:"outbox_dead"`
	// StreamDuplicates counts stream entries whose event_id an earlier
	// entry of the stream already carried.
	StreamDuplicates int `json:"stream_duplicate_event_ids"`
	// MissingFromStream counts committed users whose event is not in the
	// stream: Redis lost it and the relay did not publish it again.
	MissingFromStream int `json:"missing_from_stream"`
	// LogWarnings counts the processes' WARNING and ERROR log lines by
	// kind, severity and message.
	LogWarnings map[string]int `json:"log_warnings,omitempty"`
	// Problems are crashes, hangs and unclean exits of the processes.
	Problems []string `json:"process_problems,omitempty"`
	Settled  bool     `json:"settled"`
	// NotSettled says what was still not done when the wait ended.
	NotSettled    string  `json:"not_settled,omitempty"`
	SettleSeconds float64 `json:"settle_seconds"`
	TotalSeconds  float64 `json:"total_seconds"`
	Logs          string  `json:"logs"`

	Pass     bool     `json:"pass"`
	Failures []string `json:"failures,omitempty"`
}

// quietFor is how long no new email may arrive, with the queues empty, for
// the pipeline to count as settled. stillFor is how long it must stay so
// when some committed user has no email yet: longer than a lease, a claim
// idle time and a relay poll together, so that anything still owed would
// have moved.
const (
	quietFor = 3 * time.Second
	stillFor = sendLease + claimIdle + 5*time.Second
)

// settle waits until the outbox is empty, the consumer group has read and
// acknowledged everything, every process runs, and no email arrived for
// quietFor (stillFor while some committed user has none), or until
// timeout. It returns how long after from (the end of the load and the
// faults) the last email arrived or the queues were last busy, and, when
// it did not settle, what was still not done.
func (s *stage) settle(ctx context.Context, timeout time.Duration, from time.Time) (settled bool, took time.Duration, why string) {
	deadline := time.Now().Add(timeout)
	lastCount, lastChange, lastBusy := -1, time.Now(), from
	for {
		if n := s.mail.Count(); n != lastCount {
			lastCount, lastChange = n, time.Now()
		}
		ok, reason := s.drained(ctx)
		why = reason
		if ok {
			quiet := time.Since(lastChange)
			if quiet >= quietFor && (quiet >= stillFor || s.everyUserEmailed(ctx)) {
				last := lastBusy
				for _, m := range s.mail.Messages() {
					if m.At.After(last) {
						last = m.At
					}
				}
				return true, max(0, last.Sub(from)), ""
			}
		} else {
			// Not quiet while work is still queued.
			lastChange, lastBusy = time.Now(), time.Now()
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			if why == "" {
				why = "some committed users have no email and emails still arrive"
			}
			return false, time.Since(from), why
		}
		sleep(ctx, 250*time.Millisecond)
	}
}

// drained reports whether the outbox is empty, the group has read and
// acknowledged everything, and every process runs; when not, it says why.
func (s *stage) drained(ctx context.Context) (bool, string) {
	for _, p := range s.all {
		if !p.running() {
			return false, p.name + " is not running"
		}
	}
	var backlog int
	if err := s.db.QueryRow(ctx, `SELECT count(*) FROM outbox`).Scan(&backlog); err != nil {
		return false, fmt.Sprintf("count the outbox: %v", err)
	}
	if backlog > 0 {
		return false, fmt.Sprintf("%d rows in the outbox", backlog)
	}
	c := s.redisC
	groups, err := c.Do(ctx, c.B().XinfoGroups().Key(streamName).Build()).ToArray()
	if err != nil {
		return false, fmt.Sprintf("XINFO GROUPS %s: %v", streamName, err)
	}
	if len(groups) == 0 {
		return false, "no consumer group on " + streamName
	}
	info, err := c.Do(ctx, c.B().XinfoStream().Key(streamName).Build()).AsMap()
	if err != nil {
		return false, fmt.Sprintf("XINFO STREAM %s: %v", streamName, err)
	}
	lastMsg := info["last-generated-id"]
	lastID, _ := lastMsg.ToString()
	for _, g := range groups {
		m, err := g.AsMap()
		if err != nil {
			return false, fmt.Sprintf("XINFO GROUPS %s: %v", streamName, err)
		}
		nameMsg, pendingMsg, lagMsg, deliveredMsg := m["name"], m["pending"], m["lag"], m["last-delivered-id"]
		name, _ := nameMsg.ToString()
		if pending, err := pendingMsg.AsInt64(); err != nil || pending != 0 {
			return false, fmt.Sprintf("group %s: %d entries pending", name, pending)
		}
		// Not the lag: Redis only estimates it, and after a restart from
		// the append-only file it stays above 0 with everything read. The
		// group has read everything when it delivered the last entry.
		if delivered, _ := deliveredMsg.ToString(); delivered != lastID {
			lag, _ := lagMsg.AsInt64()
			return false, fmt.Sprintf("group %s: last delivered %s, stream at %s (lag %d)", name, delivered, lastID, lag)
		}
	}
	return true, ""
}

// everyUserEmailed reports whether every committed user has received at
// least one message.
func (s *stage) everyUserEmailed(ctx context.Context) bool {
	users, err := s.users(ctx)
	if err != nil {
		return false
	}
	got := s.byRecipient()
	for _, email := range users {
		if len(got[email]) == 0 {
			return false
		}
	}
	return true
}

// users maps each committed user's id to its lower-cased email.
func (s *stage) users(ctx context.Context) (map[int64]string, error) {
	rows, err := s.db.Query(ctx, `SELECT id, lower(email) FROM users`)
	if err != nil {
		return nil, fmt.Errorf("read users: %w", err)
	}
	defer rows.Close()
	out := map[int64]string{}
	for rows.Next() {
		var id int64
		var email string
		if err := rows.Scan(&id, &email); err != nil {
			return nil, fmt.Errorf("read users: %w", err)
		}
		out[id] = email
	}
	return out, rows.Err()
}

// byRecipient maps each recipient (lower-cased) to the Message-IDs of the
// messages it received, in order of acceptance.
func (s *stage) byRecipient() map[string][]string {
	out := map[string][]string{}
	for _, m := range s.mail.Messages() {
		for _, to := range m.To {
			to = strings.ToLower(to)
			out[to] = append(out[to], m.Header.Get("Message-Id"))
		}
	}
	return out
}

// judge counts, from the database, Redis and the SMTP server, what
// happened to every user, and decides.
func (s *stage) judge(ctx context.Context, v *verdict, load loadResult) error {
	users, err := s.users(ctx)
	if err != nil {
		return err
	}
	v.Committed = len(users)
	committed := make(map[string]int64, len(users))
	for id, email := range users {
		committed[email] = id
	}
	for email := range load.created {
		if _, ok := committed[strings.ToLower(email)]; !ok {
			v.AckedNotCommitted++
		}
	}
	got := s.byRecipient()
	msgs := s.mail.Messages()
	v.Messages = len(msgs)
	first := map[string]time.Time{}
	for _, m := range msgs {
		for _, to := range m.To {
			to = strings.ToLower(to)
			if _, ok := first[to]; !ok {
				first[to] = m.At
			}
		}
	}
	var delays []time.Duration
	for email, at := range load.ackedAt {
		if sent, ok := first[strings.ToLower(email)]; ok {
			delays = append(delays, max(0, sent.Sub(at)))
		}
	}
	if len(delays) > 0 {
		slices.Sort(delays)
		v.MaxDelaySeconds = delays[len(delays)-1].Seconds()
		v.P99DelaySeconds = delays[(len(delays)*99)/100].Seconds()
	}
	var lost []int64
	for id, email := range users {
		ids := got[email]
		if len(ids) == 0 {
			lost = append(lost, id)
			continue
		}
		v.Emailed++
		for _, other := range ids[1:] {
			if other == ids[0] {
				v.CopiesSameID++
			} else {
				v.CopiesOtherID++
			}
		}
	}
	v.Lost = len(lost)

	entries, err := s.xrange(ctx, streamName)
	if err != nil {
		return err
	}
	seen := map[string]bool{}
	inStream := map[string][]string{} // aggregate id → entry ids
	for _, e := range entries {
		id := e.FieldValues["event_id"]
		if seen[id] {
			v.StreamDuplicates++
		}
		seen[id] = true
		inStream[e.FieldValues["aggregate_id"]] = append(inStream[e.FieldValues["aggregate_id"]], e.ID)
	}
	for id := range users {
		if len(inStream[strconv.FormatInt(id, 10)]) == 0 {
			v.MissingFromStream++
		}
	}
	dead, err := s.xrange(ctx, deadStream)
	if err != nil {
		return err
	}
	v.DeadLetters = len(dead)
	if err := s.db.QueryRow(ctx, `SELECT count(*) FROM outbox_dead`).Scan(&v.OutboxDead); err != nil {
		return fmt.Errorf("count outbox_dead: %w", err)
	}
	if len(lost) > 0 {
		v.Stuck = map[string]int{}
		slices.Sort(lost)
		for _, id := range lost {
			where, err := s.where(ctx, id, inStream, dead)
			if err != nil {
				return err
			}
			v.Stuck[where]++
			if len(v.LostExamples) < 10 {
				v.LostExamples = append(v.LostExamples, fmt.Sprintf("user %d <%s>: %s", id, users[id], where))
			}
		}
	}
	return nil
}

// where says where the event of a user without an email is stuck.
func (s *stage) where(ctx context.Context, id int64, inStream map[string][]string, dead []rueidis.XRangeEntry) (string, error) {
	agg := strconv.FormatInt(id, 10)
	var n int
	if err := s.db.QueryRow(ctx, `SELECT count(*) FROM outbox WHERE aggregate_type = 'user' AND aggregate_id = $1`, agg).Scan(&n); err != nil {
		return "", fmt.Errorf("look for user %d in the outbox: %w", id, err)
	}
	if n > 0 {
		return "still in outbox", nil
	}
	if err := s.db.QueryRow(ctx, `SELECT count(*) FROM outbox_dead WHERE aggregate_type = 'user' AND aggregate_id = $1`, agg).Scan(&n); err != nil {
		return "", fmt.Errorf("look for user %d in outbox_dead: %w", id, err)
	}
	if n > 0 {
		return "in outbox_dead", nil
	}
	for _, e := range dead {
		if e.FieldValues["aggregate_id"] == agg {
			return "in " + deadStream, nil
		}
	}
	var sent *time.Time
	var failures int
	record := true
	if err := s.db.QueryRow(ctx, `SELECT sent_at, failures FROM email_sends WHERE key = $1`, "welcome:"+agg).Scan(&sent, &failures); err != nil {
		record = false
	}
	ids := inStream[agg]
	if len(ids) > 0 {
		pending, err := s.pendingIDs(ctx)
		if err != nil {
			return "", err
		}
		for _, eid := range ids {
			if pending[eid] {
				return "in the stream, pending (unacknowledged)", nil
			}
		}
	}
	switch {
	case record && sent != nil:
		return "email_sends says sent, the SMTP server has no message", nil
	case record:
		return fmt.Sprintf("in email_sends, unsent (%d failures)", failures), nil
	case len(ids) > 0:
		return "in the stream, acknowledged, never sent", nil
	}
	var relayed int
	_ = s.db.QueryRow(ctx, `SELECT count(*) FROM outbox_relayed WHERE aggregate_type = 'user' AND aggregate_id = $1`, agg).Scan(&relayed)
	if relayed > 0 {
		return "relayed (outbox_relayed) but not in the stream", nil
	}
	return "nowhere (no outbox row, not relayed)", nil
}

// xrange reads a whole stream; a missing stream is empty.
func (s *stage) xrange(ctx context.Context, key string) ([]rueidis.XRangeEntry, error) {
	c := s.redisC
	entries, err := c.Do(ctx, c.B().Xrange().Key(key).Start("-").End("+").Build()).AsXRange()
	if err != nil && !rueidis.IsRedisNil(err) {
		return nil, fmt.Errorf("XRANGE %s: %w", key, err)
	}
	return entries, nil
}

// pendingIDs lists the entries pending in any group of the user stream.
func (s *stage) pendingIDs(ctx context.Context) (map[string]bool, error) {
	c := s.redisC
	out := map[string]bool{}
	groups, err := c.Do(ctx, c.B().XinfoGroups().Key(streamName).Build()).ToArray()
	if err != nil {
		return out, nil // no stream, no group: nothing pending
	}
	for _, g := range groups {
		m, err := g.AsMap()
		if err != nil {
			return nil, fmt.Errorf("XINFO GROUPS: %w", err)
		}
		nameMsg := m["name"]
		name, _ := nameMsg.ToString()
		rows, err := c.Do(ctx, c.B().Xpending().Key(streamName).Group(name).Start("-").End("+").Count(1_000_000).Build()).ToArray()
		if err != nil {
			return nil, fmt.Errorf("XPENDING: %w", err)
		}
		for _, r := range rows {
			fields, err := r.ToArray()
			if err != nil || len(fields) == 0 {
				continue
			}
			id, _ := fields[0].ToString()
			out[id] = true
		}
	}
	return out, nil
}

// decide fills in Pass and Failures: an email lost, a signup lost, a second
// email with another Message-ID, or a copy with the same one where no fault
// made a send ambiguous, fails the scenario, and so does a pipeline that
// never settled.
func (v *verdict) decide() {
	v.Failures = nil
	if v.Lost > 0 {
		v.Failures = append(v.Failures, fmt.Sprintf("%d committed users without an email", v.Lost))
	}
	if v.AckedNotCommitted > 0 {
		v.Failures = append(v.Failures, fmt.Sprintf("%d users answered 201 are not in the database", v.AckedNotCommitted))
	}
	if v.CopiesOtherID > 0 {
		v.Failures = append(v.Failures, fmt.Sprintf("%d second emails with a different Message-ID", v.CopiesOtherID))
	}
	if v.MissingFromStream > 0 {
		v.Failures = append(v.Failures, fmt.Sprintf("%d committed events missing from the stream", v.MissingFromStream))
	}
	if v.CopiesSameID > v.AmbiguousSends+v.AmbiguousBudget {
		v.Failures = append(v.Failures, fmt.Sprintf("%d copies with the same Message-ID, more than the faults explain (%d) and sendemail logged as ambiguous (%d)",
			v.CopiesSameID, v.AmbiguousBudget, v.AmbiguousSends))
	}
	if v.Refused > 0 || v.GaveUp > 0 || v.Acked < v.Signups {
		v.Failures = append(v.Failures, fmt.Sprintf("%d of %d signups never got their 201 (%d refused, %d given up)", v.Signups-v.Acked, v.Signups, v.Refused, v.GaveUp))
	}
	if len(v.FaultErrors) > 0 {
		v.Failures = append(v.Failures, "a fault could not be applied: "+strings.Join(v.FaultErrors, "; "))
	}
	if !v.Settled {
		v.Failures = append(v.Failures, "the pipeline did not settle in time: "+v.NotSettled)
	}
	v.Pass = len(v.Failures) == 0
}

// line is the one-line summary of a verdict.
func (v *verdict) line() string {
	status := "PASS"
	if !v.Pass {
		status = "FAIL: " + strings.Join(v.Failures, "; ")
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%-22s %s  signups %d, 201 %d, committed %d, emailed %d, lost %d, copies %d same-id / %d other-id, dead letters %d, stream dups %d, missing from stream %d, process problems %d, settled %.1fs after, email delay p99 %.2fs max %.2fs",
		v.Scenario, status, v.Signups, v.Acked, v.Committed, v.Emailed, v.Lost, v.CopiesSameID, v.CopiesOtherID,
		v.DeadLetters, v.StreamDuplicates, v.MissingFromStream, len(v.Problems), v.SettleSeconds, v.P99DelaySeconds, v.MaxDelaySeconds)
	if len(v.Stuck) > 0 {
		keys := make([]string, 0, len(v.Stuck))
		for k := range v.Stuck {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			fmt.Fprintf(&b, "\n    stuck: %d %s", v.Stuck[k], k)
		}
		for _, e := range v.LostExamples {
			fmt.Fprintf(&b, "\n    e.g. %s", e)
		}
	}
	type count struct {
		what string
		n    int
	}
	var logged []count
	for k, n := range v.LogWarnings {
		logged = append(logged, count{k, n})
	}
	sort.Slice(logged, func(i, j int) bool {
		return logged[i].n > logged[j].n || logged[i].n == logged[j].n && logged[i].what < logged[j].what
	})
	for i, c := range logged {
		if i == 8 {
			fmt.Fprintf(&b, "\n    log: … %d more kinds of warning", len(logged)-i)
			break
		}
		fmt.Fprintf(&b, "\n    log: %d× %s", c.n, c.what)
	}
	for _, p := range v.Problems {
		fmt.Fprintf(&b, "\n    process: %s", p)
	}
	for _, e := range v.FaultErrors {
		fmt.Fprintf(&b, "\n    fault error: %s", e)
	}
	return b.String()
}

// writeTable prints every verdict as one row of a Markdown table.
func writeTable(w io.Writer, vs []*verdict) {
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', tabwriter.Debug)
	fmt.Fprintln(tw, "| scenario\t signups\t 201\t committed\t emailed\t lost\t copies same id\t copies other id\t dead letters\t stream dups\t crashes/hangs\t warn/err log lines\t settle s\t max delay s\t verdict\t")
	fmt.Fprintln(tw, "| ---\t ---\t ---\t ---\t ---\t ---\t ---\t ---\t ---\t ---\t ---\t ---\t ---\t ---\t ---\t")
	for _, v := range vs {
		status := "pass"
		if !v.Pass {
			status = "FAIL"
		}
		warnings := 0
		for _, n := range v.LogWarnings {
			warnings += n
		}
		fmt.Fprintf(tw, "| %s\t %d\t %d\t %d\t %d\t %d\t %d\t %d\t %d\t %d\t %d\t %d\t %.1f\t %.1f\t %s\t\n", v.Scenario, v.Signups, v.Acked,
			v.Committed, v.Emailed, v.Lost, v.CopiesSameID, v.CopiesOtherID, v.DeadLetters, v.StreamDuplicates,
			len(v.Problems), warnings, v.SettleSeconds, v.MaxDelaySeconds, status)
	}
	tw.Flush()
}
