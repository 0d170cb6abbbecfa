package proxy_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
)

// A server responds to TRACE by echoing the request with the injected key,
// so the proxy forwards neither it nor methods the provider APIs do not use.
func TestUnusedMethodsNotForwarded(t *testing.T) {
	s := teststack.Start(t)
	s.UseBYOK(t, "methods", provider.OpenAI)
	token := s.Token(t, "methods")
	up := s.Upstreams[provider.OpenAI]
	up.Reset()
	for _, method := range []string{http.MethodTrace, "BREW", "PROPFIND"} {
		resp, body := s.Do(t, method, "/openai/v1/models", token, "")
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%s: status %d, want 400", method, resp.StatusCode)
		}
		if !strings.Contains(string(body), "is not forwarded") {
			t.Errorf("%s: body %s does not say the method is not forwarded", method, body)
		}
	}
	if n := len(up.Requests()); n != 0 {
		t.Errorf("%d requests reached the upstream, want 0", n)
	}
	if resp, body := s.Do(t, http.MethodGet, "/openai/v1/models", token, ""); resp.StatusCode != http.StatusOK {
		t.Errorf("GET: status %d %s, want 200", resp.StatusCode, body)
	}
}

// Google's response filters could strip usageMetadata from a shared
// response, which would then be charged nothing, so the shared key rejects
// them. The mailbox's own key passes them on.
func TestSharedGoogleRejectsResponseFilters(t *testing.T) {
	s := teststack.Start(t)
	up := s.Upstreams[provider.Google]
	const generate = "/google/v1beta/models/gemini-2.5-flash:generateContent"
	body := `{"contents":[{"parts":[{"text":"hello"}]}]}`

	shared := s.Token(t, "filters-shared")
	up.Reset()
	for _, c := range []struct{ query, header string }{
		{"?fields=candidates", ""},
		{"?%24fields=candidates", ""},
		{"?alt=proto", ""},
		{"", "X-Goog-FieldMask"},
	} {
		var header []string
		if c.header != "" {
			header = []string{c.header, "candidates"}
		}
		resp, out := s.Do(t, http.MethodPost, generate+c.query, shared, body, header...)
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("shared %q %q: status %d, want 403", c.query, c.header, resp.StatusCode)
		}
		if !strings.Contains(string(out), "PERMISSION_DENIED") {
			t.Errorf("shared %q %q: body %s is not Google's PERMISSION_DENIED", c.query, c.header, out)
		}
	}
	if n := len(up.Requests()); n != 0 {
		t.Errorf("%d shared requests with a filter reached the upstream, want 0", n)
	}
	if resp, out := s.Do(t, http.MethodPost, generate+"?$alt=json;enum-encoding=int", shared, body); resp.StatusCode != http.StatusOK {
		t.Errorf("shared with $alt=json: status %d %s, want 200", resp.StatusCode, out)
	}

	s.UseBYOK(t, "filters-own", provider.Google)
	own := s.Token(t, "filters-own")
	if resp, out := s.Do(t, http.MethodPost, generate+"?fields=candidates", own, body); resp.StatusCode != http.StatusOK {
		t.Errorf("own key with fields: status %d %s, want 200", resp.StatusCode, out)
	}
}

// The health routes serve GET and HEAD only, because a 200 would hide a
// probe configured with another method.
func TestHealthRoutesMethods(t *testing.T) {
	s := teststack.Start(t)
	for _, path := range []string{"/healthz", "/readyz"} {
		for _, c := range []struct {
			method string
			want   int
		}{
			{http.MethodGet, http.StatusOK},
			{http.MethodHead, http.StatusOK},
			{http.MethodPost, http.StatusMethodNotAllowed},
			{http.MethodDelete, http.StatusMethodNotAllowed},
		} {
			resp, _ := s.Do(t, c.method, path, "", "")
			if resp.StatusCode != c.want {
				t.Errorf("%s %s: status %d, want %d", c.method, path, resp.StatusCode, c.want)
			}
			if c.want == http.StatusMethodNotAllowed && resp.Header.Get("Allow") != "GET, HEAD" {
				t.Errorf("%s %s: Allow %q, want \"GET, HEAD\"", c.method, path, resp.Header.Get("Allow"))
			}
		}
	}
}

