package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"filippo.io/age"
	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/internal/upstreamtest"
)

// drainingProxy is a byokproxy process in front of an OpenAI emulator whose
// streams are slow, for the shutdown tests.
type drainingProxy struct {
	proc          *proxyProcess
	listen        string
	metricsListen string
	forwardListen string
	redis         *redistest.Server
	rdb           *redis.Client
	prefix        string
	token         string
}

// startDrainingProxy starts byokproxy with the given shutdown grace period
// and a forward listener, in front of an emulator that waits eventDelay
// before each stream event after the first, and issues a token for the
// mailbox slow@example.com. It starts a redis-server of its own, which a
// test may pause.
func startDrainingProxy(t *testing.T, grace string, eventDelay time.Duration) *drainingProxy {
	t.Helper()
	root := moduleRoot(t)
	bin := buildProxy(t, root)
	rs := redistest.StartOwn(t)
	d := &drainingProxy{redis: rs, prefix: rs.Prefix(t), rdb: rs.Client(t)}

	sharedKey := newKey(t, upstreamtest.OpenAI)
	up := upstreamtest.NewOpenAI(sharedKey)
	t.Cleanup(up.Close)
	up.SetEventDelay(eventDelay)

	dir := t.TempDir()
	identity, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	identityFile := filepath.Join(dir, "identity.txt")
	os.WriteFile(identityFile, []byte(identity.String()+"\n"), 0o600)
	d.listen = fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	adminListen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	d.metricsListen = fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	d.forwardListen = fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	caCert, caKey := filepath.Join(dir, "forward-ca.pem"), filepath.Join(dir, "forward-ca-key.pem")
	if out, err := exec.Command(bin, "ca", "new", "--cert", caCert, "--key", caKey).CombinedOutput(); err != nil {
		t.Fatalf("byokproxy ca new: %v\n%s", err, out)
	}
	adminToken := randomString(t, 40)
	configFile := filepath.Join(dir, "byokproxy.yaml")
	writeConfig(t, configFile, map[string]any{
		"listen":         d.listen,
		"shutdown_grace": grace,
		"admin":          map[string]any{"listen": adminListen, "token": adminToken},
		"metrics":        map[string]any{"listen": d.metricsListen},
		"forward":        map[string]any{"listen": d.forwardListen, "ca_cert_file": caCert, "ca_key_file": caKey},
		"auth":           map[string]any{"token_secrets": []string{randomString(t, 48)}},
		"keystore":       map[string]any{"identity_file": identityFile},
		"redis":          map[string]any{"url": rs.URL, "prefix": d.prefix},
		"providers":      map[string]any{"openai": map[string]any{"upstream": up.URL, "shared_key": sharedKey}},
	})
	d.proc = startProxy(t, bin, configFile, filepath.Join(t.TempDir(), "proxy.log"))
	waitReady(t, d.proc, "http://"+d.listen)

	req, _ := http.NewRequest("POST", "http://"+adminListen+"/admin/v1/mailboxes/slow@example.com/token", nil)
	req.Header.Set("Authorization", "Bearer "+adminToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var tok struct{ Token string }
	json.NewDecoder(resp.Body).Decode(&tok)
	resp.Body.Close()
	d.token = tok.Token
	return d
}

// startStream starts a stream and reads its first line, which it returns
// with a reader of the rest.
func (d *drainingProxy) startStream(t *testing.T) (string, *bufio.Reader) {
	t.Helper()
	body := `{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"slow please"}]}`
	req, _ := http.NewRequest("POST", "http://"+d.listen+"/openai/v1/chat/completions", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+d.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	reader := bufio.NewReader(resp.Body)
	first, err := reader.ReadString('\n')
	if err != nil || !strings.HasPrefix(first, "data: ") {
		t.Fatalf("first stream line = %q, %v", first, err)
	}
	return first, reader
}

// signal sends sig to the proxy process.
func (d *drainingProxy) signal(t *testing.T, sig os.Signal) {
	t.Helper()
	if err := d.proc.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

// waitExit waits up to limit for the process to exit 0.
func (d *drainingProxy) waitExit(t *testing.T, limit time.Duration) {
	t.Helper()
	select {
	case <-d.proc.done:
	case <-time.After(limit):
		t.Fatalf("byokproxy did not exit within %v of the signal", limit)
	}
	if code := d.proc.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("exit status %d, want 0; output:\n%s", code, d.proc.log.String())
	}
}

// TestShutdownFinishesStreams sends SIGTERM while a slow stream is in
// flight: the stream must finish intact, the process exit 0, and the
// stream's audit event reach Redis.
func TestShutdownFinishesStreams(t *testing.T) {
	d := startDrainingProxy(t, "20s", 250*time.Millisecond)
	first, reader := d.startStream(t)

	d.signal(t, syscall.SIGTERM)
	// The metrics listener keeps serving while the stream drains, so the
	// in-flight gauge can be watched falling.
	time.Sleep(200 * time.Millisecond)
	metricsResp, err := http.Get("http://" + d.metricsListen + "/metrics")
	if err != nil {
		t.Errorf("metrics during the drain: %v", err)
	} else {
		metricsResp.Body.Close()
		if metricsResp.StatusCode != 200 {
			t.Errorf("metrics during the drain: status %d", metricsResp.StatusCode)
		}
	}
	rest, err := io.ReadAll(reader)
	if err != nil {
		t.Fatalf("stream cut during shutdown: %v", err)
	}
	stream := first + string(rest)
	for _, delta := range upstreamtest.ReplyDeltas {
		if !strings.Contains(stream, fmt.Sprintf("%q", delta)) {
			t.Errorf("stream lacks delta %q", delta)
		}
	}
	if !strings.Contains(stream, "data: [DONE]") {
		t.Errorf("stream lacks [DONE]:\n%s", stream)
	}

	d.waitExit(t, 20*time.Second)
	text := auditText(t, d.rdb, d.prefix+"audit")
	if !strings.Contains(text, `"mailbox":"slow@example.com"`) || !strings.Contains(text, `"stream":true`) {
		t.Errorf("the stream's audit event did not land before exit; stream holds:\n%s", text)
	}
}

// TestShutdownStopsForwardListener sends SIGTERM while a stream drains on
// the proxy listener. The forward listener must stop accepting at once,
// and a CONNECT on a client connection opened before the signal must get
// 503, so that no new stream starts that the grace period would cut.
func TestShutdownStopsForwardListener(t *testing.T) {
	d := startDrainingProxy(t, "20s", time.Second)
	_, reader := d.startStream(t)
	early, err := net.Dial("tcp", d.forwardListen)
	if err != nil {
		t.Fatalf("dial the forward listener: %v", err)
	}
	defer early.Close()
	// A connection still in the listen backlog is reset when the listener
	// closes. A first request, which the forward proxy rejects, proves the
	// server accepted this one.
	early.SetDeadline(time.Now().Add(5 * time.Second))
	earlyReader := bufio.NewReader(early)
	fmt.Fprintf(early, "GET http://api.openai.com/ HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
	first, err := http.ReadResponse(earlyReader, nil)
	if err != nil {
		t.Fatalf("plain request before the signal: %v", err)
	}
	io.Copy(io.Discard, first.Body)
	first.Body.Close()
	if first.StatusCode != http.StatusForbidden {
		t.Fatalf("plain request before the signal: status %d, want 403", first.StatusCode)
	}

	d.signal(t, syscall.SIGTERM)
	closed := false
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		conn, err := net.DialTimeout("tcp", d.forwardListen, time.Second)
		if err != nil {
			closed = true
			break
		}
		conn.Close()
	}
	if !closed {
		t.Error("the forward listener still accepts connections 3 s after SIGTERM, while a stream drains")
	}

	early.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(early, "CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\nProxy-Authorization: Bearer %s\r\n\r\n", d.token)
	resp, err := http.ReadResponse(earlyReader, nil)
	if err != nil {
		t.Errorf("CONNECT on a connection opened before the signal: %v", err)
	} else {
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable {
			t.Errorf("CONNECT on a connection opened before the signal: status %d, want 503", resp.StatusCode)
		}
	}

	select {
	case <-d.proc.done:
		t.Error("byokproxy exited before the stream ended")
	default:
	}
	if _, err := io.ReadAll(reader); err != nil {
		t.Errorf("stream cut during shutdown: %v", err)
	}
	d.waitExit(t, 20*time.Second)
}

// TestSecondSignalEndsGracePeriod sends SIGTERM and then SIGINT while a
// stream that would outlast the grace period is in flight. The second
// signal must cut the stream at once, and the process still record it and
// exit 0.
func TestSecondSignalEndsGracePeriod(t *testing.T) {
	d := startDrainingProxy(t, "60s", 5*time.Second)
	_, reader := d.startStream(t)

	d.signal(t, syscall.SIGTERM)
	time.Sleep(300 * time.Millisecond)
	start := time.Now()
	d.signal(t, syscall.SIGINT)
	d.waitExit(t, 15*time.Second)
	t.Logf("exited %v after the second signal", time.Since(start))

	if _, err := io.ReadAll(reader); err == nil {
		t.Error("the stream ended as if it were complete after the second signal")
	}
	text := auditText(t, d.rdb, d.prefix+"audit")
	if !strings.Contains(text, `"mailbox":"slow@example.com"`) || !strings.Contains(text, "stream cut off at shutdown") {
		t.Errorf("no audit event of the cut stream; the audit stream holds:\n%s", text)
	}
	if !strings.Contains(d.proc.log.String(), "another signal, ending the grace period now") {
		t.Errorf("the second signal was not logged; output:\n%s", d.proc.log.String())
	}
}

// TestSignalDuringAuditDelivery sends a second signal while the audit
// events wait for a Redis that does not respond. The signal must not cut
// the delivery short: once Redis responds, the events land and the process
// exits 0.
func TestSignalDuringAuditDelivery(t *testing.T) {
	d := startDrainingProxy(t, "20s", 0)
	// The first stream also puts the mailbox's record in the proxy's cache,
	// so the second needs no Redis read.
	for i := range 2 {
		if i == 1 {
			d.redis.Pause()
			t.Cleanup(d.redis.Resume)
		}
		_, reader := d.startStream(t)
		if _, err := io.ReadAll(reader); err != nil {
			t.Fatalf("stream %d: %v", i+1, err)
		}
	}

	d.signal(t, syscall.SIGTERM)
	time.Sleep(500 * time.Millisecond)
	d.signal(t, syscall.SIGTERM)
	time.Sleep(300 * time.Millisecond)
	select {
	case <-d.proc.done:
		t.Fatalf("byokproxy exited while its audit events waited for Redis; output:\n%s", d.proc.log.String())
	default:
	}
	output := d.proc.log.String()
	if !strings.Contains(output, "signal during the audit delivery") {
		t.Errorf("the signal during the delivery was not logged; output:\n%s", output)
	}
	if strings.Contains(output, "ending the grace period now") {
		t.Errorf("a signal after the grace period was logged as ending it; output:\n%s", output)
	}

	d.redis.Resume()
	d.waitExit(t, 15*time.Second)
	streams := 0
	for _, line := range strings.Split(auditText(t, d.rdb, d.prefix+"audit"), "\n") {
		if strings.Contains(line, `"mailbox":"slow@example.com"`) && strings.Contains(line, `"stream":true`) {
			streams++
		}
	}
	if streams < 2 {
		t.Errorf("%d stream events of the mailbox in Redis, want both streams'", streams)
	}
}
