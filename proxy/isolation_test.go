package proxy_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/provider"
)

func TestClientCredentialsNeverForwarded(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "creds@example.com")
	for _, p := range provider.Names {
		up := st.Upstreams[p]
		up.Reset()
		c := nonStream[p]
		path := c.path
		if strings.Contains(path, "?") {
			path += "&key=" + token
		} else {
			path += "?key=" + token
		}
		headers := append(sdkHeaders(p),
			"X-Api-Key", token, "X-Goog-Api-Key", token, "Api-Key", token,
			"Proxy-Authorization", "Basic c2VjcmV0", "Cookie", "session=secret-cookie",
			"X-Mailbox-Id", "someone-else")
		resp, body := st.Do(t, "POST", path, token, c.body, headers...)
		if resp.StatusCode != 200 {
			t.Fatalf("%s: status %d: %s", p, resp.StatusCode, body)
		}
		got := up.Requests()[0]
		for _, name := range []string{"Proxy-Authorization", "Cookie", "X-Mailbox-Id", "Api-Key"} {
			if v := got.Header.Get(name); v != "" {
				t.Errorf("%s: upstream received %s: %q", p, name, v)
			}
		}
		spec := provider.Lookup(p)
		for _, name := range []string{"Authorization", "X-Api-Key", "X-Goog-Api-Key"} {
			v := got.Header.Get(name)
			if name == spec.AuthHeader {
				if v != spec.AuthScheme+teststack.SharedKeys[p] {
					t.Errorf("%s: %s = %q, want the injected key", p, name, v)
				}
			} else if v != "" {
				t.Errorf("%s: upstream received a second credential in %s", p, name)
			}
		}
		if strings.Contains(got.RawQuery, "key=") {
			t.Errorf("%s: key query parameter forwarded: %q", p, got.RawQuery)
		}
		if p == provider.Google && !strings.Contains(got.RawQuery, "alt=") && strings.Contains(c.path, "alt=") {
			t.Errorf("%s: other query parameters lost: %q", p, got.RawQuery)
		}
	}
}

func TestConflictingTokensRejected(t *testing.T) {
	st := teststack.Start(t)
	a := st.Token(t, "alice")
	b := st.Token(t, "bob")
	resp, _ := st.Do(t, "POST", nonStream[provider.OpenAI].path, a, nonStream[provider.OpenAI].body, "X-Api-Key", b)
	if resp.StatusCode != 401 {
		t.Errorf("two different tokens: status %d, want 401", resp.StatusCode)
	}
	if n := len(st.Upstreams[provider.OpenAI].Requests()); n != 0 {
		t.Errorf("upstream got %d requests", n)
	}
}

