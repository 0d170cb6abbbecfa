package config

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"filippo.io/age"
	"github.com/spf13/pflag"
)

const (
	testAdminToken = "admin-token-0123456789abcdef"
	testSecretA    = "secret-a-0123456789abcdef"
	testSecretB    = "secret-b-0123456789abcdef"
)

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// writeIdentityFile writes a fresh X25519 identity in the format of age-keygen.
func writeIdentityFile(t *testing.T) string {
	t.Helper()
	id, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	return writeFile(t, "identity.txt", "# public key: "+id.Recipient().String()+"\n"+id.String()+"\n")
}

// writeKeyPair writes a self-signed ECDSA certificate and its key as PEM
// files. With isCA set the certificate may sign other certificates.
func writeKeyPair(t *testing.T, isCA bool) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}

	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "byokproxy test"},
		DNSNames:              []string{"localhost"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	if isCA {
		tmpl.IsCA = true
		tmpl.KeyUsage |= x509.KeyUsageCertSign
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	certFile = filepath.Join(dir, "cert.pem")
	keyFile = filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

// validConfig returns defaults plus the settings required outside --dev.
func validConfig(t *testing.T) *Config {
	t.Helper()
	c := Defaults()
	c.Admin.Token = testAdminToken
	c.Auth.TokenSecrets = []string{testSecretA}
	c.Keystore.IdentityFile = writeIdentityFile(t)
	return c
}

// requiredEnv sets the settings required outside --dev.
func requiredEnv(t *testing.T) []string {
	t.Helper()
	return []string{
		"BYOKPROXY_ADMIN_TOKEN=" + testAdminToken,
		"BYOKPROXY_AUTH_TOKEN_SECRETS=" + testSecretA,
		"BYOKPROXY_KEYSTORE_IDENTITY_FILE=" + writeIdentityFile(t),
	}
}

// newServeFlags returns the serve flags parsed from args.
func newServeFlags(t *testing.T, args ...string) *pflag.FlagSet {
	t.Helper()
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatalf("parse flags %q: %v", args, err)
	}
	return fs
}

// load runs Load with the serve flags parsed from args and, when yamlText is
// not empty, a config file holding it.
func load(t *testing.T, yamlText string, env []string, args ...string) (*Config, error) {
	t.Helper()
	if yamlText != "" {
		args = append([]string{"--config", writeFile(t, "config.yaml", yamlText)}, args...)
	}
	return Load(newServeFlags(t, args...), env)
}

func mustLoad(t *testing.T, yamlText string, env []string, args ...string) *Config {
	t.Helper()
	c, err := load(t, yamlText, env, args...)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return c
}

// problemLines returns the lines of a *Error, failing the test for any other
// error.
func problemLines(t *testing.T, err error) []string {
	t.Helper()
	if err == nil {
		return nil
	}
	var cerr *Error
	if !errors.As(err, &cerr) {
		t.Fatalf("error %T %q is not a *config.Error", err, err)
	}
	return strings.Split(cerr.Error(), "\n")
}

func wantLine(t *testing.T, err error, want string) {
	t.Helper()
	lines := problemLines(t, err)
	if !slices.Contains(lines, want) {
		t.Errorf("error lacks line\n  %s\ngot:\n  %s", want, strings.Join(lines, "\n  "))
	}
}

func TestDefaults(t *testing.T) {
	c := Defaults()
	tests := []struct {
		key       string
		got, want any
	}{
		{"listen", c.Listen, "127.0.0.1:8080"},
		{"admin.listen", c.Admin.Listen, "127.0.0.1:8081"},
		{"metrics.listen", c.Metrics.Listen, "127.0.0.1:9090"},
		{"forward.listen", c.Forward.Listen, ""},
		{"shutdown_grace", c.ShutdownGrace, 30 * time.Second},
		{"dev", c.Dev, false},
		{"log_level", c.LogLevel, "info"},
		{"log_format", c.LogFormat, "json"},
		{"redis.url", c.Redis.URL, "redis://127.0.0.1:6379/0"},
		{"redis.timeout", c.Redis.Timeout, time.Second},
		{"redis.cache_ttl", c.Redis.CacheTTL, time.Second},
		{"redis.prefix", c.Redis.Prefix, "byok:"},
		{"limits.max_body_bytes", c.Limits.MaxBodyBytes, int64(64 << 20)},
		{"limits.max_header_bytes", c.Limits.MaxHeaderBytes, 1 << 20},
		{"upstream.timeout", c.Upstream.Timeout, 10 * time.Minute},
		{"metering.monthly_token_limit", c.Metering.MonthlyTokenLimit, int64(0)},
		{"metering.retention_months", c.Metering.RetentionMonths, 13},
		{"metering.response_ttl", c.Metering.ResponseTTL, 720 * time.Hour},
		{"audit.stream_maxlen", c.Audit.StreamMaxLen, int64(1_000_000)},
		{"audit.stdout", c.Audit.Stdout, false},
		{"audit.queue_size", c.Audit.QueueSize, 10_000},
		{"admin.ui", c.Admin.UI, false},
		{"auth.trust_mailbox_header", c.Auth.TrustMailboxHeader, false},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s = %v, want %v", tt.key, tt.got, tt.want)
		}
	}

	providers := []struct {
		name, upstream, probeModel string
	}{
		{"anthropic", "https://api.anthropic.com", "claude-haiku-4-5"},
		{"openai", "https://api.openai.com", "gpt-4o-mini"},
		{"google", "https://generativelanguage.googleapis.com", "gemini-2.5-flash"},
	}
	if len(c.Providers) != len(providers) {
		t.Errorf("Defaults has %d providers, want %d", len(c.Providers), len(providers))
	}
	for _, want := range providers {
		p := c.Provider(want.name)
		if p == nil {
			t.Errorf("providers.%s missing", want.name)
			continue
		}
		if p.Upstream != want.upstream {
			t.Errorf("providers.%s.upstream = %q, want %q", want.name, p.Upstream, want.upstream)
		}
		if p.ProbeModel != want.probeModel {
			t.Errorf("providers.%s.probe_model = %q, want %q", want.name, p.ProbeModel, want.probeModel)
		}
		if p.ProbeTimeout != 10*time.Second {
			t.Errorf("providers.%s.probe_timeout = %v, want 10s", want.name, p.ProbeTimeout)
		}
	}
}

func TestDefaultsAreFresh(t *testing.T) {
	a, b := Defaults(), Defaults()
	a.Providers["openai"].Upstream = "https://changed.example"
	if b.Providers["openai"].Upstream == "https://changed.example" {
		t.Error("two Defaults calls share a provider")
	}
}

func TestProviderUnknownIsNil(t *testing.T) {
	if p := Defaults().Provider("opena"); p != nil {
		t.Errorf("Provider(opena) = %+v, want nil", p)
	}
}

