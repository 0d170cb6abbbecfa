package proxy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/admin"
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

// clusterReplica is one in-process proxy with its admin API on a Redis
// Cluster, wired as cmd/byokproxy wires it.
type clusterReplica struct {
	rdb      *redis.ClusterClient
	store    *keystore.Store
	audit    *audit.Writer
	proxyURL string
	adminURL string
}

const clusterAdminToken = "admin-token-for-cluster-tests-0123"

// startClusterReplica runs a replica on c under prefix with identities ids,
// forwarding to upstreams. Every replica of one test shares all four.
func startClusterReplica(t *testing.T, c *redistest.Cluster, prefix string, ids *keystore.Identities,
	upstreams map[string]*upstreamtest.Server, monthlyLimit int64) *clusterReplica {
	t.Helper()
	cfg := config.Defaults()
	cfg.Redis.Addrs = c.Addrs
	cfg.Redis.Prefix = prefix
	cfg.Admin.Token = clusterAdminToken
	cfg.Auth.TokenSecrets = []string{"token-secret-for-cluster-tests-0123"}
	cfg.Metering.MonthlyTokenLimit = monthlyLimit
	for _, p := range provider.Names {
		pc := cfg.Provider(p)
		pc.Upstream = upstreams[p].URL
		pc.SharedKey = teststack.SharedKeys[p]
	}

	r := &clusterReplica{rdb: c.Client(t)}
	log := slog.New(slog.DiscardHandler)
	r.store = keystore.New(r.rdb, prefix, ids)
	m := metrics.New(prometheus.NewRegistry())
	signer, err := mailbox.NewSigner(cfg.Auth.TokenSecrets)
	if err != nil {
		t.Fatal(err)
	}
	r.audit = audit.NewWriter(r.rdb, r.store.Layout(), audit.Options{
		QueueSize: cfg.Audit.QueueSize, StreamMaxLen: cfg.Audit.StreamMaxLen,
		RetentionMonths: cfg.Metering.RetentionMonths, ResponseTTL: cfg.Metering.ResponseTTL,
		Dropped: m.AuditDropped, Logger: log,
	})
	ctx, cancel := context.WithCancel(context.Background())
	go r.audit.Run(ctx)

	handler, err := proxy.New(proxy.Options{Config: cfg, Store: r.store, Signer: signer, Audit: r.audit, Metrics: m, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	adminAPI := admin.New(admin.Options{
		Store: r.store, Signer: signer, Audit: r.audit, Token: cfg.Admin.Token,
		MonthlyTokenLimit: cfg.Metering.MonthlyTokenLimit, Prober: proxy.NewProber(cfg), Logger: log,
	})
	proxySrv := httptest.NewServer(handler)
	adminSrv := httptest.NewServer(adminAPI)
	r.proxyURL, r.adminURL = proxySrv.URL, adminSrv.URL
	t.Cleanup(func() {
		proxySrv.Close()
		adminSrv.Close()
		flush, cancelFlush := context.WithTimeout(context.Background(), 5*time.Second)
		r.audit.Close(flush)
		cancelFlush()
		cancel()
	})
	return r
}

// admin sends an admin API request and returns the status and body.
func (r *clusterReplica) admin(t *testing.T, method, path string, body any) (int, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequest(method, r.adminURL+"/admin/v1"+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+clusterAdminToken)
	req.Header.Set("Content-Type", "application/json")
	return clusterRoundTrip(t, req)
}

// call sends c to the proxy with token and returns the status and body.
func (r *clusterReplica) call(t *testing.T, p string, c call, token string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest("POST", r.proxyURL+c.path, strings.NewReader(c.body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+token)
	headers := sdkHeaders(p)
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	return clusterRoundTrip(t, req)
}

func clusterRoundTrip(t *testing.T, req *http.Request) (int, []byte) {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL.Path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", req.Method, req.URL.Path, err)
	}
	return resp.StatusCode, data
}

// waitDelivered waits up to 5 s until the replica's audit queue is empty and
// the events of want requests of mailbox m are in the stream.
func (r *clusterReplica) waitDelivered(t *testing.T, m string, want int) []map[string]any {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		events := clusterRequestEvents(t, r.rdb, r.store.Layout().Audit(), m)
		if len(events) >= want && r.audit.Pending() == 0 {
			return events
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d request events in the audit stream after 5s, want %d", m, len(events), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// clusterRequestEvents returns the request events of mailbox m in the audit
// stream.
func clusterRequestEvents(t *testing.T, rdb redis.UniversalClient, key, m string) []map[string]any {
	t.Helper()
	entries, err := rdb.XRange(context.Background(), key, "-", "+").Result()
	if err != nil {
		t.Fatalf("XRANGE %s: %v", key, err)
	}
	var out []map[string]any
	for _, e := range entries {
		var ev map[string]any
		if err := json.Unmarshal([]byte(fmt.Sprint(e.Values["event"])), &ev); err != nil {
			t.Fatalf("audit entry %s: %v", e.ID, err)
		}
		if ev["mailbox"] == m && (ev["kind"] == "byok" || ev["kind"] == "metered") {
			out = append(out, ev)
		}
	}
	return out
}

// TestProxyOnCluster runs two in-process replicas on a three-master Redis
// Cluster, with one mailbox served by each master. Changes go through the
// admin API of replica A and requests through replica B.
func TestProxyOnCluster(t *testing.T) {
	c := redistest.StartCluster(t)
	prefix := c.Prefix(t)
	ids, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	upstreams := map[string]*upstreamtest.Server{}
	for _, p := range provider.Names {
		up := upstreamtest.New(p, false, teststack.SharedKeys[p], teststack.BYOKKeys[p])
		t.Cleanup(up.Close)
		upstreams[p] = up
	}
	a := startClusterReplica(t, c, prefix, ids, upstreams, 0)
	b := startClusterReplica(t, c, prefix, ids, upstreams, 0)

	layout := keystore.Layout{Prefix: prefix}
	covered := map[int]bool{}
	var mailboxes []string
	for i := 0; i < 200 && len(covered) < len(c.Addrs); i++ {
		m := fmt.Sprintf("cluster-%d@example.com", i)
		if node := c.NodeOf(t, layout.Mailbox(m)); !covered[node] {
			covered[node] = true
			mailboxes = append(mailboxes, m)
		}
	}
	if len(covered) < len(c.Addrs) {
		t.Fatalf("200 mailbox ids cover %d of %d masters", len(covered), len(c.Addrs))
	}

	for _, m := range mailboxes {
		t.Run(m, func(t *testing.T) {
			code, body := a.admin(t, "POST", "/mailboxes/"+m+"/token", nil)
			if code != 200 {
				t.Fatalf("issue token: %d %s", code, body)
			}
			var tok struct{ Token string }
			json.Unmarshal(body, &tok)

			requests := 0
			for _, p := range provider.Names {
				up := upstreams[p]
				code, body := b.call(t, p, nonStream[p], tok.Token)
				requests++
				if code != 200 {
					t.Fatalf("%s shared: %d %s", p, code, body)
				}
				if got := lastUpstreamKey(up); got != teststack.SharedKeys[p] {
					t.Errorf("%s shared: upstream saw a key ending %q, want the shared key", p, last4(got))
				}

				if code, body := a.admin(t, "PUT", "/mailboxes/"+m+"/providers/"+p+"/key", map[string]string{"key": teststack.BYOKKeys[p]}); code != 200 {
					t.Fatalf("%s put key: %d %s", p, code, body)
				}
				if code, body := a.admin(t, "PUT", "/mailboxes/"+m+"/providers/"+p+"/source", map[string]string{"source": "byok"}); code != 200 {
					t.Fatalf("%s select byok: %d %s", p, code, body)
				}
				code, body = b.call(t, p, streaming[p], tok.Token)
				requests++
				if code != 200 {
					t.Fatalf("%s byok stream: %d %s", p, code, body)
				}
				if got := lastUpstreamKey(up); got != teststack.BYOKKeys[p] {
					t.Errorf("%s byok: upstream saw a key ending %q, want the BYOK key", p, last4(got))
				}
			}

			events := b.waitDelivered(t, m, requests)
			kinds := map[string]int{}
			for _, e := range events {
				kinds[fmt.Sprint(e["provider"], "/", e["kind"])]++
				if e["kind"] == "byok" && e["key_last4"] != last4(teststack.BYOKKeys[fmt.Sprint(e["provider"])]) {
					t.Errorf("byok event key_last4 = %v", e["key_last4"])
				}
			}
			for _, p := range provider.Names {
				for _, kind := range []string{"metered", "byok"} {
					if kinds[p+"/"+kind] != 1 {
						t.Errorf("%s %s events: %d, want 1", p, kind, kinds[p+"/"+kind])
					}
				}
			}

			// The usage increments travel in the same batch as the events but
			// to the mailbox's master, which may finish a moment later.
			clusterWaitFor(t, 5*time.Second, func() error {
				code, body := a.admin(t, "GET", "/mailboxes/"+m+"/usage", nil)
				if code != 200 {
					return fmt.Errorf("usage: %d %s", code, body)
				}
				var usage struct {
					Providers map[string]map[string]keystore.Counts `json:"providers"`
				}
				if err := json.Unmarshal(body, &usage); err != nil {
					return fmt.Errorf("usage body %s: %v", body, err)
				}
				for _, p := range provider.Names {
					for _, source := range []string{"shared", "byok"} {
						if got := usage.Providers[p][source]; got.Requests != 1 || got.InputTokens == 0 || got.OutputTokens == 0 {
							return fmt.Errorf("%s %s usage %+v, want one request with tokens", p, source, got)
						}
					}
				}
				return nil
			})

			// A revocation through A holds on B at its next request.
			code, body = a.admin(t, "POST", "/mailboxes/"+m+"/token/revoke", nil)
			if code != 200 {
				t.Fatalf("revoke: %d %s", code, body)
			}
			var fresh struct{ Token string }
			json.Unmarshal(body, &fresh)
			if code, body := b.call(t, provider.Google, nonStream[provider.Google], tok.Token); code != 401 || !inShape(provider.Google, body, "", "", "UNAUTHENTICATED") {
				t.Errorf("revoked token on B: %d %s, want 401 in Google's shape", code, body)
			}
			if code, body := b.call(t, provider.Google, nonStream[provider.Google], fresh.Token); code != 200 {
				t.Errorf("new token on B: %d %s", code, body)
			}
		})
	}

	t.Run("allowance", func(t *testing.T) {
		m := mailboxes[len(mailboxes)-1]
		code, body := a.admin(t, "POST", "/mailboxes/"+m+"/token/revoke", nil)
		if code != 200 {
			t.Fatalf("token: %d %s", code, body)
		}
		var tok struct{ Token string }
		json.Unmarshal(body, &tok)
		if code, body := a.admin(t, "PUT", "/mailboxes/"+m+"/providers/openai/source", map[string]string{"source": "shared"}); code != 200 {
			t.Fatalf("select shared: %d %s", code, body)
		}
		// The mailbox already used shared tokens above, so a limit of 1 is
		// used up.
		if code, body := a.admin(t, "PUT", "/mailboxes/"+m+"/limit", map[string]any{"monthly_token_limit": 1}); code != 200 {
			t.Fatalf("limit: %d %s", code, body)
		}
		for name, r := range map[string]*clusterReplica{"A": a, "B": b} {
			code, body := r.call(t, provider.OpenAI, nonStream[provider.OpenAI], tok.Token)
			if code != 429 || !inShape(provider.OpenAI, body, "", "insufficient_quota", "") {
				t.Errorf("replica %s over the allowance: %d %s, want 429 insufficient_quota", name, code, body)
			}
		}
	})

	// Back-to-back requests near the allowance, on a mailbox on each master:
	// the pending usage the replica checks goes to that master in one script.
	t.Run("allowance back to back", func(t *testing.T) {
		seen := map[int]bool{}
		for i := 0; i < 200 && len(seen) < len(c.Addrs); i++ {
			m := fmt.Sprintf("cluster-exact-%d@example.com", i)
			node := c.NodeOf(t, layout.Mailbox(m))
			if seen[node] {
				continue
			}
			seen[node] = true
			code, body := a.admin(t, "POST", "/mailboxes/"+m+"/token", nil)
			if code != 200 {
				t.Fatalf("token: %d %s", code, body)
			}
			var tok struct{ Token string }
			json.Unmarshal(body, &tok)
			if code, body := a.admin(t, "PUT", "/mailboxes/"+m+"/limit", map[string]any{"monthly_token_limit": 1000}); code != 200 {
				t.Fatalf("limit: %d %s", code, body)
			}
			if code, body := a.call(t, provider.OpenAI, nonStream[provider.OpenAI], tok.Token); code != 200 {
				t.Fatalf("%s first request: %d %s", m, code, body)
			}
			u := upstreams[provider.OpenAI].Requests()
			per := u[len(u)-1].Usage.InputTokens + u[len(u)-1].Usage.OutputTokens
			if code, body := a.admin(t, "PUT", "/mailboxes/"+m+"/limit", map[string]any{"monthly_token_limit": 2*per - 1}); code != 200 {
				t.Fatalf("limit: %d %s", code, body)
			}
			var got []int
			for range 2 {
				code, _ := a.call(t, provider.OpenAI, nonStream[provider.OpenAI], tok.Token)
				got = append(got, code)
			}
			if got[0] != 200 || got[1] != 429 {
				t.Errorf("%s on master %d: statuses %v, want [200 429] with %d tokens per request and a limit of %d", m, node, got, per, 2*per-1)
			}
			// The script reads the usage hash and a seen marker of the same
			// mailbox, which a Cluster accepts only in one slot.
			pending := []keystore.PendingUsage{{RequestID: "not-written-yet", Month: keystore.Month(time.Now()), Tokens: 5}}
			clusterWaitFor(t, 5*time.Second, func() error {
				used, err := a.store.UsedShared(context.Background(), mailbox.ID(m), pending)
				if err != nil || used != int64(2*per+5) {
					return fmt.Errorf("%s: used %d, %v, want %d", m, used, err, 2*per+5)
				}
				return nil
			})
		}
	})

	t.Run("previous response", func(t *testing.T) {
		owner, other := mailboxes[0], mailboxes[1]
		tokens := map[string]string{}
		for _, m := range []string{owner, other} {
			code, body := a.admin(t, "POST", "/mailboxes/"+m+"/token/revoke", nil)
			if code != 200 {
				t.Fatalf("token: %d %s", code, body)
			}
			var tok struct{ Token string }
			json.Unmarshal(body, &tok)
			tokens[m] = tok.Token
			a.admin(t, "PUT", "/mailboxes/"+m+"/providers/openai/source", map[string]string{"source": "shared"})
		}
		code, body := a.call(t, provider.OpenAI, call{path: "/openai/v1/responses", body: `{"model":"gpt-4o-mini","input":"hello"}`}, tokens[owner])
		if code != 200 {
			t.Fatalf("create response on A: %d %s", code, body)
		}
		var created struct{ ID string }
		json.Unmarshal(body, &created)
		clusterWaitFor(t, 5*time.Second, func() error {
			owns, err := a.store.Owns(context.Background(), mailbox.ID(owner), created.ID)
			if err != nil || !owns {
				return fmt.Errorf("response %q not recorded as %s's: %v, %v", created.ID, owner, owns, err)
			}
			return nil
		})

		follow := call{path: "/openai/v1/responses", body: `{"model":"gpt-4o-mini","input":"more","previous_response_id":"` + created.ID + `"}`}
		if code, body := b.call(t, provider.OpenAI, follow, tokens[owner]); code != 200 {
			t.Errorf("owner continuing its response on B: %d %s", code, body)
		}
		if code, _ := b.call(t, provider.OpenAI, follow, tokens[other]); code != 403 {
			t.Errorf("another mailbox continuing the response on B: %d, want 403", code)
		}
	})
}

// clusterWaitFor calls check until it returns nil, for at most timeout, and fails
// the test with its last error.
func clusterWaitFor(t *testing.T, timeout time.Duration, check func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %v", timeout, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func lastUpstreamKey(up *upstreamtest.Server) string {
	reqs := up.Requests()
	if len(reqs) == 0 {
		return ""
	}
	return reqs[len(reqs)-1].Key
}

func last4(key string) string {
	if len(key) < 4 {
		return key
	}
	return key[len(key)-4:]
}

// BenchmarkRedisCommandsPerRequest reports the Redis commands one proxied
// request costs, counted with INFO commandstats on a private redis-server:
// the request path's pipelined read, and the audit writer's event and usage
// increment, which it batches with other requests' into one pipeline.
//
//	go test -run '^$' -bench RedisCommandsPerRequest -benchtime 2000x ./proxy/
func BenchmarkRedisCommandsPerRequest(b *testing.B) {
	srv := redistest.StartOwn(b)
	rdb := srv.Client(b)
	for _, source := range []string{"shared", "byok"} {
		b.Run(source, func(b *testing.B) {
			st := teststack.StartOn(b, srv, srv.Prefix(b))
			m := "bench-" + source + "@example.com"
			if source == "byok" {
				st.UseBYOK(b, m, provider.OpenAI)
			}
			token := st.Token(b, m)
			c := nonStream[provider.OpenAI]
			st.WaitAudit(b)
			ctx := context.Background()
			if err := rdb.ConfigResetStat(ctx).Err(); err != nil {
				b.Fatalf("CONFIG RESETSTAT: %v", err)
			}
			b.ResetTimer()
			for b.Loop() {
				if resp, body := st.Do(b, "POST", c.path, token, c.body); resp.StatusCode != 200 {
					b.Fatalf("status %d: %s", resp.StatusCode, body)
				}
			}
			b.StopTimer()
			st.WaitAudit(b)
			stats, err := rdb.Info(ctx, "commandstats").Result()
			if err != nil {
				b.Fatalf("INFO commandstats: %v", err)
			}
			total, perCommand := parseCommandStats(b, stats)
			b.ReportMetric(float64(total)/float64(b.N), "redis-cmds/op")
			b.Logf("%s, %d requests: %v", source, b.N, perCommand)
		})
	}
}

// parseCommandStats sums the calls of INFO commandstats, leaving out the
// INFO and CONFIG calls of the benchmark itself.
func parseCommandStats(b *testing.B, stats string) (int64, map[string]int64) {
	b.Helper()
	perCommand := map[string]int64{}
	var total int64
	for line := range strings.SplitSeq(stats, "\n") {
		name, rest, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok || !strings.HasPrefix(name, "cmdstat_") {
			continue
		}
		name = strings.TrimPrefix(name, "cmdstat_")
		if name == "info" || strings.HasPrefix(name, "config") {
			continue
		}
		for field := range strings.SplitSeq(rest, ",") {
			if v, ok := strings.CutPrefix(field, "calls="); ok {
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil {
					b.Fatalf("commandstats line %q: %v", line, err)
				}
				perCommand[name] = n
				total += n
			}
		}
	}
	return total, perCommand
}
