package proxy

import (
	"context"
	"io"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/usage"
)

// TestStallWatch checks that only one wait that lasts the idle time is a
// stall: not many short waits that add up to more, and not time spent
// outside a wait, such as writing to a slow client.
func TestStallWatch(t *testing.T) {
	const idle = 200 * time.Millisecond

	t.Run("one long wait", func(t *testing.T) {
		// A longer idle time leaves room for a late timer on a loaded
		// machine, while a report a quarter late still fails the test.
		const long = 2 * idle
		stalled := make(chan time.Time, 2)
		w := newStallWatch(context.Background(), long, func() { stalled <- time.Now() })
		defer w.stop()
		time.Sleep(long / 2) // time outside a wait does not count
		start := time.Now()
		w.readStarted()
		select {
		case at := <-stalled:
			waited := at.Sub(start)
			if waited < long {
				t.Fatalf("stall reported after %v of waiting, want at least %v", waited, long)
			}
			if waited > long+long/4 {
				t.Fatalf("stall reported after %v of waiting, want about %v", waited, long)
			}
		case <-time.After(10 * long):
			t.Fatalf("no stall reported after %v of waiting", 10*long)
		}
		time.Sleep(2 * long)
		if len(stalled) != 0 {
			t.Fatal("stall reported twice")
		}
	})

	t.Run("short waits", func(t *testing.T) {
		var stalls atomic.Int32
		w := newStallWatch(context.Background(), idle, func() { stalls.Add(1) })
		defer w.stop()
		for range 30 {
			w.readStarted()
			time.Sleep(idle / 20)
			w.readDone()
		}
		if n := stalls.Load(); n != 0 {
			t.Fatalf("%d stalls reported for waits of %v each", n, idle/20)
		}
	})

	t.Run("not waiting", func(t *testing.T) {
		var stalls atomic.Int32
		w := newStallWatch(context.Background(), idle, func() { stalls.Add(1) })
		defer w.stop()
		w.readStarted()
		w.readDone()
		time.Sleep(3 * idle)
		if n := stalls.Load(); n != 0 {
			t.Fatalf("%d stalls reported while no read was waiting", n)
		}
	})

	t.Run("stopped", func(t *testing.T) {
		var stalls atomic.Int32
		w := newStallWatch(context.Background(), idle, func() { stalls.Add(1) })
		w.readStarted()
		w.stop()
		time.Sleep(3 * idle)
		if n := stalls.Load(); n != 0 {
			t.Fatalf("%d stalls reported after stop", n)
		}
	})

	t.Run("check after stop", func(t *testing.T) {
		w := newStallWatch(context.Background(), idle, func() {})
		w.stop()
		w.check()
		if w.timer.Stop() {
			t.Fatal("check set the timer again after stop")
		}
	})

	t.Run("request ended", func(t *testing.T) {
		// A body that is never closed must not keep its timer, and with it
		// the exchange, once the request is over.
		ctx, cancel := context.WithCancel(context.Background())
		w := newStallWatch(ctx, idle/10, func() {})
		cancel()
		time.Sleep(3 * idle)
		if w.timer.Stop() {
			t.Fatal("the timer was set again after the request ended")
		}
	})
}

// TestTapBodyCloseStopsWatch checks that closing the response body
// ends its stall watch.
func TestTapBodyCloseStopsWatch(t *testing.T) {
	w := newStallWatch(context.Background(), time.Minute, func() {})
	b := &tapBody{
		ReadCloser: io.NopCloser(strings.NewReader("data")),
		ctx:        context.Background(),
		x:          &exchange{},
		sink:       usage.NewDecoder("", io.Discard),
		stall:      w,
		idle:       time.Minute,
	}
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	w.mu.Lock()
	stopped := w.stopped
	w.mu.Unlock()
	if !stopped {
		t.Fatal("the stall watch still runs after Close")
	}
	if w.timer.Stop() {
		t.Fatal("the stall timer is still set after Close")
	}
}
