package proxy_test

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf16"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
)

// rawUpstream is a loopback TCP server that replies to each request with the
// bytes that respond returns for the key the request carried. It can send
// what Go's HTTP server never would, such as a malformed header line.
type rawUpstream struct {
	ln      net.Listener
	URL     string
	respond func(key string) string
	wg      sync.WaitGroup
}

// sentKey returns the key the proxy injected into r.
func sentKey(r *http.Request) string {
	for _, name := range []string{"X-Api-Key", "X-Goog-Api-Key"} {
		if v := r.Header.Get(name); v != "" {
			return v
		}
	}
	return strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
}

func startRawUpstream(t *testing.T, respond func(key string) string) *rawUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &rawUpstream{ln: ln, URL: "http://" + ln.Addr().String(), respond: respond}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		for range 100 {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u.wg.Add(1)
			go func() {
				defer u.wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				r, err := http.ReadRequest(bufio.NewReader(c))
				if err != nil {
					return
				}
				io.Copy(io.Discard, r.Body)
				io.WriteString(c, u.respond(sentKey(r)))
				// Let the proxy read the response before the close.
				time.Sleep(50 * time.Millisecond)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		u.wg.Wait()
	})
	return u
}

// withoutPrefix returns key without its published prefix.
func withoutPrefix(key string) string {
	if strings.HasPrefix(key, "AIza") {
		return key[4:]
	}
	return key[strings.LastIndex(key[:min(len(key), 13)], "-")+1:]
}

// checkKeyNowhere fails t for each audit event field, log line or client
// body that holds the middle of key, the part after its prefix and before
// its last four characters.
func checkKeyNowhere(t *testing.T, st *teststack.Stack, key string, clientBody []byte) {
	t.Helper()
	body := withoutPrefix(key)
	part := body[:len(body)-4]
	st.WaitAudit(t)
	for _, e := range st.AuditEvents(t) {
		for field, v := range e {
			if s, ok := v.(string); ok && strings.Contains(s, part) {
				t.Errorf("audit event field %q holds the key: %q", field, s)
			}
		}
	}
	for _, line := range strings.Split(st.Logs(), "\n") {
		if strings.Contains(line, part) {
			t.Errorf("log line holds the key: %s", line)
		}
	}
	if strings.Contains(string(clientBody), part) {
		t.Errorf("the client got the key: %q", clientBody)
	}
}

// Errors of Go's HTTP client quote upstream bytes that break the framing,
// such as a trailer or header line without a colon. An upstream that puts
// the key there must not get it into the audit stream, the log or the
// client's response.
func TestKeyInUpstreamFramingNotRecorded(t *testing.T) {
	cases := []struct {
		name     string
		response func(key string) string
	}{
		{"trailer of a 200 body", func(key string) string {
			return "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" +
				"b\r\n{\"ok\":true}\r\n0\r\n" + key + "\r\n\r\n"
		}},
		{"trailer of a 200 body, key without its prefix", func(key string) string {
			return "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" +
				"b\r\n{\"ok\":true}\r\n0\r\n" + withoutPrefix(key) + "\r\n\r\n"
		}},
		{"trailer of an error body", func(key string) string {
			return "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" +
				"d\r\n{\"error\":\"x\"}\r\n0\r\n" + key + "\r\n\r\n"
		}},
		{"header line", func(key string) string {
			return "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n" + key + "\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
		}},
		{"status line", func(key string) string {
			return "HTTP/1.1 40" + key + " Unauthorized\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
		}},
	}
	for _, c := range cases {
		for _, source := range []string{"byok", "shared"} {
			t.Run(c.name+"/"+source, func(t *testing.T) {
				up := startRawUpstream(t, c.response)
				st := teststack.Start(t, func(cfg *config.Config) {
					for _, p := range provider.Names {
						cfg.Provider(p).Upstream = up.URL
					}
					// Debug lines include the reverse proxy's own log.
					cfg.LogLevel = "debug"
				})
				m := "framing-" + source + "@example.com"
				token := st.Token(t, m)
				if source == "byok" {
					token = useBYOKEverywhere(t, st, m)
				}
				for _, p := range provider.Names {
					key := teststack.SharedKeys[p]
					if source == "byok" {
						key = teststack.BYOKKeys[p]
					}
					_, body := doRequest(t, st.ProxyURL, p, token, nonStream[p])
					checkKeyNowhere(t, st, key, body)
				}
			})
		}
	}
}

