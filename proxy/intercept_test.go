package proxy

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/audit"
	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/internal/upstreamtest"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/metrics"
)

const (
	fwdByokMailbox   = "byok@example.com"
	fwdSharedMailbox = "shared@example.com"
	fwdTimeout       = 20 * time.Second
)

// forwardEnv is a Handler behind a Forward on 127.0.0.1, with TLS
// emulators of OpenAI and Anthropic as its upstreams and a real Redis.
type forwardEnv struct {
	proxyURL  string // http://127.0.0.1:PORT of the forward proxy
	caFile    string
	caPool    *x509.CertPool
	ca        tls.Certificate
	fwd       *Forward
	store     *keystore.Store
	rdb       *redis.Client
	auditKey  string
	signer    *mailbox.Signer
	upstreams map[string]*upstreamtest.Server
	byokKeys  map[string]string
	shared    map[string]string
	// byokToken names a mailbox whose source is byok for both providers,
	// sharedToken one on the shared keys.
	byokToken, sharedToken string
	log                    *syncLog
}

// syncLog collects the proxy's log lines for tests that look for a line.
type syncLog struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (l *syncLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *syncLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func fwdRandom(t *testing.T, n int) string {
	t.Helper()
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, n)
	for i := range b {
		k, err := rand.Int(rand.Reader, big.NewInt(int64(len(alphabet))))
		if err != nil {
			t.Fatal(err)
		}
		b[i] = alphabet[k.Int64()]
	}
	return string(b)
}

// newTestCA returns a CA like "byokproxy ca new" makes, and the path of its
// certificate in PEM.
func newTestCA(t *testing.T, validity time.Duration) (tls.Certificate, string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "byokproxy test CA"},
		NotBefore:    time.Now().Add(-time.Hour), NotAfter: time.Now().Add(validity),
		IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	file := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, file
}

func newForwardEnv(t *testing.T) *forwardEnv {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), fwdTimeout)
	defer cancel()

	rs := redistest.Start(t)
	prefix := rs.Prefix(t)
	rdb := rs.Client(t)
	ids, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	store := keystore.New(rdb, prefix, ids)
	signer, err := mailbox.NewSigner([]string{fwdRandom(t, 40)})
	if err != nil {
		t.Fatal(err)
	}

	env := &forwardEnv{
		store: store, rdb: rdb, auditKey: store.Layout().Audit(), signer: signer,
		upstreams: map[string]*upstreamtest.Server{},
		byokKeys:  map[string]string{"openai": "sk-proj-" + fwdRandom(t, 40), "anthropic": "sk-ant-api03-" + fwdRandom(t, 48)},
		shared:    map[string]string{"openai": "sk-proj-" + fwdRandom(t, 40), "anthropic": "sk-ant-api03-" + fwdRandom(t, 48)},
		log:       &syncLog{},
	}
	cfg := config.Defaults()
	for _, name := range []string{upstreamtest.OpenAI, upstreamtest.Anthropic} {
		up := upstreamtest.New(name, true, env.shared[name], env.byokKeys[name])
		t.Cleanup(up.Close)
		env.upstreams[name] = up
		caFile := filepath.Join(t.TempDir(), name+"-upstream.pem")
		if err := os.WriteFile(caFile, up.CertPEM(), 0o644); err != nil {
			t.Fatal(err)
		}
		pc := cfg.Providers[name]
		pc.Upstream, pc.CAFile, pc.SharedKey = up.URL, caFile, env.shared[name]
	}
	// Google keeps its default upstream, which no test reaches.

	logger := slog.New(slog.NewTextHandler(env.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	m := metrics.New(prometheus.NewRegistry())
	writer := audit.NewWriter(rdb, store.Layout(), audit.Options{Logger: logger})
	auditCtx, stopAudit := context.WithCancel(context.Background())
	go writer.Run(auditCtx)
	t.Cleanup(func() {
		closeCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		writer.Close(closeCtx)
		stopAudit()
	})

	h, err := New(Options{Config: cfg, Store: store, Signer: signer, Audit: writer, Metrics: m, Logger: logger})
	if err != nil {
		t.Fatalf("proxy.New: %v", err)
	}
	env.ca, env.caFile = newTestCA(t, 30*24*time.Hour)
	env.caPool = x509.NewCertPool()
	env.caPool.AddCert(env.ca.Leaf)
	env.fwd, err = NewForward(h, env.ca, logger.With("component", "forward"))
	if err != nil {
		t.Fatalf("NewForward: %v", err)
	}
	srv := httptest.NewServer(env.fwd)
	t.Cleanup(func() {
		srv.Close()
		env.fwd.Close()
	})
	env.proxyURL = srv.URL

	byok := mailbox.ID(fwdByokMailbox)
	for name, key := range env.byokKeys {
		if _, err := store.PutKey(ctx, byok, name, []byte(key)); err != nil {
			t.Fatalf("put %s key: %v", name, err)
		}
		if _, err := store.SetSource(ctx, byok, name, keystore.SourceBYOK); err != nil {
			t.Fatalf("select byok for %s: %v", name, err)
		}
	}
	env.byokToken = env.issue(t, fwdByokMailbox)
	env.sharedToken = env.issue(t, fwdSharedMailbox)
	return env
}

func (e *forwardEnv) issue(t *testing.T, id string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), fwdTimeout)
	defer cancel()
	gen, err := e.store.Generation(ctx, mailbox.ID(id))
	if err != nil {
		t.Fatalf("generation of %s: %v", id, err)
	}
	return e.signer.Issue(mailbox.ID(id), gen)
}

