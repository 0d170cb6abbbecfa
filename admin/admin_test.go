package admin_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"filippo.io/age"
	"filippo.io/age/armor"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/admin"
	"github.com/byokproxy/byokproxy/audit"
	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/internal/upstreamtest"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/metrics"
	"github.com/byokproxy/byokproxy/provider"
	"github.com/byokproxy/byokproxy/proxy"
)

const requestTimeout = 10 * time.Second

// fixture is an admin API and a proxy handler on one real Redis, with
// emulated providers behind the proxy.
type fixture struct {
	admin      *httptest.Server
	api        *admin.API
	proxy      *httptest.Server
	store      *keystore.Store
	rdb        *redis.Client
	redis      *redistest.Server
	prefix     string
	signer     *mailbox.Signer
	ids        *keystore.Identities
	token      string
	upstreams  map[string]*upstreamtest.Server
	sharedKeys map[string]string
}

func randomText(t *testing.T, n int) string {
	t.Helper()
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatalf("random: %v", err)
	}
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

// newKey returns a random key in the provider's format.
func newKey(t *testing.T, prov string) string {
	t.Helper()
	switch prov {
	case provider.Anthropic:
		return "sk-ant-api03-" + randomText(t, 40)
	case provider.OpenAI:
		return "sk-proj-" + randomText(t, 40)
	default:
		return "AIza" + randomText(t, 35)
	}
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	rs := redistest.Start(t)
	f := &fixture{
		redis:      rs,
		prefix:     rs.Prefix(t),
		rdb:        rs.Client(t),
		token:      randomText(t, 32),
		upstreams:  map[string]*upstreamtest.Server{},
		sharedKeys: map[string]string{},
	}
	ids, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatalf("GenerateIdentities: %v", err)
	}
	f.ids = ids
	f.store = keystore.New(f.rdb, f.prefix, ids)
	f.signer, err = mailbox.NewSigner([]string{randomText(t, 32)})
	if err != nil {
		t.Fatalf("NewSigner: %v", err)
	}

	cfg := config.Defaults()
	for _, p := range provider.Names {
		f.sharedKeys[p] = newKey(t, p)
		srv := upstreamtest.New(p, false, f.sharedKeys[p])
		t.Cleanup(srv.Close)
		f.upstreams[p] = srv
		cfg.Providers[p].Upstream = srv.URL
		cfg.Providers[p].SharedKey = f.sharedKeys[p]
		cfg.Providers[p].ProbeTimeout = 5 * time.Second
	}

	writer := audit.NewWriter(f.rdb, f.store.Layout(), audit.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	go writer.Run(ctx)
	t.Cleanup(func() {
		closeCtx, done := context.WithTimeout(context.Background(), 5*time.Second)
		defer done()
		writer.Close(closeCtx)
		cancel()
	})

	f.api = admin.New(admin.Options{
		Store: f.store, Signer: f.signer, Audit: writer, Token: f.token,
		Prober: proxy.NewProber(cfg),
	})
	f.admin = httptest.NewServer(f.api)
	t.Cleanup(f.admin.Close)

	handler, err := proxy.New(proxy.Options{
		Config: cfg, Store: f.store, Signer: f.signer, Audit: writer,
		Metrics: metrics.New(prometheus.NewRegistry()),
	})
	if err != nil {
		t.Fatalf("proxy.New: %v", err)
	}
	f.proxy = httptest.NewServer(handler)
	t.Cleanup(f.proxy.Close)
	return f
}

// call sends an admin request with the admin token and returns the status
// and body.
func (f *fixture) call(t *testing.T, method, path, body string) (int, []byte) {
	t.Helper()
	return f.callWith(t, method, path, body, "Bearer "+f.token)
}

func (f *fixture) callWith(t *testing.T, method, path, body, authorization string) (int, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	var reader io.Reader
	if body != "" {
		reader = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, f.admin.URL+path, reader)
	if err != nil {
		t.Fatalf("build request: %v", err)
	}
	if authorization != "" {
		req.Header.Set("Authorization", authorization)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body of %s %s: %v", method, path, err)
	}
	return resp.StatusCode, data
}

// mustCall sends an admin request and fails the test unless it returns want.
func (f *fixture) mustCall(t *testing.T, want int, method, path, body string) []byte {
	t.Helper()
	status, data := f.call(t, method, path, body)
	if status != want {
		t.Fatalf("%s %s: status %d, want %d; body %s", method, path, status, want, data)
	}
	return data
}

func (f *fixture) putKey(t *testing.T, m, prov, key string) keystore.Status {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"key": key})
	data := f.mustCall(t, http.StatusOK, http.MethodPut, "/admin/v1/mailboxes/"+m+"/providers/"+prov+"/key", string(body))
	var st keystore.Status
	if err := json.Unmarshal(data, &st); err != nil {
		t.Fatalf("decode status %s: %v", data, err)
	}
	return st
}

func (f *fixture) issueToken(t *testing.T, m, action string) string {
	t.Helper()
	path := "/admin/v1/mailboxes/" + m + "/token"
	if action == "revoke" {
		path += "/revoke"
	}
	data := f.mustCall(t, http.StatusOK, http.MethodPost, path, "")
	var body struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal(data, &body); err != nil || body.Token == "" {
		t.Fatalf("decode token %s: %v", data, err)
	}
	return body.Token
}

// proxyStatus sends GET /openai/v1/models through the proxy with token and
// returns the status.
func (f *fixture) proxyStatus(t *testing.T, token string) int {
	t.Helper()
	status, _ := f.proxyChat(t, provider.OpenAI, token)
	return status
}

