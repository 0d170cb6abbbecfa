package proxy_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/tidwall/gjson"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/provider"
)

func TestAllowanceEnforcedPerProviderShape(t *testing.T) {
	a := teststack.Start(t, func(c *config.Config) { c.Metering.MonthlyTokenLimit = 40 })
	// A second replica on the same store enforces the same count.
	b := a.Replica(t, func(c *config.Config) { c.Metering.MonthlyTokenLimit = 40 })
	m := "capped@example.com"
	token := a.Token(t, m)
	for _, p := range provider.Names {
		a.UseBYOK(t, m, p)
		if code, body := a.AdminDo(t, "PUT", "/admin/v1/mailboxes/"+m+"/providers/"+p+"/source", map[string]string{"source": "shared"}); code != 200 {
			t.Fatalf("source shared: %d %s", code, body)
		}
	}

	// Spend the allowance on the shared key, alternating replicas.
	spent := 0
	for i := 0; spent < 40 && i < 20; i++ {
		st := a
		if i%2 == 1 {
			st = b
		}
		resp, body := st.Do(t, "POST", nonStream[provider.OpenAI].path, token, nonStream[provider.OpenAI].body)
		if resp.StatusCode != 200 {
			t.Fatalf("request %d before the limit: %d %s", i, resp.StatusCode, body)
		}
		u := st.Upstreams[provider.OpenAI].Requests()
		last := u[len(u)-1].Usage
		spent += last.InputTokens + last.OutputTokens
		st.WaitAudit(t)
	}

	for _, p := range provider.Names {
		for _, st := range []*teststack.Stack{a, b} {
			up := st.Upstreams[p]
			n := len(up.Requests())
			resp, body := st.Do(t, "POST", nonStream[p].path, token, nonStream[p].body, sdkHeaders(p)...)
			if resp.StatusCode != 429 {
				t.Fatalf("%s over the limit: status %d, want 429: %s", p, resp.StatusCode, body)
			}
			if !inShape(p, body, "rate_limit_error", "insufficient_quota", "RESOURCE_EXHAUSTED") {
				t.Errorf("%s: 429 not in the provider's shape: %s", p, body)
			}
			if !strings.Contains(string(body), "resets at") {
				t.Errorf("%s: 429 message does not say when the allowance resets: %s", p, body)
			}
			ra, err := strconv.Atoi(resp.Header.Get("Retry-After"))
			if err != nil || ra <= 0 || ra > 32*24*3600 {
				t.Errorf("%s: Retry-After = %q, want seconds until the month ends", p, resp.Header.Get("Retry-After"))
			}
			if len(up.Requests()) != n {
				t.Errorf("%s: request over the limit was forwarded", p)
			}
		}
	}

	// byok requests of the same mailbox are never capped. Replica b takes
	// the change made through a from its notice, which the contract allows
	// up to 1 s, so b is asked until the source has changed there.
	for _, p := range provider.Names {
		a.AdminDo(t, "PUT", "/admin/v1/mailboxes/"+m+"/providers/"+p+"/source", map[string]string{"source": "byok"})
		var status int
		var body []byte
		eventually(keystore.MaxCacheTTL, func() bool {
			var resp *http.Response
			resp, body = b.Do(t, "POST", nonStream[p].path, token, nonStream[p].body, sdkHeaders(p)...)
			status = resp.StatusCode
			return status != http.StatusTooManyRequests
		})
		if status != 200 {
			t.Errorf("%s byok over the shared limit: %d %s", p, status, body)
		}
	}

	// A per-mailbox override lifts the cap; null returns to the default.
	code, body := a.AdminDo(t, "PUT", "/admin/v1/mailboxes/"+m+"/limit", map[string]any{"monthly_token_limit": 0})
	if code != 200 || !strings.Contains(string(body), `"monthly_token_limit":0`) {
		t.Fatalf("limit 0: %d %s", code, body)
	}
	a.AdminDo(t, "PUT", "/admin/v1/mailboxes/"+m+"/providers/openai/source", map[string]string{"source": "shared"})
	if resp, _ := a.Do(t, "POST", nonStream[provider.OpenAI].path, token, nonStream[provider.OpenAI].body); resp.StatusCode != 200 {
		t.Errorf("unlimited override: status %d", resp.StatusCode)
	}
	code, body = a.AdminDo(t, "PUT", "/admin/v1/mailboxes/"+m+"/limit", map[string]any{"monthly_token_limit": nil})
	if code != 200 || !strings.Contains(string(body), `"monthly_token_limit":40`) {
		t.Errorf("limit null: %d %s", code, body)
	}
}

