package proxy

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// stallWatch calls onStall once a single wait for upstream bytes has
// lasted idle.
//
// Setting a timer before every read and stopping it after would be
// simpler. But a timer set to fire before every other timer of its P makes
// the Go runtime wake a thread or interrupt the network poller. That can
// add a wake-up to every event of every stream. The watch records when the
// current wait began instead, and its one timer fires about once per idle
// period to compare.
type stallWatch struct {
	// ctx is the request's context. Once it ends the timer is not set
	// again, so a body that is never closed does not keep the exchange.
	ctx     context.Context
	idle    time.Duration
	onStall func()
	// since is when the current wait began, as nanoseconds after
	// watchEpoch plus one, or 0 while no read is waiting.
	since atomic.Int64

	mu      sync.Mutex
	timer   *time.Timer
	stopped bool
}

// watchEpoch is the origin of stallWatch's times. Durations since it use
// the monotonic clock, so a change of the wall clock cannot fake a stall.
var watchEpoch = time.Now()

func watchNow() int64 { return int64(time.Since(watchEpoch)) + 1 }

func newStallWatch(ctx context.Context, idle time.Duration, onStall func()) *stallWatch {
	w := &stallWatch{ctx: ctx, idle: idle, onStall: onStall}
	// The lock keeps check, which may run at once for a tiny idle, from
	// reading the timer before it is set.
	w.mu.Lock()
	w.timer = time.AfterFunc(idle, w.check)
	w.mu.Unlock()
	return w
}

// readStarted marks the start of one read of the upstream body.
func (w *stallWatch) readStarted() { w.since.Store(watchNow()) }

// readDone marks the end of that read.
func (w *stallWatch) readDone() { w.since.Store(0) }

// check runs on the timer. It reports a stall, or sets the timer for the
// moment the current wait would become one.
func (w *stallWatch) check() {
	w.mu.Lock()
	if w.stopped || w.ctx.Err() != nil {
		w.mu.Unlock()
		return
	}
	next := w.idle
	if since := w.since.Load(); since != 0 {
		waited := time.Duration(watchNow() - since)
		if waited >= w.idle {
			w.stopped = true
			w.mu.Unlock()
			w.onStall()
			return
		}
		next = w.idle - waited
	}
	w.timer.Reset(next)
	w.mu.Unlock()
}

// stop ends the watch. Like time.Timer.Stop, it does not wait for a stall
// report already under way.
func (w *stallWatch) stop() {
	w.mu.Lock()
	w.stopped = true
	w.timer.Stop()
	w.mu.Unlock()
}