// A mailbox cannot create files or vector stores on the shared key, so one
// that a shared request names belongs to the platform's account and is
// rejected. The mailbox's own key passes the same requests on.
func TestSharedRejectsStoredObjects(t *testing.T) {
	s := teststack.Start(t)
	version := []string{"Anthropic-Version", "2023-06-01"}
	cases := []struct {
		name, prov, path, body string
		header                 []string
	}{
		{"openai chat file", provider.OpenAI, "/openai/v1/chat/completions",
			`{"model":"gpt-4o-mini","messages":[{"role":"user","content":[{"type":"text","text":"sum up"},{"type":"file","file":{"file_id":"file-abc"}}]}]}`, nil},
		{"openai responses vector store", provider.OpenAI, "/openai/v1/responses",
			`{"model":"gpt-4o-mini","input":"find it","tools":[{"type":"file_search","vector_store_ids":["vs_abc"]}]}`, nil},
		{"anthropic document file", provider.Anthropic, "/anthropic/v1/messages",
			`{"model":"claude-haiku-4-5","max_tokens":5,"messages":[{"role":"user","content":[{"type":"document","source":{"type":"file","file_id":"file_011"}}]}]}`, version},
		{"google file", provider.Google, "/google/v1beta/models/gemini-2.5-flash:generateContent",
			`{"contents":[{"role":"user","parts":[{"text":"sum up"},{"fileData":{"mimeType":"application/pdf","fileUri":"https://generativelanguage.googleapis.com/v1beta/files/abc"}}]}]}`, nil},
		{"google cached content stream", provider.Google, "/google/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
			`{"cachedContent":"cachedContents/xyz","contents":[{"role":"user","parts":[{"text":"go on"}]}]}`, nil},
		{"google file search", provider.Google, "/google/v1beta/models/gemini-2.5-flash:generateContent",
			`{"contents":[{"parts":[{"text":"find it"}]}],"tools":[{"file_search":{"file_search_store_names":["fileSearchStores/s1"]}}]}`, nil},
		{"google count tokens", provider.Google, "/google/v1/models/gemini-2.5-flash:countTokens",
			`{"generateContentRequest":{"model":"models/gemini-2.5-flash","cachedContent":"cachedContents/xyz","contents":[{"parts":[{"text":"hi"}]}]}}`, nil},
		{"openai chat custom voice", provider.OpenAI, "/openai/v1/chat/completions",
			`{"model":"gpt-4o-mini","modalities":["text","audio"],"audio":{"voice":{"id":"voice_platform"},"format":"wav"},"messages":[{"role":"user","content":"hi"}]}`, nil},
		{"google embedding of a bucket object", provider.Google, "/google/v1beta/models/gemini-embedding-001:embedContent",
			`{"content":{"parts":[{"file_data":{"file_uri":"gs://platform-bucket/a.pdf","mime_type":"application/pdf"}}]}}`, nil},
	}
	shared := s.Token(t, "stored-shared")
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			up := s.Upstreams[c.prov]
			up.Reset()
			resp, body := s.Do(t, http.MethodPost, c.path, shared, c.body, c.header...)
			if resp.StatusCode != http.StatusForbidden {
				t.Errorf("shared: status %d %s, want 403", resp.StatusCode, body)
			}
			if !strings.Contains(string(body), "belong to the platform") {
				t.Errorf("shared: body %s does not say why", body)
			}
			if n := len(up.Requests()); n != 0 {
				t.Errorf("shared: %d requests reached the upstream, want 0", n)
			}

			own := "stored-own-" + c.prov
			s.UseBYOK(t, own, c.prov)
			if resp, body := s.Do(t, http.MethodPost, c.path, s.Token(t, own), c.body, c.header...); resp.StatusCode != http.StatusOK {
				t.Errorf("own key: status %d %s, want 200", resp.StatusCode, body)
			}
		})
	}
}

