package proxy

import (
	"errors"
	"testing"
)

// TestReadRequestInfoErrors checks the error of each kind of body the walk
// rejects, because on the shared key the client gets that message.
func TestReadRequestInfoErrors(t *testing.T) {
	cases := []struct {
		body string
		want string
	}{
		{`{"model":`, "the request body is not valid JSON"},
		{`null`, "the request body is not a JSON object"},
		{` [{"model":"m"}]`, "the request body is not a JSON object"},
		{`{"model":1}`, `invalid "model" in the request body: send a string`},
		{`{"stream":"yes"}`, `invalid "stream" in the request body: send true or false`},
		{`{"previous_response_id":{}}`, `invalid "previous_response_id" in the request body: send a string`},
		{`{"stream":true,"x":{"stream":1},"stream":false}`, `the request body names "stream" more than once; send each field once`},
	}
	for _, c := range cases {
		_, err := readRequestInfo([]byte(c.body))
		if err == nil {
			t.Errorf("%s: no error, want %q", c.body, c.want)
			continue
		}
		if err.Error() != c.want {
			t.Errorf("%s: error %q, want %q", c.body, err, c.want)
		}
	}

	var dup *duplicateFieldError
	if _, err := readRequestInfo([]byte(`{"model":"a","mod\u0065l":"b"}`)); !errors.As(err, &dup) || dup.name != "model" {
		t.Errorf("an escaped second model: error %v, want a duplicate model", err)
	}
	info, err := readRequestInfo([]byte(`{"messages":[{"model":"x","stream":true}],"MODEL":"y","model":"m","stream":null}`))
	if err != nil {
		t.Fatalf("valid body: %v", err)
	}
	if info.Model != "m" || info.Stream {
		t.Errorf("valid body read as model %q stream %v, want model \"m\" and no stream", info.Model, info.Stream)
	}
}