func TestTrustedMailboxHeader(t *testing.T) {
	st := teststack.Start(t, func(c *config.Config) { c.Auth.TrustMailboxHeader = true })
	c := nonStream[provider.OpenAI]
	resp, body := st.Do(t, "POST", c.path, "", c.body, "X-Mailbox-Id", "sidecar@example.com")
	if resp.StatusCode != 200 {
		t.Fatalf("trusted header: status %d: %s", resp.StatusCode, body)
	}
	// A token wins over the header: mailbox A's token with X-Mailbox-Id: B
	// is A's request.
	st.UseBYOK(t, "b-mailbox", provider.OpenAI)
	tokenA := st.Token(t, "a-mailbox")
	st.Upstreams[provider.OpenAI].Reset()
	resp, _ = st.Do(t, "POST", c.path, tokenA, c.body, "X-Mailbox-Id", "b-mailbox")
	if resp.StatusCode != 200 {
		t.Fatalf("token with header: status %d", resp.StatusCode)
	}
	if got := st.Upstreams[provider.OpenAI].Requests()[0].Key; got != teststack.SharedKeys[provider.OpenAI] {
		t.Errorf("token for A with X-Mailbox-Id B used B's key")
	}
	resp, _ = st.Do(t, "POST", c.path, "", c.body, "X-Mailbox-Id", "bad id/../x")
	if resp.StatusCode != 400 {
		t.Errorf("invalid mailbox id: status %d, want 400", resp.StatusCode)
	}

	// The SDKs send a placeholder key, where a token would go, next to the
	// header. Only a string in the token's form counts as a token.
	for _, p := range provider.Names {
		st.UseBYOK(t, "sidecar-sdk@example.com", p)
	}
	for _, p := range provider.Names {
		up := st.Upstreams[p]
		up.Reset()
		resp, body = st.Do(t, "POST", nonStream[p].path, "sk-placeholder", nonStream[p].body,
			append(sdkHeaders(p), "X-Mailbox-Id", "sidecar-sdk@example.com")...)
		if resp.StatusCode != 200 {
			t.Errorf("%s: placeholder key with the header: status %d: %s", p, resp.StatusCode, body)
			continue
		}
		if got := up.Requests()[0].Key; got != teststack.BYOKKeys[p] {
			t.Errorf("%s: placeholder key with the header reached the upstream with %q, want the mailbox's key", p, got)
		}
		resp, _ = st.Do(t, "POST", nonStream[p].path, "bp1.Zm9yZ2Vk.0.AAAA", nonStream[p].body,
			append(sdkHeaders(p), "X-Mailbox-Id", "sidecar-sdk@example.com")...)
		if resp.StatusCode != 401 {
			t.Errorf("%s: invalid token with the header: status %d, want 401", p, resp.StatusCode)
		}
	}

	// Without trust, the header alone is not enough, nor with a placeholder.
	plain := teststack.Start(t)
	resp, _ = plain.Do(t, "POST", c.path, "", c.body, "X-Mailbox-Id", "sidecar@example.com")
	if resp.StatusCode != 401 {
		t.Errorf("untrusted header: status %d, want 401", resp.StatusCode)
	}
	resp, _ = plain.Do(t, "POST", c.path, "sk-placeholder", c.body, "X-Mailbox-Id", "sidecar@example.com")
	if resp.StatusCode != 401 {
		t.Errorf("untrusted header with a placeholder key: status %d, want 401", resp.StatusCode)
	}
}

// forbiddenOnShared lists endpoints that must never use the shared key.
var forbiddenOnShared = map[string][][2]string{
	provider.OpenAI: {
		{"POST", "/openai/v1/files"}, {"GET", "/openai/v1/files"}, {"POST", "/openai/v1/batches"},
		{"POST", "/openai/v1/fine_tuning/jobs"}, {"GET", "/openai/v1/responses/resp_123"},
		{"POST", "/openai/v1/audio/speech"}, {"POST", "/openai/v1/images/generations"},
		{"POST", "/openai/v1/vector_stores"}, {"GET", "/openai/v1/realtime"}, {"DELETE", "/openai/v1/models/ft-x"},
		{"POST", "/openai/v2/chat/completions"}, {"GET", "/openai/v1/chat/completions"},
	},
	provider.Anthropic: {
		{"POST", "/anthropic/v1/messages/batches"}, {"GET", "/anthropic/v1/messages/batches"},
		{"POST", "/anthropic/v1/files"}, {"GET", "/anthropic/v1/files"}, {"POST", "/anthropic/v1/complete"},
	},
	provider.Google: {
		{"POST", "/google/v1beta/files"}, {"GET", "/google/v1beta/files"}, {"POST", "/google/v1beta/cachedContents"},
		{"POST", "/google/v1beta/tunedModels"}, {"POST", "/google/v1beta/models/gemini-2.5-flash:predict"},
		{"POST", "/google/v1beta/models/gemini-2.5-flash:batchGenerateContent"}, {"DELETE", "/google/v1beta/models/x"},
		{"POST", "/google/upload/v1beta/files"},
	},
}

