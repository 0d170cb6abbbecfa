package proxy_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"weak"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
	"github.com/byokproxy/byokproxy/proxy"
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

// requestText is one request, with the provider's SDK headers and the
// extra header lines.
func requestText(p string, call call, token string, extra string) string {
	for h := sdkHeaders(p); len(h) >= 2; h = h[2:] {
		extra += h[0] + ": " + h[1] + "\r\n"
	}
	return "POST " + call.path + " HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer " + token +
		"\r\nContent-Type: application/json\r\nContent-Length: " + strconv.Itoa(len(call.body)) + "\r\n" + extra + "\r\n" + call.body
}

// readStream reads a stream response to its end.
func readStream(t *testing.T, resp *http.Response) {
	t.Helper()
	if _, err := io.ReadAll(resp.Body); err != nil {
		t.Fatalf("reading the stream: %v", err)
	}
}

// expectIdleClose waits on c, left idle after a response, until the server
// closes it, and checks that this took about the IdleTimeout of 600 ms that
// the idle tests set.
func (c *rawConn) expectIdleClose(t *testing.T) {
	t.Helper()
	start := time.Now()
	if b, err := c.br.ReadByte(); err != io.EOF {
		t.Fatalf("idle connection gave %q, %v; want EOF", b, err)
	}
	if waited := time.Since(start); waited < 400*time.Millisecond || waited > 5*time.Second {
		t.Errorf("idle connection closed after %v, want about the IdleTimeout of 600ms", waited)
	}
}

// readResponse reads the next response on c, such as that of a request
// pipelined behind a stream, and its body.
func (c *rawConn) readResponse(t *testing.T) (*http.Response, []byte) {
	t.Helper()
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		t.Fatalf("the next request got no response: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	return resp, body
}

// dialTLSProxy serves the stack's proxy on a TLS listener of its own and
// opens a connection to it.
func dialTLSProxy(t *testing.T, st *teststack.Stack) *rawConn {
	t.Helper()
	srv := httptest.NewTLSServer(st.Handler)
	t.Cleanup(srv.Close)
	return dialTLS(t, srv)
}

// dialTLS opens a TLS connection to srv, whose certificate it does not
// check.
func dialTLS(t *testing.T, srv *httptest.Server) *rawConn {
	t.Helper()
	conn, err := tls.Dial("tcp", srv.Listener.Addr().String(), &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(2 * hangLimit))
	return &rawConn{Conn: conn, br: bufio.NewReader(conn)}
}

// write writes one request without reading its response.
func (c *rawConn) write(t *testing.T, p string, call call, token string, extra string) {
	t.Helper()
	if _, err := io.WriteString(c, requestText(p, call, token, extra)); err != nil {
		t.Fatal(err)
	}
}

// send writes one request as write does and reads its response header.
func (c *rawConn) send(t *testing.T, p string, call call, token string, extra string) *http.Response {
	t.Helper()
	c.write(t, p, call, token, extra)
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
		stream := events[0]
		if stream["stream"] != true {
			t.Errorf("%s: first audit event is not the stream's: %v", p, stream)
		}
		if stream["status"] != float64(200) {
			t.Errorf("%s: stream event status %v, want 200", p, stream["status"])
		}
		if errText, _ := stream["error"].(string); errText != "" {
			t.Errorf("%s: stream event error %q, want none", p, errText)
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
	readStream(t, resp)
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
	c.write(t, provider.OpenAI, nonStream[provider.OpenAI], token, "")
	time.Sleep(50 * time.Millisecond)
	up.Release()
	readStream(t, resp)
	resp, body := c.readResponse(t)
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
	if err := st.Handler.Drain(ctx); err == nil || !strings.HasSuffix(err.Error(), "cut: 1") {
		t.Errorf("Drain with a held stream: %v, want an error that counts 1 stream cut", err)
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
	readStream(t, resp)
	time.Sleep(300 * time.Millisecond)
	resp = c.send(t, provider.OpenAI, nonStream[provider.OpenAI], token, "")
	if _, err := io.ReadAll(resp.Body); err != nil || resp.StatusCode != 200 {
		t.Fatalf("request after 300 ms idle: status %d, %v", resp.StatusCode, err)
	}

	// A next request whose first bytes come slowly gets the server's
	// ReadHeaderTimeout only from its fourth byte, as between two requests
	// that the server serves itself.
	resp = c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
	readStream(t, resp)
	next := requestText(provider.OpenAI, nonStream[provider.OpenAI], token, "")
	io.WriteString(c, next[:2])
	time.Sleep(300 * time.Millisecond)
	io.WriteString(c, next[2:])
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		t.Fatalf("request begun 300 ms before the rest: %v", err)
	}
	if _, err := io.ReadAll(resp.Body); err != nil || resp.StatusCode != 200 {
		t.Fatalf("request begun 300 ms before the rest: status %d, %v", resp.StatusCode, err)
	}

	c = dialURL(t, srv.URL)
	resp = c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
	readStream(t, resp)
	c.expectIdleClose(t)
}

// geminiEvent is one Gemini stream event, as a provider sends it.
const geminiEvent = `data: {"candidates":[{"content":{"parts":[{"text":"hi"}],"role":"model"}}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1}}` + "\r\n\r\n"

// TestStreamBeforeBodySentNotDetached has a provider respond to a Gemini
// stream on the own key, whose body the proxy forwards unread, before the
// client has sent all of the body. The response must then stay with the
// reverse proxy, because the rest of the body is still to be read from the
// client's connection and sent upstream.
func TestStreamBeforeBodySentNotDetached(t *testing.T) {
	received := make(chan int, 1)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		rc.EnableFullDuplex()
		io.WriteString(w, geminiEvent)
		rc.Flush()
		body, _ := io.ReadAll(r.Body)
		received <- len(body)
		io.WriteString(w, geminiEvent)
	}))
	t.Cleanup(up.Close)
	st := teststack.Start(t, func(c *config.Config) { c.Provider(provider.Google).Upstream = up.URL })
	// Only on the own key does a Gemini body go upstream before it is all in.
	st.UseBYOK(t, "early-answer@example.com", provider.Google)
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
	readStream(t, resp)
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