// proxyAddr returns host:port of the forward proxy.
func (e *forwardEnv) proxyAddr() string { return strings.TrimPrefix(e.proxyURL, "http://") }

// proxyWithToken returns the proxy URL with token as the password.
func (e *forwardEnv) proxyWithToken(token string) string {
	return "http://mbx:" + token + "@" + e.proxyAddr()
}

// client returns an HTTP client that uses the forward proxy with token in
// its URL (none when empty) and trusts the proxy's CA only.
func (e *forwardEnv) client(token string, http2 bool) *http.Client {
	proxyURL, _ := url.Parse(e.proxyURL)
	if token != "" {
		proxyURL.User = url.UserPassword("mbx", token)
	}
	return &http.Client{
		Timeout: fwdTimeout,
		Transport: &http.Transport{
			Proxy:             http.ProxyURL(proxyURL),
			TLSClientConfig:   &tls.Config{RootCAs: e.caPool},
			ForceAttemptHTTP2: http2,
		},
	}
}

// checkUpstreamRequest fails unless the upstream received req with exactly
// wantKey as its credential, no Proxy-Authorization and none of the
// mailbox tokens anywhere.
func checkUpstreamRequest(t *testing.T, req upstreamtest.Request, wantKey string, tokens ...string) {
	t.Helper()
	if req.Key != wantKey {
		t.Errorf("upstream credential is not the expected injected key (got %d characters)", len(req.Key))
	}
	if !req.Authorized {
		t.Errorf("upstream did not accept the credential")
	}
	if v := req.Header.Get("Proxy-Authorization"); v != "" {
		t.Errorf("upstream received Proxy-Authorization")
	}
	for _, token := range tokens {
		for name, values := range req.Header {
			for _, v := range values {
				if strings.Contains(v, token) {
					t.Errorf("upstream header %s contains a mailbox token", name)
				}
			}
		}
		if strings.Contains(req.RawQuery, token) || strings.Contains(string(req.Body), token) {
			t.Errorf("upstream query or body contains a mailbox token")
		}
	}
}

// lastRequest returns the one request an upstream received.
func lastRequest(t *testing.T, up *upstreamtest.Server) upstreamtest.Request {
	t.Helper()
	reqs := up.Requests()
	if len(reqs) != 1 {
		t.Fatalf("upstream received %d requests, want 1", len(reqs))
	}
	return reqs[0]
}

// curlEnv is the environment for curl with every proxy variable removed, so
// only the command line picks the proxy.
func curlEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasSuffix(strings.ToLower(name), "_proxy") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

func (e *forwardEnv) curlCommand(ctx context.Context, proxy string, args ...string) *exec.Cmd {
	base := []string{"--silent", "--show-error", "--noproxy", "", "--proxy", proxy, "--cacert", e.caFile, "--max-time", "15"}
	cmd := exec.CommandContext(ctx, "curl", append(base, args...)...)
	cmd.Env = curlEnv()
	cmd.WaitDelay = 2 * time.Second
	return cmd
}

func requireCurl(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatal("curl not found on PATH: install curl (Debian: apt-get install curl)")
	}
}

// curlMeta is what curl's --write-out reports after the body.
type curlMeta struct {
	status  string
	connect string
	version string
}

const curlWriteOut = "\n--meta %{http_code} %{http_connect} %{http_version}\n"

func splitCurlOutput(t *testing.T, out string) (string, curlMeta) {
	t.Helper()
	i := strings.LastIndex(out, "\n--meta ")
	if i < 0 {
		t.Fatalf("curl output has no --write-out line:\n%s", out)
	}
	var m curlMeta
	fmt.Sscan(out[i+len("\n--meta "):], &m.status, &m.connect, &m.version)
	return out[:i], m
}

