package proxy_test

import (
	"bufio"
	"bytes"
	"compress/flate"
	"compress/zlib"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/tidwall/gjson"

	"github.com/byokproxy/byokproxy/audit"
	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/internal/upstreamtest"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/metrics"
	"github.com/byokproxy/byokproxy/provider"
	"github.com/byokproxy/byokproxy/proxy"
)

// hangLimit is how long a request may take before a test calls it hung.
// Requests in these tests fail in well under a second; the margin is for
// slow CI machines under the race detector.
const hangLimit = 10 * time.Second

// unavailableShape checks a 503 in the provider's shape.
func unavailableShape(p string, body []byte) bool {
	return inShape(p, body, "api_error", "service_unavailable", "UNAVAILABLE")
}

// timedDo sends a request to the proxy and fails the test if it takes longer
// than hangLimit.
func timedDo(t *testing.T, st *teststack.Stack, p, token string, c call) (int, []byte, time.Duration) {
	t.Helper()
	start := time.Now()
	done := make(chan struct{})
	var status int
	var body []byte
	go func() {
		defer close(done)
		resp, data := doRequest(t, st.ProxyURL, p, token, c)
		status, body = resp, data
	}()
	select {
	case <-done:
	case <-time.After(hangLimit):
		t.Fatalf("%s %s: no response within %v", p, c.path, hangLimit)
	}
	return status, body, time.Since(start)
}

