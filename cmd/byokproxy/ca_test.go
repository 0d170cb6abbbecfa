package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/config"
)

// runCA runs "byokproxy ca ARGS" in-process and returns its exit code and
// output.
func runCA(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	cio := cliIO{stdin: strings.NewReader(""), stdout: &out, stderr: &errOut, getenv: func(string) string { return "" }}
	code = caCommand(args, cio)
	return code, out.String(), errOut.String()
}

func TestCANewWritesCA(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	code, out, stderr := runCA(t, "new", "--cert", certFile, "--key", keyFile)
	if code != exitOK {
		t.Fatalf("ca new exited %d: %s", code, stderr)
	}
	if !strings.Contains(out, "forward.ca_cert_file: "+certFile) {
		t.Errorf("output does not name the config key and file:\n%s", out)
	}

	info, err := os.Stat(keyFile)
	if err != nil {
		t.Fatalf("stat key: %v", err)
	}
	if mode := info.Mode().Perm(); mode != 0o600 {
		t.Errorf("key file mode = %o, want 600", mode)
	}

	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatalf("load the written pair: %v", err)
	}
	ca := pair.Leaf
	if !ca.IsCA || !ca.BasicConstraintsValid {
		t.Errorf("IsCA = %v, BasicConstraintsValid = %v, want both true", ca.IsCA, ca.BasicConstraintsValid)
	}
	if ca.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Errorf("key usage %b lacks certificate signing", ca.KeyUsage)
	}
	if ca.MaxPathLen != 0 || !ca.MaxPathLenZero {
		t.Errorf("MaxPathLen = %d (zero flag %v), want 0 so the CA signs end-entity certificates only", ca.MaxPathLen, ca.MaxPathLenZero)
	}
	pub, ok := ca.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Errorf("public key is %T, want ECDSA P-256", ca.PublicKey)
	}
	wantEnd := time.Now().Add(caValidity)
	if d := ca.NotAfter.Sub(wantEnd); d < -time.Hour || d > time.Hour {
		t.Errorf("NotAfter = %v, want about %v", ca.NotAfter, wantEnd)
	}
	if time.Now().Before(ca.NotBefore) {
		t.Errorf("NotBefore = %v is in the future", ca.NotBefore)
	}

	// The CA must be usable for what the forward proxy does with it: sign a
	// host certificate that verifies against it.
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "api.example"},
		DNSNames: []string{"api.example"}, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &leafKey.PublicKey, pair.PrivateKey)
	if err != nil {
		t.Fatalf("sign a host certificate with the CA: %v", err)
	}
	leaf, _ := x509.ParseCertificate(der)
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: "api.example"}); err != nil {
		t.Errorf("host certificate does not verify against the CA: %v", err)
	}
}

func TestCANewDifferentEachTime(t *testing.T) {
	dir := t.TempDir()
	var subjects []string
	for i := range 2 {
		certFile := filepath.Join(dir, "ca"+string(rune('a'+i))+".pem")
		if code, _, stderr := runCA(t, "new", "--cert", certFile, "--key", certFile+".key"); code != exitOK {
			t.Fatalf("ca new exited %d: %s", code, stderr)
		}
		pair, err := tls.LoadX509KeyPair(certFile, certFile+".key")
		if err != nil {
			t.Fatal(err)
		}
		subjects = append(subjects, pair.Leaf.Subject.CommonName)
	}
	if subjects[0] == subjects[1] {
		t.Errorf("two CAs share the common name %q; clients could not tell them apart", subjects[0])
	}
}

func TestCANewKeepsExistingFiles(t *testing.T) {
	for _, existing := range []string{"cert", "key"} {
		t.Run(existing, func(t *testing.T) {
			dir := t.TempDir()
			files := map[string]string{"cert": filepath.Join(dir, "ca.pem"), "key": filepath.Join(dir, "ca-key.pem")}
			old := []byte("existing content\n")
			if err := os.WriteFile(files[existing], old, 0o600); err != nil {
				t.Fatal(err)
			}
			code, _, stderr := runCA(t, "new", "--cert", files["cert"], "--key", files["key"])
			if code != exitFailure || !strings.Contains(stderr, "already exists") {
				t.Fatalf("exit %d, stderr %q; want %d and a message saying the file already exists", code, stderr, exitFailure)
			}
			got, _ := os.ReadFile(files[existing])
			if !bytes.Equal(got, old) {
				t.Errorf("existing %s file was changed", existing)
			}
			for name, path := range files {
				if name == existing {
					continue
				}
				if _, err := os.Stat(path); err == nil {
					t.Errorf("%s file was written although the command failed", name)
				}
			}
		})
	}
}

