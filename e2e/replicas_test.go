package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"filippo.io/age"
	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/internal/upstreamtest"
)

// replica is one running byokproxy process and its addresses.
type replica struct {
	name       string
	proc       *proxyProcess
	proxyURL   string
	adminURL   string
	metricsURL string
}

// replicaSet is two byokproxy processes on one Redis, with the same identity
// file, token secret, admin token and key prefix, in front of shared
// emulated providers.
type replicaSet struct {
	replicas   [2]*replica
	rdb        redis.UniversalClient
	prefix     string
	adminToken string
	upstreams  map[string]*upstreamtest.Server
	sharedKeys map[string]string
}

// replicaTopology names the Redis a replica set runs on, as config keys.
type replicaTopology struct {
	redisConfig map[string]any
	rdb         redis.UniversalClient
	prefix      string
}

// startReplicaTopology starts a private single node or a three-master
// Cluster with a least-privilege ACL user for the proxies.
func startReplicaTopology(t *testing.T, name, passwordFile string) replicaTopology {
	t.Helper()
	const user = "byokproxy"
	password := randomString(t, 32)
	if err := os.WriteFile(passwordFile, []byte(password+"\n"), 0o600); err != nil {
		t.Fatalf("write the Redis password file: %v", err)
	}
	cfg := map[string]any{"username": user, "password_file": passwordFile}
	switch name {
	case "single":
		// A private server, because the ACL user changes the server.
		srv := redistest.StartOwn(t)
		prefix := srv.Prefix(t)
		redistest.AddProxyUser(t, []string{strings.TrimPrefix(srv.URL, "redis://")}, user, password, prefix)
		cfg["url"], cfg["prefix"] = srv.URL, prefix
		return replicaTopology{redisConfig: cfg, rdb: srv.Client(t), prefix: prefix}
	case "cluster":
		c := redistest.StartCluster(t)
		prefix := c.Prefix(t)
		redistest.AddProxyUser(t, c.Addrs, user, password, prefix)
		cfg["addrs"], cfg["prefix"] = c.Addrs, prefix
		return replicaTopology{redisConfig: cfg, rdb: c.Client(t), prefix: prefix}
	}
	t.Fatalf("unknown topology %q", name)
	return replicaTopology{}
}

// startReplicaSet starts two processes of the byokproxy binary bin on a new
// Redis of the named topology, with the keys of extra merged into the config
// of both.
func startReplicaSet(t *testing.T, bin, topology string, extra map[string]any) *replicaSet {
	t.Helper()
	dir := t.TempDir()
	topo := startReplicaTopology(t, topology, filepath.Join(dir, "redis-password"))
	set := &replicaSet{
		rdb: topo.rdb, prefix: topo.prefix, adminToken: randomString(t, 40),
		upstreams: map[string]*upstreamtest.Server{}, sharedKeys: map[string]string{},
	}
	for _, p := range providers {
		set.sharedKeys[p] = newKey(t, p)
		// Keys the tests store later are added with SetKeys.
		up := upstreamtest.New(p, false, set.sharedKeys[p])
		t.Cleanup(up.Close)
		set.upstreams[p] = up
	}

	identity, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatalf("generate age identity: %v", err)
	}
	identityFile := filepath.Join(dir, "identity.txt")
	if err := os.WriteFile(identityFile, []byte(identity.String()+"\n"), 0o600); err != nil {
		t.Fatalf("write identity file: %v", err)
	}
	tokenSecret := randomString(t, 48)

	for i, name := range []string{"A", "B"} {
		r := &replica{name: name}
		listen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
		adminListen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
		metricsListen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
		cfg := map[string]any{
			"listen":    listen,
			"log_level": "debug",
			"admin":     map[string]any{"listen": adminListen, "token": set.adminToken},
			"metrics":   map[string]any{"listen": metricsListen},
			"auth":      map[string]any{"token_secrets": []string{tokenSecret}},
			"keystore":  map[string]any{"identity_file": identityFile},
			"redis":     topo.redisConfig,
			"providers": providerConfig(set.upstreams, set.sharedKeys),
		}
		for k, v := range extra {
			cfg[k] = v
		}
		configFile := filepath.Join(dir, "replica-"+name+".yaml")
		writeConfig(t, configFile, cfg)
		r.proxyURL, r.adminURL, r.metricsURL = "http://"+listen, "http://"+adminListen, "http://"+metricsListen
		r.proc = startProxy(t, bin, configFile, filepath.Join(dir, "replica-"+name+".log"))
		waitReady(t, r.proc, r.proxyURL)
		set.replicas[i] = r
	}
	// This runs before the processes stop, because cleanups run in reverse.
	t.Cleanup(func() {
		for _, r := range set.replicas {
			if r == nil {
				continue
			}
			// NOPERM would mean the ACL user lacks a command the proxy needs.
			if out := r.proc.log.String(); strings.Contains(out, "NOPERM") {
				t.Errorf("replica %s logged a Redis NOPERM error", r.name)
			}
			if t.Failed() {
				t.Logf("output of replica %s:\n%s", r.name, r.proc.log.String())
			}
		}
	})
	return set
}

