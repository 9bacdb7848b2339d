package serve

import (
	"context"
	"sync"
)

// Background runs one goroutine until Stop, with the Start/Stop contract of
// [Service]: Start returns at once, Stop cancels and waits, and both are safe
// to call more than once.
type Background struct {
	mu      sync.Mutex
	cancel  context.CancelFunc
	done    chan struct{}
	stopped bool
}

// Start runs run in a goroutine with a context that Stop cancels. It is a
// no-op if the loop is running, and returns ErrStopped after Stop.
func (b *Background) Start(ctx context.Context, run func(ctx context.Context)) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.stopped {
		return ErrStopped
	}
	if b.done != nil {
		return nil
	}
	// The loop outlives the context that started it (often a request's); it
	// ends with Stop, and keeps ctx's values only.
	ctx, b.cancel = context.WithCancel(context.WithoutCancel(ctx))
	b.done = make(chan struct{})
	go func() {
		defer close(b.done)
		run(ctx)
	}()
	return nil
}

// Stop cancels the loop and blocks until it has returned.
func (b *Background) Stop() {
	b.mu.Lock()
	b.stopped = true
	cancel, done := b.cancel, b.done
	b.mu.Unlock()
	if cancel == nil {
		return
	}
	cancel()
	<-done
}
