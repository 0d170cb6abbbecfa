package proxy_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
)

// rawConn is an HTTP/1.1 client connection to the proxy, driven by hand so a
// test can check the framing and the reuse of the connection.
type rawConn struct {
	net.Conn
	br *bufio.Reader
}

func dialProxy(t *testing.T, st *teststack.Stack) *rawConn {
	t.Helper()
	return dialURL(t, st.ProxyURL)
}

func dialURL(t *testing.T, proxyURL string) *rawConn {
	t.Helper()
	u, _ := url.Parse(proxyURL)
	conn, err := net.DialTimeout("tcp", u.Host, hangLimit)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(2 * hangLimit))
	return &rawConn{Conn: conn, br: bufio.NewReader(conn)}
}

// send writes one request, with the provider's SDK headers and the extra
// header lines, and reads its response header.
func (c *rawConn) send(t *testing.T, p string, call call, token string, extra string) *http.Response {
	t.Helper()
	for h := sdkHeaders(p); len(h) >= 2; h = h[2:] {
		extra += h[0] + ": " + h[1] + "\r\n"
	}
	req := "POST " + call.path + " HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer " + token +
		"\r\nContent-Type: application/json\r\nContent-Length: " + strconv.Itoa(len(call.body)) + "\r\n" + extra + "\r\n" + call.body
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		t.Fatalf("%s: reading the response: %v", call.path, err)
	}
	return resp
}

func TestDetachedStreamKeepsConnection(t *testing.T) {
	st := teststack.Start(t)
	for _, p := range provider.Names {
		m := "detached-" + p + "@example.com"
		token := st.Token(t, m)
		up := st.Upstreams[p]
		up.Reset()
		up.Hold()
		c := dialProxy(t, st)

		resp := c.send(t, p, streaming[p], token, "")
		if resp.StatusCode != 200 {
			body, _ := io.ReadAll(resp.Body)
			t.Fatalf("%s: status %d: %s", p, resp.StatusCode, body)
		}
		if got := resp.TransferEncoding; len(got) != 1 || got[0] != "chunked" {
			t.Errorf("%s: Transfer-Encoding %v, want chunked", p, got)
		}
		if resp.Header.Get("X-Byokproxy-Request-Id") == "" {
			t.Errorf("%s: no X-Byokproxy-Request-Id", p)
		}
		if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
			t.Errorf("%s: Content-Type %q", p, ct)
		}
		if _, err := http.ParseTime(resp.Header.Get("Date")); err != nil {
			t.Errorf("%s: Date %q: %v", p, resp.Header.Get("Date"), err)
		}
		if resp.Close {
			t.Errorf("%s: the response closes the connection", p)
		}
		first, err := bufio.NewReader(io.LimitReader(resp.Body, 1<<20)).ReadString('\n')
		if err != nil || !strings.HasPrefix(first, "data:") && !strings.HasPrefix(first, "event:") {
			t.Fatalf("%s: first line %q, %v", p, first, err)
		}
		if n := st.Handler.DetachedStreams(); n != 1 {
			t.Errorf("%s: %d detached streams while the upstream holds the stream, want 1", p, n)
		}
		up.Release()
		rest, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("%s: reading the rest of the stream: %v", p, err)
		}
		if !strings.Contains(string(rest), "data:") {
			t.Errorf("%s: the rest of the stream has no event: %q", p, rest)
		}

		// The same connection serves the next request.
		resp = c.send(t, p, nonStream[p], token, "")
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: second request on the connection: status %d, %v: %s", p, resp.StatusCode, err, body)
		}

		events := teststack.EventsOf(st.AuditEvents(t), m)
		if len(events) != 2 {
			t.Fatalf("%s: %d audit events, want 2", p, len(events))
		}
		if errText, _ := events[0]["error"].(string); events[0]["stream"] != true || errText != "" || events[0]["status"] != float64(200) {
			t.Errorf("%s: stream event %v, want status 200, no error", p, events[0])
		}
		if out, _ := events[0]["output_tokens"].(float64); out <= 0 {
			t.Errorf("%s: stream event has output_tokens %v", p, events[0]["output_tokens"])
		}
		if n := st.Handler.DetachedStreams(); n != 0 {
			t.Errorf("%s: %d detached streams after the stream ended", p, n)
		}
	}
}

func TestDetachedStreamHonoursConnectionClose(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "detached-close@example.com")
	c := dialProxy(t, st)
	resp := c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "Connection: close\r\n")
	if !resp.Close {
		t.Error("the response to a request with Connection: close does not say it closes")
	}
	if _, err := io.ReadAll(resp.Body); err != nil {
		t.Fatalf("reading the stream: %v", err)
	}
	if n, err := c.br.ReadByte(); err != io.EOF {
		t.Errorf("after the stream the connection gave %q, %v; want EOF", n, err)
	}
}

func TestDetachedStreamPipelinedRequest(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "detached-pipeline@example.com")
	up := st.Upstreams[provider.OpenAI]
	up.Hold()
	c := dialProxy(t, st)
	resp := c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
	// A second request arrives while the first one streams.
	next := nonStream[provider.OpenAI]
	io.WriteString(c, "POST "+next.path+" HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer "+token+
		"\r\nContent-Type: application/json\r\nContent-Length: "+strconv.Itoa(len(next.body))+"\r\n\r\n"+next.body)
	time.Sleep(50 * time.Millisecond)
	up.Release()
	if _, err := io.ReadAll(resp.Body); err != nil {
		t.Fatalf("reading the stream: %v", err)
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		t.Fatalf("the pipelined request got no response: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"usage"`) {
		t.Errorf("pipelined request: status %d: %s", resp.StatusCode, body)
	}
}