func TestSlogLevel(t *testing.T) {
	tests := map[string]slog.Level{
		"debug": slog.LevelDebug,
		"info":  slog.LevelInfo,
		"warn":  slog.LevelWarn,
		"error": slog.LevelError,
		"":      slog.LevelInfo,
	}
	for level, want := range tests {
		c := &Config{LogLevel: level}
		if got := c.SlogLevel(); got != want {
			t.Errorf("SlogLevel(%q) = %v, want %v", level, got, want)
		}
	}
}

func TestRegisterFlagsDefaults(t *testing.T) {
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	RegisterFlags(fs)
	d := Defaults()
	want := map[string]string{
		"config":         "",
		"dev":            "false",
		"listen":         d.Listen,
		"admin-listen":   d.Admin.Listen,
		"metrics-listen": d.Metrics.Listen,
		"forward-listen": d.Forward.Listen,
		"redis-url":      d.Redis.URL,
		"log-level":      d.LogLevel,
		"log-format":     d.LogFormat,
	}
	for name, def := range want {
		f := fs.Lookup(name)
		if f == nil {
			t.Errorf("flag --%s missing", name)
			continue
		}
		if f.DefValue != def {
			t.Errorf("--%s default = %q, want %q", name, f.DefValue, def)
		}
	}
}

func TestLoadDefaults(t *testing.T) {
	env := requiredEnv(t)
	got := mustLoad(t, "", env)

	want := Defaults()
	want.Admin.Token = testAdminToken
	want.Auth.TokenSecrets = []string{testSecretA}
	want.Keystore.IdentityFile = got.Keystore.IdentityFile
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Load with no file or flags:\n got %+v\nwant %+v", got, want)
	}
}

func TestLoadNilFlagSet(t *testing.T) {
	c, err := Load(nil, requiredEnv(t))
	if err != nil {
		t.Fatalf("Load(nil): %v", err)
	}
	if c.Listen != "127.0.0.1:8080" {
		t.Errorf("listen = %q, want the default", c.Listen)
	}
}

func TestLoadPrecedence(t *testing.T) {
	const file = `
listen: 127.0.0.1:1001
admin:
  listen: 127.0.0.1:2001
redis:
  url: redis://file:6379/0
log_level: warn
`
	tests := []struct {
		name  string
		file  string
		env   []string
		args  []string
		check func(*Config) (got, want string)
	}{
		{"default", "", nil, nil,
			func(c *Config) (string, string) { return c.Listen, "127.0.0.1:8080" }},
		{"file over default", file, nil, nil,
			func(c *Config) (string, string) { return c.Listen, "127.0.0.1:1001" }},
		{"env over file", file, []string{"BYOKPROXY_LISTEN=127.0.0.1:1002"}, nil,
			func(c *Config) (string, string) { return c.Listen, "127.0.0.1:1002" }},
		{"flag over env", file, []string{"BYOKPROXY_LISTEN=127.0.0.1:1002"}, []string{"--listen", "127.0.0.1:1003"},
			func(c *Config) (string, string) { return c.Listen, "127.0.0.1:1003" }},
		{"unset flag keeps env", file, []string{"BYOKPROXY_LISTEN=127.0.0.1:1002"}, []string{"--log-level", "debug"},
			func(c *Config) (string, string) { return c.Listen, "127.0.0.1:1002" }},
		{"nested env over file", file, []string{"BYOKPROXY_ADMIN_LISTEN=127.0.0.1:2002"}, nil,
			func(c *Config) (string, string) { return c.Admin.Listen, "127.0.0.1:2002" }},
		{"nested flag over env", file, []string{"BYOKPROXY_ADMIN_LISTEN=127.0.0.1:2002"}, []string{"--admin-listen=127.0.0.1:2003"},
			func(c *Config) (string, string) { return c.Admin.Listen, "127.0.0.1:2003" }},
		{"redis flag over file", file, nil, []string{"--redis-url", "redis://flag:6379/1"},
			func(c *Config) (string, string) { return c.Redis.URL, "redis://flag:6379/1" }},
		{"file keeps other keys", file, []string{"BYOKPROXY_LISTEN=127.0.0.1:1002"}, nil,
			func(c *Config) (string, string) { return c.LogLevel, "warn" }},
		{"log level flag", file, []string{"BYOKPROXY_LOG_LEVEL=error"}, []string{"--log-level", "debug"},
			func(c *Config) (string, string) { return c.LogLevel, "debug" }},
		{"metrics and forward flags", "", nil, []string{"--metrics-listen", "127.0.0.1:3003", "--forward-listen", "127.0.0.1:3004", "--dev"},
			func(c *Config) (string, string) {
				return c.Metrics.Listen + " " + c.Forward.Listen, "127.0.0.1:3003 127.0.0.1:3004"
			}},
		{"log format flag", "", []string{"BYOKPROXY_LOG_FORMAT=json"}, []string{"--log-format", "text"},
			func(c *Config) (string, string) { return c.LogFormat, "text" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := append(requiredEnv(t), tt.env...)
			c := mustLoad(t, tt.file, env, tt.args...)
			if got, want := tt.check(c); got != want {
				t.Errorf("got %q, want %q", got, want)
			}
		})
	}
}

func TestLoadDevFlagAndEnv(t *testing.T) {
	c := mustLoad(t, "", nil, "--dev")
	if !c.Dev {
		t.Error("--dev did not set Dev")
	}
	c = mustLoad(t, "", []string{"BYOKPROXY_DEV=true"})
	if !c.Dev {
		t.Error("BYOKPROXY_DEV=true did not set Dev")
	}
	c = mustLoad(t, "dev: true\n", []string{"BYOKPROXY_DEV=false"}, "--dev")
	if !c.Dev {
		t.Error("--dev did not win over BYOKPROXY_DEV=false")
	}
}

func TestLoadDevNeedsNoSecrets(t *testing.T) {
	c := mustLoad(t, "", nil, "--dev")
	if c.Admin.Token != "" || len(c.Auth.TokenSecrets) != 0 || c.Keystore.IdentityFile != "" {
		t.Errorf("dev config has secrets it was not given: %+v", c)
	}
}

