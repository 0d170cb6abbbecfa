package proxy_test

import (
	"bufio"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
)

// call describes one request per provider used across tests.
type call struct {
	path   string
	body   string
	stream bool
}

var nonStream = map[string]call{
	provider.OpenAI:    {path: "/openai/v1/chat/completions", body: `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"say hello"}]}`},
	provider.Anthropic: {path: "/anthropic/v1/messages", body: `{"model":"claude-haiku-4-5","max_tokens":16,"messages":[{"role":"user","content":"say hello"}]}`},
	provider.Google:    {path: "/google/v1beta/models/gemini-2.5-flash:generateContent", body: `{"contents":[{"role":"user","parts":[{"text":"say hello"}]}]}`},
}

var streaming = map[string]call{
	provider.OpenAI:    {path: "/openai/v1/chat/completions", body: `{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"say hello"}]}`, stream: true},
	provider.Anthropic: {path: "/anthropic/v1/messages", body: `{"model":"claude-haiku-4-5","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"say hello"}]}`, stream: true},
	provider.Google:    {path: "/google/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", body: `{"contents":[{"role":"user","parts":[{"text":"say hello"}]}]}`, stream: true},
}

func TestSharedAndBYOKInjection(t *testing.T) {
	st := teststack.Start(t)
	for _, p := range provider.Names {
		for _, source := range []string{"shared", "byok"} {
			for name, calls := range map[string]map[string]call{"plain": nonStream, "stream": streaming} {
				t.Run(p+"/"+source+"/"+name, func(t *testing.T) {
					m := "mbx-" + p + "-" + source + "-" + name + "@example.com"
					if source == "byok" {
						st.UseBYOK(t, m, p)
					}
					token := st.Token(t, m)
					up := st.Upstreams[p]
					up.Reset()
					c := calls[p]

					resp, body := st.Do(t, "POST", c.path, token, c.body, sdkHeaders(p)...)
					if resp.StatusCode != 200 {
						t.Fatalf("status %d: %s", resp.StatusCode, body)
					}
					reqs := up.Requests()
					if len(reqs) != 1 {
						t.Fatalf("upstream got %d requests, want 1", len(reqs))
					}
					want := teststack.SharedKeys[p]
					if source == "byok" {
						want = teststack.BYOKKeys[p]
					}
					if reqs[0].Key != want {
						t.Errorf("upstream saw key %q, want the %s key", reqs[0].Key, source)
					}
					for name, values := range reqs[0].Header {
						for _, v := range values {
							if strings.Contains(v, token) {
								t.Errorf("upstream header %s carries the mailbox token", name)
							}
						}
					}
					if strings.Contains(reqs[0].RawQuery, token) || strings.Contains(string(reqs[0].Body), token) {
						t.Error("upstream query or body carries the mailbox token")
					}

					events := teststack.EventsOf(st.AuditEvents(t), m)
					if len(events) != 1 {
						t.Fatalf("audit events for %s: %d, want 1", m, len(events))
					}
					e := events[0]
					wantKind := "metered"
					if source == "byok" {
						wantKind = "byok"
					}
					if e["kind"] != wantKind || e["source"] != wantKind {
						t.Errorf("kind/source = %v/%v, want %s", e["kind"], e["source"], wantKind)
					}
					if source == "byok" && e["key_last4"] != want[len(want)-4:] {
						t.Errorf("key_last4 = %v, want %s", e["key_last4"], want[len(want)-4:])
					}
					if source == "shared" {
						if _, ok := e["key_last4"]; ok {
							t.Error("metered event carries key_last4")
						}
					}
					if e["stream"] != c.stream {
						t.Errorf("stream = %v, want %v", e["stream"], c.stream)
					}
					if e["model"] == "" || e["model"] == nil {
						t.Error("model is empty")
					}
					u := reqs[0].Usage
					if int(e["input_tokens"].(float64)) != u.InputTokens || int(e["output_tokens"].(float64)) != u.OutputTokens {
						t.Errorf("tokens = %v/%v, want %d/%d", e["input_tokens"], e["output_tokens"], u.InputTokens, u.OutputTokens)
					}
					if u.InputTokens == 0 || u.OutputTokens == 0 {
						t.Errorf("emulator reported no usage: %+v", u)
					}
					if e["status"].(float64) != 200 {
						t.Errorf("status = %v", e["status"])
					}
				})
			}
		}
	}
}

