package proxy_test

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/provider"
)

// rawTimeout bounds every raw connection a test opens.
const rawTimeout = 10 * time.Second

// rawResponse is one response read from a raw connection.
type rawResponse struct {
	status int
	header http.Header
	body   []byte
}

// sendRaw writes raw bytes to the server behind baseURL and reads up to max
// responses, stopping early when the server closes the connection or the
// read times out.
func sendRaw(t *testing.T, baseURL, raw string, max int) []rawResponse {
	t.Helper()
	responses, _ := exchangeRaw(t, baseURL, raw, max, false)
	return responses
}

// exchangeRaw is sendRaw that can also report whether the server closed
// the connection. With waitClose it waits up to 500 ms after the last
// response for the close.
func exchangeRaw(t *testing.T, baseURL, raw string, max int, waitClose bool) (responses []rawResponse, closed bool) {
	t.Helper()
	u, err := url.Parse(baseURL)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.DialTimeout("tcp", u.Host, rawTimeout)
	if err != nil {
		t.Fatalf("dial %s: %v", u.Host, err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(rawTimeout))
	if _, err := io.WriteString(conn, raw); err != nil {
		t.Fatalf("write request: %v", err)
	}

	br := bufio.NewReader(conn)
	for len(responses) < max {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return responses, !isTimeoutErr(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatalf("read response body: %v", err)
		}
		responses = append(responses, rawResponse{status: resp.StatusCode, header: resp.Header, body: body})
		if resp.Close {
			return responses, true
		}
	}
	if !waitClose {
		return responses, false
	}

	conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	_, err = br.ReadByte()
	return responses, err != nil && !isTimeoutErr(err)
}

func isTimeoutErr(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// useBYOKEverywhere stores BYOK keys for every provider of mailbox m and
// returns its token, so every path below a provider prefix is allowed.
func useBYOKEverywhere(t *testing.T, st *teststack.Stack, m string) string {
	t.Helper()
	for _, p := range provider.Names {
		st.UseBYOK(t, m, p)
	}
	return st.Token(t, m)
}

// upstreamRequests returns the number of requests all emulators received.
func upstreamRequests(st *teststack.Stack) int {
	n := 0
	for _, up := range st.Upstreams {
		n += len(up.Requests())
	}
	return n
}

func resetUpstreams(st *teststack.Stack) {
	for _, up := range st.Upstreams {
		up.Reset()
	}
}

func TestPathTraversalRejected(t *testing.T) {
	st := teststack.Start(t)
	token := useBYOKEverywhere(t, st, "traversal@example.com")
	// Every target would be forwarded on BYOK, where all paths are allowed,
	// if the proxy did not reject it first.
	targets := []string{
		"/%s/v1/../files",
		"/%s/v1/./models",
		"/%s/../openai/v1/files",
		"/%s/v1/models/..",
		"/%s/%%2e%%2e/v1/files",
		"/%s/v1/%%2E%%2E/files",
		"/%s/v1/.%%2e/files",
		"/%s/v1%%2ffiles",
		"/%s/v1%%2Ffiles",
		"/%s/v1/%%5c..%%5cfiles",
		"/%s/v1/..%%2f..%%2ffiles",
		"/%s//v1/models",
		"/%s/v1//models",
	}
	for _, p := range provider.Names {
		for _, format := range targets {
			target := fmt.Sprintf(format, p)
			t.Run(target, func(t *testing.T) {
				resetUpstreams(st)
				raw := "POST " + target + " HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer " + token +
					"\r\nAnthropic-Version: 2023-06-01\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
				responses := sendRaw(t, st.ProxyURL, raw, 1)
				if len(responses) != 1 {
					t.Fatal("no response")
				}
				if responses[0].status != http.StatusBadRequest {
					t.Errorf("status %d, want 400: %s", responses[0].status, responses[0].body)
				}
				if !inShape(p, responses[0].body, "invalid_request_error", "invalid_request", "INVALID_ARGUMENT") {
					t.Errorf("not in %s's 400 shape: %s", p, responses[0].body)
				}
				if n := upstreamRequests(st); n != 0 {
					t.Errorf("upstreams received %d requests", n)
				}
			})
		}
	}
}

func TestRequestTargetForms(t *testing.T) {
	st := teststack.Start(t)
	token := useBYOKEverywhere(t, st, "target-forms@example.com")
	other := st.Upstreams[provider.Anthropic]
	otherHost := strings.TrimPrefix(other.URL, "http://")
	body := nonStream[provider.OpenAI].body
	post := func(target, host string) string {
		return "POST " + target + " HTTP/1.1\r\nHost: " + host + "\r\nAuthorization: Bearer " + token +
			"\r\nContent-Type: application/json\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body
	}

	t.Run("absolute-form naming another upstream", func(t *testing.T) {
		resetUpstreams(st)
		// The target names the Anthropic emulator; the path names the
		// OpenAI route, whose configured upstream must get the request.
		responses := sendRaw(t, st.ProxyURL, post("http://"+otherHost+"/openai/v1/chat/completions", otherHost), 1)
		if len(responses) != 1 || responses[0].status != http.StatusOK {
			t.Fatalf("responses %+v, want one 200", responses)
		}
		reqs := st.Upstreams[provider.OpenAI].Requests()
		if len(reqs) != 1 || reqs[0].Path != "/v1/chat/completions" {
			t.Errorf("OpenAI upstream received %d requests, want 1 at /v1/chat/completions", len(reqs))
		}
		if n := len(other.Requests()); n != 0 {
			t.Errorf("the host named in the target received %d requests", n)
		}
	})

	t.Run("absolute-form with a foreign host", func(t *testing.T) {
		resetUpstreams(st)
		responses := sendRaw(t, st.ProxyURL, post("https://evil.example:443/openai/v1/chat/completions", "evil.example"), 1)
		if len(responses) != 1 || responses[0].status != http.StatusOK {
			t.Fatalf("responses %+v, want one 200", responses)
		}
		if n := len(st.Upstreams[provider.OpenAI].Requests()); n != 1 {
			t.Errorf("OpenAI upstream received %d requests, want 1", n)
		}
	})

	t.Run("authority-form CONNECT", func(t *testing.T) {
		resetUpstreams(st)
		for _, authority := range []string{otherHost, "api.openai.com:443", "evil.example:443"} {
			raw := "CONNECT " + authority + " HTTP/1.1\r\nHost: " + authority + "\r\nAuthorization: Bearer " + token + "\r\n\r\n"
			responses := sendRaw(t, st.ProxyURL, raw, 1)
			if len(responses) != 1 {
				t.Fatalf("CONNECT %s: no response", authority)
			}
			if responses[0].status/100 == 2 {
				t.Errorf("CONNECT %s: status %d opens a tunnel", authority, responses[0].status)
			}
		}
		if n := upstreamRequests(st); n != 0 {
			t.Errorf("upstreams received %d requests", n)
		}
	})

	t.Run("asterisk-form OPTIONS", func(t *testing.T) {
		resetUpstreams(st)
		responses := sendRaw(t, st.ProxyURL, "OPTIONS * HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer "+token+"\r\n\r\n", 1)
		if len(responses) != 1 {
			t.Fatal("no response")
		}
		if n := upstreamRequests(st); n != 0 {
			t.Errorf("upstreams received %d requests", n)
		}
	})

	t.Run("network-path reference", func(t *testing.T) {
		resetUpstreams(st)
		responses := sendRaw(t, st.ProxyURL, post("//"+otherHost+"/openai/v1/chat/completions", "proxy.test"), 1)
		if len(responses) != 1 || responses[0].status/100 != 4 {
			t.Fatalf("responses %+v, want one 4xx", responses)
		}
		if n := upstreamRequests(st); n != 0 {
			t.Errorf("upstreams received %d requests", n)
		}
	})
}

// recordedRequest is what hostRecorder saw of one request.
type recordedRequest struct {
	host   string
	path   string
	header http.Header
}

// hostRecorder is an upstream that records the Host and headers of every
// request and responds like an OpenAI chat completion.
type hostRecorder struct {
	*httptest.Server
	mu       sync.Mutex
	requests []recordedRequest
}

func newHostRecorder(t *testing.T) *hostRecorder {
	h := &hostRecorder{}
	h.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		h.mu.Lock()
		h.requests = append(h.requests, recordedRequest{host: r.Host, path: r.URL.Path, header: r.Header.Clone()})
		h.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}`)
	}))
	t.Cleanup(h.Close)
	return h
}

func (h *hostRecorder) recorded() []recordedRequest {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]recordedRequest(nil), h.requests...)
}

func TestSpoofedHostHeaders(t *testing.T) {
	rec := newHostRecorder(t)
	st := teststack.Start(t, func(c *config.Config) { c.Provider(provider.OpenAI).Upstream = rec.URL })
	token := st.Token(t, "host-spoof@example.com")
	upstreamHost := strings.TrimPrefix(rec.URL, "http://")
	c := nonStream[provider.OpenAI]

	spoofs := [][]string{
		{"Host", "api.openai.com"},
		{"Host", "evil.example"},
		{"Host", "127.0.0.1:1"},
		{"X-Forwarded-Host", "evil.example"},
		{"Forwarded", "for=1.2.3.4;host=evil.example;proto=https"},
		{"X-Forwarded-For", "1.2.3.4"},
		{"X-Forwarded-Proto", "https"},
	}
	for _, spoof := range spoofs {
		req, err := http.NewRequest(http.MethodPost, st.ProxyURL+c.path, strings.NewReader(c.body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")
		if spoof[0] == "Host" {
			req.Host = spoof[1]
		} else {
			req.Header.Set(spoof[0], spoof[1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("%s: %s: status %d", spoof[0], spoof[1], resp.StatusCode)
		}
	}
	got := rec.recorded()
	if len(got) != len(spoofs) {
		t.Fatalf("upstream received %d requests, want %d", len(got), len(spoofs))
	}
	for i, r := range got {
		if r.host != upstreamHost {
			t.Errorf("%s: %s: upstream saw Host %q, want %q", spoofs[i][0], spoofs[i][1], r.host, upstreamHost)
		}
		if r.path != "/v1/chat/completions" {
			t.Errorf("%s: %s: upstream path %q", spoofs[i][0], spoofs[i][1], r.path)
		}
		// A forwarding header reaches the upstream as sent, like any other
		// header: it changes where the request goes no more than Host does.
		for _, name := range []string{"Forwarded", "X-Forwarded-Host", "X-Forwarded-For", "X-Forwarded-Proto"} {
			want := ""
			if spoofs[i][0] == name {
				want = spoofs[i][1]
			}
			if v := r.header.Get(name); v != want {
				t.Errorf("%s: %s: upstream received %s %q, want %q", spoofs[i][0], spoofs[i][1], name, v, want)
			}
		}
	}
}

// TestSmuggledRequestNotServed sends a request with both Content-Length and
// Transfer-Encoding, followed on the same connection by a second request
// that a front proxy framing by Content-Length would take for body bytes.
// RFC 9112 section 6.1 requires the server to close the connection after
// responding to such a request, so the second request is never served.
func TestSmuggledRequestNotServed(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "smuggle@example.com")
	body := nonStream[provider.OpenAI].body
	chunked := fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(body), body)
	smuggled := "GET /openai/v1/models HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer " + token + "\r\n\r\n"
	raw := "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer " + token +
		"\r\nContent-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + smuggled

	responses, closed := exchangeRaw(t, st.ProxyURL, raw, 2, true)
	if len(responses) == 0 {
		t.Fatal("no response")
	}
	if s := responses[0].status; s != http.StatusOK && s != http.StatusBadRequest {
		t.Errorf("first request: status %d, want 200 (chunked body used) or 400 (rejected)", s)
	}
	if len(responses) > 1 || !closed {
		t.Errorf("the connection stayed open after a request with Content-Length and Transfer-Encoding; %d responses", len(responses))
	}
	reqs := st.Upstreams[provider.OpenAI].Requests()
	for _, r := range reqs {
		if r.Path != "/v1/chat/completions" {
			t.Errorf("upstream received the smuggled request %s %s", r.Method, r.Path)
		}
		if len(r.Header.Values("Transfer-Encoding")) > 0 && r.Header.Get("Content-Length") != "" {
			t.Errorf("upstream received both Content-Length and Transfer-Encoding")
		}
		if string(r.Body) != body {
			t.Errorf("upstream received body %q, want the chunked body", r.Body)
		}
	}
}

func TestAmbiguousFramingRejected(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "framing@example.com")
	head := "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer " + token + "\r\nContent-Type: application/json\r\n"
	cases := map[string]string{
		"two different Content-Length":    "Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
		"chunked not last":                "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
		"unknown transfer coding":         "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
		"space before colon":              "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
		"negative Content-Length":         "Content-Length: -1\r\n\r\n",
		"Content-Length not a number":     "Content-Length: 1e3\r\n\r\n",
		"Content-Length with a plus sign": "Content-Length: +2\r\n\r\n{}",
	}
	for name, tail := range cases {
		t.Run(name, func(t *testing.T) {
			resetUpstreams(st)
			responses := sendRaw(t, st.ProxyURL, head+tail, 1)
			if len(responses) != 1 {
				t.Fatal("no response")
			}
			if s := responses[0].status; s != http.StatusBadRequest && s != http.StatusNotImplemented {
				t.Errorf("status %d, want 400 or 501", s)
			}
			if n := upstreamRequests(st); n != 0 {
				t.Errorf("upstreams received %d requests", n)
			}
		})
	}
}

func TestDuplicateCredentialsRejected(t *testing.T) {
	st := teststack.Start(t)
	a := st.Token(t, "dup-a@example.com")
	b := useBYOKEverywhere(t, st, "dup-b@example.com")
	c := nonStream[provider.OpenAI]
	cases := []struct {
		name   string
		header [][2]string
		query  string
	}{
		{"two Authorization headers", [][2]string{{"Authorization", "Bearer " + a}, {"Authorization", "Bearer " + b}}, ""},
		{"two x-api-key headers", [][2]string{{"X-Api-Key", a}, {"X-Api-Key", b}}, ""},
		{"two x-goog-api-key headers", [][2]string{{"X-Goog-Api-Key", a}, {"X-Goog-Api-Key", b}}, ""},
		{"Authorization and query key", [][2]string{{"Authorization", "Bearer " + a}}, "key=" + b},
		{"x-goog-api-key and query key", [][2]string{{"X-Goog-Api-Key", a}}, "key=" + b},
		{"two query keys", nil, "key=" + a + "&key=" + b},
		{"api-key and Authorization", [][2]string{{"Api-Key", b}, {"Authorization", "Bearer " + a}}, ""},
		{"valid token and garbage", [][2]string{{"Authorization", "Bearer " + a}, {"X-Api-Key", "garbage"}}, ""},
		{"Bearer and Basic", [][2]string{{"Authorization", "Bearer " + a}, {"Authorization", "Basic " + b}}, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resetUpstreams(st)
			target := st.ProxyURL + c.path
			if tc.query != "" {
				target += "?" + tc.query
			}
			req, err := http.NewRequest(http.MethodPost, target, strings.NewReader(c.body))
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Content-Type", "application/json")
			for _, h := range tc.header {
				req.Header.Add(h[0], h[1])
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			respBody, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("status %d, want 401: %s", resp.StatusCode, respBody)
			}
			if !inShape(provider.OpenAI, respBody, "authentication_error", "invalid_api_key", "UNAUTHENTICATED") {
				t.Errorf("not in OpenAI's 401 shape: %s", respBody)
			}
			if n := upstreamRequests(st); n != 0 {
				t.Errorf("upstreams received %d requests", n)
			}
		})
	}

	// The same token in several slots names one mailbox and passes.
	resetUpstreams(st)
	resp, body := st.Do(t, http.MethodPost, c.path+"?key="+a, a, c.body, "X-Api-Key", a)
	if resp.StatusCode != http.StatusOK {
		t.Errorf("one token in three slots: status %d: %s", resp.StatusCode, body)
	}
}

func TestMailboxHeaderCannotSwitchMailbox(t *testing.T) {
	for _, trusted := range []bool{false, true} {
		t.Run("trust_mailbox_header="+strconv.FormatBool(trusted), func(t *testing.T) {
			st := teststack.Start(t, func(c *config.Config) { c.Auth.TrustMailboxHeader = trusted })
			victim := "victim@example.com"
			useBYOKEverywhere(t, st, victim)
			attacker := "attacker@example.com"
			token := st.Token(t, attacker)
			for _, p := range provider.Names {
				c := nonStream[p]
				headers := append(sdkHeaders(p), "X-Mailbox-Id", victim)
				resp, body := st.Do(t, http.MethodPost, c.path, token, c.body, headers...)
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("%s: status %d: %s", p, resp.StatusCode, body)
				}
				reqs := st.Upstreams[p].Requests()
				if got := reqs[len(reqs)-1].Key; got != teststack.SharedKeys[p] {
					t.Errorf("%s: upstream received %q, want the shared key of the token's mailbox", p, got)
				}
			}
			events := st.AuditEvents(t)
			if n := len(teststack.EventsOf(events, attacker)); n != len(provider.Names) {
				t.Errorf("audit events of the token's mailbox: %d, want %d", n, len(provider.Names))
			}
			if n := len(teststack.EventsOf(events, victim)); n != 0 {
				t.Errorf("audit events of the X-Mailbox-Id mailbox: %d, want 0", n)
			}
			code, usage := st.AdminDo(t, http.MethodGet, "/admin/v1/mailboxes/"+victim+"/usage", nil)
			if code != http.StatusOK || strings.Contains(string(usage), `"requests":1`) {
				t.Errorf("usage of the X-Mailbox-Id mailbox: %d %s, want none counted", code, usage)
			}
		})
	}
}

func TestHeaderLimitInProviderShape(t *testing.T) {
	const limit = 8 << 10
	st := teststack.Start(t, func(c *config.Config) { c.Limits.MaxHeaderBytes = limit })
	token := st.Token(t, "headers@example.com")
	for _, p := range provider.Names {
		c := nonStream[p]
		resetUpstreams(st)
		small := append(sdkHeaders(p), "X-Padding", strings.Repeat("a", limit/2))
		if resp, body := st.Do(t, http.MethodPost, c.path, token, c.body, small...); resp.StatusCode != http.StatusOK {
			t.Errorf("%s: headers under the limit: status %d: %s", p, resp.StatusCode, body)
		}
		resetUpstreams(st)
		large := append(sdkHeaders(p), "X-Padding", strings.Repeat("a", limit+1))
		resp, body := st.Do(t, http.MethodPost, c.path, token, c.body, large...)
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("%s: headers over the limit: status %d, want 431", p, resp.StatusCode)
		}
		if !inShape(p, body, "request_too_large", "request_too_large", "INVALID_ARGUMENT") {
			t.Errorf("%s: 431 not in the provider's shape: %s", p, body)
		}
		if n := upstreamRequests(st); n != 0 {
			t.Errorf("%s: upstreams received %d requests", p, n)
		}
		// Many small headers add up the same way as one large one.
		resetUpstreams(st)
		var many []string
		for i := range limit / 64 {
			many = append(many, "X-Pad-"+strconv.Itoa(i), strings.Repeat("b", 64))
		}
		resp, _ = st.Do(t, http.MethodPost, c.path, token, c.body, append(sdkHeaders(p), many...)...)
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("%s: many headers over the limit: status %d, want 431", p, resp.StatusCode)
		}
	}
}

func TestBodyLimitInProviderShape(t *testing.T) {
	const limit = 4 << 10
	st := teststack.Start(t, func(c *config.Config) { c.Limits.MaxBodyBytes = limit })
	token := useBYOKEverywhere(t, st, "bodies@example.com")
	for _, p := range provider.Names {
		c := nonStream[p]
		checkTooLarge := func(t *testing.T, status int, body []byte) {
			t.Helper()
			if status != http.StatusRequestEntityTooLarge {
				t.Errorf("status %d, want 413: %s", status, body)
			}
			if !inShape(p, body, "request_too_large", "request_too_large", "INVALID_ARGUMENT") {
				t.Errorf("413 not in the provider's shape: %s", body)
			}
		}
		big := `{"model":"m","max_tokens":1,"pad":"` + strings.Repeat("x", 2*limit) + `"}`

		t.Run(p+"/declared length", func(t *testing.T) {
			resetUpstreams(st)
			resp, body := st.Do(t, http.MethodPost, c.path, token, big, sdkHeaders(p)...)
			checkTooLarge(t, resp.StatusCode, body)
			if n := len(st.Upstreams[p].Requests()); n != 0 {
				t.Errorf("upstream received %d requests", n)
			}
		})

		t.Run(p+"/chunked JSON body", func(t *testing.T) {
			resetUpstreams(st)
			status, body := postChunked(t, st.ProxyURL+c.path, token, "application/json", big, sdkHeaders(p))
			checkTooLarge(t, status, body)
			if p != provider.Google {
				// The proxy reads OpenAI and Anthropic generation bodies
				// before forwarding, so nothing reaches the upstream. Only
				// this provider's upstream counts: the previous provider's
				// streamed upload below may reach its own upstream late.
				if got := st.Upstreams[p].Requests(); len(got) != 0 {
					t.Errorf("upstream received %d requests, the first %s %s", len(got), got[0].Method, got[0].Path)
				}
			}
		})

		t.Run(p+"/chunked upload streamed through", func(t *testing.T) {
			resetUpstreams(st)
			status, body := postChunked(t, st.ProxyURL+"/"+p+"/v1/files", token, "application/octet-stream", strings.Repeat("y", 4*limit), sdkHeaders(p))
			checkTooLarge(t, status, body)
		})

		t.Run(p+"/at the limit", func(t *testing.T) {
			resetUpstreams(st)
			fits := c.body[:len(c.body)-1] + `,"pad":"` + strings.Repeat("z", limit-len(c.body)-9) + `"}`
			if len(fits) != limit {
				t.Fatalf("body is %d bytes, want %d", len(fits), limit)
			}
			resp, body := st.Do(t, http.MethodPost, c.path, token, fits, sdkHeaders(p)...)
			if resp.StatusCode != http.StatusOK {
				t.Errorf("body of exactly the limit: status %d: %s", resp.StatusCode, body)
			}
		})
	}
}

// A body sent as JSON bytes with a Content-Encoding would be read as other
// bytes by a provider that decodes it, so the shared key rejects it even
// when the bytes as sent are JSON.
func TestEncodedJSONBodyOnSharedKey(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "encoded-json@example.com")
	for _, p := range provider.Names {
		t.Run(p, func(t *testing.T) {
			c := nonStream[p]
			resetUpstreams(st)
			resp, body := st.Do(t, http.MethodPost, c.path, token, c.body, append(sdkHeaders(p), "Content-Encoding", "br")...)
			if resp.StatusCode != http.StatusBadRequest {
				t.Errorf("status %d, want 400: %s", resp.StatusCode, body)
			}
			if !strings.Contains(string(body), `Content-Encoding \"br\"`) {
				t.Errorf("message does not name the encoding: %s", body)
			}
			if n := upstreamRequests(st); n != 0 {
				t.Errorf("upstreams received %d requests", n)
			}
		})
	}
}