// TestAllowanceOvershootBound checks the documented bound: usage is counted
// when a response ends, so requests admitted while the count is below the
// limit all complete. The overshoot is at most the usage of the requests in
// flight at the moment the limit is crossed.
func TestAllowanceOvershootBound(t *testing.T) {
	const limit = 30
	st := teststack.Start(t, func(c *config.Config) { c.Metering.MonthlyTokenLimit = limit })
	m := "burst@example.com"
	token := st.Token(t, m)
	const concurrent = 8
	var wg sync.WaitGroup
	var mu sync.Mutex
	admitted := 0
	for i := 0; i < concurrent; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, _ := st.Do(t, "POST", nonStream[provider.OpenAI].path, token, nonStream[provider.OpenAI].body)
			if resp.StatusCode == 200 {
				mu.Lock()
				admitted++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	st.WaitAudit(t)
	code, body := st.AdminDo(t, "GET", "/admin/v1/mailboxes/"+m+"/usage", nil)
	if code != 200 {
		t.Fatalf("usage: %d", code)
	}
	var u struct {
		Remaining *int64 `json:"remaining"`
		Providers map[string]map[string]struct {
			Requests, InputTokens, OutputTokens int64
		}
	}
	json.Unmarshal(body, &u)
	per := st.Upstreams[provider.OpenAI].Requests()[0].Usage
	perRequest := per.InputTokens + per.OutputTokens
	used := admitted * perRequest
	if used > limit+concurrent*perRequest {
		t.Errorf("used %d tokens, over the bound limit + in-flight usage = %d", used, limit+concurrent*perRequest)
	}
	if admitted == 0 {
		t.Error("no request admitted under the limit")
	}
	// Once the counts land, the next request is rejected.
	if used >= limit {
		if resp, _ := st.Do(t, "POST", nonStream[provider.OpenAI].path, token, nonStream[provider.OpenAI].body); resp.StatusCode != 429 {
			t.Errorf("after the burst: status %d, want 429", resp.StatusCode)
		}
	}
	if u.Remaining == nil || *u.Remaining != 0 && used >= limit {
		t.Errorf("remaining = %v with %d of %d used", u.Remaining, used, limit)
	}
}

func TestUsageReadout(t *testing.T) {
	st := teststack.Start(t, func(c *config.Config) { c.Metering.MonthlyTokenLimit = 1000 })
	m := "usage@example.com"
	token := st.Token(t, m)
	var wantIn, wantOut int64
	for _, p := range provider.Names {
		resp, _ := st.Do(t, "POST", nonStream[p].path, token, nonStream[p].body, sdkHeaders(p)...)
		if resp.StatusCode != 200 {
			t.Fatalf("%s: %d", p, resp.StatusCode)
		}
		u := st.Upstreams[p].Requests()[0].Usage
		wantIn += int64(u.InputTokens)
		wantOut += int64(u.OutputTokens)
	}
	st.UseBYOK(t, m, provider.Anthropic)
	st.Do(t, "POST", nonStream[provider.Anthropic].path, token, nonStream[provider.Anthropic].body, sdkHeaders(provider.Anthropic)...)
	st.WaitAudit(t)

	code, body := st.AdminDo(t, "GET", "/admin/v1/mailboxes/"+m+"/usage", nil)
	if code != 200 {
		t.Fatalf("usage: %d %s", code, body)
	}
	type counts struct {
		Requests     int64 `json:"requests"`
		InputTokens  int64 `json:"input_tokens"`
		OutputTokens int64 `json:"output_tokens"`
	}
	var u struct {
		Mailbox   string                       `json:"mailbox"`
		Month     string                       `json:"month"`
		Limit     *int64                       `json:"limit"`
		Remaining *int64                       `json:"remaining"`
		Providers map[string]map[string]counts `json:"providers"`
	}
	if err := json.Unmarshal(body, &u); err != nil {
		t.Fatal(err)
	}
	if u.Mailbox != m || u.Month != time.Now().UTC().Format("2006-01") {
		t.Errorf("mailbox/month = %s/%s", u.Mailbox, u.Month)
	}
	var gotIn, gotOut int64
	for _, p := range provider.Names {
		s := u.Providers[p]["shared"]
		if s.Requests != 1 {
			t.Errorf("%s shared requests = %d, want 1", p, s.Requests)
		}
		gotIn += s.InputTokens
		gotOut += s.OutputTokens
	}
	if gotIn != wantIn || gotOut != wantOut {
		t.Errorf("shared tokens = %d/%d, want %d/%d", gotIn, gotOut, wantIn, wantOut)
	}
	if u.Providers[provider.Anthropic]["byok"].Requests != 1 {
		t.Errorf("anthropic byok requests = %d, want 1", u.Providers[provider.Anthropic]["byok"].Requests)
	}
	if u.Limit == nil || *u.Limit != 1000 || u.Remaining == nil || *u.Remaining != 1000-wantIn-wantOut {
		t.Errorf("limit/remaining = %v/%v, want 1000/%d", u.Limit, u.Remaining, 1000-wantIn-wantOut)
	}
	code, body = st.AdminDo(t, "GET", "/admin/v1/mailboxes/"+m+"/usage?month=2020-01", nil)
	if code != 200 || !strings.Contains(string(body), `"requests":0`) {
		t.Errorf("past month: %d %s", code, body)
	}
	if code, _ := st.AdminDo(t, "GET", "/admin/v1/mailboxes/"+m+"/usage?month=2020-1x", nil); code != 400 {
		t.Errorf("bad month: %d, want 400", code)
	}
}

func TestMetricsAfterKnownTraffic(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "metrics@example.com")
	st.UseBYOK(t, "metrics-own@example.com", provider.Google)
	own := st.Token(t, "metrics-own@example.com")

	var in, out int
	for i := 0; i < 3; i++ {
		st.Do(t, "POST", nonStream[provider.OpenAI].path, token, nonStream[provider.OpenAI].body)
	}
	for _, r := range st.Upstreams[provider.OpenAI].Requests() {
		in += r.Usage.InputTokens
		out += r.Usage.OutputTokens
	}
	st.Do(t, "POST", streaming[provider.Google].path, own, streaming[provider.Google].body)
	g := st.Upstreams[provider.Google].Requests()[0].Usage
	st.Do(t, "POST", nonStream[provider.OpenAI].path, "bad-token", nonStream[provider.OpenAI].body)

	mfs, err := st.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var text strings.Builder
	for _, mf := range mfs {
		expfmt.MetricFamilyToText(&text, mf)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(text.String()))
	if err != nil {
		t.Fatalf("parse /metrics text: %v", err)
	}
	value := func(name string, labels map[string]string) float64 {
		mf := families[name]
		if mf == nil {
			return -1
		}
		for _, m := range mf.Metric {
			match := true
			for _, lp := range m.Label {
				if want, ok := labels[lp.GetName()]; ok && want != lp.GetValue() {
					match = false
				}
			}
			if !match {
				continue
			}
			if m.Counter != nil {
				return m.Counter.GetValue()
			}
			if m.Histogram != nil {
				return float64(m.Histogram.GetSampleCount())
			}
		}
		return 0
	}
	checks := []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"byokproxy_requests_total", map[string]string{"provider": "openai", "source": "metered", "code": "200"}, 3},
		{"byokproxy_requests_total", map[string]string{"provider": "openai", "source": "metered", "code": "401"}, 1},
		{"byokproxy_requests_total", map[string]string{"provider": "google", "source": "byok", "code": "200"}, 1},
		{"byokproxy_tokens_total", map[string]string{"provider": "openai", "source": "metered", "direction": "input"}, float64(in)},
		{"byokproxy_tokens_total", map[string]string{"provider": "openai", "source": "metered", "direction": "output"}, float64(out)},
		{"byokproxy_tokens_total", map[string]string{"provider": "google", "source": "byok", "direction": "input"}, float64(g.InputTokens)},
		{"byokproxy_tokens_total", map[string]string{"provider": "google", "source": "byok", "direction": "output"}, float64(g.OutputTokens)},
		{"byokproxy_request_duration_seconds", map[string]string{"provider": "openai", "source": "metered"}, 3},
		{"byokproxy_upstream_ttfb_seconds", map[string]string{"provider": "openai"}, 3},
	}
	for _, c := range checks {
		if got := value(c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	for _, name := range []string{"byokproxy_in_flight_requests", "byokproxy_key_errors_total", "byokproxy_metered_rejections_total", "byokproxy_audit_events_dropped_total", "go_goroutines", "process_resident_memory_bytes"} {
		if _, ok := families[name]; !ok && name != "byokproxy_key_errors_total" && name != "byokproxy_metered_rejections_total" {
			t.Errorf("metric %s missing", name)
		}
	}
	for name, mf := range families {
		for _, m := range mf.Metric {
			for _, lp := range m.Label {
				if lp.GetName() == "mailbox" {
					t.Errorf("metric %s has a mailbox label", name)
				}
			}
		}
	}
}

func TestAllowanceRejectionStopsSDKRetries(t *testing.T) {
	st := teststack.Start(t, func(c *config.Config) { c.Metering.MonthlyTokenLimit = 1 })
	token := st.Token(t, "noretry@example.com")
	st.Do(t, "POST", nonStream[provider.OpenAI].path, token, nonStream[provider.OpenAI].body)
	st.WaitAudit(t)
	resp, _ := st.Do(t, "POST", nonStream[provider.OpenAI].path, token, nonStream[provider.OpenAI].body)
	if resp.StatusCode != 429 {
		t.Fatalf("status %d, want 429", resp.StatusCode)
	}
	// SDKs would otherwise sleep for Retry-After, up to the end of the month.
	if got := resp.Header.Get("X-Should-Retry"); got != "false" {
		t.Errorf("X-Should-Retry = %q, want false", got)
	}
}

// TestCutStreamStillCharged cuts a shared stream after its first event. On
// Anthropic that event reports one output token, and on Google the output so
// far, so the estimate must still apply to the output.
func TestCutStreamStillCharged(t *testing.T) {
	st := teststack.Start(t)
	for _, p := range provider.Names {
		t.Run(p, func(t *testing.T) {
			m := "cutter-" + p + "@example.com"
			token := st.Token(t, m)
			up := st.Upstreams[p]
			up.SetEventDelay(200 * time.Millisecond)
			defer up.SetEventDelay(0)
			resp, err := http.DefaultClient.Do(callRequest(context.Background(), st.ProxyURL, p, token, streaming[p]))
			if err != nil {
				t.Fatal(err)
			}
			// Read the first event, then hang up before the final usage.
			buf := make([]byte, 64)
			resp.Body.Read(buf)
			resp.Body.Close()
			time.Sleep(500 * time.Millisecond)

			events := teststack.EventsOf(st.AuditEvents(t), m)
			if len(events) != 1 {
				t.Fatalf("audit events = %d, want 1", len(events))
			}
			e := events[0]
			if e["input_tokens"].(float64) <= 0 {
				t.Errorf("a cut shared stream was charged %v input tokens", e["input_tokens"])
			}
			if e["output_tokens"].(float64) <= 1 {
				t.Errorf("a cut shared stream was charged %v output tokens, want the estimate from its bytes", e["output_tokens"])
			}
			if !strings.Contains(e["error"].(string), "estimated") {
				t.Errorf("audit error = %q, want it to say the usage was estimated", e["error"])
			}
			code, body := st.AdminDo(t, "GET", "/admin/v1/mailboxes/"+m+"/usage", nil)
			if code != 200 || strings.Contains(string(body), `"input_tokens":0,"output_tokens":0,"requests":1`) {
				t.Errorf("usage after a cut stream: %s", body)
			}
		})
	}
}

// TestRepeatedRequestIDCharged checks that a client cannot make the proxy
// count its usage once by sending the same X-Request-Id every time.
func TestRepeatedRequestIDCharged(t *testing.T) {
	st := teststack.Start(t)
	m := "repeat-id@example.com"
	token := st.Token(t, m)
	c := nonStream[provider.OpenAI]
	ids := map[string]bool{}
	const n = 3
	for range n {
		resp, body := st.Do(t, "POST", c.path, token, c.body, "X-Request-Id", "same-id-every-time")
		if resp.StatusCode != 200 {
			t.Fatalf("status %d: %s", resp.StatusCode, body)
		}
		ids[resp.Header.Get("X-Byokproxy-Request-Id")] = true
	}
	if len(ids) != n || ids["same-id-every-time"] {
		t.Errorf("request ids %v: want %d random ids, none taken from the client", ids, n)
	}
	st.WaitAudit(t)
	_, body := st.AdminDo(t, "GET", "/admin/v1/mailboxes/"+m+"/usage", nil)
	if got := gjson.GetBytes(body, "providers.openai.shared.requests").Int(); got != n {
		t.Errorf("shared requests counted = %d, want %d: %s", got, n, body)
	}
}

// sharedUsage returns the shared-key requests and tokens counted for
// mailbox m and provider p this month.
func sharedUsage(t *testing.T, st *teststack.Stack, m, p string) (requests, input, output int64) {
	t.Helper()
	st.WaitAudit(t)
	code, body := st.AdminDo(t, "GET", "/admin/v1/mailboxes/"+m+"/usage", nil)
	if code != 200 {
		t.Fatalf("usage: %d %s", code, body)
	}
	s := gjson.GetBytes(body, "providers."+p+".shared")
	return s.Get("requests").Int(), s.Get("input_tokens").Int(), s.Get("output_tokens").Int()
}

func TestLegacyCompletionsStreamCharged(t *testing.T) {
	st := teststack.Start(t)
	m := "legacy-stream@example.com"
	resp, body := st.Do(t, "POST", "/openai/v1/completions", st.Token(t, m),
		`{"model":"gpt-3.5-turbo-instruct","prompt":"Say this is a test","max_tokens":7,"stream":true}`)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	if strings.Contains(string(body), `"usage":{`) {
		t.Errorf("the usage chunk the proxy requested reached a client that did not ask for it:\n%s", body)
	}
	if !strings.Contains(string(body), "[DONE]") {
		t.Errorf("stream incomplete:\n%s", body)
	}
	want := st.Upstreams[provider.OpenAI].Requests()[0].Usage
	requests, input, output := sharedUsage(t, st, m, provider.OpenAI)
	if requests != 1 || input != int64(want.InputTokens) || output != int64(want.OutputTokens) {
		t.Errorf("charged %d requests, %d/%d tokens, want 1 and %d/%d", requests, input, output, want.InputTokens, want.OutputTokens)
	}
}

func TestGoogleEmbeddingsCharged(t *testing.T) {
	st := teststack.Start(t)
	m := "gemini-embed@example.com"
	body := `{"requests":[{"model":"models/gemini-embedding-001","content":{"parts":[{"text":"` + strings.Repeat("word ", 200) + `"}]}}]}`
	resp, out := st.Do(t, "POST", "/google/v1beta/models/gemini-embedding-001:batchEmbedContents", st.Token(t, m), body)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, out)
	}
	if strings.Contains(string(out), "usageMetadata") {
		t.Fatalf("the emulator reports usage for embeddings, so this test checks nothing: %s", out)
	}
	requests, input, output := sharedUsage(t, st, m, provider.Google)
	if want := int64(len(body)+3) / 4; requests != 1 || input != want || output != 0 {
		t.Errorf("charged %d requests, %d/%d tokens, want 1 and %d/0 estimated from the request bytes", requests, input, output, want)
	}
}

