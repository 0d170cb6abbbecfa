package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httputil"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/provider"
)

// fuzzUpstreamBase is the configured upstream of every provider in the route
// fuzz target. Its path checks that the provider path is appended below it.
const fuzzUpstreamBase = "https://upstream.invalid:8443/base"

// sharedReference is an independent statement of the shared-key allowlist,
// as regular expressions over method and path below the provider prefix.
// The fuzz target checks sharedEndpoint against it.
var sharedReference = map[string]map[string]*regexp.Regexp{
	provider.OpenAI: {
		http.MethodPost: regexp.MustCompile(`^v1/(chat/completions|completions|responses|embeddings|moderations)$`),
		http.MethodGet:  regexp.MustCompile(`^v1/models(/[^/]+)?$`),
	},
	provider.Anthropic: {
		http.MethodPost: regexp.MustCompile(`^v1/(messages|messages/count_tokens)$`),
		http.MethodGet:  regexp.MustCompile(`^v1/models(/[^/]+)?$`),
	},
	provider.Google: {
		http.MethodPost: regexp.MustCompile(`^v1(beta)?/models/([^/:]+):(generateContent|streamGenerateContent|countTokens|embedContent|batchEmbedContents)$`),
		http.MethodGet:  regexp.MustCompile(`^v1(beta)?/models(/[^/:]+)?$`),
	},
}

// readFuzzRequest parses method, target and one extra header line the way the
// HTTP/1.1 server does. It returns nil for input the server rejects before
// any handler runs.
func readFuzzRequest(method, target, host, header string) *http.Request {
	raw := method + " " + target + " HTTP/1.1\r\nHost: " + host + "\r\n"
	if header != "" {
		raw += header + "\r\n"
	}
	r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw + "\r\n")))
	if err != nil {
		return nil
	}
	return r
}

