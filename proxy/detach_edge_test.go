package proxy_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
)

const (
	edgeTextChunk  = `data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"hi"}}]}` + "\n\n"
	edgeUsageChunk = `data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}` + "\n\n"
)

// tlsServerOf serves st's handler on a TLS listener, after configure has
// set up its server when given, and records for each request whether the
// server saw it over TLS.
func tlsServerOf(t *testing.T, st *teststack.Stack, configure ...func(*http.Server)) (*httptest.Server, func() []bool) {
	t.Helper()
	var mu sync.Mutex
	var overTLS []bool
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		overTLS = append(overTLS, r.TLS != nil)
		mu.Unlock()
		st.Handler.ServeHTTP(w, r)
	}))
	for _, c := range configure {
		c(srv.Config)
	}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv, func() []bool {
		mu.Lock()
		defer mu.Unlock()
		return append([]bool(nil), overTLS...)
	}
}

// googleUploadStart is a request whose response names an https address on
// a TLS connection only if the request reaches the proxy with its TLS state.
func googleUploadStart(token string) string {
	body := `{"file":{"displayName":"notes.txt"}}`
	return "POST /google/upload/v1beta/files HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer " + token +
		"\r\nContent-Type: application/json\r\nX-Goog-Upload-Protocol: resumable\r\nX-Goog-Upload-Command: start\r\n" +
		"X-Goog-Upload-Header-Content-Length: 10\r\nX-Goog-Upload-Header-Content-Type: text/plain\r\nContent-Length: " +
		strconv.Itoa(len(body)) + "\r\n\r\n" + body
}

// tlsGoogleConn starts a stack whose mailbox m uses its own Google key, and
// opens a TLS connection to its proxy. seen returns, for each request so
// far, whether the server saw it over TLS.
func tlsGoogleConn(t *testing.T, m string) (st *teststack.Stack, token string, c *rawConn, seen func() []bool) {
	t.Helper()
	st = teststack.Start(t)
	st.UseBYOK(t, m, provider.Google)
	srv, seen := tlsServerOf(t, st)
	return st, st.Token(t, m), dialTLS(t, srv), seen
}

// A request sent on a TLS connection while a detached stream runs on it
// is served after the stream with the connection's TLS state.
func TestDetachedTLSNextRequestKeepsTLS(t *testing.T) {
	st, token, c, seen := tlsGoogleConn(t, "tls-next@example.com")
	up := st.Upstreams[provider.Google]
	up.Hold()
	resp := c.send(t, provider.Google, streaming[provider.Google], token, "")
	if n := st.Handler.DetachedStreams(); n != 1 {
		t.Fatalf("%d detached streams, want 1", n)
	}
	io.WriteString(c, googleUploadStart(token))
	time.Sleep(50 * time.Millisecond)
	up.Release()
	readStream(t, resp)
	resp, body := c.readResponse(t)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("upload start: status %d: %s", resp.StatusCode, body)
	}
	if got := seen(); len(got) != 2 || !got[1] {
		t.Errorf("requests seen over TLS %v, want [true true]", got)
	}
	if session := resp.Header.Get("X-Goog-Upload-URL"); !strings.HasPrefix(session, "https://") {
		t.Errorf("upload session URL %q on a TLS connection, want https://", session)
	}
}

// A request pipelined before the stream's response could only go back to
// the server wrapped, without its TLS state, so the stream's header closes
// the connection and no request is served without TLS.
func TestDetachedTLSPipelinedRequestClosesConnection(t *testing.T) {
	st, token, c, seen := tlsGoogleConn(t, "tls-pipelined@example.com")
	up := st.Upstreams[provider.Google]
	up.Hold()
	io.WriteString(c, requestText(provider.Google, streaming[provider.Google], token, "")+googleUploadStart(token))
	time.Sleep(100 * time.Millisecond)
	up.Release()
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		t.Fatal(err)
	}
	readStream(t, resp)
	if !resp.Close {
		t.Errorf("stream with a request pipelined behind it on TLS: no Connection: close")
	}
	if b, err := c.br.ReadByte(); err != io.EOF {
		t.Errorf("after the stream the connection gave %q, %v; want EOF", b, err)
	}
	for _, tls := range seen() {
		if !tls {
			t.Errorf("requests seen over TLS %v: one was served without TLS", seen())
		}
	}
}

// During a shutdown the server closes a connection after its response, so
// a stream detached then must announce it, or the client's next request is
// lost.
func TestDetachedStreamDuringShutdownSaysClose(t *testing.T) {
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-time.After(hangLimit):
		}
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, edgeTextChunk)
		http.NewResponseController(w).Flush()
		io.WriteString(w, edgeUsageChunk+"data: [DONE]\n\n")
	}))
	t.Cleanup(up.Close)
	st := teststack.Start(t, func(c *config.Config) { c.Provider(provider.OpenAI).Upstream = up.URL })
	token := st.Token(t, "shutdown-close@example.com")
	srv := httptest.NewServer(st.Handler)
	t.Cleanup(srv.Close)

	c := dialURL(t, srv.URL)
	c.write(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
	time.Sleep(100 * time.Millisecond)
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), hangLimit)
		defer cancel()
		shut <- srv.Config.Shutdown(ctx)
	}()
	time.Sleep(100 * time.Millisecond)
	close(release)
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		t.Fatal(err)
	}
	readStream(t, resp)
	if n := st.Handler.DetachedStreams(); n > 1 {
		t.Errorf("%d detached streams, want at most 1", n)
	}
	if !resp.Close {
		t.Errorf("a stream answered while the server shuts down has no Connection: close")
	}
	if err := <-shut; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
}

// A handler still waiting for the upstream when Drain starts may detach its
// stream later, and Drain must wait for it rather than return with it open.
func TestDrainWaitsForLateDetach(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(300 * time.Millisecond)
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, edgeTextChunk)
		http.NewResponseController(w).Flush()
		time.Sleep(1500 * time.Millisecond)
		io.WriteString(w, edgeUsageChunk+"data: [DONE]\n\n")
	}))
	t.Cleanup(up.Close)
	st := teststack.Start(t, func(c *config.Config) { c.Provider(provider.OpenAI).Upstream = up.URL })
	m := "late-detach@example.com"
	token := st.Token(t, m)
	c := dialProxy(t, st)
	c.write(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
	time.Sleep(50 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), hangLimit)
	defer cancel()
	if err := st.Handler.Drain(ctx); err != nil {
		t.Errorf("Drain: %v", err)
	}
	if open := st.Handler.DetachedStreams(); open != 0 {
		t.Errorf("Drain returned with %d detached streams open", open)
	}
	st.WaitAudit(t)
	events := teststack.EventsOf(st.AuditEvents(t), m)
	if len(events) != 1 || events[0]["status"] != float64(http.StatusOK) || events[0]["error"] != nil && events[0]["error"] != "" {
		t.Errorf("audit events %v, want one complete stream", events)
	}
}