// proxyChat sends the smallest generation request of prov through the proxy
// with token and returns the status and body.
func (f *fixture) proxyChat(t *testing.T, prov, token string) (int, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	var path, body string
	switch prov {
	case provider.Anthropic:
		path, body = "/anthropic/v1/messages", `{"model":"claude-haiku-4-5","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}`
	case provider.OpenAI:
		path, body = "/openai/v1/chat/completions", `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`
	default:
		path, body = "/google/v1beta/models/gemini-2.5-flash:generateContent", `{"contents":[{"parts":[{"text":"hi"}]}]}`
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, f.proxy.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatalf("build request: %v", err)
	}
	req.Header.Set("Content-Type", "application/json")
	provider.Lookup(prov).SetAuth(req.Header, token)
	if prov == provider.Anthropic {
		req.Header.Set("Anthropic-Version", "2023-06-01")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("proxy request: %v", err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, data
}

type mailboxAnswer struct {
	Mailbox   string                     `json:"mailbox"`
	Providers map[string]keystore.Status `json:"providers"`
}

func (f *fixture) getMailbox(t *testing.T, m string) mailboxAnswer {
	t.Helper()
	data := f.mustCall(t, http.StatusOK, http.MethodGet, "/admin/v1/mailboxes/"+m, "")
	var mb mailboxAnswer
	if err := json.Unmarshal(data, &mb); err != nil {
		t.Fatalf("decode mailbox %s: %v", data, err)
	}
	return mb
}

// routes lists every admin route with a valid body.
var routes = []struct {
	method, path, body string
}{
	{http.MethodGet, "/admin/v1/mailboxes/alice", ""},
	{http.MethodDelete, "/admin/v1/mailboxes/alice", ""},
	{http.MethodPut, "/admin/v1/mailboxes/alice/providers/openai/key", `{"key":"sk-proj-abcdefghijklmnop"}`},
	{http.MethodDelete, "/admin/v1/mailboxes/alice/providers/openai/key", ""},
	{http.MethodPut, "/admin/v1/mailboxes/alice/providers/openai/source", `{"source":"shared"}`},
	{http.MethodPost, "/admin/v1/mailboxes/alice/providers/openai/test", ""},
	{http.MethodPost, "/admin/v1/mailboxes/alice/token", ""},
	{http.MethodPost, "/admin/v1/mailboxes/alice/token/revoke", ""},
	{http.MethodGet, "/admin/v1/mailboxes/alice/usage", ""},
	{http.MethodPut, "/admin/v1/mailboxes/alice/limit", `{"monthly_token_limit":10}`},
	{http.MethodGet, "/admin/v1/recipient", ""},
}

func TestAdminRejectsMissingOrWrongToken(t *testing.T) {
	f := newFixture(t)
	auths := map[string]string{
		"no header":       "",
		"wrong token":     "Bearer " + randomText(t, 32),
		"token prefix":    "Bearer " + f.token[:len(f.token)-1],
		"basic scheme":    "Basic " + f.token,
		"empty bearer":    "Bearer ",
		"token no scheme": f.token,
	}
	for _, r := range routes {
		for name, auth := range auths {
			t.Run(r.method+" "+r.path+"/"+name, func(t *testing.T) {
				status, body := f.callWith(t, r.method, r.path, r.body, auth)
				if status != http.StatusUnauthorized {
					t.Fatalf("status %d, want 401; body %s", status, body)
				}
				if strings.Contains(string(body), f.token) {
					t.Errorf("401 body contains the admin token")
				}
			})
		}
	}
	// Nothing the rejected requests carried reached Redis.
	if dump := f.redis.Dump(t, f.prefix); len(dump) != 0 {
		t.Errorf("rejected requests changed Redis: %v", dump)
	}
}

func TestAdminSetTokenReplacesToken(t *testing.T) {
	f := newFixture(t)
	next := randomText(t, 32)
	f.api.SetToken(next)
	if status, _ := f.call(t, http.MethodGet, "/admin/v1/recipient", ""); status != http.StatusUnauthorized {
		t.Errorf("old token after SetToken: status %d, want 401", status)
	}
	if status, _ := f.callWith(t, http.MethodGet, "/admin/v1/recipient", "", "Bearer "+next); status != http.StatusOK {
		t.Errorf("new token after SetToken: status %d, want 200", status)
	}
}

func TestAdminRejectsInvalidMailboxAndProvider(t *testing.T) {
	f := newFixture(t)
	long := strings.Repeat("a", mailbox.MaxIDLength+1)
	cases := []struct {
		name, method, path, body string
	}{
		{"mailbox with !", http.MethodGet, "/admin/v1/mailboxes/bad!id", ""},
		{"mailbox with space", http.MethodGet, "/admin/v1/mailboxes/bad%20id", ""},
		{"mailbox with brace", http.MethodGet, "/admin/v1/mailboxes/a%7Bb%7D", ""},
		{"mailbox too long", http.MethodGet, "/admin/v1/mailboxes/" + long, ""},
		{"mailbox delete", http.MethodDelete, "/admin/v1/mailboxes/bad!id", ""},
		{"mailbox on key", http.MethodPut, "/admin/v1/mailboxes/bad!id/providers/openai/key", `{"key":"sk-proj-abcdefghijklmnop"}`},
		{"mailbox on token", http.MethodPost, "/admin/v1/mailboxes/bad!id/token", ""},
		{"mailbox on revoke", http.MethodPost, "/admin/v1/mailboxes/bad!id/token/revoke", ""},
		{"mailbox on usage", http.MethodGet, "/admin/v1/mailboxes/bad!id/usage", ""},
		{"mailbox on limit", http.MethodPut, "/admin/v1/mailboxes/bad!id/limit", `{"monthly_token_limit":1}`},
		{"provider on key", http.MethodPut, "/admin/v1/mailboxes/alice/providers/mistral/key", `{"key":"sk-proj-abcdefghijklmnop"}`},
		{"provider on key delete", http.MethodDelete, "/admin/v1/mailboxes/alice/providers/mistral/key", ""},
		{"provider on source", http.MethodPut, "/admin/v1/mailboxes/alice/providers/OpenAI/source", `{"source":"shared"}`},
		{"provider on test", http.MethodPost, "/admin/v1/mailboxes/alice/providers/azure/test", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			status, body := f.call(t, c.method, c.path, c.body)
			if status != http.StatusBadRequest {
				t.Fatalf("status %d, want 400; body %s", status, body)
			}
			var e struct {
				Error struct {
					Status  int    `json:"status"`
					Message string `json:"message"`
				} `json:"error"`
			}
			if err := json.Unmarshal(body, &e); err != nil || e.Error.Message == "" || e.Error.Status != 400 {
				t.Errorf("body %s is not an error with status and message", body)
			}
		})
	}
}

func TestAdminGetEmptyMailbox(t *testing.T) {
	f := newFixture(t)
	mb := f.getMailbox(t, "nobody@example.com")
	if mb.Mailbox != "nobody@example.com" {
		t.Errorf("mailbox = %q", mb.Mailbox)
	}
	for _, p := range provider.Names {
		st, ok := mb.Providers[p]
		if !ok {
			t.Errorf("provider %s missing", p)
			continue
		}
		if st.Source != keystore.SourceShared || st.HasKey || st.Last4 != "" || st.UpdatedAt != nil {
			t.Errorf("%s = %+v, want shared with no key", p, st)
		}
	}
}

func TestAdminPutKeyEachProvider(t *testing.T) {
	f := newFixture(t)
	for _, p := range provider.Names {
		t.Run(p, func(t *testing.T) {
			key := newKey(t, p)
			before := time.Now().UTC().Truncate(time.Second)
			status, body := f.call(t, http.MethodPut, "/admin/v1/mailboxes/bob+test@example.com/providers/"+p+"/key", `{"key":"`+key+`"}`)
			if status != http.StatusOK {
				t.Fatalf("status %d, want 200; body %s", status, body)
			}
			if strings.Contains(string(body), key) {
				t.Errorf("answer contains the key: %s", body)
			}
			var st keystore.Status
			if err := json.Unmarshal(body, &st); err != nil {
				t.Fatalf("decode %s: %v", body, err)
			}
			if !st.HasKey || st.Last4 != key[len(key)-4:] {
				t.Errorf("status %+v, want has_key and last4 %q", st, key[len(key)-4:])
			}
			if st.Source != keystore.SourceShared {
				t.Errorf("source %q after putting a key, want shared (putting a key keeps the source)", st.Source)
			}
			if st.UpdatedAt == nil || st.UpdatedAt.Before(before) || st.UpdatedAt.Location() != time.UTC {
				t.Errorf("updated_at = %v, want a UTC time at or after %v", st.UpdatedAt, before)
			}
			if !bytes.Contains(body, []byte(`"updated_at":"`+st.UpdatedAt.Format(time.RFC3339)+`"`)) {
				t.Errorf("updated_at is not RFC 3339 in UTC: %s", body)
			}
			for k, v := range f.redis.Dump(t, f.prefix) {
				if strings.Contains(v, key) {
					t.Errorf("Redis key %s holds the plaintext key", k)
				}
			}
		})
	}
	mb := f.getMailbox(t, "bob+test@example.com")
	for _, p := range provider.Names {
		if !mb.Providers[p].HasKey {
			t.Errorf("GET after PUT: %s has no key", p)
		}
	}
}

func TestAdminPutKeyRejectsInvalidInput(t *testing.T) {
	f := newFixture(t)
	anthropicKey := newKey(t, provider.Anthropic)
	openaiKey := newKey(t, provider.OpenAI)
	googleShort := "AIza" + randomText(t, 20)
	cases := []struct {
		name, prov, body string
		status           int
		want             string // part of the error message
		secret           string // must not appear in the response body
	}{
		{"anthropic key as openai", provider.OpenAI, `{"key":"` + anthropicKey + `"}`, 400, `key is "sk-"`, anthropicKey},
		{"openai key as anthropic", provider.Anthropic, `{"key":"` + openaiKey + `"}`, 400, `key is "sk-ant-"`, openaiKey},
		{"short google key", provider.Google, `{"key":"` + googleShort + `"}`, 400, `key is "AIza"`, googleShort},
		{"openai key as google", provider.Google, `{"key":"` + openaiKey + `"}`, 400, `key is "AIza"`, openaiKey},
		{"empty key", provider.OpenAI, `{"key":""}`, 400, `key is "sk-"`, ""},
		{"not JSON", provider.OpenAI, `key=` + openaiKey, 400, "not valid JSON", openaiKey},
		{"truncated JSON", provider.OpenAI, `{"key":"` + openaiKey, 400, "not valid JSON", openaiKey},
		{"key not a string", provider.OpenAI, `{"key":12345}`, 400, "not valid JSON", ""},
		{"no key field", provider.OpenAI, `{"value":"` + openaiKey + `"}`, 400, "exactly one of", openaiKey},
		{"key and age", provider.OpenAI, `{"key":"` + openaiKey + `","age":"x"}`, 400, "exactly one of", openaiKey},
		{"data after JSON", provider.OpenAI, `{"key":"` + openaiKey + `"} {}`, 400, "after the JSON", openaiKey},
		{"body too large", provider.OpenAI, `{"key":"` + strings.Repeat("a", 70<<10) + `"}`, 413, "exceeds", ""},
		{"age not ciphertext", provider.OpenAI, `{"age":"` + openaiKey + `"}`, 400, "recipient", openaiKey},
		{"key twice", provider.OpenAI, `{"key":"` + openaiKey + `","key":"` + newKey(t, provider.OpenAI) + `"}`, 400, `names "key" more than once`, openaiKey},
		{"key in upper case", provider.OpenAI, `{"KEY":"` + openaiKey + `"}`, 400, `names "key" in other letter case`, openaiKey},
		{"key in two cases", provider.OpenAI, `{"key":"` + openaiKey + `","Key":"` + newKey(t, provider.OpenAI) + `"}`, 400, `names "key" more than once`, openaiKey},
		{"other member twice", provider.OpenAI, `{"key":"` + openaiKey + `","` + openaiKey + `":1,"` + openaiKey + `":2}`, 400, "a member more than once", openaiKey},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			status, body := f.call(t, http.MethodPut, "/admin/v1/mailboxes/carol/providers/"+c.prov+"/key", c.body)
			if status != c.status {
				t.Fatalf("status %d, want %d; body %s", status, c.status, body)
			}
			if msg := errorMessage(t, body); !strings.Contains(msg, c.want) {
				t.Errorf("error message %q does not contain %q", msg, c.want)
			}
			if c.secret != "" && strings.Contains(string(body), c.secret) {
				t.Errorf("body echoes the key: %s", body)
			}
			if c.secret != "" && strings.Contains(string(body), c.secret[len(c.secret)-4:]) {
				t.Errorf("body contains the key's last four characters: %s", body)
			}
		})
	}
	if st := f.getMailbox(t, "carol").Providers; st[provider.OpenAI].HasKey || st[provider.Anthropic].HasKey || st[provider.Google].HasKey {
		t.Errorf("a rejected key was stored: %+v", st)
	}
}