// A shared Google request may name a web resource, which Google fetches as
// anyone would, and its body reaches the upstream byte for byte after the
// proxy read it.
func TestSharedGoogleForwardsWebFiles(t *testing.T) {
	s := teststack.Start(t)
	token := s.Token(t, "google-web-file")
	up := s.Upstreams[provider.Google]
	const body = `{"contents":[{"role":"user","parts":[{"text":"sum up"},` +
		`{"fileData":{"mimeType":"video/mp4","fileUri":"https://www.youtube.com/watch?v=9hE5-98ZeCg"}}]}],` +
		` "tools":[{"functionDeclarations":[{"name":"open","parameters":{"type":"OBJECT","properties":{"fileUri":{"type":"STRING"}}}}]}]}`
	for _, path := range []string{
		"/google/v1beta/models/gemini-2.5-flash:generateContent",
		"/google/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
	} {
		up.Reset()
		resp, got := s.Do(t, http.MethodPost, path, token, body)
		if resp.StatusCode != http.StatusOK {
			t.Errorf("%s: status %d %s, want 200", path, resp.StatusCode, got)
		}
		sent := up.Requests()
		if len(sent) != 1 {
			t.Fatalf("%s: %d upstream requests, want 1", path, len(sent))
		}
		if string(sent[0].Body) != body {
			t.Errorf("%s: the upstream got body %q, want the request's", path, sent[0].Body)
		}
	}
}