// TestDrainEndsStreamOfNonReadingClient has a client that stops reading a
// large stream, so the detached stream blocks in its write to the client.
// Drain must still end the stream and record it, as the server's Close did
// for a stream that stayed with its handler.
func TestDrainEndsStreamOfNonReadingClient(t *testing.T) {
	event := "data: " + `{"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"` +
		strings.Repeat("x", 16<<10) + `"}}]}` + "\n\n"
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		// At most 64 MiB, far more than the socket buffers between the
		// proxy and a client that does not read.
		for range 4096 {
			if _, err := io.WriteString(w, event); err != nil {
				return
			}
			rc.Flush()
		}
	}))
	t.Cleanup(up.Close)
	st := teststack.Start(t, func(c *config.Config) { c.Provider(provider.OpenAI).Upstream = up.URL })
	m := "drain-stalled-reader@example.com"
	token := st.Token(t, m)
	c := dialProxy(t, st)
	resp := c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	// The client reads nothing more. Wait until the proxy's writes block.
	time.Sleep(time.Second)
	if n := st.Handler.DetachedStreams(); n != 1 {
		t.Fatalf("%d detached streams, want 1", n)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := st.Handler.Drain(ctx)
	t.Logf("Drain returned after %v: %v", time.Since(start), err)
	if n := st.Handler.DetachedStreams(); n != 0 {
		t.Errorf("%d detached streams after Drain, want 0: the stream is still blocked writing to the client and has not recorded its exchange", n)
	}
	events := teststack.EventsOf(st.AuditEvents(t), m)
	if len(events) != 1 || !strings.HasPrefix(fmt.Sprint(events[0]["error"]), "stream cut off at shutdown") {
		t.Errorf("audit events %v, want one whose error begins \"stream cut off at shutdown\"", events)
	}
}