func TestCompressedBodyOnSharedKey(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "gzip@example.com")
	for _, p := range []string{provider.OpenAI, provider.Google} {
		t.Run(p, func(t *testing.T) {
			c := nonStream[p]
			var packed bytes.Buffer
			zw := gzip.NewWriter(&packed)
			zw.Write([]byte(c.body))
			zw.Close()
			resetUpstreams(st)
			resp, body := st.Do(t, http.MethodPost, c.path, token, packed.String(), "Content-Encoding", "gzip")
			if resp.StatusCode != http.StatusBadRequest {
				t.Errorf("status %d, want 400: %s", resp.StatusCode, body)
			}
			if !strings.Contains(string(body), `Content-Encoding \"gzip\"`) || !strings.Contains(string(body), "send it uncompressed") {
				t.Errorf("message does not name the encoding: %s", body)
			}
			if !inShape(p, body, "invalid_request_error", "invalid_request", "INVALID_ARGUMENT") {
				t.Errorf("400 not in the provider's shape: %s", body)
			}
			if n := upstreamRequests(st); n != 0 {
				t.Errorf("upstreams received %d requests", n)
			}
		})
	}
}

// postChunked sends body with Transfer-Encoding: chunked, so the proxy
// learns its size only while reading it.
func postChunked(t *testing.T, target, token, contentType, body string, headers []string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, target, io.MultiReader(strings.NewReader(body)))
	if err != nil {
		t.Fatal(err)
	}
	req.ContentLength = -1
	req.Header.Set("Content-Type", contentType)
	req.Header.Set("Authorization", "Bearer "+token)
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", target, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, data
}