// errorMessage returns the message of an admin error body.
func errorMessage(t *testing.T, body []byte) string {
	t.Helper()
	var e struct {
		Error struct {
			Message string `json:"message"`
		} `json:"error"`
	}
	if err := json.Unmarshal(body, &e); err != nil {
		t.Fatalf("error body %s is not JSON: %v", body, err)
	}
	return e.Error.Message
}

// seal encrypts a bare key to recipient, armored, as a client does before
// PUT .../key with {"age": ...}.
func seal(t *testing.T, recipient, key string) string {
	t.Helper()
	r, err := age.ParseX25519Recipient(recipient)
	if err != nil {
		t.Fatalf("parse recipient %q: %v", recipient, err)
	}
	var out bytes.Buffer
	aw := armor.NewWriter(&out)
	w, err := age.Encrypt(aw, r)
	if err != nil {
		t.Fatalf("age.Encrypt: %v", err)
	}
	io.WriteString(w, key+"\n")
	if err := w.Close(); err != nil {
		t.Fatalf("close age writer: %v", err)
	}
	if err := aw.Close(); err != nil {
		t.Fatalf("close armor writer: %v", err)
	}
	return out.String()
}

func TestAdminClientEncryptedKeyServesRequests(t *testing.T) {
	f := newFixture(t)
	data := f.mustCall(t, http.StatusOK, http.MethodGet, "/admin/v1/recipient", "")
	var rcpt struct {
		Recipient string `json:"recipient"`
	}
	if err := json.Unmarshal(data, &rcpt); err != nil {
		t.Fatalf("decode recipient %s: %v", data, err)
	}
	if rcpt.Recipient != f.ids.Recipient().String() {
		t.Fatalf("recipient %q, want the store's %q", rcpt.Recipient, f.ids.Recipient())
	}

	for _, p := range provider.Names {
		t.Run(p, func(t *testing.T) {
			key := newKey(t, p)
			f.upstreams[p].SetKeys(f.sharedKeys[p], key)
			body, _ := json.Marshal(map[string]string{"age": seal(t, rcpt.Recipient, key)})
			data := f.mustCall(t, http.StatusOK, http.MethodPut, "/admin/v1/mailboxes/dave/providers/"+p+"/key", string(body))
			var st keystore.Status
			if err := json.Unmarshal(data, &st); err != nil {
				t.Fatalf("decode %s: %v", data, err)
			}
			if st.Last4 != key[len(key)-4:] {
				t.Errorf("last4 %q, want %q", st.Last4, key[len(key)-4:])
			}
			f.mustCall(t, http.StatusOK, http.MethodPut, "/admin/v1/mailboxes/dave/providers/"+p+"/source", `{"source":"byok"}`)

			status, resp := f.proxyChat(t, p, f.issueToken(t, "dave", "issue"))
			if status != http.StatusOK {
				t.Fatalf("proxied request with the client-encrypted key: status %d, body %s", status, resp)
			}
			reqs := f.upstreams[p].Requests()
			if got := reqs[len(reqs)-1].Key; got != key {
				t.Errorf("upstream received key ending %q, want the stored key ending %q", got[max(len(got)-4, 0):], key[len(key)-4:])
			}
		})
	}

	t.Run("other recipient", func(t *testing.T) {
		other, err := age.GenerateX25519Identity()
		if err != nil {
			t.Fatalf("generate identity: %v", err)
		}
		key := newKey(t, provider.OpenAI)
		body, _ := json.Marshal(map[string]string{"age": seal(t, other.Recipient().String(), key)})
		status, resp := f.call(t, http.MethodPut, "/admin/v1/mailboxes/erin/providers/openai/key", string(body))
		if status != http.StatusBadRequest || !strings.Contains(string(resp), "GET /admin/v1/recipient") {
			t.Errorf("status %d, body %s; want 400 naming the recipient endpoint", status, resp)
		}
	})
	t.Run("sealed invalid key", func(t *testing.T) {
		key := newKey(t, provider.Anthropic)
		body, _ := json.Marshal(map[string]string{"age": seal(t, rcpt.Recipient, key)})
		status, resp := f.call(t, http.MethodPut, "/admin/v1/mailboxes/erin/providers/openai/key", string(body))
		if status != http.StatusBadRequest || !strings.Contains(errorMessage(t, resp), `key is "sk-"`) {
			t.Errorf("status %d, body %s; want 400 naming the expected prefix", status, resp)
		}
		if strings.Contains(string(resp), key) {
			t.Errorf("body echoes the key: %s", resp)
		}
	})
}