// TestDetachedHeadStreamFraming sends HEAD to a Gemini stream path and then
// a second request on the same connection. A response to HEAD has no body,
// so the proxy must not write a last chunk after its header.
func TestDetachedHeadStreamFraming(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(up.Close)
	st := teststack.Start(t, func(c *config.Config) { c.Provider(provider.Google).Upstream = up.URL })
	m := "head-stream@example.com"
	token := st.Token(t, m)
	st.UseBYOK(t, m, provider.Google)

	c := dialProxy(t, st)
	io.WriteString(c, "HEAD "+streaming[provider.Google].path+" HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer "+token+"\r\n\r\n")
	resp, err := http.ReadResponse(c.br, &http.Request{Method: http.MethodHead})
	if err != nil {
		t.Fatalf("reading the HEAD response: %v", err)
	}
	resp.Body.Close()
	t.Logf("HEAD response: %d, Transfer-Encoding %v", resp.StatusCode, resp.TransferEncoding)

	io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
	resp, err = http.ReadResponse(c.br, nil)
	if err != nil {
		t.Fatalf("the request after HEAD got no valid response: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || string(body) != "ok\n" {
		t.Errorf("GET /healthz after HEAD: status %d, body %q", resp.StatusCode, body)
	}
}

// TestDetachedStreamUnreadExpectBody sends a Gemini stream request with
// Expect: 100-continue and a body over 256 KiB. The upstream responds 200
// with Connection: close without reading the body, so the transport never
// sends it and the server never reads it. The body then still sits on the
// client's connection, and the proxy must not read it as a next request.
func TestDetachedStreamUnreadExpectBody(t *testing.T) {
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, geminiEvent)
		http.NewResponseController(w).Flush()
		select {
		case <-release:
		case <-time.After(hangLimit):
		}
	}))
	t.Cleanup(up.Close)
	st := teststack.Start(t, func(c *config.Config) { c.Provider(provider.Google).Upstream = up.URL })
	// On the own key a Gemini body streams through unread.
	st.UseBYOK(t, "expect-body@example.com", provider.Google)
	token := st.Token(t, "expect-body@example.com")

	// The body is a whole request to /healthz, padded to 300 KiB.
	const size = 300 << 10
	inner := "POST /healthz HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: "
	pad := size - len(inner+"000000\r\n\r\n") // a 6-digit length
	body := inner + strconv.Itoa(pad) + "\r\n\r\n" + strings.Repeat("a", pad)
	if len(body) != size {
		t.Fatalf("body is %d bytes, want %d", len(body), size)
	}

	c := dialProxy(t, st)
	req := "POST " + streaming[provider.Google].path + " HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer " + token +
		"\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: " + strconv.Itoa(size) + "\r\n\r\n"
	io.WriteString(c, req)
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	detached := st.Handler.DetachedStreams()
	t.Logf("status %d, Connection: close %v, detached streams %d", resp.StatusCode, resp.Close, detached)
	// A client may send the body after a final response that does not close
	// the connection (RFC 9110, section 10.1.1).
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		io.WriteString(c, body)
	}()
	close(release)
	readStream(t, resp)
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	second, err := http.ReadResponse(c.br, nil)
	if err == nil {
		got, _ := io.ReadAll(second.Body)
		t.Errorf("the proxy served the request body as a request: a second response %d %q on a connection that sent one request", second.StatusCode, got)
	}
	c.Close()
	wg.Wait()
}

// TestShutdownClosesIdleDetachedConnection checks that after a detached
// stream ends, Shutdown closes the connection that waits for the client's
// next request, as it closes every idle connection.
func TestShutdownClosesIdleDetachedConnection(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "shutdown-idle@example.com")
	srv := httptest.NewServer(st.Handler)
	t.Cleanup(srv.Close)

	c := dialURL(t, srv.URL)
	resp := c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
	readStream(t, resp)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := srv.Config.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(time.Second))
	_, err := c.br.ReadByte()
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("the idle connection is still open after Shutdown returned; a request sent on it now is lost")
	} else if err != io.EOF {
		t.Errorf("read after Shutdown: %v, want EOF", err)
	}
}

// trackedWriter wraps the server's ResponseWriter so a test can see when
// the server's per-request state becomes unreachable.
type trackedWriter struct{ http.ResponseWriter }

