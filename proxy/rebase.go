package proxy

import (
	"bytes"
	"encoding/json"
	"io"
	"mime"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/byokproxy/byokproxy/provider"
	"github.com/tidwall/gjson"
)

// Some responses name a URL on the provider's host that the SDK then
// requests as it is, outside its base URL. Through the proxy that request
// would go straight to the provider with the mailbox token in the key's
// place, which the provider rejects and should never see. The proxy rewrites
// such URLs to its own route prefix, so the follow-up gets the key too:
//   - Google's resumable uploads name the upload session in the
//     X-Goog-Upload-URL header (@google/genai's files.upload);
//   - Anthropic's Message Batches name their results in results_url
//     (@anthropic-ai/sdk's messages.batches.results).
//
// Only URLs on the upstream's own scheme, host and port, below its base
// path and with a path that stays there when a client resolves it, are
// rewritten. Every other URL is left as it is, because the proxy forwards
// to its configured upstream only.

// uploadURLHeaders are the response headers in which Google's resumable
// upload protocol names the URL of an upload session: the client sends the
// file's bytes, and any status query, there rather than to the URL it
// started with.
var uploadURLHeaders = []string{"X-Goog-Upload-Url", "X-Goog-Upload-Control-Url"}

// maxBatchBody is the largest Message Batches response whose results_url
// values the proxy rewrites. A list of the maximum 1,000 batches takes
// about 700 KB. A larger body passes through unchanged.
const maxBatchBody = 4 << 20

// routeURL returns the URL of the route prefix by which the client reached
// this proxy, such as http://127.0.0.1:8080/google, or "" when URLs in the
// response need no change. A client that came through the forward proxy
// reaches the upstream's own host through it again, and one whose Host is
// missing or not a plain host and port cannot be given a URL.
func routeURL(r *http.Request, route string) string {
	if !validHost(r.Host) || r.Context().Value(tunnelKey{}) != nil {
		return ""
	}
	scheme := "http"
	// The header only changes the URL that goes back to the same client.
	if r.TLS != nil || strings.EqualFold(r.Header.Get("X-Forwarded-Proto"), "https") {
		scheme = "https"
	}
	return scheme + "://" + r.Host + "/" + route
}

// rebasesURLs reports whether the response to a request on the route may
// name a URL that routeURL's prefix should replace.
func rebasesURLs(prov, method, rest string) bool {
	switch prov {
	case provider.Google:
		return strings.HasPrefix(rest, "upload/")
	case provider.Anthropic:
		return isBatchObject(method, rest)
	}
	return false
}

// isBatchObject reports whether an Anthropic request returns one Message
// Batch or a list of them: create, list, retrieve and cancel.
func isBatchObject(method, rest string) bool {
	tail, ok := strings.CutPrefix(rest, "v1/messages/batches")
	if !ok {
		return false
	}
	parts := strings.Split(strings.TrimPrefix(tail, "/"), "/")
	switch {
	case tail == "":
		return method == http.MethodGet || method == http.MethodPost
	case tail[0] != '/' || parts[0] == "":
		return false
	case len(parts) == 1:
		return method == http.MethodGet
	case len(parts) == 2 && parts[1] == "cancel":
		return method == http.MethodPost
	}
	return false
}

// rebaseURL returns v with the upstream's origin and base path replaced by
// base, or false when v is not a URL below the upstream's base path whose
// path stays there. A path with dot segments could leave the route prefix
// once the client resolves them, and reach another provider's route.
func rebaseURL(v string, upstream *url.URL, base string) (string, bool) {
	u, err := url.Parse(v)
	if err != nil || !sameOrigin(u, upstream) || u.User != nil || u.Fragment != "" || unsafePath(u) {
		return "", false
	}
	prefix := strings.TrimSuffix(upstream.Path, "/") + "/"
	rest, ok := strings.CutPrefix(u.EscapedPath(), prefix)
	if !ok {
		return "", false
	}
	rebased := base + "/" + rest
	if u.RawQuery != "" {
		rebased += "?" + u.RawQuery
	}
	return rebased, true
}

// rebaseUploadURLs rewrites the upload session URLs in an upstream
// response's header.
func rebaseUploadURLs(h http.Header, upstream *url.URL, base string) {
	for _, name := range uploadURLHeaders {
		if rebased, ok := rebaseURL(h.Get(name), upstream, base); ok {
			h.Set(name, rebased)
		}
	}
}

