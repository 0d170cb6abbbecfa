package proxy

import (
	"io"
	"strings"
	"testing"
	"time"
)

// TestBodySent checks when a stream whose body is forwarded unread may be
// detached: only once the body has reached its end and the transport has
// reported the request written, which bodySent waits a little for.
func TestBodySent(t *testing.T) {
	newExchange := func(read bool) *exchange {
		x := &exchange{streamedBody: newCountingBody(io.NopCloser(strings.NewReader("{}"))), wrote: make(chan struct{})}
		if read {
			io.ReadAll(x.streamedBody)
		}
		return x
	}

	x := newExchange(false)
	x.sent.Store(true)
	if bodySent(x) {
		t.Error("bodySent with the body not read to its end: true")
	}

	x = newExchange(true)
	x.sent.Store(true)
	if !bodySent(x) {
		t.Error("bodySent with the body read and the request written: false")
	}

	x = newExchange(true)
	go func() {
		time.Sleep(time.Millisecond)
		x.sent.Store(true)
		close(x.wrote)
	}()
	if !bodySent(x) {
		t.Error("bodySent with the request written 1 ms later: false")
	}

	x = newExchange(true)
	start := time.Now()
	if bodySent(x) {
		t.Error("bodySent with the request never written: true")
	}
	if waited := time.Since(start); waited > time.Second {
		t.Errorf("bodySent waited %v for a request never written", waited)
	}
}