func TestBackgroundResponseRejectedOnShared(t *testing.T) {
	st := teststack.Start(t)
	up := st.Upstreams[provider.OpenAI]
	body := `{"model":"gpt-4o-mini","input":"later","background":true}`
	resp, out := st.Do(t, "POST", "/openai/v1/responses", st.Token(t, "background@example.com"), body)
	if resp.StatusCode != 403 || !inShape(provider.OpenAI, out, "", "forbidden", "") {
		t.Errorf("shared background response: status %d, want 403 in OpenAI's shape: %s", resp.StatusCode, out)
	}
	if n := len(up.Requests()); n != 0 {
		t.Errorf("shared background response forwarded %d times", n)
	}
	resp, out = st.Do(t, "POST", "/openai/v1/responses", st.Token(t, "background@example.com"), `{"model":"gpt-4o-mini","input":"x","background":"yes"}`)
	if resp.StatusCode != 400 {
		t.Errorf("background that is not a boolean: status %d, want 400: %s", resp.StatusCode, out)
	}

	st.UseBYOK(t, "own-background@example.com", provider.OpenAI)
	resp, out = st.Do(t, "POST", "/openai/v1/responses", st.Token(t, "own-background@example.com"), body)
	if resp.StatusCode != 200 {
		t.Errorf("background response on the mailbox's own key: status %d: %s", resp.StatusCode, out)
	}
}

