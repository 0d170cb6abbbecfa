// Package e2e runs the official Anthropic, OpenAI and Google AI Node SDKs
// against a real byokproxy process, with emulated providers behind it and a
// real redis-server. Afterwards it checks that no BYOK key leaked into Redis,
// the logs or the audit stream.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"filippo.io/age"
	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/internal/upstreamtest"
)

// providers lists the emulated providers in a stable order.
var providers = []string{upstreamtest.Anthropic, upstreamtest.OpenAI, upstreamtest.Google}

const (
	buildTimeout   = 5 * time.Minute
	startTimeout   = 30 * time.Second
	nodeTimeout    = 3 * time.Minute
	stopGrace      = 10 * time.Second
	requestTimeout = 5 * time.Second
)

// moduleRoot returns the directory of go.mod, one level above this file.
func moduleRoot(t *testing.T) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot find the path of sdk_test.go")
	}
	root := filepath.Dir(filepath.Dir(file))
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("go.mod not found in %s: %v", root, err)
	}
	return root
}

const keyAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

func randomString(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	for i := range b {
		k, err := rand.Int(rand.Reader, big.NewInt(int64(len(keyAlphabet))))
		if err != nil {
			t.Fatalf("random: %v", err)
		}
		b[i] = keyAlphabet[k.Int64()]
	}
	return string(b)
}

// newKey returns a random key in the provider's format: Anthropic
// "sk-ant-api03-" and 48 characters, OpenAI "sk-proj-" and 40, Google "AIza"
// and 35.
func newKey(t *testing.T, provider string) string {
	t.Helper()
	switch provider {
	case upstreamtest.Anthropic:
		return "sk-ant-api03-" + randomString(t, 48)
	case upstreamtest.OpenAI:
		return "sk-proj-" + randomString(t, 40)
	default:
		return "AIza" + randomString(t, 35)
	}
}

// syncBuffer is a bytes.Buffer safe for the process writer and the test.
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

// proxyProcess is a running byokproxy.
type proxyProcess struct {
	cmd  *exec.Cmd
	done chan struct{}
	log  *syncBuffer
}

func TestSDKs(t *testing.T) {
	if testing.Short() {
		t.Skip("SDK test skipped with -short")
	}
	root := moduleRoot(t)
	sdkDir := filepath.Join(root, "e2e", "sdk")
	if _, err := os.Stat(filepath.Join(sdkDir, "node_modules")); err != nil {
		t.Fatal(`run "make test" (or npm ci in e2e/sdk) first`)
	}
	if _, err := exec.LookPath("node"); err != nil {
		t.Fatal("node not found on PATH: install Node.js 20 or later")
	}
	artifacts := filepath.Join(root, "e2e", "artifacts")
	if err := os.MkdirAll(artifacts, 0o755); err != nil {
		t.Fatalf("create %s: %v", artifacts, err)
	}

	bin := buildProxy(t, root)

	rs := redistest.Start(t)
	prefix := rs.Prefix(t)
	rdb := rs.Client(t)

	byokKeys := map[string]string{}
	sharedKeys := map[string]string{}
	emulators := map[string]*upstreamtest.Server{}
	for _, p := range providers {
		byokKeys[p] = newKey(t, p)
		sharedKeys[p] = newKey(t, p)
		srv := upstreamtest.New(p, false, sharedKeys[p], byokKeys[p])
		t.Cleanup(srv.Close)
		emulators[p] = srv
	}

	dir := t.TempDir()
	identity, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatalf("generate age identity: %v", err)
	}
	identityFile := filepath.Join(dir, "identity.txt")
	if err := os.WriteFile(identityFile, []byte(identity.String()+"\n"), 0o600); err != nil {
		t.Fatalf("write identity file: %v", err)
	}

	listen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	adminListen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	metricsListen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	adminToken := randomString(t, 40)
	configFile := filepath.Join(dir, "byokproxy.yaml")
	writeConfig(t, configFile, map[string]any{
		"listen":    listen,
		"log_level": "debug",
		"admin":     map[string]any{"listen": adminListen, "token": adminToken},
		"metrics":   map[string]any{"listen": metricsListen},
		"auth":      map[string]any{"token_secrets": []string{randomString(t, 48)}},
		"keystore":  map[string]any{"identity_file": identityFile},
		"redis":     map[string]any{"url": rs.URL, "prefix": prefix},
		"audit":     map[string]any{"stdout": true},
		"providers": providerConfig(emulators, sharedKeys),
	})

	proxyURL := "http://" + listen
	adminURL := "http://" + adminListen
	proc := startProxy(t, bin, configFile, filepath.Join(artifacts, "proxy.log"))
	waitReady(t, proc, proxyURL)

	control := httptest.NewServer(controlHandler(emulators, rdb, prefix+"audit"))
	t.Cleanup(control.Close)

	env := []string{
		"PROXY_URL=" + proxyURL,
		"ADMIN_URL=" + adminURL,
		"ADMIN_TOKEN=" + adminToken,
		"CONTROL_URL=" + control.URL,
	}
	for _, p := range providers {
		env = append(env,
			"BYOK_KEY_"+strings.ToUpper(p)+"="+byokKeys[p],
			"SHARED_KEY_"+strings.ToUpper(p)+"="+sharedKeys[p])
	}
	runNode(t, sdkDir, env, filepath.Join(artifacts, "node.log"))

	places := map[string]string{
		"Redis":            dumpText(rs.Dump(t, prefix)),
		"the proxy log":    proc.log.String(),
		"the audit stream": auditText(t, rdb, prefix+"audit"),
		"the metrics":      metricsText(t, metricsListen),
	}
	for where, text := range places {
		if text == "" {
			t.Errorf("%s is empty after the SDK tests, so the secrets check there proves nothing", where)
		}
	}
	leaks := findSecrets(byokKeys, places)
	for _, leak := range leaks {
		t.Error(leak)
	}
}

