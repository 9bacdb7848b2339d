package sendemail

import (
	"context"
	"slices"
	"sync"
	"time"

	"github.com/sethvargo/go-retry"
)

// batcher runs requests as soon as they arrive; requests that arrive while
// a run is under way go together in the next one. No request waits for
// others: batching only happens when there is a queue. Claims and marks go
// through one each, so that emails sent at the same moment share commits.
type batcher[Req, Res any] struct {
	reqs chan batchRequest[Req, Res]
	done chan struct{}
}

type batchRequest[Req, Res any] struct {
	req    Req
	result chan batchResult[Res]
}

type batchResult[Res any] struct {
	res Res
	err error
}

// startBatcher runs run on batches of up to limit requests until close,
// with up to runs batches under way at once. run returns one result per
// request, or an error for the whole batch.
func startBatcher[Req, Res any](queue, limit, runs int, run func([]Req) ([]Res, error)) *batcher[Req, Res] {
	b := &batcher[Req, Res]{reqs: make(chan batchRequest[Req, Res], queue), done: make(chan struct{})}
	var wg sync.WaitGroup
	for range runs {
		wg.Go(func() {
			for first := range b.reqs {
				batch := []batchRequest[Req, Res]{first}
			more:
				for len(batch) < limit {
					select {
					case r, ok := <-b.reqs:
						if !ok {
							break more
						}
						batch = append(batch, r)
					default:
						break more
					}
				}
				reqs := make([]Req, len(batch))
				for i, r := range batch {
					reqs[i] = r.req
				}
				res, err := run(reqs)
				for i, r := range batch {
					if err != nil {
						r.result <- batchResult[Res]{err: err}
					} else {
						r.result <- batchResult[Res]{res: res[i]}
					}
				}
			}
		})
	}
	go func() {
		wg.Wait()
		close(b.done)
	}()
	return b
}

// do runs req and waits for its result.
func (b *batcher[Req, Res]) do(req Req) (Res, error) {
	r := batchRequest[Req, Res]{req: req, result: make(chan batchResult[Res], 1)}
	b.reqs <- r
	res := <-r.result
	return res.res, res.err
}

// close stops the batcher once every queued request has run.
func (b *batcher[Req, Res]) close() {
	close(b.reqs)
	<-b.done
}

// claimResult is one claim's answer.
type claimResult struct {
	state claimState
	err   error
}

// startClaims batches the claims taken inside deliver: renewals and
// retries. A batch the database refuses is claimed again one by one (see
// claimEach).
func (c *Consumer) startClaims(ctx context.Context) *batcher[claimRequest, claimResult] {
	ctx = context.WithoutCancel(ctx)
	return startBatcher(c.concurrency, claimBatch, 1, func(reqs []claimRequest) ([]claimResult, error) {
		return c.claimEach(ctx, reqs, c.sends.Claim), nil
	})
}

// claimEach claims reqs with run (Sends.Claim or Sends.ClaimAhead) in one
// statement, with one result per request. A batch the database refuses is
// claimed again one by one, so that an entry whose values the database
// refuses fails alone.
func (c *Consumer) claimEach(ctx context.Context, reqs []claimRequest, run func(context.Context, []claimRequest) ([]claimState, error)) []claimResult {
	claim := func(reqs []claimRequest) ([]claimState, error) {
		ctx, cancel := context.WithTimeout(ctx, redisTimeout)
		defer cancel()
		return run(ctx, reqs)
	}
	out := make([]claimResult, len(reqs))
	states, err := claim(reqs)
	if err == nil {
		for i, st := range states {
			out[i] = claimResult{state: st}
		}
		return out
	}
	if len(reqs) == 1 || !entryFault(err) {
		for i := range out {
			out[i] = claimResult{err: err}
		}
		return out
	}
	for i, r := range reqs {
		st, err := claim([]claimRequest{r})
		if err != nil {
			out[i] = claimResult{err: err}
			continue
		}
		out[i] = claimResult{state: st[0]}
	}
	return out
}

// markResult says whether a mark found its claim no longer the marker's.
type markResult struct{ lost bool }

const (
	// claimBatch bounds the renewals and retries claimed in one statement.
	claimBatch = 256
	// markBatch bounds the marks written in one statement: they share one
	// timeout and fail together, and a failed mark is a duplicate email
	// if this process then dies.
	markBatch = 64
	// markRuns is how many mark statements may be under way at once. With
	// at most 2 × concurrency emails sent and not yet marked, a send
	// waits for marks to commit; a second statement commits beside the
	// first (PostgreSQL flushes their WAL together) instead of after it.
	markRuns = 2
)

// startMarks batches marks. Marks are written even during shutdown
// (failing here costs a duplicate email), with a few seconds of retries;
// after that the fact is kept in memory (recordSent). The first failed
// attempt is reported to dbErr at once, before the retries: no further
// send of the batch starts while its mark might not be written.
func (c *Consumer) startMarks(ctx context.Context, dbErr *errOnce) *batcher[mark, markResult] {
	ctx = context.WithoutCancel(ctx)
	return startBatcher(c.concurrency, markBatch, markRuns, func(marks []mark) ([]markResult, error) {
		var lost []string
		b := retry.WithMaxRetries(4, retry.NewExponential(100*time.Millisecond))
		err := retry.Do(ctx, b, func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, redisTimeout)
			defer cancel()
			var err error
			lost, err = c.sends.MarkSent(ctx, marks)
			if err != nil {
				dbErr.set(err)
			}
			return retry.RetryableError(err)
		})
		if err != nil {
			return nil, err
		}
		out := make([]markResult, len(marks))
		for i, m := range marks {
			out[i] = markResult{lost: slices.Contains(lost, m.key)}
		}
		return out, nil
	})
}