func TestLoadFileValues(t *testing.T) {
	caFile, _ := writeKeyPair(t, true)
	file := `
shutdown_grace: 45s
log_format: text
admin:
  ui: true
redis:
  addrs: [sentinel-1:26379, sentinel-2:26379]
  master_name: main
  username: proxy
  tls: true
  timeout: 250ms
  prefix: "test:"
limits:
  max_body_bytes: 1024
  max_header_bytes: 2048
upstream:
  timeout: 2m
metering:
  monthly_token_limit: 500000
  retention_months: 3
  response_ttl: 48h
audit:
  stream_maxlen: 5000
  stdout: true
  queue_size: 7
providers:
  openai:
    shared_models: [gpt-4o, gpt-4o-mini]
    organization: org-1
    project: proj_1
    ca_file: ` + caFile + `
    probe_model: gpt-4.1-nano
    probe_timeout: 3s
`
	c := mustLoad(t, file, requiredEnv(t))
	tests := []struct {
		key       string
		got, want any
	}{
		{"shutdown_grace", c.ShutdownGrace, 45 * time.Second},
		{"log_format", c.LogFormat, "text"},
		{"admin.ui", c.Admin.UI, true},
		{"redis.addrs", strings.Join(c.Redis.Addrs, ","), "sentinel-1:26379,sentinel-2:26379"},
		{"redis.master_name", c.Redis.MasterName, "main"},
		{"redis.username", c.Redis.Username, "proxy"},
		{"redis.tls", c.Redis.TLS, true},
		{"redis.timeout", c.Redis.Timeout, 250 * time.Millisecond},
		{"redis.prefix", c.Redis.Prefix, "test:"},
		{"limits.max_body_bytes", c.Limits.MaxBodyBytes, int64(1024)},
		{"limits.max_header_bytes", c.Limits.MaxHeaderBytes, 2048},
		{"upstream.timeout", c.Upstream.Timeout, 2 * time.Minute},
		{"metering.monthly_token_limit", c.Metering.MonthlyTokenLimit, int64(500000)},
		{"metering.retention_months", c.Metering.RetentionMonths, 3},
		{"metering.response_ttl", c.Metering.ResponseTTL, 48 * time.Hour},
		{"audit.stream_maxlen", c.Audit.StreamMaxLen, int64(5000)},
		{"audit.stdout", c.Audit.Stdout, true},
		{"audit.queue_size", c.Audit.QueueSize, 7},
		{"providers.openai.shared_models", strings.Join(c.Provider("openai").SharedModels, ","), "gpt-4o,gpt-4o-mini"},
		{"providers.openai.organization", c.Provider("openai").Organization, "org-1"},
		{"providers.openai.project", c.Provider("openai").Project, "proj_1"},
		{"providers.openai.ca_file", c.Provider("openai").CAFile, caFile},
		{"providers.openai.probe_model", c.Provider("openai").ProbeModel, "gpt-4.1-nano"},
		{"providers.openai.probe_timeout", c.Provider("openai").ProbeTimeout, 3 * time.Second},
		// A provider section sets only the keys it names.
		{"providers.openai.upstream", c.Provider("openai").Upstream, "https://api.openai.com"},
		{"providers.google.probe_model", c.Provider("google").ProbeModel, "gemini-2.5-flash"},
	}
	for _, tt := range tests {
		if !reflect.DeepEqual(tt.got, tt.want) {
			t.Errorf("%s = %v, want %v", tt.key, tt.got, tt.want)
		}
	}
}

func TestLoadEnvValues(t *testing.T) {
	env := append(requiredEnv(t),
		"BYOKPROXY_AUTH_TOKEN_SECRETS="+testSecretA+", "+testSecretB+",",
		"BYOKPROXY_PROVIDERS_OPENAI_SHARED_KEY=sk-shared-0123456789",
		"BYOKPROXY_PROVIDERS_GOOGLE_SHARED_MODELS=gemini-2.5-flash,gemini-2.5-pro",
		"BYOKPROXY_PROVIDERS_ANTHROPIC_UPSTREAM=http://127.0.0.1:9999/",
		"BYOKPROXY_REDIS_ADDRS=a:6379,b:6379",
		"BYOKPROXY_REDIS_TIMEOUT=250ms",
		"BYOKPROXY_AUDIT_STDOUT=true",
		"BYOKPROXY_LIMITS_MAX_BODY_BYTES=1024",
		"BYOKPROXY_METERING_MONTHLY_TOKEN_LIMIT=100",
		"BYOKPROXY_LOG_LEVEL=DEBUG",
		"BYOKPROXY_ADMIN_TLS_CERT_FILE=",
		"NOT_OURS_LISTEN=ignored",
		"BYOKPROXY_NO_SUCH_KEY=ignored",
	)
	c := mustLoad(t, "", env)
	tests := []struct {
		key       string
		got, want any
	}{
		{"auth.token_secrets", c.Auth.TokenSecrets, []string{testSecretA, testSecretB}},
		{"providers.openai.shared_key", c.Provider("openai").SharedKey, "sk-shared-0123456789"},
		{"providers.google.shared_models", c.Provider("google").SharedModels, []string{"gemini-2.5-flash", "gemini-2.5-pro"}},
		{"providers.anthropic.upstream", c.Provider("anthropic").Upstream, "http://127.0.0.1:9999"},
		{"redis.addrs", c.Redis.Addrs, []string{"a:6379", "b:6379"}},
		{"redis.timeout", c.Redis.Timeout, 250 * time.Millisecond},
		{"audit.stdout", c.Audit.Stdout, true},
		{"limits.max_body_bytes", c.Limits.MaxBodyBytes, int64(1024)},
		{"metering.monthly_token_limit", c.Metering.MonthlyTokenLimit, int64(100)},
		{"log_level", c.LogLevel, "debug"},
		{"admin.tls.cert_file", c.Admin.TLS.CertFile, ""},
	}
	for _, tt := range tests {
		if !reflect.DeepEqual(tt.got, tt.want) {
			t.Errorf("%s = %#v, want %#v", tt.key, tt.got, tt.want)
		}
	}
}

func TestLoadEnvListReplacesFileList(t *testing.T) {
	file := "auth:\n  token_secrets: [" + testSecretA + "]\n"
	env := append(requiredEnv(t), "BYOKPROXY_AUTH_TOKEN_SECRETS="+testSecretB)
	c := mustLoad(t, file, env)
	if !reflect.DeepEqual(c.Auth.TokenSecrets, []string{testSecretB}) {
		t.Errorf("token_secrets = %q, want only the env value", c.Auth.TokenSecrets)
	}
}

func TestLoadEnvLaterDuplicateWins(t *testing.T) {
	env := append(requiredEnv(t), "BYOKPROXY_LISTEN=127.0.0.1:1001", "BYOKPROXY_LISTEN=127.0.0.1:1002")
	c := mustLoad(t, "", env)
	if c.Listen != "127.0.0.1:1002" {
		t.Errorf("listen = %q, want the later value", c.Listen)
	}
}

func TestLoadEmptyEnvOverridesFile(t *testing.T) {
	env := append(requiredEnv(t), "BYOKPROXY_FORWARD_LISTEN=")
	c := mustLoad(t, "forward:\n  listen: 127.0.0.1:8443\n", env)
	if c.Forward.Listen != "" {
		t.Errorf("forward.listen = %q, want empty", c.Forward.Listen)
	}
}