func TestSharedAllowlist(t *testing.T) {
	st := teststack.Start(t)
	shared := st.Token(t, "shared-mailbox")
	for _, p := range provider.Names {
		st.UseBYOK(t, "byok-mailbox", p)
	}
	own := st.Token(t, "byok-mailbox")
	for p, endpoints := range forbiddenOnShared {
		for _, ep := range endpoints {
			up := st.Upstreams[p]
			up.Reset()
			resp, body := st.Do(t, ep[0], ep[1], shared, `{}`, sdkHeaders(p)...)
			if resp.StatusCode != 403 {
				t.Errorf("shared %s %s: status %d, want 403", ep[0], ep[1], resp.StatusCode)
			}
			if !inShape(p, body, "permission_error", "forbidden", "PERMISSION_DENIED") {
				t.Errorf("shared %s %s: not in %s's 403 shape: %s", ep[0], ep[1], p, body)
			}
			if n := len(up.Requests()); n != 0 {
				t.Errorf("shared %s %s: forwarded %d requests", ep[0], ep[1], n)
			}

			resp, _ = st.Do(t, ep[0], ep[1], own, `{}`, sdkHeaders(p)...)
			reqs := up.Requests()
			if len(reqs) != 1 {
				t.Errorf("byok %s %s: forwarded %d requests, want 1 (status %d)", ep[0], ep[1], len(reqs), resp.StatusCode)
				continue
			}
			wantPath := strings.TrimPrefix(ep[1], "/"+p)
			if reqs[0].Method != ep[0] || reqs[0].Path != wantPath || reqs[0].Key != teststack.BYOKKeys[p] {
				t.Errorf("byok %s %s: upstream saw %s %s with key %q", ep[0], ep[1], reqs[0].Method, reqs[0].Path, reqs[0].Key)
			}
		}
	}
}

// TestSharedWrongBaseURL checks that a path from a wrong base URL still gets
// a 403 on the shared key, with a message that names the base URL to use.
func TestSharedWrongBaseURL(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "base-url@example.com")
	tests := []struct {
		path, want string
	}{
		{"/openai/chat/completions", "this proxy's /openai/v1"},
		{"/anthropic/v1/v1/messages", "this proxy's /anthropic"},
		{"/google/models/gemini-2.5-flash:generateContent", "this proxy's /google"},
		{"/openai/v1/files", "use your own key"},
	}
	for _, tt := range tests {
		p := strings.Split(tt.path, "/")[1]
		up := st.Upstreams[p]
		up.Reset()
		resp, body := st.Do(t, "POST", tt.path, token, `{}`, sdkHeaders(p)...)
		if resp.StatusCode != 403 {
			t.Errorf("%s: status %d, want 403", tt.path, resp.StatusCode)
		}
		if !strings.Contains(string(body), tt.want) {
			t.Errorf("%s: message does not contain %q: %s", tt.path, tt.want, body)
		}
		if n := len(up.Requests()); n != 0 {
			t.Errorf("%s: forwarded %d requests", tt.path, n)
		}
	}
}

func inShape(p string, body []byte, anthropicType, openaiCode, googleStatus string) bool {
	var m map[string]any
	if json.Unmarshal(body, &m) != nil {
		return false
	}
	e, _ := m["error"].(map[string]any)
	switch p {
	case provider.Anthropic:
		return m["type"] == "error" && e["type"] == anthropicType && e["message"] != ""
	case provider.OpenAI:
		return e["code"] == openaiCode && e["message"] != ""
	}
	return e["status"] == googleStatus && e["message"] != ""
}

func TestSharedModelsAndOrgHeaders(t *testing.T) {
	st := teststack.Start(t, func(c *config.Config) {
		c.Provider(provider.OpenAI).SharedModels = []string{"gpt-4o-mini"}
		c.Provider(provider.OpenAI).Project = "proj_platform"
		c.Provider(provider.Google).SharedModels = []string{"gemini-2.5-flash"}
	})
	token := st.Token(t, "models@example.com")
	up := st.Upstreams[provider.OpenAI]

	resp, _ := st.Do(t, "POST", "/openai/v1/chat/completions", token,
		`{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}`)
	if resp.StatusCode != 403 {
		t.Errorf("model outside shared_models: status %d, want 403", resp.StatusCode)
	}
	resp, body := st.Do(t, "POST", "/openai/v1/chat/completions", token, `{"messages":[]}`)
	if resp.StatusCode != 403 {
		t.Errorf("no model with shared_models set: status %d, want 403", resp.StatusCode)
	}
	if !strings.Contains(string(body), "names no model") {
		t.Errorf("no model with shared_models set: message does not say the model is missing: %s", body)
	}
	resp, _ = st.Do(t, "POST", "/openai/v1/chat/completions", token, nonStream[provider.OpenAI].body,
		"OpenAI-Organization", "org-client", "OpenAI-Project", "proj_client")
	if resp.StatusCode != 200 {
		t.Fatalf("allowed model: status %d", resp.StatusCode)
	}
	got := up.Requests()[len(up.Requests())-1].Header
	if got.Get("OpenAI-Organization") != "" {
		t.Errorf("client's OpenAI-Organization forwarded on shared: %q", got.Get("OpenAI-Organization"))
	}
	if got.Get("OpenAI-Project") != "proj_platform" {
		t.Errorf("OpenAI-Project = %q, want the configured proj_platform", got.Get("OpenAI-Project"))
	}
	resp, _ = st.Do(t, "POST", "/google/v1beta/models/gemini-2.5-pro:generateContent", token, nonStream[provider.Google].body)
	if resp.StatusCode != 403 {
		t.Errorf("Google model outside shared_models: status %d, want 403", resp.StatusCode)
	}
}