func TestStoredItemReferencesRejectedOnShared(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "items@example.com")
	up := st.Upstreams[provider.OpenAI]
	forbidden := []string{
		`{"model":"gpt-4o-mini","input":"hi","conversation":"conv_123"}`,
		`{"model":"gpt-4o-mini","input":"hi","conversation":{"id":"conv_123"}}`,
		`{"model":"gpt-4o-mini","input":[{"role":"user","content":"hi"},{"type":"item_reference","id":"msg_123"}]}`,
		`{"model":"gpt-4o-mini","input":[{"id":"msg_123","type":"item_reference"}]}`,
		`{"model":"gpt-4o-mini","input":[{"id":"msg_123"}]}`,
		`{"model":"gpt-4o-mini","input":[{"type":null,"id":"rs_123"}]}`,
	}
	for _, body := range forbidden {
		resp, out := st.Do(t, "POST", "/openai/v1/responses", token, body)
		if resp.StatusCode != 403 {
			t.Errorf("%s: status %d, want 403: %s", body, resp.StatusCode, out)
		}
	}
	resp, out := st.Do(t, "POST", "/openai/v1/responses", token,
		`{"model":"gpt-4o-mini","input":[{"type":"message","type":"item_reference","id":"msg_123"}]}`)
	if resp.StatusCode != 400 {
		t.Errorf("input item naming its type twice: status %d, want 400: %s", resp.StatusCode, out)
	}
	if n := len(up.Requests()); n != 0 {
		t.Errorf("%d requests naming stored items were forwarded", n)
	}
	allowed := []string{
		`{"model":"gpt-4o-mini","input":[{"role":"user","content":"item_reference"}]}`,
		`{"model":"gpt-4o-mini","input":"hi","conversation":null}`,
		`{"model":"gpt-4o-mini","input":[{"type":"message","id":"msg_own","role":"assistant","content":[{"type":"output_text","text":"hi"}]},{"role":"user","content":"more"}]}`,
	}
	for _, body := range allowed {
		if resp, out := st.Do(t, "POST", "/openai/v1/responses", token, body); resp.StatusCode != 200 {
			t.Errorf("%s: status %d, want 200: %s", body, resp.StatusCode, out)
		}
	}
}

