package proxy

import (
	"context"
	"crypto/tls"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
)

func TestRebaseUploadURLs(t *testing.T) {
	const base = "http://127.0.0.1:8080/google"
	cases := []struct {
		name, upstream, header, want string
	}{
		{"session URL", "https://generativelanguage.googleapis.com",
			"https://generativelanguage.googleapis.com/upload/v1beta/files?upload_id=AB-c_1&upload_protocol=resumable",
			base + "/upload/v1beta/files?upload_id=AB-c_1&upload_protocol=resumable"},
		{"default port written", "https://generativelanguage.googleapis.com",
			"https://generativelanguage.googleapis.com:443/upload/v1beta/files?upload_id=1",
			base + "/upload/v1beta/files?upload_id=1"},
		{"upstream with a path", "http://gateway.internal:9000/gemini/",
			"http://gateway.internal:9000/gemini/upload/v1beta/files?upload_id=2",
			base + "/upload/v1beta/files?upload_id=2"},
		{"escaped path kept", "https://generativelanguage.googleapis.com",
			"https://generativelanguage.googleapis.com/upload/v1beta/fileSearchStores/my%20store:uploadToFileSearchStore?upload_id=3",
			base + "/upload/v1beta/fileSearchStores/my%20store:uploadToFileSearchStore?upload_id=3"},
		{"another host", "https://generativelanguage.googleapis.com",
			"https://uploads.example.com/upload/v1beta/files?upload_id=4",
			"https://uploads.example.com/upload/v1beta/files?upload_id=4"},
		{"another scheme", "https://generativelanguage.googleapis.com",
			"http://generativelanguage.googleapis.com/upload/v1beta/files?upload_id=5",
			"http://generativelanguage.googleapis.com/upload/v1beta/files?upload_id=5"},
		{"another port", "https://generativelanguage.googleapis.com",
			"https://generativelanguage.googleapis.com:8443/upload/v1beta/files?upload_id=6",
			"https://generativelanguage.googleapis.com:8443/upload/v1beta/files?upload_id=6"},
		{"dot segments", "https://generativelanguage.googleapis.com",
			"https://generativelanguage.googleapis.com/upload/../../anthropic/v1/messages?upload_id=8",
			"https://generativelanguage.googleapis.com/upload/../../anthropic/v1/messages?upload_id=8"},
		{"encoded dot segments", "https://generativelanguage.googleapis.com",
			"https://generativelanguage.googleapis.com/upload/%2e%2e/../anthropic/v1/messages?upload_id=9",
			"https://generativelanguage.googleapis.com/upload/%2e%2e/../anthropic/v1/messages?upload_id=9"},
		{"encoded slash", "https://generativelanguage.googleapis.com",
			"https://generativelanguage.googleapis.com/upload/v1beta%2F..%2Ffiles?upload_id=10",
			"https://generativelanguage.googleapis.com/upload/v1beta%2F..%2Ffiles?upload_id=10"},
		{"fragment", "https://generativelanguage.googleapis.com",
			"https://generativelanguage.googleapis.com/upload/v1beta/files?upload_id=11#x",
			"https://generativelanguage.googleapis.com/upload/v1beta/files?upload_id=11#x"},
		{"outside the upstream's path", "http://gateway.internal:9000/gemini",
			"http://gateway.internal:9000/other/upload/v1beta/files?upload_id=7",
			"http://gateway.internal:9000/other/upload/v1beta/files?upload_id=7"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			up, err := url.Parse(c.upstream)
			if err != nil {
				t.Fatal(err)
			}
			h := http.Header{}
			h.Set("X-Goog-Upload-URL", c.header)
			h.Set("X-Goog-Upload-Control-URL", c.header)
			rebaseUploadURLs(h, up, base)
			for _, name := range []string{"X-Goog-Upload-URL", "X-Goog-Upload-Control-URL"} {
				if got := h.Get(name); got != c.want {
					t.Errorf("%s = %q, want %q", name, got, c.want)
				}
			}
		})
	}
}

