package proxy_test

import (
	"bufio"
	"bytes"
	"compress/flate"
	"compress/gzip"
	"compress/zlib"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
)

// Token slots of FuzzProxyRequest: where the request carries the mailbox
// token.
const (
	slotNone = iota
	slotAuthorization
	slotAPIKey
	slotGoogleKey
	slotQuery
	slotCount
)

// FuzzProxyRequest sends arbitrary requests through the whole handler, with
// a real key store and the emulated upstreams. Whatever the method, target,
// extra header and body, the handler must not panic. Every request an
// upstream receives carries exactly the injected key, at the path below the
// provider prefix, with no trace of the mailbox token in its headers or
// query. An error that the proxy writes itself is a JSON error body.
func FuzzProxyRequest(f *testing.F) {
	st := teststack.Start(f)
	sharedToken := st.Token(f, "fuzz-shared")
	for _, p := range provider.Names {
		st.UseBYOK(f, "fuzz-byok", p)
	}
	byokToken := st.Token(f, "fuzz-byok")

	for _, p := range provider.Names {
		for _, c := range []call{nonStream[p], streaming[p]} {
			header := strings.Join(sdkHeaders(p), ": ")
			f.Add("POST", c.path, header, c.body, uint8(slotAuthorization), false)
			f.Add("POST", c.path, header, c.body, uint8(slotQuery), true)
		}
	}
	f.Add("GET", "/openai/v1/models", "", "", uint8(slotAPIKey), true)
	f.Add("POST", "/google/v1beta/models/gemini-2.5-flash:countTokens", "X-Goog-Api-Client: x", "{}", uint8(slotGoogleKey), false)
	f.Add("POST", "http://evil.example/openai/v1/chat/completions", "Host: evil.example", nonStream[provider.OpenAI].body, uint8(slotAuthorization), false)
	f.Add("POST", "/openai/v1/%2e%2e/files", "", "{}", uint8(slotAuthorization), true)
	f.Add("POST", "/anthropic/v1/messages", "X-Mailbox-Id: fuzz-byok", `{"model":"m","max_tokens":1,"stream":"x"}`, uint8(slotAPIKey), false)
	f.Add("POST", "/openai/v1/chat/completions", "Content-Type: text/plain", `{"stream":true,"stream_options":null}`, uint8(slotAuthorization), false)
	f.Add("DELETE", "/openai/v1/files/file-1", "Cookie: a=b", "", uint8(slotAuthorization), true)
	f.Add("PUT", "/mistral/v1/chat", "", "", uint8(slotNone), false)
	f.Add("GET", "/readyz", "", "", uint8(slotNone), false)
	f.Add("POST", "/openai/v1/responses", "", `{"model":"m","previous_response_id":"resp_x"}`, uint8(slotAuthorization), false)

	f.Fuzz(func(t *testing.T, method, target, header, body string, slot uint8, byok bool) {
		token := sharedToken
		if byok {
			token = byokToken
		}
		r := buildFuzzRequest(method, target, header, body, token, int(slot)%slotCount)
		if r == nil {
			return
		}
		for _, up := range st.Upstreams {
			up.Reset()
		}
		rec := httptest.NewRecorder()
		st.Handler.ServeHTTP(rec, r)

		forwarded := 0
		for p, up := range st.Upstreams {
			for _, got := range up.Requests() {
				forwarded++
				checkUpstreamRequest(t, p, r, got.Path, got.RawQuery, got.Key, got.Header, token)
			}
		}
		if r.URL.Path == "/healthz" || r.URL.Path == "/readyz" {
			return
		}
		if forwarded == 0 && rec.Code >= 400 {
			var shape struct {
				Error struct {
					Message string `json:"message"`
				} `json:"error"`
			}
			if err := json.Unmarshal(rec.Body.Bytes(), &shape); err != nil || shape.Error.Message == "" {
				t.Fatalf("%s %s: proxy error %d is not a JSON error body: %q", r.Method, target, rec.Code, rec.Body.Bytes())
			}
		}
	})
}

// buildFuzzRequest parses the request the way the HTTP/1.1 server does,
// with the token in the chosen slot. It returns nil for input the server
// would reject before the handler.
func buildFuzzRequest(method, target, header, body, token string, slot int) *http.Request {
	var raw strings.Builder
	if slot == slotQuery {
		sep := "?"
		if strings.Contains(target, "?") {
			sep = "&"
		}
		target += sep + "key=" + token
	}
	raw.WriteString(method + " " + target + " HTTP/1.1\r\nHost: proxy.test\r\n")
	if header != "" {
		raw.WriteString(header + "\r\n")
	}
	switch slot {
	case slotAuthorization:
		raw.WriteString("Authorization: Bearer " + token + "\r\n")
	case slotAPIKey:
		raw.WriteString("X-Api-Key: " + token + "\r\n")
	case slotGoogleKey:
		raw.WriteString("X-Goog-Api-Key: " + token + "\r\n")
	}
	raw.WriteString("Content-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body)
	r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw.String())))
	if err != nil {
		return nil
	}
	r.RemoteAddr = "127.0.0.1:1"
	return r
}

