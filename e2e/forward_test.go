package e2e

import (
	"bytes"
	"context"
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
	"testing"
	"time"

	"filippo.io/age"

	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/internal/upstreamtest"
)

// TestForwardProxy runs byokproxy with forward.listen set and TLS emulators
// as the upstreams, with a CA from "byokproxy ca new". It then reaches the
// emulators the way apps that keep the providers' own URLs do: curl with
// --proxy and --cacert, and the official OpenAI Node SDK with undici's
// ProxyAgent and NODE_EXTRA_CA_CERTS (e2e/forward).
func TestForwardProxy(t *testing.T) {
	if testing.Short() {
		t.Skip("forward proxy test with Node.js skipped with -short")
	}
	root := moduleRoot(t)
	nodeDir := filepath.Join(root, "e2e", "forward")
	if _, err := os.Stat(filepath.Join(nodeDir, "node_modules")); err != nil {
		t.Fatal(`run "make test" (or npm ci in e2e/forward) first`)
	}
	if _, err := exec.LookPath("node"); err != nil {
		t.Fatal("node not found on PATH: install Node.js 20.18.1 or later")
	}
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatal("curl not found on PATH: install curl (Debian: apt-get install curl)")
	}
	artifacts := filepath.Join(root, "e2e", "artifacts")
	if err := os.MkdirAll(artifacts, 0o755); err != nil {
		t.Fatalf("create %s: %v", artifacts, err)
	}

	bin := buildProxy(t, root)
	dir := t.TempDir()
	caCert, caKey := filepath.Join(dir, "forward-ca.pem"), filepath.Join(dir, "forward-ca-key.pem")
	if out, err := exec.Command(bin, "ca", "new", "--cert", caCert, "--key", caKey).CombinedOutput(); err != nil {
		t.Fatalf("byokproxy ca new: %v\n%s", err, out)
	}

	rs := redistest.Start(t)
	prefix := rs.Prefix(t)
	rdb := rs.Client(t)

	byokKeys := map[string]string{}
	sharedKeys := map[string]string{}
	emulators := map[string]*upstreamtest.Server{}
	providerCfg := map[string]any{}
	for _, p := range providers {
		byokKeys[p] = newKey(t, p)
		sharedKeys[p] = newKey(t, p)
		srv := upstreamtest.New(p, true, sharedKeys[p], byokKeys[p])
		t.Cleanup(srv.Close)
		emulators[p] = srv
		upstreamCA := filepath.Join(dir, p+"-upstream.pem")
		if err := os.WriteFile(upstreamCA, srv.CertPEM(), 0o644); err != nil {
			t.Fatal(err)
		}
		providerCfg[p] = map[string]any{"upstream": srv.URL, "shared_key": sharedKeys[p], "ca_file": upstreamCA}
	}

	identity, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatalf("generate age identity: %v", err)
	}
	identityFile := filepath.Join(dir, "identity.txt")
	if err := os.WriteFile(identityFile, []byte(identity.String()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	listen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	adminListen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	forwardListen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	adminToken := randomString(t, 40)
	configFile := filepath.Join(dir, "byokproxy.yaml")
	writeConfig(t, configFile, map[string]any{
		"listen":    listen,
		"log_level": "debug",
		"admin":     map[string]any{"listen": adminListen, "token": adminToken},
		"metrics":   map[string]any{"listen": fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))},
		"forward":   map[string]any{"listen": forwardListen, "ca_cert_file": caCert, "ca_key_file": caKey},
		"auth":      map[string]any{"token_secrets": []string{randomString(t, 48)}},
		"keystore":  map[string]any{"identity_file": identityFile},
		"redis":     map[string]any{"url": rs.URL, "prefix": prefix},
		"audit":     map[string]any{"stdout": true},
		"providers": providerCfg,
	})

	proc := startProxy(t, bin, configFile, filepath.Join(artifacts, "forward-proxy.log"))
	waitReady(t, proc, "http://"+listen)
	waitForwardListening(t, proc, forwardListen)

	adm := &forwardAdmin{t: t, url: "http://" + adminListen, token: adminToken}
	byokMailbox, sharedMailbox := "forward-curl-byok@example.com", "forward-curl-shared@example.com"
	for _, p := range providers {
		adm.call(http.MethodPut, "/mailboxes/"+byokMailbox+"/providers/"+p+"/key", map[string]string{"key": byokKeys[p]})
		adm.call(http.MethodPut, "/mailboxes/"+byokMailbox+"/providers/"+p+"/source", map[string]string{"source": "byok"})
	}
	byokToken := adm.call(http.MethodPost, "/mailboxes/"+byokMailbox+"/token", nil)["token"].(string)
	sharedToken := adm.call(http.MethodPost, "/mailboxes/"+sharedMailbox+"/token", nil)["token"].(string)

	fwd := &forwardCurl{t: t, proxy: "http://" + forwardListen, caCert: caCert}
	t.Run("curl", func(t *testing.T) {
		fwd.t = t
		cases := []struct {
			name     string
			provider string
			token    string
			key      string
			args     []string
			want     string
		}{
			{"openai shared stream", upstreamtest.OpenAI, sharedToken, sharedKeys[upstreamtest.OpenAI],
				[]string{"--no-buffer", "-H", "Content-Type: application/json", "--data",
					`{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hello"}]}`, "/v1/chat/completions"},
				"data: [DONE]"},
			{"anthropic byok", upstreamtest.Anthropic, byokToken, byokKeys[upstreamtest.Anthropic],
				[]string{"-H", "anthropic-version: 2023-06-01", "-H", "Content-Type: application/json", "--data",
					`{"model":"claude-haiku-4-5","max_tokens":32,"messages":[{"role":"user","content":"hello"}]}`, "/v1/messages"},
				upstreamtest.ReplyText(1)},
			{"google byok models", upstreamtest.Google, byokToken, byokKeys[upstreamtest.Google],
				[]string{"/v1beta/models"}, "gemini-2.5-flash"},
		}
		for _, c := range cases {
			emulators[c.provider].Reset()
			args := append([]string{}, c.args...)
			args[len(args)-1] = emulators[c.provider].URL + args[len(args)-1]
			status, body := fwd.run(c.token, args...)
			if status != "200" {
				t.Errorf("%s: status %s, want 200: %s", c.name, status, body)
				continue
			}
			if !strings.Contains(body, c.want) {
				t.Errorf("%s: response lacks %q: %s", c.name, c.want, body)
			}
			reqs := emulators[c.provider].Requests()
			if len(reqs) != 1 {
				t.Errorf("%s: upstream received %d requests, want 1", c.name, len(reqs))
				continue
			}
			if reqs[0].Key != c.key || !reqs[0].Authorized {
				t.Errorf("%s: upstream did not receive the injected key", c.name)
			}
			if reqs[0].Header.Get("Proxy-Authorization") != "" {
				t.Errorf("%s: upstream received Proxy-Authorization", c.name)
			}
			for _, tok := range []string{byokToken, sharedToken} {
				if bytes.Contains([]byte(fmt.Sprint(reqs[0].Header, reqs[0].RawQuery, string(reqs[0].Body))), []byte(tok)) {
					t.Errorf("%s: upstream request contains a mailbox token", c.name)
				}
			}
		}

		other := strings.TrimPrefix(emulators[upstreamtest.OpenAI].URL, "https://")
		if status, body := fwd.run(byokToken, "http://"+other+"/v1/models"); status != "403" {
			t.Errorf("plain http through the proxy: status %s, want 403: %s", status, body)
		}
	})

	control := httptest.NewServer(controlHandler(emulators, rdb, prefix+"audit"))
	t.Cleanup(control.Close)
	env := []string{
		"FORWARD_PROXY_URL=http://" + forwardListen,
		"OPENAI_UPSTREAM_URL=" + emulators[upstreamtest.OpenAI].URL,
		"ADMIN_URL=http://" + adminListen,
		"ADMIN_TOKEN=" + adminToken,
		"CONTROL_URL=" + control.URL,
		"NODE_EXTRA_CA_CERTS=" + caCert,
		"BYOK_KEY_OPENAI=" + byokKeys[upstreamtest.OpenAI],
		"SHARED_KEY_OPENAI=" + sharedKeys[upstreamtest.OpenAI],
	}
	runNode(t, nodeDir, env, filepath.Join(artifacts, "forward-node.log"))

	leaks := findSecrets(byokKeys, map[string]string{
		"Redis":            dumpText(rs.Dump(t, prefix)),
		"the proxy log":    proc.log.String(),
		"the audit stream": auditText(t, rdb, prefix+"audit"),
	})
	for _, leak := range leaks {
		t.Error(leak)
	}
	for name, tok := range map[string]string{"byok": byokToken, "shared": sharedToken} {
		if strings.Contains(proc.log.String(), tok) {
			t.Errorf("the proxy log contains the %s mailbox token", name)
		}
	}
}

