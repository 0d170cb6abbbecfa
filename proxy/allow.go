package proxy

import (
	"fmt"
	"mime"
	"net/http"
	"net/url"
	"strings"

	"github.com/byokproxy/byokproxy/provider"
)

// sharedEndpoint reports whether method and path (below the provider prefix,
// without a leading slash) may use the shared key, and returns the model the
// path names (Google puts it there). Everything else on the shared key
// (files, batches, fine-tuning, stored responses, audio, images, Realtime)
// could reach what another mailbox created under the same platform key, so
// only stateless generation and model listing pass.
func sharedEndpoint(prov, method, path string) (allowed bool, pathModel string) {
	switch prov {
	case provider.OpenAI:
		rest, ok := strings.CutPrefix(path, "v1/")
		if !ok {
			return false, ""
		}
		if method == http.MethodPost {
			switch rest {
			case "chat/completions", "completions", "responses", "embeddings", "moderations":
				return true, ""
			}
			return false, ""
		}
		return method == http.MethodGet && modelListing(rest), ""
	case provider.Anthropic:
		rest, ok := strings.CutPrefix(path, "v1/")
		if !ok {
			return false, ""
		}
		if method == http.MethodPost {
			return rest == "messages" || rest == "messages/count_tokens", ""
		}
		return method == http.MethodGet && modelListing(rest), ""
	case provider.Google:
		rest, ok := strings.CutPrefix(path, "v1beta/")
		if !ok {
			rest, ok = strings.CutPrefix(path, "v1/")
		}
		if !ok {
			return false, ""
		}
		if method == http.MethodGet {
			// A colon after a Google model id names a method, such as
			// models/{m}:generateContent, never another model.
			return modelListing(rest) && !strings.Contains(rest, ":"), ""
		}
		if method != http.MethodPost {
			return false, ""
		}
		name, ok := strings.CutPrefix(rest, "models/")
		if !ok {
			return false, ""
		}
		model, verb, ok := strings.Cut(name, ":")
		if !ok || model == "" || strings.Contains(model, "/") {
			return false, ""
		}
		switch verb {
		case "generateContent", "streamGenerateContent", "countTokens", "embedContent", "batchEmbedContents":
			return true, model
		}
		return false, ""
	}
	return false, ""
}

// modelListing matches "models" and "models/{id}" with a single-segment id.
// An OpenAI fine-tuned model's id contains colons (ft:gpt-4o-mini:org::id).
func modelListing(rest string) bool {
	if rest == "models" {
		return true
	}
	id, ok := strings.CutPrefix(rest, "models/")
	return ok && id != "" && !strings.Contains(id, "/")
}

// misplacedVersion returns the base URL, below the proxy's address, for a
// client whose path names no API version or begins with it twice, as a
// wrong base URL gives. It returns "" for any other path. A version later
// in the path, as in Google's upload/v1beta/files, counts.
func misplacedVersion(prov, path string) string {
	versions := []string{"v1/"}
	base := "/" + prov
	switch prov {
	case provider.OpenAI:
		base = "/openai/v1"
	case provider.Google:
		versions = append(versions, "v1beta/")
	}
	for _, v := range versions {
		if rest, ok := strings.CutPrefix(path, v); ok {
			for _, again := range versions {
				if strings.HasPrefix(rest, again) {
					return base
				}
			}
			return ""
		}
	}
	for _, v := range versions {
		if strings.Contains(path, "/"+v) {
			return ""
		}
	}
	return base
}

// googleQueryParams are the query parameters, besides the credentials that
// the proxy strips, that a shared Gemini generation request may carry: the
// response format (which googleResponseFilter checks), pretty printing and
// the error format. Names compare in lower case and without the "$" prefix.
var googleQueryParams = map[string]bool{"alt": true, "prettyprint": true, ".xgafv": true}