func TestUnknownEnvNamesMisspeltVariables(t *testing.T) {
	env := []string{
		"BYOKPROXY_LISTN=127.0.0.1:1001",
		"BYOKPROXY_LISTEN=127.0.0.1:1002",
		"BYOKPROXY_PROVIDERS_OPENAI_SHAREDKEY=sk-secret-value",
		"BYOKPROXY_PROVIDERS_OPENAI_SHARED_KEY=sk-secret-value",
		"BYOKPROXY_ADMIN_URL=http://127.0.0.1:8081",
		"BYOKPROXY_LISTN=again",
		"HOME=/root",
		"MALFORMED",
	}
	got := UnknownEnv(env, "BYOKPROXY_ADMIN_URL")
	want := []string{"BYOKPROXY_LISTN", "BYOKPROXY_PROVIDERS_OPENAI_SHAREDKEY"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("UnknownEnv = %q, want %q", got, want)
	}
	if got := UnknownEnv(requiredEnv(t)); len(got) != 0 {
		t.Errorf("UnknownEnv of the required variables = %q, want none", got)
	}
}

func TestLoadNullKeepsDefault(t *testing.T) {
	c := mustLoad(t, "tls:\nredis:\n  timeout:\nproviders:\n  openai:\n", requiredEnv(t))
	if c.Redis.Timeout != time.Second {
		t.Errorf("redis.timeout = %v, want the default 1s", c.Redis.Timeout)
	}
	if c.Provider("openai").Upstream != "https://api.openai.com" {
		t.Errorf("providers.openai.upstream = %q, want the default", c.Provider("openai").Upstream)
	}
}

func TestLoadUpperCaseFileKeys(t *testing.T) {
	c := mustLoad(t, "Listen: 127.0.0.1:1001\nREDIS:\n  Timeout: 2s\n", requiredEnv(t))
	if c.Listen != "127.0.0.1:1001" || c.Redis.Timeout != 2*time.Second {
		t.Errorf("listen = %q, redis.timeout = %v; want the file's values", c.Listen, c.Redis.Timeout)
	}
}

func TestLoadUnknownKeys(t *testing.T) {
	file := `
listn: 127.0.0.1:8080
redis:
  ulr: redis://x:6379/0
providers:
  openai:
    upstrem: https://api.openai.com
  opena:
    upstream: https://api.openai.com
admin: "x"
tls:
  cert_file:
    nested: true
`
	_, err := load(t, file, requiredEnv(t))
	lines := problemLines(t, err)
	for _, key := range []string{"listn", "redis.ulr", "providers.openai.upstrem"} {
		want := "config: " + key + ": unknown key in "
		if !slices.ContainsFunc(lines, func(l string) bool { return strings.HasPrefix(l, want) }) {
			t.Errorf("no line starts with %q; got:\n  %s", want, strings.Join(lines, "\n  "))
		}
	}
	wantLine(t, err, "config: providers.opena: unknown provider; use anthropic, openai or google")
	for _, prefix := range []string{"config: admin: is a single value in ", "config: tls.cert_file: is a section in "} {
		if !slices.ContainsFunc(lines, func(l string) bool { return strings.HasPrefix(l, prefix) }) {
			t.Errorf("no line starts with %q; got:\n  %s", prefix, strings.Join(lines, "\n  "))
		}
	}
	if len(lines) != 6 {
		t.Errorf("got %d lines, want 6:\n  %s", len(lines), strings.Join(lines, "\n  "))
	}
}

func TestLoadUnknownProviderEmptySection(t *testing.T) {
	_, err := load(t, "providers:\n  opena: {}\n", requiredEnv(t))
	wantLine(t, err, "config: providers.opena: unknown provider; use anthropic, openai or google")
}

func TestLoadInvalidYAML(t *testing.T) {
	_, err := load(t, "listen: [unclosed\n", requiredEnv(t))
	lines := problemLines(t, err)
	if len(lines) != 1 || !strings.Contains(lines[0], ": invalid YAML: ") {
		t.Errorf("error = %q, want one invalid YAML line", lines)
	}
}

func TestLoadMissingConfigFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing.yaml")
	_, err := Load(newServeFlags(t, "--config", path), requiredEnv(t))
	wantLine(t, err, "config: --config: open "+path+": no such file or directory; fix the path")
}

func TestLoadTypeProblems(t *testing.T) {
	const durationFix = "write a number with a unit, such as 30s, 10m or 720h"
	tests := []struct {
		name string
		file string
		env  string
		want string
	}{
		{"duration without unit", "redis:\n  timeout: 10\n", "",
			"config: redis.timeout: 10 has no unit; " + durationFix},
		{"duration text", "", "BYOKPROXY_UPSTREAM_TIMEOUT=soon",
			`config: upstream.timeout: "soon" is not a duration; ` + durationFix},
		{"bool text", "", "BYOKPROXY_AUDIT_STDOUT=yes",
			`config: audit.stdout: "yes" is not true or false; use true or false`},
		{"bool number", "admin:\n  ui: 2\n", "",
			`config: admin.ui: 2 is not true or false; use true or false`},
		{"int with unit", "", "BYOKPROXY_LIMITS_MAX_BODY_BYTES=64MiB",
			`config: limits.max_body_bytes: "64MiB" is not a whole number; write digits only, such as 1000`},
		{"int fraction", "limits:\n  max_header_bytes: 1.5\n", "",
			`config: limits.max_header_bytes: 1.5 is not a whole number; write digits only, such as 1000`},
		{"string number", "providers:\n  openai:\n    project: 1234567890123456789\n", "",
			`config: providers.openai.project: 1234567890123456789 is not a string; put the value in quotes`},
		{"list scalar", "redis:\n  addrs: 5\n", "",
			`config: redis.addrs: 5 is not a list; write a YAML list, or comma-separated text in an environment variable`},
		{"list entry", "providers:\n  openai:\n    shared_models: [gpt-4o, 7]\n", "",
			`config: providers.openai.shared_models: entry 2, 7, is not a string; write a YAML list, or comma-separated text in an environment variable`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := requiredEnv(t)
			if tt.env != "" {
				env = append(env, tt.env)
			}
			_, err := load(t, tt.file, env)
			lines := problemLines(t, err)
			if !slices.Equal(lines, []string{tt.want}) {
				t.Errorf("got\n  %s\nwant\n  %s", strings.Join(lines, "\n  "), tt.want)
			}
		})
	}
}

// A key that fails to load keeps its empty default, which validation would
// also report as missing.
func TestLoadTypeProblemHidesMissing(t *testing.T) {
	env := []string{"BYOKPROXY_ADMIN_TOKEN=" + testAdminToken, "BYOKPROXY_AUTH_TOKEN_SECRETS=" + testSecretA}
	_, err := load(t, "keystore:\n  identity_file: 12\n", env)
	lines := problemLines(t, err)
	want := []string{"config: keystore.identity_file: 12 is not a string; put the value in quotes"}
	if !slices.Equal(lines, want) {
		t.Errorf("got\n  %s\nwant\n  %s", strings.Join(lines, "\n  "), want[0])
	}
}