func TestAdminSourceSelection(t *testing.T) {
	f := newFixture(t)
	const path = "/admin/v1/mailboxes/frank/providers/anthropic/source"

	status, body := f.call(t, http.MethodPut, path, `{"source":"byok"}`)
	if status != http.StatusConflict {
		t.Fatalf("byok without key: status %d, want 409; body %s", status, body)
	}
	if got := f.getMailbox(t, "frank").Providers[provider.Anthropic].Source; got != keystore.SourceShared {
		t.Errorf("source after refused byok = %q, want shared", got)
	}

	for _, bad := range []string{`{"source":"BYOK"}`, `{"source":"metered"}`, `{"source":""}`, `{}`, `"byok"`, `{"source":1}`,
		`{"source":"shared","source":"byok"}`, `{"Source":"byok"}`,
		`{"source":"shared","ſource":"byok"}`, `{"\u017fource":"byok"}`} {
		if status, body := f.call(t, http.MethodPut, path, bad); status != http.StatusBadRequest {
			t.Errorf("body %s: status %d, want 400; answer %s", bad, status, body)
		}
	}

	key := newKey(t, provider.Anthropic)
	f.putKey(t, "frank", provider.Anthropic, key)
	data := f.mustCall(t, http.StatusOK, http.MethodPut, path, `{"source":"byok"}`)
	var st keystore.Status
	if err := json.Unmarshal(data, &st); err != nil {
		t.Fatalf("decode %s: %v", data, err)
	}
	if st.Source != keystore.SourceBYOK || !st.HasKey || st.Last4 != key[len(key)-4:] {
		t.Errorf("status after byok = %+v", st)
	}
	if got := f.getMailbox(t, "frank").Providers[provider.Anthropic].Source; got != keystore.SourceBYOK {
		t.Errorf("GET source = %q, want byok", got)
	}
	// The other providers keep their own source.
	if got := f.getMailbox(t, "frank").Providers[provider.OpenAI].Source; got != keystore.SourceShared {
		t.Errorf("openai source = %q, want shared", got)
	}

	f.mustCall(t, http.StatusOK, http.MethodPut, path, `{"source":"shared"}`)
	if got := f.getMailbox(t, "frank").Providers[provider.Anthropic]; got.Source != keystore.SourceShared || !got.HasKey {
		t.Errorf("after selecting shared: %+v, want shared with the key kept", got)
	}
}