// FuzzRouteMapping drives the request-target handling of the provider routes
// with arbitrary methods, targets, Host headers and one extra header: route
// split, path safety check, shared-key allowlist and the upstream rewrite. A
// request the handler accepts must go to the configured upstream host, under
// its base path, with no dot segments once the upstream decodes the path, no
// client credential and exactly the injected key.
func FuzzRouteMapping(f *testing.F) {
	seeds := []struct{ method, target, host, header string }{
		{"POST", "/openai/v1/chat/completions", "127.0.0.1:8080", "Authorization: Bearer bp1.token"},
		{"GET", "/openai/v1/models/gpt-4o", "localhost", ""},
		{"POST", "/anthropic/v1/messages", "proxy", "X-Api-Key: tok"},
		{"POST", "/anthropic/v1/messages/count_tokens", "proxy", "Anthropic-Version: 2023-06-01"},
		{"POST", "/google/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=tok", "proxy", ""},
		{"POST", "/google/v1/models/gemini-2.5-flash:generateContent", "proxy", "X-Goog-Api-Key: tok"},
		{"POST", "http://evil.example/openai/v1/chat/completions", "evil.example", ""},
		{"GET", "https://api.openai.com:443/openai/v1/models", "api.openai.com", ""},
		{"CONNECT", "evil.example:443", "evil.example:443", ""},
		{"OPTIONS", "*", "proxy", ""},
		{"GET", "//evil.example/openai/v1/models", "proxy", ""},
		{"POST", "/openai/v1/%2e%2e/files", "proxy", ""},
		{"POST", "/openai/v1%2Ffiles", "proxy", ""},
		{"POST", "/openai/v1/chat/completions/..%2f..%2ffiles", "proxy", ""},
		{"GET", "/openai/v1/models/..", "proxy", ""},
		{"GET", "/openai/v1/models/%252e%252e", "proxy", ""},
		{"GET", "/google/v1beta/models/a%5c..%5cfiles", "proxy", ""},
		{"POST", "/google/v1beta/models/x:y:generateContent", "proxy", ""},
		{"POST", "/openai/v1/responses?key=a&key=b", "proxy", "Cookie: session=1"},
		{"GET", "/openai", "proxy", "X-Forwarded-Host: evil.example"},
		{"GET", "/anthropic/", "proxy", "Forwarded: host=evil.example"},
		{"DELETE", "/openai/v1/models/ft:gpt-4o:org:x", "proxy", "Proxy-Authorization: Basic eDp5"},
	}
	for _, s := range seeds {
		f.Add(s.method, s.target, s.host, s.header, false)
		f.Add(s.method, s.target, s.host, s.header, true)
	}

	const key = "sk-injected-key-0123456789abcdef"
	f.Fuzz(func(t *testing.T, method, target, host, header string, byok bool) {
		r := readFuzzRequest(method, target, host, header)
		if r == nil {
			return
		}
		// These run on every request that reaches the handler, accepted or
		// not, so none of them may panic.
		token, tokenErr := mailboxToken(r)
		name, rest, _ := splitRoute(r.URL.Path)
		unsafe := unsafePath(r.URL)
		_ = headerBytes(r)

		if tokenErr == nil && token != "" && !tokenInRequest(r, token) {
			t.Fatalf("mailboxToken returned %q, which the request does not carry", token)
		}

		spec := provider.Lookup(name)
		if spec == nil || unsafe {
			return
		}
		checkSharedEndpoint(t, spec.Name, r.Method, rest)
		if m := googlePathModel(rest); strings.Contains(m, "/") {
			t.Fatalf("googlePathModel(%q) = %q contains a slash", rest, m)
		}
		for seg := range strings.SplitSeq(rest, "/") {
			if seg == "." || seg == ".." {
				t.Fatalf("accepted path %q has dot segment in %q", r.URL.Path, rest)
			}
		}

		out := rewriteForTest(t, r, spec, rest, byok, key)
		base, _ := url.Parse(fuzzUpstreamBase)
		if out.URL.Scheme != base.Scheme || out.URL.Host != base.Host || out.Host != "" {
			t.Fatalf("target %q: upstream request goes to %s://%s (Host %q), want %s", target, out.URL.Scheme, out.URL.Host, out.Host, fuzzUpstreamBase)
		}
		if want := base.Path + "/" + rest; out.URL.Path != want {
			t.Fatalf("target %q: upstream path %q, want %q", target, out.URL.Path, want)
		}

		// The path as it goes on the wire, decoded once by the upstream, is
		// the path the proxy checked and holds no dot segment.
		wire, err := url.Parse(out.URL.String())
		if err != nil {
			t.Fatalf("target %q: upstream URL %q does not parse: %v", target, out.URL.String(), err)
		}
		if wire.Host != base.Host || wire.Path != out.URL.Path {
			t.Fatalf("target %q: upstream URL %q reads back as host %q path %q", target, out.URL.String(), wire.Host, wire.Path)
		}
		if !strings.HasPrefix(wire.Path, base.Path+"/") {
			t.Fatalf("target %q: upstream path %q leaves the base path %q", target, wire.Path, base.Path)
		}
		for seg := range strings.SplitSeq(wire.Path, "/") {
			if seg == "." || seg == ".." {
				t.Fatalf("target %q: upstream path %q has a dot segment", target, wire.Path)
			}
		}
		if out.URL.Query().Has("key") {
			t.Fatalf("target %q: key query parameter forwarded in %q", target, out.URL.RawQuery)
		}
		checkOnlyInjectedKey(t, spec, out.Header, key)
	})
}

// tokenInRequest reports whether token is one of the values in the slots
// where SDKs put an API key.
func tokenInRequest(r *http.Request, token string) bool {
	var values []string
	for _, v := range r.Header.Values("Authorization") {
		_, tok, _ := strings.Cut(v, " ")
		values = append(values, tok)
	}
	for _, name := range []string{"X-Api-Key", "X-Goog-Api-Key", "Api-Key"} {
		values = append(values, r.Header.Values(name)...)
	}
	values = append(values, r.URL.Query()["key"]...)
	return slices.ContainsFunc(values, func(v string) bool { return strings.TrimSpace(v) == token })
}