// doRequest sends c with token to the proxy at baseURL. It reports a
// transport error as status 0.
func doRequest(t *testing.T, baseURL, p, token string, c call) (int, []byte) {
	ctx, cancel := context.WithTimeout(context.Background(), hangLimit)
	defer cancel()
	resp, err := http.DefaultClient.Do(callRequest(ctx, baseURL, p, token, c))
	if err != nil {
		return 0, []byte(err.Error())
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, data
}

// callRequest returns the POST of c for provider p to the proxy at baseURL
// with token, as the provider's SDK sends it.
func callRequest(ctx context.Context, baseURL, p, token string, c call) *http.Request {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, baseURL+c.path, strings.NewReader(c.body))
	if err != nil {
		panic(err) // c.path comes from the test tables
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	h := sdkHeaders(p)
	for i := 0; i+1 < len(h); i += 2 {
		req.Header.Set(h[i], h[i+1])
	}
	return req
}

// openHeldStream starts stream c of provider p and returns its response
// once the upstream holds the stream after its first event.
func openHeldStream(t *testing.T, st *teststack.Stack, p, token string, c call) *http.Response {
	t.Helper()
	up := st.Upstreams[p]
	up.Reset()
	up.Hold()
	t.Cleanup(up.Release)
	ctx, cancel := context.WithTimeout(context.Background(), hangLimit)
	t.Cleanup(cancel)
	resp, err := http.DefaultClient.Do(callRequest(ctx, st.ProxyURL, p, token, c))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if !eventually(hangLimit, func() bool { return up.HeldStreams() == 1 }) {
		t.Fatal("the upstream never held the stream")
	}
	return resp
}

func readyStatus(t *testing.T, baseURL string) int {
	t.Helper()
	client := &http.Client{Timeout: hangLimit}
	resp, err := client.Get(baseURL + "/readyz")
	if err != nil {
		t.Fatalf("GET /readyz: %v", err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// eventually polls check every 50 ms for up to d.
func eventually(d time.Duration, check func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if check() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// assertNoKeyMaterial fails if the log or the audit events carry any
// provider key, or the first twelve characters of one.
func assertNoKeyMaterial(t *testing.T, st *teststack.Stack) {
	t.Helper()
	events, err := json.Marshal(st.AuditEvents(t))
	if err != nil {
		t.Fatal(err)
	}
	places := map[string]string{"log": st.Logs(), "audit events": string(events)}
	for where, text := range places {
		for _, keys := range []map[string]string{teststack.SharedKeys, teststack.BYOKKeys} {
			for p, key := range keys {
				if strings.Contains(text, key[:12]) || strings.Contains(text, url.QueryEscape(key)) {
					t.Errorf("the %s carries the %s key", where, p)
				}
			}
		}
	}
}

func TestRedisDownFailsFastAndRecovers(t *testing.T) {
	srv := redistest.StartOwn(t)
	st := teststack.StartOn(t, srv, srv.Prefix(t))
	m := "redis-down@example.com"
	token := st.Token(t, m)
	probe := st.Token(t, "redis-down-probe@example.com")
	for _, tok := range []string{token, probe} {
		for _, p := range provider.Names {
			if status, body, _ := timedDo(t, st, p, tok, nonStream[p]); status != http.StatusOK {
				t.Fatalf("%s before the outage: status %d: %s", p, status, body)
			}
		}
	}
	st.WaitAudit(t)

	// Both mailboxes' records are now cached. The replica drops every
	// cached record when its change subscription breaks, a moment after the
	// server dies. The probe mailbox shows when that has happened, which
	// must be within the cache's bound of one second.
	srv.Stop()
	outage := time.Now()
	if !eventually(keystore.MaxCacheTTL, func() bool {
		status, _, _ := timedDo(t, st, provider.OpenAI, probe, nonStream[provider.OpenAI])
		return status == http.StatusServiceUnavailable
	}) {
		t.Fatalf("requests still served %v after Redis stopped", keystore.MaxCacheTTL)
	}
	t.Logf("first 503 %v after Redis stopped", time.Since(outage))
	for _, p := range provider.Names {
		before := testutil.ToFloat64(st.Metrics.KeyErrors.WithLabelValues(p, metrics.ReasonStoreUnavailable))
		resetUpstreams(st)
		status, body, took := timedDo(t, st, p, token, nonStream[p])
		if status != http.StatusServiceUnavailable {
			t.Errorf("%s during the outage: status %d, want 503: %s", p, status, body)
		}
		if !unavailableShape(p, body) {
			t.Errorf("%s: 503 not in the provider's shape: %s", p, body)
		}
		if n := upstreamRequests(st); n != 0 {
			t.Errorf("%s: upstreams received %d requests while the key source was unknown", p, n)
		}
		after := testutil.ToFloat64(st.Metrics.KeyErrors.WithLabelValues(p, metrics.ReasonStoreUnavailable))
		if after != before+1 {
			t.Errorf("%s: key_errors_total{reason=store_unavailable} went from %v to %v, want +1", p, before, after)
		}
		t.Logf("%s: 503 after %v", p, took)
	}
	if code := readyStatus(t, st.ProxyURL); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz during the outage: %d, want 503", code)
	}

	// The server comes back empty: it keeps no data across restarts. The
	// token's generation 0 is what an empty store reports.
	srv.Restart()
	if !eventually(hangLimit, func() bool { return readyStatus(t, st.ProxyURL) == http.StatusOK }) {
		t.Fatalf("/readyz not 200 within %v of Redis returning", hangLimit)
	}
	for _, p := range provider.Names {
		if status, body, _ := timedDo(t, st, p, token, nonStream[p]); status != http.StatusOK {
			t.Errorf("%s after Redis returned: status %d: %s", p, status, body)
		}
	}

	// The 503s of the outage were queued and are delivered now.
	var rejected int
	for _, e := range teststack.EventsOf(st.AuditEvents(t), m) {
		if e["status"] == float64(http.StatusServiceUnavailable) {
			rejected++
		}
	}
	if rejected != len(provider.Names) {
		t.Errorf("audit events of 503s from the outage: %d, want %d", rejected, len(provider.Names))
	}
	assertNoKeyMaterial(t, st)
}

func TestStreamInFlightSurvivesRedisOutage(t *testing.T) {
	srv := redistest.StartOwn(t)
	st := teststack.StartOn(t, srv, srv.Prefix(t))
	m := "outage-stream@example.com"
	token := useBYOKEverywhere(t, st, m)
	p := provider.Anthropic
	up := st.Upstreams[p]
	resp := openHeldStream(t, st, p, token, streaming[p])

	srv.Stop()
	up.Release()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("stream in flight broke during the outage: %v", err)
	}
	if !strings.Contains(string(body), "message_stop") {
		t.Errorf("stream in flight did not finish:\n%s", body)
	}

	srv.Restart()
	want := up.Requests()[0].Usage
	var found bool
	for _, e := range teststack.EventsOf(st.AuditEvents(t), m) {
		if e["stream"] != true {
			continue
		}
		found = true
		if int(e["input_tokens"].(float64)) != want.InputTokens || int(e["output_tokens"].(float64)) != want.OutputTokens {
			t.Errorf("audit tokens %v/%v, want %d/%d", e["input_tokens"], e["output_tokens"], want.InputTokens, want.OutputTokens)
		}
		if e["key_last4"] != teststack.BYOKKeys[p][len(teststack.BYOKKeys[p])-4:] {
			t.Errorf("key_last4 = %v", e["key_last4"])
		}
	}
	if !found {
		t.Error("the audit event of the stream was not delivered after Redis returned")
	}
	assertNoKeyMaterial(t, st)
}

// stallingProxy forwards TCP connections to a Redis server and can stop
// forwarding what clients send, so Redis appears to hang.
type stallingProxy struct {
	ln      net.Listener
	target  string
	stalled atomic.Bool
	wg      sync.WaitGroup
	mu      sync.Mutex
	conns   []net.Conn
}

func newStallingProxy(t *testing.T, target string) *stallingProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sp := &stallingProxy{ln: ln, target: target}
	sp.wg.Add(1)
	go sp.accept()
	t.Cleanup(sp.close)
	return sp
}

func (sp *stallingProxy) URL() string { return "redis://" + sp.ln.Addr().String() }

func (sp *stallingProxy) accept() {
	defer sp.wg.Done()
	for {
		client, err := sp.ln.Accept()
		if err != nil {
			return
		}
		server, err := net.Dial("tcp", sp.target)
		if err != nil {
			client.Close()
			continue
		}
		sp.mu.Lock()
		sp.conns = append(sp.conns, client, server)
		sp.mu.Unlock()
		sp.wg.Add(2)
		go sp.pipe(server, client, true)
		go sp.pipe(client, server, false)
	}
}

// pipe copies src to dst. Commands (client to server) wait while the proxy
// is stalled, for at most a minute.
func (sp *stallingProxy) pipe(dst, src net.Conn, commands bool) {
	defer sp.wg.Done()
	defer dst.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			for i := 0; commands && sp.stalled.Load() && i < 1200; i++ {
				time.Sleep(50 * time.Millisecond)
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (sp *stallingProxy) close() {
	sp.stalled.Store(false)
	sp.ln.Close()
	sp.mu.Lock()
	for _, c := range sp.conns {
		c.Close()
	}
	sp.mu.Unlock()
	sp.wg.Wait()
}

// configuredStack is the proxy wired the way cmd/byokproxy wires it, with
// the Redis client from keystore.OpenRedis, so redis.timeout applies.
type configuredStack struct {
	url      string
	signer   *mailbox.Signer
	metrics  *metrics.Metrics
	upstream map[string]string
}

func startConfiguredStack(t *testing.T, redisURL, prefix string, timeout time.Duration) *configuredStack {
	t.Helper()
	cfg := config.Defaults()
	cfg.Redis.URL = redisURL
	cfg.Redis.Timeout = timeout
	cfg.Auth.TokenSecrets = []string{"token-secret-for-tests-0123456789"}
	s := &configuredStack{upstream: map[string]string{}}

	for _, p := range provider.Names {
		up := newEmulator(t, p)
		cfg.Provider(p).Upstream = up
		cfg.Provider(p).SharedKey = teststack.SharedKeys[p]
		s.upstream[p] = up
	}
	rdb, err := keystore.OpenRedis(cfg.Redis)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })

	ids, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	store := keystore.New(rdb, prefix, ids)
	reg := prometheus.NewRegistry()
	s.metrics = metrics.New(reg)
	s.signer, err = mailbox.NewSigner(cfg.Auth.TokenSecrets)
	if err != nil {
		t.Fatal(err)
	}

	writer := audit.NewWriter(rdb, store.Layout(), audit.Options{Dropped: s.metrics.AuditDropped})
	ctx, cancel := context.WithCancel(context.Background())
	go writer.Run(ctx)
	t.Cleanup(cancel)
	h, err := proxy.New(proxy.Options{Config: cfg, Store: store, Signer: s.signer, Audit: writer, Metrics: s.metrics, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	s.url = srv.URL
	return s
}

func TestRedisStallBoundedByTimeout(t *testing.T) {
	rs := redistest.StartOwn(t)
	sp := newStallingProxy(t, strings.TrimPrefix(rs.URL, "redis://"))
	const timeout = 500 * time.Millisecond
	st := startConfiguredStack(t, sp.URL(), rs.Prefix(t), timeout)
	token := st.signer.Issue("stall@example.com", 0)
	p := provider.OpenAI
	c := nonStream[p]

	if status, body := doRequest(t, st.url, p, token, c); status != http.StatusOK {
		t.Fatalf("before the stall: status %d: %s", status, body)
	}

	sp.stalled.Store(true)
	start := time.Now()
	status, body := doRequest(t, st.url, p, token, c)
	took := time.Since(start)
	if status != http.StatusServiceUnavailable || !unavailableShape(p, body) {
		t.Errorf("during the stall: status %d, want 503 in OpenAI's shape: %s", status, body)
	}
	// Each Redis call of the admission is bounded by one timeout, with no
	// retry after it. With go-redis's own defaults (3 s per read, three
	// retries) it would be over 10 s.
	if limit := 2 * timeout; took > limit {
		t.Errorf("a stalled Redis held the request for %v with redis.timeout %v; want under %v", took, timeout, limit)
	}
	t.Logf("503 after %v with redis.timeout %v", took, timeout)
	if got := testutil.ToFloat64(st.metrics.KeyErrors.WithLabelValues(p, metrics.ReasonStoreUnavailable)); got != 1 {
		t.Errorf("key_errors_total{reason=store_unavailable} = %v, want 1", got)
	}
	start = time.Now()
	if code := readyStatus(t, st.url); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz during the stall: %d, want 503", code)
	}
	t.Logf("/readyz answered after %v", time.Since(start))

	sp.stalled.Store(false)
	if !eventually(hangLimit, func() bool {
		status, _ := doRequest(t, st.url, p, token, c)
		return status == http.StatusOK
	}) {
		t.Errorf("requests still fail %v after the stall ended", hangLimit)
	}

	// With Redis gone, a refused connection fails at once, so only the
	// client's retries remain.
	rs.Stop()
	start = time.Now()
	status, body = doRequest(t, st.url, p, token, c)
	took = time.Since(start)
	if status != http.StatusServiceUnavailable || !unavailableShape(p, body) {
		t.Errorf("with Redis down: status %d, want 503 in OpenAI's shape: %s", status, body)
	}
	if took > hangLimit {
		t.Errorf("with Redis down the request took %v", took)
	}
	t.Logf("503 after %v with Redis down and redis.timeout %v", took, timeout)
}

// newEmulator starts an emulator of p that accepts the test keys.
func newEmulator(t *testing.T, p string) string {
	t.Helper()
	up := upstreamtest.New(p, false, teststack.SharedKeys[p], teststack.BYOKKeys[p])
	t.Cleanup(up.Close)
	return up.URL
}

func TestUpstreamRefused(t *testing.T) {
	closed := fmt.Sprintf("http://127.0.0.1:%d", redistest.FreePort(t))
	st := teststack.Start(t, func(c *config.Config) {
		for _, p := range provider.Names {
			c.Provider(p).Upstream = closed
		}
	})
	m := "refused@example.com"
	token := useBYOKEverywhere(t, st, m)
	for _, p := range provider.Names {
		status, body, _ := timedDo(t, st, p, token, streaming[p])
		if status != http.StatusBadGateway {
			t.Errorf("%s: status %d, want 502: %s", p, status, body)
		}
		if !inShape(p, body, "api_error", "bad_gateway", "UNAVAILABLE") {
			t.Errorf("%s: 502 not in the provider's shape: %s", p, body)
		}
	}
	events := teststack.EventsOf(st.AuditEvents(t), m)
	if len(events) != len(provider.Names) {
		t.Fatalf("audit events: %d, want %d", len(events), len(provider.Names))
	}
	for _, e := range events {
		if e["status"] != float64(http.StatusBadGateway) || e["error"] != "upstream unreachable" {
			t.Errorf("%s: audit status %v error %q, want 502 and \"upstream unreachable\"", e["provider"], e["status"], e["error"])
		}
	}
	assertNoKeyMaterial(t, st)
}

// TestRefusedUpstreamKeepsClientConnection sends two requests whose bodies
// the proxy forwards unread, over one client connection, to an upstream that
// refuses connections. The second must reuse the connection: with full duplex
// on, a body left unread when the handler returns makes Go's HTTP/1 server
// panic and close the connection (golang/go#68560).
func TestRefusedUpstreamKeepsClientConnection(t *testing.T) {
	closed := fmt.Sprintf("http://127.0.0.1:%d", redistest.FreePort(t))
	st := teststack.Start(t, func(c *config.Config) {
		c.Provider(provider.Google).Upstream = closed
	})
	token := useBYOKEverywhere(t, st, "refused-keepalive@example.com")

	var dials atomic.Int32
	transport := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			dials.Add(1)
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		},
	}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport, Timeout: hangLimit}
	c := streaming[provider.Google]
	for i := range 2 {
		req, err := http.NewRequest(http.MethodPost, st.ProxyURL+c.path, strings.NewReader(c.body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("x-goog-api-key", token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("request %d: %v", i+1, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadGateway {
			t.Errorf("request %d: status %d, want 502", i+1, resp.StatusCode)
		}
	}
	if n := dials.Load(); n != 1 {
		t.Errorf("the client dialled %d connections for two requests, want 1: the proxy closed the first", n)
	}
}

// terminalEvents are what a complete stream of each provider ends with.
var terminalEvents = map[string]string{
	provider.OpenAI:    "[DONE]",
	provider.Anthropic: "message_stop",
	provider.Google:    `"finishReason"`,
}

// streamPaths returns the stack's proxy, which detaches every stream it
// can, and a proxy with the default settings, which keeps a test's few
// streams attached to the HTTP server.
func streamPaths(t *testing.T, st *teststack.Stack) map[string]string {
	_, attached := st.AttachedProxy(t)
	return map[string]string{"detached": st.ProxyURL, "attached": attached}
}

func TestUpstreamResetMidStream(t *testing.T) {
	st := teststack.Start(t)
	for path, proxyURL := range streamPaths(t, st) {
		for _, source := range []string{"shared", "byok"} {
			for _, p := range provider.Names {
				t.Run(path+"/"+source+"/"+p, func(t *testing.T) {
					testUpstreamReset(t, st, proxyURL, "reset-"+path+"-"+source+"-"+p+"@example.com", source, p)
				})
			}
		}
	}
	assertNoKeyMaterial(t, st)
}

// testUpstreamReset has the upstream cut a stream of mailbox m in the middle
// and checks what the client and the audit event show.
func testUpstreamReset(t *testing.T, st *teststack.Stack, proxyURL, m, source, p string) {
	if source == "byok" {
		st.UseBYOK(t, m, p)
	}
	token := st.Token(t, m)
	up := st.Upstreams[p]
	up.Reset()
	up.SetFailMidStream(true)
	defer up.SetFailMidStream(false)

	ctx, cancel := context.WithTimeout(context.Background(), hangLimit)
	defer cancel()
	resp, err := http.DefaultClient.Do(callRequest(ctx, proxyURL, p, token, streaming[p]))
	if err != nil {
		t.Fatal(err)
	}
	body, readErr := io.ReadAll(resp.Body)
	resp.Body.Close()
	if readErr == nil {
		t.Error("the client read a cut stream as complete; want an error at the cut")
	}
	if strings.Contains(string(body), terminalEvents[p]) {
		t.Errorf("the cut stream carries a terminal event:\n%s", body)
	}
	if len(body) == 0 {
		t.Error("the client received nothing before the cut")
	}

	events := teststack.EventsOf(st.AuditEvents(t), m)
	if len(events) != 1 {
		t.Fatalf("audit events: %d, want 1", len(events))
	}
	e := events[0]
	if e["error"] == "" || e["error"] == nil {
		t.Error("audit event of a cut stream has no error")
	}
	// Anthropic's message_start and Gemini's first chunk report
	// input tokens before the cut; OpenAI reports usage only at
	// the end of a stream.
	want := up.Requests()[0].Usage
	if p != provider.OpenAI {
		if int(e["input_tokens"].(float64)) != want.InputTokens {
			t.Errorf("audit input_tokens %v, want the %d seen before the cut", e["input_tokens"], want.InputTokens)
		}
		out := int(e["output_tokens"].(float64))
		if source == "byok" && (out < 1 || out >= want.OutputTokens) {
			t.Errorf("audit output_tokens %d, want the partial count seen before the cut (full reply %d)", out, want.OutputTokens)
		}
	}
	// The stream ended before the provider's final usage, so the shared
	// key charges the output estimated from the bytes received.
	estimated := strings.Contains(fmt.Sprint(e["error"]), "usage estimated from bytes")
	if source == "shared" && !estimated {
		t.Errorf("audit error %q does not say the usage was estimated", e["error"])
	}
	if source == "byok" && estimated {
		t.Errorf("audit error %q: byok usage is never estimated", e["error"])
	}
	if out := int(e["output_tokens"].(float64)); source == "shared" && out < int(estimateOf(body)) {
		t.Errorf("shared audit output_tokens %d, want at least the estimate of the %d bytes received", out, len(body))
	}
}

// estimateOf returns the estimate the proxy charges for a response body: one
// token per four bytes.
func estimateOf(body []byte) int64 { return int64(len(body)+3) / 4 }

// stallingUpstream accepts requests and sends nothing until the request is
// cancelled or a minute passes. It counts the requests whose context ended.
type stallingUpstream struct {
	*httptest.Server
	started   chan struct{}
	cancelled atomic.Int32
}

func newStallingUpstream(t *testing.T) *stallingUpstream {
	s := &stallingUpstream{started: make(chan struct{}, 16)}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// The server notices a closed connection only once the body is
		// read.
		io.Copy(io.Discard, r.Body)
		s.started <- struct{}{}
		select {
		case <-r.Context().Done():
			s.cancelled.Add(1)
		case <-time.After(time.Minute):
		}
	}))
	t.Cleanup(func() {
		s.CloseClientConnections()
		s.Close()
	})
	return s
}

// TestHalfClosedClientGetsNoResponse has a client send a request and then
// shut its sending side down before the upstream responds. The server takes
// that for a client that left. The proxy must then close the connection
// without a response, not send 200 with an empty body.
func TestHalfClosedClientGetsNoResponse(t *testing.T) {
	up := newStallingUpstream(t)
	st := teststack.Start(t, func(c *config.Config) { c.Provider(provider.OpenAI).Upstream = up.URL })
	for i, c := range []call{nonStream[provider.OpenAI], streaming[provider.OpenAI]} {
		m := fmt.Sprintf("half-closed-%d@example.com", i)
		token := st.Token(t, m)
		conn := dialProxy(t, st)
		conn.write(t, provider.OpenAI, c, token, "")
		select {
		case <-up.started:
		case <-time.After(hangLimit):
			t.Fatalf("request %d never reached the upstream", i)
		}
		if err := conn.Conn.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}

		got, err := io.ReadAll(conn.br)
		if err != nil {
			t.Fatalf("request %d: reading the connection: %v", i, err)
		}
		if len(got) > 0 {
			t.Errorf("request %d: the proxy sent a response to a client that had left: %q", i, got)
		}
		if !eventually(hangLimit, func() bool { return up.cancelled.Load() == int32(i+1) }) {
			t.Errorf("request %d: the upstream request was not cancelled", i)
		}
		events := teststack.EventsOf(st.AuditEvents(t), m)
		if len(events) != 1 {
			t.Fatalf("request %d: %d audit events, want 1", i, len(events))
		}
		if events[0]["status"] != float64(499) {
			t.Errorf("request %d: audit status %v, want 499", i, events[0]["status"])
		}
		if errText, _ := events[0]["error"].(string); !strings.HasPrefix(errText, "client disconnected") {
			t.Errorf("request %d: audit error %q, want it to begin with \"client disconnected\"", i, errText)
		}
	}
}