// TestRareEventSeriesExistAtStart checks that the counters of rare events
// have a zero series per provider before any traffic, so an alert on their
// rate has data from the start.
func TestRareEventSeriesExistAtStart(t *testing.T) {
	st := teststack.Start(t)
	mfs, err := st.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	series := map[string]int{}
	for _, mf := range mfs {
		for range mf.GetMetric() {
			series[mf.GetName()]++
		}
	}
	n := len(provider.Names)
	want := map[string]int{
		"byokproxy_key_errors_total":         4 * n,
		"byokproxy_metered_rejections_total": n,
		"byokproxy_in_flight_requests":       n,
	}
	for name, count := range want {
		if series[name] != count {
			t.Errorf("%s: %d series before any request, want %d", name, series[name], count)
		}
	}
}

// TestChunkedGoogleEmbeddingsCharged sends the embeddings request of
// TestGoogleEmbeddingsCharged without a Content-Length, as a chunked body
// that the proxy forwards unread.
func TestChunkedGoogleEmbeddingsCharged(t *testing.T) {
	st := teststack.Start(t)
	m := "gemini-embed-chunked@example.com"
	body := `{"requests":[{"model":"models/gemini-embedding-001","content":{"parts":[{"text":"` + strings.Repeat("word ", 200) + `"}]}}]}`
	req, err := http.NewRequest("POST", st.ProxyURL+"/google/v1beta/models/gemini-embedding-001:batchEmbedContents",
		io.NopCloser(strings.NewReader(body)))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Goog-Api-Key", st.Token(t, m))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	out, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || req.ContentLength != 0 {
		t.Fatalf("status %d, Content-Length %d: %s", resp.StatusCode, req.ContentLength, out)
	}
	requests, input, _ := sharedUsage(t, st, m, provider.Google)
	if want := int64(len(body)+3) / 4; requests != 1 || input != want {
		t.Errorf("charged %d requests, %d input tokens, want 1 and %d", requests, input, want)
	}
}

