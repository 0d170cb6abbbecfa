package proxy

import (
	"errors"
	"net/http"
	"net/url"
	"strings"
)

// credentialHeaders are removed from every request before it is forwarded,
// so the upstream receives only the key the proxy injects.
var credentialHeaders = []string{
	"Authorization",
	"X-Api-Key",
	"X-Goog-Api-Key",
	"Api-Key",
	"Proxy-Authorization",
	"Cookie",
	"X-Mailbox-Id",
}

// credentialParams are the query parameter names, compared in lower case,
// that carry a credential: the API key that Google's SDKs send as "key", an
// OAuth access token, and the names other clients use for API keys.
var credentialParams = map[string]bool{
	"key": true, "api_key": true, "apikey": true, "api-key": true,
	"access_token": true, "oauth_token": true, "bearer_token": true,
}

// stripQueryCredentials returns rawQuery without the parameters named in
// credentialParams, whatever their case or percent-encoding, and with
// Google's "$" prefix too ("$key" is "key"). On the shared key it also drops
// userProject, Google's billing project, as X-Goog-User-Project is dropped.
// A part that names one after a semicolon goes too, for servers that split
// on semicolons. The other parts keep their order and encoding.
func stripQueryCredentials(rawQuery string, shared bool) string {
	if rawQuery == "" {
		return ""
	}
	kept := make([]string, 0, 4)
	for part := range strings.SplitSeq(rawQuery, "&") {
		if !namesCredential(part, shared) {
			kept = append(kept, part)
		}
	}
	return strings.Join(kept, "&")
}

// withoutQueryParam returns rawQuery without the parameters called name,
// as url.ParseQuery reads their names. The rest keep their order and
// encoding, which url.Values.Encode would change.
func withoutQueryParam(rawQuery, name string) string {
	others := make([]string, 0, 4)
	for part := range strings.SplitSeq(rawQuery, "&") {
		key, _, _ := strings.Cut(part, "=")
		if unescaped, err := url.QueryUnescape(key); err == nil {
			key = unescaped
		}
		if key != name {
			others = append(others, part)
		}
	}
	return strings.Join(others, "&")
}

func namesCredential(part string, shared bool) bool {
	for param := range strings.SplitSeq(part, ";") {
		name, _, _ := strings.Cut(param, "=")
		if unescaped, err := url.QueryUnescape(name); err == nil {
			name = unescaped
		}
		name = strings.TrimPrefix(strings.ToLower(strings.TrimSpace(name)), "$")
		if credentialParams[name] || shared && name == "userproject" {
			return true
		}
	}
	return false
}

var errConflictingTokens = errors.New("the request carries more than one different credential; send the mailbox token in one place")

// mailboxToken returns the token the client put where its SDK puts an API
// key: Authorization: Bearer, x-api-key, x-goog-api-key or ?key=. The same
// token in several places is fine. Two different values are rejected, so a
// request cannot carry one mailbox's token past a check that reads another
// slot.
func mailboxToken(r *http.Request) (string, error) {
	var found string
	add := func(v string) error {
		v = strings.TrimSpace(v)
		if v == "" {
			return nil
		}
		if found != "" && found != v {
			return errConflictingTokens
		}
		found = v
		return nil
	}
	for _, v := range r.Header.Values("Authorization") {
		scheme, token, ok := strings.Cut(v, " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") {
			return "", errors.New("the Authorization header must be \"Bearer TOKEN\"")
		}
		if err := add(token); err != nil {
			return "", err
		}
	}
	for _, name := range []string{"X-Api-Key", "X-Goog-Api-Key", "Api-Key"} {
		for _, v := range r.Header.Values(name) {
			if err := add(v); err != nil {
				return "", err
			}
		}
	}
	for _, v := range r.URL.Query()["key"] {
		if err := add(v); err != nil {
			return "", err
		}
	}
	return found, nil
}
