// Package teststack runs the whole proxy in-process for tests: a real
// redis-server, the three emulated provider upstreams, the proxy handler, the
// admin API and the audit writer, each on its own 127.0.0.1 listener, with the
// debug log captured for inspection.
package teststack

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
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

// Keys used by every stack. The upstreams accept the shared keys and the
// BYOK keys; tests store the BYOK keys through the admin API.
var (
	SharedKeys = map[string]string{
		provider.Anthropic: "sk-ant-api03-SHAREDsharedSHAREDshared0123456789abcdefSHRD",
		provider.OpenAI:    "sk-proj-SHAREDsharedSHAREDshared0123456789abcdefSHRD",
		provider.Google:    "AIzaSHAREDsharedSHAREDshared0123456SHRD",
	}
	BYOKKeys = map[string]string{
		provider.Anthropic: "sk-ant-api03-byokBYOKbyokBYOKbyok0123456789abcdefOWN1",
		provider.OpenAI:    "sk-proj-byokBYOKbyokBYOKbyok0123456789abcdefOWN2",
		provider.Google:    "AIzaBYOKbyokBYOKbyokBYOK01234567890OWN3",
	}
)

// Stack is one running proxy with its dependencies.
type Stack struct {
	Redis     *redistest.Server
	Prefix    string
	RDB       *redis.Client
	Upstreams map[string]*upstreamtest.Server
	Config    *config.Config
	Store     *keystore.Store
	Audit     *audit.Writer
	Registry  *prometheus.Registry
	Metrics   *metrics.Metrics
	Handler   *proxy.Handler
	Admin     *admin.API
	Signer    *mailbox.Signer

	ProxyURL   string
	AdminURL   string
	AdminToken string
	logs       *SyncBuffer
	auditStop  context.CancelFunc
	// active counts the proxy requests being served.
	active atomic.Int64
}

// Option changes the configuration before the stack starts.
type Option func(*config.Config)

// Start runs a stack for t and stops it when the test ends.
func Start(t testing.TB, opts ...Option) *Stack {
	t.Helper()
	srv := redistest.Start(t)
	return StartOn(t, srv, srv.Prefix(t), opts...)
}

// Replica runs a second stack on the same Redis, prefix and identity, like
// another replica of the same deployment.
func (s *Stack) Replica(t testing.TB, opts ...Option) *Stack {
	t.Helper()
	return startOn(t, s.Redis, s.Prefix, s.Store.Identities(), opts...)
}

// StartOn runs a stack on an existing Redis under prefix.
func StartOn(t testing.TB, srv *redistest.Server, prefix string, opts ...Option) *Stack {
	t.Helper()
	return startOn(t, srv, prefix, nil, opts...)
}

func startOn(t testing.TB, srv *redistest.Server, prefix string, ids *keystore.Identities, opts ...Option) *Stack {
	t.Helper()
	s := &Stack{Redis: srv, Prefix: prefix, Upstreams: map[string]*upstreamtest.Server{}, logs: &SyncBuffer{}}
	for _, p := range provider.Names {
		up := upstreamtest.New(p, false, SharedKeys[p], BYOKKeys[p])
		t.Cleanup(up.Close)
		s.Upstreams[p] = up
	}

	cfg := config.Defaults()
	cfg.Redis.URL = srv.URL
	cfg.Redis.Prefix = prefix
	cfg.Admin.Token = "admin-token-for-tests-0123456789"
	cfg.Auth.TokenSecrets = []string{"token-secret-for-tests-0123456789"}
	cfg.Metering.MonthlyTokenLimit = 0
	cfg.ShutdownGrace = 5 * time.Second
	for _, p := range provider.Names {
		pc := cfg.Provider(p)
		pc.Upstream = s.Upstreams[p].URL
		pc.SharedKey = SharedKeys[p]
		pc.ProbeTimeout = 2 * time.Second
	}
	for _, o := range opts {
		o(cfg)
	}
	// The client comes from keystore.OpenRedis, as in cmd/byokproxy, so
	// redis.timeout and the production client options apply.
	rdb, err := keystore.OpenRedis(cfg.Redis)
	if err != nil {
		t.Fatal(err)
	}
	s.RDB = rdb.(*redis.Client)
	t.Cleanup(func() { s.RDB.Close() })
	s.Config = cfg
	s.AdminToken = cfg.Admin.Token

	log := slog.New(slog.NewJSONHandler(s.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	if ids == nil {
		ids, err = keystore.GenerateIdentities()
		if err != nil {
			t.Fatal(err)
		}
	}
	s.Store = keystore.New(s.RDB, prefix, ids)
	s.Store.EnableCache(cfg.Redis.CacheTTL)
	watchCtx, stopWatch := context.WithCancel(context.Background())
	t.Cleanup(stopWatch)
	go s.Store.Watch(watchCtx, log)
	s.Registry = prometheus.NewRegistry()
	s.Metrics = metrics.New(s.Registry)
	s.Signer, err = mailbox.NewSigner(cfg.Auth.TokenSecrets)
	if err != nil {
		t.Fatal(err)
	}
	s.Audit = audit.NewWriter(s.RDB, s.Store.Layout(), audit.Options{
		QueueSize: cfg.Audit.QueueSize, StreamMaxLen: cfg.Audit.StreamMaxLen,
		RetentionMonths: cfg.Metering.RetentionMonths, ResponseTTL: cfg.Metering.ResponseTTL,
		Dropped: s.Metrics.AuditDropped, Logger: log,
	})
	ctx, cancel := context.WithCancel(context.Background())
	s.auditStop = cancel
	go s.Audit.Run(ctx)

	// Every stream that can be detached is, so that tests reach that path
	// with a single stream.
	s.Handler, err = proxy.New(proxy.Options{Config: cfg, Store: s.Store, Signer: s.Signer, Audit: s.Audit, Metrics: s.Metrics, Logger: log,
		AttachedStreams: -1})
	if err != nil {
		t.Fatal(err)
	}
	s.Admin = admin.New(admin.Options{
		Store: s.Store, Signer: s.Signer, Audit: s.Audit, Token: cfg.Admin.Token,
		MonthlyTokenLimit: cfg.Metering.MonthlyTokenLimit, Prober: proxy.NewProber(cfg), Logger: log,
	})
	proxySrv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.active.Add(1)
		defer s.active.Add(-1)
		s.Handler.ServeHTTP(w, r)
	}))
	adminSrv := httptest.NewServer(s.Admin)
	s.ProxyURL, s.AdminURL = proxySrv.URL, adminSrv.URL
	t.Cleanup(func() {
		// Streams detached from the server end first: the server's Close
		// does not wait for them.
		drain, cancelDrain := context.WithTimeout(context.Background(), 5*time.Second)
		s.Handler.Drain(drain)
		cancelDrain()
		proxySrv.Close()
		adminSrv.Close()
		flush, cancelFlush := context.WithTimeout(context.Background(), 5*time.Second)
		s.Audit.Close(flush)
		cancelFlush()
		cancel()
	})
	return s
}

