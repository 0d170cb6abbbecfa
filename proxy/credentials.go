package proxy

import (
	"errors"
	"net/http"
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