// checkSharedEndpoint compares sharedEndpoint with sharedReference.
func checkSharedEndpoint(t *testing.T, prov, method, rest string) {
	t.Helper()
	allowed, model := sharedEndpoint(prov, method, rest)
	var want bool
	var wantModel string
	if re := sharedReference[prov][method]; re != nil {
		m := re.FindStringSubmatch(rest)
		want = m != nil
		if want && prov == provider.Google && method == http.MethodPost {
			wantModel = m[2]
		}
	}
	if allowed != want || model != wantModel {
		t.Fatalf("sharedEndpoint(%s, %s, %q) = %v, %q; want %v, %q", prov, method, rest, allowed, model, want, wantModel)
	}
}

// rewriteForTest runs the handler's rewrite the way httputil.ReverseProxy
// does: on a clone of the incoming request, with the forwarding headers
// already removed.
func rewriteForTest(t *testing.T, r *http.Request, spec *provider.Spec, rest string, byok bool, key string) *http.Request {
	t.Helper()
	base, err := url.Parse(fuzzUpstreamBase)
	if err != nil {
		t.Fatal(err)
	}
	x := &exchange{up: &upstream{spec: spec, base: base}, rest: rest, source: keystore.SourceShared, keyText: key}
	if byok {
		x.source = keystore.SourceBYOK
	}
	ctx := context.WithValue(context.Background(), exchangeKey{}, x)
	in := r.WithContext(ctx)
	out := in.Clone(ctx)
	for _, h := range []string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
		out.Header.Del(h)
	}
	(&Handler{}).rewrite(&httputil.ProxyRequest{In: in, Out: out})
	return out
}

// checkOnlyInjectedKey fails unless the provider's auth header carries key
// and no other credential header is left.
func checkOnlyInjectedKey(t *testing.T, spec *provider.Spec, h http.Header, key string) {
	t.Helper()
	for _, name := range credentialHeaders {
		values := h.Values(name)
		if http.CanonicalHeaderKey(name) == http.CanonicalHeaderKey(spec.AuthHeader) {
			if len(values) != 1 || values[0] != spec.AuthScheme+key {
				t.Fatalf("%s: auth header %s = %q, want exactly the injected key", spec.Name, name, values)
			}
			continue
		}
		if len(values) != 0 {
			t.Fatalf("%s: credential header %s forwarded: %q", spec.Name, name, values)
		}
	}
}