// TestUnreadBodyStreamAudited sends a BYOK request whose body names stream
// twice, which the proxy forwards without reading. The provider streams,
// so the audit event must record a stream, with the usage the tap read.
func TestUnreadBodyStreamAudited(t *testing.T) {
	st := teststack.Start(t)
	for _, tc := range []struct {
		provider, path, body string
		counted              bool
	}{
		{provider.Anthropic, "/anthropic/v1/messages",
			`{"model":"claude-haiku-4-5","max_tokens":16,"stream":false,"stream":true,"messages":[{"role":"user","content":"say hello"}]}`, true},
		// Without stream_options, which the proxy cannot add to a body it
		// did not read, an OpenAI stream reports no usage.
		{provider.OpenAI, "/openai/v1/chat/completions",
			`{"model":"gpt-4o-mini","stream":false,"stream":true,"messages":[{"role":"user","content":"say hello"}]}`, false},
	} {
		t.Run(tc.provider, func(t *testing.T) {
			m := "unread-" + tc.provider + "@example.com"
			st.UseBYOK(t, m, tc.provider)
			resp, body := st.Do(t, "POST", tc.path, st.Token(t, m), tc.body, "anthropic-version", "2023-06-01")
			if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
				t.Fatalf("status %d, Content-Type %q: %.300s", resp.StatusCode, resp.Header.Get("Content-Type"), body)
			}
			events := teststack.EventsOf(st.AuditEvents(t), m)
			if len(events) != 1 {
				t.Fatalf("audit events = %d, want 1", len(events))
			}
			e := events[0]
			if e["stream"] != true {
				t.Errorf("audit stream = %v, want true", e["stream"])
			}
			if got := e["output_tokens"].(float64) > 0; got != tc.counted {
				t.Errorf("audit output_tokens = %v, want counted = %v", e["output_tokens"], tc.counted)
			}
		})
	}
}