// buildProxy builds cmd/byokproxy into a temporary directory.
func buildProxy(t *testing.T, root string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "byokproxy")
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/byokproxy")
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go build ./cmd/byokproxy: %v\n%s", err, out)
	}
	return bin
}

func providerConfig(emulators map[string]*upstreamtest.Server, sharedKeys map[string]string) map[string]any {
	out := map[string]any{}
	for p, srv := range emulators {
		out[p] = map[string]any{"upstream": srv.URL, "shared_key": sharedKeys[p]}
	}
	return out
}

// writeConfig writes cfg as YAML. JSON is a subset of YAML 1.2, so the
// encoding/json output is a valid config file with every string quoted.
func writeConfig(t *testing.T, path string, cfg map[string]any) {
	t.Helper()
	data, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		t.Fatalf("encode config: %v", err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatalf("write config: %v", err)
	}
}

// startProxy runs `byokproxy serve --config FILE` with its output in memory
// and in logFile, and stops it when the test ends: SIGTERM, then SIGKILL
// after stopGrace.
func startProxy(t *testing.T, bin, configFile, logFile string) *proxyProcess {
	t.Helper()
	f, err := os.Create(logFile)
	if err != nil {
		t.Fatalf("create %s: %v", logFile, err)
	}
	p := &proxyProcess{done: make(chan struct{}), log: &syncBuffer{}}
	out := io.MultiWriter(p.log, f)
	p.cmd = exec.Command(bin, "serve", "--config", configFile)
	p.cmd.Stdout = out
	p.cmd.Stderr = out
	if err := p.cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("start byokproxy: %v", err)
	}
	go func() {
		p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stop(t)
		f.Close()
	})
	return p
}

func (p *proxyProcess) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proxyProcess) stop(t *testing.T) {
	if p.exited() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if code := p.cmd.ProcessState.ExitCode(); code != 0 {
			t.Errorf("byokproxy exited with status %d after SIGTERM", code)
		}
	case <-time.After(stopGrace):
		t.Errorf("byokproxy still running %v after SIGTERM; killing pid %d", stopGrace, p.cmd.Process.Pid)
		p.cmd.Process.Kill()
		<-p.done
	}
}

// waitReady polls /healthz and /readyz until both return 200.
func waitReady(t *testing.T, p *proxyProcess, proxyURL string) {
	t.Helper()
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(startTimeout)
	var last string
	for time.Now().Before(deadline) {
		if p.exited() {
			t.Fatalf("byokproxy exited during start-up (%v); output:\n%s", p.cmd.ProcessState, p.log.String())
		}
		ready := true
		for _, path := range []string{"/healthz", "/readyz"} {
			resp, err := client.Get(proxyURL + path)
			if err != nil {
				last = fmt.Sprintf("GET %s: %v", path, err)
				ready = false
				break
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				last = fmt.Sprintf("GET %s: status %d", path, resp.StatusCode)
				ready = false
				break
			}
		}
		if ready {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("byokproxy not ready after %v (%s); output:\n%s", startTimeout, last, p.log.String())
}

// runNode runs every *.test.mjs file in sdkDir with node's test runner,
// copying its output into the test log and logFile.
func runNode(t *testing.T, sdkDir string, env []string, logFile string) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(sdkDir, "*.test.mjs"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no *.test.mjs files in %s (%v)", sdkDir, err)
	}
	for i, f := range files {
		files[i] = filepath.Base(f)
	}
	f, err := os.Create(logFile)
	if err != nil {
		t.Fatalf("create %s: %v", logFile, err)
	}
	defer f.Close()

	ctx, cancel := context.WithTimeout(context.Background(), nodeTimeout)
	defer cancel()
	args := append([]string{"--test", "--test-reporter=spec"}, files...)
	cmd := exec.CommandContext(ctx, "node", args...)
	cmd.Dir = sdkDir
	cmd.Env = append(os.Environ(), env...)
	cmd.WaitDelay = 5 * time.Second
	pr, pw := io.Pipe()
	cmd.Stdout = pw
	cmd.Stderr = pw

	lines := make(chan struct{})
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64*1024), 1024*1024)
		for sc.Scan() {
			t.Log(sc.Text())
			fmt.Fprintln(f, sc.Text())
		}
		io.Copy(io.Discard, pr)
	}()
	err = cmd.Run()
	pw.Close()
	<-lines
	if ctx.Err() != nil {
		t.Fatalf("node tests did not finish in %v", nodeTimeout)
	}
	if err != nil {
		t.Errorf("node tests failed: %v (output above and in %s)", err, logFile)
	}
}