func TestUpstreamStallsBeforeHeaders(t *testing.T) {
	up := newStallingUpstream(t)
	st := teststack.Start(t, func(c *config.Config) {
		c.Upstream.Timeout = 300 * time.Millisecond
		for _, p := range provider.Names {
			c.Provider(p).Upstream = up.URL
		}
	})
	m := "stall-headers@example.com"
	token := useBYOKEverywhere(t, st, m)
	for _, p := range provider.Names {
		status, body, _ := timedDo(t, st, p, token, nonStream[p])
		if status != http.StatusGatewayTimeout {
			t.Errorf("%s: status %d, want 504: %s", p, status, body)
		}
		if !inShape(p, body, "api_error", "gateway_timeout", "DEADLINE_EXCEEDED") {
			t.Errorf("%s: 504 not in the provider's shape: %s", p, body)
		}
	}
	if !eventually(hangLimit, func() bool { return up.cancelled.Load() == int32(len(provider.Names)) }) {
		t.Errorf("upstream requests cancelled: %d, want %d", up.cancelled.Load(), len(provider.Names))
	}
	for _, e := range teststack.EventsOf(st.AuditEvents(t), m) {
		if e["status"] != float64(http.StatusGatewayTimeout) || e["error"] != "upstream timed out" {
			t.Errorf("%s: audit status %v error %q, want 504 and \"upstream timed out\"", e["provider"], e["status"], e["error"])
		}
	}
	assertNoKeyMaterial(t, st)
}

