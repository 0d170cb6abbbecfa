package proxy

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

func TestGoogleResponseFilter(t *testing.T) {
	cases := []struct {
		target string
		header string
		filter bool
	}{
		{"/google/v1beta/models/gemini-2.5-flash:generateContent", "", false},
		{"/google/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", "", false},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent?$alt=json;enum-encoding=int", "", false},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent?key=placeholder&prettyPrint=false", "", false},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent?ALT=SSE", "", false},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent?z=1&fieldsNote=a&a=%2F", "", false},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent?fields=candidates", "", true},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent?$fields=candidates", "", true},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent?%24fields=candidates", "", true},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent?%66ields=candidates", "", true},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent?Fields=candidates", "", true},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent?alt=json;fields=candidates", "", true},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent?%24alt=json%3Benum-encoding%3Dint", "", false},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent?%24alt=json%3Benum-encoding%3Dstring", "", true},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent?alt=proto%3Benum-encoding%3Dint", "", true},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent?alt=proto", "", true},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent?$alt=media", "", true},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent?callback=f", "", true},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent", "X-Goog-FieldMask", true},
		{"/google/v1beta/models/gemini-2.5-flash:generateContent", "x-goog-fieldmask", true},
	}
	for _, c := range cases {
		r := httptest.NewRequest(http.MethodPost, c.target, nil)
		if c.header != "" {
			r.Header.Set(c.header, "candidates")
		}
		if got := googleResponseFilter(r); (got != "") != c.filter {
			t.Errorf("%s with header %q: googleResponseFilter = %q, want a filter: %v", c.target, c.header, got, c.filter)
		}
	}
}