func TestRouteURL(t *testing.T) {
	plain := httptest.NewRequest(http.MethodPost, "http://proxy.internal:8080/google/upload/v1beta/files", nil)
	if got, want := routeURL(plain, "google"), "http://proxy.internal:8080/google"; got != want {
		t.Errorf("plain HTTP: %q, want %q", got, want)
	}

	secure := plain.Clone(plain.Context())
	secure.TLS = &tls.ConnectionState{}
	if got, want := routeURL(secure, "google"), "https://proxy.internal:8080/google"; got != want {
		t.Errorf("TLS: %q, want %q", got, want)
	}

	terminated := plain.Clone(plain.Context())
	terminated.Header.Set("X-Forwarded-Proto", "https")
	if got, want := routeURL(terminated, "google"), "https://proxy.internal:8080/google"; got != want {
		t.Errorf("behind a TLS terminator: %q, want %q", got, want)
	}

	// Through the forward proxy the client reaches the upstream's own host
	// through this proxy again, so its URLs stay as they are.
	tunnelled := plain.WithContext(context.WithValue(plain.Context(), tunnelKey{}, &tunnel{}))
	if got := routeURL(tunnelled, "google"); got != "" {
		t.Errorf("intercepted: %q, want none", got)
	}

	ipv6 := plain.Clone(plain.Context())
	ipv6.Host = "[::1]:8080"
	if got, want := routeURL(ipv6, "google"), "http://[::1]:8080/google"; got != want {
		t.Errorf("IPv6 Host: %q, want %q", got, want)
	}

	// A Host that is not a plain host and port would change the URL's path,
	// query or user.
	for _, host := range []string{"", "proxy/x?", "proxy#", "user@proxy", "proxy:port", "proxy\\x", "pro%78y", "proxy x"} {
		bad := plain.Clone(plain.Context())
		bad.Host = host
		if got := routeURL(bad, "google"); got != "" {
			t.Errorf("Host %q: %q, want none", host, got)
		}
	}
}

func TestIsBatchObject(t *testing.T) {
	cases := []struct {
		method, rest string
		want         bool
	}{
		{http.MethodPost, "v1/messages/batches", true},
		{http.MethodGet, "v1/messages/batches", true},
		{http.MethodGet, "v1/messages/batches/msgbatch_1", true},
		{http.MethodPost, "v1/messages/batches/msgbatch_1/cancel", true},
		{http.MethodGet, "v1/messages/batches/msgbatch_1/results", false},
		{http.MethodDelete, "v1/messages/batches/msgbatch_1", false},
		{http.MethodGet, "v1/messages/batchesx", false},
		{http.MethodGet, "v1/messages/batches/", false},
		{http.MethodPost, "v1/messages", false},
	}
	for _, c := range cases {
		if got := isBatchObject(c.method, c.rest); got != c.want {
			t.Errorf("isBatchObject(%s, %q) = %v, want %v", c.method, c.rest, got, c.want)
		}
	}
}