// TestSlowClientTimeouts runs the handler in an http.Server with the
// timeout fields cmd/byokproxy sets (ReadHeaderTimeout, IdleTimeout, and no
// ReadTimeout or WriteTimeout), scaled down. A client that stalls in its
// headers, or idles on a kept-alive connection, is disconnected; a stream
// slower than both timeouts still completes.
func TestSlowClientTimeouts(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "slow@example.com")
	srv := httptest.NewUnstartedServer(st.Handler)
	srv.Config.ReadHeaderTimeout = 150 * time.Millisecond
	srv.Config.IdleTimeout = 200 * time.Millisecond
	srv.Start()
	t.Cleanup(srv.Close)
	addr := srv.Listener.Addr().String()

	t.Run("stalled headers", func(t *testing.T) {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		io.WriteString(conn, "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer "+token+"\r\n")
		if !closedWithin(conn, rawTimeout) {
			t.Errorf("connection with unfinished headers still open after %v", rawTimeout)
		}
	})

	t.Run("idle keep-alive", func(t *testing.T) {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
		br := bufio.NewReader(conn)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("first request: %v", err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if !closedWithin(&bufferedConn{Conn: conn, r: br}, rawTimeout) {
			t.Errorf("idle connection still open after %v", rawTimeout)
		}
	})

	t.Run("slow stream completes", func(t *testing.T) {
		up := st.Upstreams[provider.Anthropic]
		up.Reset()
		// Each pause between events is longer than both timeouts.
		up.SetEventDelay(300 * time.Millisecond)
		defer up.SetEventDelay(0)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		resp, err := http.DefaultClient.Do(callRequest(ctx, srv.URL, provider.Anthropic, token, streaming[provider.Anthropic]))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("stream cut: %v", err)
		}
		if !bytes.Contains(body, []byte("message_stop")) {
			t.Errorf("stream ended without message_stop:\n%s", body)
		}
	})
}