func TestForwardCurl(t *testing.T) {
	requireCurl(t)
	env := newForwardEnv(t)
	openaiBody := func(stream bool) string {
		return fmt.Sprintf(`{"model":"gpt-4o-mini","stream":%v,"messages":[{"role":"user","content":"say hello to the forward proxy"}]}`, stream)
	}
	anthropicBody := func(stream bool) string {
		return fmt.Sprintf(`{"model":"claude-haiku-4-5","max_tokens":64,"stream":%v,"messages":[{"role":"user","content":"say hello"}]}`, stream)
	}
	cases := []struct {
		name     string
		provider string
		path     string
		body     string
		headers  []string
		byok     bool
		stream   bool
		http11   bool
	}{
		{"openai byok", "openai", "/v1/chat/completions", openaiBody(false), nil, true, false, false},
		{"openai byok stream", "openai", "/v1/chat/completions", openaiBody(true), nil, true, true, false},
		{"openai shared", "openai", "/v1/chat/completions", openaiBody(false), nil, false, false, false},
		{"openai shared stream http1.1", "openai", "/v1/chat/completions", openaiBody(true), nil, false, true, true},
		{"anthropic byok stream", "anthropic", "/v1/messages", anthropicBody(true), []string{"anthropic-version: 2023-06-01"}, true, true, false},
		{"anthropic shared http1.1", "anthropic", "/v1/messages", anthropicBody(false), []string{"anthropic-version: 2023-06-01"}, false, false, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			up := env.upstreams[c.provider]
			up.Reset()
			token, key, mbx := env.sharedToken, env.shared[c.provider], fwdSharedMailbox
			if c.byok {
				token, key, mbx = env.byokToken, env.byokKeys[c.provider], fwdByokMailbox
			}
			args := []string{"--write-out", curlWriteOut, "-H", "Content-Type: application/json", "--data", c.body}
			if c.stream {
				args = append(args, "--no-buffer")
			}
			if c.http11 {
				args = append(args, "--http1.1")
			}
			for _, h := range c.headers {
				args = append(args, "-H", h)
			}
			args = append(args, up.URL+c.path)

			ctx, cancel := context.WithTimeout(context.Background(), fwdTimeout)
			defer cancel()
			out, err := env.curlCommand(ctx, env.proxyWithToken(token), args...).CombinedOutput()
			if err != nil {
				t.Fatalf("curl: %v\n%s", err, out)
			}
			body, meta := splitCurlOutput(t, string(out))
			if meta.status != "200" {
				t.Fatalf("status %s, want 200; body:\n%s", meta.status, body)
			}
			if meta.connect != "200" {
				t.Errorf("CONNECT status %s, want 200", meta.connect)
			}
			wantVersion := "2"
			if c.http11 {
				wantVersion = "1.1"
			}
			if meta.version != wantVersion {
				t.Errorf("HTTP version %s, want %s", meta.version, wantVersion)
			}
			if c.stream {
				terminal := "data: [DONE]"
				if c.provider == "anthropic" {
					terminal = "event: message_stop"
				}
				if !strings.Contains(body, terminal) {
					t.Errorf("stream lacks %q:\n%s", terminal, body)
				}
				if c.provider == "openai" && strings.Contains(body, `"choices":[]`) {
					t.Errorf("stream contains the usage chunk the client did not ask for:\n%s", body)
				}
			} else if !strings.Contains(body, upstreamtest.ReplyText(1)) {
				t.Errorf("reply lacks the emulator's text:\n%s", body)
			}
			if strings.Contains(body, key) {
				t.Errorf("response body contains the injected key")
			}
			checkUpstreamRequest(t, lastRequest(t, up), key, token)

			kind := "metered"
			if c.byok {
				kind = "byok"
			}
			env.waitAudit(t, mbx, "/"+c.provider+c.path, kind)
		})
	}
}