// do sends an HTTP request and returns the status and body.
func do(t *testing.T, method, url, bearer string, body any, header ...string) (int, []byte) {
	t.Helper()
	var rd io.Reader
	if s, ok := body.(string); ok {
		rd = strings.NewReader(s)
	} else if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(data)
	}

	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}

	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, url, err)
	}
	return resp.StatusCode, data
}

// admin calls the admin API of r and fails the test unless it returns want.
func (s *replicaSet) admin(t *testing.T, r *replica, method, path string, body any, want int) []byte {
	t.Helper()
	code, data := do(t, method, r.adminURL+"/admin/v1"+path, s.adminToken, body)
	if code != want {
		t.Fatalf("replica %s: %s %s: status %d, want %d: %s", r.name, method, path, code, want, data)
	}
	return data
}

// token issues or revokes the token of mailbox m through r.
func (s *replicaSet) token(t *testing.T, r *replica, m string, revoke bool) string {
	t.Helper()
	path := "/mailboxes/" + m + "/token"
	if revoke {
		path += "/revoke"
	}
	var out struct{ Token string }
	if err := json.Unmarshal(s.admin(t, r, "POST", path, nil, 200), &out); err != nil || out.Token == "" {
		t.Fatalf("replica %s: no token in the answer of POST %s: %v", r.name, path, err)
	}
	return out.Token
}

// replicaCalls are the smallest model requests per provider.
var replicaCalls = map[string]struct{ path, body string }{
	upstreamtest.OpenAI:    {"/openai/v1/chat/completions", `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"say hello"}]}`},
	upstreamtest.Anthropic: {"/anthropic/v1/messages", `{"model":"claude-haiku-4-5","max_tokens":16,"messages":[{"role":"user","content":"say hello"}]}`},
	upstreamtest.Google:    {"/google/v1beta/models/gemini-2.5-flash:generateContent", `{"contents":[{"role":"user","parts":[{"text":"say hello"}]}]}`},
}

// call sends provider p's model request to r with token and returns the
// status, the body and the key the upstream saw ("" when nothing reached it).
func (s *replicaSet) call(t *testing.T, r *replica, p, token string) (int, []byte, string) {
	t.Helper()
	up := s.upstreams[p]
	before := len(up.Requests())
	c := replicaCalls[p]
	code, body := do(t, "POST", r.proxyURL+c.path, token, c.body, "Anthropic-Version", "2023-06-01")
	reqs := up.Requests()
	if len(reqs) == before {
		return code, body, ""
	}
	return code, body, reqs[len(reqs)-1].Key
}

// changeBound is how soon every replica must act on a change made through
// another: one second, plus slack for scheduling two processes on a busy
// machine.
const changeBound = time.Second + 250*time.Millisecond

