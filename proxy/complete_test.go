package proxy_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
)

// closingClient records a response and cancels the request's context once
// the whole body has arrived, as a client that closes its connection right
// after reading does.
type closingClient struct {
	*httptest.ResponseRecorder
	cancel context.CancelFunc
}

func (c *closingClient) Write(p []byte) (int, error) {
	n, err := c.ResponseRecorder.Write(p)
	if want, perr := strconv.Atoi(c.Header().Get("Content-Length")); perr == nil && c.Body.Len() >= want {
		c.cancel()
	}
	return n, err
}

func TestClosingAfterFullResponseNotDisconnect(t *testing.T) {
	st := teststack.Start(t)
	const m = "closes-after@example.com"
	token := st.Token(t, m)
	c := nonStream[provider.OpenAI]

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req := httptest.NewRequestWithContext(ctx, http.MethodPost, c.path, strings.NewReader(c.body))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	w := &closingClient{ResponseRecorder: httptest.NewRecorder(), cancel: cancel}
	st.Handler.ServeHTTP(w, req)
	if w.Code != http.StatusOK {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	if ctx.Err() == nil {
		t.Fatal("the response had no Content-Length, so the client never closed early")
	}

	st.WaitAudit(t)
	events := teststack.EventsOf(st.AuditEvents(t), m)
	if len(events) != 1 {
		t.Fatalf("%d audit events, want 1", len(events))
	}
	if e := events[0]; e["error"] != "" {
		t.Errorf("a response the client read in full was audited with error %q", e["error"])
	}
}