// waitAudit waits for an audit event of mailbox for path and checks its
// kind and usage.
func (e *forwardEnv) waitAudit(t *testing.T, mbx, path, kind string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		entries, err := e.rdb.XRange(ctx, e.auditKey, "-", "+").Result()
		cancel()
		if err != nil && !errors.Is(err, redis.Nil) {
			t.Fatalf("read audit stream: %v", err)
		}
		for i := len(entries) - 1; i >= 0; i-- {
			raw, _ := entries[i].Values["event"].(string)
			var ev struct {
				Kind         string `json:"kind"`
				Mailbox      string `json:"mailbox"`
				Path         string `json:"path"`
				Status       int    `json:"status"`
				InputTokens  int64  `json:"input_tokens"`
				OutputTokens int64  `json:"output_tokens"`
			}
			if json.Unmarshal([]byte(raw), &ev) != nil || ev.Mailbox != mbx || ev.Path != path {
				continue
			}
			if ev.Kind != kind {
				t.Errorf("audit kind = %q, want %q", ev.Kind, kind)
			}
			if ev.Status != http.StatusOK {
				t.Errorf("audit status = %d, want 200", ev.Status)
			}
			if ev.InputTokens == 0 || ev.OutputTokens == 0 {
				t.Errorf("audit usage = %d in, %d out; want both counted", ev.InputTokens, ev.OutputTokens)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no audit event for %s %s after 10s", mbx, path)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestForwardStreamFlushesEachEvent holds the upstream after its first
// event: the client must already have that event, so nothing on the
// intercepted path buffers the stream.
func TestForwardStreamFlushesEachEvent(t *testing.T) {
	requireCurl(t)
	env := newForwardEnv(t)
	up := env.upstreams["openai"]
	for _, version := range []string{"--http2", "--http1.1"} {
		t.Run(version, func(t *testing.T) {
			up.Reset()
			up.Hold()
			defer up.Release()
			ctx, cancel := context.WithTimeout(context.Background(), fwdTimeout)
			defer cancel()
			cmd := env.curlCommand(ctx, env.proxyWithToken(env.byokToken), "--no-buffer", version,
				"-H", "Content-Type: application/json",
				"--data", `{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hold on"}]}`,
				up.URL+"/v1/chat/completions")
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatalf("start curl: %v", err)
			}
			lines := make(chan string, 64)
			go func() {
				defer close(lines)
				sc := bufio.NewScanner(stdout)
				for sc.Scan() {
					lines <- sc.Text()
				}
			}()

			select {
			case line, ok := <-lines:
				if !ok {
					t.Fatalf("curl ended before the first event: %v", cmd.Wait())
				}
				if !strings.HasPrefix(line, "data: ") {
					t.Fatalf("first line %q is not an event", line)
				}
			case <-ctx.Done():
				t.Fatal("the first event did not reach the client while the upstream held the stream")
			}
			if count := up.HeldStreams(); count != 1 {
				t.Errorf("upstream holds %d streams, want 1: the first event must arrive while the stream is held", count)
			}
			up.Release()

			var rest []string
			for line := range lines {
				if line != "" {
					rest = append(rest, line)
				}
			}
			if err := cmd.Wait(); err != nil {
				t.Fatalf("curl: %v", err)
			}
			if len(rest) == 0 || rest[len(rest)-1] != "data: [DONE]" {
				t.Errorf("stream did not end with [DONE]: %q", rest)
			}
		})
	}
}

func TestForwardGoClient(t *testing.T) {
	env := newForwardEnv(t)
	up := env.upstreams["openai"]
	for _, h2 := range []bool{true, false} {
		t.Run(fmt.Sprintf("http2=%v", h2), func(t *testing.T) {
			up.Reset()
			resp, err := env.client(env.byokToken, h2).Get(up.URL + "/v1/models")
			if err != nil {
				t.Fatalf("GET through the forward proxy: %v", err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d: %s", resp.StatusCode, body)
			}
			wantMajor := 1
			if h2 {
				wantMajor = 2
			}
			if resp.ProtoMajor != wantMajor {
				t.Errorf("protocol %s, want HTTP/%d", resp.Proto, wantMajor)
			}
			if resp.Header.Get("X-Request-Id") == "" {
				t.Errorf("response lacks the proxy's X-Request-Id")
			}
			checkUpstreamRequest(t, lastRequest(t, up), env.byokKeys["openai"], env.byokToken)
		})
	}
}

func TestForwardTokenPlacement(t *testing.T) {
	env := newForwardEnv(t)
	up := env.upstreams["openai"]
	chat := `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`
	cases := []struct {
		name       string
		proxyToken string
		authHeader string
		wantStatus int
		wantKey    string
	}{
		{"token in request only", "", "Bearer " + env.byokToken, http.StatusOK, env.byokKeys["openai"]},
		{"proxy token replaces placeholder key", env.byokToken, "Bearer sk-placeholder-not-a-token", http.StatusOK, env.byokKeys["openai"]},
		{"proxy token wins over another token", env.sharedToken, "Bearer " + env.byokToken, http.StatusOK, env.shared["openai"]},
		{"proxy token with no request key", env.sharedToken, "", http.StatusOK, env.shared["openai"]},
		{"no token anywhere", "", "", http.StatusUnauthorized, ""},
		{"placeholder without proxy token", "", "Bearer sk-placeholder-not-a-token", http.StatusUnauthorized, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			up.Reset()
			req, _ := http.NewRequest(http.MethodPost, up.URL+"/v1/chat/completions", strings.NewReader(chat))
			req.Header.Set("Content-Type", "application/json")
			if c.authHeader != "" {
				req.Header.Set("Authorization", c.authHeader)
			}
			resp, err := env.client(c.proxyToken, true).Do(req)
			if err != nil {
				t.Fatalf("request: %v", err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != c.wantStatus {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, c.wantStatus, body)
			}
			if c.wantStatus != http.StatusOK {
				var shape struct {
					Error struct {
						Code string `json:"code"`
						Type string `json:"type"`
					} `json:"error"`
				}
				if err := json.Unmarshal(body, &shape); err != nil || shape.Error.Code != "invalid_api_key" {
					t.Errorf("body %s is not OpenAI's invalid_api_key error", body)
				}
				if n := len(up.Requests()); n != 0 {
					t.Errorf("upstream received %d requests for a rejected one", n)
				}
				return
			}
			checkUpstreamRequest(t, lastRequest(t, up), c.wantKey, env.byokToken, env.sharedToken)
		})
	}
}

// TestForwardProxyTokenKeepsQuery sends a placeholder ?key= next to other
// parameters through a tunnel with a proxy token. The placeholder goes, and
// the rest reach the upstream in their order and encoding.
func TestForwardProxyTokenKeepsQuery(t *testing.T) {
	env := newForwardEnv(t)
	up := env.upstreams["openai"]
	resp, err := env.client(env.byokToken, true).Get(up.URL + "/v1/models?z=1&key=placeholder&a=b%2Bc&%6Bey=other&m=2")
	if err != nil {
		t.Fatalf("GET through the forward proxy: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	if got := lastRequest(t, up).RawQuery; got != "z=1&a=b%2Bc&m=2" {
		t.Errorf("upstream query %q, want %q", got, "z=1&a=b%2Bc&m=2")
	}
}

// rawConnect sends CONNECT target to the forward proxy with the given
// Proxy-Authorization (none when empty) and returns the response.
func (e *forwardEnv) rawConnect(t *testing.T, target, proxyAuth string) (*http.Response, string) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", e.proxyAddr(), 5*time.Second)
	if err != nil {
		t.Fatalf("dial forward proxy: %v", err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(fwdTimeout))
	req := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n"
	if proxyAuth != "" {
		req += "Proxy-Authorization: " + proxyAuth + "\r\n"
	}
	if _, err := io.WriteString(conn, req+"\r\n"); err != nil {
		t.Fatalf("write CONNECT: %v", err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: http.MethodConnect})
	if err != nil {
		t.Fatalf("read CONNECT response: %v", err)
	}
	if resp.StatusCode == http.StatusOK {
		// The tunnel is open: what follows is the TLS stream, not a body.
		return resp, ""
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	return resp, string(body)
}

func basic(user, password string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+password))
}

func TestForwardProxyCredential(t *testing.T) {
	env := newForwardEnv(t)
	target := strings.TrimPrefix(env.upstreams["openai"].URL, "https://")

	revokedID := "revoked@example.com"
	revoked := env.issue(t, revokedID)
	ctx, cancel := context.WithTimeout(context.Background(), fwdTimeout)
	defer cancel()
	if _, err := env.store.Revoke(ctx, mailbox.ID(revokedID)); err != nil {
		t.Fatalf("revoke: %v", err)
	}
	otherSigner, _ := mailbox.NewSigner([]string{fwdRandom(t, 40)})
	forged := otherSigner.Issue(mailbox.ID(fwdByokMailbox), 0)

	cases := []struct {
		name   string
		auth   string
		status int
	}{
		{"basic password", basic("mbx", env.byokToken), http.StatusOK},
		{"basic user name only", basic(env.byokToken, ""), http.StatusOK},
		{"bearer", "Bearer " + env.byokToken, http.StatusOK},
		{"none", "", http.StatusOK},
		{"wrong token", basic("mbx", "bp1.bm9ib2R5.0.AAAA"), http.StatusProxyAuthRequired},
		{"token of another secret", basic("mbx", forged), http.StatusProxyAuthRequired},
		{"revoked token", basic("mbx", revoked), http.StatusProxyAuthRequired},
		{"not base64", "Basic !!!", http.StatusProxyAuthRequired},
		{"empty credentials", basic("", ""), http.StatusProxyAuthRequired},
		{"unknown scheme", "Digest username=mbx", http.StatusProxyAuthRequired},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, body := env.rawConnect(t, target, c.auth)
			if resp.StatusCode != c.status {
				t.Fatalf("CONNECT status %d, want %d: %s", resp.StatusCode, c.status, body)
			}
			if c.status == http.StatusProxyAuthRequired {
				if got := resp.Header.Get("Proxy-Authenticate"); !strings.HasPrefix(got, "Basic") {
					t.Errorf("Proxy-Authenticate = %q, want a Basic challenge", got)
				}
				if strings.Contains(body, "bp1.") {
					t.Errorf("407 body repeats the token: %s", body)
				}
			}
		})
	}

	t.Run("curl wrong token", func(t *testing.T) {
		requireCurl(t)
		ctx, cancel := context.WithTimeout(context.Background(), fwdTimeout)
		defer cancel()
		out, err := env.curlCommand(ctx, env.proxyWithToken(forged), "--write-out", curlWriteOut,
			env.upstreams["openai"].URL+"/v1/models").CombinedOutput()
		if err == nil {
			t.Fatalf("curl succeeded through a wrong proxy token:\n%s", out)
		}
		_, meta := splitCurlOutput(t, string(out))
		if meta.connect != "407" {
			t.Errorf("CONNECT status %s, want 407", meta.connect)
		}
		if n := len(env.upstreams["openai"].Requests()); n != 0 {
			t.Errorf("upstream received %d requests", n)
		}
	})
}

// countingListener records the connections it accepts.
type countingListener struct {
	net.Listener
	accepted chan net.Conn
}

func startCountingListener(t *testing.T) *countingListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cl := &countingListener{Listener: ln, accepted: make(chan net.Conn, 16)}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for range 16 {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			cl.accepted <- c
			t.Cleanup(func() { c.Close() })
		}
	}()
	return cl
}

