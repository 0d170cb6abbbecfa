package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
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

// TestRedisOverTLS runs the binary against a redis-server that accepts only
// TLS connections and a password, with the Redis CA trusted through
// SSL_CERT_FILE, and proxies a BYOK request through it.
func TestRedisOverTLS(t *testing.T) {
	dir := t.TempDir()
	caFile, certFile, keyFile := writeTLSFiles(t, dir)
	port := redistest.FreePort(t)
	password := randomString(t, 32)
	redis := exec.Command("redis-server",
		"--port", "0", "--tls-port", fmt.Sprint(port), "--bind", "127.0.0.1",
		"--tls-cert-file", certFile, "--tls-key-file", keyFile, "--tls-ca-cert-file", caFile,
		"--tls-auth-clients", "no", "--requirepass", password,
		"--save", "", "--appendonly", "no", "--dir", dir)
	if err := redis.Start(); err != nil {
		t.Fatalf("start redis-server with TLS: %v", err)
	}
	t.Cleanup(func() { redis.Process.Kill(); redis.Wait() })
	waitPort(t, fmt.Sprintf("127.0.0.1:%d", port))

	passwordFile := filepath.Join(dir, "redis-password")
	os.WriteFile(passwordFile, []byte(password+"\n"), 0o600)
	identity, _ := age.GenerateX25519Identity()
	identityFile := filepath.Join(dir, "identity.txt")
	os.WriteFile(identityFile, []byte(identity.String()+"\n"), 0o600)
	byokKey := newKey(t, upstreamtest.OpenAI)
	up := upstreamtest.NewOpenAI(byokKey)
	t.Cleanup(up.Close)

	listen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	adminListen := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	adminToken := randomString(t, 40)
	configFile := filepath.Join(dir, "byokproxy.yaml")
	writeConfig(t, configFile, map[string]any{
		"listen":    listen,
		"admin":     map[string]any{"listen": adminListen, "token": adminToken},
		"metrics":   map[string]any{"listen": fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))},
		"auth":      map[string]any{"token_secrets": []string{randomString(t, 48)}},
		"keystore":  map[string]any{"identity_file": identityFile},
		"redis":     map[string]any{"url": fmt.Sprintf("rediss://127.0.0.1:%d/0", port), "password_file": passwordFile, "prefix": "tlstest:"},
		"providers": map[string]any{"openai": map[string]any{"upstream": up.URL}},
	})
	// Go reads SSL_CERT_FILE as the system trust store on Linux, so the
	// proxy trusts the test CA without a config key of its own.
	t.Setenv("SSL_CERT_FILE", caFile)
	bin := buildProxy(t, moduleRoot(t))
	proc := startProxy(t, bin, configFile, filepath.Join(dir, "proxy.log"))
	waitReady(t, proc, "http://"+listen)

	adminCall := func(method, path, body string) []byte {
		req, _ := http.NewRequest(method, "http://"+adminListen+"/admin/v1"+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+adminToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out json.RawMessage
		json.NewDecoder(resp.Body).Decode(&out)
		if resp.StatusCode != 200 {
			t.Fatalf("%s %s: %d %s", method, path, resp.StatusCode, out)
		}
		return out
	}
	adminCall("PUT", "/mailboxes/tls/providers/openai/key", `{"key":"`+byokKey+`"}`)
	adminCall("PUT", "/mailboxes/tls/providers/openai/source", `{"source":"byok"}`)
	var tok struct{ Token string }
	json.Unmarshal(adminCall("POST", "/mailboxes/tls/token", ""), &tok)

	req, _ := http.NewRequest("POST", "http://"+listen+"/openai/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"over tls"}]}`))
	req.Header.Set("Authorization", "Bearer "+tok.Token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("proxied request with Redis over TLS: status %d; log:\n%s", resp.StatusCode, proc.log.String())
	}
	if got := up.Requests()[0].Key; got != byokKey {
		t.Error("upstream did not receive the BYOK key read from Redis over TLS")
	}
}

func waitPort(t *testing.T, addr string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("nothing listening on %s after 10s", addr)
}

// writeTLSFiles writes a CA and a server certificate for 127.0.0.1 signed by
// it, and returns the paths of the CA certificate, the server certificate
// and the server key.
func writeTLSFiles(t *testing.T, dir string) (caFile, certFile, keyFile string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "redis test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	srvKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, ca, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(srvKey)
	caFile = filepath.Join(dir, "ca.pem")
	certFile = filepath.Join(dir, "redis.pem")
	keyFile = filepath.Join(dir, "redis-key.pem")
	os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o600)
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srvDER}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600)
	return caFile, certFile, keyFile
}
