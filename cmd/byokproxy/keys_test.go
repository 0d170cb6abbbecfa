package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

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

const callTimeout = 10 * time.Second

func randomText(t testing.TB, n int) string {
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

// newTestKey returns a random key in the provider's format.
func newTestKey(t testing.TB, prov string) string {
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

// bodyRecorder keeps the bodies of the requests an admin API received, to
// check what travelled over the admin connection.
type bodyRecorder struct {
	next http.Handler
	mu   sync.Mutex
	seen []string
}

func (b *bodyRecorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	data, _ := io.ReadAll(r.Body)
	b.mu.Lock()
	b.seen = append(b.seen, r.Method+" "+r.URL.Path+" "+string(data))
	b.mu.Unlock()
	r.Body = io.NopCloser(bytes.NewReader(data))
	b.next.ServeHTTP(w, r)
}

func (b *bodyRecorder) requests() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.seen...)
}

// inProcess is an admin API and proxy handler on a real Redis, with
// emulated providers, for running the client commands in-process.
type inProcess struct {
	adminURL  string
	proxyURL  string
	token     string
	recorder  *bodyRecorder
	store     *keystore.Store
	signer    *mailbox.Signer
	upstreams map[string]*upstreamtest.Server
}

func newInProcess(t *testing.T) *inProcess {
	t.Helper()
	rs := redistest.Start(t)
	rdb := rs.Client(t)
	ids, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatalf("GenerateIdentities: %v", err)
	}
	p := &inProcess{token: randomText(t, 32), upstreams: map[string]*upstreamtest.Server{}}
	p.store = keystore.New(rdb, rs.Prefix(t), ids)
	p.signer, err = mailbox.NewSigner([]string{randomText(t, 32)})
	if err != nil {
		t.Fatalf("NewSigner: %v", err)
	}
	cfg := config.Defaults()
	for _, prov := range provider.Names {
		srv := upstreamtest.New(prov, false)
		t.Cleanup(srv.Close)
		p.upstreams[prov] = srv
		cfg.Providers[prov].Upstream = srv.URL
	}
	writer := startAudit(t, rdb, p.store)
	api := admin.New(admin.Options{
		Store: p.store, Signer: p.signer, Audit: writer, Token: p.token, Prober: proxy.NewProber(cfg),
	})
	p.recorder = &bodyRecorder{next: api}
	adminSrv := httptest.NewServer(p.recorder)
	t.Cleanup(adminSrv.Close)
	p.adminURL = adminSrv.URL

	handler, err := proxy.New(proxy.Options{
		Config: cfg, Store: p.store, Signer: p.signer, Audit: writer,
		Metrics: metrics.New(prometheus.NewRegistry()),
	})
	if err != nil {
		t.Fatalf("proxy.New: %v", err)
	}
	proxySrv := httptest.NewServer(handler)
	t.Cleanup(proxySrv.Close)
	p.proxyURL = proxySrv.URL
	return p
}