func TestClientDisconnectCancelsUpstream(t *testing.T) {
	t.Run("while the upstream holds a stream", func(t *testing.T) {
		st := teststack.Start(t)
		for path, proxyURL := range streamPaths(t, st) {
			for _, p := range provider.Names {
				testClientLeavesStream(t, st, proxyURL, "gone-stream-"+path+"-"+p+"@example.com", p)
			}
		}
		assertNoKeyMaterial(t, st)
	})

	t.Run("before the upstream sends headers", func(t *testing.T) {
		up := newStallingUpstream(t)
		st := teststack.Start(t, func(c *config.Config) { c.Provider(provider.OpenAI).Upstream = up.URL })
		m := "gone-early@example.com"
		token := st.Token(t, m)
		c := nonStream[provider.OpenAI]
		ctx, cancel := context.WithCancel(context.Background())
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, st.ProxyURL+c.path, strings.NewReader(c.body))
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")

		errs := make(chan error, 1)
		go func() {
			resp, err := http.DefaultClient.Do(req)
			if err == nil {
				resp.Body.Close()
			}
			errs <- err
		}()
		select {
		case <-up.started:
		case <-time.After(hangLimit):
			cancel()
			t.Fatal("the request never reached the upstream")
		}
		cancel()
		<-errs

		if !eventually(hangLimit, func() bool { return up.cancelled.Load() == 1 }) {
			t.Error("the upstream request was not cancelled after the client left")
		}
		events := teststack.EventsOf(st.AuditEvents(t), m)
		if len(events) != 1 {
			t.Fatalf("audit events %d, want 1", len(events))
		}
		// The upstream had the whole request, so the shared key is charged
		// its input, estimated from the request bytes.
		if want := "client disconnected; input usage estimated from the request's bytes"; events[0]["error"] != want {
			t.Errorf("audit error %q, want %q", events[0]["error"], want)
		}
		requests, input, output := sharedUsage(t, st, m, provider.OpenAI)
		if want := int64(len(c.body)+3) / 4; requests != 1 || input != want || output != 0 {
			t.Errorf("charged %d requests, %d/%d tokens, want 1 and %d/0", requests, input, output, want)
		}
		assertNoKeyMaterial(t, st)
	})
}