func TestLoadZeroDurationWithoutUnit(t *testing.T) {
	c := mustLoad(t, "shutdown_grace: 0\n", requiredEnv(t))
	if c.ShutdownGrace != 0 {
		t.Errorf("shutdown_grace = %v, want 0", c.ShutdownGrace)
	}
}

func TestLoadSecretFiles(t *testing.T) {
	tokenFile := writeFile(t, "admin-token", testAdminToken+"\n")
	passwordFile := writeFile(t, "redis-password", "p@ss word\r\n")
	keyFile := writeFile(t, "google-key", "AIzaSyTestKey0123456789012345678901234\n\n")
	file := `
admin:
  token_file: ` + tokenFile + `
redis:
  password_file: ` + passwordFile + `
`
	env := []string{
		"BYOKPROXY_AUTH_TOKEN_SECRETS=" + testSecretA,
		"BYOKPROXY_KEYSTORE_IDENTITY_FILE=" + writeIdentityFile(t),
		"BYOKPROXY_PROVIDERS_GOOGLE_SHARED_KEY_FILE=" + keyFile,
	}
	c := mustLoad(t, file, env)
	tests := []struct{ key, got, want string }{
		{"admin.token", c.Admin.Token, testAdminToken},
		{"admin.token_file", c.Admin.TokenFile, tokenFile},
		{"redis.password", c.Redis.Password, "p@ss word"},
		{"providers.google.shared_key", c.Provider("google").SharedKey, "AIzaSyTestKey0123456789012345678901234"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s = %q, want %q", tt.key, tt.got, tt.want)
		}
	}
}

func TestLoadSecretFileProblems(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "missing")
	empty := writeFile(t, "empty", "\n")
	other := writeFile(t, "other", "sk-9876543210\n")
	tests := []struct {
		name string
		env  []string
		want []string
	}{
		{
			"missing file",
			[]string{"BYOKPROXY_ADMIN_TOKEN_FILE=" + missing},
			[]string{"config: admin.token_file: open " + missing + ": no such file or directory; fix the path, or unset admin.token_file and set admin.token"},
		},
		{
			"empty file",
			[]string{"BYOKPROXY_REDIS_PASSWORD_FILE=" + empty},
			[]string{"config: redis.password_file: " + empty + " is empty; write the secret into it"},
		},
		{
			"value and file",
			[]string{"BYOKPROXY_PROVIDERS_OPENAI_SHARED_KEY=sk-0123456789", "BYOKPROXY_PROVIDERS_OPENAI_SHARED_KEY_FILE=" + other},
			[]string{"config: providers.openai.shared_key: set together with providers.openai.shared_key_file to a different value; keep one of them"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := []string{
				"BYOKPROXY_AUTH_TOKEN_SECRETS=" + testSecretA,
				"BYOKPROXY_KEYSTORE_IDENTITY_FILE=" + writeIdentityFile(t),
			}
			if !strings.Contains(tt.env[0], "ADMIN_TOKEN_FILE") {
				env = append(env, "BYOKPROXY_ADMIN_TOKEN="+testAdminToken)
			}
			_, err := load(t, "", append(env, tt.env...))
			lines := problemLines(t, err)
			if !slices.Equal(lines, tt.want) {
				t.Errorf("got\n  %s\nwant\n  %s", strings.Join(lines, "\n  "), strings.Join(tt.want, "\n  "))
			}
		})
	}
}

func TestLoadCollectsAllProblems(t *testing.T) {
	env := []string{"BYOKPROXY_AUDIT_STDOUT=maybe", "BYOKPROXY_LOG_FORMAT=xml"}
	_, err := load(t, "nope: 1\n", env)
	lines := problemLines(t, err)
	want := []string{
		"config: nope: unknown key in ",
		"config: audit.stdout: ",
		"config: keystore.identity_file: missing; ",
		"config: admin.token: missing; ",
		"config: auth.token_secrets: missing; ",
		"config: log_format: ",
	}
	for _, prefix := range want {
		if !slices.ContainsFunc(lines, func(l string) bool { return strings.HasPrefix(l, prefix) }) {
			t.Errorf("no line starts with %q; got:\n  %s", prefix, strings.Join(lines, "\n  "))
		}
	}
	if len(lines) != len(want) {
		t.Errorf("got %d lines, want %d:\n  %s", len(lines), len(want), strings.Join(lines, "\n  "))
	}
}

func TestValidateValid(t *testing.T) {
	if err := validConfig(t).Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
}

func TestValidateDevDefaults(t *testing.T) {
	c := Defaults()
	c.Dev = true
	c.Redis.URL = ""
	if err := c.Validate(); err != nil {
		t.Errorf("Validate of dev defaults: %v", err)
	}
}

func TestValidatePortZeroRepeats(t *testing.T) {
	c := validConfig(t)
	c.Listen, c.Admin.Listen, c.Metrics.Listen, c.Forward.Listen = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	c.Forward.CACertFile, c.Forward.CAKeyFile = writeKeyPair(t, true)
	if err := c.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
}

func TestValidateTLSFiles(t *testing.T) {
	c := validConfig(t)
	c.TLS.CertFile, c.TLS.KeyFile = writeKeyPair(t, false)
	c.Admin.TLS.CertFile, c.Admin.TLS.KeyFile = writeKeyPair(t, false)
	c.Forward.Listen = "127.0.0.1:8443"
	c.Forward.CACertFile, c.Forward.CAKeyFile = writeKeyPair(t, true)
	caFile, _ := writeKeyPair(t, true)
	c.Provider("google").CAFile = caFile
	if err := c.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
}

func TestValidateDevAcceptsLoopback(t *testing.T) {
	c := Defaults()
	c.Dev = true
	c.Listen, c.Admin.Listen, c.Metrics.Listen, c.Forward.Listen = "localhost:1", "[::1]:2", "127.0.0.2:3", "127.0.0.1:4"
	if err := c.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
}

