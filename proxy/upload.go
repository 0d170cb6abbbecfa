package proxy

import (
	"net/http"
	"net/url"
	"strings"
)

// uploadURLHeaders are the response headers in which Google's resumable
// upload protocol names the URL of an upload session: the client sends the
// file's bytes, and any status query, there rather than to the URL it
// started with.
var uploadURLHeaders = []string{"X-Goog-Upload-Url", "X-Goog-Upload-Control-Url"}

// uploadBase returns the URL of the route prefix by which the client
// reached this proxy, such as http://127.0.0.1:8080/google, or "" when
// upload URLs in the response need no change. A client that came through
// the forward proxy reaches the upstream's own host through it again, and
// one whose Host is unknown cannot be given a URL.
func uploadBase(r *http.Request, route string) string {
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

// rebaseUploadURLs rewrites the upload session URLs in an upstream response
// to point at the proxy's route prefix. Left as they are, they would send
// the client, with its mailbox token in the key's place, straight to the
// provider, which accepts neither. URLs on any other host are left alone:
// the proxy forwards to its configured upstream only.
func rebaseUploadURLs(h http.Header, upstream *url.URL, base string) {
	for _, name := range uploadURLHeaders {
		v := h.Get(name)
		if v == "" {
			continue
		}
		u, err := url.Parse(v)
		if err != nil || !sameOrigin(u, upstream) || u.Fragment != "" || unsafePath(u) {
			// A path with dot segments could leave the route prefix once
			// the client resolves them, and reach another provider's route.
			continue
		}
		prefix := strings.TrimSuffix(upstream.Path, "/") + "/"
		rest, ok := strings.CutPrefix(u.EscapedPath(), prefix)
		if !ok {
			continue
		}
		rebased := base + "/" + rest
		if u.RawQuery != "" {
			rebased += "?" + u.RawQuery
		}
		h.Set(name, rebased)
	}
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