// testClientLeavesStream has the client of mailbox m leave a stream that the
// upstream holds, after its first event, and checks that the upstream
// request ends and the audit event records the disconnect.
func testClientLeavesStream(t *testing.T, st *teststack.Stack, proxyURL, m, p string) {
	t.Helper()
	token := useBYOKEverywhere(t, st, m)
	up := st.Upstreams[p]
	up.Reset()
	up.Hold()

	ctx, cancel := context.WithCancel(context.Background())
	resp, err := http.DefaultClient.Do(callRequest(ctx, proxyURL, p, token, streaming[p]))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	// Read the first event, so the stream is under way, then go.
	first := make(chan error, 1)
	go func() {
		_, err := bufio.NewReader(resp.Body).ReadString('\n')
		first <- err
	}()
	select {
	case err := <-first:
		if err != nil {
			t.Fatalf("%s: first event: %v", p, err)
		}
	case <-time.After(hangLimit):
		t.Fatalf("%s: no first event", p)
	}
	cancel()
	resp.Body.Close()

	// The emulator holds a stream for 30 s unless its request is
	// cancelled.
	if !eventually(hangLimit, func() bool { return up.HeldStreams() == 0 }) {
		t.Errorf("%s: the upstream stream is still held %v after the client left", p, hangLimit)
	}
	up.Release()

	events := teststack.EventsOf(st.AuditEvents(t), m)
	if len(events) != 1 {
		t.Fatalf("%s: audit events %d, want 1", p, len(events))
	}
	if events[0]["error"] != "client disconnected" {
		t.Errorf("%s: audit error %q, want \"client disconnected\"", p, events[0]["error"])
	}
}

// send does req with client and returns the response with its whole body.
func send(t *testing.T, client *http.Client, req *http.Request) (*http.Response, []byte) {
	t.Helper()
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, body
}

// scriptedStack starts a stack whose every provider upstream is one scripted
// upstream, and returns it with the token of mailbox m, which uses its own
// key everywhere.
func scriptedStack(t *testing.T, m string) (*scriptedUpstream, *teststack.Stack, string) {
	t.Helper()
	up := newScriptedUpstream(t)
	st := teststack.Start(t, func(c *config.Config) {
		for _, p := range provider.Names {
			c.Provider(p).Upstream = up.URL
		}
	})
	return up, st, useBYOKEverywhere(t, st, m)
}

