package main

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"

	"github.com/byokproxy/byokproxy/admin"
	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/internal/upstreamtest"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/metrics"
	"github.com/byokproxy/byokproxy/provider"
	"github.com/byokproxy/byokproxy/proxy"
)

// reloadFixture wires a proxy from a config file the way serve does, with a
// reloader on it.
type reloadFixture struct {
	configFile   string
	identityFile string
	config       map[string]any
	reloader     *reloader
	store        *keystore.Store
	log          *syncBuffer
	proxyURL     string
	adminURL     string
	upstream     *upstreamtest.Server
	token        string // a mailbox token signed with the first secret
}

func writeJSONConfig(t *testing.T, path string, cfg map[string]any) {
	t.Helper()
	data, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		t.Fatalf("encode config: %v", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatalf("write config: %v", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatalf("rename config: %v", err)
	}
}

func newReloadFixture(t *testing.T) *reloadFixture {
	t.Helper()
	return newReloadFixtureWith(t, nil)
}

// newReloadFixtureWith is newReloadFixture with modify applied to the
// configuration the proxy starts with. The fixture's servers listen on
// 127.0.0.1 whatever addresses the configuration sets.
func newReloadFixtureWith(t *testing.T, modify func(cfg map[string]any)) *reloadFixture {
	t.Helper()
	rs := redistest.Start(t)
	dir := t.TempDir()
	f := &reloadFixture{
		configFile:   filepath.Join(dir, "byokproxy.yaml"),
		identityFile: filepath.Join(dir, "identity.txt"),
		log:          &syncBuffer{},
	}
	if r := runClient(t, nil, "", nil, "identity", "new", "--out", f.identityFile); r.code != exitOK {
		t.Fatalf("identity new: %s", r.stderr)
	}
	sharedKey := newTestKey(t, provider.OpenAI)
	f.upstream = upstreamtest.NewOpenAI(sharedKey)
	t.Cleanup(f.upstream.Close)
	f.config = map[string]any{
		"listen":   "127.0.0.1:0",
		"admin":    map[string]any{"listen": "127.0.0.1:0", "token": "admin-token-0123456789-first"},
		"metrics":  map[string]any{"listen": "127.0.0.1:0"},
		"auth":     map[string]any{"token_secrets": []string{"token-secret-0123456789-first"}},
		"keystore": map[string]any{"identity_file": f.identityFile},
		"redis":    map[string]any{"url": rs.URL, "prefix": rs.Prefix(t)},
		"providers": map[string]any{
			"openai": map[string]any{"upstream": f.upstream.URL, "shared_key": sharedKey},
		},
	}
	if modify != nil {
		modify(f.config)
	}
	writeJSONConfig(t, f.configFile, f.config)

	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	config.RegisterFlags(fs)
	if err := fs.Parse([]string{"--config", f.configFile}); err != nil {
		t.Fatalf("parse flags: %v", err)
	}
	cfg, err := config.Load(fs, cleanEnv())
	if err != nil {
		t.Fatalf("config.Load: %v", err)
	}
	ids, err := keystore.LoadIdentities(cfg.Keystore.IdentityFile)
	if err != nil {
		t.Fatalf("LoadIdentities: %v", err)
	}
	rdb := rs.Client(t)
	f.store = keystore.New(rdb, cfg.Redis.Prefix, ids)
	signer, err := mailbox.NewSigner(cfg.Auth.TokenSecrets)
	if err != nil {
		t.Fatalf("NewSigner: %v", err)
	}
	f.token = signer.Issue("rita", 0)
	writer := startAudit(t, rdb, f.store)
	handler, err := proxy.New(proxy.Options{
		Config: cfg, Store: f.store, Signer: signer, Audit: writer,
		Metrics: metrics.New(prometheus.NewRegistry()),
	})
	if err != nil {
		t.Fatalf("proxy.New: %v", err)
	}
	prober := proxy.NewProber(cfg)
	adminAPI := admin.New(admin.Options{
		Store: f.store, Signer: signer, Audit: writer, Token: cfg.Admin.Token,
		MonthlyTokenLimit: cfg.Metering.MonthlyTokenLimit, Prober: prober,
	})
	proxySrv := httptest.NewServer(handler)
	t.Cleanup(proxySrv.Close)
	adminSrv := httptest.NewServer(adminAPI)
	t.Cleanup(adminSrv.Close)
	f.proxyURL, f.adminURL = proxySrv.URL, adminSrv.URL

	logger := slog.New(slog.NewJSONHandler(f.log, nil))
	f.reloader = newReloader(fs, cfg, logger, handler, adminAPI, prober, f.store)
	f.reloader.environ = cleanEnv
	return f
}

func (f *reloadFixture) openai() map[string]any {
	return f.config["providers"].(map[string]any)["openai"].(map[string]any)
}

// sharedKeyUsed sends a shared request and returns the key the upstream got.
func (f *reloadFixture) sharedKeyUsed(t *testing.T) string {
	t.Helper()
	if status := chatThroughProxy(t, f.proxyURL, provider.OpenAI, f.token); status != http.StatusOK {
		t.Fatalf("shared request: status %d", status)
	}
	return lastUpstreamKey(t, f.upstream)
}

func (f *reloadFixture) adminStatus(t *testing.T, token string) int {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, f.adminURL+"/admin/v1/recipient", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("admin request: %v", err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func TestReloadSharedKeyTakesEffect(t *testing.T) {
	f := newReloadFixture(t)
	oldKey := f.openai()["shared_key"].(string)
	if got := f.sharedKeyUsed(t); got != oldKey {
		t.Fatal("the first request did not use the configured shared key")
	}

	newKey := newTestKey(t, provider.OpenAI)
	f.upstream.SetKeys(oldKey, newKey)
	f.openai()["shared_key"] = newKey
	writeJSONConfig(t, f.configFile, f.config)
	if err := f.reloader.reload(); err != nil {
		t.Fatalf("reload: %v", err)
	}
	if got := f.sharedKeyUsed(t); got != newKey {
		t.Error("the next request after the reload did not use the new shared key")
	}
	if !strings.Contains(f.log.String(), "configuration reloaded") {
		t.Errorf("no reload line in the log:\n%s", f.log.String())
	}
	if strings.Contains(f.log.String(), newKey) || strings.Contains(f.log.String(), oldKey) {
		t.Error("the log contains a shared key")
	}
}

func TestReloadKeepsRunningConfigOnError(t *testing.T) {
	cases := []struct {
		name  string
		write func(t *testing.T, f *reloadFixture)
		want  string // part of the logged problem
	}{
		{"invalid YAML", func(t *testing.T, f *reloadFixture) {
			os.WriteFile(f.configFile, []byte("listen: [unclosed\n"), 0o600)
		}, "invalid YAML"},
		{"invalid value", func(t *testing.T, f *reloadFixture) {
			f.config["limits"] = map[string]any{"max_body_bytes": "lots"}
			f.openai()["shared_key"] = "sk-proj-ignored-because-the-file-is-invalid"
			writeJSONConfig(t, f.configFile, f.config)
		}, "limits.max_body_bytes"},
		{"unknown key", func(t *testing.T, f *reloadFixture) {
			f.config["listne"] = "127.0.0.1:1"
			writeJSONConfig(t, f.configFile, f.config)
		}, "listne"},
		{"missing identity file", func(t *testing.T, f *reloadFixture) {
			f.config["keystore"] = map[string]any{"identity_file": f.identityFile + ".missing"}
			writeJSONConfig(t, f.configFile, f.config)
		}, "keystore.identity_file"},
		{"short token secret", func(t *testing.T, f *reloadFixture) {
			f.config["auth"] = map[string]any{"token_secrets": []string{"short"}}
			writeJSONConfig(t, f.configFile, f.config)
		}, "auth.token_secrets"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newReloadFixture(t)
			oldKey := f.openai()["shared_key"].(string)
			c.write(t, f)
			if err := f.reloader.reload(); err == nil {
				t.Fatal("reload of a broken config succeeded")
			}
			if got := f.sharedKeyUsed(t); got != oldKey {
				t.Error("a broken config changed the shared key in use")
			}
			if status := f.adminStatus(t, "admin-token-0123456789-first"); status != http.StatusOK {
				t.Errorf("admin token after a failed reload: status %d", status)
			}
			var failures []string
			for _, line := range strings.Split(strings.TrimSpace(f.log.String()), "\n") {
				if strings.Contains(line, "config reload failed") {
					failures = append(failures, line)
				}
			}
			if len(failures) != 1 {
				t.Fatalf("want one log line for the failed reload, got %d:\n%s", len(failures), f.log.String())
			}
			if !strings.Contains(failures[0], c.want) {
				t.Errorf("log line %s does not name %q", failures[0], c.want)
			}
		})
	}
}

func TestReloadOnFileChangeAndSignal(t *testing.T) {
	f := newReloadFixture(t)
	oldKey := f.openai()["shared_key"].(string)
	hup := make(chan os.Signal, 1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		f.reloader.run(ctx, hup, 20*time.Millisecond)
		close(done)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})

	// A changed config file is noticed without a signal.
	second := newTestKey(t, provider.OpenAI)
	f.upstream.SetKeys(oldKey, second)
	f.openai()["shared_key"] = second
	writeJSONConfig(t, f.configFile, f.config)
	waitForLog(t, f.log, "configuration reloaded")
	if got := f.sharedKeyUsed(t); got != second {
		t.Error("a changed config file was not applied")
	}

	// A shared key file is watched too; SIGHUP reloads it at once.
	third := newTestKey(t, provider.OpenAI)
	f.upstream.SetKeys(second, third)
	keyFile := filepath.Join(filepath.Dir(f.configFile), "openai.key")
	if err := os.WriteFile(keyFile, []byte(third+"\n"), 0o600); err != nil {
		t.Fatalf("write key file: %v", err)
	}
	delete(f.openai(), "shared_key")
	f.openai()["shared_key_file"] = keyFile
	writeJSONConfig(t, f.configFile, f.config)
	hup <- os.Interrupt
	deadline := time.Now().Add(10 * time.Second)
	for f.sharedKeyUsed(t) != third {
		if time.Now().After(deadline) {
			t.Fatal("the shared key file was not applied after SIGHUP")
		}
		time.Sleep(20 * time.Millisecond)
	}

	fourth := newTestKey(t, provider.OpenAI)
	f.upstream.SetKeys(third, fourth)
	// The size changes with the extra line break, so the change is seen
	// even where the file system's modification times are coarse.
	if err := os.WriteFile(keyFile, []byte(fourth+"\n\n"), 0o600); err != nil {
		t.Fatalf("write key file: %v", err)
	}
	deadline = time.Now().Add(10 * time.Second)
	for f.sharedKeyUsed(t) != fourth {
		if time.Now().After(deadline) {
			t.Fatal("a changed shared key file was not applied")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestReloadAdminTokenSecretsAndIdentities(t *testing.T) {
	f := newReloadFixture(t)
	ctx := context.Background()
	key := newTestKey(t, provider.OpenAI)
	if _, err := f.store.PutKey(ctx, "rita", provider.OpenAI, []byte(key)); err != nil {
		t.Fatalf("PutKey: %v", err)
	}
	if _, err := f.store.SetSource(ctx, "rita", provider.OpenAI, keystore.SourceBYOK); err != nil {
		t.Fatalf("SetSource: %v", err)
	}
	f.upstream.SetKeys(key)
	oldRecipient := f.store.Identities().Recipient().String()

	// Rotation: a new identity in front of the old one, a new admin token,
	// and a new token secret in front of the old one.
	newIDs, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatalf("GenerateIdentities: %v", err)
	}
	oldText, err := os.ReadFile(f.identityFile)
	if err != nil {
		t.Fatalf("read identity file: %v", err)
	}
	if err := os.WriteFile(f.identityFile, append([]byte(newIDs.SecretText()), oldText...), 0o600); err != nil {
		t.Fatalf("write identity file: %v", err)
	}
	f.config["admin"] = map[string]any{"listen": "127.0.0.1:0", "token": "admin-token-0123456789-second"}
	f.config["auth"] = map[string]any{"token_secrets": []string{"token-secret-0123456789-second", "token-secret-0123456789-first"}}
	writeJSONConfig(t, f.configFile, f.config)
	if err := f.reloader.reload(); err != nil {
		t.Fatalf("reload: %v", err)
	}

	if got := f.store.Identities().Recipient().String(); got != newIDs.Recipient().String() || got == oldRecipient {
		t.Errorf("recipient after reload %s, want the new identity's %s", got, newIDs.Recipient())
	}
	if n := f.store.Identities().Len(); n != 2 {
		t.Errorf("%d identities after reload, want 2", n)
	}
	if status := chatThroughProxy(t, f.proxyURL, provider.OpenAI, f.token); status != http.StatusOK {
		t.Errorf("byok request with a key under the old identity after the reload: status %d", status)
	}
	if status := f.adminStatus(t, "admin-token-0123456789-first"); status != http.StatusUnauthorized {
		t.Errorf("old admin token after reload: status %d, want 401", status)
	}
	if status := f.adminStatus(t, "admin-token-0123456789-second"); status != http.StatusOK {
		t.Errorf("new admin token after reload: status %d, want 200", status)
	}

	// Dropping the old token secret revokes the tokens it signed.
	f.config["auth"] = map[string]any{"token_secrets": []string{"token-secret-0123456789-second"}}
	writeJSONConfig(t, f.configFile, f.config)
	if err := f.reloader.reload(); err != nil {
		t.Fatalf("reload: %v", err)
	}
	if status := chatThroughProxy(t, f.proxyURL, provider.OpenAI, f.token); status != http.StatusUnauthorized {
		t.Errorf("token of a removed secret: status %d, want 401", status)
	}
	if !strings.Contains(f.log.String(), `"identities_changed":true`) {
		t.Errorf("the log does not report the identity change:\n%s", f.log.String())
	}
}

func TestReloadWarnsAboutRestartOnlySettings(t *testing.T) {
	f := newReloadFixture(t)
	f.config["listen"] = "127.0.0.1:1"
	f.config["redis"].(map[string]any)["timeout"] = "3s"
	f.config["metering"] = map[string]any{"monthly_token_limit": 1000}
	writeJSONConfig(t, f.configFile, f.config)
	if err := f.reloader.reload(); err != nil {
		t.Fatalf("reload: %v", err)
	}
	for _, key := range []string{`"key":"listen"`, `"key":"redis"`} {
		if !strings.Contains(f.log.String(), key) {
			t.Errorf("no restart warning for %s:\n%s", key, f.log.String())
		}
	}
	if strings.Contains(f.log.String(), `"key":"metering`) {
		t.Error("a warning names metering.monthly_token_limit, which a reload applies")
	}
}

func TestRestartOnlyChanges(t *testing.T) {
	old := config.Defaults()
	same := config.Defaults()
	if got := restartOnlyChanges(old, same); len(got) != 0 {
		t.Errorf("equal configs: %v", got)
	}
	changed := config.Defaults()
	changed.Admin.Listen = "127.0.0.1:1"
	changed.Redis.Prefix = "other:"
	changed.Audit.Stdout = true
	changed.Metering.MonthlyTokenLimit = 5
	changed.Providers[provider.OpenAI].SharedKey = "sk-proj-changed-key-000"
	want := []string{"admin.listen", "redis", "audit"}
	if got := restartOnlyChanges(old, changed); !slices.Equal(got, want) {
		t.Errorf("restartOnlyChanges = %v, want %v", got, want)
	}
}

// A listener moves only at a restart, so a reload must not trust
// X-Mailbox-Id because the new file puts listen on loopback while the
// running listener is still public.
func TestReloadKeepsHeaderTrustOffOnPublicListener(t *testing.T) {
	f := newReloadFixtureWith(t, func(cfg map[string]any) { cfg["listen"] = "0.0.0.0:8080" })
	f.config["listen"] = "127.0.0.1:8080"
	f.config["auth"].(map[string]any)["trust_mailbox_header"] = true
	writeJSONConfig(t, f.configFile, f.config)
	err := f.reloader.reload()
	if err == nil || !strings.Contains(err.Error(), "auth.trust_mailbox_header") {
		t.Errorf("reload error %v, want one naming auth.trust_mailbox_header", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, f.proxyURL+"/openai/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer placeholder")
	req.Header.Set("X-Mailbox-Id", "victim@example.com")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("request: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("X-Mailbox-Id without a token after the reload: status %d, want 401", resp.StatusCode)
	}
	if n := len(f.upstream.Requests()); n != 0 {
		t.Errorf("upstream received %d requests", n)
	}
}