func TestDrainCutsDetachedStreams(t *testing.T) {
	st := teststack.Start(t)
	m := "detached-drain@example.com"
	token := st.Token(t, m)
	up := st.Upstreams[provider.OpenAI]
	up.Hold()
	defer up.Release()
	c := dialProxy(t, st)
	resp := c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
	if _, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := st.Handler.Drain(ctx); err == nil || !strings.Contains(err.Error(), "1 streams") {
		t.Errorf("Drain with a held stream: %v, want an error naming 1 stream", err)
	}
	if n := st.Handler.DetachedStreams(); n != 0 {
		t.Errorf("%d detached streams after Drain", n)
	}
	if _, err := io.ReadAll(resp.Body); err == nil {
		t.Error("the cut stream ended as if it were complete")
	}
	events := teststack.EventsOf(st.AuditEvents(t), m)
	if len(events) != 1 || !strings.HasPrefix(fmt.Sprint(events[0]["error"]), "stream cut off at shutdown") {
		t.Errorf("audit events %v, want one whose error begins \"stream cut off at shutdown\"", events)
	}

	// With no stream open, Drain returns at once.
	if err := st.Handler.Drain(context.Background()); err != nil {
		t.Errorf("Drain with no stream: %v", err)
	}
}

// TestDetachedStreamIdleConnection checks that after a detached stream the
// connection waits for the next request as long as the server's
// IdleTimeout, not its shorter ReadHeaderTimeout, and is closed after it.
func TestDetachedStreamIdleConnection(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "detached-idle@example.com")
	srv := httptest.NewUnstartedServer(st.Handler)
	srv.Config.ReadHeaderTimeout = 100 * time.Millisecond
	srv.Config.IdleTimeout = 600 * time.Millisecond
	srv.Start()
	t.Cleanup(srv.Close)

	c := dialURL(t, srv.URL)
	resp := c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
	if _, err := io.ReadAll(resp.Body); err != nil {
		t.Fatalf("reading the stream: %v", err)
	}
	time.Sleep(300 * time.Millisecond)
	resp = c.send(t, provider.OpenAI, nonStream[provider.OpenAI], token, "")
	if _, err := io.ReadAll(resp.Body); err != nil || resp.StatusCode != 200 {
		t.Fatalf("request after 300 ms idle: status %d, %v", resp.StatusCode, err)
	}

	c = dialURL(t, srv.URL)
	resp = c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
	if _, err := io.ReadAll(resp.Body); err != nil {
		t.Fatalf("reading the stream: %v", err)
	}
	start := time.Now()
	if b, err := c.br.ReadByte(); err != io.EOF {
		t.Fatalf("idle connection gave %q, %v; want EOF", b, err)
	}
	if waited := time.Since(start); waited < 400*time.Millisecond || waited > 5*time.Second {
		t.Errorf("idle connection closed after %v, want about the IdleTimeout of 600ms", waited)
	}
}

// TestStreamBeforeBodySentNotDetached has a provider answer a Gemini stream,
// whose body the proxy forwards unread, before the client has sent all of
// the body. The response must then stay with the reverse proxy: once
// detached, the reverse proxy returns and closes the request body, and the
// transport, still sending it, drops the upstream connection.
func TestStreamBeforeBodySentNotDetached(t *testing.T) {
	received := make(chan int, 1)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		rc.EnableFullDuplex()
		event := `data: {"candidates":[{"content":{"parts":[{"text":"hi"}],"role":"model"}}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1}}` + "\r\n\r\n"
		io.WriteString(w, event)
		rc.Flush()
		body, _ := io.ReadAll(r.Body)
		received <- len(body)
		io.WriteString(w, event)
	}))
	t.Cleanup(up.Close)
	st := teststack.Start(t, func(c *config.Config) { c.Provider(provider.Google).Upstream = up.URL })
	token := st.Token(t, "early-answer@example.com")

	call := streaming[provider.Google]
	pr, pw := io.Pipe()
	req, _ := http.NewRequest(http.MethodPost, st.ProxyURL+call.path, pr)
	req.ContentLength = int64(len(call.body))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	half := len(call.body) / 2
	go pw.Write([]byte(call.body[:half]))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	if first, err := br.ReadString('\n'); err != nil || !strings.HasPrefix(first, "data:") {
		t.Fatalf("first line %q, %v", first, err)
	}
	if n := st.Handler.DetachedStreams(); n != 0 {
		t.Errorf("%d detached streams while the request body is still being sent, want 0", n)
	}
	pw.Write([]byte(call.body[half:]))
	pw.Close()
	rest, err := io.ReadAll(br)
	if err != nil {
		t.Fatalf("stream cut: %v", err)
	}
	if !strings.Contains(string(rest), "data:") {
		t.Errorf("second event missing: %q", rest)
	}
	select {
	case n := <-received:
		if n != len(call.body) {
			t.Errorf("upstream received %d body bytes, want %d", n, len(call.body))
		}
	case <-time.After(hangLimit):
		t.Fatal("the upstream never finished reading the body")
	}
}

func TestDrainClosesWaitingConnection(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "detached-waiting@example.com")
	c := dialProxy(t, st)
	resp := c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
	if _, err := io.ReadAll(resp.Body); err != nil {
		t.Fatalf("reading the stream: %v", err)
	}
	// The connection now waits for its next request, which never comes.
	ctx, cancel := context.WithTimeout(context.Background(), hangLimit)
	defer cancel()
	if err := st.Handler.Drain(ctx); err != nil {
		t.Fatalf("Drain: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if b, err := c.br.ReadByte(); err != io.EOF {
		t.Errorf("after Drain the waiting connection gave %q, %v; want EOF", b, err)
	}
}