// waitForwardListening waits until addr accepts TCP connections.
func waitForwardListening(t *testing.T, p *proxyProcess, addr string) {
	t.Helper()
	deadline := time.Now().Add(startTimeout)
	for {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
			return
		}
		if p.exited() {
			t.Fatalf("byokproxy exited during start-up (%v); output:\n%s", p.cmd.ProcessState, p.log.String())
		}
		if time.Now().After(deadline) {
			t.Fatalf("forward proxy at %s not accepting connections after %v: %v", addr, startTimeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// forwardAdmin calls the admin API and fails the test on any error.
type forwardAdmin struct {
	t     *testing.T
	url   string
	token string
}

func (a *forwardAdmin) call(method, path string, body any) map[string]any {
	a.t.Helper()
	var reader io.Reader
	if body != nil {
		data, _ := json.Marshal(body)
		reader = bytes.NewReader(data)
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, a.url+"/admin/v1"+path, reader)
	if err != nil {
		a.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+a.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		a.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		a.t.Fatalf("%s %s: status %d: %s", method, path, resp.StatusCode, data)
	}
	var out map[string]any
	if err := json.Unmarshal(data, &out); err != nil {
		a.t.Fatalf("%s %s: invalid JSON %q: %v", method, path, data, err)
	}
	return out
}

// forwardCurl runs curl through the forward proxy, trusting its CA only.
type forwardCurl struct {
	t      *testing.T
	proxy  string // http://HOST:PORT
	caCert string
}

// run returns the HTTP status and body of curl ARGS with token as the
// proxy password.
func (f *forwardCurl) run(token string, args ...string) (status, body string) {
	f.t.Helper()
	proxy := strings.Replace(f.proxy, "http://", "http://mbx:"+token+"@", 1)
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout*3)
	defer cancel()
	base := []string{"--silent", "--show-error", "--noproxy", "", "--proxy", proxy, "--cacert", f.caCert,
		"--max-time", "10", "--write-out", "\n%{http_code}"}
	cmd := exec.CommandContext(ctx, "curl", append(base, args...)...)
	// Only the command line picks the proxy.
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if !strings.HasSuffix(strings.ToLower(name), "_proxy") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	out, err := cmd.Output()
	if err != nil {
		f.t.Fatalf("curl %s: %v\n%s", args[len(args)-1], err, out)
	}
	text := string(out)
	i := strings.LastIndex(text, "\n")
	return text[i+1:], text[:i]
}