// utf16LE returns s encoded as UTF-16, little endian.
func utf16LE(s string) string {
	var b strings.Builder
	for _, u := range utf16.Encode([]rune(s)) {
		b.WriteByte(byte(u))
		b.WriteByte(byte(u >> 8))
	}
	return b.String()
}

// In UTF-16 the key's bytes are interleaved with zeros, which the scrubber
// cannot match, so an error body in another charset than UTF-8 is replaced.
func TestErrorBodyInOtherCharsetReplaced(t *testing.T) {
	up := startRawUpstream(t, func(key string) string {
		body := utf16LE(`{"error":{"message":"Incorrect API key provided: ` + key + `"}}`)
		return "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json; charset=UTF-16LE\r\nContent-Length: " +
			strconv.Itoa(len(body)) + "\r\nConnection: close\r\n\r\n" + body
	})
	st := teststack.Start(t, func(cfg *config.Config) {
		for _, p := range provider.Names {
			cfg.Provider(p).Upstream = up.URL
		}
	})
	token := useBYOKEverywhere(t, st, "charset@example.com")
	for _, p := range provider.Names {
		status, body := doRequest(t, st.ProxyURL, p, token, nonStream[p])
		key := teststack.BYOKKeys[p]
		if text := strings.ReplaceAll(string(body), "\x00", ""); strings.Contains(text, key[:len(key)-4]) {
			t.Errorf("%s: the client got the key from a UTF-16 body: %q", p, text)
		}
		if status != http.StatusUnauthorized {
			t.Errorf("%s: status %d, want the upstream's 401", p, status)
		}
		if !strings.Contains(string(body), "charset") {
			t.Errorf("%s: body %q does not say why it was replaced", p, body)
		}
	}
}

// An upstream may send a whole event stream with a Content-Length. The
// proxy then removes the usage chunk it requested, so the length must go
// too, or the client waits for bytes that never come.
func TestUsageChunkRemovedFromStreamWithLength(t *testing.T) {
	const usageChunk = `data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7,"total_tokens":10}}` + "\n\n"
	const textChunk = `data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"hello"}}]}` + "\n\n"
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body := textChunk + usageChunk + "data: [DONE]\n\n"
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		io.WriteString(w, body)
	}))
	t.Cleanup(up.Close)
	st := teststack.Start(t, func(c *config.Config) { c.Provider(provider.OpenAI).Upstream = up.URL })
	m := "stream-length@example.com"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := http.DefaultClient.Do(callRequest(ctx, st.ProxyURL, provider.OpenAI, st.Token(t, m), streaming[provider.OpenAI]))
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("reading the stream: %v after %d bytes; Content-Length %d", err, len(got), resp.ContentLength)
	}
	if string(got) != textChunk+"data: [DONE]\n\n" {
		t.Errorf("stream = %q, want the text chunk and [DONE] without the usage chunk", got)
	}
	if _, input, output := sharedUsage(t, st, m, provider.OpenAI); input != 3 || output != 7 {
		t.Errorf("charged %d input and %d output tokens, want 3 and 7 from the usage chunk", input, output)
	}
}

// Trailers that frame, route or authenticate a message never reach the
// client, on an attached stream and on a detached one alike.
func TestForbiddenTrailersDropped(t *testing.T) {
	forbidden := []string{"Content-Length", "Authorization", "Proxy-Authorization", "Www-Authenticate",
		"Proxy-Authenticate", "Set-Cookie", "Cookie", "Host", "Upgrade"}
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, edgeTextChunk)
		http.NewResponseController(w).Flush()
		io.WriteString(w, edgeUsageChunk+"data: [DONE]\n\n")
		for _, name := range forbidden {
			w.Header().Set(http.TrailerPrefix+name, "x")
		}
		w.Header().Set(http.TrailerPrefix+"X-Kept", "v")
	}))
	t.Cleanup(up.Close)
	st := teststack.Start(t, func(c *config.Config) { c.Provider(provider.OpenAI).Upstream = up.URL })
	token := st.Token(t, "forbidden-trailers@example.com")
	_, attachedURL := st.AttachedProxy(t)
	for _, u := range []string{st.ProxyURL, attachedURL} {
		c := dialURL(t, u)
		resp := c.send(t, provider.OpenAI, streaming[provider.OpenAI], token, "")
		readStream(t, resp)
		for _, name := range forbidden {
			if v := resp.Trailer.Get(name); v != "" {
				t.Errorf("%s: trailer %s reached the client", u, name)
			}
		}
		if resp.Trailer.Get("X-Kept") != "v" {
			t.Errorf("%s: trailer X-Kept %q, want v", u, resp.Trailer.Get("X-Kept"))
		}
	}
}