// TestCutGzipErrorBodyScrubbed makes the upstream respond 401 with a gzip
// body that echoes the key and breaks off before the gzip trailer, as when
// the connection drops while the error is sent. The client must not be able
// to read the key from what it gets, with or without decompressing it.
func TestCutGzipErrorBodyScrubbed(t *testing.T) {
	up, st, token := scriptedStack(t, "gzip-error@example.com")
	client := &http.Client{Transport: &http.Transport{DisableCompression: true}}
	defer client.CloseIdleConnections()
	for _, p := range provider.Names {
		key := teststack.BYOKKeys[p]
		full := gzipOf(t, []byte(`{"error":{"message":"Incorrect API key provided: `+key+`. You can find your API key in your account settings."}}`))
		for _, cut := range []int{0, 4, 8} {
			up.set(scriptedResponse{status: http.StatusUnauthorized, contentType: "application/json", encoding: "gzip", body: full[:len(full)-cut]})
			req := callRequest(context.Background(), st.ProxyURL, p, token, nonStream[p])
			req.Header.Set("Accept-Encoding", "gzip")
			resp, body := send(t, client, req)
			if resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("%s cut %d: status %d, want the upstream's 401", p, cut, resp.StatusCode)
			}
			for _, text := range readableForms(body) {
				if strings.Contains(string(text), key) {
					t.Errorf("%s: gzip error body cut by %d bytes shows the client the key (Content-Encoding %q)", p, cut, resp.Header.Get("Content-Encoding"))
				}
			}
		}
	}
}

// TestCutErrorBodyHidesKeyPrefix makes the upstream's error body break off
// in the middle of the echoed key. The part of the key before the cut does
// not match the whole key, and must not reach the client either.
func TestCutErrorBodyHidesKeyPrefix(t *testing.T) {
	var echo atomic.Value
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		body := echo.Load().(string)
		conn, buf, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		fmt.Fprintf(buf, "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body)+100, body)
		buf.Flush()
	}))
	t.Cleanup(up.Close)
	st := teststack.Start(t, func(c *config.Config) {
		for _, p := range provider.Names {
			c.Provider(p).Upstream = up.URL
		}
	})
	token := useBYOKEverywhere(t, st, "cut-error@example.com")
	for _, p := range provider.Names {
		key := teststack.BYOKKeys[p]
		half := key[:len(key)/2]
		echo.Store(`{"error":{"message":"Incorrect API key provided: ` + half)
		status, body, _ := timedDo(t, st, p, token, nonStream[p])
		if status != http.StatusUnauthorized {
			t.Errorf("%s: status %d, want the upstream's 401", p, status)
		}
		if strings.Contains(string(body), half[:len(half)-2]) {
			t.Errorf("%s: error body cut inside the key shows its first %d characters: %s", p, len(half), body)
		}
	}
}

func TestStalledStreamCut(t *testing.T) {
	st := teststack.Start(t, func(c *config.Config) { c.Upstream.Timeout = 300 * time.Millisecond })
	m := "stalled@example.com"
	token := st.Token(t, m)
	up := st.Upstreams[provider.OpenAI]
	up.SetEventDelay(3 * time.Second)

	start := time.Now()
	req, _ := http.NewRequest("POST", st.ProxyURL+"/openai/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err == nil && strings.Contains(string(body), "[DONE]") {
		t.Fatalf("stalled stream completed: %s", body)
	}
	if d := time.Since(start); d > 2500*time.Millisecond {
		t.Errorf("stalled stream held the client for %v with upstream.timeout 300ms", d)
	}
	events := teststack.EventsOf(st.AuditEvents(t), m)
	if len(events) != 1 || !strings.Contains(events[0]["error"].(string), "stalled") {
		t.Errorf("audit events = %v, want one whose error says the upstream stalled", events)
	}
}

// TestCreatedIDsStoredAfterRedisOutage checks that a container created on
// the shared key while Redis is down still becomes the mailbox's once Redis
// is back, through the audit writer's retries. The container shows up in the
// stream's message_delta, long after the upstream is held.
func TestCreatedIDsStoredAfterRedisOutage(t *testing.T) {
	srv := redistest.StartOwn(t)
	st := teststack.StartOn(t, srv, srv.Prefix(t))
	token := st.Token(t, "outage-owner@example.com")
	up := st.Upstreams[provider.Anthropic]
	tools := `"tools":[{"type":"code_execution_20250825","name":"code_execution"}]`
	resp := openHeldStream(t, st, provider.Anthropic, token, call{path: "/anthropic/v1/messages",
		body: `{"model":"claude-sonnet-4-5","max_tokens":8,"stream":true,"messages":[{"role":"user","content":"run"}],` + tools + `}`})

	srv.Stop()
	up.Release()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("stream broke during the outage: %v", err)
	}
	var id string
	for _, line := range strings.Split(string(body), "\n") {
		if data, ok := strings.CutPrefix(line, "data: "); ok && id == "" {
			id = gjson.Get(data, "delta.container.id").String()
		}
	}
	if id == "" {
		t.Fatalf("no container id in the stream:\n%s", body)
	}
	if !strings.Contains(st.Logs(), "storing created ids failed") {
		t.Error("the failed write of the container id was not logged")
	}

	srv.Restart()
	st.WaitAudit(t)
	reuse := `{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[{"role":"user","content":"again"}],` + tools + `,"container":"` + id + `"}`
	if resp, out := st.Do(t, "POST", "/anthropic/v1/messages", token, reuse, "Anthropic-Version", "2023-06-01"); resp.StatusCode != 200 {
		t.Errorf("naming a container created during the outage: status %d: %s", resp.StatusCode, out)
	}
}