func (w *trackedWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// TestDetachedStreamReleasesServerState checks that, once a stream is
// detached and its handler has returned, nothing keeps the ResponseWriter
// the handler got, and with it the server's connection buffers.
func TestDetachedStreamReleasesServerState(t *testing.T) {
	st := teststack.Start(t)
	var mu sync.Mutex
	var writerRef weak.Pointer[trackedWriter]
	handlerDone := make(chan struct{}, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tw := &trackedWriter{w}
		mu.Lock()
		writerRef = weak.Make(tw)
		mu.Unlock()
		st.Handler.ServeHTTP(tw, r)
		handlerDone <- struct{}{}
	}))
	t.Cleanup(srv.Close)

	for _, p := range []string{provider.OpenAI, provider.Google} {
		up := st.Upstreams[p]
		up.Reset()
		up.Hold()
		token := st.Token(t, "release-"+p+"@example.com")
		c := dialURL(t, srv.URL)
		resp := c.send(t, p, streaming[p], token, "")
		if _, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		select {
		case <-handlerDone:
		case <-time.After(hangLimit):
			t.Fatalf("%s: the handler did not return", p)
		}
		if n := st.Handler.DetachedStreams(); n != 1 {
			t.Fatalf("%s: %d detached streams, want 1", p, n)
		}
		runtime.GC()
		runtime.GC()
		mu.Lock()
		alive := writerRef.Value() != nil
		mu.Unlock()
		if alive {
			t.Errorf("%s: the handler's ResponseWriter is still reachable while the stream runs detached", p)
		}
		up.Release()
		io.ReadAll(resp.Body)
		c.Close()
		// The stream ends on its own goroutine, which may lag behind the
		// client that read the last chunk.
		if !eventually(hangLimit, func() bool { return st.Handler.DetachedStreams() == 0 }) {
			t.Fatalf("%s: the stream still counts as detached after its end", p)
		}
	}
}

// TestDetachedStreamOverTLS checks a detached stream on a TLS listener: the
// connection serves the next request after the stream, and a request
// pipelined during the stream.
func TestDetachedStreamOverTLS(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "detached-tls@example.com")

	c := dialTLSProxy(t, st)

	up := st.Upstreams[provider.OpenAI]
	up.Hold()
	resp := c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
	if n := st.Handler.DetachedStreams(); n != 1 {
		t.Errorf("%d detached streams over TLS, want 1", n)
	}
	c.write(t, provider.OpenAI, nonStream[provider.OpenAI], token, "")
	time.Sleep(50 * time.Millisecond)
	up.Release()
	readStream(t, resp)
	resp, body := c.readResponse(t)
	if resp.StatusCode != 200 {
		t.Errorf("pipelined request: status %d: %s", resp.StatusCode, body)
	}
	resp = c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
	readStream(t, resp)
	resp = c.send(t, provider.OpenAI, nonStream[provider.OpenAI], token, "")
	if body, err := io.ReadAll(resp.Body); err != nil || resp.StatusCode != 200 {
		t.Fatalf("request after the second stream: status %d, %v: %s", resp.StatusCode, err, body)
	}
}

// TestDetachedStreamsWrapConnectionOnce checks that a connection carrying
// stream after stream goes back to the server wrapped once at most, rather
// than in one more layer per stream, which every later read and write
// would pass through.
func TestDetachedStreamsWrapConnectionOnce(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "detached-wrap@example.com")
	srv := httptest.NewUnstartedServer(st.Handler)
	var mu sync.Mutex
	var layers []int
	srv.Config.ConnState = func(c net.Conn, state http.ConnState) {
		if state != http.StateNew {
			return
		}
		n := 0
		for u, ok := c.(interface{ NetConn() net.Conn }); ok; u, ok = c.(interface{ NetConn() net.Conn }) {
			c = u.NetConn()
			n++
		}
		mu.Lock()
		layers = append(layers, n)
		mu.Unlock()
	}
	srv.Start()
	t.Cleanup(srv.Close)

	c := dialURL(t, srv.URL)
	const streams = 5
	for i := range streams {
		resp := c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("stream %d: status %d, %v: %s", i+1, resp.StatusCode, err, body)
		}
	}
	resp := c.send(t, provider.OpenAI, nonStream[provider.OpenAI], token, "")
	if body, err := io.ReadAll(resp.Body); err != nil || resp.StatusCode != 200 {
		t.Fatalf("request after the streams: status %d, %v: %s", resp.StatusCode, err, body)
	}

	mu.Lock()
	defer mu.Unlock()
	// The server saw the connection once when it was accepted and once
	// after each stream.
	if len(layers) != streams+1 {
		t.Fatalf("the server saw the connection %d times, want %d", len(layers), streams+1)
	}
	for i, n := range layers {
		if n > 1 {
			t.Errorf("hand-back %d: the server got the connection in %d layers, want 1 at most (all: %v)", i, n, layers)
		}
	}
}

