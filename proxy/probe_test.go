package proxy_test

import (
	"crypto/rand"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/upstreamtest"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/provider"
	"github.com/byokproxy/byokproxy/proxy"
)

// testKey returns a random key in the provider's format.
func testKey(t *testing.T, prov string) string {
	t.Helper()
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 40)
	if _, err := rand.Read(b); err != nil {
		t.Fatalf("random: %v", err)
	}
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	switch prov {
	case provider.Anthropic:
		return "sk-ant-api03-" + string(b)
	case provider.OpenAI:
		return "sk-proj-" + string(b)
	default:
		return "AIza" + string(b[:35])
	}
}

func probeConfig(prov, upstream string, timeout time.Duration) *config.Config {
	cfg := config.Defaults()
	cfg.Providers[prov].Upstream = upstream
	cfg.Providers[prov].ProbeTimeout = timeout
	return cfg
}

func probe(p *proxy.Prober, prov, key string) (ok bool, status int, msg string) {
	r := httptest.NewRequest(http.MethodPost, "/admin/v1/mailboxes/m/providers/"+prov+"/test", nil)
	res := p.Probe(r, prov, keystore.NewSecret([]byte(key)))
	return res.OK, res.Status, res.Error
}

func TestProbeEmulatedProviders(t *testing.T) {
	rejections := map[string]struct {
		status  int
		message string
	}{
		provider.Anthropic: {http.StatusUnauthorized, "invalid x-api-key"},
		provider.OpenAI:    {http.StatusUnauthorized, "Incorrect API key provided"},
		provider.Google:    {http.StatusBadRequest, "API key not valid"},
	}
	for _, prov := range provider.Names {
		t.Run(prov, func(t *testing.T) {
			good := testKey(t, prov)
			srv := upstreamtest.New(prov, false, good)
			t.Cleanup(srv.Close)
			// The emulator puts the raw key into its error messages too, so
			// the test checks that the prober removes every form of it.
			srv.SetEchoKeyInErrors(true)
			p := proxy.NewProber(probeConfig(prov, srv.URL, 5*time.Second))

			t.Run("valid key", func(t *testing.T) {
				ok, status, msg := probe(p, prov, good)
				if !ok || status != http.StatusOK || msg != "" {
					t.Fatalf("Probe = ok %v, status %d, error %q; want ok, 200, no error", ok, status, msg)
				}
				reqs := srv.Requests()
				if len(reqs) == 0 {
					t.Fatal("the emulator received no request")
				}
				last := reqs[len(reqs)-1]
				if !last.Authorized {
					t.Errorf("the emulator did not find the key where %s reads it", prov)
				}
				if want := provider.Lookup(prov).ProbeModel; last.Model != want {
					t.Errorf("probe model = %q, want %q", last.Model, want)
				}
				if !oneOutputToken(t, prov, last.Body) {
					t.Errorf("probe body does not limit the output to one token: %s", last.Body)
				}
			})

			t.Run("rejected key", func(t *testing.T) {
				bad := testKey(t, prov)
				ok, status, msg := probe(p, prov, bad)
				want := rejections[prov]
				if ok {
					t.Fatal("Probe reported ok for a key the provider rejects")
				}
				if status != want.status {
					t.Errorf("status = %d, want %d", status, want.status)
				}
				if !strings.Contains(msg, want.message) {
					t.Errorf("error = %q, want the provider's message containing %q", msg, want.message)
				}
				if strings.Contains(msg, bad) {
					t.Errorf("error contains the key: %q", msg)
				}
				if strings.Contains(msg, bad[len(bad)-4:]) {
					t.Errorf("error contains the key's last four characters: %q", msg)
				}
				if masked := upstreamtest.MaskKey(bad); strings.Contains(msg, masked) {
					t.Errorf("error contains the masked key %q: %q", masked, msg)
				}
			})
		})
	}
}

// oneOutputToken reports whether a probe body requests one output token in
// the provider's own field.
func oneOutputToken(t *testing.T, prov string, body []byte) bool {
	t.Helper()
	var b map[string]any
	if err := json.Unmarshal(body, &b); err != nil {
		t.Fatalf("probe body is not JSON: %v", err)
	}
	switch prov {
	case provider.Anthropic:
		return b["max_tokens"] == 1.0
	case provider.OpenAI:
		return b["max_completion_tokens"] == 1.0
	default:
		gen, _ := b["generationConfig"].(map[string]any)
		return gen["maxOutputTokens"] == 1.0
	}
}

func TestProbeSlowUpstream(t *testing.T) {
	release := make(chan struct{})
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-release:
		case <-time.After(10 * time.Second):
		}
	}))
	t.Cleanup(slow.Close)
	t.Cleanup(func() { close(release) })

	for _, prov := range provider.Names {
		t.Run(prov, func(t *testing.T) {
			p := proxy.NewProber(probeConfig(prov, slow.URL, 200*time.Millisecond))
			start := time.Now()
			ok, status, msg := probe(p, prov, testKey(t, prov))
			if ok || status != 0 {
				t.Fatalf("Probe = ok %v, status %d; want not ok, status 0", ok, status)
			}
			if !strings.Contains(msg, "did not respond within 200ms") {
				t.Errorf("error = %q, want a timeout naming 200ms", msg)
			}
			if elapsed := time.Since(start); elapsed > 5*time.Second {
				t.Errorf("Probe took %s with a 200ms timeout", elapsed)
			}
		})
	}
}

func TestProbeConnectionRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	addr := ln.Addr().String()
	ln.Close()

	for _, prov := range provider.Names {
		t.Run(prov, func(t *testing.T) {
			key := testKey(t, prov)
			p := proxy.NewProber(probeConfig(prov, "http://"+addr, 2*time.Second))
			ok, status, msg := probe(p, prov, key)
			if ok || status != 0 {
				t.Fatalf("Probe = ok %v, status %d; want not ok, status 0", ok, status)
			}
			if !strings.Contains(msg, "could not connect") {
				t.Errorf("error = %q, want it to say it could not connect", msg)
			}
			if strings.Contains(msg, key) {
				t.Errorf("error contains the key: %q", msg)
			}
		})
	}
}
