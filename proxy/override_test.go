package proxy

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

func TestOverridesMethod(t *testing.T) {
	cases := []struct {
		target string
		header string
		want   bool
	}{
		{"/openai/v1/chat/completions", "", false},
		{"/openai/v1/chat/completions", "X-HTTP-Method-Override", true},
		{"/openai/v1/chat/completions", "x-http-method", true},
		{"/openai/v1/chat/completions", "X-Method-Override", true},
		{"/google/v1beta/files?$httpMethod=DELETE", "", true},
		{"/google/v1beta/files?%24httpmethod=DELETE", "", true},
		{"/google/v1beta/files?alt=json&httpMethod=GET", "", true},
		{"/google/v1beta/files?%68ttpMethod=DELETE", "", true},
		{"/google/v1beta/files?$http%4Dethod=GET", "", true},
		{"/google/v1beta/files?alt=json;httpMethod=DELETE", "", true},
		{"/google/v1beta/files?httpMethod%20=DELETE", "", true},
		{"/google/v1beta/files?+httpMethod=DELETE", "", true},
		{"/google/v1beta/files?pageToken=httpMethod", "", false},
		{"/google/v1beta/files?pageToken=a%2Fb", "", false},
		{"/google/v1beta/files?httpMethodNote=1", "", false},
	}
	for _, c := range cases {
		r := httptest.NewRequest(http.MethodPost, c.target, nil)
		if c.header != "" {
			r.Header.Set(c.header, "DELETE")
		}
		if got := overridesMethod(r); got != c.want {
			t.Errorf("%s with %q: overridesMethod = %v, want %v", c.target, c.header, got, c.want)
		}
	}
}