// bufferedConn reads through the bufio.Reader that already holds part of
// the connection's input.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// closedWithin reports whether the peer closes conn within d. Any bytes
// that arrive first are discarded.
func closedWithin(conn net.Conn, d time.Duration) bool {
	conn.SetReadDeadline(time.Now().Add(d))
	buf := make([]byte, 512)
	for {
		_, err := conn.Read(buf)
		if err != nil {
			return !isTimeoutErr(err)
		}
	}
}

// TestBinaryServerLimits builds cmd/byokproxy and checks the limits its
// listener sets. Headers far over limits.max_header_bytes stop at the
// server, and a client that never finishes its headers is disconnected
// after ReadHeaderTimeout. Core dumps are off, so a crash cannot write a key
// in memory to disk.
func TestBinaryServerLimits(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	t.Parallel()
	const headerLimit = 8 << 10
	bin := buildBinary(t)
	rs := redistest.Start(t)
	prefix := rs.Prefix(t)
	dir := t.TempDir()
	ids, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	identityFile := filepath.Join(dir, "identity.txt")
	if err := os.WriteFile(identityFile, []byte(ids.SecretText()), 0o600); err != nil {
		t.Fatal(err)
	}
	listen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	cfg := map[string]any{
		"listen":   listen,
		"admin":    map[string]any{"listen": fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t)), "token": "binary-admin-token-0123456789"},
		"metrics":  map[string]any{"listen": fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))},
		"auth":     map[string]any{"token_secrets": []string{"binary-token-secret-0123456789"}},
		"keystore": map[string]any{"identity_file": identityFile},
		"redis":    map[string]any{"url": rs.URL, "prefix": prefix},
		"limits":   map[string]any{"max_header_bytes": headerLimit},
	}
	data, _ := json.Marshal(cfg)
	configFile := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(configFile, data, 0o600); err != nil {
		t.Fatal(err)
	}
	proc := startBinary(t, bin, "serve", "--config", configFile)
	baseURL := "http://" + listen
	waitHTTP(t, baseURL+"/readyz", proc)

	t.Run("core dumps off", func(t *testing.T) {
		limits, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", proc.Process.Pid))
		if err != nil {
			t.Skipf("no /proc on this system: %v", err)
		}
		for line := range strings.SplitSeq(string(limits), "\n") {
			if strings.HasPrefix(line, "Max core file size") {
				fields := strings.Fields(strings.TrimPrefix(line, "Max core file size"))
				if len(fields) < 2 || fields[0] != "0" || fields[1] != "0" {
					t.Errorf("core file size limit is %q, want soft and hard 0", line)
				}
				return
			}
		}
		t.Error("no core file size line in /proc/PID/limits")
	})

	t.Run("headers over the server's hard stop", func(t *testing.T) {
		raw := "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: proxy.test\r\nX-Padding: " +
			strings.Repeat("a", 4*headerLimit) + "\r\nContent-Length: 2\r\n\r\n{}"
		responses := sendRaw(t, baseURL, raw, 1)
		if len(responses) != 1 || responses[0].status != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("responses %+v, want one 431", responses)
		}
	})

	t.Run("headers between the limit and the hard stop", func(t *testing.T) {
		raw := "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: proxy.test\r\nX-Padding: " +
			strings.Repeat("a", headerLimit+1) + "\r\nContent-Length: 2\r\n\r\n{}"
		responses := sendRaw(t, baseURL, raw, 1)
		if len(responses) != 1 || responses[0].status != http.StatusRequestHeaderFieldsTooLarge {
			t.Fatalf("responses %+v, want one 431", responses)
		}
		if !inShape(provider.OpenAI, responses[0].body, "request_too_large", "request_too_large", "INVALID_ARGUMENT") {
			t.Errorf("431 not in OpenAI's shape: %s", responses[0].body)
		}
	})

	t.Run("stalled headers", func(t *testing.T) {
		conn, err := net.Dial("tcp", listen)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		io.WriteString(conn, "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: proxy.test\r\n")
		// The binary's ReadHeaderTimeout is 10 s.
		if !closedWithin(conn, 25*time.Second) {
			t.Error("connection with unfinished headers still open after 25 s")
		}
	})
}