// rebaseBatchBody runs rebaseBatchURLs on resp, as for a request to the
// proxy's /anthropic/ route at proxy.internal:8080, and returns the body
// the client would get.
func rebaseBatchBody(t *testing.T, resp *http.Response) string {
	t.Helper()
	up, err := url.Parse("https://api.anthropic.com")
	if err != nil {
		t.Fatal(err)
	}
	x := &exchange{up: &upstream{base: up}, rebaseBase: "http://proxy.internal:8080/anthropic", cancel: func(error) {}}
	rebaseBatchURLs(resp, x)
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// batchResponse runs rebaseBatchURLs on a response of known length with
// body and returns the body the client would get.
func batchResponse(t *testing.T, contentType, encoding, body string) string {
	t.Helper()
	resp := &http.Response{
		Header:        http.Header{"Content-Type": {contentType}, "Content-Length": {strconv.Itoa(len(body))}},
		Body:          io.NopCloser(strings.NewReader(body)),
		ContentLength: int64(len(body)),
	}
	if encoding != "" {
		resp.Header.Set("Content-Encoding", encoding)
	}
	out := rebaseBatchBody(t, resp)
	if resp.ContentLength != int64(len(out)) || resp.Header.Get("Content-Length") != strconv.Itoa(len(out)) {
		t.Errorf("Content-Length %d and %q for a body of %d bytes", resp.ContentLength, resp.Header.Get("Content-Length"), len(out))
	}
	return out
}

func TestRebaseBatchURLs(t *testing.T) {
	const results = "https://api.anthropic.com/v1/messages/batches/msgbatch_1/results"
	const rebased = "http://proxy.internal:8080/anthropic/v1/messages/batches/msgbatch_1/results"
	cases := []struct {
		name, contentType, encoding, body, want string
	}{
		{"one batch", "application/json",
			"", `{"id":"msgbatch_1", "results_url" : "` + results + `","note":"` + results + `"}`,
			`{"id":"msgbatch_1", "results_url" : "` + rebased + `","note":"` + results + `"}`},
		{"escaped slashes", "application/json; charset=utf-8",
			"", `{"results_url":"https:\/\/api.anthropic.com\/v1\/messages\/batches\/msgbatch_1\/results"}`,
			`{"results_url":"` + rebased + `"}`},
		{"list", "application/json", "",
			`{"data":[{"id":"a","results_url":null},{"id":"b","results_url":"` + results + `"},` +
				`{"id":"c","results_url":"https://elsewhere.example/v1/x"},{"id":"d"},` +
				`{"id":"e","results_url":"https://api.anthropic.com/v1/../../openai/v1/files"},{"id":"f","results_url":"` + results + `"}],"has_more":false}`,
			`{"data":[{"id":"a","results_url":null},{"id":"b","results_url":"` + rebased + `"},` +
				`{"id":"c","results_url":"https://elsewhere.example/v1/x"},{"id":"d"},` +
				`{"id":"e","results_url":"https://api.anthropic.com/v1/../../openai/v1/files"},{"id":"f","results_url":"` + rebased + `"}],"has_more":false}`},
		{"query kept unescaped", "application/json", "",
			`{"results_url":"` + results + `?a=1&b=2"}`,
			`{"results_url":"` + rebased + `?a=1&b=2"}`},
		{"not JSON", "text/plain", "", `{"results_url":"` + results + `"}`, `{"results_url":"` + results + `"}`},
		{"encoded", "application/json", "gzip", `{"results_url":"` + results + `"}`, `{"results_url":"` + results + `"}`},
		{"invalid JSON", "application/json", "", `{"results_url":"` + results, `{"results_url":"` + results},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := batchResponse(t, c.contentType, c.encoding, c.body); got != c.want {
				t.Errorf("body\n%s\nwant\n%s", got, c.want)
			}
		})
	}

	t.Run("over the limit", func(t *testing.T) {
		body := `{"results_url":"` + results + `","pad":"` + strings.Repeat("x", maxBatchBody) + `"}`
		if got := batchResponse(t, "application/json", "", body); got != body {
			t.Errorf("a body over %d bytes changed", maxBatchBody)
		}
	})

	t.Run("over the limit, length unknown", func(t *testing.T) {
		body := `{"results_url":"` + results + `","pad":"` + strings.Repeat("x", maxBatchBody) + `"}`
		resp := &http.Response{
			Header:        http.Header{"Content-Type": {"application/json"}},
			Body:          io.NopCloser(strings.NewReader(body)),
			ContentLength: -1,
		}
		out := rebaseBatchBody(t, resp)
		if out != body {
			t.Errorf("a body over %d bytes changed: %d bytes came out of %d", maxBatchBody, len(out), len(body))
		}
		if resp.ContentLength != -1 || resp.Header.Get("Content-Length") != "" {
			t.Errorf("length set to %d, %q for a body passed through", resp.ContentLength, resp.Header.Get("Content-Length"))
		}
	})
}

func TestRebaseBatchURLsKeepsTrailers(t *testing.T) {
	body := `{"results_url":"https://api.anthropic.com/v1/messages/batches/b/results"}`
	resp := &http.Response{
		Header:        http.Header{"Content-Type": {"application/json"}},
		Trailer:       http.Header{"X-Check": nil},
		Body:          io.NopCloser(strings.NewReader(body)),
		ContentLength: -1,
	}
	out := rebaseBatchBody(t, resp)
	if !strings.Contains(out, "http://proxy.internal:8080/anthropic/v1/messages/batches/b/results") {
		t.Errorf("results_url not rebased: %s", out)
	}
	if resp.ContentLength != -1 || resp.Header.Get("Content-Length") != "" {
		t.Errorf("a response with trailers got length %d, %q; want none, so that it is sent chunked", resp.ContentLength, resp.Header.Get("Content-Length"))
	}
}