func TestOpenAIStreamUsageChunkHidden(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "hidden@example.com")
	up := st.Upstreams[provider.OpenAI]

	_, body := st.Do(t, "POST", "/openai/v1/chat/completions", token, streaming[provider.OpenAI].body)
	sent := up.Requests()[0].Body
	if !strings.Contains(string(sent), `"include_usage":true`) {
		t.Errorf("upstream request lacks include_usage: %s", sent)
	}
	if strings.Contains(string(body), `"choices":[]`) {
		t.Errorf("client received the usage-only chunk it did not request:\n%s", body)
	}
	if !strings.Contains(string(body), "data: [DONE]") {
		t.Errorf("stream lacks [DONE]:\n%s", body)
	}

	// A client that asked for usage gets the chunk.
	asked := `{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}`
	_, body = st.Do(t, "POST", "/openai/v1/chat/completions", token, asked)
	if !strings.Contains(string(body), `"choices":[]`) {
		t.Errorf("client that requested usage did not get the usage chunk:\n%s", body)
	}
}

func TestStreamFirstEventBeforeUpstreamEnds(t *testing.T) {
	st := teststack.Start(t)
	for _, p := range provider.Names {
		t.Run(p, func(t *testing.T) {
			token := st.Token(t, "held-"+p)
			up := st.Upstreams[p]
			up.Hold()
			defer up.Release()
			c := streaming[p]
			req, _ := http.NewRequest("POST", st.ProxyURL+c.path, strings.NewReader(c.body))
			req.Header.Set("Authorization", "Bearer "+token)
			req.Header.Set("Content-Type", "application/json")
			h := sdkHeaders(p)
			for i := 0; i < len(h); i += 2 {
				req.Header.Set(h[i], h[i+1])
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			first := make(chan string, 1)
			go func() {
				line, _ := bufio.NewReader(resp.Body).ReadString('\n')
				first <- line
			}()
			select {
			case line := <-first:
				if line == "" {
					t.Fatal("stream ended before the first event")
				}
			case <-time.After(5 * time.Second):
				t.Fatal("first event did not arrive while the upstream held the stream")
			}
			// The emulator counts a held stream just after it sends the
			// first event, so give it a moment.
			for i := 0; i < 100 && up.HeldStreams() == 0; i++ {
				time.Sleep(10 * time.Millisecond)
			}
			if up.HeldStreams() != 1 {
				t.Errorf("held streams = %d, want 1 (the upstream should not have finished)", up.HeldStreams())
			}
		})
	}
}

func TestAuthErrorsInProviderShape(t *testing.T) {
	st := teststack.Start(t)
	cases := []struct {
		prov, token string
		check       func(map[string]any) bool
	}{
		{provider.OpenAI, "", func(m map[string]any) bool {
			e, _ := m["error"].(map[string]any)
			return e["code"] == "invalid_api_key" && e["type"] == "invalid_request_error"
		}},
		{provider.Anthropic, "bp1.bogus.0.token", func(m map[string]any) bool {
			e, _ := m["error"].(map[string]any)
			return m["type"] == "error" && e["type"] == "authentication_error"
		}},
		{provider.Google, "sk-not-a-token", func(m map[string]any) bool {
			e, _ := m["error"].(map[string]any)
			return e["status"] == "UNAUTHENTICATED" && e["code"] == float64(401)
		}},
	}
	for _, c := range cases {
		resp, body := st.Do(t, "POST", nonStream[c.prov].path, c.token, nonStream[c.prov].body, sdkHeaders(c.prov)...)
		if resp.StatusCode != 401 {
			t.Errorf("%s: status %d, want 401", c.prov, resp.StatusCode)
		}
		var m map[string]any
		json.Unmarshal(body, &m)
		if !c.check(m) {
			t.Errorf("%s: body not in the provider's shape: %s", c.prov, body)
		}
		if n := len(st.Upstreams[c.prov].Requests()); n != 0 {
			t.Errorf("%s: upstream got %d requests", c.prov, n)
		}
	}
}

// sdkHeaders returns the headers a provider's SDK always sends.
func sdkHeaders(p string) []string {
	if p == provider.Anthropic {
		return []string{"Anthropic-Version", "2023-06-01"}
	}
	return nil
}

func TestProviderRequestIDPassesThrough(t *testing.T) {
	st := teststack.Start(t)
	resp, _ := st.Do(t, "POST", nonStream[provider.OpenAI].path, st.Token(t, "reqid"), nonStream[provider.OpenAI].body)
	ids := resp.Header.Values("X-Request-Id")
	if len(ids) != 1 || !strings.HasPrefix(ids[0], "req_") {
		t.Errorf("X-Request-Id = %q, want the upstream's single id", ids)
	}
	if resp.Header.Get("X-Byokproxy-Request-Id") == "" {
		t.Error("no X-Byokproxy-Request-Id")
	}
}

// TestStreamEventsLargerThanCopyBuffer sends a stream event larger than
// either copy buffer. It must reach the client whole, and the usage reported
// around it must still be counted.
func TestStreamEventsLargerThanCopyBuffer(t *testing.T) {
	up := newScriptedUpstream(t)
	st := teststack.Start(t, func(c *config.Config) {
		c.Provider(provider.Anthropic).Upstream = up.URL
	})
	token := st.Token(t, "large-events@example.com")

	text := strings.Repeat("word ", 8<<10) // 40 KiB
	delta, err := json.Marshal(map[string]any{"type": "content_block_delta", "index": 0, "delta": map[string]any{"type": "text_delta", "text": text}})
	if err != nil {
		t.Fatal(err)
	}
	body := "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-haiku-4-5\",\"usage\":{\"input_tokens\":11,\"output_tokens\":1}}}\n\n" +
		"event: content_block_delta\ndata: " + string(delta) + "\n\n" +
		"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":4097}}\n\n" +
		"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
	up.set(scriptedResponse{status: http.StatusOK, contentType: "text/event-stream", body: []byte(body)})

	_, got := st.Do(t, "POST", "/anthropic/v1/messages", token, `{"model":"claude-haiku-4-5","max_tokens":5000,"stream":true}`)
	if string(got) != body {
		t.Fatalf("client received %d bytes that differ from the %d the upstream sent", len(got), len(body))
	}
	events := teststack.EventsOf(st.AuditEvents(t), "large-events@example.com")
	if len(events) != 1 {
		t.Fatalf("audit events: %d, want 1", len(events))
	}
	if events[0]["input_tokens"] != float64(11) {
		t.Errorf("input_tokens = %v, want 11", events[0]["input_tokens"])
	}
	if events[0]["output_tokens"] != float64(4097) {
		t.Errorf("output_tokens = %v, want 4097", events[0]["output_tokens"])
	}
}

