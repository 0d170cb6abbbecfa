package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"filippo.io/age"

	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/internal/upstreamtest"
)

// TestShutdownFinishesStreams sends SIGTERM while a slow stream is in
// flight: the stream must finish intact, the process exit 0, and the
// stream's audit event reach Redis.
func TestShutdownFinishesStreams(t *testing.T) {
	root := moduleRoot(t)
	bin := buildProxy(t, root)
	rs := redistest.Start(t)
	prefix := rs.Prefix(t)
	rdb := rs.Client(t)

	sharedKey := newKey(t, upstreamtest.OpenAI)
	up := upstreamtest.NewOpenAI(sharedKey)
	t.Cleanup(up.Close)
	up.SetEventDelay(250 * time.Millisecond)

	dir := t.TempDir()
	identity, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	identityFile := filepath.Join(dir, "identity.txt")
	os.WriteFile(identityFile, []byte(identity.String()+"\n"), 0o600)
	listen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	adminListen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	metricsListen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	adminToken := randomString(t, 40)
	configFile := filepath.Join(dir, "byokproxy.yaml")
	writeConfig(t, configFile, map[string]any{
		"listen":         listen,
		"shutdown_grace": "20s",
		"admin":          map[string]any{"listen": adminListen, "token": adminToken},
		"metrics":        map[string]any{"listen": metricsListen},
		"auth":           map[string]any{"token_secrets": []string{randomString(t, 48)}},
		"keystore":       map[string]any{"identity_file": identityFile},
		"redis":          map[string]any{"url": rs.URL, "prefix": prefix},
		"providers":      map[string]any{"openai": map[string]any{"upstream": up.URL, "shared_key": sharedKey}},
	})
	proc := startProxy(t, bin, configFile, filepath.Join(t.TempDir(), "proxy.log"))
	waitReady(t, proc, "http://"+listen)

	req, _ := http.NewRequest("POST", "http://"+adminListen+"/admin/v1/mailboxes/slow@example.com/token", nil)
	req.Header.Set("Authorization", "Bearer "+adminToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var tok struct{ Token string }
	json.NewDecoder(resp.Body).Decode(&tok)
	resp.Body.Close()

	body := `{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"slow please"}]}`
	req, _ = http.NewRequest("POST", "http://"+listen+"/openai/v1/chat/completions", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+tok.Token)
	req.Header.Set("Content-Type", "application/json")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	reader := bufio.NewReader(resp.Body)
	first, err := reader.ReadString('\n')
	if err != nil || !strings.HasPrefix(first, "data: ") {
		t.Fatalf("first stream line = %q, %v", first, err)
	}

	if err := proc.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// The metrics listener keeps serving while the stream drains, so the
	// in-flight gauge can be watched falling.
	time.Sleep(200 * time.Millisecond)
	metricsResp, err := http.Get("http://" + metricsListen + "/metrics")
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

	select {
	case <-proc.done:
	case <-time.After(20 * time.Second):
		t.Fatal("byokproxy did not exit within 20s of SIGTERM")
	}
	if code := proc.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("exit status %d, want 0; output:\n%s", code, proc.log.String())
	}
	text := auditText(t, rdb, prefix+"audit")
	if !strings.Contains(text, `"mailbox":"slow@example.com"`) || !strings.Contains(text, `"stream":true`) {
		t.Errorf("the stream's audit event did not land before exit; stream holds:\n%s", text)
	}
}