// expectUpstreamKey sends requests to r until the key that reaches the
// provider is want, for up to changeBound. Before that, only the key of the
// previous state (prev) may arrive.
func (s *replicaSet) expectUpstreamKey(t *testing.T, r *replica, p, token, prev, want, change string) {
	t.Helper()
	start := time.Now()
	for {
		code, body, got := s.call(t, r, p, token)
		if code != 200 {
			t.Fatalf("%s: replica %s returned %d: %s", change, r.name, code, body)
		}
		if got == want {
			t.Logf("%s: replica %s used the new key after %v", change, r.name, time.Since(start).Round(time.Millisecond))
			return
		}
		if got != prev {
			t.Fatalf("%s: replica %s sent a key ending %q upstream, neither the old %q nor the new %q",
				change, r.name, tail4(got), tail4(prev), tail4(want))
		}
		if time.Since(start) > changeBound {
			t.Errorf("%s: replica %s still sent the key ending %q after %v, want one ending %q",
				change, r.name, tail4(got), changeBound, tail4(want))
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func tail4(key string) string {
	if len(key) < 4 {
		return key
	}
	return key[len(key)-4:]
}

// TestReplicasShareOneStore runs two byokproxy processes on one Redis, a
// single node and a three-master Cluster, and changes a mailbox through the
// admin API of one. The other must act on each change within a second, the
// bound on how long it may reuse a record it read.
func TestReplicasShareOneStore(t *testing.T) {
	bin := buildProxy(t, moduleRoot(t))
	for _, topology := range []string{"single", "cluster"} {
		t.Run(topology, func(t *testing.T) {
			set := startReplicaSet(t, bin, topology, nil)
			for i, p := range providers {
				// The replica that takes the changes alternates, so neither
				// direction is special.
				writer, reader := set.replicas[i%2], set.replicas[(i+1)%2]
				t.Run(p+"/"+writer.name+"-to-"+reader.name, func(t *testing.T) {
					checkChangesCrossReplicas(t, set, writer, reader, p)
				})
			}
		})
	}
}

func checkChangesCrossReplicas(t *testing.T, set *replicaSet, writer, reader *replica, p string) {
	m := "replicas-" + p + "@example.com"
	keyPath := "/mailboxes/" + m + "/providers/" + p
	first, second := newKey(t, p), newKey(t, p)
	shared := set.sharedKeys[p]
	set.upstreams[p].SetKeys(shared, first, second)
	token := set.token(t, writer, m, false)

	set.expectUpstreamKey(t, reader, p, token, shared, shared, "new mailbox")

	set.admin(t, writer, "PUT", keyPath+"/key", map[string]string{"key": first}, 200)
	set.admin(t, writer, "PUT", keyPath+"/source", map[string]string{"source": "byok"}, 200)
	set.expectUpstreamKey(t, reader, p, token, shared, first, "after selecting byok")

	set.admin(t, writer, "PUT", keyPath+"/key", map[string]string{"key": second}, 200)
	set.expectUpstreamKey(t, reader, p, token, first, second, "after rotating the key")

	set.admin(t, writer, "PUT", keyPath+"/source", map[string]string{"source": "shared"}, 200)
	set.expectUpstreamKey(t, reader, p, token, second, shared, "after switching to shared")

	set.admin(t, writer, "PUT", keyPath+"/source", map[string]string{"source": "byok"}, 200)
	set.expectUpstreamKey(t, reader, p, token, shared, second, "after switching back to byok")

	set.admin(t, writer, "DELETE", keyPath+"/key", nil, 204)
	set.expectUpstreamKey(t, reader, p, token, second, shared, "after removing the key")
	var status struct {
		Providers map[string]struct {
			Source string `json:"source"`
			HasKey bool   `json:"has_key"`
		} `json:"providers"`
	}
	if err := json.Unmarshal(set.admin(t, reader, "GET", "/mailboxes/"+m, nil, 200), &status); err != nil {
		t.Fatalf("mailbox status: %v", err)
	}
	if got := status.Providers[p]; got.Source != "shared" || got.HasKey {
		t.Errorf("replica %s reports %+v after the key was removed through %s, want shared without key", reader.name, got, writer.name)
	}

	fresh := set.token(t, writer, m, true)
	start := time.Now()
	for {
		code, body, got := set.call(t, reader, p, token)
		if code == 401 {
			if got != "" {
				t.Errorf("revoked token on replica %s: the request reached the provider", reader.name)
			}
			t.Logf("revoked token refused by replica %s after %v", reader.name, time.Since(start).Round(time.Millisecond))
			break
		}
		if code != 200 || got != shared {
			t.Fatalf("revoked token on replica %s: status %d with key %q, want 401 (or 200 with the shared key before it acts): %s",
				reader.name, code, tail4(got), body)
		}
		if time.Since(start) > changeBound {
			t.Fatalf("revoked token on replica %s: still accepted after %v", reader.name, changeBound)
		}
		time.Sleep(10 * time.Millisecond)
	}
	set.expectUpstreamKey(t, reader, p, fresh, shared, shared, "new token after the revocation")
}

// TestReplicasEnforceOneAllowance spends a mailbox's monthly allowance on
// the shared key through both processes in turn; once the sum reaches the
// limit, both reject it.
func TestReplicasEnforceOneAllowance(t *testing.T) {
	const limit = 40
	bin := buildProxy(t, moduleRoot(t))
	set := startReplicaSet(t, bin, "single", map[string]any{"metering": map[string]any{"monthly_token_limit": limit}})
	const m = "allowance@example.com"
	token := set.token(t, set.replicas[0], m, false)

	spent, requests := 0, 0
	for i := 0; spent < limit && i < 20; i++ {
		r := set.replicas[i%2]
		code, body, _ := set.call(t, r, upstreamtest.OpenAI, token)
		if code != 200 {
			t.Fatalf("request %d through %s with %d of %d tokens spent: status %d: %s", i, r.name, spent, limit, code, body)
		}
		reqs := set.upstreams[upstreamtest.OpenAI].Requests()
		u := reqs[len(reqs)-1].Usage
		spent += u.InputTokens + u.OutputTokens
		requests++
		// Usage is counted after the response, by the audit writer of the
		// replica that served it; the other replica must see the sum.
		waitUsage(t, set, set.replicas[(i+1)%2], m, spent)
	}
	if spent < limit {
		t.Fatalf("spent only %d of %d tokens in %d requests", spent, limit, requests)
	}
	if requests < 2 {
		t.Fatalf("the allowance was spent in %d request, so both replicas did not take part; lower the limit", requests)
	}

	events := auditEvents(t, set.rdb, set.prefix+"audit", m)
	if len(events) != requests {
		t.Errorf("%d audit events of %s from both replicas, want %d", len(events), m, requests)
	}
	for _, e := range events {
		if e["kind"] != "metered" || e["status"] != float64(200) {
			t.Errorf("audit event kind %v status %v, want metered 200", e["kind"], e["status"])
		}
	}

	for _, r := range set.replicas {
		for _, p := range providers {
			code, body, got := set.call(t, r, p, token)
			if code != 429 {
				t.Errorf("%s through %s over the allowance: status %d, want 429: %s", p, r.name, code, body)
			}
			if got != "" {
				t.Errorf("%s through %s over the allowance reached the provider", p, r.name)
			}
		}
		rejections := scrapeCounter(t, r.metricsURL, "byokproxy_metered_rejections_total")
		if rejections != float64(len(providers)) {
			t.Errorf("replica %s: byokproxy_metered_rejections_total = %v, want %d", r.name, rejections, len(providers))
		}
	}
}

// auditEvents returns the request events of mailbox m in the audit stream.
func auditEvents(t *testing.T, rdb redis.UniversalClient, key, m string) []map[string]any {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	entries, err := rdb.XRange(ctx, key, "-", "+").Result()
	if err != nil {
		t.Fatalf("read audit stream %s: %v", key, err)
	}
	var out []map[string]any
	for _, e := range entries {
		var ev map[string]any
		raw, _ := e.Values["event"].(string)
		if err := json.Unmarshal([]byte(raw), &ev); err != nil {
			t.Fatalf("audit entry %s is not JSON: %v", e.ID, err)
		}
		if ev["mailbox"] == m && (ev["kind"] == "metered" || ev["kind"] == "byok") {
			out = append(out, ev)
		}
	}
	return out
}

// waitUsage polls the usage endpoint of r until mailbox m's shared tokens
// reach want, for at most 5 s.
func waitUsage(t *testing.T, set *replicaSet, r *replica, m string, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	got := -1
	for time.Now().Before(deadline) {
		var usage struct {
			Providers map[string]map[string]struct {
				InputTokens  int `json:"input_tokens"`
				OutputTokens int `json:"output_tokens"`
			} `json:"providers"`
		}
		if err := json.Unmarshal(set.admin(t, r, "GET", "/mailboxes/"+m+"/usage", nil, 200), &usage); err != nil {
			t.Fatalf("usage: %v", err)
		}
		got = 0
		for _, bySource := range usage.Providers {
			got += bySource["shared"].InputTokens + bySource["shared"].OutputTokens
		}
		if got >= want {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("replica %s reports %d shared tokens of %s after 5s, want %d", r.name, got, m, want)
}

// scrapeCounter returns the sum of every series of a counter on /metrics.
func scrapeCounter(t *testing.T, metricsURL, name string) float64 {
	t.Helper()
	code, body := do(t, "GET", metricsURL+"/metrics", "", nil)
	if code != 200 {
		t.Fatalf("GET %s/metrics: status %d", metricsURL, code)
	}
	var sum float64
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		fields := strings.Fields(line)
		v, err := strconv.ParseFloat(fields[len(fields)-1], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		sum += v
	}
	return sum
}

// BenchmarkIdleStreamMemory estimates the memory one idle stream holds in a
// byokproxy process. It opens idleStreams streaming requests whose upstream
// sends one event and then pauses. It reports the growth of the process's
// resident set, Go heap in use and goroutines, divided by the number of
// streams. Each stream holds a client connection, an upstream connection
// and the goroutines and buffers of both. It runs once per invocation:
//
//	go test -run '^$' -bench IdleStreamMemory -benchtime 1x ./e2e/
func BenchmarkIdleStreamMemory(b *testing.B) {
	const idleStreams = 500
	root := moduleRootTB(b)
	dir := b.TempDir()
	bin := filepath.Join(dir, "byokproxy")
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/byokproxy")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("go build ./cmd/byokproxy: %v\n%s", err, out)
	}

	srv := redistest.StartOwn(b)
	sharedKey := "sk-proj-" + strings.Repeat("b", 40)
	up := upstreamtest.New(upstreamtest.OpenAI, false, sharedKey)
	b.Cleanup(up.Close)
	// Every stream sends its first event and then waits this long.
	up.SetEventDelay(10 * time.Minute)

	identity, err := age.GenerateX25519Identity()
	if err != nil {
		b.Fatal(err)
	}
	identityFile := filepath.Join(dir, "identity.txt")
	if err := os.WriteFile(identityFile, []byte(identity.String()+"\n"), 0o600); err != nil {
		b.Fatal(err)
	}
	listen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(b))
	adminListen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(b))
	metricsListen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(b))
	const adminToken = "admin-token-for-the-benchmark-0123456789"
	cfg, err := json.Marshal(map[string]any{
		"listen":    listen,
		"admin":     map[string]any{"listen": adminListen, "token": adminToken},
		"metrics":   map[string]any{"listen": metricsListen},
		"auth":      map[string]any{"token_secrets": []string{"token-secret-for-the-benchmark-0123456789"}},
		"keystore":  map[string]any{"identity_file": identityFile},
		"redis":     map[string]any{"url": srv.URL, "prefix": srv.Prefix(b)},
		"providers": map[string]any{"openai": map[string]any{"upstream": up.URL, "shared_key": sharedKey}},
	})
	if err != nil {
		b.Fatal(err)
	}
	configFile := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(configFile, cfg, 0o600); err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", "--config", configFile)
	if err := cmd.Start(); err != nil {
		b.Fatalf("start byokproxy: %v", err)
	}
	b.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	proxyURL, metricsURL := "http://"+listen, "http://"+metricsListen
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: idleStreams, MaxConnsPerHost: 0}}
	waitUntil(b, 30*time.Second, "byokproxy /readyz", func() bool {
		resp, err := client.Get(proxyURL + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})

	token := issueTokenTB(b, client, "http://"+adminListen, adminToken, "idle@example.com")
	before := processSample(b, client, cmd.Process.Pid, metricsURL)

	body := `{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"say hello"}]}`
	var open []io.Closer
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	for i := 0; i < idleStreams; i++ {
		req, err := http.NewRequest("POST", proxyURL+"/openai/v1/chat/completions", strings.NewReader(body))
		if err != nil {
			b.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			b.Fatalf("stream %d: %v", i, err)
		}
		open = append(open, resp.Body)
		if resp.StatusCode != 200 {
			b.Fatalf("stream %d: status %d", i, resp.StatusCode)
		}
		// The first event proves the stream is open end to end.
		if _, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil {
			b.Fatalf("stream %d: first event: %v", i, err)
		}
	}
	waitUntil(b, 10*time.Second, "every stream in flight", func() bool {
		return scrapeGaugeTB(b, client, metricsURL, "byokproxy_in_flight_requests") == idleStreams
	})
	waitHeapSettled(b, client, metricsURL)
	after := processSample(b, client, cmd.Process.Pid, metricsURL)

	for b.Loop() {
		// The measurement above is the benchmark; there is nothing to repeat.
	}
	b.ReportMetric((after.rss-before.rss)/idleStreams, "rss-bytes/stream")
	b.ReportMetric((after.heap-before.heap)/idleStreams, "heap-bytes/stream")
	b.ReportMetric((after.goroutines-before.goroutines)/idleStreams, "goroutines/stream")
	b.Logf("%d idle streams: RSS %.1f -> %.1f MiB, heap in use %.1f -> %.1f MiB, goroutines %.0f -> %.0f",
		idleStreams, before.rss/(1<<20), after.rss/(1<<20), before.heap/(1<<20), after.heap/(1<<20), before.goroutines, after.goroutines)
}