// TestShutdownCutsAttachedStream has the grace period run out on a stream
// that stays with its handler, as one with a chunked request body does.
// The server's Close does not wait for that handler, so Drain must, and the
// exchange must be recorded as cut off at shutdown before the audit writer
// closes.
func TestShutdownCutsAttachedStream(t *testing.T) {
	st := teststack.Start(t)
	m := "attached-cut@example.com"
	token := st.Token(t, m)
	srv := httptest.NewServer(st.Handler)
	t.Cleanup(srv.Close)
	up := st.Upstreams[provider.OpenAI]
	up.Hold()
	defer up.Release()

	c := dialURL(t, srv.URL)
	call := streaming[provider.OpenAI]
	io.WriteString(c, "POST "+call.path+" HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer "+token+
		"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"+
		strconv.FormatInt(int64(len(call.body)), 16)+"\r\n"+call.body+"\r\n0\r\n\r\n")
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	if _, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil {
		t.Fatalf("first event: %v", err)
	}
	if n := st.Handler.DetachedStreams(); n != 0 {
		t.Fatalf("%d detached streams, want the stream to stay with its handler", n)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := srv.Config.Shutdown(ctx); err == nil {
		t.Fatal("Shutdown returned with the stream open")
	}
	st.Handler.Cut()
	srv.Config.Close()
	st.Handler.Drain(ctx)
	flush, cancelFlush := context.WithTimeout(context.Background(), hangLimit)
	defer cancelFlush()
	if err := st.Audit.Close(flush); err != nil {
		t.Fatalf("closing the audit writer: %v", err)
	}

	events := teststack.EventsOf(st.AuditEvents(t), m)
	if len(events) != 1 {
		t.Fatalf("%d audit events, want 1: the handler recorded its exchange after the audit writer closed", len(events))
	}
	if errText, _ := events[0]["error"].(string); !strings.HasPrefix(errText, "stream cut off at shutdown") {
		t.Errorf("audit error %q, want it to begin with \"stream cut off at shutdown\"", errText)
	}
}

// TestDetachedStreamIdleTLSConnection checks a TLS connection after a
// detached stream. It waits for the next request as long as the server's
// IdleTimeout, not its shorter ReadHeaderTimeout. It goes back to the
// server with its TLS state, and is closed after the IdleTimeout.
func TestDetachedStreamIdleTLSConnection(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "detached-idle-tls@example.com")
	srv, overTLS := tlsServerOf(t, st, func(s *http.Server) {
		s.ReadHeaderTimeout = 100 * time.Millisecond
		s.IdleTimeout = 600 * time.Millisecond
	})
	c := dialTLS(t, srv)

	resp := c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
	readStream(t, resp)
	time.Sleep(300 * time.Millisecond)
	resp = c.send(t, provider.OpenAI, nonStream[provider.OpenAI], token, "")
	if _, err := io.ReadAll(resp.Body); err != nil || resp.StatusCode != 200 {
		t.Fatalf("request after 300 ms idle: status %d, %v", resp.StatusCode, err)
	}
	if seen := overTLS(); len(seen) != 2 || !seen[1] {
		t.Errorf("requests seen over TLS %v, want [true true]: the server lost the connection's TLS state", seen)
	}

	resp = c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
	readStream(t, resp)
	c.expectIdleClose(t)
}

// TestDrainClosesWaitingTLSConnection checks that Drain ends the wait for
// the next request on a TLS connection after a detached stream.
func TestDrainClosesWaitingTLSConnection(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "detached-waiting-tls@example.com")
	c := dialTLSProxy(t, st)

	resp := c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
	readStream(t, resp)
	ctx, cancel := context.WithTimeout(context.Background(), hangLimit)
	defer cancel()
	start := time.Now()
	if err := st.Handler.Drain(ctx); err != nil {
		t.Fatalf("Drain: %v", err)
	}
	if took := time.Since(start); took > 900*time.Millisecond {
		t.Errorf("Drain took %v: it waited for the connection instead of closing it", took)
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if b, err := c.br.ReadByte(); err != io.EOF {
		t.Errorf("after Drain the waiting connection gave %q, %v; want EOF", b, err)
	}
}