func TestForwardRefusesOtherDestinations(t *testing.T) {
	env := newForwardEnv(t)
	other := startCountingListener(t)
	openaiURL, _ := url.Parse(env.upstreams["openai"].URL)
	_, upstreamPort, _ := net.SplitHostPort(openaiURL.Host)
	_, otherPort, _ := net.SplitHostPort(other.Addr().String())

	cases := []struct {
		name   string
		target string
	}{
		{"configured host on another port", "127.0.0.1:" + otherPort},
		{"another host on the upstream port", "127.0.0.2:" + upstreamPort},
		{"same port under another name", "localhost:" + upstreamPort},
		{"default provider host", "api.openai.com:443"},
		{"no port", "127.0.0.1"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, body := env.rawConnect(t, c.target, basic("mbx", env.byokToken))
			if resp.StatusCode != http.StatusForbidden {
				t.Fatalf("CONNECT %s: status %d, want 403: %s", c.target, resp.StatusCode, body)
			}
		})
	}
	// Google keeps its default upstream, so its real host is a configured
	// destination and the CONNECT is accepted. No request follows, so
	// nothing reaches that host.
	if resp, body := env.rawConnect(t, "generativelanguage.googleapis.com:443", ""); resp.StatusCode != http.StatusOK {
		t.Errorf("CONNECT to the configured Google host: status %d, want 200: %s", resp.StatusCode, body)
	}

	// A marker connection made now is the first the listener accepts unless
	// the proxy connected to it before.
	marker, err := net.DialTimeout("tcp", other.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer marker.Close()
	select {
	case c := <-other.accepted:
		if c.RemoteAddr().String() != marker.LocalAddr().String() {
			t.Errorf("the unconfigured destination accepted a connection from %s before the marker", c.RemoteAddr())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the marker connection was not accepted")
	}
	if !strings.Contains(env.log.String(), "forward proxy CONNECT rejected: not a configured upstream") {
		t.Errorf("no log line for the rejected CONNECT")
	}
}

func TestForwardRefusesPlainRequests(t *testing.T) {
	env := newForwardEnv(t)
	other := startCountingListener(t)
	openai := env.upstreams["openai"].URL
	cases := []struct {
		name   string
		method string
		target string
	}{
		{"plain http to another host", http.MethodGet, "http://" + other.Addr().String() + "/"},
		{"plain http to the upstream host", http.MethodPost, "http://" + strings.TrimPrefix(openai, "https://") + "/v1/chat/completions"},
		{"absolute https without CONNECT", http.MethodGet, openai + "/v1/models"},
		{"origin form", http.MethodGet, "/v1/models"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			conn, err := net.DialTimeout("tcp", env.proxyAddr(), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(fwdTimeout))
			fmt.Fprintf(conn, "%s %s HTTP/1.1\r\nHost: example.test\r\nProxy-Authorization: %s\r\nContent-Length: 0\r\n\r\n",
				c.method, c.target, basic("mbx", env.byokToken))
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatalf("read response: %v", err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusForbidden {
				t.Errorf("status %d, want 403", resp.StatusCode)
			}
		})
	}
	if n := len(env.upstreams["openai"].Requests()); n != 0 {
		t.Errorf("upstream received %d requests", n)
	}
	select {
	case c := <-other.accepted:
		t.Errorf("the proxy connected to %s", c.LocalAddr())
	default:
	}
	if !strings.Contains(env.log.String(), "forward proxy request rejected: not a CONNECT") {
		t.Errorf("no log line for the rejected plain request")
	}
}

func TestForwardLeafCertificates(t *testing.T) {
	env := newForwardEnv(t)
	target := strings.TrimPrefix(env.upstreams["openai"].URL, "https://")
	host, _, _ := net.SplitHostPort(target)

	handshake := func(serverName string) (*x509.Certificate, error) {
		proxyURL, _ := url.Parse(env.proxyURL)
		conn, err := net.DialTimeout("tcp", proxyURL.Host, 5*time.Second)
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(fwdTimeout))
		fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
		br := bufio.NewReader(conn)
		resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
		if err != nil {
			return nil, err
		}
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("CONNECT status %d", resp.StatusCode)
		}
		tc := tls.Client(conn, &tls.Config{RootCAs: env.caPool, ServerName: serverName})
		if err := tc.Handshake(); err != nil {
			return nil, err
		}
		return tc.ConnectionState().PeerCertificates[0], nil
	}

	first, err := handshake(host)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	second, err := handshake(host)
	if err != nil {
		t.Fatalf("second handshake: %v", err)
	}
	if first.SerialNumber.Cmp(second.SerialNumber) != 0 {
		t.Errorf("the certificate of %s was minted again instead of reused", host)
	}
	if len(first.IPAddresses) != 1 || first.IPAddresses[0].String() != host {
		t.Errorf("certificate IP addresses = %v, want [%s]", first.IPAddresses, host)
	}
	if first.NotAfter.After(env.ca.Leaf.NotAfter) {
		t.Errorf("certificate outlives its CA: %v after %v", first.NotAfter, env.ca.Leaf.NotAfter)
	}
	if first.IsCA {
		t.Errorf("host certificate is a CA")
	}
	if _, err := handshake("api.openai.com"); err == nil {
		t.Errorf("a client asking for another name accepted the certificate of %s", host)
	}
}

