package proxy

import (
	"sync/atomic"
	"testing"
	"time"
)

// TestStallWatch checks that only one wait that lasts the idle time is a
// stall: not many short waits that add up to more, and not time spent
// outside a wait, such as writing to a slow client.
func TestStallWatch(t *testing.T) {
	const idle = 200 * time.Millisecond

	t.Run("one long wait", func(t *testing.T) {
		stalled := make(chan time.Time, 2)
		w := newStallWatch(idle, func() { stalled <- time.Now() })
		defer w.stop()
		time.Sleep(idle / 2) // time outside a wait does not count
		start := time.Now()
		w.waiting(true)
		select {
		case at := <-stalled:
			if waited := at.Sub(start); waited < idle {
				t.Fatalf("stall reported after %v of waiting, want at least %v", waited, idle)
			}
		case <-time.After(10 * idle):
			t.Fatalf("no stall reported after %v of waiting", 10*idle)
		}
		time.Sleep(2 * idle)
		if len(stalled) != 0 {
			t.Fatal("stall reported twice")
		}
	})

	t.Run("short waits", func(t *testing.T) {
		var stalls atomic.Int32
		w := newStallWatch(idle, func() { stalls.Add(1) })
		defer w.stop()
		for range 30 {
			w.waiting(true)
			time.Sleep(idle / 20)
			w.waiting(false)
		}
		if n := stalls.Load(); n != 0 {
			t.Fatalf("%d stalls reported for waits of %v each", n, idle/20)
		}
	})

	t.Run("not waiting", func(t *testing.T) {
		var stalls atomic.Int32
		w := newStallWatch(idle, func() { stalls.Add(1) })
		defer w.stop()
		w.waiting(true)
		w.waiting(false)
		time.Sleep(3 * idle)
		if n := stalls.Load(); n != 0 {
			t.Fatalf("%d stalls reported while no read was waiting", n)
		}
	})

	t.Run("stopped", func(t *testing.T) {
		var stalls atomic.Int32
		w := newStallWatch(idle, func() { stalls.Add(1) })
		w.waiting(true)
		w.stop()
		time.Sleep(3 * idle)
		if n := stalls.Load(); n != 0 {
			t.Fatalf("%d stalls reported after stop", n)
		}
	})
}