// A shared Gemini request must carry its fields as plain JSON in the body,
// the one form the body scan reads. Google's front end would also decode a
// compressed body, read protobuf or form bodies by their Content-Type, and
// may take fields from the query, where the scan would not see them.
func TestSharedGoogleRequestFormat(t *testing.T) {
	s := teststack.Start(t, func(c *config.Config) {
		c.Provider(provider.Google).SharedModels = []string{"gemini-2.5-flash"}
	})
	token := s.Token(t, "google-format")
	up := s.Upstreams[provider.Google]
	const generate = "/google/v1beta/models/gemini-2.5-flash:generateContent"
	const body = `{"contents":[{"parts":[{"text":"hi"}]}]}`
	rejected := []struct {
		name, path, body string
		header           []string
		status           int
	}{
		{"cached content in the query", generate + "?cachedContent=cachedContents/xyz", body, nil, http.StatusBadRequest},
		{"proto name in the query", generate + "?cached_content=cachedContents/xyz", body, nil, http.StatusBadRequest},
		{"encoded name in the query", generate + "?alt=sse&%63achedContent=cachedContents/xyz", body, nil, http.StatusBadRequest},
		{"count tokens query", "/google/v1beta/models/gemini-2.5-flash:countTokens?generateContentRequest.cachedContent=c", body, nil, http.StatusBadRequest},
		{"protobuf", generate, body, []string{"Content-Type", "application/x-protobuf"}, http.StatusBadRequest},
		{"json+protobuf", generate, `["models/gemini-2.5-flash",[[[[null,"hi"]],"user"]],null,null,null,null,null,null,"cachedContents/xyz"]`,
			[]string{"Content-Type", "application/json+protobuf"}, http.StatusBadRequest},
		{"form", generate, `{"contents":[{"parts":[{"text":"&cachedContent=cachedContents/xyz&"}]}]}`,
			[]string{"Content-Type", "application/x-www-form-urlencoded"}, http.StatusBadRequest},
		{"array body", generate, `[{"contents":[]}]`, nil, http.StatusBadRequest},
		{"invalid UTF-8", generate, "{\"cachedContent\xff\":\"cachedContents/xyz\",\"contents\":[]}", nil, http.StatusBadRequest},
		{"utf-7", generate, body, []string{"Content-Type", "application/json; charset=utf-7"}, http.StatusBadRequest},
		{"utf-16", generate, body, []string{"Content-Type", "application/json; charset=utf-16"}, http.StatusBadRequest},
		{"other parameter", generate, body, []string{"Content-Type", "application/json; profile=x"}, http.StatusBadRequest},
		{"brotli", generate, body, []string{"Content-Encoding", "br"}, http.StatusBadRequest},
		{"deflate", generate, body, []string{"Content-Encoding", "deflate"}, http.StatusBadRequest},
		{"count tokens of another model", "/google/v1beta/models/gemini-2.5-flash:countTokens",
			`{"generateContentRequest":{"model":"models/gemini-2.5-pro","contents":[{"parts":[{"text":"hi"}]}]}}`, nil, http.StatusForbidden},
		{"embeddings of a tuned model", "/google/v1beta/models/gemini-2.5-flash:batchEmbedContents",
			`{"requests":[{"model":"tunedModels/platform-tuned","content":{"parts":[{"text":"hi"}]}}]}`, nil, http.StatusForbidden},
	}
	for _, c := range rejected {
		t.Run(c.name, func(t *testing.T) {
			up.Reset()
			resp, got := s.Do(t, http.MethodPost, c.path, token, c.body, c.header...)
			if resp.StatusCode != c.status {
				t.Errorf("status %d %s, want %d", resp.StatusCode, got, c.status)
			}
			if !inShape(provider.Google, got, "", "", googleStatus(c.status)) {
				t.Errorf("error not in Google's shape: %s", got)
			}
			if n := len(up.Requests()); n != 0 {
				t.Errorf("%d requests reached the upstream, want 0", n)
			}
		})
	}

	accepted := []struct {
		name, path, body string
		header           []string
	}{
		{"stream", "/google/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", body, nil},
		{"system parameters", generate + "?$alt=json&prettyPrint=false&$.xgafv=2", body, nil},
		{"key in the query", generate + "?key=" + token, body, nil},
		{"charset", generate, body, []string{"Content-Type", "application/JSON; charset=UTF-8"}},
		{"enum encoding of REST clients", generate + "?%24alt=json%3Benum-encoding%3Dint", body, nil},
		{"identity coding", generate, body, []string{"Content-Encoding", "identity"}},
		{"count tokens of the path model", "/google/v1beta/models/gemini-2.5-flash:countTokens",
			`{"generateContentRequest":{"model":"models/gemini-2.5-flash","contents":[{"parts":[{"text":"hi"}]}]}}`, nil},
		{"part metadata", generate, `{"contents":[{"role":"user","parts":[{"text":"hi","partMetadata":{"fileUri":"files/mine"}}]}]}`, nil},
	}
	for _, c := range accepted {
		t.Run(c.name, func(t *testing.T) {
			up.Reset()
			resp, got := s.Do(t, http.MethodPost, c.path, token, c.body, c.header...)
			if resp.StatusCode != http.StatusOK {
				t.Errorf("status %d %s, want 200", resp.StatusCode, got)
			}
			if sent := up.Requests(); len(sent) != 1 || string(sent[0].Body) != c.body {
				t.Errorf("upstream requests %d, want 1 with the request's body", len(sent))
			}
		})
	}
}

// googleStatus returns the status name of Google's error shape for an
// HTTP status.
func googleStatus(code int) string {
	if code == http.StatusForbidden {
		return "PERMISSION_DENIED"
	}
	return "INVALID_ARGUMENT"
}