func TestValidateProblems(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing")
	notPEM := writeFile(t, "not-pem", "hello\n")
	leafCert, leafKey := writeKeyPair(t, false)
	_, otherKey := writeKeyPair(t, false)
	hybrid, err := age.GenerateHybridIdentity()
	if err != nil {
		t.Fatal(err)
	}
	hybridOnly := writeFile(t, "hybrid.txt", hybrid.String()+"\n")

	tests := []struct {
		name   string
		mutate func(c *Config)
		want   []string
	}{
		{"listen missing", func(c *Config) { c.Listen = "" },
			[]string{"config: listen: missing; set a host:port address such as 127.0.0.1:8080"}},
		{"admin listen missing", func(c *Config) { c.Admin.Listen = "" },
			[]string{"config: admin.listen: missing; set a host:port address such as 127.0.0.1:8081"}},
		{"metrics listen missing", func(c *Config) { c.Metrics.Listen = "" },
			[]string{"config: metrics.listen: missing; set a host:port address such as 127.0.0.1:9090"}},
		{"listen no port", func(c *Config) { c.Admin.Listen = "8081" },
			[]string{`config: admin.listen: "8081" is not a host:port address; set one such as 127.0.0.1:8081`}},
		{"listen bad port", func(c *Config) { c.Metrics.Listen = "127.0.0.1:http" },
			[]string{`config: metrics.listen: port "http" of "127.0.0.1:http" is not a number from 0 to 65535; set an address such as 127.0.0.1:9090`}},
		{"listen port too big", func(c *Config) { c.Forward.Listen = "127.0.0.1:70000"; c.Dev = true },
			[]string{`config: forward.listen: port "70000" of "127.0.0.1:70000" is not a number from 0 to 65535; set an address such as 127.0.0.1:8443`}},
		{"listen shared", func(c *Config) { c.Metrics.Listen = c.Listen },
			[]string{"config: metrics.listen: 127.0.0.1:8080 is also the address of listen; give each listener its own port"}},
		{"dev any address", func(c *Config) { c.Dev = true; c.Listen = "0.0.0.0:8080" },
			[]string{"config: listen: 0.0.0.0:8080 is not a loopback address, and --dev listens on loopback only; use 127.0.0.1 or localhost, or run without --dev"}},
		{"dev empty host", func(c *Config) { c.Dev = true; c.Admin.Listen = ":8081" },
			[]string{"config: admin.listen: :8081 is not a loopback address, and --dev listens on loopback only; use 127.0.0.1 or localhost, or run without --dev"}},
		{"dev host name", func(c *Config) { c.Dev = true; c.Forward.Listen = "proxy.example:8443" },
			[]string{"config: forward.listen: proxy.example:8443 is not a loopback address, and --dev listens on loopback only; use 127.0.0.1 or localhost, or run without --dev"}},
		{"tls key missing", func(c *Config) { c.TLS.CertFile = leafCert },
			[]string{"config: tls.key_file: missing while tls.cert_file is set; set both files or neither"}},
		{"admin tls cert missing", func(c *Config) { c.Admin.TLS.KeyFile = leafKey },
			[]string{"config: admin.tls.cert_file: missing while admin.tls.key_file is set; set both files or neither"}},
		{"tls file missing", func(c *Config) { c.TLS.CertFile, c.TLS.KeyFile = missing, leafKey },
			[]string{"config: tls.cert_file: open " + missing + ": no such file or directory; set a PEM certificate file and the PEM file of its private key"}},
		{"forward without ca", func(c *Config) { c.Forward.Listen = "127.0.0.1:8443" },
			[]string{"config: forward.ca_cert_file: missing while forward.listen is set; set forward.ca_cert_file and forward.ca_key_file to the CA that clients trust"}},
		{"forward ca not ca", func(c *Config) {
			c.Forward.Listen = "127.0.0.1:8443"
			c.Forward.CACertFile, c.Forward.CAKeyFile = leafCert, leafKey
		}, []string{"config: forward.ca_cert_file: " + leafCert + " is not a CA certificate that may sign certificates; use a certificate with the CA basic constraint and, if it lists key usages, certificate signing"}},
		{"forward upstreams on one route", func(c *Config) {
			c.Forward.Listen = "127.0.0.1:8443"
			c.Dev = true
			c.Provider("openai").Upstream = "https://Gateway.example:443/llm/"
			c.Provider("anthropic").Upstream = "https://gateway.example/llm"
			c.Provider("google").Upstream = "https://gateway.example/other"
		}, []string{"config: providers.openai.upstream: has the host and path of providers.anthropic.upstream, so the forward proxy would send its requests to anthropic; give each provider its own upstream host or base path, or leave forward.listen empty"}},
		{"tls key file missing", func(c *Config) { c.TLS.CertFile, c.TLS.KeyFile = leafCert, missing },
			[]string{"config: tls.key_file: open " + missing + ": no such file or directory; set a PEM certificate file and the PEM file of its private key"}},
		{"tls cert not PEM", func(c *Config) { c.TLS.CertFile, c.TLS.KeyFile = notPEM, leafKey },
			[]string{"config: tls.cert_file: " + notPEM + " holds no PEM certificate; set a PEM certificate file and the PEM file of its private key"}},
		{"forward ca key not PEM", func(c *Config) {
			c.Forward.Listen = "127.0.0.1:8443"
			c.Forward.CACertFile, c.Forward.CAKeyFile = leafCert, notPEM
		}, []string{"config: forward.ca_key_file: tls: failed to find any PEM data in key input; set the PEM file of the private key of " + leafCert}},
		{"forward ca key of another certificate", func(c *Config) {
			c.Forward.Listen = "127.0.0.1:8443"
			c.Forward.CACertFile, c.Forward.CAKeyFile = leafCert, otherKey
		}, []string{"config: forward.ca_key_file: tls: private key does not match public key; set the PEM file of the private key of " + leafCert}},
		{"forward ca key missing", func(c *Config) { c.Forward.CACertFile = leafCert },
			[]string{"config: forward.ca_key_file: missing while forward.ca_cert_file is set; set both files or neither"}},
		{"redis timeout", func(c *Config) { c.Redis.Timeout = 0 },
			[]string{"config: redis.timeout: must be more than 0, got 0s; set a duration such as 1s"}},
		{"redis cache ttl", func(c *Config) { c.Redis.CacheTTL = 2 * time.Second },
			[]string{"config: redis.cache_ttl: must be between 0 and 1s, got 2s; set 1s, or 0 to read Redis on every request"}},
		{"redis master without addrs", func(c *Config) { c.Redis.MasterName = "main" },
			[]string{"config: redis.master_name: set without redis.addrs; list the Sentinel addresses in redis.addrs"}},
		{"redis addrs", func(c *Config) { c.Redis.Addrs = []string{"a:6379", "b"} },
			[]string{`config: redis.addrs: "b" is not a host:port address; list addresses such as redis-1:6379`}},
		{"redis url missing", func(c *Config) { c.Redis.URL = "" },
			[]string{"config: redis.url: missing; set a URL such as redis://127.0.0.1:6379/0, or list servers in redis.addrs"}},
		{"redis url scheme", func(c *Config) { c.Redis.URL = "http://127.0.0.1:6379" },
			[]string{"config: redis.url: http://127.0.0.1:6379 is invalid: redis: invalid URL scheme: http; set a URL such as redis://HOST:6379/0, or rediss://HOST:6380/0 for TLS"}},
		{"redis url hides password", func(c *Config) { c.Redis.URL = "redis://user:hunter2@127.0.0.1:6379/x" },
			[]string{`config: redis.url: redis://user:xxxxx@127.0.0.1:6379/x is invalid: redis: invalid database number: "x"; set a URL such as redis://HOST:6379/0, or rediss://HOST:6380/0 for TLS`}},
		{"redis url unparsable hides password", func(c *Config) { c.Redis.URL = "redis://user:hun%zz@127.0.0.1:6379/0" },
			[]string{"config: redis.url: (URL hidden because it may contain a password) is not a valid URL; set a URL such as redis://HOST:6379/0, or rediss://HOST:6380/0 for TLS"}},
		{"identity missing", func(c *Config) { c.Keystore.IdentityFile = "" },
			[]string{`config: keystore.identity_file: missing; create one with "byokproxy identity new" and set its path (or run with --dev)`}},
		{"identity not found", func(c *Config) { c.Keystore.IdentityFile = missing },
			[]string{"config: keystore.identity_file: open " + missing + `: no such file or directory; create one with "byokproxy identity new" or fix the path`}},
		{"identity not age", func(c *Config) { c.Keystore.IdentityFile = notPEM },
			[]string{"config: keystore.identity_file: " + notPEM + `: error at line 1: unknown identity type; write one AGE-SECRET-KEY-1... line per identity, as "byokproxy identity new" does`}},
		{"identity without x25519", func(c *Config) { c.Keystore.IdentityFile = hybridOnly },
			[]string{"config: keystore.identity_file: " + hybridOnly + ` has no X25519 identity (AGE-SECRET-KEY-1...); add one with "byokproxy identity new"`}},
		{"admin token missing", func(c *Config) { c.Admin.Token = "" },
			[]string{"config: admin.token: missing; set admin.token or admin.token_file (or run with --dev)"}},
		{"admin token short", func(c *Config) { c.Admin.Token = "short" },
			[]string{`config: admin.token: is 5 bytes, shorter than 16; use a random value such as the output of "openssl rand -hex 32"`}},
		{"admin token space", func(c *Config) { c.Admin.Token = "0123456789 abcdef" },
			[]string{"config: admin.token: contains a space, a control character or non-ASCII text; use printable ASCII without spaces"}},
		{"token secrets missing", func(c *Config) { c.Auth.TokenSecrets = nil },
			[]string{`config: auth.token_secrets: missing; set at least one random secret of 16 or more bytes, such as the output of "openssl rand -hex 32" (or run with --dev)`}},
		{"token secret short", func(c *Config) { c.Auth.TokenSecrets = []string{testSecretA, "short-secret"} },
			[]string{`config: auth.token_secrets: entry 2 is 12 bytes, shorter than 16; use a random value such as the output of "openssl rand -hex 32"`}},
		{"token secret control", func(c *Config) { c.Auth.TokenSecrets = []string{testSecretA + "\n"} },
			[]string{"config: auth.token_secrets: entry 1 contains a space, a control character or non-ASCII text; use printable ASCII without spaces"}},
		{"trust header on open listener", func(c *Config) { c.Auth.TrustMailboxHeader = true; c.Listen = "0.0.0.0:8080" },
			[]string{"config: auth.trust_mailbox_header: listen 0.0.0.0:8080 is not a loopback address, so any client that reaches it could name a mailbox in X-Mailbox-Id; bind listen to 127.0.0.1 or set auth.trust_mailbox_header to false"}},
		{"trust header on open forward listener", func(c *Config) {
			c.Auth.TrustMailboxHeader = true
			c.Forward.Listen = ":8443"
			c.Forward.CACertFile, c.Forward.CAKeyFile = writeKeyPair(t, true)
		}, []string{"config: auth.trust_mailbox_header: forward.listen :8443 is not a loopback address, so any client that reaches it could name a mailbox in X-Mailbox-Id; bind forward.listen to 127.0.0.1 or set auth.trust_mailbox_header to false"}},
		{"log level", func(c *Config) { c.LogLevel = "verbose" },
			[]string{`config: log_level: "verbose" is not a log level; use debug, info, warn or error`}},
		{"log format", func(c *Config) { c.LogFormat = "xml" },
			[]string{`config: log_format: "xml" is not a log format; use json or text`}},
		{"shutdown grace", func(c *Config) { c.ShutdownGrace = -time.Second },
			[]string{"config: shutdown_grace: must not be negative, got -1s; set a duration such as 30s"}},
		{"max body", func(c *Config) { c.Limits.MaxBodyBytes = 0 },
			[]string{"config: limits.max_body_bytes: must be more than 0, got 0; set a size in bytes such as 67108864 (64 MiB)"}},
		{"max header", func(c *Config) { c.Limits.MaxHeaderBytes = -1 },
			[]string{"config: limits.max_header_bytes: must be more than 0, got -1; set a size in bytes such as 1048576 (1 MiB)"}},
		{"upstream timeout", func(c *Config) { c.Upstream.Timeout = 0 },
			[]string{"config: upstream.timeout: must be more than 0, got 0s; set a duration such as 10m"}},
		{"token limit", func(c *Config) { c.Metering.MonthlyTokenLimit = -5 },
			[]string{"config: metering.monthly_token_limit: must not be negative, got -5; set a number of tokens, or 0 for unlimited"}},
		{"retention", func(c *Config) { c.Metering.RetentionMonths = 0 },
			[]string{"config: metering.retention_months: must be at least 1, got 0; set a number of months such as 13"}},
		{"response ttl", func(c *Config) { c.Metering.ResponseTTL = 0 },
			[]string{"config: metering.response_ttl: must be more than 0, got 0s; set a duration such as 720h"}},
		{"stream maxlen", func(c *Config) { c.Audit.StreamMaxLen = 0 },
			[]string{"config: audit.stream_maxlen: must be more than 0, got 0; set a number of events such as 1000000"}},
		{"queue size", func(c *Config) { c.Audit.QueueSize = 0 },
			[]string{"config: audit.queue_size: must be more than 0, got 0; set a number of events such as 10000"}},
		{"unknown provider", func(c *Config) { c.Providers["opena"] = &Provider{} },
			[]string{"config: providers.opena: unknown provider; use anthropic, openai or google"}},
		{"provider missing", func(c *Config) { delete(c.Providers, "google") },
			[]string{"config: providers.google: missing; start from config.Defaults(), which sets every provider"}},
		{"upstream scheme", func(c *Config) { c.Provider("openai").Upstream = "ftp://x" },
			[]string{`config: providers.openai.upstream: "ftp://x" is not an http(s) URL; set an absolute URL such as https://api.openai.com`}},
		{"upstream relative", func(c *Config) { c.Provider("google").Upstream = "generativelanguage.googleapis.com" },
			[]string{`config: providers.google.upstream: "generativelanguage.googleapis.com" is not an http(s) URL; set an absolute URL such as https://generativelanguage.googleapis.com`}},
		{"upstream query", func(c *Config) { c.Provider("anthropic").Upstream = "https://x.example/v?a=b" },
			[]string{`config: providers.anthropic.upstream: "https://x.example/v?a=b" has a query string; remove it; set an absolute URL such as https://api.anthropic.com`}},
		{"upstream fragment", func(c *Config) { c.Provider("anthropic").Upstream = "https://x.example/#top" },
			[]string{`config: providers.anthropic.upstream: "https://x.example/#top" has a fragment; remove it; set an absolute URL such as https://api.anthropic.com`}},
		{"upstream user info", func(c *Config) { c.Provider("openai").Upstream = "https://user:hunter2@x.example" },
			[]string{"config: providers.openai.upstream: https://user:xxxxx@x.example contains user info; remove it and put the key in shared_key"}},
		{"shared key newline", func(c *Config) { c.Provider("openai").SharedKey = "sk-abc\nX-Evil: 1" },
			[]string{"config: providers.openai.shared_key: contains a space, a control character or non-ASCII text; set the key exactly as the provider issued it"}},
		{"shared models empty entry", func(c *Config) { c.Provider("openai").SharedModels = []string{"gpt-4o", " "} },
			[]string{"config: providers.openai.shared_models: entry 2 is empty; remove it or name a model"}},
		{"organization space", func(c *Config) { c.Provider("openai").Organization = "org 1" },
			[]string{"config: providers.openai.organization: contains a space, a control character or non-ASCII text; set the id exactly as the provider shows it"}},
		{"project control", func(c *Config) { c.Provider("openai").Project = "proj\r" },
			[]string{"config: providers.openai.project: contains a space, a control character or non-ASCII text; set the id exactly as the provider shows it"}},
		{"ca file missing", func(c *Config) { c.Provider("google").CAFile = missing },
			[]string{"config: providers.google.ca_file: open " + missing + ": no such file or directory; fix the path, or leave it empty to trust the system roots only"}},
		{"ca file not pem", func(c *Config) { c.Provider("google").CAFile = notPEM },
			[]string{"config: providers.google.ca_file: " + notPEM + " contains no PEM certificate; set a file of PEM CERTIFICATE blocks"}},
		{"probe model", func(c *Config) { c.Provider("anthropic").ProbeModel = "" },
			[]string{"config: providers.anthropic.probe_model: missing; set a model the key test may call, such as claude-haiku-4-5"}},
		{"probe timeout", func(c *Config) { c.Provider("google").ProbeTimeout = 0 },
			[]string{"config: providers.google.probe_timeout: must be more than 0, got 0s; set a duration such as 10s"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := validConfig(t)
			tt.mutate(c)
			lines := problemLines(t, c.Validate())
			if !slices.Equal(lines, tt.want) {
				t.Errorf("got\n  %s\nwant\n  %s", strings.Join(lines, "\n  "), strings.Join(tt.want, "\n  "))
			}
		})
	}
}