func TestAdminDeleteKey(t *testing.T) {
	f := newFixture(t)
	f.putKey(t, "gina", provider.Google, newKey(t, provider.Google))
	f.mustCall(t, http.StatusOK, http.MethodPut, "/admin/v1/mailboxes/gina/providers/google/source", `{"source":"byok"}`)

	status, body := f.call(t, http.MethodDelete, "/admin/v1/mailboxes/gina/providers/google/key", "")
	if status != http.StatusNoContent || len(body) != 0 {
		t.Fatalf("status %d body %q, want 204 and no body", status, body)
	}
	st := f.getMailbox(t, "gina").Providers[provider.Google]
	if st.HasKey || st.Source != keystore.SourceShared || st.Last4 != "" {
		t.Errorf("after delete: %+v, want shared with no key", st)
	}
	fields := f.rdb.HGetAll(context.Background(), f.store.Layout().Mailbox("gina")).Val()
	for _, field := range []string{"ct:google", "last4:google", "src:google", "upd:google"} {
		if _, ok := fields[field]; ok {
			t.Errorf("field %s still in Redis after delete", field)
		}
	}
	// Deleting again is not an error.
	f.mustCall(t, http.StatusNoContent, http.MethodDelete, "/admin/v1/mailboxes/gina/providers/google/key", "")
}

func TestAdminKeyTest(t *testing.T) {
	f := newFixture(t)
	const path = "/admin/v1/mailboxes/hank/providers/openai/test"
	if status, body := f.call(t, http.MethodPost, path, ""); status != http.StatusConflict {
		t.Errorf("test without key: status %d, want 409; body %s", status, body)
	}

	key := newKey(t, provider.OpenAI)
	f.putKey(t, "hank", provider.OpenAI, key)
	f.upstreams[provider.OpenAI].SetKeys(f.sharedKeys[provider.OpenAI], key)
	var res admin.ProbeResult
	if err := json.Unmarshal(f.mustCall(t, http.StatusOK, http.MethodPost, path, ""), &res); err != nil {
		t.Fatalf("decode: %v", err)
	}
	if !res.OK || res.Status != http.StatusOK || res.Error != "" {
		t.Errorf("accepted key: %+v, want ok with status 200", res)
	}

	f.upstreams[provider.OpenAI].SetKeys(f.sharedKeys[provider.OpenAI])
	data := f.mustCall(t, http.StatusOK, http.MethodPost, path, "")
	if err := json.Unmarshal(data, &res); err != nil {
		t.Fatalf("decode: %v", err)
	}
	if res.OK || res.Status != http.StatusUnauthorized || !strings.Contains(res.Error, "Incorrect API key") {
		t.Errorf("revoked key: %+v, want not ok with the provider's 401 and message", res)
	}
	if strings.Contains(string(data), key) || strings.Contains(string(data), upstreamtest.MaskKey(key)) {
		t.Errorf("test answer contains the key: %s", data)
	}
}

func TestAdminTokenRevoke(t *testing.T) {
	f := newFixture(t)
	first := f.issueToken(t, "ivan", "issue")
	id, gen, err := f.signer.Verify(first)
	if err != nil || id != "ivan" || gen != 0 {
		t.Fatalf("Verify(issued token) = %q, %d, %v; want ivan, 0", id, gen, err)
	}
	if again := f.issueToken(t, "ivan", "issue"); again != first {
		t.Errorf("a second issue changed the token of the same generation")
	}
	if status := f.proxyStatus(t, first); status != http.StatusOK {
		t.Fatalf("proxy request with the issued token: status %d, want 200", status)
	}

	second := f.issueToken(t, "ivan", "revoke")
	if _, gen, err := f.signer.Verify(second); err != nil || gen != 1 {
		t.Errorf("Verify(revoked token) generation %d, %v; want 1", gen, err)
	}
	stored, err := f.store.Generation(context.Background(), "ivan")
	if err != nil || stored != 1 {
		t.Errorf("stored generation %d, %v; want 1", stored, err)
	}
	if status := f.proxyStatus(t, first); status != http.StatusUnauthorized {
		t.Errorf("proxy request with the revoked token: status %d, want 401", status)
	}
	if status := f.proxyStatus(t, second); status != http.StatusOK {
		t.Errorf("proxy request with the new token: status %d, want 200", status)
	}
	if issued := f.issueToken(t, "ivan", "issue"); issued != second {
		t.Errorf("issue after revoke returned another token than revoke did")
	}
	// A token of another mailbox does not become valid for this one.
	other := f.issueToken(t, "judy", "issue")
	if id, _, _ := f.signer.Verify(other); id != "judy" {
		t.Errorf("token of judy verifies as %q", id)
	}
}

func TestAdminDeleteMailbox(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.putKey(t, "kim", provider.OpenAI, newKey(t, provider.OpenAI))
	f.mustCall(t, http.StatusOK, http.MethodPut, "/admin/v1/mailboxes/kim/providers/openai/source", `{"source":"byok"}`)
	f.mustCall(t, http.StatusOK, http.MethodPut, "/admin/v1/mailboxes/kim/limit", `{"monthly_token_limit":5000}`)
	f.issueToken(t, "kim", "revoke")
	old := f.issueToken(t, "kim", "revoke")
	_, oldGen, _ := f.signer.Verify(old)

	// Usage recorded before the deletion must survive it.
	pipe := f.rdb.Pipeline()
	f.store.Layout().QueueUsage(ctx, pipe, keystore.UsageRecord{
		RequestID: "req-1", Mailbox: "kim", Provider: provider.OpenAI, Source: keystore.SourceShared,
		InputTokens: 7, OutputTokens: 3, Time: time.Now(),
	}, 13)
	if _, err := pipe.Exec(ctx); err != nil {
		t.Fatalf("record usage: %v", err)
	}

	status, body := f.call(t, http.MethodDelete, "/admin/v1/mailboxes/kim", "")
	if status != http.StatusNoContent || len(body) != 0 {
		t.Fatalf("status %d body %q, want 204", status, body)
	}
	for p, st := range f.getMailbox(t, "kim").Providers {
		if st.HasKey || st.Source != keystore.SourceShared {
			t.Errorf("%s after delete: %+v", p, st)
		}
	}
	if lim, err := f.store.Limit(ctx, "kim"); err != nil || lim != nil {
		t.Errorf("limit after delete = %v, %v; want none", lim, err)
	}
	if status := f.proxyStatus(t, old); status != http.StatusUnauthorized {
		t.Errorf("token from before the delete: status %d, want 401", status)
	}

	fresh := f.issueToken(t, "kim", "issue")
	_, freshGen, _ := f.signer.Verify(fresh)
	if freshGen <= oldGen {
		t.Errorf("generation after delete %d, want more than %d so no old token returns", freshGen, oldGen)
	}
	// A second delete, or revokes, never bring back an old generation.
	f.mustCall(t, http.StatusNoContent, http.MethodDelete, "/admin/v1/mailboxes/kim", "")
	for _, tok := range []string{old, fresh} {
		if status := f.proxyStatus(t, tok); status != http.StatusUnauthorized {
			t.Errorf("token from before a delete: status %d, want 401", status)
		}
	}

	var u struct {
		Providers map[string]map[string]keystore.Counts `json:"providers"`
	}
	if err := json.Unmarshal(f.mustCall(t, http.StatusOK, http.MethodGet, "/admin/v1/mailboxes/kim/usage", ""), &u); err != nil {
		t.Fatalf("decode usage: %v", err)
	}
	if got := u.Providers[provider.OpenAI][keystore.SourceShared]; got.Requests != 1 || got.InputTokens != 7 || got.OutputTokens != 3 {
		t.Errorf("usage after delete = %+v, want the recorded 1 request, 7 in, 3 out", got)
	}
}

