package proxy

import (
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