// TestAllowanceSeenByNextRequest sends each request as soon as the one
// before it has ended, without waiting for the audit writer, as an SDK in a
// loop does. The usage of a response is counted before the response ends,
// so the request after the one that used up the allowance gets 429, and
// the count of usage not yet in Redis empties once the writer delivers it.
func TestAllowanceSeenByNextRequest(t *testing.T) {
	st := teststack.Start(t, func(c *config.Config) { c.Metering.MonthlyTokenLimit = 1 })
	for _, p := range provider.Names {
		token := st.Token(t, "next-"+p+"@example.com")
		resp, body := st.Do(t, "POST", nonStream[p].path, token, nonStream[p].body, sdkHeaders(p)...)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: first request: %d %s", p, resp.StatusCode, body)
		}
		for i := range 2 {
			resp, body = st.Do(t, "POST", nonStream[p].path, token, nonStream[p].body, sdkHeaders(p)...)
			if resp.StatusCode != http.StatusTooManyRequests {
				t.Errorf("%s: request %d after the allowance was used up: %d %s", p, i+2, resp.StatusCode, body)
			}
		}
	}

	m := "next-drain@example.com"
	token := st.Token(t, m)
	c := nonStream[provider.OpenAI]
	if code, body := st.AdminDo(t, "PUT", "/admin/v1/mailboxes/"+m+"/limit", map[string]any{"monthly_token_limit": 1000}); code != http.StatusOK {
		t.Fatalf("limit: %d %s", code, body)
	}
	if resp, body := st.Do(t, "POST", c.path, token, c.body); resp.StatusCode != http.StatusOK {
		t.Fatalf("first request: %d %s", resp.StatusCode, body)
	}
	st.WaitAudit(t)
	u := st.Upstreams[provider.OpenAI].Requests()
	per := u[len(u)-1].Usage.InputTokens + u[len(u)-1].Usage.OutputTokens
	// Usage counted both in Redis and as pending would reach this limit.
	if code, body := st.AdminDo(t, "PUT", "/admin/v1/mailboxes/"+m+"/limit", map[string]any{"monthly_token_limit": 2 * per}); code != http.StatusOK {
		t.Fatalf("limit: %d %s", code, body)
	}
	if resp, body := st.Do(t, "POST", c.path, token, c.body); resp.StatusCode != http.StatusOK {
		t.Errorf("second request, %d of %d tokens used: %d %s", per, 2*per, resp.StatusCode, body)
	}
	if resp, body := st.Do(t, "POST", c.path, token, c.body); resp.StatusCode != http.StatusTooManyRequests {
		t.Errorf("third request, %d of %d tokens used: %d %s", 2*per, 2*per, resp.StatusCode, body)
	}
}