func TestLeafCacheRenews(t *testing.T) {
	ca, _ := newTestCA(t, 30*24*time.Hour)
	c, err := newLeafCache(ca)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	c.now = func() time.Time { return now }
	first, err := c.get("api.example")
	if err != nil {
		t.Fatal(err)
	}
	if first.Leaf.DNSNames[0] != "api.example" {
		t.Errorf("DNS names = %v", first.Leaf.DNSNames)
	}
	again, _ := c.get("api.example")
	if again != first {
		t.Errorf("second get minted a new certificate")
	}
	// Certificate times have whole seconds.
	if got := first.Leaf.NotAfter.Sub(now); got < leafLifetime-time.Second || got > leafLifetime {
		t.Errorf("certificate lifetime = %v, want %v", got, leafLifetime)
	}
	now = first.Leaf.NotAfter.Add(-leafRenewBefore - time.Minute)
	if same, _ := c.get("api.example"); same != first {
		t.Errorf("a certificate more than %v from its end was renewed", leafRenewBefore)
	}
	now = first.Leaf.NotAfter.Add(-leafRenewBefore + time.Minute)
	renewed, _ := c.get("api.example")
	if renewed == first {
		t.Errorf("a certificate within %v of its end was not renewed", leafRenewBefore)
	}

	// Near the CA's end, certificates end with it.
	now = ca.Leaf.NotAfter.Add(-48 * time.Hour)
	late, err := c.get("late.example")
	if err != nil {
		t.Fatal(err)
	}
	if !late.Leaf.NotAfter.Equal(ca.Leaf.NotAfter) {
		t.Errorf("certificate ends %v, want the CA's end %v", late.Leaf.NotAfter, ca.Leaf.NotAfter)
	}
	now = ca.Leaf.NotAfter.Add(time.Minute)
	if _, err := c.get("api.example"); err == nil {
		t.Errorf("a certificate was minted after the CA expired")
	}
}

