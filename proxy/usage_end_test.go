package proxy_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
)

// How the charge of a shared stream depends on the way the stream ends:
// complete usage is charged as the provider reported it, whenever the client
// leaves, and a stream that ends without it is charged the estimate.

const (
	anthropicStart = `event: message_start` + "\n" +
		`data: {"type":"message_start","message":{"id":"msg_01","type":"message","role":"assistant","model":"claude-haiku-4-5","content":[],"stop_reason":null,"usage":{"input_tokens":50,"output_tokens":1}}}` + "\n\n"
	anthropicText = `event: content_block_delta` + "\n" +
		`data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"one two three four five six seven eight "}}` + "\n\n"
	anthropicFinal = `event: message_delta` + "\n" +
		`data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":20}}` + "\n\n"
	anthropicOverload = `event: error` + "\n" +
		`data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}` + "\n\n"
	openaiChunk = `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"one two three "},"finish_reason":null}],"usage":null}` + "\n\n"
	openaiError = `data: {"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}` + "\n\n"
)

// sseUpstream serves every request with events, each flushed on its own,
// and then waits for the request to end if hold is set.
func sseUpstream(t *testing.T, events []string, hold bool) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		for _, ev := range events {
			io.WriteString(w, ev)
			rc.Flush()
		}
		if hold {
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

// sharedStreamEvent sends provider p's stream request through a proxy whose
// p upstream is up, on the shared key. With leaveAfter, the client reads
// until the body contains it and then hangs up; otherwise it reads the whole
// body. It returns the request's audit event and the bytes the client read.
func sharedStreamEvent(t *testing.T, p string, up *httptest.Server, leaveAfter string) (map[string]any, []byte) {
	t.Helper()
	st := teststack.Start(t, func(c *config.Config) { c.Provider(p).Upstream = up.URL })
	m := "stream-end-" + p + "@example.com"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := http.DefaultClient.Do(callRequest(ctx, st.ProxyURL, p, st.Token(t, m), streaming[p]))
	if err != nil {
		t.Fatal(err)
	}
	var body bytes.Buffer
	if leaveAfter == "" {
		io.Copy(&body, resp.Body)
	} else {
		buf := make([]byte, 512)
		for !strings.Contains(body.String(), leaveAfter) {
			n, err := resp.Body.Read(buf)
			body.Write(buf[:n])
			if err != nil {
				t.Fatalf("the stream ended before %q: %v", leaveAfter, err)
			}
		}
	}
	resp.Body.Close()

	deadline := time.Now().Add(5 * time.Second)
	for {
		events := teststack.EventsOf(st.AuditEvents(t), m)
		if len(events) == 1 {
			return events[0], body.Bytes()
		}
		if len(events) > 1 || time.Now().After(deadline) {
			t.Fatalf("audit events of %s: %d, want 1", m, len(events))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// tokens returns the token count in field of audit event e, 0 if absent.
func tokens(e map[string]any, field string) int64 {
	v, _ := e[field].(float64)
	return int64(v)
}

func TestClientLeavesAfterFinalUsage(t *testing.T) {
	// The upstream holds the stream after message_delta, so the client
	// leaves before message_stop.
	events := slices.Concat([]string{anthropicStart}, slices.Repeat([]string{anthropicText}, 40), []string{anthropicFinal})
	up := sseUpstream(t, events, true)
	e, _ := sharedStreamEvent(t, provider.Anthropic, up, `"message_delta"`)
	if in, out := tokens(e, "input_tokens"), tokens(e, "output_tokens"); in != 50 || out != 20 {
		t.Errorf("charged %d input and %d output tokens, want the 50 and 20 the provider reported", in, out)
	}
	if msg := fmt.Sprint(e["error"]); strings.Contains(msg, "estimated") {
		t.Errorf("audit error %q: complete usage was replaced by an estimate", msg)
	}
}

func TestStreamEndingWithErrorEventEstimated(t *testing.T) {
	cases := []struct {
		provider string
		events   []string
	}{
		{provider.Anthropic, slices.Concat([]string{anthropicStart}, slices.Repeat([]string{anthropicText}, 40), []string{anthropicOverload})},
		{provider.OpenAI, slices.Concat(slices.Repeat([]string{openaiChunk}, 40), []string{openaiError})},
	}
	for _, c := range cases {
		t.Run(c.provider, func(t *testing.T) {
			e, body := sharedStreamEvent(t, c.provider, sseUpstream(t, c.events, false), "")
			if want := estimateOf(body); tokens(e, "output_tokens") < want {
				t.Errorf("charged %d output tokens, want at least the estimate of %d from %d bytes", tokens(e, "output_tokens"), want, len(body))
			}
			if tokens(e, "input_tokens") <= 0 {
				t.Errorf("charged %d input tokens", tokens(e, "input_tokens"))
			}
			if msg := fmt.Sprint(e["error"]); !strings.HasPrefix(msg, "usage estimated from bytes") {
				t.Errorf("audit error %q, want it to say the usage was estimated", msg)
			}
		})
	}
}

func TestProviderGatewayTimeoutNotCharged(t *testing.T) {
	st := teststack.Start(t)
	m := "provider-504@example.com"
	up := st.Upstreams[provider.OpenAI]
	up.SetError(http.StatusGatewayTimeout)
	defer up.SetError(0)
	c := nonStream[provider.OpenAI]
	resp, body := st.Do(t, http.MethodPost, c.path, st.Token(t, m), c.body)
	if resp.StatusCode != http.StatusGatewayTimeout {
		t.Fatalf("status %d, want the provider's 504: %s", resp.StatusCode, body)
	}
	st.WaitAudit(t)
	events := teststack.EventsOf(st.AuditEvents(t), m)
	if len(events) != 1 {
		t.Fatalf("audit events: %d, want 1", len(events))
	}
	e := events[0]
	if in, out := tokens(e, "input_tokens"), tokens(e, "output_tokens"); in != 0 || out != 0 {
		t.Errorf("a 504 from the provider was charged %d input and %d output tokens, want none", in, out)
	}
	if msg := fmt.Sprint(e["error"]); msg != "upstream status 504" {
		t.Errorf("audit error %q, want %q", msg, "upstream status 504")
	}
}

// A complete reply whose usage the tap could not read is charged the byte
// estimate rather than nothing. Here a tool_use input nested deeper than
// the tap reads hides the usage that follows it.
func TestUnreadJSONUsageEstimated(t *testing.T) {
	const depth = 5000
	deep := strings.Repeat("[", depth) + strings.Repeat("]", depth)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"id":"msg_01","type":"message","role":"assistant","model":"claude-haiku-4-5",`+
			`"content":[{"type":"tool_use","id":"toolu_01","name":"store","input":{"tree":%s}}],`+
			`"stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":150000,"output_tokens":4000}}`, deep)
	}))
	t.Cleanup(up.Close)
	st := teststack.Start(t, func(c *config.Config) { c.Provider(provider.Anthropic).Upstream = up.URL })
	m := "deep-json@example.com"
	c := nonStream[provider.Anthropic]
	resp, body := st.Do(t, http.MethodPost, c.path, st.Token(t, m), c.body, sdkHeaders(provider.Anthropic)...)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	st.WaitAudit(t)
	events := teststack.EventsOf(st.AuditEvents(t), m)
	if len(events) != 1 {
		t.Fatalf("audit events of %s: %d, want 1", m, len(events))
	}
	if out, want := tokens(events[0], "output_tokens"), int64(len(body)+3)/4; out < want {
		t.Errorf("a %d-byte reply whose usage the tap could not read was charged %d output tokens, want at least %d", len(body), out, want)
	}
	if in := tokens(events[0], "input_tokens"); in == 0 {
		t.Error("no input was charged")
	}
}

// A shared client that hangs up after the first bytes of a non-streamed
// reply is charged the usage at the end of the body, which the proxy reads
// on after it. The
// upstream pauses after the first 64 KiB, as a long body crossing a real
// network would, so the client leaves while most of it is still to come.
func TestCutJSONReplyChargedInFull(t *testing.T) {
	reply := strings.Repeat("lorem ipsum dolor sit amet ", 400<<10/27)
	const replyTokens = 100000
	body := fmt.Sprintf(`{"id":"msg_01","type":"message","role":"assistant","model":"claude-haiku-4-5",`+
		`"content":[{"type":"text","text":%q}],"stop_reason":"max_tokens","stop_sequence":null,`+
		`"usage":{"input_tokens":50,"output_tokens":%d}}`, reply, replyTokens)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		io.WriteString(w, body[:64<<10])
		http.NewResponseController(w).Flush()
		time.Sleep(200 * time.Millisecond)
		io.WriteString(w, body[64<<10:])
	}))
	t.Cleanup(up.Close)
	st := teststack.Start(t, func(c *config.Config) { c.Provider(provider.Anthropic).Upstream = up.URL })
	m := "cut-json@example.com"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := http.DefaultClient.Do(callRequest(ctx, st.ProxyURL, provider.Anthropic, st.Token(t, m), nonStream[provider.Anthropic]))
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	io.ReadFull(resp.Body, make([]byte, 1024))
	// Closing an unread body makes the client's transport close the
	// connection.
	resp.Body.Close()

	deadline := time.Now().Add(5 * time.Second)
	var events []map[string]any
	for len(events) == 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		events = teststack.EventsOf(st.AuditEvents(t), m)
	}
	if len(events) != 1 {
		t.Fatalf("audit events of %s: %d, want 1", m, len(events))
	}
	if out := tokens(events[0], "output_tokens"); out != replyTokens {
		t.Errorf("charged %d output tokens for a whole reply that reported %d (audit error %q)", out, replyTokens, events[0]["error"])
	}
}