func TestValidateNeverShowsSecrets(t *testing.T) {
	c := validConfig(t)
	c.Admin.Token = "hunter2 hunter2 hunter2"
	c.Auth.TokenSecrets = []string{"hunter2"}
	c.Provider("openai").SharedKey = "hunter2\n"
	c.Redis.URL = "ftp://:hunter2@x"
	err := c.Validate()
	if err == nil {
		t.Fatal("Validate accepted invalid secrets")
	}
	if strings.Contains(err.Error(), "hunter2") {
		t.Errorf("error shows a secret:\n%v", err)
	}
}

func TestValidateCollectsAll(t *testing.T) {
	c := validConfig(t)
	c.Listen = ""
	c.LogLevel = "loud"
	c.Provider("openai").Upstream = "ftp://x"
	lines := problemLines(t, c.Validate())
	want := []string{
		"config: listen: missing; set a host:port address such as 127.0.0.1:8080",
		`config: log_level: "loud" is not a log level; use debug, info, warn or error`,
		`config: providers.openai.upstream: "ftp://x" is not an http(s) URL; set an absolute URL such as https://api.openai.com`,
	}
	if !slices.Equal(lines, want) {
		t.Errorf("got\n  %s\nwant\n  %s", strings.Join(lines, "\n  "), strings.Join(want, "\n  "))
	}
}