func TestAdminUsageAndLimit(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	month := keystore.Month(time.Now())

	type usageAnswer struct {
		Mailbox   string                                `json:"mailbox"`
		Month     string                                `json:"month"`
		Limit     *int64                                `json:"limit"`
		Remaining *int64                                `json:"remaining"`
		Providers map[string]map[string]keystore.Counts `json:"providers"`
	}
	getUsage := func(query string) usageAnswer {
		t.Helper()
		data := f.mustCall(t, http.StatusOK, http.MethodGet, "/admin/v1/mailboxes/lena/usage"+query, "")
		var u usageAnswer
		if err := json.Unmarshal(data, &u); err != nil {
			t.Fatalf("decode usage %s: %v", data, err)
		}
		raw := map[string]json.RawMessage{}
		json.Unmarshal(data, &raw)
		for _, k := range []string{"mailbox", "month", "limit", "remaining", "providers"} {
			if _, ok := raw[k]; !ok {
				t.Errorf("usage answer lacks %q: %s", k, data)
			}
		}
		return u
	}

	u := getUsage("")
	if u.Mailbox != "lena" || u.Month != month || u.Limit != nil || u.Remaining != nil {
		t.Errorf("empty usage = %+v, want this month, unlimited", u)
	}
	for _, p := range provider.Names {
		for _, src := range []string{keystore.SourceBYOK, keystore.SourceShared} {
			if _, ok := u.Providers[p][src]; !ok {
				t.Errorf("usage lacks %s %s", p, src)
			}
		}
	}

	pipe := f.rdb.Pipeline()
	f.store.Layout().QueueUsage(ctx, pipe, keystore.UsageRecord{
		RequestID: "r1", Mailbox: "lena", Provider: provider.Anthropic, Source: keystore.SourceShared,
		InputTokens: 100, OutputTokens: 50, Time: time.Now(),
	}, 13)
	f.store.Layout().QueueUsage(ctx, pipe, keystore.UsageRecord{
		RequestID: "r2", Mailbox: "lena", Provider: provider.Anthropic, Source: keystore.SourceBYOK,
		InputTokens: 1000, OutputTokens: 500, Time: time.Now(),
	}, 13)
	if _, err := pipe.Exec(ctx); err != nil {
		t.Fatalf("record usage: %v", err)
	}

	var lim struct {
		Limit    int64 `json:"monthly_token_limit"`
		Override bool  `json:"override"`
	}
	data := f.mustCall(t, http.StatusOK, http.MethodPut, "/admin/v1/mailboxes/lena/limit", `{"monthly_token_limit":1000}`)
	if err := json.Unmarshal(data, &lim); err != nil || lim.Limit != 1000 || !lim.Override {
		t.Errorf("PUT limit answer %s, want 1000 as an override", data)
	}
	u = getUsage("")
	if u.Limit == nil || *u.Limit != 1000 || u.Remaining == nil || *u.Remaining != 850 {
		t.Errorf("usage with limit = limit %v remaining %v, want 1000 and 850 (only shared tokens count)", u.Limit, u.Remaining)
	}
	if got := u.Providers[provider.Anthropic][keystore.SourceBYOK]; got.InputTokens != 1000 || got.OutputTokens != 500 || got.Requests != 1 {
		t.Errorf("byok usage = %+v", got)
	}

	f.mustCall(t, http.StatusOK, http.MethodPut, "/admin/v1/mailboxes/lena/limit", `{"monthly_token_limit":0}`)
	if u := getUsage(""); u.Limit != nil || u.Remaining != nil {
		t.Errorf("limit 0: limit %v remaining %v, want null (unlimited)", u.Limit, u.Remaining)
	}

	f.api.SetDefaultLimit(120)
	data = f.mustCall(t, http.StatusOK, http.MethodPut, "/admin/v1/mailboxes/lena/limit", `{"monthly_token_limit":null}`)
	if err := json.Unmarshal(data, &lim); err != nil || lim.Limit != 120 || lim.Override {
		t.Errorf("null limit answer %s, want the default 120 without override", data)
	}
	if u := getUsage(""); u.Limit == nil || *u.Limit != 120 || u.Remaining == nil || *u.Remaining != 0 {
		t.Errorf("default limit 120 with 150 used: limit %v remaining %v, want 120 and 0", u.Limit, u.Remaining)
	}

	if u := getUsage("?month=2020-01"); u.Month != "2020-01" || u.Providers[provider.Anthropic][keystore.SourceShared].Requests != 0 {
		t.Errorf("usage of 2020-01 = %+v, want empty", u)
	}
	for _, bad := range []string{"?month=2020-13", "?month=2020-1", "?month=last"} {
		if status, body := f.call(t, http.MethodGet, "/admin/v1/mailboxes/lena/usage"+bad, ""); status != http.StatusBadRequest {
			t.Errorf("usage%s: status %d, want 400; body %s", bad, status, body)
		}
	}
	for _, bad := range []string{`{"monthly_token_limit":-1}`, `{"monthly_token_limit":"10"}`, `{"monthly_token_limit":1.5}`, `{}`, `[]`, `nope`,
		`{"monthly_token_limit":5,"monthly_token_limit":0}`, `{"Monthly_Token_Limit":0}`} {
		if status, body := f.call(t, http.MethodPut, "/admin/v1/mailboxes/lena/limit", bad); status != http.StatusBadRequest {
			t.Errorf("limit body %s: status %d, want 400; answer %s", bad, status, body)
		}
	}
}