// TestAllowanceExactForSequentialRequests runs requests back to back near
// the allowance, JSON and streamed: the second of three stays under it and
// must pass, the third reaches it and must get 429. Usage charged here but
// not yet written must count once, neither twice (a 429 too early) nor not
// at all (a request too many).
func TestAllowanceExactForSequentialRequests(t *testing.T) {
	st := teststack.Start(t, func(c *config.Config) { c.Metering.MonthlyTokenLimit = 1000 })
	for _, c := range []call{nonStream[provider.OpenAI], streaming[provider.OpenAI], streaming[provider.Anthropic]} {
		calibrate := st.Token(t, "calibrate@example.com")
		if resp, body := st.Do(t, "POST", c.path, calibrate, c.body, sdkHeaders(providerOf(c.path))...); resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: calibration: %d %s", c.path, resp.StatusCode, body)
		}
		st.WaitAudit(t)
		u := st.Upstreams[providerOf(c.path)].Requests()
		per := int64(u[len(u)-1].Usage.InputTokens + u[len(u)-1].Usage.OutputTokens)
		for trial := range 15 {
			m := fmt.Sprintf("exact-%d-%d@example.com", len(c.path), trial)
			if c.stream {
				m = "stream-" + m
			}
			if code, body := st.AdminDo(t, "PUT", "/admin/v1/mailboxes/"+m+"/limit", map[string]any{"monthly_token_limit": 2*per - 1}); code != http.StatusOK {
				t.Fatalf("limit: %d %s", code, body)
			}
			token := st.Token(t, m)
			var got []int
			for range 3 {
				resp, _ := st.Do(t, "POST", c.path, token, c.body, sdkHeaders(providerOf(c.path))...)
				got = append(got, resp.StatusCode)
			}
			if got[0] != http.StatusOK || got[1] != http.StatusOK || got[2] != http.StatusTooManyRequests {
				t.Errorf("%s (stream %v) trial %d: statuses %v, want [200 200 429] with %d tokens per request and a limit of %d", c.path, c.stream, trial, got, per, 2*per-1)
			}
		}
	}
}

// providerOf returns the provider of a proxy path.
func providerOf(path string) string {
	name, _, _ := strings.Cut(strings.TrimPrefix(path, "/"), "/")
	return name
}

// An Anthropic reply to a request that compacted its context, in the shape
// Anthropic's compaction documentation gives: the compaction step is only
// in usage.iterations, and Anthropic bills the sum over the iterations.
const compactedReply = `{"id":"msg_compact","type":"message","role":"assistant","model":"claude-opus-4-6",` +
	`"content":[{"type":"compaction","content":"Summary of the conversation"},{"type":"text","text":"Based on that..."}],` +
	`"stop_reason":"end_turn","stop_sequence":null,` +
	`"usage":{"input_tokens":23000,"output_tokens":1000,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,` +
	`"iterations":[{"type":"compaction","input_tokens":180000,"output_tokens":3500},` +
	`{"type":"message","input_tokens":23000,"output_tokens":1000}]}}`

func TestSharedCompactionChargedInFull(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, compactedReply)
	}))
	t.Cleanup(up.Close)
	st := teststack.Start(t, func(c *config.Config) { c.Provider(provider.Anthropic).Upstream = up.URL })
	m := "compaction@example.com"
	resp, out := st.Do(t, http.MethodPost, "/anthropic/v1/messages", st.Token(t, m),
		`{"model":"claude-opus-4-6","max_tokens":4096,"messages":[{"role":"user","content":"Hello"}],`+
			`"context_management":{"edits":[{"type":"compact_20260112"}]}}`,
		"anthropic-version", "2023-06-01", "anthropic-beta", "compact-2026-01-12")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", resp.StatusCode, out)
	}
	_, input, output := sharedUsage(t, st, m, provider.Anthropic)
	if input != 203000 {
		t.Errorf("input tokens charged %d, want 203000, the sum over usage.iterations", input)
	}
	if output != 4500 {
		t.Errorf("output tokens charged %d, want 4500, the sum over usage.iterations", output)
	}
}