func TestPreviousResponseOwnership(t *testing.T) {
	st := teststack.Start(t)
	alice := st.Token(t, "alice")
	mallory := st.Token(t, "mallory")
	resp, body := st.Do(t, "POST", "/openai/v1/responses", alice, `{"model":"gpt-4o-mini","input":"hello"}`)
	if resp.StatusCode != 200 {
		t.Fatalf("create response: %d %s", resp.StatusCode, body)
	}
	var created struct{ ID string }
	json.Unmarshal(body, &created)
	if !strings.HasPrefix(created.ID, "resp_") {
		t.Fatalf("no response id in %s", body)
	}
	st.WaitAudit(t)

	follow := `{"model":"gpt-4o-mini","input":"more","previous_response_id":"` + created.ID + `"}`
	resp, body = st.Do(t, "POST", "/openai/v1/responses", alice, follow)
	if resp.StatusCode != 200 {
		t.Errorf("owner continuing its response: %d %s", resp.StatusCode, body)
	}
	n := len(st.Upstreams[provider.OpenAI].Requests())
	resp, _ = st.Do(t, "POST", "/openai/v1/responses", mallory, follow)
	if resp.StatusCode != 403 {
		t.Errorf("another mailbox continuing the response: status %d, want 403", resp.StatusCode)
	}
	if len(st.Upstreams[provider.OpenAI].Requests()) != n {
		t.Error("a foreign previous_response_id was forwarded")
	}
}