// rebaseBatchURLs rewrites the results_url of each Message Batch in a
// successful JSON response. The body is read whole first, so
// upstream.timeout bounds the whole read, as it bounds the headers. Only
// the URL strings change: the rest of the body keeps its bytes.
func rebaseBatchURLs(resp *http.Response, x *exchange) {
	if mediaType, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); mediaType != "application/json" ||
		resp.Header.Get("Content-Encoding") != "" || resp.ContentLength > maxBatchBody {
		return
	}
	if idle := x.up.idleTimeout; idle > 0 {
		stall := time.AfterFunc(idle, func() { x.cancel(errUpstreamStalled) })
		defer stall.Stop()
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBatchBody+1))
	if err != nil || len(body) > maxBatchBody {
		// What was read goes first, and the rest, or the read's error,
		// follows as it would have.
		resp.Body = struct {
			io.Reader
			io.Closer
		}{io.MultiReader(bytes.NewReader(body), resp.Body), resp.Body}
		return
	}
	resp.Body.Close()

	edits := batchURLEdits(body, x.up.base, x.rebaseBase)
	if len(edits) > 0 {
		body = applyEdits(body, edits)
	}

	resp.Body = io.NopCloser(bytes.NewReader(body))
	if len(resp.Trailer) > 0 {
		// Trailers travel only with chunked framing, which a length rules out.
		resp.Header.Del("Content-Length")
		resp.ContentLength = -1
		return
	}
	resp.Header.Set("Content-Length", strconv.Itoa(len(body)))
	resp.ContentLength = int64(len(body))
}

// batchURLEdits returns the edits that rebase the results_url of a Message
// Batch, or of each batch in a list, in a JSON body.
func batchURLEdits(body []byte, upstream *url.URL, base string) []urlEdit {
	var edits []urlEdit
	for _, path := range []string{"results_url", "data.#.results_url"} {
		result := gjson.GetBytes(body, path)
		values, indexes := []gjson.Result{result}, []int{result.Index}
		if result.IsArray() {
			values, indexes = result.Array(), result.Indexes
		}
		for i, v := range values {
			if v.Type != gjson.String || i >= len(indexes) || indexes[i] <= 0 {
				continue
			}
			rebased, ok := rebaseURL(v.Str, upstream, base)
			if !ok {
				continue
			}
			quoted, err := marshalString(rebased)
			if err != nil {
				continue
			}
			edits = append(edits, urlEdit{start: indexes[i], end: indexes[i] + len(v.Raw), text: quoted})
		}
	}
	return edits
}

// urlEdit is a replacement of body[start:end] by text.
type urlEdit struct {
	start, end int
	text       []byte
}

// applyEdits returns body with each edit applied. Edits must not overlap.
func applyEdits(body []byte, edits []urlEdit) []byte {
	slices.SortFunc(edits, func(a, b urlEdit) int { return a.start - b.start })
	out := make([]byte, 0, len(body)+64*len(edits))
	at := 0
	for _, e := range edits {
		out = append(out, body[at:e.start]...)
		out = append(out, e.text...)
		at = e.end
	}
	return append(out, body[at:]...)
}

// marshalString encodes s as a JSON string without escaping &, < and >.
func marshalString(s string) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(s); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// validHost reports whether host is a host name or IP address with an
// optional port and nothing else, so that a URL built on it keeps the path
// it is given.
func validHost(host string) bool {
	if host == "" || strings.ContainsAny(host, "/?#@\\ %") {
		return false
	}
	u, err := url.Parse("http://" + host)
	return err == nil && u.Host == host && u.Hostname() != ""
}

// sameOrigin reports whether u and upstream have the same scheme, host and
// port. A missing port counts as the scheme's default.
func sameOrigin(u, upstream *url.URL) bool {
	return strings.EqualFold(u.Scheme, upstream.Scheme) &&
		strings.EqualFold(u.Hostname(), upstream.Hostname()) &&
		portOf(u) == portOf(upstream)
}

func portOf(u *url.URL) string {
	if p := u.Port(); p != "" {
		return p
	}
	if strings.EqualFold(u.Scheme, "https") {
		return "443"
	}
	return "80"
}