// AttachedProxy serves the stack's stores and upstreams through a second
// Handler with the default AttachedStreams, under which a test's few streams
// stay attached to the HTTP server, as they do in production. It returns the
// Handler and its URL. The server closes when the test ends.
func (s *Stack) AttachedProxy(t testing.TB) (*proxy.Handler, string) {
	t.Helper()
	log := slog.New(slog.NewJSONHandler(s.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	h, err := proxy.New(proxy.Options{Config: s.Config, Store: s.Store, Signer: s.Signer, Audit: s.Audit,
		Metrics: s.Metrics, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return h, srv.URL
}

// Logs returns everything logged so far, as JSON lines.
func (s *Stack) Logs() string { return s.logs.String() }

// AdminDo sends an admin API request with the admin token and returns the
// status and body.
func (s *Stack) AdminDo(t testing.TB, method, path string, body any) (int, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		data, _ := json.Marshal(body)
		rd = bytes.NewReader(data)
	}
	req, _ := http.NewRequest(method, s.AdminURL+path, rd)
	req.Header.Set("Authorization", "Bearer "+s.AdminToken)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("admin %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, data
}

// UseBYOK stores the BYOK key of provider p for mailbox m and selects it.
func (s *Stack) UseBYOK(t testing.TB, m, p string) {
	t.Helper()
	if code, body := s.AdminDo(t, "PUT", "/admin/v1/mailboxes/"+m+"/providers/"+p+"/key", map[string]string{"key": BYOKKeys[p]}); code != 200 {
		t.Fatalf("put key: %d %s", code, body)
	}
	if code, body := s.AdminDo(t, "PUT", "/admin/v1/mailboxes/"+m+"/providers/"+p+"/source", map[string]string{"source": "byok"}); code != 200 {
		t.Fatalf("put source: %d %s", code, body)
	}
}

// Token issues a token for mailbox m through the admin API.
func (s *Stack) Token(t testing.TB, m string) string {
	t.Helper()
	code, body := s.AdminDo(t, "POST", "/admin/v1/mailboxes/"+m+"/token", nil)
	if code != 200 {
		t.Fatalf("issue token: %d %s", code, body)
	}
	var out struct{ Token string }
	json.Unmarshal(body, &out)
	return out.Token
}

// AuditEvents waits until the audit queue is delivered and returns every
// event in the stream, decoded.
func (s *Stack) AuditEvents(t testing.TB) []map[string]any {
	t.Helper()
	s.WaitAudit(t)
	entries, err := s.RDB.XRange(context.Background(), s.Store.Layout().Audit(), "-", "+").Result()
	if err != nil {
		t.Fatalf("read audit stream: %v", err)
	}
	var out []map[string]any
	for _, e := range entries {
		var ev map[string]any
		if err := json.Unmarshal([]byte(fmt.Sprint(e.Values["event"])), &ev); err != nil {
			t.Fatalf("audit entry %s: %v", e.ID, err)
		}
		out = append(out, ev)
	}
	return out
}

// WaitAudit waits up to 5 s until no proxy request is being served, no
// stream runs detached, and the audit writer has delivered every entry. A
// client can see its response end before the handler records the exchange,
// so the queue alone is not enough.
func (s *Stack) WaitAudit(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for (s.active.Load() > 0 || s.Handler.DetachedStreams() > 0 || s.Audit.Pending() > 0) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
}

// EventsOf returns the request events of mailbox m.
func EventsOf(events []map[string]any, m string) []map[string]any {
	var out []map[string]any
	for _, e := range events {
		if e["mailbox"] == m && (e["kind"] == "byok" || e["kind"] == "metered") {
			out = append(out, e)
		}
	}
	return out
}

// Do sends a request to the proxy.
func (s *Stack) Do(t testing.TB, method, path, token string, body string, header ...string) (*http.Response, []byte) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, s.ProxyURL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp, data
}

// SyncBuffer is a bytes.Buffer safe for concurrent writers.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