func TestCANewRejectsBadArguments(t *testing.T) {
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem")
	cases := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no flags", nil, exitUsage, "--cert and --key are both required"},
		{"no key", []string{"--cert", cert}, exitUsage, "--cert and --key are both required"},
		{"same file", []string{"--cert", cert, "--key", cert}, exitUsage, "must be different files"},
		{"extra argument", []string{"--cert", cert, "--key", key, "extra"}, exitUsage, `unexpected argument "extra"`},
		{"unknown flag", []string{"--cert", cert, "--key", key, "--days", "3"}, exitUsage, "unknown flag: --days"},
		{"missing directory", []string{"--cert", cert, "--key", filepath.Join(dir, "nope", "k.pem")}, exitFailure, "no such file or directory"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, _, stderr := runCA(t, append([]string{"new"}, c.args...)...)
			if code != c.code {
				t.Errorf("exit code = %d, want %d", code, c.code)
			}
			if !strings.Contains(stderr, c.want) {
				t.Errorf("stderr = %q, want it to contain %q", stderr, c.want)
			}
			if _, err := os.Stat(cert); err == nil {
				t.Errorf("certificate file written although the command failed")
			}
		})
	}
}

func TestCACommandUsage(t *testing.T) {
	cases := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"unknown command", []string{"renew"}, exitUsage, `unknown ca command "renew"`},
		{"no command", nil, exitUsage, "byokproxy ca new --cert FILE --key FILE"},
		{"help", []string{"--help"}, exitOK, "byokproxy ca new --cert FILE --key FILE"},
		{"new help", []string{"new", "--help"}, exitOK, "--cert file"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, _, stderr := runCA(t, c.args...)
			if code != c.code {
				t.Errorf("exit code = %d, want %d", code, c.code)
			}
			if !strings.Contains(stderr, c.want) {
				t.Errorf("stderr = %q, want it to contain %q", stderr, c.want)
			}
		})
	}
}

func TestForwardCAFromFiles(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	if code, _, stderr := runCA(t, "new", "--cert", certFile, "--key", keyFile); code != exitOK {
		t.Fatalf("ca new exited %d: %s", code, stderr)
	}
	cfg := config.Defaults()
	cfg.Forward.CACertFile, cfg.Forward.CAKeyFile = certFile, keyFile
	ca, path, err := forwardCA(cfg)
	if err != nil {
		t.Fatalf("forwardCA: %v", err)
	}
	if path != certFile {
		t.Errorf("certificate path = %q, want %q", path, certFile)
	}
	if ca.Leaf == nil || !ca.Leaf.IsCA {
		t.Errorf("loaded certificate is not the CA")
	}
}

func TestForwardCADevGenerates(t *testing.T) {
	cfg := config.Defaults()
	cfg.Dev = true
	ca, path, err := forwardCA(cfg)
	if err != nil {
		t.Fatalf("forwardCA: %v", err)
	}
	t.Cleanup(func() { os.Remove(path) })
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read the written certificate: %v", err)
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" {
		t.Fatalf("%s does not hold a PEM certificate", path)
	}
	if !bytes.Equal(block.Bytes, ca.Certificate[0]) {
		t.Errorf("written certificate differs from the CA in use")
	}
	if bytes.Contains(data, []byte("PRIVATE KEY")) {
		t.Errorf("the dev CA key was written to %s", path)
	}
}

func TestForwardCAMissingFiles(t *testing.T) {
	cfg := config.Defaults()
	cfg.Forward.CACertFile = filepath.Join(t.TempDir(), "missing.pem")
	cfg.Forward.CAKeyFile = cfg.Forward.CACertFile + ".key"
	if _, _, err := forwardCA(cfg); err == nil || !strings.Contains(err.Error(), "forward.ca_cert_file") {
		t.Fatalf("error = %v, want one naming forward.ca_cert_file", err)
	}
}