func TestRevokedTokenOnOtherReplica(t *testing.T) {
	a := teststack.Start(t)
	b := a.Replica(t)
	old := a.Token(t, "revoke@example.com")
	c := nonStream[provider.OpenAI]
	if resp, _ := b.Do(t, "POST", c.path, old, c.body); resp.StatusCode != 200 {
		t.Fatalf("token before revocation on replica B: %d", resp.StatusCode)
	}
	code, body := a.AdminDo(t, "POST", "/admin/v1/mailboxes/revoke@example.com/token/revoke", nil)
	if code != 200 {
		t.Fatalf("revoke: %d %s", code, body)
	}
	var fresh struct{ Token string }
	json.Unmarshal(body, &fresh)

	// Replica B may have cached the old generation; the revocation's notice
	// or, failing that, the cache's TTL must end its use within a second.
	start := time.Now()
	for {
		resp, body := b.Do(t, "POST", c.path, old, c.body)
		if resp.StatusCode == 401 {
			t.Logf("revoked token refused by replica B after %v", time.Since(start))
			break
		}
		if resp.StatusCode != 200 {
			t.Fatalf("revoked token on replica B: status %d: %s", resp.StatusCode, body)
		}
		if time.Since(start) > keystore.MaxCacheTTL {
			t.Fatalf("revoked token on replica B: still accepted after %v", keystore.MaxCacheTTL)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if resp, _ := b.Do(t, "POST", c.path, fresh.Token, c.body); resp.StatusCode != 200 {
		t.Errorf("new token on replica B: status %d", resp.StatusCode)
	}
}

func TestNewerTokenOnReplicaWithOldRecord(t *testing.T) {
	a := teststack.Start(t)
	b := a.Replica(t)
	const m = "newer-token@example.com"
	old := a.Token(t, m)
	c := nonStream[provider.OpenAI]
	if resp, _ := b.Do(t, "POST", c.path, old, c.body); resp.StatusCode != 200 {
		t.Fatalf("token before the revocation on replica B: %d", resp.StatusCode)
	}
	// Replica B now holds generation 0. Raise it in Redis without a change
	// notice, as if the notice were lost, and issue a token for the new one.
	ctx := context.Background()
	if err := a.RDB.HIncrBy(ctx, a.Store.Layout().Mailbox(m), "gen", 1).Err(); err != nil {
		t.Fatal(err)
	}
	fresh := a.Signer.Issue(mailbox.ID(m), 1)
	if resp, body := b.Do(t, "POST", c.path, fresh, c.body); resp.StatusCode != 200 {
		t.Errorf("token newer than replica B's record: status %d, want 200: %s", resp.StatusCode, body)
	}
	// Reading the newer generation also ends the old token at once.
	if resp, _ := b.Do(t, "POST", c.path, old, c.body); resp.StatusCode != 401 {
		t.Errorf("old token after replica B read the newer generation: status %d, want 401", resp.StatusCode)
	}
}

func TestCopiedCiphertextRejected(t *testing.T) {
	st := teststack.Start(t)
	p := provider.OpenAI
	st.UseBYOK(t, "victim", p)
	st.UseBYOK(t, "thief", p)
	// Overwrite the thief's ciphertext with the victim's, as someone with
	// write access to Redis could.
	ctx := context.Background()
	layout := st.Store.Layout()
	ct, err := st.RDB.HGet(ctx, layout.Mailbox("victim"), "ct:"+p).Result()
	if err != nil {
		t.Fatal(err)
	}
	if err := st.RDB.HSet(ctx, layout.Mailbox("thief"), "ct:"+p, ct).Err(); err != nil {
		t.Fatal(err)
	}
	before := testutil.ToFloat64(st.Metrics.KeyErrors.WithLabelValues(p, "wrong_binding"))
	st.Upstreams[p].Reset()
	resp, body := st.Do(t, "POST", nonStream[p].path, st.Token(t, "thief"), nonStream[p].body)
	if resp.StatusCode != 503 {
		t.Errorf("copied ciphertext: status %d, want 503: %s", resp.StatusCode, body)
	}
	// Retrying cannot help until the key is stored again.
	if got := resp.Header.Get("X-Should-Retry"); got != "false" {
		t.Errorf("copied ciphertext: X-Should-Retry %q, want false", got)
	}
	if n := len(st.Upstreams[p].Requests()); n != 0 {
		t.Errorf("upstream got %d requests with the victim's key", n)
	}
	if got := testutil.ToFloat64(st.Metrics.KeyErrors.WithLabelValues(p, "wrong_binding")); got != before+1 {
		t.Errorf("wrong_binding count = %v, want %v", got, before+1)
	}

	// The audit event names the key that could not be used by its last
	// four, as every byok event does.
	st.WaitAudit(t)
	wantLast4, err := st.RDB.HGet(ctx, layout.Mailbox("thief"), "last4:"+p).Result()
	if err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, e := range st.AuditEvents(t) {
		if e["mailbox"] != "thief" || e["status"] != float64(503) {
			continue
		}
		found = true
		if e["kind"] != "byok" || e["key_last4"] != wantLast4 {
			t.Errorf("audit event of the rejected key: kind %v, key_last4 %v, want byok and %q", e["kind"], e["key_last4"], wantLast4)
		}
	}
	if !found {
		t.Error("no audit event for the request with the copied ciphertext")
	}
}

func TestDeletedMailbox(t *testing.T) {
	st := teststack.Start(t)
	m := "gone@example.com"
	for _, p := range provider.Names {
		st.UseBYOK(t, m, p)
	}
	code, _ := st.AdminDo(t, "PUT", "/admin/v1/mailboxes/"+m+"/limit", map[string]any{"monthly_token_limit": 5})
	if code != 200 {
		t.Fatalf("set limit: %d", code)
	}
	old := st.Token(t, m)
	if resp, _ := st.Do(t, "POST", nonStream[provider.OpenAI].path, old, nonStream[provider.OpenAI].body); resp.StatusCode != 200 {
		t.Fatalf("request before delete: %d", resp.StatusCode)
	}
	st.WaitAudit(t)
	if code, body := st.AdminDo(t, "DELETE", "/admin/v1/mailboxes/"+m, nil); code != 204 {
		t.Fatalf("delete: %d %s", code, body)
	}
	code, body := st.AdminDo(t, "GET", "/admin/v1/mailboxes/"+m, nil)
	if code != 200 {
		t.Fatalf("get after delete: %d", code)
	}
	var view struct {
		Providers map[string]struct {
			Source string `json:"source"`
			HasKey bool   `json:"has_key"`
			Last4  string `json:"last4"`
		}
	}
	json.Unmarshal(body, &view)
	for _, p := range provider.Names {
		if s := view.Providers[p]; s.Source != "shared" || s.HasKey || s.Last4 != "" {
			t.Errorf("%s after delete: %+v, want shared with no key", p, s)
		}
	}
	if resp, _ := st.Do(t, "POST", nonStream[provider.OpenAI].path, old, nonStream[provider.OpenAI].body); resp.StatusCode != 401 {
		t.Errorf("old token after delete: status %d, want 401", resp.StatusCode)
	}
	// A token issued after the delete is a new generation, never an old one.
	fresh := st.Token(t, m)
	if fresh == old {
		t.Error("token after delete equals the token before it")
	}
	code, body = st.AdminDo(t, "GET", "/admin/v1/mailboxes/"+m+"/usage", nil)
	if code != 200 || !strings.Contains(string(body), `"requests":1`) {
		t.Errorf("usage history lost after delete: %d %s", code, body)
	}
	if !strings.Contains(string(body), `"limit":null`) {
		t.Errorf("limit kept after delete: %s", body)
	}
	var deleted bool
	for _, e := range st.AuditEvents(t) {
		if e["kind"] == "mailbox.deleted" && e["mailbox"] == m {
			deleted = true
		}
	}
	if !deleted {
		t.Error("no mailbox.deleted audit event")
	}
}

func TestUpstreamErrorScrubbed(t *testing.T) {
	st := teststack.Start(t)
	for _, p := range provider.Names {
		up := st.Upstreams[p]
		up.SetEchoKeyInErrors(true)
		up.SetKeys() // every key is now wrong, so the upstream returns 401 or 400
		resp, body := st.Do(t, "POST", nonStream[p].path, st.Token(t, "scrub"), nonStream[p].body, sdkHeaders(p)...)
		if resp.StatusCode < 400 {
			t.Errorf("%s: status %d, want the provider's error", p, resp.StatusCode)
		}
		key := teststack.SharedKeys[p]
		if strings.Contains(string(body), key) || strings.Contains(string(body), key[:12]) {
			t.Errorf("%s: error body carries the key: %s", p, body)
		}
		if strings.Contains(string(body), "***") {
			t.Errorf("%s: error body carries a masked key: %s", p, body)
		}
		up.SetKeys(teststack.SharedKeys[p], teststack.BYOKKeys[p])
		up.SetEchoKeyInErrors(false)
	}
}

func TestUnknownProviderAndBadPath(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "paths")
	resp, body := st.Do(t, "POST", "/mistral/v1/chat", token, `{}`)
	if resp.StatusCode != 404 || !strings.Contains(string(body), `"not_found"`) {
		t.Errorf("unknown provider: %d %s", resp.StatusCode, body)
	}
	if !strings.Contains(string(body), `unknown provider prefix \"/mistral/\"`) {
		t.Errorf("unknown provider: message does not name the prefix: %s", body)
	}
	resp, body = st.Do(t, "GET", "/", token, "")
	if resp.StatusCode != 404 || !strings.Contains(string(body), "missing provider prefix") {
		t.Errorf("no provider prefix: %d %s", resp.StatusCode, body)
	}
	resp, body = st.Do(t, "POST", "/anthropic/v1/x", token, `{}`, "Anthropic-Version", "2023-06-01")
	_ = body
	if resp.StatusCode == 404 {
		t.Log("anthropic unknown path forwarded and answered 404 by upstream")
	}
	for _, path := range []string{"/openai/v1/%2e%2e/files", "/openai/v1%2ffiles", "/openai/v1/chat/completions/..%2f..%2ffiles"} {
		req, _ := http.NewRequest("POST", st.ProxyURL+path, strings.NewReader("{}"))
		req.Header.Set("Authorization", "Bearer "+token)
		r, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		r.Body.Close()
		if r.StatusCode != 400 {
			t.Errorf("%s: status %d, want 400", path, r.StatusCode)
		}
	}
}

func TestDuplicateModelAndMailboxHeaders(t *testing.T) {
	st := teststack.Start(t, func(c *config.Config) {
		c.Auth.TrustMailboxHeader = true
		c.Provider(provider.OpenAI).SharedModels = []string{"gpt-4o-mini"}
	})
	c := nonStream[provider.OpenAI]
	resp, body := st.Do(t, "POST", c.path, st.Token(t, "dup"),
		`{"model":"o1-pro","model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`)
	if resp.StatusCode != 400 {
		t.Errorf("two model keys on the shared key: status %d, want 400", resp.StatusCode)
	}
	if !strings.Contains(string(body), `names \"model\" more than once`) {
		t.Errorf("two model keys on the shared key: message does not name the field: %s", body)
	}
	req, _ := http.NewRequest("POST", st.ProxyURL+c.path, strings.NewReader(c.body))
	req.Header.Add("X-Mailbox-Id", "alice")
	req.Header.Add("X-Mailbox-Id", "bob")
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	r.Body.Close()
	if r.StatusCode != 400 {
		t.Errorf("two X-Mailbox-Id headers: status %d, want 400", r.StatusCode)
	}
	if n := len(st.Upstreams[provider.OpenAI].Requests()); n != 0 {
		t.Errorf("upstream got %d requests", n)
	}
}

// TestFieldNamesMatchExactly sends bodies that name a field the proxy checks
// in another letter case. The provider reads only the exact name, so the
// proxy must check the exact one too and ignore the other.
func TestFieldNamesMatchExactly(t *testing.T) {
	st := teststack.Start(t, func(c *config.Config) {
		c.Provider(provider.OpenAI).SharedModels = []string{"gpt-4o-mini"}
	})
	up := st.Upstreams[provider.OpenAI]

	t.Run("model", func(t *testing.T) {
		before := len(up.Requests())
		resp, body := st.Do(t, "POST", "/openai/v1/chat/completions", st.Token(t, "case-model"),
			`{"model":"o1-pro","MODEL":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`)
		if resp.StatusCode != 403 {
			t.Errorf("status %d, want 403: %s", resp.StatusCode, body)
		}
		if n := len(up.Requests()) - before; n != 0 {
			t.Errorf("upstream got %d requests for a model outside shared_models", n)
		}
	})

	t.Run("previous_response_id", func(t *testing.T) {
		resp, body := st.Do(t, "POST", "/openai/v1/responses", st.Token(t, "case-owner"), `{"model":"gpt-4o-mini","input":"hello"}`)
		if resp.StatusCode != 200 {
			t.Fatalf("create response: %d %s", resp.StatusCode, body)
		}
		var created struct{ ID string }
		if err := json.Unmarshal(body, &created); err != nil || created.ID == "" {
			t.Fatalf("no response id in %s", body)
		}
		st.WaitAudit(t)

		before := len(up.Requests())
		follow := `{"model":"gpt-4o-mini","input":"more","previous_response_id":"` + created.ID + `","Previous_Response_Id":""}`
		resp, body = st.Do(t, "POST", "/openai/v1/responses", st.Token(t, "case-other"), follow)
		if resp.StatusCode != 403 {
			t.Errorf("another mailbox continuing the response: status %d, want 403: %s", resp.StatusCode, body)
		}
		if n := len(up.Requests()) - before; n != 0 {
			t.Errorf("upstream got %d requests naming another mailbox's response", n)
		}
	})

	t.Run("include_usage", func(t *testing.T) {
		before := len(up.Requests())
		resp, body := st.Do(t, "POST", "/openai/v1/chat/completions", st.Token(t, "case-usage"),
			`{"model":"gpt-4o-mini","stream":true,"stream_options":{"INCLUDE_USAGE":true},"messages":[{"role":"user","content":"hi"}]}`)
		if resp.StatusCode != 200 {
			t.Fatalf("status %d: %s", resp.StatusCode, body)
		}
		reqs := up.Requests()
		if len(reqs) != before+1 {
			t.Fatalf("upstream got %d requests, want 1", len(reqs)-before)
		}
		var sent struct {
			StreamOptions map[string]any `json:"stream_options"`
		}
		if err := json.Unmarshal(reqs[before].Body, &sent); err != nil {
			t.Fatalf("upstream body: %v", err)
		}
		if sent.StreamOptions["include_usage"] != true {
			t.Errorf("upstream stream_options %v lack include_usage=true, so the stream would go unmetered", sent.StreamOptions)
		}
	})
}

func TestQueryCredentialsNeverForwarded(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "query-creds@example.com")
	up := st.Upstreams[provider.Google]
	c := nonStream[provider.Google]
	base, _, _ := strings.Cut(c.path, "?")
	queries := []string{
		"KEY=" + token,
		"Key=" + token + "&alt=json",
		"access_token=ya29.client-oauth-token",
		"%6Bey=" + token,
		"alt=json;key=" + token,
		"api_key=" + token + "&oauth_token=x&Bearer_Token=y",
		"$key=" + token,
		"%24KEY=" + token,
		"userProject=other-project",
		"$userProject=other-project",
	}
	for _, q := range queries {
		up.Reset()
		resp, body := st.Do(t, "POST", base+"?prettyPrint=1&"+q+"&$.xgafv=%2F", token, c.body, "X-Goog-User-Project", "client-project")
		if resp.StatusCode != 200 {
			t.Errorf("%s: status %d: %s", q, resp.StatusCode, body)
			continue
		}
		got := up.Requests()[0]
		lower := strings.ToLower(got.RawQuery)
		for _, leaked := range []string{strings.ToLower(token), "ya29", "key", "token", "project"} {
			if strings.Contains(lower, leaked) {
				t.Errorf("%s: upstream query %q still carries %q", q, got.RawQuery, leaked)
			}
		}
		// httputil.ReverseProxy re-encodes, and so sorts, a query in which
		// it drops a part with a semicolon.
		if !strings.Contains(q, ";") && (!strings.HasPrefix(got.RawQuery, "prettyPrint=1&") || !strings.HasSuffix(got.RawQuery, "&$.xgafv=%2F")) {
			t.Errorf("%s: other parameters changed or reordered: %q", q, got.RawQuery)
		}
		if v := got.Header.Get("X-Goog-User-Project"); v != "" {
			t.Errorf("%s: the client's billing project reached the upstream on the shared key: %q", q, v)
		}
	}
}

