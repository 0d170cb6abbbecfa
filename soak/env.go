package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/internal/upstreamtest"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/provider"
)

// redisPrefix is the key prefix of the proxy under test. The Redis server is
// private to the run, so nothing else lives there.
const redisPrefix = "soak:"

// environment is everything a run starts: Redis, the emulators and the proxy.
type environment struct {
	dir        string
	redisCmd   *exec.Cmd
	redisDone  chan struct{}
	redisPort  int
	rdb        *redis.Client
	emulators  map[string]*upstreamtest.Server
	proxyCmd   *exec.Cmd
	proxyDone  chan struct{}
	proxyURL   string
	adminURL   string
	metricsURL string
	ports      map[string]int // listener name to port
	adminToken string

	// client sends the load and admin the admin calls, so closing idle
	// connections of one leaves the other alone.
	client *http.Client
	admin  *http.Client

	// byokKeys are two valid keys per provider that rotation switches
	// between; sharedKeys are the platform keys.
	byokKeys   map[string][2]string
	sharedKeys map[string]string

	mu        sync.Mutex
	mailboxes []*mailboxState
}

// mailboxState is the run's record of one mailbox.
type mailboxState struct {
	id    string
	byok  bool            // has its own keys for every provider
	token string          // current token
	keyAt map[string]int  // which of byokKeys is stored, per provider
	onKey map[string]bool // source is byok, per provider
}

func buildProxy(ctx context.Context, out string) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./cmd/byokproxy")
	if output, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/byokproxy (run soak from the module root): %w\n%s", err, output)
	}
	return nil
}

func freePort() (int, error) {
	ports, err := freePorts(1)
	if err != nil {
		return 0, err
	}
	return ports[0], nil
}

// freePorts returns n distinct ports that were free a moment ago. It keeps
// each listener open until all are picked, because the kernel may hand a
// port that was just closed to the next listener on port 0.
func freePorts(n int) ([]int, error) {
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func randomText(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)[:n]
}

// newKey returns a random key in the provider's format.
func newKey(p string) string {
	body := strings.ToUpper(randomText(20)) + randomText(20)
	switch p {
	case provider.Anthropic:
		return "sk-ant-api03-" + body
	case provider.Google:
		return "AIza" + body[:35]
	}
	return "sk-proj-" + body
}

func startEnvironment(ctx context.Context, dir, bin string, log *slog.Logger) (*environment, error) {
	env := &environment{
		dir:        dir,
		emulators:  map[string]*upstreamtest.Server{},
		ports:      map[string]int{},
		byokKeys:   map[string][2]string{},
		sharedKeys: map[string]string{},
		adminToken: randomText(40),
		client:     &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 256}},
		admin:      &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{}},
	}
	ok := false
	defer func() {
		if !ok {
			env.stop(log)
		}
	}()

	if err := env.startRedis(ctx); err != nil {
		return nil, err
	}
	for _, p := range provider.Names {
		env.sharedKeys[p] = newKey(p)
		env.byokKeys[p] = [2]string{newKey(p), newKey(p)}
		env.emulators[p] = upstreamtest.New(p, false, env.sharedKeys[p], env.byokKeys[p][0], env.byokKeys[p][1])
	}
	if err := env.startProxy(ctx, bin); err != nil {
		return nil, err
	}
	ok = true
	return env, nil
}

