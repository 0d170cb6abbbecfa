// Package provider describes the three model providers that byokproxy fronts:
// their route prefixes, default upstreams, auth headers, key formats and error
// shapes. Differences between providers live here as data, so the request path
// never branches on a provider's name.
package provider

import (
	"bytes"
	"net/http"
	"regexp"
)

// Names of the supported providers, as used in routes, config keys, Redis and
// audit events.
const (
	Anthropic = "anthropic"
	OpenAI    = "openai"
	Google    = "google"
)

// Spec is the fixed description of one provider.
type Spec struct {
	// Name is the route prefix and config name, such as "openai".
	Name string
	// Title is the name people know the provider by.
	Title string
	// DefaultUpstream is the base URL used when providers.NAME.upstream is unset.
	DefaultUpstream string
	// AuthHeader is the header that carries the injected key, and AuthScheme
	// the prefix written before the key in it ("Bearer " or empty).
	AuthHeader string
	AuthScheme string
	// KeyPrefix is the prefix every key of this provider starts with, named in
	// the error returned for a mismatched paste.
	KeyPrefix string
	// keyPattern matches a well-formed key of this provider.
	keyPattern *regexp.Regexp
	// KeyRule describes a well-formed key in words, for error messages.
	KeyRule string
	// ProbeModel is the default model of the one-token key test.
	ProbeModel string
}

var specs = map[string]*Spec{
	Anthropic: {
		Name:            Anthropic,
		Title:           "Anthropic",
		DefaultUpstream: "https://api.anthropic.com",
		AuthHeader:      "X-Api-Key",
		KeyPrefix:       "sk-ant-",
		keyPattern:      regexp.MustCompile(`^sk-ant-[A-Za-z0-9_\-]{8,512}$`),
		KeyRule:         `an Anthropic key is "sk-ant-" followed by 8 to 512 letters, digits, "-" or "_"`,
		ProbeModel:      "claude-haiku-4-5",
	},
	OpenAI: {
		Name:            OpenAI,
		Title:           "OpenAI",
		DefaultUpstream: "https://api.openai.com",
		AuthHeader:      "Authorization",
		AuthScheme:      "Bearer ",
		KeyPrefix:       "sk-",
		keyPattern:      regexp.MustCompile(`^sk-[A-Za-z0-9_\-]{8,512}$`),
		KeyRule:         `an OpenAI key is "sk-" (not "sk-ant-") followed by 8 to 512 letters, digits, "-" or "_"`,
		ProbeModel:      "gpt-4o-mini",
	},
	Google: {
		Name:            Google,
		Title:           "Google AI",
		DefaultUpstream: "https://generativelanguage.googleapis.com",
		AuthHeader:      "X-Goog-Api-Key",
		KeyPrefix:       "AIza",
		keyPattern:      regexp.MustCompile(`^AIza[A-Za-z0-9_\-]{35}$`),
		KeyRule:         `a Google AI key is "AIza" followed by 35 letters, digits, "-" or "_"`,
		ProbeModel:      "gemini-2.5-flash",
	},
}

// Names lists the supported providers in a stable order.
var Names = []string{Anthropic, OpenAI, Google}

// Lookup returns the spec of the named provider, or nil if there is none.
func Lookup(name string) *Spec {
	return specs[name]
}

// ValidKey reports whether key has this provider's format. OpenAI keys start
// with "sk-", so an Anthropic key ("sk-ant-") would pass the OpenAI pattern
// without the explicit exclusion.
// It takes bytes so a caller can check a key without copying it into a
// string it cannot wipe.
func (s *Spec) ValidKey(key []byte) bool {
	if s.Name == OpenAI && bytes.HasPrefix(key, []byte("sk-ant-")) {
		return false
	}
	return s.keyPattern.Match(key)
}

// SetAuth sets the provider's auth header on h to key.
func (s *Spec) SetAuth(h http.Header, key string) {
	h.Set(s.AuthHeader, s.AuthScheme+key)
}

// Guess picks the provider whose error shape an unroutable request should get,
// from headers its SDK always sends. It falls back to OpenAI, whose error shape
// most HTTP clients of model APIs understand.
func Guess(r *http.Request) *Spec {
	switch {
	case r.Header.Get("Anthropic-Version") != "":
		return specs[Anthropic]
	case r.Header.Get("X-Goog-Api-Key") != "" || r.URL.Query().Has("key") ||
		r.Header.Get("X-Goog-Api-Client") != "":
		return specs[Google]
	}
	return specs[OpenAI]
}