// FuzzRequestBody drives the proxy's reading of JSON request bodies: the
// model, stream flag and stream options it reads, and the rewrite that
// requests stream usage from OpenAI. When the rewrite succeeds, the result is valid
// JSON with include_usage set and every other field unchanged.
func FuzzRequestBody(f *testing.F) {
	f.Add([]byte(`{"model":"gpt-4o-mini","stream":true,"messages":[]}`))
	f.Add([]byte(`{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":1}}`))
	f.Add([]byte(`{"stream_options":null}`))
	f.Add([]byte(`{"stream_options":[1,2]}`))
	f.Add([]byte(`{"model":1,"stream":"yes"}`))
	f.Add([]byte(`{"a":1,"a":2,"stream_options":{"include_usage":true}}`))
	f.Add([]byte(`[]`))
	f.Add([]byte(`{"previous_response_id":"resp_\u0000"}`))

	f.Add([]byte(`{"model":"a","MODEL":"b","Stream":true,"stream_options":{"INCLUDE_USAGE":true}}`))
	f.Add([]byte(`{"mod\u0065l":"a","x":[{"model":"b"},"\"}"],"stream":null} `))
	f.Add([]byte(`{"stream":1e3,"previous_response_id":"r","previous_response_id":"s"}`))

	f.Fuzz(func(t *testing.T, body []byte) {
		info, err := readRequestInfo(body)
		want, wantErr := referenceRequestInfo(body)
		if (err == nil) != (wantErr == nil) || (err != nil && err.Error() != wantErr.Error()) {
			t.Fatalf("readRequestInfo error %v, reference %v\n%q", err, wantErr, body)
		}
		if err == nil {
			if info.Model != want.Model || info.Stream != want.Stream || info.PreviousResponseID != want.PreviousResponseID ||
				!bytes.Equal(info.StreamOptions, want.StreamOptions) || !bytes.Equal(info.Container, want.Container) ||
				!bytes.Equal(info.Tools, want.Tools) || info.Background != want.Background ||
				!bytes.Equal(info.Conversation, want.Conversation) || !bytes.Equal(info.Input, want.Input) {
				t.Fatalf("readRequestInfo %+v, reference %+v\n%q", info, want, body)
			}
			_ = info.includeUsage()
		}
		patched, err := patchIncludeUsage(body)
		if err != nil {
			return
		}
		var before, after map[string]any
		if err := json.Unmarshal(patched, &after); err != nil {
			t.Fatalf("rewritten body is not a JSON object: %v\n%s", err, patched)
		}
		if err := json.Unmarshal(body, &before); err != nil {
			t.Fatalf("rewrite accepted a body that is not a JSON object: %v", err)
		}
		opts, _ := after["stream_options"].(map[string]any)
		if opts["include_usage"] != true {
			t.Fatalf("rewritten body lacks stream_options.include_usage=true: %s", patched)
		}
		if again, err := readRequestInfo(patched); err == nil && !again.includeUsage() {
			t.Fatalf("includeUsage is false on the rewritten body: %s", patched)
		}
		for k, v := range before {
			if k == "stream_options" {
				continue
			}
			if !jsonEqual(v, after[k]) {
				t.Fatalf("field %q changed from %v to %v", k, v, after[k])
			}
		}
		if len(after) != len(before) && !(len(after) == len(before)+1 && before["stream_options"] == nil) {
			t.Fatalf("rewrite changed the set of fields: %d before, %d after", len(before), len(after))
		}
	})
}

// referenceRequestInfo reads the same fields as readRequestInfo with
// encoding/json's tokenizer: exact names, one error per duplicate, and the
// first error in document order.
func referenceRequestInfo(body []byte) (requestInfo, error) {
	var info requestInfo
	if !json.Valid(body) {
		return info, errBodyNotJSON
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if tok, _ := dec.Token(); tok != json.Delim('{') {
		return info, errBodyNotObject
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, _ := dec.Token()
		name := tok.(string)
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return info, err
		}
		field := slices.Index(requestFields, name)
		if field < 0 {
			continue
		}
		if seen[name] {
			return info, &duplicateFieldError{name: name}
		}
		seen[name] = true
		var err error
		switch name {
		case "model":
			err = json.Unmarshal(raw, &info.Model)
		case "stream":
			if json.Unmarshal(raw, &info.Stream) != nil {
				return info, fmt.Errorf("invalid %q in the request body: send true or false", name)
			}
		case "conversation":
			info.Conversation = raw
		case "input":
			info.Input = raw
		case "background":
			if json.Unmarshal(raw, &info.Background) != nil {
				return info, fmt.Errorf("invalid %q in the request body: send true or false", name)
			}
		case "stream_options":
			info.StreamOptions = raw
		case "container":
			info.Container = raw
		case "tools":
			info.Tools = raw
		case "previous_response_id":
			err = json.Unmarshal(raw, &info.PreviousResponseID)
		}
		if err != nil {
			return info, fmt.Errorf("invalid %q in the request body: send a string", name)
		}
	}
	return info, nil
}

func jsonEqual(a, b any) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return string(x) == string(y)
}