// checkUpstreamRequest checks one request an emulator received for the
// client request r.
func checkUpstreamRequest(t *testing.T, prov string, r *http.Request, path, rawQuery, key string, header http.Header, token string) {
	t.Helper()
	if key != teststack.SharedKeys[prov] && key != teststack.BYOKKeys[prov] {
		t.Fatalf("%s upstream received key %q, not an injected key", prov, key)
	}
	rest, ok := strings.CutPrefix(r.URL.Path, "/"+prov)
	if !ok || path != "/"+strings.TrimPrefix(rest, "/") {
		t.Fatalf("%s upstream received path %q for client path %q", prov, path, r.URL.Path)
	}
	if strings.Contains(rawQuery, token) || strings.Contains(rawQuery, url.QueryEscape(token)) {
		t.Fatalf("%s upstream query carries the mailbox token: %q", prov, rawQuery)
	}
	for name, values := range header {
		for _, v := range values {
			if strings.Contains(v, token) {
				t.Fatalf("%s upstream header %s carries the mailbox token", prov, name)
			}
		}
	}
	spec := provider.Lookup(prov)
	for _, name := range []string{"Authorization", "X-Api-Key", "X-Goog-Api-Key", "Api-Key", "Cookie", "Proxy-Authorization", "X-Mailbox-Id"} {
		n := len(header.Values(name))
		if http.CanonicalHeaderKey(name) == http.CanonicalHeaderKey(spec.AuthHeader) {
			if n != 1 {
				t.Fatalf("%s upstream received %d %s headers, want 1", prov, n, name)
			}
		} else if n != 0 {
			t.Fatalf("%s upstream received a %s header", prov, name)
		}
	}
}

// scriptedResponse is what scriptedUpstream sends next.
type scriptedResponse struct {
	status      int
	contentType string
	encoding    string
	header      http.Header // more response headers
	body        []byte
}

// scriptedUpstream responds to every request with the response set last, so a
// fuzz target can make the upstream send arbitrary bytes.
type scriptedUpstream struct {
	*httptest.Server
	mu   sync.Mutex
	next scriptedResponse
}

func newScriptedUpstream(t testing.TB) *scriptedUpstream {
	u := &scriptedUpstream{}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		u.mu.Lock()
		resp := u.next
		u.mu.Unlock()
		if resp.contentType != "" {
			w.Header().Set("Content-Type", resp.contentType)
		}
		if resp.encoding != "" {
			w.Header().Set("Content-Encoding", resp.encoding)
		}
		for name, values := range resp.header {
			w.Header()[name] = values
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(resp.body)))
		w.WriteHeader(resp.status)
		w.Write(resp.body)
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *scriptedUpstream) set(resp scriptedResponse) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.next = resp
}

// passThroughRoutes are requests whose successful responses the proxy must
// pass on byte for byte. OpenAI chat completion streams are left out, since
// the proxy removes the usage chunk it requested there. On the routes marked
// decoded, the proxy has the transport decode a gzip response, because it
// records the ids that a shared response creates, so the client gets the
// decoded bytes.
var passThroughRoutes = []struct {
	prov, path, body string
	decoded          bool
}{
	{provider.Anthropic, "/anthropic/v1/messages", `{"model":"claude-haiku-4-5","max_tokens":5,"stream":true}`, true},
	{provider.OpenAI, "/openai/v1/responses", `{"model":"gpt-4o-mini","input":"hi","stream":true}`, true},
	{provider.OpenAI, "/openai/v1/embeddings", `{"model":"text-embedding-3-small","input":"hi"}`, false},
	{provider.Google, "/google/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", `{}`, false},
	{provider.Google, "/google/v1beta/models/gemini-2.5-flash:generateContent", `{}`, false},
}

var fuzzContentTypes = []string{"text/event-stream", "application/json", "text/event-stream; charset=utf-8", "text/plain", ""}

var upstreamErrorStatuses = []int{400, 401, 403, 404, 429, 500, 503, 529}