// TestEncodedErrorBodyScrubbed makes the upstream respond 401 with a body
// that echoes the key in each Content-Encoding a client might decode. The
// proxy decodes and scrubs gzip and deflate, and drops a body in any other
// coding, so the client cannot read the key from it either way.
func TestEncodedErrorBodyScrubbed(t *testing.T) {
	up, st, token := scriptedStack(t, "encoded-error@example.com")
	client := &http.Client{Transport: &http.Transport{DisableCompression: true}}
	defer client.CloseIdleConnections()
	compress := func(w io.WriteCloser, buf *bytes.Buffer, data []byte) []byte {
		w.Write(data)
		w.Close()
		return buf.Bytes()
	}
	for _, p := range provider.Names {
		key := teststack.BYOKKeys[p]
		plain := []byte(`{"error":{"message":"Incorrect API key provided: ` + key + `."}}`)
		var zbuf, fbuf bytes.Buffer
		fw, _ := flate.NewWriter(&fbuf, flate.BestSpeed)
		cases := []struct {
			encoding string
			body     []byte
			dropped  bool
		}{
			{"deflate", compress(zlib.NewWriter(&zbuf), &zbuf, plain), false},
			{"deflate", compress(fw, &fbuf, plain), false},
			{"x-gzip", gzipOf(t, plain), false},
			{"GZIP", gzipOf(t, plain), false},
			{"gzip, identity", gzipOf(t, plain), true},
			{"br", plain, true},
		}
		for _, c := range cases {
			up.set(scriptedResponse{status: http.StatusUnauthorized, contentType: "application/json", encoding: c.encoding, body: c.body})
			req := callRequest(context.Background(), st.ProxyURL, p, token, nonStream[p])
			req.Header.Set("Accept-Encoding", "gzip, deflate, br")
			resp, body := send(t, client, req)
			if resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("%s %q: status %d, want the upstream's 401", p, c.encoding, resp.StatusCode)
			}
			if got := resp.Header.Get("Content-Encoding"); got != "" {
				t.Errorf("%s %q: Content-Encoding %q reached the client", p, c.encoding, got)
			}
			for _, text := range readableForms(body) {
				if strings.Contains(string(text), key) {
					t.Errorf("%s %q: the error body shows the client the key", p, c.encoding)
				}
			}
			if c.dropped && !strings.Contains(string(body), "cannot check for the key") {
				t.Errorf("%s %q: body not replaced: %s", p, c.encoding, body)
			}
			if !c.dropped && !strings.Contains(string(body), "Incorrect API key provided: [REDACTED]") {
				t.Errorf("%s %q: body not decoded and scrubbed: %s", p, c.encoding, body)
			}
		}
	}
}

// TestKeyInResponseHeadersScrubbed makes the upstream quote the key in
// response headers of an error, a redirect and a success.
func TestKeyInResponseHeadersScrubbed(t *testing.T) {
	up, st, token := scriptedStack(t, "header-echo@example.com")
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	defer client.CloseIdleConnections()
	for _, p := range provider.Names {
		key := teststack.BYOKKeys[p]
		masked := key[:6] + "*****" + key[len(key)-4:]
		withoutPrefix := key[strings.LastIndex(key[:min(len(key), 13)], "-")+1:]
		if strings.HasPrefix(key, "AIza") {
			withoutPrefix = key[4:]
		}
		cases := []struct {
			status int
			header http.Header
			body   string
		}{
			{http.StatusUnauthorized, http.Header{"Www-Authenticate": {`Bearer realm="api", error="invalid_token", token="` + key + `"`}}, `{"error":{"message":"bad key"}}`},
			{http.StatusUnauthorized, http.Header{"X-Key-Hint": {masked}}, `{"error":{"message":"bad key"}}`},
			{http.StatusTemporaryRedirect, http.Header{"Location": {"https://elsewhere.invalid/v1?k=" + url.QueryEscape("Bearer "+key)}}, "moved: " + key},
			{http.StatusOK, http.Header{"X-Debug": {"auth=" + key}}, `{"ok":true}`},
			{http.StatusOK, http.Header{"X-Debug": {"auth=" + withoutPrefix}}, `{"ok":true}`},
		}
		for _, c := range cases {
			up.set(scriptedResponse{status: c.status, contentType: "application/json", header: c.header, body: []byte(c.body)})
			resp, body := send(t, client, callRequest(context.Background(), st.ProxyURL, p, token, nonStream[p]))
			if resp.StatusCode != c.status {
				t.Errorf("%s %d: status %d", p, c.status, resp.StatusCode)
			}
			for name, values := range resp.Header {
				for _, v := range values {
					if strings.Contains(v, withoutPrefix) || strings.Contains(v, url.QueryEscape(key)) || strings.Contains(v, masked) {
						t.Errorf("%s %d: header %s shows the key: %q", p, c.status, name, v)
					}
				}
			}
			if strings.Contains(string(body), key) {
				t.Errorf("%s %d: body shows the key: %s", p, c.status, body)
			}
		}
	}
}

// longAnthropicStream serves an Anthropic message stream of deltas text
// deltas at once. Like the API, it reports one output token in
// message_start and the rest only in message_delta at the end.
func longAnthropicStream(t *testing.T, deltas int) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		bw := bufio.NewWriterSize(w, 64<<10)
		fmt.Fprint(bw, "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n")
		for i := range deltas {
			if _, err := fmt.Fprintf(bw, "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"part %06d of a long reply\"}}\n\n", i); err != nil {
				return
			}
		}
		fmt.Fprintf(bw, "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":%d}}\n\n", 8*deltas)
		fmt.Fprint(bw, "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
		bw.Flush()
	}))
	t.Cleanup(func() {
		srv.CloseClientConnections()
		srv.Close()
	})
	return srv
}