func TestLogValueHidesSecrets(t *testing.T) {
	c := validConfig(t)
	c.Admin.Token = "admin-secret-value-0001"
	c.Auth.TokenSecrets = []string{"token-secret-value-0001"}
	c.Redis.URL = "redis://user:redis-secret-value@127.0.0.1:6379/0"
	c.Redis.Password = "redis-password-value"
	c.Provider("openai").SharedKey = "sk-shared-secret-value"

	var buf bytes.Buffer
	slog.New(slog.NewJSONHandler(&buf, nil)).Info("start", "config", c)
	out := buf.String()
	for _, secret := range []string{"admin-secret-value", "token-secret-value", "redis-secret-value", "redis-password-value", "sk-shared-secret-value"} {
		if strings.Contains(out, secret) {
			t.Errorf("log shows %q:\n%s", secret, out)
		}
	}
	for _, want := range []string{
		`"token":"set"`,
		`"token_secrets":"set"`,
		`"password":"set"`,
		`"url":"redis://user:xxxxx@127.0.0.1:6379/0"`,
		`"openai":{"upstream":"https://api.openai.com","shared_key":"set"`,
		`"anthropic":{"upstream":"https://api.anthropic.com","shared_key":"unset"`,
		`"timeout":"1s"`,
		`"listen":"127.0.0.1:8080"`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %s:\n%s", want, out)
		}
	}
}

func TestRedisPrefixWithBraceRejected(t *testing.T) {
	c := Defaults()
	c.Dev = true
	c.Redis.Prefix = "tenant{a:"
	err := c.Validate()
	if err == nil || !strings.Contains(err.Error(), "config: redis.prefix:") {
		t.Fatalf("Validate() = %v, want a redis.prefix problem", err)
	}
}

func TestSameSecretInValueAndFile(t *testing.T) {
	file := writeFile(t, "token", "admin-token-0123456789abcdef\n")
	env := []string{"BYOKPROXY_DEV=true", "BYOKPROXY_ADMIN_TOKEN=admin-token-0123456789abcdef", "BYOKPROXY_ADMIN_TOKEN_FILE=" + file}
	c, err := Load(nil, env)
	if err != nil {
		t.Fatalf("Load with the same token in admin.token and admin.token_file: %v", err)
	}
	if c.Admin.Token != "admin-token-0123456789abcdef" {
		t.Errorf("admin.token = %q", c.Admin.Token)
	}
}