func startAudit(t *testing.T, rdb redis.UniversalClient, store *keystore.Store) *audit.Writer {
	t.Helper()
	writer := audit.NewWriter(rdb, store.Layout(), audit.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	go writer.Run(ctx)
	t.Cleanup(func() {
		closeCtx, done := context.WithTimeout(context.Background(), 5*time.Second)
		defer done()
		writer.Close(closeCtx)
		cancel()
	})
	return writer
}

// result is the outcome of one client command.
type result struct {
	code           int
	stdout, stderr string
}

// run runs a keys or token command in-process with stdin and the admin URL
// and token in its environment.
func (p *inProcess) run(t *testing.T, stdin string, args ...string) result {
	t.Helper()
	return runClient(t, map[string]string{envAdminURL: p.adminURL, envAdminToken: p.token}, stdin, nil, args...)
}

func runClient(t *testing.T, env map[string]string, stdin string, readHidden func() ([]byte, error), args ...string) result {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cio := cliIO{
		stdin: strings.NewReader(stdin), stdout: &stdout, stderr: &stderr,
		getenv: func(k string) string { return env[k] }, readHidden: readHidden,
	}
	var code int
	switch args[0] {
	case "keys":
		code = keysCommand(args[1:], cio)
	case "token":
		code = tokenCommand(args[1:], cio)
	case "identity":
		code = identityCommand(args[1:], cio)
	default:
		t.Fatalf("runClient: unknown command %q", args[0])
	}
	return result{code: code, stdout: stdout.String(), stderr: stderr.String()}
}

func (r result) expect(t *testing.T, code int) {
	t.Helper()
	if r.code != code {
		t.Fatalf("exit code %d, want %d\nstdout: %s\nstderr: %s", r.code, code, r.stdout, r.stderr)
	}
}

// chatThroughProxy sends the smallest generation request of prov with token
// and returns the status.
func chatThroughProxy(t *testing.T, base, prov, token string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
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
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+path, strings.NewReader(body))
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
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

func lastUpstreamKey(t *testing.T, srv *upstreamtest.Server) string {
	t.Helper()
	reqs := srv.Requests()
	if len(reqs) == 0 {
		t.Fatal("the upstream received no request")
	}
	return reqs[len(reqs)-1].Key
}

func TestKeysSetEncryptsKeyByDefault(t *testing.T) {
	p := newInProcess(t)
	for _, prov := range provider.Names {
		t.Run(prov, func(t *testing.T) {
			key := newTestKey(t, prov)
			p.upstreams[prov].SetKeys(key)
			r := p.run(t, key+"\n", "keys", "set", "alice@example.com", prov)
			r.expect(t, exitOK)
			wantLine := fmt.Sprintf("alice@example.com  %-9s  shared  key …%s  updated ", prov, key[len(key)-4:])
			if !strings.HasPrefix(r.stdout, wantLine) {
				t.Errorf("stdout %q, want it to start with %q", r.stdout, wantLine)
			}
			if !strings.Contains(r.stderr, "byokproxy keys use alice@example.com "+prov+" byok") {
				t.Errorf("stderr %q does not say how to use the stored key", r.stderr)
			}
			for _, out := range []string{r.stdout, r.stderr} {
				if strings.Contains(out, key) {
					t.Errorf("output contains the key: %q", out)
				}
			}
			var sawAge bool
			for _, req := range p.recorder.requests() {
				if strings.Contains(req, key) {
					t.Errorf("the key travelled to the admin API in plaintext: %.60s...", req)
				}
				if strings.HasPrefix(req, "PUT ") && strings.Contains(req, `"age":"-----BEGIN AGE ENCRYPTED FILE-----`) {
					sawAge = true
				}
			}
			if !sawAge {
				t.Error("no PUT carried an armored age ciphertext")
			}

			p.run(t, "", "keys", "use", "alice@example.com", prov, "byok").expect(t, exitOK)
			token := p.signer.Issue("alice@example.com", 0)
			if status := chatThroughProxy(t, p.proxyURL, prov, token); status != http.StatusOK {
				t.Fatalf("proxied request with the client-encrypted key: status %d", status)
			}
			if got := lastUpstreamKey(t, p.upstreams[prov]); got != key {
				t.Error("the upstream did not receive the key stored through the CLI")
			}
		})
	}
}

func TestKeysSetPlaintextFlag(t *testing.T) {
	p := newInProcess(t)
	key := newTestKey(t, provider.Google)
	p.run(t, key, "keys", "set", "--plaintext", "bob", "google").expect(t, exitOK)
	var sawKey bool
	for _, req := range p.recorder.requests() {
		if strings.HasPrefix(req, "PUT ") && strings.Contains(req, `{"key":"`+key+`"}`) {
			sawKey = true
		}
		if strings.HasPrefix(req, "GET /admin/v1/recipient") {
			t.Error("--plaintext fetched the recipient")
		}
	}
	if !sawKey {
		t.Error(`--plaintext did not send {"key": ...}`)
	}
	st, err := p.store.ProviderStatus(context.Background(), "bob", provider.Google)
	if err != nil || !st.HasKey || st.Last4 != key[len(key)-4:] {
		t.Errorf("stored status %+v, %v", st, err)
	}
}

func TestKeysSetFromTerminal(t *testing.T) {
	p := newInProcess(t)
	key := newTestKey(t, provider.Anthropic)
	var prompted bool
	readHidden := func() ([]byte, error) {
		prompted = true
		return []byte(key), nil
	}
	r := runClient(t, map[string]string{envAdminURL: p.adminURL, envAdminToken: p.token}, "", readHidden,
		"keys", "set", "carol", "anthropic")
	r.expect(t, exitOK)
	if !prompted {
		t.Fatal("the terminal was not read")
	}
	if !strings.Contains(r.stderr, "Anthropic key for carol (input is hidden): ") {
		t.Errorf("stderr %q has no prompt", r.stderr)
	}
	if strings.Contains(r.stdout+r.stderr, key) {
		t.Error("output contains the key")
	}
}

func TestKeysSetRejectsBadInput(t *testing.T) {
	p := newInProcess(t)
	key := newTestKey(t, provider.OpenAI)
	anthropicKey := newTestKey(t, provider.Anthropic)
	cases := []struct {
		name   string
		stdin  string
		args   []string
		code   int
		want   string
		secret string
	}{
		{"key as argument", "", []string{"keys", "set", "dan", "openai", key}, exitUsage, "pipe it to standard input", key},
		{"empty stdin", "", []string{"keys", "set", "dan", "openai"}, exitFailure, "no key on standard input", ""},
		{"blank stdin", " \n\t\n", []string{"keys", "set", "dan", "openai"}, exitFailure, "no key on standard input", ""},
		{"wrong format", anthropicKey, []string{"keys", "set", "dan", "openai"}, exitFailure, `key is "sk-"`, anthropicKey},
		{"too much input", strings.Repeat("a", maxKeyInput+10), []string{"keys", "set", "dan", "openai"}, exitFailure, "more than", ""},
		{"missing provider", key, []string{"keys", "set", "dan"}, exitUsage, "MAILBOX PROVIDER", key},
		{"unknown provider", key, []string{"keys", "set", "dan", "mistral"}, exitUsage, `invalid PROVIDER "mistral"`, key},
		{"invalid mailbox", key, []string{"keys", "set", "dan!", "openai"}, exitUsage, `invalid MAILBOX "dan!"`, key},
		{"plaintext elsewhere", "", []string{"keys", "show", "--plaintext", "dan"}, exitUsage, "--plaintext applies", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := p.run(t, c.stdin, c.args...)
			r.expect(t, c.code)
			if !strings.Contains(r.stderr, c.want) {
				t.Errorf("stderr %q does not contain %q", r.stderr, c.want)
			}
			if c.secret != "" && strings.Contains(r.stdout+r.stderr, c.secret) {
				t.Errorf("output contains the key")
			}
		})
	}
	for _, req := range p.recorder.requests() {
		if strings.HasPrefix(req, "PUT ") {
			t.Errorf("a rejected key was sent: %.40s", req)
		}
	}
}

