package proxy

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/byokproxy/byokproxy/provider"
	"github.com/byokproxy/byokproxy/usage"
)

// TestPendingChargedAfterLastBytes reads an Anthropic stream whose final
// usage comes in the same read as the end of the body, as Go's HTTP client
// often returns it. The usage held as pending must be the final count, not
// what message_start reported.
func TestPendingChargedAfterLastBytes(t *testing.T) {
	h := &Handler{}
	x := &exchange{id: "req-last", mailbox: "last@example.com", start: time.Now(), limited: true}
	x.tap = usage.NewTap(provider.Anthropic, "text/event-stream")
	start := "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":100,\"output_tokens\":1}}}\n\n"
	end := "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":200}}\n\n" +
		"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
	body := &tapBody{
		ReadCloser: io.NopCloser(io.MultiReader(strings.NewReader(start), iotest.DataErrReader(strings.NewReader(end)))),
		ctx:        t.Context(), h: h, x: x, tap: x.tap, resp: &http.Response{},
	}
	if _, err := io.ReadAll(body); err != nil {
		t.Fatal(err)
	}
	pending := h.pending.get(x.mailbox)
	if len(pending) != 1 || pending[0].Tokens != 300 {
		t.Fatalf("pending %+v, want one request of 300 tokens", pending)
	}

	x.charge.set(420)
	if pending := h.pending.get(x.mailbox); len(pending) != 1 || pending[0].Tokens != 420 {
		t.Errorf("pending after set %+v, want one request of 420 tokens", pending)
	}
	x.charge.done()
	x.charge.done()
	if pending := h.pending.get(x.mailbox); len(pending) != 0 || h.pending.entries.Load() != 0 {
		t.Errorf("pending after done %+v (%d mailboxes), want none", pending, h.pending.entries.Load())
	}
}