// googleRequestFormat returns why the proxy cannot read a shared Gemini
// generation request as Google would, or "" when it can. Google's front end
// also decodes compressed bodies, reads protobuf and form bodies by their
// Content-Type, and can take request fields from the query. The body scan
// reads JSON only, so on the shared key the fields must come as plain JSON
// in the body.
func googleRequestFormat(r *http.Request) string {
	if msg := encodedBody(r); msg != "" {
		return msg
	}
	if types := r.Header.Values("Content-Type"); len(types) > 1 {
		return "the request has more than one Content-Type header; send one, application/json"
	} else if len(types) == 1 {
		media, params, err := mime.ParseMediaType(types[0])
		// The scan reads UTF-8. In another charset the same bytes could
		// spell other members.
		charset, hasCharset := params["charset"]
		if err != nil || media != "application/json" || len(params) > 1 || len(params) == 1 && (!hasCharset || !strings.EqualFold(charset, "utf-8")) {
			return fmt.Sprintf("the shared key reads Gemini request bodies as UTF-8 JSON only, and this one is sent as %q: send Content-Type: application/json", types[0])
		}
	}
	// httputil.ReverseProxy forwards what url.ParseQuery reads and drops
	// the parts it cannot read, such as one holding a semicolon.
	params, _ := url.ParseQuery(r.URL.RawQuery)
	for name := range params {
		normal := strings.TrimPrefix(strings.ToLower(strings.TrimSpace(name)), "$")
		if !googleQueryParams[normal] && !credentialParams[normal] && normal != "userproject" {
			return fmt.Sprintf("the query parameter %q is not allowed on the shared key: send request fields in the JSON body", name)
		}
	}
	return ""
}

// encodedBody returns why the shared key rejects a request body sent with
// a Content-Encoding, or "" for a plain one. The checks read the bytes as
// they came, and a provider that decodes them would read other ones. Raw
// deflate and brotli have no header that keeps them from also being JSON.
func encodedBody(r *http.Request) string {
	for _, coding := range r.Header.Values("Content-Encoding") {
		if !strings.EqualFold(strings.TrimSpace(coding), "identity") {
			return fmt.Sprintf("the shared key needs the request body as plain JSON, and this one is sent with Content-Encoding %q: send it uncompressed", coding)
		}
	}
	return ""
}

// googlePathModel returns the model named in a Google path such as
// "v1beta/models/gemini-2.5-flash:generateContent", on any key source.
func googlePathModel(path string) string {
	i := strings.Index(path, "models/")
	if i < 0 {
		return ""
	}
	name := path[i+len("models/"):]
	model, _, _ := strings.Cut(name, ":")
	if strings.Contains(model, "/") {
		return ""
	}
	return model
}

// googleResponseFilter returns the system parameter or header of a Google
// request that changes what the response contains, or "". Google's APIs
// take fields, $fields and X-Goog-FieldMask to leave fields out, alt=proto
// or media for another encoding and callback for JSONP (listed at
// cloud.google.com/apis/docs/system-parameters), and a shared request whose
// response lost its usageMetadata would be charged nothing. Names are
// matched as Google reads them: with or without "$", in any letter case.
func googleResponseFilter(r *http.Request) string {
	if len(r.Header.Values("X-Goog-FieldMask")) > 0 {
		return "the X-Goog-FieldMask header"
	}
	for name, value := range queryParams(r.URL.RawQuery) {
		switch strings.ToLower(strings.TrimPrefix(name, "$")) {
		case "fields", "callback":
			return fmt.Sprintf("the query parameter %q", name)
		case "alt":
			// Google's REST clients ask for json;enum-encoding=int, which
			// writes enum values as numbers and leaves the usage as it is.
			format, options, _ := strings.Cut(strings.ToLower(strings.TrimSpace(value)), ";")
			if format != "json" && format != "sse" || options != "" && strings.TrimSpace(options) != "enum-encoding=int" {
				return fmt.Sprintf("the query parameter %q with the value %q", name, value)
			}
		}
	}
	return ""
}