func TestNewForwardRejectsBadCA(t *testing.T) {
	ca, _ := newTestCA(t, 30*24*time.Hour)
	leafCache, _ := newLeafCache(ca)
	leaf, err := leafCache.get("api.example")
	if err != nil {
		t.Fatal(err)
	}
	expired := ca
	expiredLeaf := *ca.Leaf
	expiredLeaf.NotAfter = time.Now().Add(-time.Hour)
	expired.Leaf = &expiredLeaf
	cases := []struct {
		name string
		ca   tls.Certificate
		want string
	}{
		{"empty", tls.Certificate{}, "no certificate"},
		{"not a CA", tls.Certificate{Certificate: leaf.Certificate[:1], PrivateKey: leaf.PrivateKey, Leaf: leaf.Leaf}, "not a CA"},
		{"expired", expired, "expired"},
		{"no signer", tls.Certificate{Certificate: ca.Certificate, Leaf: ca.Leaf}, "unsupported private key"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if _, err := newLeafCache(c.ca); err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("error = %v, want one containing %q", err, c.want)
			}
		})
	}
}

func TestRebase(t *testing.T) {
	s := &settings{upstreams: map[string]*upstream{}}
	add := func(name, base string) {
		u, err := url.Parse(base)
		if err != nil {
			t.Fatal(err)
		}
		s.upstreams[name] = &upstream{base: u}
	}
	add("openai", "https://api.openai.com")
	add("anthropic", "https://gateway.example:8443/anthropic/")
	add("google", "https://gateway.example:8443/google")

	cases := []struct {
		authority string
		target    string
		ok        bool
		path      string
		rawPath   string
	}{
		{"api.openai.com:443", "/v1/chat/completions", true, "/openai/v1/chat/completions", ""},
		{"api.openai.com:443", "/", true, "/openai/", ""},
		{"gateway.example:8443", "/anthropic/v1/messages", true, "/anthropic/v1/messages", ""},
		{"gateway.example:8443", "/google/v1beta/models", true, "/google/v1beta/models", ""},
		{"gateway.example:8443", "/google", true, "/google", ""},
		{"gateway.example:8443", "/googleapis/v1", false, "", ""},
		{"gateway.example:8443", "/v1/messages", false, "", ""},
		{"api.openai.com:8443", "/v1/models", false, "", ""},
		{"api.openai.com:443", "/v1/files/a%2Fb", true, "/openai/v1/files/a/b", "/openai/v1/files/a%2Fb"},
	}
	for _, c := range cases {
		t.Run(c.authority+c.target, func(t *testing.T) {
			u, err := url.Parse(c.target)
			if err != nil {
				t.Fatal(err)
			}
			ok := s.rebase(c.authority, u)
			if ok != c.ok {
				t.Fatalf("rebase = %v, want %v", ok, c.ok)
			}
			if !ok {
				return
			}
			if u.Path != c.path {
				t.Errorf("path = %q, want %q", u.Path, c.path)
			}
			if u.RawPath != c.rawPath {
				t.Errorf("raw path = %q, want %q", u.RawPath, c.rawPath)
			}
		})
	}
}

func TestConnectTarget(t *testing.T) {
	s := &settings{upstreams: map[string]*upstream{}}
	for name, base := range map[string]string{
		"openai":    "https://API.OpenAI.com",
		"anthropic": "https://127.0.0.1:9443",
		"google":    "http://plain.example",
	} {
		u, _ := url.Parse(base)
		s.upstreams[name] = &upstream{base: u}
	}
	cases := []struct {
		authority string
		ok        bool
	}{
		{"api.openai.com:443", true},
		{"API.OPENAI.COM:443", true},
		{"api.openai.com.:443", true},
		{"api.openai.com:80", false},
		{"127.0.0.1:9443", true},
		{"[::1]:9443", false},
		{"plain.example:80", false},
		{"plain.example:443", false},
		{"api.openai.com", false},
		{":443", false},
	}
	for _, c := range cases {
		if _, ok := s.connectTarget(c.authority); ok != c.ok {
			t.Errorf("connectTarget(%q) = %v, want %v", c.authority, ok, c.ok)
		}
	}
}

func TestProxyToken(t *testing.T) {
	cases := []struct {
		name    string
		header  string
		token   string
		present bool
		err     bool
	}{
		{"absent", "", "", false, false},
		{"basic password", basic("mbx", "bp1.x"), "bp1.x", true, false},
		{"basic user only", basic("bp1.x", ""), "bp1.x", true, false},
		{"basic lower case scheme", "basic " + base64.StdEncoding.EncodeToString([]byte("u:bp1.x")), "bp1.x", true, false},
		{"bearer", "Bearer bp1.x", "bp1.x", true, false},
		{"basic empty", basic("", ""), "", true, true},
		{"basic invalid", "Basic %%%", "", true, true},
		{"other scheme", "Negotiate abc", "", true, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := http.Header{}
			if c.header != "" {
				h.Set("Proxy-Authorization", c.header)
			}
			token, present, err := proxyToken(h)
			if token != c.token || present != c.present || (err != nil) != c.err {
				t.Errorf("proxyToken = %q, %v, %v; want %q, %v, error %v", token, present, err, c.token, c.present, c.err)
			}
		})
	}
}