// ServeMux would redirect a path with dot or empty segments to its cleaned
// form, and a client that follows the redirect would act on another mailbox.
func TestAdminUncleanPathRejected(t *testing.T) {
	f := newFixture(t)
	if status, body := f.call(t, http.MethodPut, "/admin/v1/mailboxes/other/limit", `{"monthly_token_limit":5}`); status != http.StatusOK {
		t.Fatalf("setting a limit: status %d %s", status, body)
	}
	for _, tt := range []struct{ method, path string }{
		{http.MethodGet, "/admin/v1/mailboxes/./usage"},
		{http.MethodGet, "/admin/v1/mailboxes//token"},
		{http.MethodGet, "/admin/v1/mailboxes/victim/.."},
		{http.MethodDelete, "/admin/v1/mailboxes/victim/providers/openai/../../../other"},
		{http.MethodGet, "/admin//v1/recipient"},
	} {
		status, body := f.call(t, tt.method, tt.path, "")
		if status != http.StatusBadRequest {
			t.Errorf("%s %s: status %d, want 400; body %s", tt.method, tt.path, status, body)
		}
		if !strings.Contains(string(body), "invalid admin path") {
			t.Errorf("%s %s: body %s does not name the invalid path", tt.method, tt.path, body)
		}
	}
	// Deleting the mailbox would have removed its limit.
	if status, body := f.call(t, http.MethodGet, "/admin/v1/mailboxes/other/usage", ""); status != http.StatusOK || !strings.Contains(string(body), `"limit":5`) {
		t.Errorf("the other mailbox's usage after the attempts: status %d %s, want its limit of 5", status, body)
	}
	if status, body := f.call(t, http.MethodGet, "/admin/v1/mailboxes/%2E", ""); status != http.StatusOK {
		t.Errorf("mailbox . written as %%2E: status %d, want 200; body %s", status, body)
	}
}

func TestAdminUnknownRoute(t *testing.T) {
	f := newFixture(t)
	for _, path := range []string{"/admin/v1/nothing", "/admin/v2/recipient", "/admin/v1/mailboxes/a/providers/openai/other"} {
		if status, body := f.call(t, http.MethodGet, path, ""); status != http.StatusNotFound {
			t.Errorf("GET %s: status %d, want 404; body %s", path, status, body)
		}
	}
	for _, tt := range []struct{ method, path, allow string }{
		{http.MethodPost, "/admin/v1/recipient", "GET"},
		{"PATCH", "/admin/v1/mailboxes/bob", "GET, DELETE"},
		{http.MethodGet, "/admin/v1/mailboxes/bob/token", "POST"},
		{http.MethodPost, "/admin/v1/mailboxes/bob/providers/openai/key", "PUT, DELETE"},
	} {
		req, err := http.NewRequest(tt.method, f.admin.URL+tt.path, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+f.token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("%s %s: status %d, want 405; body %s", tt.method, tt.path, resp.StatusCode, body)
		}
		if got := resp.Header.Get("Allow"); got != tt.allow {
			t.Errorf("%s %s: Allow = %q, want %q", tt.method, tt.path, got, tt.allow)
		}
		if !strings.Contains(string(body), `"status":405`) {
			t.Errorf("%s %s: body not in the admin error shape: %s", tt.method, tt.path, body)
		}
	}
	// Without the admin token a wrong method gets 401, which reveals no route.
	if status, _ := f.callWith(t, "PATCH", "/admin/v1/mailboxes/bob", "", ""); status != http.StatusUnauthorized {
		t.Errorf("PATCH without the token: status %d, want 401", status)
	}
}

// auditEvents returns the change events of mailbox m from the audit stream,
// waiting until at least n have arrived.
func (f *fixture) auditEvents(t *testing.T, m string, n int) []map[string]any {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		entries, err := f.rdb.XRange(context.Background(), f.prefix+"audit", "-", "+").Result()
		if err != nil {
			t.Fatalf("XRANGE audit: %v", err)
		}
		var out []map[string]any
		for _, e := range entries {
			raw, _ := e.Values["event"].(string)
			var ev map[string]any
			if err := json.Unmarshal([]byte(raw), &ev); err != nil {
				t.Fatalf("audit entry %s is not JSON: %v", raw, err)
			}
			if ev["mailbox"] == m {
				out = append(out, ev)
			}
		}
		if len(out) >= n || time.Now().After(deadline) {
			return out
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestAdminAuditEvents(t *testing.T) {
	f := newFixture(t)
	key := newKey(t, provider.OpenAI)
	last4 := key[len(key)-4:]
	f.upstreams[provider.OpenAI].SetKeys(f.sharedKeys[provider.OpenAI], key)

	f.putKey(t, "mia", provider.OpenAI, key)
	f.mustCall(t, http.StatusOK, http.MethodPut, "/admin/v1/mailboxes/mia/providers/openai/source", `{"source":"byok"}`)
	f.mustCall(t, http.StatusOK, http.MethodPost, "/admin/v1/mailboxes/mia/providers/openai/test", "")
	f.mustCall(t, http.StatusNoContent, http.MethodDelete, "/admin/v1/mailboxes/mia/providers/openai/key", "")
	// Removing a key that is gone succeeds and records nothing.
	f.mustCall(t, http.StatusNoContent, http.MethodDelete, "/admin/v1/mailboxes/mia/providers/openai/key", "")
	f.mustCall(t, http.StatusOK, http.MethodPost, "/admin/v1/mailboxes/mia/token/revoke", "")
	f.mustCall(t, http.StatusNoContent, http.MethodDelete, "/admin/v1/mailboxes/mia", "")

	want := []struct {
		kind, provider, last4, source string
	}{
		{audit.KindKeySet, provider.OpenAI, last4, keystore.SourceShared},
		{audit.KindSourceChanged, provider.OpenAI, last4, keystore.SourceBYOK},
		{audit.KindKeyTested, provider.OpenAI, last4, ""},
		{audit.KindKeyRemoved, provider.OpenAI, last4, keystore.SourceShared},
		{audit.KindTokenRevoked, "", "", ""},
		{audit.KindMailboxDeleted, "", "", ""},
	}
	events := f.auditEvents(t, "mia", len(want))
	if len(events) != len(want) {
		t.Fatalf("got %d audit events for mia, want %d: %v", len(events), len(want), events)
	}
	for i, w := range want {
		ev := events[i]
		t.Run(w.kind, func(t *testing.T) {
			if ev["kind"] != w.kind {
				t.Fatalf("event %d kind %v, want %s", i, ev["kind"], w.kind)
			}
			if ev["mailbox"] != "mia" {
				t.Errorf("mailbox %v", ev["mailbox"])
			}
			if got, _ := ev["provider"].(string); got != w.provider {
				t.Errorf("provider %q, want %q", got, w.provider)
			}
			if got, _ := ev["key_last4"].(string); got != w.last4 {
				t.Errorf("key_last4 %q, want %q", got, w.last4)
			}
			if got, _ := ev["source"].(string); got != w.source {
				t.Errorf("source %q, want %q", got, w.source)
			}
			if ts, _ := ev["time"].(string); ts == "" {
				t.Errorf("no time")
			} else if _, err := time.Parse(time.RFC3339Nano, ts); err != nil || !strings.HasSuffix(ts, "Z") {
				t.Errorf("time %q is not RFC 3339 in UTC", ts)
			}
		})
	}
	if status, _ := events[2]["status"].(float64); status != http.StatusOK {
		t.Errorf("key.tested status %v, want 200", events[2]["status"])
	}
	stream := fmt.Sprint(f.rdb.XRange(context.Background(), f.prefix+"audit", "-", "+").Val())
	if strings.Contains(stream, key) {
		t.Error("the audit stream contains the key")
	}
}

// failingHGetAll makes every HGETALL fail, as a Redis connection that times
// out right after a write would.
type failingHGetAll struct{}

func (failingHGetAll) DialHook(next redis.DialHook) redis.DialHook { return next }

func (failingHGetAll) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if cmd.Name() == "hgetall" {
			err := fmt.Errorf("i/o timeout (injected)")
			cmd.SetErr(err)
			return err
		}
		return next(ctx, cmd)
	}
}

