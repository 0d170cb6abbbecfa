package proxy_test

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
)

// sendRawRequest writes one HTTP/1.1 request to the proxy as raw bytes, so that
// header names reach it exactly as written, and returns the response.
func sendRawRequest(t *testing.T, proxyURL, method, path, token, body string, extra ...string) *http.Response {
	t.Helper()
	conn, err := net.DialTimeout("tcp", strings.TrimPrefix(proxyURL, "http://"), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer %s\r\n", method, path, token)
	fmt.Fprintf(&b, "Content-Type: application/json\r\nContent-Length: %d\r\n", len(body))
	for _, line := range extra {
		b.WriteString(line + "\r\n")
	}
	b.WriteString("\r\n" + body)
	if _, err := io.WriteString(conn, b.String()); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp
}

// dashed returns a header name as a front end that maps "_" to "-" reads it.
func dashed(name string) string {
	return strings.ToLower(strings.ReplaceAll(name, "_", "-"))
}

// On the shared key, a header name spelt with underscores must not carry a
// billing project, an organization, a field mask or a method override past
// the checks, which look for the dashed name. Servers behind CGI-style
// gateways read X_Goog_User_Project as X-Goog-User-Project, and so do front
// ends configured to.
func TestSharedUnderscoreHeadersNotForwarded(t *testing.T) {
	s := teststack.Start(t, func(c *config.Config) {
		c.Provider(provider.OpenAI).Organization = "org-platform"
		c.Provider(provider.OpenAI).Project = "proj_platform"
	})
	token := s.Token(t, "underscore-shared")
	cases := []struct {
		provider, path, body string
		headers              []string
	}{
		{provider.Google, "/google/v1beta/models/gemini-2.5-flash:generateContent", `{"contents":[{"parts":[{"text":"hi"}]}]}`,
			[]string{"X_Goog_User_Project", "X_Goog_FieldMask", "X_HTTP_Method_Override"}},
		{provider.OpenAI, "/openai/v1/chat/completions", `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`,
			[]string{"OpenAI_Organization", "OpenAI_Project"}},
	}
	t.Run("own key", func(t *testing.T) {
		// The own key passes the client's other headers on unchanged.
		own := "underscore-own"
		s.UseBYOK(t, own, provider.Google)
		up := s.Upstreams[provider.Google]
		up.Reset()
		if resp := sendRawRequest(t, s.ProxyURL, http.MethodPost, cases[0].path, s.Token(t, own), cases[0].body, "X_Client_Tag: mine"); resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d, want 200", resp.StatusCode)
		}
		if sent := up.Requests(); len(sent) != 1 || sent[0].Header.Get("X_Client_Tag") != "mine" {
			t.Errorf("the own key did not pass X_Client_Tag on")
		}
	})
	for _, tc := range cases {
		for _, name := range tc.headers {
			t.Run(tc.provider+"/"+name, func(t *testing.T) {
				up := s.Upstreams[tc.provider]
				up.Reset()
				if resp := sendRawRequest(t, s.ProxyURL, http.MethodPost, tc.path, token, tc.body, name+": client-value"); resp.StatusCode != http.StatusOK {
					t.Fatalf("status %d, want 200 with the header dropped", resp.StatusCode)
				}
				if n := len(up.Requests()); n != 1 {
					t.Fatalf("%d upstream requests, want 1", n)
				}
				for _, r := range up.Requests() {
					for got, values := range r.Header {
						if dashed(got) == dashed(name) && strings.Contains(got, "_") {
							t.Errorf("the upstream got %s: %s on the shared key", got, strings.Join(values, ", "))
						}
					}
				}
			})
		}
	}
}

// A client's Connection header makes the reverse proxy remove the headers
// it names after the shared Gemini checks have read them. The format check
// accepts a request because its Content-Type is application/json, and the
// upstream must then get that Content-Type too.
func TestSharedConnectionCannotRemoveCheckedHeader(t *testing.T) {
	s := teststack.Start(t)
	token := s.Token(t, "connection-shared")
	up := s.Upstreams[provider.Google]
	up.Reset()
	resp := sendRawRequest(t, s.ProxyURL, http.MethodPost, "/google/v1beta/models/gemini-2.5-flash:generateContent", token,
		`{"contents":[{"parts":[{"text":"hi"}]}]}`, "Connection: Content-Type")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, want 200", resp.StatusCode)
	}
	if n := len(up.Requests()); n != 1 {
		t.Fatalf("%d upstream requests, want 1", n)
	}
	for _, r := range up.Requests() {
		if got := r.Header.Get("Content-Type"); got != "application/json" {
			t.Errorf("the upstream got Content-Type %q, want the application/json the proxy checked", got)
		}
	}
}

// No route the shared key allows is a WebSocket or other upgrade route, so
// an Upgrade header must not reach the upstream. If an upstream switches
// protocols, the reverse proxy relays a raw tunnel that the usage tap never
// reads.
func TestSharedUpgradeNotForwarded(t *testing.T) {
	var mu sync.Mutex
	var upgrades []string
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		if u := r.Header.Get("Upgrade"); u != "" {
			mu.Lock()
			upgrades = append(upgrades, u)
			mu.Unlock()
			w.Header().Set("Connection", "Upgrade")
			w.Header().Set("Upgrade", u)
			w.WriteHeader(http.StatusSwitchingProtocols)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"id":"c1","object":"chat.completion","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}`)
	}))
	t.Cleanup(upstream.Close)
	s := teststack.Start(t, func(c *config.Config) { c.Provider(provider.OpenAI).Upstream = upstream.URL })
	token := s.Token(t, "upgrade-shared")

	resp := sendRawRequest(t, s.ProxyURL, http.MethodPost, "/openai/v1/chat/completions", token,
		`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`,
		"Connection: Upgrade", "Upgrade: websocket")
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("status %d, want 400: a shared request may not switch protocols, whose tunnel the usage tap never reads", resp.StatusCode)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(upgrades) > 0 {
		t.Errorf("the upstream got Upgrade: %s on a shared request", strings.Join(upgrades, ", "))
	}
}

// An upstream response whose Connection header names Content-Encoding
// loses that header in the reverse proxy before ModifyResponse runs. The
// tap then reads gzip bytes as plain JSON, finds no usage, and the shared
// request is charged nothing while the client, which asked for gzip, can
// still decode the body.
func TestResponseConnectionCannotHideEncoding(t *testing.T) {
	var zipped bytes.Buffer
	zw := gzip.NewWriter(&zipped)
	io.WriteString(zw, `{"id":"c1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":500,"completion_tokens":700,"total_tokens":1200}}`)
	zw.Close()
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Encoding", "gzip")
		w.Header().Set("Connection", "Content-Encoding")
		w.Write(zipped.Bytes())
	}))
	t.Cleanup(upstream.Close)
	s := teststack.Start(t, func(c *config.Config) { c.Provider(provider.OpenAI).Upstream = upstream.URL })
	m := "encoding-shared"
	token := s.Token(t, m)

	resp := sendRawRequest(t, s.ProxyURL, http.MethodPost, "/openai/v1/chat/completions", token,
		`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`, "Accept-Encoding: gzip")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, want 200", resp.StatusCode)
	}
	s.WaitAudit(t)
	events := teststack.EventsOf(s.AuditEvents(t), m)
	if len(events) != 1 {
		t.Fatalf("%d audit events, want 1", len(events))
	}
	in, _ := events[0]["input_tokens"].(float64)
	out, _ := events[0]["output_tokens"].(float64)
	if in+out == 0 {
		t.Errorf("a shared response of 1200 tokens was charged %v input and %v output tokens", in, out)
	}
}