// TestSlowReaderNotCutAsStall checks that a client that stops reading a
// shared stream for longer than upstream.timeout does not make the proxy cut
// the upstream as stalled, which would leave the stream charged only the
// output that message_start reports.
func TestSlowReaderNotCutAsStall(t *testing.T) {
	const deltas = 100_000 // about 12 MB, far more than the socket buffers hold
	up := longAnthropicStream(t, deltas)
	st := teststack.Start(t, func(c *config.Config) {
		c.Upstream.Timeout = 300 * time.Millisecond
		c.Provider(provider.Anthropic).Upstream = up.URL
	})
	m := "slow-reader@example.com"
	conn, err := net.Dial("tcp", strings.TrimPrefix(st.ProxyURL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	body := `{"model":"claude-sonnet-4-5","max_tokens":64000,"stream":true,"messages":[{"role":"user","content":"a long story"}]}`
	fmt.Fprintf(conn, "POST /anthropic/v1/messages HTTP/1.1\r\nHost: proxy\r\nX-Api-Key: %s\r\nAnthropic-Version: 2023-06-01\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s",
		st.Token(t, m), len(body), body)

	time.Sleep(5 * 300 * time.Millisecond)
	conn.SetReadDeadline(time.Now().Add(hangLimit))
	got, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("reading the stream: %v after %d bytes, message_stop %v", err, len(got), bytes.Contains(got, []byte("message_stop")))
	}
	if !bytes.Contains(got, []byte("message_stop")) {
		t.Fatalf("the stream was cut after %d bytes while the client did not read", len(got))
	}
	events := teststack.EventsOf(st.AuditEvents(t), m)
	if len(events) != 1 || events[0]["error"] != "" {
		t.Errorf("audit events %v, want one without an error", events)
	}
	if _, _, output := sharedUsage(t, st, m, provider.Anthropic); output != 8*deltas {
		t.Errorf("charged %d output tokens, want the %d the provider reported", output, 8*deltas)
	}
}

// TestCutGzipStreamEstimateDecoded checks that a stream cut before its usage
// is charged on its decoded size, also when the proxy passes it on
// gzip-encoded.
func TestCutGzipStreamEstimateDecoded(t *testing.T) {
	st := teststack.Start(t)
	up := st.Upstreams[provider.OpenAI]
	up.SetFailMidStream(true)
	body := `{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}`
	charged := map[bool]int64{}
	for _, gz := range []bool{false, true} {
		up.SetGzip(gz)
		m := fmt.Sprintf("cut-gzip-%v@example.com", gz)
		var header []string
		if gz {
			header = []string{"Accept-Encoding", "gzip"}
		}
		resp, _ := st.Do(t, "POST", "/openai/v1/chat/completions", st.Token(t, m), body, header...)
		if gz && resp.Header.Get("Content-Encoding") != "gzip" {
			t.Fatalf("the stream was not passed on gzip-encoded, so this test checks nothing")
		}
		_, _, charged[gz] = sharedUsage(t, st, m, provider.OpenAI)
	}
	if charged[false] == 0 || charged[true] < charged[false] {
		t.Errorf("the same cut stream is charged %d output tokens gzip-encoded and %d plain", charged[true], charged[false])
	}
}

// TestErrorBodyStallBounded makes the upstream send an error status and
// headers, then nothing of the body it announced. The proxy reads an error
// body whole to scrub it, so upstream.timeout must bound that read.
func TestErrorBodyStallBounded(t *testing.T) {
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", "200")
		w.WriteHeader(http.StatusInternalServerError)
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(func() {
		close(release)
		up.CloseClientConnections()
		up.Close()
	})
	const timeout = 300 * time.Millisecond
	st := teststack.Start(t, func(c *config.Config) {
		c.Upstream.Timeout = timeout
		c.Provider(provider.OpenAI).Upstream = up.URL
	})
	status, body, took := timedDo(t, st, provider.OpenAI, st.Token(t, "error-stall@example.com"), nonStream[provider.OpenAI])
	if status != http.StatusInternalServerError {
		t.Errorf("status %d, want the upstream's 500: %s", status, body)
	}
	if took > 3*timeout {
		t.Errorf("a stalled error body held the request for %v with upstream.timeout %v", took, timeout)
	}
}

func TestReadyzFailsWhileRedisMayEvict(t *testing.T) {
	srv := redistest.StartOwn(t)
	st := teststack.StartOn(t, srv, srv.Prefix(t))
	if code := readyStatus(t, st.ProxyURL); code != http.StatusOK {
		t.Fatalf("/readyz with noeviction: %d, want 200", code)
	}

	rdb := srv.Client(t)
	ctx := context.Background()
	if err := rdb.ConfigSet(ctx, "maxmemory-policy", "allkeys-lru").Err(); err != nil {
		t.Fatal(err)
	}
	if err := rdb.ConfigSet(ctx, "maxmemory", "256mb").Err(); err != nil {
		t.Fatal(err)
	}

	resp, err := (&http.Client{Timeout: hangLimit}).Get(st.ProxyURL + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("/readyz with allkeys-lru: %d, want 503", resp.StatusCode)
	}
	if !strings.Contains(string(body), "noeviction") {
		t.Errorf("/readyz body %q does not say how to fix it", body)
	}

	if err := rdb.ConfigSet(ctx, "maxmemory-policy", "noeviction").Err(); err != nil {
		t.Fatal(err)
	}
	if code := readyStatus(t, st.ProxyURL); code != http.StatusOK {
		t.Errorf("/readyz after noeviction was set again: %d, want 200", code)
	}
}

// A client that shuts its sending side right after its request makes Go's
// server end the request's context, and with it the Redis calls of the
// admission. That is no outage of the key store, so it must not count as
// one, and the client gets no response it could take for one.
func TestClientLeavingBeforeStoreReadNotAnOutage(t *testing.T) {
	st := teststack.Start(t)
	p := provider.OpenAI
	m := "leaves-early@example.com"
	token := st.Token(t, m)
	before := testutil.ToFloat64(st.Metrics.KeyErrors.WithLabelValues(p, metrics.ReasonStoreUnavailable))
	for range 5 {
		conn, err := net.DialTimeout("tcp", strings.TrimPrefix(st.ProxyURL, "http://"), 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(hangLimit))
		c := nonStream[p]
		fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
			c.path, token, len(c.body), c.body)
		conn.(*net.TCPConn).CloseWrite()
		reply, _ := io.ReadAll(conn)
		conn.Close()
		if bytes.Contains(reply, []byte("key store is unavailable")) {
			t.Errorf("a client that left got a key store error: %q", reply)
		}
	}
	st.WaitAudit(t)
	for _, e := range teststack.EventsOf(st.AuditEvents(t), m) {
		if strings.Contains(fmt.Sprint(e["error"]), "key store") {
			t.Errorf("audit event %v records a client that left as a key store outage", e)
		}
	}
	if after := testutil.ToFloat64(st.Metrics.KeyErrors.WithLabelValues(p, metrics.ReasonStoreUnavailable)); after != before {
		t.Errorf("key_errors_total{reason=store_unavailable} went from %v to %v", before, after)
	}
}