func TestKeysShowUseRemove(t *testing.T) {
	p := newInProcess(t)
	key := newTestKey(t, provider.OpenAI)
	last4 := key[len(key)-4:]

	r := p.run(t, "", "keys", "show", "erin")
	r.expect(t, exitOK)
	want := "mailbox erin\n" +
		"anthropic  shared  no key\n" +
		"openai     shared  no key\n" +
		"google     shared  no key\n"
	if r.stdout != want {
		t.Errorf("show of an empty mailbox:\n%s\nwant:\n%s", r.stdout, want)
	}

	r = p.run(t, "", "keys", "use", "erin", "openai", "byok")
	r.expect(t, exitFailure)
	if !strings.Contains(r.stderr, `no OpenAI key is stored for erin: run "byokproxy keys set erin openai" first`) {
		t.Errorf("byok without key: stderr %q", r.stderr)
	}
	p.run(t, "", "keys", "use", "erin", "openai", "metered").expect(t, exitUsage)
	p.run(t, "", "keys", "use", "erin", "openai").expect(t, exitUsage)

	p.run(t, key, "keys", "set", "erin", "openai").expect(t, exitOK)
	r = p.run(t, "", "keys", "use", "erin", "openai", "byok")
	r.expect(t, exitOK)
	if !strings.HasPrefix(r.stdout, "erin  openai     byok    key …"+last4+"  updated ") {
		t.Errorf("use byok: stdout %q", r.stdout)
	}

	r = p.run(t, "", "keys", "show", "erin")
	r.expect(t, exitOK)
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[2], "openai     byok    key …"+last4+"  updated ") {
		t.Errorf("show after byok:\n%s", r.stdout)
	} else {
		stamp := strings.TrimPrefix(lines[2], "openai     byok    key …"+last4+"  updated ")
		if ts, err := time.Parse(time.RFC3339, stamp); err != nil || ts.Location() != time.UTC {
			t.Errorf("updated time %q is not RFC 3339 in UTC", stamp)
		}
	}

	r = p.run(t, "", "keys", "show", "--json", "erin")
	r.expect(t, exitOK)
	var shown struct {
		Mailbox   string                     `json:"mailbox"`
		Providers map[string]keystore.Status `json:"providers"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &shown); err != nil {
		t.Fatalf("show --json is not JSON: %v\n%s", err, r.stdout)
	}
	if shown.Mailbox != "erin" || shown.Providers["openai"].Source != "byok" || shown.Providers["openai"].Last4 != last4 {
		t.Errorf("show --json = %+v", shown)
	}

	r = p.run(t, "", "keys", "rm", "erin", "openai")
	r.expect(t, exitOK)
	if r.stdout != "erin  openai  removed; source is now shared\n" {
		t.Errorf("rm: stdout %q", r.stdout)
	}
	st, err := p.store.ProviderStatus(context.Background(), "erin", provider.OpenAI)
	if err != nil || st.HasKey || st.Source != keystore.SourceShared {
		t.Errorf("after rm: %+v, %v", st, err)
	}
	r = p.run(t, "", "keys", "rm", "--json", "erin", "openai")
	r.expect(t, exitOK)
	if !json.Valid([]byte(r.stdout)) {
		t.Errorf("rm --json printed %q", r.stdout)
	}
	p.run(t, "", "keys", "show").expect(t, exitUsage)
	p.run(t, "", "keys", "show", "a", "b").expect(t, exitUsage)
}

func TestKeysTest(t *testing.T) {
	p := newInProcess(t)
	key := newTestKey(t, provider.Anthropic)
	p.upstreams[provider.Anthropic].SetKeys(key)

	r := p.run(t, "", "keys", "test", "fay", "anthropic")
	r.expect(t, exitFailure)
	if !strings.Contains(r.stderr, `no Anthropic key is stored for fay`) {
		t.Errorf("test without key: stderr %q", r.stderr)
	}

	p.run(t, key, "keys", "set", "fay", "anthropic").expect(t, exitOK)
	r = p.run(t, "", "keys", "test", "fay", "anthropic")
	r.expect(t, exitOK)
	if r.stdout != "fay  anthropic  key works (status 200)\n" {
		t.Errorf("test of a working key: stdout %q", r.stdout)
	}

	p.upstreams[provider.Anthropic].SetKeys()
	r = p.run(t, "", "keys", "test", "fay", "anthropic")
	r.expect(t, exitFailure)
	if !strings.Contains(r.stderr, "Anthropic returned status 401: invalid x-api-key") {
		t.Errorf("test of a revoked key: stderr %q", r.stderr)
	}
	r = p.run(t, "", "keys", "test", "--json", "fay", "anthropic")
	r.expect(t, exitFailure)
	var res admin.ProbeResult
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || res.OK || res.Status != 401 {
		t.Errorf("test --json: %q, %v", r.stdout, err)
	}
	if strings.Contains(r.stdout+r.stderr, key) {
		t.Error("output contains the key")
	}
}

func TestTokenIssueRevoke(t *testing.T) {
	p := newInProcess(t)
	r := p.run(t, "", "token", "issue", "gus")
	r.expect(t, exitOK)
	first := strings.TrimSpace(r.stdout)
	if id, gen, err := p.signer.Verify(first); err != nil || id != "gus" || gen != 0 {
		t.Fatalf("issued token verifies as %q gen %d, %v", id, gen, err)
	}

	r = p.run(t, "", "token", "revoke", "gus")
	r.expect(t, exitOK)
	second := strings.TrimSpace(r.stdout)
	if _, gen, err := p.signer.Verify(second); err != nil || gen != 1 {
		t.Errorf("revoked token generation %d, %v; want 1", gen, err)
	}
	if !strings.Contains(r.stderr, "Every earlier token of gus is revoked") {
		t.Errorf("revoke: stderr %q", r.stderr)
	}
	p.upstreams[provider.OpenAI].SetKeys()
	if status := chatThroughProxy(t, p.proxyURL, provider.OpenAI, first); status != http.StatusUnauthorized {
		t.Errorf("request with the revoked token: status %d, want 401", status)
	}

	r = p.run(t, "", "token", "issue", "--json", "gus")
	r.expect(t, exitOK)
	var tok struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &tok); err != nil || tok.Token != second {
		t.Errorf("issue --json = %q, %v; want the current token", r.stdout, err)
	}
	p.run(t, "", "token", "issue").expect(t, exitUsage)
	p.run(t, "", "token", "renew", "gus").expect(t, exitUsage)
	p.run(t, "", "token", "issue", "bad id").expect(t, exitUsage)
}

func TestDotMailboxIDs(t *testing.T) {
	p := newInProcess(t)
	for _, id := range []mailbox.ID{".", ".."} {
		r := p.run(t, "", "token", "issue", string(id))
		r.expect(t, exitOK)
		got, _, err := p.signer.Verify(strings.TrimSpace(r.stdout))
		if err != nil {
			t.Fatalf("token issue %s: token does not verify: %v", id, err)
		}
		if got != id {
			t.Errorf("token issue %s: token names mailbox %q", id, got)
		}

		r = p.run(t, "", "keys", "show", string(id))
		r.expect(t, exitOK)
		if !strings.HasPrefix(r.stdout, "mailbox "+string(id)+"\n") {
			t.Errorf("keys show %s: stdout %q", id, r.stdout)
		}

		r = p.run(t, "", "keys", "use", string(id), "openai", "shared")
		r.expect(t, exitOK)
	}
}

func TestClientErrorsSayWhatToDo(t *testing.T) {
	p := newInProcess(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	closedURL := "http://" + ln.Addr().String()
	ln.Close()

	cases := []struct {
		name string
		env  map[string]string
		args []string
		code int
		want string
	}{
		{"wrong admin token", map[string]string{envAdminURL: p.adminURL, envAdminToken: "wrong-token-0123456789"},
			[]string{"keys", "show", "h"}, exitFailure,
			"the admin API rejected the token: set BYOKPROXY_ADMIN_TOKEN to the proxy's admin.token"},
		{"no admin token", map[string]string{envAdminURL: p.adminURL},
			[]string{"token", "issue", "h"}, exitFailure, "BYOKPROXY_ADMIN_TOKEN is not set"},
		{"nothing listening", map[string]string{envAdminToken: p.token},
			[]string{"keys", "show", "--admin", closedURL, "h"}, exitFailure, "cannot reach the admin API at " + closedURL},
		{"proxy listener as admin", map[string]string{envAdminURL: p.proxyURL, envAdminToken: p.token},
			[]string{"keys", "show", "h"}, exitFailure, "check that --admin names the admin listener (admin.listen)"},
		{"invalid admin URL", map[string]string{envAdminToken: p.token},
			[]string{"keys", "show", "--admin", "localhost:8081", "h"}, exitUsage, `invalid --admin "localhost:8081"`},
		{"unknown keys command", map[string]string{envAdminToken: p.token},
			[]string{"keys", "list", "h"}, exitUsage, `unknown keys command "list"`},
		{"unknown flag", map[string]string{envAdminToken: p.token},
			[]string{"keys", "show", "--token", "x", "h"}, exitUsage, "unknown flag: --token"},
		{"no keys command", map[string]string{}, []string{"keys"}, exitUsage, "Usage:"},
		{"keys help", map[string]string{}, []string{"keys", "--help"}, exitOK, "BYOKPROXY_ADMIN_TOKEN"},
		{"token help", map[string]string{}, []string{"token", "--help"}, exitOK, "token revoke MAILBOX"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := runClient(t, c.env, "", nil, c.args...)
			r.expect(t, c.code)
			if !strings.Contains(r.stderr, c.want) {
				t.Errorf("stderr %q does not contain %q", r.stderr, c.want)
			}
			if strings.Contains(r.stderr, p.token) {
				t.Error("stderr contains the admin token")
			}
		})
	}
}

func TestClientAdminURLFromEnvironment(t *testing.T) {
	p := newInProcess(t)
	r := runClient(t, map[string]string{envAdminURL: p.adminURL + "/", envAdminToken: p.token}, "", nil, "token", "issue", "ivy")
	r.expect(t, exitOK)
	// The flag wins over the environment.
	r = runClient(t, map[string]string{envAdminURL: "http://127.0.0.1:1", envAdminToken: p.token}, "", nil,
		"token", "issue", "--admin", p.adminURL, "ivy")
	r.expect(t, exitOK)
}

// binaryPath builds the byokproxy binary once per test run.
var binaryPath = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "byokproxy-test-")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "byokproxy")
	goTool, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("go not found on PATH: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, goTool, "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build: %v\n%s", err, out)
	}
	return bin, nil
})

func TestMain(m *testing.M) {
	code := m.Run()
	if bin, err := binaryPath(); err == nil {
		os.RemoveAll(filepath.Dir(bin))
	}
	os.Exit(code)
}

func buildBinary(t *testing.T) string {
	t.Helper()
	bin, err := binaryPath()
	if err != nil {
		t.Fatalf("build byokproxy: %v", err)
	}
	return bin
}

// syncBuffer is a bytes.Buffer that a process and the test can share.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// servedProxy is a "byokproxy serve" process started by a test.
type servedProxy struct {
	bin        string
	configFile string
	config     map[string]any
	proxyURL   string
	adminURL   string
	adminToken string
	log        *syncBuffer
	cmd        *exec.Cmd
	done       chan struct{}
	redis      *redistest.Server
	prefix     string
	upstreams  map[string]*upstreamtest.Server
	sharedKeys map[string]string
}

// writeConfig writes the config as JSON, which is valid YAML.
func (s *servedProxy) writeConfig(t *testing.T) {
	t.Helper()
	data, err := json.MarshalIndent(s.config, "", "  ")
	if err != nil {
		t.Fatalf("encode config: %v", err)
	}
	// Write and rename, so the proxy never reads a half-written file.
	tmp := s.configFile + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatalf("write config: %v", err)
	}
	if err := os.Rename(tmp, s.configFile); err != nil {
		t.Fatalf("rename config: %v", err)
	}
}

func startServedProxy(t *testing.T) *servedProxy {
	t.Helper()
	s := &servedProxy{
		bin: buildBinary(t), adminToken: randomText(t, 32), log: &syncBuffer{},
		upstreams: map[string]*upstreamtest.Server{}, sharedKeys: map[string]string{},
	}
	s.redis = redistest.Start(t)
	s.prefix = s.redis.Prefix(t)
	dir := t.TempDir()
	identityFile := filepath.Join(dir, "identity.txt")
	if r := runClient(t, nil, "", nil, "identity", "new", "--out", identityFile); r.code != exitOK {
		t.Fatalf("identity new: %s", r.stderr)
	}

	providers := map[string]any{}
	for _, prov := range provider.Names {
		s.sharedKeys[prov] = newTestKey(t, prov)
		srv := upstreamtest.New(prov, false, s.sharedKeys[prov])
		t.Cleanup(srv.Close)
		s.upstreams[prov] = srv
		providers[prov] = map[string]any{"upstream": srv.URL, "shared_key": s.sharedKeys[prov], "probe_timeout": "5s"}
	}
	listen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	adminListen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	s.config = map[string]any{
		"listen":     listen,
		"log_level":  "debug",
		"log_format": "json",
		"admin":      map[string]any{"listen": adminListen, "token": s.adminToken},
		"metrics":    map[string]any{"listen": fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))},
		"auth":       map[string]any{"token_secrets": []string{randomText(t, 40)}},
		"keystore":   map[string]any{"identity_file": identityFile},
		"redis":      map[string]any{"url": s.redis.URL, "prefix": s.prefix},
		"providers":  providers,
	}
	s.configFile = filepath.Join(dir, "byokproxy.yaml")
	s.writeConfig(t)
	s.proxyURL = "http://" + listen
	s.adminURL = "http://" + adminListen

	s.cmd = exec.Command(s.bin, "serve", "--config", s.configFile)
	s.cmd.Stdout = s.log
	s.cmd.Stderr = s.log
	s.cmd.Env = cleanEnv()
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("start byokproxy serve: %v", err)
	}
	s.done = make(chan struct{})
	go func() {
		s.cmd.Wait()
		close(s.done)
	}()
	t.Cleanup(s.stop)

	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(s.proxyURL + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return s
			}
		}
		select {
		case <-s.done:
			t.Fatalf("byokproxy serve exited early; log:\n%s", s.log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("byokproxy serve not ready after 30s; log:\n%s", s.log.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// cleanEnv returns the environment without BYOKPROXY_ variables, so the
// developer's settings do not leak into a test process.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BYOKPROXY_") {
			env = append(env, kv)
		}
	}
	return env
}

func (s *servedProxy) stop() {
	if s.cmd.Process == nil {
		return
	}
	select {
	case <-s.done:
		return
	default:
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(15 * time.Second):
		s.cmd.Process.Kill()
		<-s.done
	}
}

// runBinary runs the built binary as a client with stdin and returns its
// outcome and the arguments it ran with.
func (s *servedProxy) runBinary(t *testing.T, stdin string, args ...string) (result, []string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, s.bin, args...)
	cmd.Env = append(cleanEnv(), envAdminURL+"="+s.adminURL, envAdminToken+"="+s.adminToken)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	err := cmd.Run()
	code := 0
	if exitErr, ok := err.(*exec.ExitError); ok {
		code = exitErr.ExitCode()
	} else if err != nil {
		t.Fatalf("run %v: %v", args, err)
	}
	return result{code: code, stdout: stdout.String(), stderr: stderr.String()}, cmd.Args
}

func TestCLIAgainstRunningProxy(t *testing.T) {
	s := startServedProxy(t)
	keys := map[string]string{}
	var outputs []string
	for _, prov := range provider.Names {
		key := newTestKey(t, prov)
		keys[prov] = key
		s.upstreams[prov].SetKeys(s.sharedKeys[prov], key)

		r, argv := s.runBinary(t, key+"\n", "keys", "set", "zoe@example.com", prov)
		r.expect(t, exitOK)
		for _, arg := range argv {
			if strings.Contains(arg, key) {
				t.Fatalf("the key is in the process arguments")
			}
		}
		outputs = append(outputs, r.stdout, r.stderr)
		r, _ = s.runBinary(t, "", "keys", "use", "zoe@example.com", prov, "byok")
		r.expect(t, exitOK)
		outputs = append(outputs, r.stdout, r.stderr)
	}

	r, _ := s.runBinary(t, "", "token", "issue", "zoe@example.com")
	r.expect(t, exitOK)
	token := strings.TrimSpace(r.stdout)
	for _, prov := range provider.Names {
		if status := chatThroughProxy(t, s.proxyURL, prov, token); status != http.StatusOK {
			t.Errorf("%s request on byok: status %d", prov, status)
		}
		if got := lastUpstreamKey(t, s.upstreams[prov]); got != keys[prov] {
			t.Errorf("%s upstream did not receive the key set through the CLI", prov)
		}
		r, _ := s.runBinary(t, "", "keys", "test", "zoe@example.com", prov)
		r.expect(t, exitOK)
		outputs = append(outputs, r.stdout, r.stderr)
	}

	r, _ = s.runBinary(t, "", "keys", "show", "zoe@example.com")
	r.expect(t, exitOK)
	outputs = append(outputs, r.stdout, r.stderr)
	for _, prov := range provider.Names {
		want := fmt.Sprintf("%-9s  byok    key …%s  updated ", prov, keys[prov][len(keys[prov])-4:])
		if !strings.Contains(r.stdout, want) {
			t.Errorf("keys show lacks %q:\n%s", want, r.stdout)
		}
	}

	r, _ = s.runBinary(t, "", "token", "revoke", "zoe@example.com")
	r.expect(t, exitOK)
	if status := chatThroughProxy(t, s.proxyURL, provider.OpenAI, token); status != http.StatusUnauthorized {
		t.Errorf("request with the revoked token: status %d, want 401", status)
	}
	r, _ = s.runBinary(t, "", "keys", "rm", "zoe@example.com", "google")
	r.expect(t, exitOK)

	// This run puts the key in the arguments on purpose: it must be
	// rejected without being echoed.
	r, _ = s.runBinary(t, "", "keys", "set", "zoe@example.com", "openai", keys[provider.OpenAI])
	r.expect(t, exitUsage)
	if !strings.Contains(r.stderr, "pipe it to standard input") {
		t.Errorf("key as argument: stderr %q", r.stderr)
	}
	outputs = append(outputs, r.stdout, r.stderr)

	logText := s.log.String()
	redisText := fmt.Sprint(s.redis.Dump(t, s.prefix))
	for prov, key := range keys {
		for _, out := range outputs {
			if strings.Contains(out, key) {
				t.Errorf("CLI output contains the %s key", prov)
			}
		}
		if strings.Contains(logText, key) {
			t.Errorf("the proxy log contains the %s key", prov)
		}
		if strings.Contains(redisText, key) {
			t.Errorf("Redis contains the plaintext %s key", prov)
		}
	}
	if strings.Contains(logText, s.adminToken) {
		t.Error("the proxy log contains the admin token")
	}
}

func TestServeReloadsOnSIGHUP(t *testing.T) {
	s := startServedProxy(t)
	r, _ := s.runBinary(t, "", "token", "issue", "yan")
	r.expect(t, exitOK)
	token := strings.TrimSpace(r.stdout)
	up := s.upstreams[provider.OpenAI]

	if status := chatThroughProxy(t, s.proxyURL, provider.OpenAI, token); status != http.StatusOK {
		t.Fatalf("shared request before the reload: status %d", status)
	}
	oldShared := s.sharedKeys[provider.OpenAI]
	newShared := newTestKey(t, provider.OpenAI)
	up.SetKeys(oldShared, newShared)

	// A broken config file is rejected and the old configuration serves on.
	s.config["limits"] = map[string]any{"max_body_bytes": "lots"}
	s.writeConfig(t)
	s.cmd.Process.Signal(syscall.SIGHUP)
	waitForLog(t, s.log, "config reload failed")
	if status := chatThroughProxy(t, s.proxyURL, provider.OpenAI, token); status != http.StatusOK {
		t.Fatalf("request after a broken config: status %d", status)
	}
	if got := lastUpstreamKey(t, up); got != oldShared {
		t.Error("a broken config changed the shared key")
	}

	delete(s.config, "limits")
	s.config["providers"].(map[string]any)[provider.OpenAI].(map[string]any)["shared_key"] = newShared
	s.writeConfig(t)
	s.cmd.Process.Signal(syscall.SIGHUP)
	waitForLog(t, s.log, "configuration reloaded")
	if status := chatThroughProxy(t, s.proxyURL, provider.OpenAI, token); status != http.StatusOK {
		t.Fatalf("request after the reload: status %d", status)
	}
	if got := lastUpstreamKey(t, up); got != newShared {
		t.Error("the reloaded shared key was not used for the next request")
	}
	select {
	case <-s.done:
		t.Fatal("SIGHUP stopped the proxy")
	default:
	}
	if strings.Contains(s.log.String(), newShared) || strings.Contains(s.log.String(), oldShared) {
		t.Error("the proxy log contains a shared key")
	}
}

func waitForLog(t *testing.T, log *syncBuffer, text string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(log.String(), text) {
		if time.Now().After(deadline) {
			t.Fatalf("log never contained %q:\n%s", text, log.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}