func (failingHGetAll) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// A key or source change that Redis applied must return 200 and be audited,
// even when reading the whole mailbox would fail.
func TestAdminChangeStatusFromWrite(t *testing.T) {
	srv := redistest.Start(t)
	prefix := srv.Prefix(t)
	inspect := srv.Client(t)
	faulty := redis.NewClient(&redis.Options{Addr: strings.TrimPrefix(srv.URL, "redis://")})
	faulty.AddHook(failingHGetAll{})
	t.Cleanup(func() { faulty.Close() })

	ids, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	store := keystore.New(faulty, prefix, ids)
	signer, err := mailbox.NewSigner([]string{randomText(t, 32)})
	if err != nil {
		t.Fatal(err)
	}
	writer := audit.NewWriter(inspect, store.Layout(), audit.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	go writer.Run(ctx)
	t.Cleanup(func() {
		closeCtx, done := context.WithTimeout(context.Background(), 5*time.Second)
		defer done()
		writer.Close(closeCtx)
		cancel()
	})
	token := randomText(t, 32)
	srvAdmin := httptest.NewServer(admin.New(admin.Options{Store: store, Signer: signer, Audit: writer, Token: token}))
	t.Cleanup(srvAdmin.Close)
	f := &fixture{admin: srvAdmin, token: token, rdb: inspect, prefix: prefix}

	key := newKey(t, provider.OpenAI)
	last4 := key[len(key)-4:]
	put := func(path, body string) keystore.Status {
		t.Helper()
		out := f.mustCall(t, http.StatusOK, http.MethodPut, "/admin/v1/mailboxes/eve/providers/openai/"+path, body)
		var st keystore.Status
		if err := json.Unmarshal(out, &st); err != nil {
			t.Fatalf("PUT %s response %s: %v", path, out, err)
		}
		return st
	}
	if st := put("key", `{"key":"`+key+`"}`); !st.HasKey || st.Last4 != last4 || st.Source != keystore.SourceShared || st.UpdatedAt == nil {
		t.Errorf("PUT key status = %+v, want the key's last four, has_key, shared and a time", st)
	}
	if st := put("source", `{"source":"byok"}`); !st.HasKey || st.Last4 != last4 || st.Source != keystore.SourceBYOK || st.UpdatedAt == nil {
		t.Errorf("PUT source byok status = %+v, want byok with the key's last four and time", st)
	}
	if st := put("source", `{"source":"shared"}`); !st.HasKey || st.Source != keystore.SourceShared {
		t.Errorf("PUT source shared status = %+v, want shared, key kept", st)
	}

	events := f.auditEvents(t, "eve", 3)
	var kinds []string
	for _, ev := range events {
		kinds = append(kinds, fmt.Sprint(ev["kind"]))
	}
	want := []string{audit.KindKeySet, audit.KindSourceChanged, audit.KindSourceChanged}
	if strings.Join(kinds, ",") != strings.Join(want, ",") {
		t.Errorf("audit events = %v, want %v", kinds, want)
	}
}

// Requests with a bad admin token log at most one line per second, each
// with the count of lines left out before it and a shortened path.
func TestAdminRejectedRequestsLogSpaced(t *testing.T) {
	var logs lockedBuffer
	api := admin.New(admin.Options{Token: randomText(t, 32), Logger: slog.New(slog.NewJSONHandler(&logs, nil))})
	srv := httptest.NewServer(api)
	t.Cleanup(srv.Close)
	f := &fixture{admin: srv}

	const burst = 40
	path := "/admin/v1/mailboxes/" + strings.Repeat("a", 4000)
	start := time.Now()
	for range burst {
		if status, _ := f.callWith(t, http.MethodGet, path, "", "Bearer wrong"); status != http.StatusUnauthorized {
			t.Fatalf("bad token: status %d, want 401", status)
		}
	}
	elapsed := time.Since(start)
	time.Sleep(1100 * time.Millisecond)
	if status, _ := f.callWith(t, http.MethodGet, path, "", "Bearer wrong"); status != http.StatusUnauthorized {
		t.Fatalf("bad token: status %d, want 401", status)
	}

	lines, skipped := 0, 0
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var entry struct {
			Msg     string  `json:"msg"`
			Path    string  `json:"path"`
			Skipped float64 `json:"rejected_since_last_line"`
		}
		if err := json.Unmarshal([]byte(line), &entry); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if entry.Msg != "admin request rejected: bad token" {
			continue
		}
		lines++
		skipped += int(entry.Skipped)
		if len(entry.Path) > 300 {
			t.Errorf("logged path is %d bytes, want it shortened", len(entry.Path))
		}
	}
	if lines+skipped != burst+1 {
		t.Errorf("%d lines and %d requests counted as left out, want %d requests in all", lines, skipped, burst+1)
	}
	if maxLines := 2 + int(elapsed/time.Second); lines > maxLines {
		t.Errorf("%d log lines for %d requests in %v, want at most %d", lines, burst+1, elapsed, maxLines)
	}
}
