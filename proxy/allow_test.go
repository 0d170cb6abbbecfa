package proxy

import (
	"net/http"
	"testing"

	"github.com/byokproxy/byokproxy/provider"
)

func TestMisplacedVersion(t *testing.T) {
	tests := []struct {
		prov, path, want string
	}{
		{provider.OpenAI, "v1/chat/completions", ""},
		{provider.OpenAI, "v1/files", ""},
		{provider.OpenAI, "chat/completions", "/openai/v1"},
		{provider.OpenAI, "v1/v1/chat/completions", "/openai/v1"},
		{provider.OpenAI, "", "/openai/v1"},
		{provider.Anthropic, "v1/messages", ""},
		{provider.Anthropic, "messages", "/anthropic"},
		{provider.Anthropic, "v1/v1/messages", "/anthropic"},
		{provider.Google, "v1beta/models/g:generateContent", ""},
		{provider.Google, "v1/models", ""},
		{provider.Google, "upload/v1beta/files", ""},
		{provider.Google, "models/g:generateContent", "/google"},
		{provider.Google, "v1beta/v1beta/models", "/google"},
		{provider.Google, "v1beta/v1/models", "/google"},
	}
	for _, tt := range tests {
		if got := misplacedVersion(tt.prov, tt.path); got != tt.want {
			t.Errorf("misplacedVersion(%s, %q) = %q, want %q", tt.prov, tt.path, got, tt.want)
		}
	}
}

func TestSharedEndpointModelIDs(t *testing.T) {
	cases := []struct {
		prov, method, path string
		want               bool
	}{
		{provider.OpenAI, http.MethodGet, "v1/models/gpt-4o-mini", true},
		{provider.OpenAI, http.MethodGet, "v1/models/ft:gpt-4o-mini-2024-07-18:acme::AbC123", true},
		{provider.OpenAI, http.MethodGet, "v1/models/ft:gpt-4o-mini/extra", false},
		{provider.Anthropic, http.MethodGet, "v1/models/claude-haiku-4-5", true},
		{provider.Google, http.MethodGet, "v1beta/models/gemini-2.5-flash", true},
		{provider.Google, http.MethodGet, "v1beta/models/gemini-2.5-flash:generateContent", false},
		{provider.Google, http.MethodGet, "v1/models/gemini-2.5-flash:countTokens", false},
	}
	for _, c := range cases {
		if got, _ := sharedEndpoint(c.prov, c.method, c.path); got != c.want {
			t.Errorf("sharedEndpoint(%s, %s, %q) = %v, want %v", c.prov, c.method, c.path, got, c.want)
		}
	}
}