// TestForwardShutdownWaitsForStreams starts a held stream, then shuts the
// forward proxy down: Shutdown must wait for the stream, which completes.
func TestForwardShutdownWaitsForStreams(t *testing.T) {
	env := newForwardEnv(t)
	up := env.upstreams["openai"]
	up.Hold()
	defer up.Release()

	req, _ := http.NewRequest(http.MethodPost, up.URL+"/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := env.client(env.byokToken, false).Do(req)
	if err != nil {
		t.Fatalf("request: %v", err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	if line, err := br.ReadString('\n'); err != nil || !strings.HasPrefix(line, "data: ") {
		t.Fatalf("first line %q, %v; want an event", line, err)
	}

	var done atomic.Bool
	shutdown := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), fwdTimeout)
		defer cancel()
		shutdown <- env.fwd.Shutdown(ctx)
		done.Store(true)
	}()
	// Once Shutdown has begun, a new CONNECT gets 503.
	target := strings.TrimPrefix(up.URL, "https://")
	rejected := false
	for range 200 {
		if resp, _ := env.rawConnect(t, target, ""); resp.StatusCode == http.StatusServiceUnavailable {
			rejected = true
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !rejected {
		t.Error("CONNECT during shutdown did not get 503")
	}
	if done.Load() {
		t.Fatal("Shutdown returned while a stream was in flight")
	}
	up.Release()
	rest, err := io.ReadAll(br)
	if err != nil {
		t.Fatalf("reading the rest of the stream: %v", err)
	}
	if !strings.HasSuffix(strings.TrimSpace(string(rest)), "data: [DONE]") {
		t.Errorf("stream did not complete: %q", rest)
	}
	resp.Body.Close()
	select {
	case err := <-shutdown:
		if err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	case <-time.After(fwdTimeout):
		t.Fatal("Shutdown did not return after the stream ended")
	}
}

// TestStopInterceptingEndsOpenTunnels keeps an intercepted connection open
// and calls StopIntercepting, as shutdown does first. A new request must
// not start on that connection, because the grace period would cut it.
func TestStopInterceptingEndsOpenTunnels(t *testing.T) {
	env := newForwardEnv(t)
	up := env.upstreams["openai"]
	client := env.client(env.byokToken, false)
	stream := func() (status int, reused bool, err error) {
		ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
			GotConn: func(info httptrace.GotConnInfo) { reused = info.Reused },
		})
		body := `{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hello"}]}`
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, up.URL+"/v1/chat/completions", strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			return 0, reused, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, reused, nil
	}
	if status, _, err := stream(); err != nil || status != http.StatusOK {
		t.Fatalf("stream before StopIntercepting: %d, %v", status, err)
	}

	env.fwd.StopIntercepting()
	time.Sleep(100 * time.Millisecond)
	status, reused, err := stream()
	if err == nil && status == http.StatusOK && reused {
		t.Error("a new stream started on an intercepted connection after StopIntercepting")
	}
}

// helloWithConnect is a client connection that sends its first write (the
// TLS ClientHello) in one write with a CONNECT request, and reads the
// CONNECT's response before the first read.
type helloWithConnect struct {
	net.Conn
	connect []byte
	reader  *bufio.Reader
	status  int
}

func (c *helloWithConnect) Write(p []byte) (int, error) {
	if c.connect != nil {
		both := append(c.connect, p...)
		c.connect = nil
		if _, err := c.Conn.Write(both); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	return c.Conn.Write(p)
}

func (c *helloWithConnect) Read(p []byte) (int, error) {
	if c.status == 0 {
		resp, err := http.ReadResponse(c.reader, &http.Request{Method: http.MethodConnect})
		if err != nil {
			return 0, err
		}
		c.status = resp.StatusCode
	}
	return c.reader.Read(p)
}

// Some clients send the ClientHello in the same write as the CONNECT, so the
// server reads it together with the CONNECT's header.
func TestForwardClientHelloInConnectWrite(t *testing.T) {
	env := newForwardEnv(t)
	target := strings.TrimPrefix(env.upstreams["openai"].URL, "https://")
	raw, err := net.DialTimeout("tcp", env.proxyAddr(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(fwdTimeout))
	conn := &helloWithConnect{Conn: raw, reader: bufio.NewReader(raw),
		connect: []byte("CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\nProxy-Authorization: " + basic("mbx", env.byokToken) + "\r\n\r\n")}
	host, _, _ := net.SplitHostPort(target)
	tlsConn := tls.Client(conn, &tls.Config{RootCAs: env.caPool, ServerName: host, NextProtos: []string{"http/1.1"}})
	if err := tlsConn.Handshake(); err != nil {
		t.Fatalf("TLS handshake after CONNECT status %d: %v", conn.status, err)
	}
	fmt.Fprintf(tlsConn, "GET /v1/models HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", target)
	resp, err := http.ReadResponse(bufio.NewReader(tlsConn), nil)
	if err != nil {
		t.Fatalf("reading the response in the tunnel: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /v1/models in the tunnel: status %d, want 200", resp.StatusCode)
	}
}
