package proxy_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/textproto"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
)

// hintingUpstream sends two 103 Early Hints before every response, and puts
// a header named as the proxy's request id on the hints and the response,
// as a confused or hostile upstream could.
func hintingUpstream(t *testing.T) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Link", "</style.css>; rel=preload")
		w.Header().Set("X-Byokproxy-Request-Id", "from-the-upstream")
		w.WriteHeader(http.StatusEarlyHints)
		w.WriteHeader(http.StatusEarlyHints)
		w.Header().Del("Link")
		if strings.Contains(r.URL.RawQuery, "alt=sse") {
			w.Header().Set("Content-Type", "text/event-stream")
			w.WriteHeader(http.StatusOK)
			io.WriteString(w, `data: {"candidates":[{"content":{"role":"model","parts":[{"text":"hi"}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1,"totalTokenCount":4}}`+"\n\n")
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"candidates":[{"content":{"role":"model","parts":[{"text":"hi"}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1,"totalTokenCount":4}}`)
	}))
	t.Cleanup(srv.Close)
	return srv
}

// TestRequestIDAfterEarlyHints checks that a response after 103 Early Hints
// still carries the proxy's request id, once, and that it is the id of the
// request's audit event, whether the response is JSON, an attached stream
// or a detached one.
func TestRequestIDAfterEarlyHints(t *testing.T) {
	up := hintingUpstream(t)
	st := teststack.Start(t, func(c *config.Config) {
		c.Provider(provider.Google).Upstream = up.URL
	})
	_, attachedURL := st.AttachedProxy(t)
	cases := []struct {
		name, url string
		c         call
	}{
		{"json", st.ProxyURL, nonStream[provider.Google]},
		{"detached stream", st.ProxyURL, streaming[provider.Google]},
		{"attached stream", attachedURL, streaming[provider.Google]},
	}
	for i, tc := range cases {
		m := "hints-" + string(rune('a'+i)) + "@example.com"
		token := st.Token(t, m)
		var mu sync.Mutex
		var hinted [][]string
		trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
			mu.Lock()
			defer mu.Unlock()
			hinted = append(hinted, h.Values("X-Byokproxy-Request-Id"))
			return nil
		}}
		ctx := httptrace.WithClientTrace(context.Background(), trace)
		resp, body := send(t, http.DefaultClient, callRequest(ctx, tc.url, provider.Google, token, tc.c))
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"hi"`) {
			t.Errorf("%s: %d %s", tc.name, resp.StatusCode, body)
			continue
		}
		ids := resp.Header.Values("X-Byokproxy-Request-Id")
		if len(ids) != 1 {
			t.Errorf("%s: request id header %q, want one value", tc.name, ids)
			continue
		}
		mu.Lock()
		if len(hinted) != 2 {
			t.Errorf("%s: %d 103 responses reached the client, want 2", tc.name, len(hinted))
		}
		for n, early := range hinted {
			if len(early) != 1 || early[0] != ids[0] {
				t.Errorf("%s: 103 response %d has request id %q, want only %q", tc.name, n+1, early, ids[0])
			}
		}
		mu.Unlock()

		var events []map[string]any
		for deadline := time.Now().Add(5 * time.Second); len(events) == 0 && time.Now().Before(deadline); {
			events = teststack.EventsOf(st.AuditEvents(t), m)
			if len(events) == 0 {
				time.Sleep(10 * time.Millisecond)
			}
		}
		if len(events) != 1 {
			t.Errorf("%s: %d audit events, want 1", tc.name, len(events))
			continue
		}
		if events[0]["request_id"] != ids[0] {
			t.Errorf("%s: request id %q, audit event's %v", tc.name, ids[0], events[0]["request_id"])
		}
	}
}

// TestRequestIDOnSwitchingProtocols checks that a 101 response, which the
// reverse proxy writes itself, carries the proxy's request id alone and no
// masked key.
func TestRequestIDOnSwitchingProtocols(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "Upgrade")
		w.Header().Set("Upgrade", "websocket")
		w.Header().Set("X-Byokproxy-Request-Id", "from-the-upstream")
		w.Header().Set("X-Key-Hint", "sk-proj-byok…OWN2")
		w.WriteHeader(http.StatusSwitchingProtocols)
	}))
	t.Cleanup(up.Close)
	st := teststack.Start(t, func(c *config.Config) {
		c.Provider(provider.OpenAI).Upstream = up.URL
	})
	token := useBYOKEverywhere(t, st, "upgrade@example.com")
	req, err := http.NewRequest(http.MethodGet, st.ProxyURL+"/openai/v1/realtime", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()

	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %d, want 101", resp.StatusCode)
	}
	if ids := resp.Header.Values("X-Byokproxy-Request-Id"); len(ids) != 1 || ids[0] == "from-the-upstream" {
		t.Errorf("request id header %q, want the proxy's id alone", ids)
	}
	// A 101 response's header is scrubbed as that of other 1xx responses.
	if hint := resp.Header.Get("X-Key-Hint"); hint != "[REDACTED]" {
		t.Errorf("X-Key-Hint = %q, want the masked key redacted", hint)
	}
}