// TestMethodOverrideRejected sends POST requests that ask the upstream to act
// on another method. The proxy checks the shared key's endpoints by the
// request's own method, so such a request must not reach the upstream, on
// either key source.
func TestMethodOverrideRejected(t *testing.T) {
	st := teststack.Start(t)
	tokens := []string{st.Token(t, "override-shared"), useBYOKEverywhere(t, st, "override-byok")}
	for _, token := range tokens {
		for _, p := range provider.Names {
			c := nonStream[p]
			before := upstreamRequests(st)
			for _, extra := range [][]string{
				{"X-HTTP-Method-Override", "DELETE"},
				{"X-Method-Override", "DELETE"},
			} {
				resp, body := st.Do(t, "POST", c.path, token, c.body, append(sdkHeaders(p), extra...)...)
				if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "method override") {
					t.Errorf("%s with %s: %d %s, want 400 naming the override", p, extra[0], resp.StatusCode, body)
				}
			}
			resp, body := st.Do(t, "POST", c.path+"?$httpMethod=DELETE", token, c.body, sdkHeaders(p)...)
			if resp.StatusCode != http.StatusBadRequest {
				t.Errorf("%s with $httpMethod: %d %s, want 400", p, resp.StatusCode, body)
			}
			if n := upstreamRequests(st) - before; n != 0 {
				t.Errorf("%s: %d overriding requests reached the upstream", p, n)
			}
		}
	}
}