// buildBinary builds cmd/byokproxy into a temporary directory.
func buildBinary(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "byokproxy")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/byokproxy")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/byokproxy: %v\n%s", err, out)
	}
	return bin
}

// startBinary runs bin with args and stops it with SIGTERM, then SIGKILL,
// when the test ends.
func startBinary(t *testing.T, bin string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("byokproxy output:\n%s", out.String())
		}
	})
	return cmd
}

// waitHTTP polls url until it returns 200, for up to 30 s.
func waitHTTP(t *testing.T, url string, proc *exec.Cmd) {
	t.Helper()
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if proc.ProcessState != nil {
			t.Fatalf("byokproxy exited: %v", proc.ProcessState)
		}
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s not ready after 30 s", url)
}

// TestTokenAlternateSpellingRejected changes the unused low bits of the last
// character of a token's base64 MAC. The MAC bytes stay the same, so a
// lenient decoder accepts the changed token as a second spelling of the
// same credential.
func TestTokenAlternateSpellingRejected(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "spelling@example.com")
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	last := strings.IndexByte(alphabet, token[len(token)-1])
	if last < 0 {
		t.Fatalf("token %q does not end in a base64url character", token)
	}
	c := nonStream[provider.OpenAI]
	if resp, body := st.Do(t, http.MethodPost, c.path, token, c.body); resp.StatusCode != http.StatusOK {
		t.Fatalf("issued token: status %d: %s", resp.StatusCode, body)
	}
	// A 32-byte MAC is 43 characters; the last one carries 2 unused bits.
	for _, flip := range []int{1, 2, 3} {
		other := token[:len(token)-1] + string(alphabet[last^flip])
		resetUpstreams(st)
		resp, _ := st.Do(t, http.MethodPost, c.path, other, c.body)
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("token with unused bits %b set: status %d, want 401", flip, resp.StatusCode)
		}
		if n := upstreamRequests(st); n != 0 {
			t.Errorf("token with unused bits %b set: upstream received %d requests", flip, n)
		}
	}
}

// TestForwardingHeadersPassThrough checks that the client's forwarding
// headers reach the upstream unchanged, as its other headers do, though the
// proxy routes by none of them.
func TestForwardingHeadersPassThrough(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "forwarding@example.com")
	sent := http.Header{
		"Forwarded":         {"for=192.0.2.60;proto=https"},
		"X-Forwarded-For":   {"192.0.2.60, 198.51.100.17"},
		"X-Forwarded-Host":  {"mail.example.com"},
		"X-Forwarded-Proto": {"https"},
	}
	for _, p := range provider.Names {
		c := nonStream[p]
		header := sdkHeaders(p)
		for name, values := range sent {
			header = append(header, name, values[0])
		}
		resp, body := st.Do(t, "POST", c.path, token, c.body, header...)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %d %s", p, resp.StatusCode, body)
		}
		got := st.Upstreams[p].Requests()
		last := got[len(got)-1]
		for name, values := range sent {
			if v := last.Header.Values(name); len(v) != 1 || v[0] != values[0] {
				t.Errorf("%s: upstream got %s %q, want %q", p, name, v, values[0])
			}
		}
	}
}