// FuzzUpstreamResponse makes the upstream respond with arbitrary bytes under
// any content type, plain or gzip-encoded, valid or not. A successful
// response reaches the client byte for byte, whatever the usage tap makes of
// it. An error response never shows the client the injected key, also when
// the client decompresses what it got.
func FuzzUpstreamResponse(f *testing.F) {
	up := newScriptedUpstream(f)
	st := teststack.Start(f, func(c *config.Config) {
		for _, p := range provider.Names {
			c.Provider(p).Upstream = up.URL
		}
	})
	token := st.Token(f, "fuzz-upstream")
	client := &http.Client{Transport: &http.Transport{DisableCompression: true}}
	f.Cleanup(client.CloseIdleConnections)

	f.Add(uint8(0), uint8(0), false, false, []byte("event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3}}}\n\n"), uint16(0), uint16(0))
	f.Add(uint8(3), uint8(0), true, false, []byte("data: {\"usageMetadata\":{\"promptTokenCount\":1}}\r\n\r\n"), uint16(0), uint16(0))
	f.Add(uint8(2), uint8(1), true, false, []byte(`{"usage":{"prompt_tokens":-1}}`), uint16(0), uint16(0))
	f.Add(uint8(1), uint8(0), false, false, []byte("data: {\"usage\":{\"input_tokens\":1e400}}\n\n"), uint16(0), uint16(0))
	f.Add(uint8(4), uint8(1), true, false, []byte("\x1f\x8b not really gzip"), uint16(0), uint16(0))
	f.Add(uint8(0), uint8(1), false, true, []byte(`{"error":{"message":"Incorrect API key provided: "}}`), uint16(44), uint16(0))
	f.Add(uint8(1), uint8(1), true, true, []byte(`{"error":{"message":"key  is invalid"}}`), uint16(26), uint16(1))
	// A gzip error body cut before its trailer, as when the upstream
	// connection drops while it sends the error.
	f.Add(uint8(2), uint8(1), true, true, []byte(`{"error":{"message":"API key  not valid. Please pass a valid API key."}}`), uint16(28), uint16(12))

	f.Fuzz(func(t *testing.T, routeIndex, typeIndex uint8, useGzip, errorMode bool, data []byte, at, cut uint16) {
		route := passThroughRoutes[int(routeIndex)%len(passThroughRoutes)]
		resp := scriptedResponse{status: http.StatusOK, contentType: fuzzContentTypes[int(typeIndex)%len(fuzzContentTypes)], body: data}
		// want is what the client must receive of a successful response.
		want := data
		key := teststack.SharedKeys[route.prov]
		if errorMode {
			resp.status = upstreamErrorStatuses[int(at)%len(upstreamErrorStatuses)]
			k := int(at) % (len(data) + 1)
			resp.body = append(append(append([]byte{}, data[:k]...), key...), data[k:]...)
		}
		if useGzip && (errorMode || len(data)%2 == 0) {
			// Half of the successful gzip cases send the body gzip-encoded;
			// the other half send the raw bytes labelled gzip.
			resp.body = gzipOf(t, resp.body)
			if errorMode && cut > 0 {
				resp.body = resp.body[:max(len(resp.body)-int(cut)%len(resp.body), 1)]
			}
		}
		if useGzip {
			resp.encoding = "gzip"
		}
		validGzip := useGzip && (errorMode || len(data)%2 == 0)
		if !route.decoded || !useGzip {
			want = resp.body
		}
		up.set(resp)

		req, err := http.NewRequest(http.MethodPost, st.ProxyURL+route.path, strings.NewReader(route.body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+token)
		if useGzip {
			req.Header.Set("Accept-Encoding", "gzip")
		}
		// The transport cannot decode a body that only claims to be gzip,
		// so the proxy cuts such a response off. On a stream the reverse
		// proxy flushes the header from a timer of its own, which races the
		// failed read. The client then gets either the header and a cut
		// body, or no response at all.
		cutOff := route.decoded && useGzip && !validGzip
		got, err := client.Do(req)
		if err != nil && cutOff {
			return
		}
		if err != nil {
			t.Fatalf("%s: %v", route.path, err)
		}
		defer got.Body.Close()
		received, err := io.ReadAll(got.Body)
		if err != nil && cutOff {
			return
		}
		if err != nil {
			t.Fatalf("%s: reading the response: %v", route.path, err)
		}
		if got.StatusCode != resp.status {
			t.Fatalf("%s: status %d, upstream sent %d", route.path, got.StatusCode, resp.status)
		}
		if !errorMode {
			if !bytes.Equal(received, want) {
				t.Fatalf("%s: client received %d bytes that differ from the %d expected", route.path, len(received), len(want))
			}
			return
		}
		for _, text := range readableForms(received) {
			for _, form := range []string{key, url.QueryEscape(key), url.PathEscape(key)} {
				if bytes.Contains(text, []byte(form)) {
					t.Fatalf("%s: error body %d shows the client the injected key: %q", route.path, resp.status, received)
				}
			}
		}
	})
}

// readableForms returns body and, when it looks gzip-encoded, as much of it
// as a client can decompress.
func readableForms(body []byte) [][]byte {
	forms := [][]byte{body}
	if zr, err := gzip.NewReader(bytes.NewReader(body)); err == nil {
		decoded, _ := io.ReadAll(zr)
		forms = append(forms, decoded)
	}
	if zr, err := zlib.NewReader(bytes.NewReader(body)); err == nil {
		decoded, _ := io.ReadAll(zr)
		forms = append(forms, decoded)
	}
	decoded, _ := io.ReadAll(flate.NewReader(bytes.NewReader(body)))
	return append(forms, decoded)
}

func gzipOf(t testing.TB, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(data)
	if err := zw.Close(); err != nil {
		t.Fatalf("gzip: %v", err)
	}
	return buf.Bytes()
}