// TestStreamsDetachAboveAttachedStreams runs a handler that keeps one
// request attached: a stream alone stays with its handler, and a second
// stream open at the same time is detached. Both arrive whole.
func TestStreamsDetachAboveAttachedStreams(t *testing.T) {
	st := teststack.Start(t)
	h, err := proxy.New(proxy.Options{Config: st.Config, Store: st.Store, Signer: st.Signer, Audit: st.Audit,
		Metrics: st.Metrics, AttachedStreams: 1})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	p := provider.OpenAI
	m := "attached-streams@example.com"
	token := st.Token(t, m)
	up := st.Upstreams[p]
	up.Reset()
	defer up.Release()

	var conns []*rawConn
	var resps []*http.Response
	for i, wantDetached := range []int{0, 1} {
		up.Hold()
		c := dialURL(t, srv.URL)
		resp := c.send(t, p, streaming[p], token, "")
		if resp.StatusCode != 200 {
			body, _ := io.ReadAll(resp.Body)
			t.Fatalf("stream %d: status %d: %s", i+1, resp.StatusCode, body)
		}
		if _, err := bufio.NewReader(io.LimitReader(resp.Body, 1<<20)).ReadString('\n'); err != nil {
			t.Fatalf("stream %d: no first line: %v", i+1, err)
		}
		if n := h.DetachedStreams(); n != wantDetached {
			t.Errorf("with %d streams open: %d detached, want %d", i+1, n, wantDetached)
		}
		conns = append(conns, c)
		resps = append(resps, resp)
	}
	up.Release()
	for i, resp := range resps {
		rest, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("stream %d: reading the rest: %v", i+1, err)
		}
		if !strings.Contains(string(rest), "[DONE]") {
			t.Errorf("stream %d: the rest has no [DONE]: %q", i+1, rest)
		}
	}
	for i, c := range conns {
		resp := c.send(t, p, nonStream[p], token, "")
		if body, err := io.ReadAll(resp.Body); err != nil || resp.StatusCode != 200 {
			t.Errorf("connection %d: next request: status %d, %v: %s", i+1, resp.StatusCode, err, body)
		}
	}
	// A handler records its exchange after the client has the last byte,
	// and the stack's wait does not see this handler's requests, so the
	// events are waited for here. They can come in any order.
	var events []map[string]any
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		events = teststack.EventsOf(st.AuditEvents(t), m)
		if len(events) >= 4 || time.Now().After(deadline) {
			break
		}
	}
	if len(events) != 4 {
		t.Fatalf("%d audit events, want 4", len(events))
	}
	streams := 0
	for _, e := range events {
		if errText, _ := e["error"].(string); errText != "" {
			t.Errorf("event %v, want no error", e)
		}
		if e["stream"] == true {
			streams++
		}
	}
	if streams != 2 {
		t.Errorf("%d stream events, want 2: %v", streams, events)
	}
}

// TestDefaultKeepsFewStreamsAttached checks that a handler with the default
// setting leaves a lone stream with its handler.
func TestDefaultKeepsFewStreamsAttached(t *testing.T) {
	st := teststack.Start(t)
	h, proxyURL := st.AttachedProxy(t)
	p := provider.Anthropic
	up := st.Upstreams[p]
	up.Reset()
	up.Hold()
	defer up.Release()
	c := dialURL(t, proxyURL)
	resp := c.send(t, p, streaming[p], st.Token(t, "default-attached@example.com"), "")
	if _, err := bufio.NewReader(io.LimitReader(resp.Body, 1<<20)).ReadString('\n'); err != nil {
		t.Fatalf("no first line: %v", err)
	}
	if n := h.DetachedStreams(); n != 0 {
		t.Errorf("%d detached streams, want 0", n)
	}
	up.Release()
	readStream(t, resp)
}