// memorySample is the memory of a byokproxy process at one moment.
type memorySample struct {
	rss, heap, goroutines float64
}

func processSample(tb testing.TB, client *http.Client, pid int, metricsURL string) memorySample {
	tb.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		tb.Fatalf("read the process status (Linux only): %v", err)
	}
	var s memorySample
	for line := range strings.SplitSeq(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			if err != nil {
				tb.Fatalf("VmRSS line %q: %v", line, err)
			}
			s.rss = kb * 1024
		}
	}
	s.heap = scrapeGaugeTB(tb, client, metricsURL, "go_memstats_heap_inuse_bytes")
	s.goroutines = scrapeGaugeTB(tb, client, metricsURL, "go_goroutines")
	return s
}

// waitHeapSettled waits up to 2 s until two heap samples 100 ms apart are
// equal, so the sample after it is not taken in the middle of a burst of
// allocation.
func waitHeapSettled(tb testing.TB, client *http.Client, metricsURL string) {
	tb.Helper()
	last := -1.0
	for range 20 {
		heap := scrapeGaugeTB(tb, client, metricsURL, "go_memstats_heap_inuse_bytes")
		if heap == last {
			return
		}
		last = heap
		time.Sleep(100 * time.Millisecond)
	}
}

// scrapeGaugeTB returns the sum of every series of a metric on /metrics.
func scrapeGaugeTB(tb testing.TB, client *http.Client, metricsURL, name string) float64 {
	tb.Helper()
	resp, err := client.Get(metricsURL + "/metrics")
	if err != nil {
		tb.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		fields := strings.Fields(line)
		v, err := strconv.ParseFloat(fields[len(fields)-1], 64)
		if err != nil {
			tb.Fatalf("metrics line %q: %v", line, err)
		}
		sum += v
	}
	return sum
}

func issueTokenTB(tb testing.TB, client *http.Client, adminURL, adminToken, m string) string {
	tb.Helper()
	req, err := http.NewRequest("POST", adminURL+"/admin/v1/mailboxes/"+m+"/token", nil)
	if err != nil {
		tb.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+adminToken)
	resp, err := client.Do(req)
	if err != nil {
		tb.Fatalf("issue token: %v", err)
	}
	defer resp.Body.Close()
	var out struct{ Token string }
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || out.Token == "" {
		tb.Fatalf("issue token: status %d, %v", resp.StatusCode, err)
	}
	return out.Token
}

// waitUntil polls cond every 20 ms for at most timeout.
func waitUntil(tb testing.TB, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("%s: not reached within %v", what, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// moduleRootTB returns the directory of go.mod, one level above this file.
func moduleRootTB(tb testing.TB) string {
	tb.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		tb.Fatal("cannot find the path of replicas_test.go")
	}
	return filepath.Dir(filepath.Dir(file))
}