// controlHandler serves the emulators' controls and the audit stream to the
// Node tests.
func controlHandler(emulators map[string]*upstreamtest.Server, rdb *redis.Client, auditKey string) http.Handler {
	mux := http.NewServeMux()
	// withServer passes the emulator named by the {provider} path value.
	withServer := func(f func(http.ResponseWriter, *upstreamtest.Server)) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			srv := emulators[r.PathValue("provider")]
			if srv == nil {
				http.Error(w, "unknown provider "+r.PathValue("provider"), http.StatusNotFound)
				return
			}
			f(w, srv)
		}
	}
	ok := map[string]bool{"ok": true}

	mux.HandleFunc("GET /requests/{provider}", withServer(func(w http.ResponseWriter, srv *upstreamtest.Server) {
		writeJSON(w, recordedRequests(srv.Requests()))
	}))
	mux.HandleFunc("POST /reset/{provider}", withServer(func(w http.ResponseWriter, srv *upstreamtest.Server) {
		srv.Reset()
		writeJSON(w, ok)
	}))
	mux.HandleFunc("POST /reset", func(w http.ResponseWriter, r *http.Request) {
		for _, srv := range emulators {
			srv.Reset()
		}
		writeJSON(w, ok)
	})

	mux.HandleFunc("POST /hold/{provider}", withServer(func(w http.ResponseWriter, srv *upstreamtest.Server) {
		srv.Hold()
		writeJSON(w, ok)
	}))
	mux.HandleFunc("POST /release/{provider}", withServer(func(w http.ResponseWriter, srv *upstreamtest.Server) {
		srv.Release()
		writeJSON(w, ok)
	}))
	mux.HandleFunc("POST /echo/{provider}", func(w http.ResponseWriter, r *http.Request) {
		withServer(func(w http.ResponseWriter, srv *upstreamtest.Server) {
			srv.SetEchoKeyInErrors(r.URL.Query().Get("on") == "true")
			writeJSON(w, ok)
		})(w, r)
	})
	mux.HandleFunc("POST /error/{provider}", func(w http.ResponseWriter, r *http.Request) {
		withServer(func(w http.ResponseWriter, srv *upstreamtest.Server) {
			status, err := strconv.Atoi(r.URL.Query().Get("status"))
			if err != nil {
				http.Error(w, "invalid status: "+err.Error(), http.StatusBadRequest)
				return
			}
			srv.SetError(status)
			writeJSON(w, ok)
		})(w, r)
	})
	mux.HandleFunc("POST /keys/{provider}", func(w http.ResponseWriter, r *http.Request) {
		withServer(func(w http.ResponseWriter, srv *upstreamtest.Server) {
			var body struct{ Keys []string }
			if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
				http.Error(w, "invalid body, want {\"keys\":[...]}: "+err.Error(), http.StatusBadRequest)
				return
			}
			srv.SetKeys(body.Keys...)
			writeJSON(w, ok)
		})(w, r)
	})

	mux.HandleFunc("GET /held/{provider}", withServer(func(w http.ResponseWriter, srv *upstreamtest.Server) {
		writeJSON(w, map[string]int{"held": srv.HeldStreams()})
	}))

	mux.HandleFunc("GET /audit", auditHandler(rdb, auditKey))
	mux.HandleFunc("GET /reply", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, map[string]any{"deltas": upstreamtest.ReplyDeltas, "text": upstreamtest.ReplyText(len(upstreamtest.ReplyDeltas))})
	})
	mux.HandleFunc("GET /usage-expected", func(w http.ResponseWriter, r *http.Request) {
		body := []byte(r.URL.Query().Get("body"))
		writeJSON(w, upstreamtest.Usage{
			InputTokens:  upstreamtest.InputTokens(body),
			OutputTokens: upstreamtest.OutputTokens(body),
		})
	})
	return mux
}

