package proxy_test

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
)

// TestRequestDoneLevel checks the level of each request's "request done"
// line: debug for a success and for the upstream's own 4xx response, which
// the audit event records, and warn for a status of 500 or more and for a
// shared key that the upstream rejects or rate-limits.
func TestRequestDoneLevel(t *testing.T) {
	st := teststack.Start(t)
	tokens := map[string]string{
		"shared": st.Token(t, "levels-shared@example.com"),
		"byok":   useBYOKEverywhere(t, st, "levels-byok@example.com"),
	}
	up := st.Upstreams[provider.OpenAI]
	c := nonStream[provider.OpenAI]
	cases := []struct {
		source         string
		upstreamStatus int
		wantLevel      string
	}{
		{"shared", 0, "DEBUG"},
		{"shared", 404, "DEBUG"},
		{"shared", 401, "WARN"},
		{"shared", 429, "WARN"},
		{"shared", 500, "WARN"},
		{"byok", 0, "DEBUG"},
		{"byok", 401, "DEBUG"},
		{"byok", 429, "DEBUG"},
		{"byok", 503, "WARN"},
	}
	for _, tc := range cases {
		up.SetError(tc.upstreamStatus)
		resp, body := st.Do(t, "POST", c.path, tokens[tc.source], c.body)
		id := resp.Header.Get("X-Byokproxy-Request-Id")
		if want := max(tc.upstreamStatus, 200); resp.StatusCode != want {
			t.Errorf("%s, upstream status %d: proxy returned %d, want %d: %s", tc.source, tc.upstreamStatus, resp.StatusCode, want, body)
		}
		st.WaitAudit(t)

		level := ""
		for line := range strings.SplitSeq(st.Logs(), "\n") {
			var rec struct {
				Level     string `json:"level"`
				Msg       string `json:"msg"`
				RequestID string `json:"request_id"`
			}
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "request done" && rec.RequestID == id {
				level = rec.Level
			}
		}
		if level != tc.wantLevel {
			t.Errorf("%s, upstream status %d: request done logged at %q, want %s", tc.source, tc.upstreamStatus, level, tc.wantLevel)
		}
	}
	up.SetError(0)
}