// flushCounter is a ResponseWriter that counts flushes.
type flushCounter struct {
	*httptest.ResponseRecorder
	flushes int
}

func (f *flushCounter) Flush() {
	f.flushes++
	f.ResponseRecorder.Flush()
}

// The handler leaves a JSON response of known length to the server, which
// sends it with its header once the handler returns, and flushes a stream
// as its events come.
func TestFlushesOnlyStreams(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "flushes@example.com")
	for _, p := range provider.Names {
		for name, c := range map[string]call{"plain": nonStream[p], "stream": streaming[p]} {
			t.Run(p+"/"+name, func(t *testing.T) {
				req := httptest.NewRequest(http.MethodPost, c.path, strings.NewReader(c.body))
				req.Header.Set("Authorization", "Bearer "+token)
				req.Header.Set("Content-Type", "application/json")
				if p == provider.Anthropic {
					req.Header.Set("Anthropic-Version", "2023-06-01")
				}
				// Events sent apart arrive in reads of their own.
				st.Upstreams[p].SetEventDelay(2 * time.Millisecond)
				defer st.Upstreams[p].SetEventDelay(0)
				w := &flushCounter{ResponseRecorder: httptest.NewRecorder()}
				st.Handler.ServeHTTP(w, req)
				if w.Code != http.StatusOK || w.Body.Len() == 0 {
					t.Fatalf("status %d, %d body bytes", w.Code, w.Body.Len())
				}
				events := strings.Count(w.Body.String(), "data:")
				switch {
				case !c.stream && w.flushes != 0:
					t.Errorf("JSON response flushed %d times, want 0", w.flushes)
				case c.stream && w.flushes < events:
					t.Errorf("stream of %d events flushed %d times, want at least one per event", events, w.flushes)
				}
			})
		}
	}
}