// auditHandler returns every entry of the audit stream, oldest first, with
// its event field decoded from JSON.
func auditHandler(rdb *redis.Client, auditKey string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), requestTimeout)
		defer cancel()
		entries, err := rdb.XRange(ctx, auditKey, "-", "+").Result()
		if err != nil && err != redis.Nil {
			http.Error(w, "read audit stream: "+err.Error(), http.StatusInternalServerError)
			return
		}

		out := []any{}
		for _, e := range entries {
			raw, _ := e.Values["event"].(string)
			var event any
			if err := json.Unmarshal([]byte(raw), &event); err != nil {
				event = map[string]any{"unparsed": raw, "parse_error": err.Error()}
			}
			out = append(out, map[string]any{"id": e.ID, "event": event})
		}
		writeJSON(w, out)
	}
}

// recordedRequest is the JSON form of an upstream request for the Node tests.
type recordedRequest struct {
	Method     string              `json:"method"`
	Path       string              `json:"path"`
	Query      string              `json:"query"`
	Headers    map[string][]string `json:"headers"`
	Body       string              `json:"body"`
	Authorized bool                `json:"authorized"`
	Stream     bool                `json:"stream"`
	Model      string              `json:"model"`
	Status     int                 `json:"status"`
	Usage      upstreamtest.Usage  `json:"usage"`
}

// recordedRequests converts requests for JSON, with header names in lower
// case as Node's fetch Headers show them.
func recordedRequests(reqs []upstreamtest.Request) []recordedRequest {
	out := make([]recordedRequest, 0, len(reqs))
	for _, r := range reqs {
		h := map[string][]string{}
		for k, v := range r.Header {
			h[strings.ToLower(k)] = v
		}
		out = append(out, recordedRequest{
			Method: r.Method, Path: r.Path, Query: r.RawQuery, Headers: h, Body: string(r.Body),
			Authorized: r.Authorized, Stream: r.Stream, Model: r.Model, Status: r.Status, Usage: r.Usage,
		})
	}
	return out
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

func dumpText(dump map[string]string) string {
	var b strings.Builder
	for k, v := range dump {
		b.WriteString(k)
		b.WriteString("\n")
		b.WriteString(v)
		b.WriteString("\n")
	}
	return b.String()
}

func auditText(t *testing.T, rdb *redis.Client, key string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	entries, err := rdb.XRange(ctx, key, "-", "+").Result()
	if err != nil {
		t.Fatalf("read audit stream %s: %v", key, err)
	}
	var b strings.Builder
	for _, e := range entries {
		for field, v := range e.Values {
			fmt.Fprintf(&b, "%s %s %v\n", e.ID, field, v)
		}
	}
	return b.String()
}

// metricsText returns the Prometheus exposition served on listen.
func metricsText(t *testing.T, listen string) string {
	t.Helper()
	client := &http.Client{Timeout: requestTimeout}
	resp, err := client.Get("http://" + listen + "/metrics")
	if err != nil {
		t.Fatalf("read metrics: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("read metrics: status %d, %v", resp.StatusCode, err)
	}
	return string(body)
}

// findSecrets lists every BYOK key, or the middle 20 characters of one,
// found in any of the places. Findings name the provider and the place, never
// the key.
func findSecrets(keys map[string]string, places map[string]string) []string {
	var found []string
	for _, p := range providers {
		key := keys[p]
		start := (len(key) - 20) / 2
		forms := []struct{ name, text string }{
			{"the whole key", key},
			{"its middle 20 characters", key[start : start+20]},
		}
		for _, where := range slices.Sorted(maps.Keys(places)) {
			for _, form := range forms {
				if strings.Contains(places[where], form.text) {
					found = append(found, fmt.Sprintf("BYOK key of %s: %s found in %s", p, form.name, where))
				}
			}
		}
	}
	return found
}

func TestFindSecrets(t *testing.T) {
	keys := map[string]string{}
	for _, p := range providers {
		keys[p] = newKey(t, p)
	}
	openai := keys[upstreamtest.OpenAI]
	start := (len(openai) - 20) / 2
	places := map[string]string{
		"clean":  "nothing here " + keys[upstreamtest.Google][:10],
		"whole":  "x" + keys[upstreamtest.Anthropic] + "y",
		"middle": "..." + openai[start:start+20] + "...",
	}
	got := findSecrets(keys, places)
	want := []string{
		"BYOK key of anthropic: the whole key found in whole",
		"BYOK key of anthropic: its middle 20 characters found in whole",
		"BYOK key of openai: its middle 20 characters found in middle",
	}
	if !slices.Equal(got, want) {
		t.Errorf("findSecrets = %q, want %q", got, want)
	}
	for _, f := range got {
		for _, k := range keys {
			if strings.Contains(f, k[4:24]) {
				t.Errorf("finding %q contains part of a key", f)
			}
		}
	}
}