func (env *environment) startRedis(ctx context.Context) error {
	port, err := freePort()
	if err != nil {
		return err
	}
	env.redisPort = port
	env.redisCmd = exec.Command("redis-server", "--bind", "127.0.0.1", "--port", strconv.Itoa(port),
		"--save", "", "--appendonly", "no", "--dir", env.dir, "--logfile", filepath.Join(env.dir, "redis.log"))
	if err := env.redisCmd.Start(); err != nil {
		return fmt.Errorf("start redis-server (Debian: apt-get install redis-server): %w", err)
	}
	env.redisDone = make(chan struct{})
	go func() {
		env.redisCmd.Wait()
		close(env.redisDone)
	}()
	env.rdb = redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", port)})
	deadline := time.Now().Add(10 * time.Second)
	for {
		pingCtx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		err := env.rdb.Ping(pingCtx).Err()
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("redis-server on port %d not ready after 10 s: %w", port, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (env *environment) startProxy(ctx context.Context, bin string) error {
	ids, err := keystore.GenerateIdentities()
	if err != nil {
		return err
	}
	identityFile := filepath.Join(env.dir, "identity.txt")
	if err := os.WriteFile(identityFile, []byte(ids.SecretText()), 0o600); err != nil {
		return err
	}
	names := []string{"proxy", "admin", "metrics"}
	ports, err := freePorts(len(names))
	if err != nil {
		return err
	}
	for i, name := range names {
		env.ports[name] = ports[i]
	}
	listen := func(name string) string { return fmt.Sprintf("127.0.0.1:%d", env.ports[name]) }
	providers := map[string]any{}
	for _, p := range provider.Names {
		providers[p] = map[string]any{"upstream": env.emulators[p].URL, "shared_key": env.sharedKeys[p]}
	}
	cfg := map[string]any{
		"listen":    listen("proxy"),
		"log_level": "warn",
		"admin":     map[string]any{"listen": listen("admin"), "token": env.adminToken},
		"metrics":   map[string]any{"listen": listen("metrics")},
		"auth":      map[string]any{"token_secrets": []string{randomText(48)}},
		"keystore":  map[string]any{"identity_file": identityFile},
		"redis":     map[string]any{"url": fmt.Sprintf("redis://127.0.0.1:%d", env.redisPort), "prefix": redisPrefix},
		"providers": providers,
	}
	// JSON is valid YAML, so the config file needs no YAML encoder.
	data, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	configFile := filepath.Join(env.dir, "byokproxy.yaml")
	if err := os.WriteFile(configFile, data, 0o600); err != nil {
		return err
	}
	logFile, err := os.Create(filepath.Join(env.dir, "proxy.log"))
	if err != nil {
		return err
	}
	env.proxyCmd = exec.Command(bin, "serve", "--config", configFile)
	env.proxyCmd.Stdout = logFile
	env.proxyCmd.Stderr = logFile
	if err := env.proxyCmd.Start(); err != nil {
		logFile.Close()
		return fmt.Errorf("start %s: %w", bin, err)
	}
	env.proxyDone = make(chan struct{})
	go func() {
		env.proxyCmd.Wait()
		logFile.Close()
		close(env.proxyDone)
	}()
	env.proxyURL = "http://" + listen("proxy")
	env.adminURL = "http://" + listen("admin")
	env.metricsURL = "http://" + listen("metrics") + "/metrics"

	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-env.proxyDone:
			return fmt.Errorf("byokproxy exited during start-up; see %s", logFile.Name())
		default:
		}
		resp, err := env.admin.Get(env.proxyURL + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("byokproxy not ready after 30 s: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stop ends the proxy (SIGTERM, then SIGKILL after 20 s), the emulators and
// Redis, each by the handle this run holds.
func (env *environment) stop(log *slog.Logger) {
	if env.proxyCmd != nil && env.proxyCmd.Process != nil {
		env.proxyCmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-env.proxyDone:
		case <-time.After(20 * time.Second):
			log.Warn("byokproxy still running 20 s after SIGTERM; killing it", "pid", env.proxyCmd.Process.Pid)
			env.proxyCmd.Process.Kill()
			<-env.proxyDone
		}
	}
	for _, e := range env.emulators {
		e.Close()
	}
	if env.rdb != nil {
		env.rdb.Close()
	}
	if env.redisCmd != nil && env.redisCmd.Process != nil {
		env.redisCmd.Process.Kill()
		<-env.redisDone
	}
}

// adminCall sends one admin API request and decodes a JSON response into out
// when out is not nil.
func (env *environment) adminCall(ctx context.Context, method, path string, body any, out any) error {
	var rd io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, env.adminURL+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+env.adminToken)
	req.Header.Set("Content-Type", "application/json")
	resp, err := env.admin.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s %s: status %d: %s", method, path, resp.StatusCode, data)
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}

// setup creates the mailboxes: two in three store their own key for every
// provider and use it.
func (env *environment) setup(ctx context.Context, n int) error {
	for i := range n {
		m := &mailboxState{
			id:    fmt.Sprintf("soak-%03d@example.com", i),
			byok:  i%3 != 0,
			keyAt: map[string]int{},
			onKey: map[string]bool{},
		}
		if m.byok {
			for _, p := range provider.Names {
				if err := env.adminCall(ctx, http.MethodPut, "/admin/v1/mailboxes/"+m.id+"/providers/"+p+"/key",
					map[string]string{"key": env.byokKeys[p][0]}, nil); err != nil {
					return err
				}
				if err := env.adminCall(ctx, http.MethodPut, "/admin/v1/mailboxes/"+m.id+"/providers/"+p+"/source",
					map[string]string{"source": "byok"}, nil); err != nil {
					return err
				}
				m.onKey[p] = true
			}
		}
		var tok struct{ Token string }
		if err := env.adminCall(ctx, http.MethodPost, "/admin/v1/mailboxes/"+m.id+"/token", nil, &tok); err != nil {
			return err
		}
		m.token = tok.Token
		env.mailboxes = append(env.mailboxes, m)
	}
	return nil
}

func (env *environment) token(i int) string {
	env.mu.Lock()
	defer env.mu.Unlock()
	return env.mailboxes[i].token
}

// auditCounts is the audit stream tallied by event kind.
type auditCounts struct {
	total  int
	byKind map[string]int
}

func (env *environment) auditKey() string { return redisPrefix + "audit" }

// waitAudit waits until the audit stream holds want events, or stops growing
// for 5 s, or timeout passes.
func (env *environment) waitAudit(ctx context.Context, want int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	last, lastChange := int64(-1), time.Now()
	for {
		n, err := env.rdb.XLen(ctx, env.auditKey()).Result()
		if err != nil {
			return err
		}
		if n >= int64(want) {
			return nil
		}
		if n != last {
			last, lastChange = n, time.Now()
		}
		if time.Since(lastChange) > 5*time.Second || time.Now().After(deadline) {
			return fmt.Errorf("audit stream has %d events, expected %d", n, want)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// countAudit reads the whole audit stream and tallies its events by kind.
func (env *environment) countAudit(ctx context.Context) (auditCounts, error) {
	counts := auditCounts{byKind: map[string]int{}}
	start := "-"
	for range 100000 {
		entries, err := env.rdb.XRangeN(ctx, env.auditKey(), start, "+", 5000).Result()
		if err != nil {
			return counts, err
		}
		if len(entries) == 0 {
			return counts, nil
		}
		for _, e := range entries {
			var ev struct {
				Kind string `json:"kind"`
			}
			raw, _ := e.Values["event"].(string)
			if err := json.Unmarshal([]byte(raw), &ev); err != nil {
				return counts, fmt.Errorf("audit entry %s: %w", e.ID, err)
			}
			counts.total++
			counts.byKind[ev.Kind]++
		}
		start = "(" + entries[len(entries)-1].ID
	}
	return counts, errors.New("audit stream longer than 500 million entries")
}

// usageRequests returns, per mailbox, the requests the usage counters hold
// for this month, across providers and sources.
func (env *environment) usageRequests(ctx context.Context) (map[string]int, error) {
	out := map[string]int{}
	for _, m := range env.mailboxes {
		var u struct {
			Providers map[string]map[string]struct {
				Requests int `json:"requests"`
			} `json:"providers"`
		}
		if err := env.adminCall(ctx, http.MethodGet, "/admin/v1/mailboxes/"+m.id+"/usage", nil, &u); err != nil {
			return nil, err
		}
		for _, sources := range u.Providers {
			for _, c := range sources {
				out[m.id] += c.Requests
			}
		}
	}
	return out, nil
}

func (env *environment) droppedEvents() (float64, error) {
	m, err := scrapeMetrics(env.metricsURL)
	if err != nil {
		return 0, err
	}
	return m["byokproxy_audit_events_dropped_total"], nil
}

// settle waits for d, taking a sample every interval.
func (env *environment) settle(ctx context.Context, d, interval time.Duration) []sample {
	var samples []sample
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		wait := min(interval, time.Until(deadline))
		select {
		case <-ctx.Done():
			return samples
		case <-time.After(wait):
		}
		if s, err := env.sample(); err == nil {
			samples = append(samples, s)
		}
	}
	return samples
}