// Trailers after a chunked body would carry headers past the checks that
// read the header section, such as a field mask or a billing project on
// the shared key, so none reaches the upstream, on either key.
func TestRequestTrailersDropped(t *testing.T) {
	var mu sync.Mutex
	var trailers []http.Header
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		mu.Lock()
		trailers = append(trailers, r.Trailer.Clone())
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"candidates":[],"usageMetadata":{"promptTokenCount":1,"candidatesTokenCount":1,"totalTokenCount":2}}`))
	}))
	defer upstream.Close()
	s := teststack.Start(t, func(c *config.Config) { c.Provider(provider.Google).Upstream = upstream.URL })
	s.UseBYOK(t, "trailers-own", provider.Google)

	for _, mailbox := range []string{"trailers-shared", "trailers-own"} {
		t.Run(mailbox, func(t *testing.T) {
			body, writer := io.Pipe()
			go func() {
				writer.Write([]byte(`{"contents":[{"parts":[{"text":"hi"}]}]}`))
				writer.Close()
			}()
			req, err := http.NewRequest(http.MethodPost, s.ProxyURL+"/google/v1beta/models/gemini-2.5-flash:generateContent", body)
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Authorization", "Bearer "+s.Token(t, mailbox))
			req.Header.Set("Content-Type", "application/json")
			req.Trailer = http.Header{
				"X-Goog-Fieldmask":    {"candidates"},
				"X-Goog-User-Project": {"someone-elses-project"},
				"X-Goog-Api-Key":      {"client-supplied-key"},
				"Content-Type":        {"application/x-protobuf"},
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			out, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d %s, want 200", resp.StatusCode, out)
			}
		})
	}

	mu.Lock()
	defer mu.Unlock()
	if len(trailers) != 2 {
		t.Fatalf("the upstream got %d requests, want 2", len(trailers))
	}
	for _, got := range trailers {
		for name, values := range got {
			t.Errorf("the upstream got the request trailer %s: %s", name, strings.Join(values, ", "))
		}
	}
}

// The image generation tool of the Responses API runs an image model that
// the model allowlist does not check. An image generation call passed back
// by id has its image read from the account's storage.
func TestSharedRejectsImageGeneration(t *testing.T) {
	s := teststack.Start(t)
	shared := s.Token(t, "image-shared")
	cases := []struct {
		name, body, why string
	}{
		{"tool", `{"model":"gpt-4o-mini","input":"draw a cat","tools":[{"type":"image_generation","model":"gpt-image-1","quality":"high"}]}`,
			"image generation tool"},
		{"tool with a mask file", `{"model":"gpt-4o-mini","input":"edit it","tools":[{"type":"image_generation","input_image_mask":{"file_id":"file-mask"}}]}`,
			"image generation tool"},
		{"call passed back by id", `{"model":"gpt-4o-mini","input":[{"role":"user","content":[{"type":"input_text","text":"make it brighter"}]},{"type":"image_generation_call","id":"ig_1"}]}`,
			"image generation call passed back by id"},
	}
	up := s.Upstreams[provider.OpenAI]
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			up.Reset()
			resp, body := s.Do(t, http.MethodPost, "/openai/v1/responses", shared, c.body)
			if resp.StatusCode != http.StatusForbidden {
				t.Errorf("shared: status %d %s, want 403", resp.StatusCode, body)
			}
			if !strings.Contains(string(body), c.why) {
				t.Errorf("shared: body %s does not name the %s", body, c.why)
			}
			if n := len(up.Requests()); n != 0 {
				t.Errorf("shared: %d requests reached the upstream, want 0", n)
			}
		})
	}
	// A tool object that names its type twice could be read either way.
	up.Reset()
	resp, body := s.Do(t, http.MethodPost, "/openai/v1/responses", shared,
		`{"model":"gpt-4o-mini","input":"hi","tools":[{"type":"function","name":"f","type":"image_generation"}]}`)
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("tool with two types: status %d %s, want 400", resp.StatusCode, body)
	}
	if n := len(up.Requests()); n != 0 {
		t.Errorf("tool with two types: %d requests reached the upstream, want 0", n)
	}
}
