package admin_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"log/slog"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/admin"
	"github.com/byokproxy/byokproxy/audit"
	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/internal/upstreamtest"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/proxy"
)

// lockedBuffer collects log output written from several goroutines.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

const keyAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

// randomKey returns prefix, n random characters and suffix, so that keys
// differ in their last four.
func randomKey(prefix string, n int, suffix string) string {
	b := make([]byte, n)
	rand.Read(b)
	for i := range b {
		b[i] = keyAlphabet[int(b[i])%len(keyAlphabet)]
	}
	return prefix + string(b) + suffix
}

// TestUIBrowser runs the settings page in headless Chromium against the admin
// handler on a real Redis, with emulated providers for the key test. The
// browser script (ui/tests/browser.test.mjs) checks what the page shows and
// sends; this test then checks Redis, the log and the emulators.
func TestUIBrowser(t *testing.T) {
	if testing.Short() {
		t.Skip("browser test skipped with -short")
	}
	uiDir, err := filepath.Abs("../ui")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(uiDir, "node_modules", "playwright-core")); err != nil {
		t.Fatal(`run "make test" (or npm ci in ui) first`)
	}
	chromium := os.Getenv("CHROMIUM")
	if chromium == "" {
		chromium = "/usr/bin/chromium"
	}
	if _, err := exec.LookPath(chromium); err != nil {
		t.Fatalf("chromium not found at %s: apt-get install chromium (or set CHROMIUM)", chromium)
	}
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatal("node not found on PATH: install Node.js 20.19 or later")
	}

	keys := map[string][]string{
		// The first key of each provider is accepted by its emulator; the
		// second is a rotation the emulator rejects.
		"anthropic": {randomKey("sk-ant-api03-", 40, "AAaa"), randomKey("sk-ant-api03-", 40, "BBbb")},
		"openai":    {randomKey("sk-proj-", 40, "CCcc"), randomKey("sk-proj-", 40, "DDdd")},
		"google":    {randomKey("AIza", 31, "EEee")},
	}
	anthropicUp := upstreamtest.NewAnthropic(keys["anthropic"][0])
	defer anthropicUp.Close()
	openaiUp := upstreamtest.NewOpenAI(keys["openai"][0])
	defer openaiUp.Close()
	googleUp := upstreamtest.NewGoogle(keys["google"][0])
	defer googleUp.Close()

	rs := redistest.Start(t)
	rdb := rs.Client(t)
	prefix := rs.Prefix(t)
	ids, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	var logs lockedBuffer
	logger := slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	store := keystore.New(rdb, prefix, ids)
	writer := audit.NewWriter(rdb, store.Layout(), audit.Options{Stdout: &logs, Logger: logger})
	auditCtx, stopAudit := context.WithCancel(context.Background())
	defer stopAudit()
	go writer.Run(auditCtx)

	cfg := config.Defaults()
	for name, up := range map[string]*upstreamtest.Server{"anthropic": anthropicUp, "openai": openaiUp, "google": googleUp} {
		cfg.Providers[name].Upstream = up.URL
		cfg.Providers[name].ProbeTimeout = 5 * time.Second
	}
	const adminToken = "browser-test-admin-token-0123456789"
	api := admin.New(admin.Options{
		Store: store, Audit: writer, Token: adminToken,
		Prober: proxy.NewProber(cfg), Logger: logger,
	})
	handler := admin.NewUI(api, admin.UIOptions{Enabled: true, Token: adminToken, Logger: logger})
	srv := httptest.NewServer(handler)
	defer srv.Close()

	artifacts, err := filepath.Abs("../e2e/artifacts")
	if err != nil {
		t.Fatal(err)
	}
	screenshot := filepath.Join(artifacts, "ui-final.png")
	os.Remove(screenshot)
	requestsFile := filepath.Join(t.TempDir(), "requests.json")
	keysJSON, err := json.Marshal(keys)
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, "--test", "--test-reporter=spec", "tests/browser.test.mjs")
	cmd.Dir = uiDir
	cmd.Env = append(os.Environ(),
		"UI_URL="+srv.URL+"/ui/",
		"ADMIN_TOKEN="+adminToken,
		"UI_KEYS="+string(keysJSON),
		"CHROMIUM="+chromium,
		"SCREENSHOT="+screenshot,
		"REQUESTS_FILE="+requestsFile,
	)
	// The runner starts a child per test file and the browser under it; a
	// process group lets a timeout end all of them.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	if cmd.Process != nil {
		// Ends anything of the group that outlived the runner.
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	t.Logf("browser test output:\n%s", out)
	if err != nil {
		t.Fatalf("browser test failed: %v", err)
	}

	closeCtx, cancelClose := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancelClose()
	if err := writer.Close(closeCtx); err != nil {
		t.Errorf("flush audit events: %v", err)
	}

	var all []string
	for _, list := range keys {
		all = append(all, list...)
	}

	t.Run("no key in redis", func(t *testing.T) {
		dump := rs.Dump(t, prefix)
		if len(dump) == 0 {
			t.Fatal("nothing stored under the test prefix")
		}
		for name, value := range dump {
			for _, key := range all {
				if strings.Contains(value, key) {
					t.Errorf("redis key %s contains a plaintext provider key", name)
				}
			}
		}
	})

	t.Run("no key in logs", func(t *testing.T) {
		text := logs.String()
		if !strings.Contains(text, "ui session started") || !strings.Contains(text, `"key.set"`) {
			t.Fatalf("log lacks the sign-in and key.set lines; the log capture is broken:\n%s", text)
		}
		for _, key := range all {
			if strings.Contains(text, key) {
				t.Error("the log contains a plaintext provider key")
			}
		}
	})

	t.Run("no key in browser requests", func(t *testing.T) {
		data, err := os.ReadFile(requestsFile)
		if err != nil {
			t.Fatalf("read the browser's request record: %v", err)
		}
		if !strings.Contains(string(data), "-----BEGIN AGE ENCRYPTED FILE-----") {
			t.Error("no age ciphertext among the recorded requests")
		}
		for _, key := range all {
			if strings.Contains(string(data), key) {
				t.Error("a request or response of the browser contains a plaintext provider key")
			}
		}
	})

	t.Run("stored state", func(t *testing.T) {
		status, err := store.Mailbox(context.Background(), "ui-browser+test@example.com")
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]keystore.Status{
			"anthropic": {Source: keystore.SourceBYOK, HasKey: true, Last4: "BBbb"},
			"openai":    {Source: keystore.SourceBYOK, HasKey: true, Last4: "CCcc"},
			"google":    {Source: keystore.SourceShared, HasKey: false},
		}
		for name, w := range want {
			got := status[name]
			if got.Source != w.Source || got.HasKey != w.HasKey || got.Last4 != w.Last4 {
				t.Errorf("%s: status = %+v, want source %s, has_key %v, last4 %q", name, got, w.Source, w.HasKey, w.Last4)
			}
		}
	})

	t.Run("key tests reached the emulators", func(t *testing.T) {
		for name, up := range map[string]*upstreamtest.Server{"anthropic": anthropicUp, "openai": openaiUp, "google": googleUp} {
			var accepted, rejected int
			for _, r := range up.Requests() {
				if r.Authorized {
					accepted++
				} else {
					rejected++
				}
			}
			if accepted == 0 {
				t.Errorf("%s: no test request with the stored key", name)
			}
			if name != "google" && rejected == 0 {
				t.Errorf("%s: no test request with the rotated key", name)
			}
		}
	})
}
