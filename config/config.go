// Package config defines byokproxy's configuration: one struct, its defaults,
// loading from a YAML file, BYOKPROXY_* environment variables and flags (in
// rising precedence), and validation of the whole at start.
package config

import (
	"log/slog"
	"maps"
	"slices"
	"time"

	"github.com/byokproxy/byokproxy/provider"
)

// Config is the whole configuration of one byokproxy process. Load fills the
// defaults and validates it; the zero value is not usable.
type Config struct {
	// Listen is the address of the provider routes, /healthz and /readyz.
	Listen string `mapstructure:"listen"`
	// ShutdownGrace bounds how long in-flight requests may run after SIGTERM.
	ShutdownGrace time.Duration `mapstructure:"shutdown_grace"`
	// Dev runs with an in-process store, a fresh identity and loopback only.
	Dev bool `mapstructure:"dev"`
	// LogLevel is debug, info, warn or error. LogFormat is json or text.
	LogLevel  string `mapstructure:"log_level"`
	LogFormat string `mapstructure:"log_format"`

	TLS       TLS                  `mapstructure:"tls"`
	Admin     Admin                `mapstructure:"admin"`
	Metrics   Metrics              `mapstructure:"metrics"`
	Forward   Forward              `mapstructure:"forward"`
	Redis     Redis                `mapstructure:"redis"`
	Keystore  Keystore             `mapstructure:"keystore"`
	Auth      Auth                 `mapstructure:"auth"`
	Limits    Limits               `mapstructure:"limits"`
	Upstream  Upstream             `mapstructure:"upstream"`
	Metering  Metering             `mapstructure:"metering"`
	Audit     Audit                `mapstructure:"audit"`
	Providers map[string]*Provider `mapstructure:"providers"`
}

// TLS names a certificate and key file. Both empty means plain HTTP.
type TLS struct {
	CertFile string `mapstructure:"cert_file"`
	KeyFile  string `mapstructure:"key_file"`
}

// Admin configures the admin API listener.
type Admin struct {
	Listen string `mapstructure:"listen"`
	// Token is the bearer token of the admin API; TokenFile, when set, is read
	// instead. One of them is required outside --dev.
	Token     string `mapstructure:"token"`
	TokenFile string `mapstructure:"token_file"`
	TLS       TLS    `mapstructure:"tls"`
	// UI serves the key settings page under /ui/ when true.
	UI bool `mapstructure:"ui"`
}

// Metrics configures the Prometheus listener.
type Metrics struct {
	Listen string `mapstructure:"listen"`
}

// Forward configures the HTTPS_PROXY-style forward proxy. An empty Listen
// turns it off.
type Forward struct {
	Listen     string `mapstructure:"listen"`
	CACertFile string `mapstructure:"ca_cert_file"`
	CAKeyFile  string `mapstructure:"ca_key_file"`
}

// Redis configures the store. URL names a single node; Addrs with MasterName
// names Sentinels, and Addrs alone a Cluster.
type Redis struct {
	URL          string        `mapstructure:"url"`
	Addrs        []string      `mapstructure:"addrs"`
	MasterName   string        `mapstructure:"master_name"`
	Username     string        `mapstructure:"username"`
	Password     string        `mapstructure:"password"`
	PasswordFile string        `mapstructure:"password_file"`
	TLS          bool          `mapstructure:"tls"`
	Timeout      time.Duration `mapstructure:"timeout"`
	// CacheTTL is how long a replica may reuse a mailbox's record between
	// change notices; 0 reads Redis on every request.
	CacheTTL time.Duration `mapstructure:"cache_ttl"`
	// Prefix starts every key byokproxy writes; the default is "byok:".
	Prefix string `mapstructure:"prefix"`
}

// Keystore configures the age identities.
type Keystore struct {
	// IdentityFile holds one or more AGE-SECRET-KEY-1... lines. The first
	// line's recipient encrypts new keys; every line decrypts.
	IdentityFile string `mapstructure:"identity_file"`
}

// Auth configures mailbox tokens.
type Auth struct {
	// TokenSecrets sign and verify mailbox tokens. The first signs; every one
	// verifies, so a secret can be rotated without revoking tokens.
	TokenSecrets []string `mapstructure:"token_secrets"`
	// TrustMailboxHeader accepts X-Mailbox-Id in place of a token. Use it
	// only on a listener that no untrusted client can reach.
	TrustMailboxHeader bool `mapstructure:"trust_mailbox_header"`
}

// Limits bounds client requests.
type Limits struct {
	MaxBodyBytes   int64 `mapstructure:"max_body_bytes"`
	MaxHeaderBytes int   `mapstructure:"max_header_bytes"`
}

// Upstream configures calls to the providers.
type Upstream struct {
	// Timeout is the longest wait for an upstream's response headers, and
	// for the next bytes of a response body under way.
	Timeout time.Duration `mapstructure:"timeout"`
}

// Metering configures the shared pool's monthly allowance.
type Metering struct {
	// MonthlyTokenLimit is the default allowance per mailbox; 0 is unlimited.
	MonthlyTokenLimit int64 `mapstructure:"monthly_token_limit"`
	// RetentionMonths is how long monthly usage counters are kept.
	RetentionMonths int `mapstructure:"retention_months"`
	// ResponseTTL is how long the ids of responses created on the shared key
	// are remembered per mailbox.
	ResponseTTL time.Duration `mapstructure:"response_ttl"`
}

// Audit configures audit event delivery.
type Audit struct {
	// StreamMaxLen caps the Redis audit stream (approximate trimming).
	StreamMaxLen int64 `mapstructure:"stream_maxlen"`
	// Stdout also writes each event as a JSON line to standard output.
	Stdout bool `mapstructure:"stdout"`
	// QueueSize bounds the in-memory queue of events not yet written.
	QueueSize int `mapstructure:"queue_size"`
}

// Provider configures one provider.
type Provider struct {
	// Upstream is the provider's base URL; requests go nowhere else.
	Upstream string `mapstructure:"upstream"`
	// SharedKey is the platform key of the shared source; SharedKeyFile, when
	// set, is read instead. Empty disables the shared source.
	SharedKey     string `mapstructure:"shared_key"`
	SharedKeyFile string `mapstructure:"shared_key_file"`
	// SharedModels, when not empty, lists the only models allowed on shared.
	SharedModels []string `mapstructure:"shared_models"`
	// Organization and Project replace the client's OpenAI-Organization and
	// OpenAI-Project headers on shared requests; empty drops them.
	Organization string `mapstructure:"organization"`
	Project      string `mapstructure:"project"`
	// CAFile adds trusted roots for this upstream only.
	CAFile string `mapstructure:"ca_file"`
	// ProbeModel and ProbeTimeout configure the one-token key test.
	ProbeModel   string        `mapstructure:"probe_model"`
	ProbeTimeout time.Duration `mapstructure:"probe_timeout"`
}

// Defaults returns a Config holding the default of every key. The providers
// anthropic, openai and google are always present.
func Defaults() *Config {
	c := &Config{
		Listen:        "127.0.0.1:8080",
		ShutdownGrace: 30 * time.Second,
		LogLevel:      "info",
		LogFormat:     "json",
		Admin:         Admin{Listen: "127.0.0.1:8081"},
		Metrics:       Metrics{Listen: "127.0.0.1:9090"},
		Redis: Redis{
			URL:      "redis://127.0.0.1:6379/0",
			Timeout:  time.Second,
			CacheTTL: time.Second,
			Prefix:   "byok:",
		},
		Limits: Limits{
			MaxBodyBytes:   64 << 20,
			MaxHeaderBytes: 1 << 20,
		},
		// Non-streaming model calls send their response headers only when the
		// whole response is ready, so this wait covers a long generation.
		Upstream: Upstream{Timeout: 10 * time.Minute},
		Metering: Metering{
			RetentionMonths: 13,
			ResponseTTL:     30 * 24 * time.Hour,
		},
		Audit: Audit{
			StreamMaxLen: 1_000_000,
			QueueSize:    10_000,
		},
		Providers: make(map[string]*Provider, len(provider.Names)),
	}
	for _, name := range provider.Names {
		spec := provider.Lookup(name)
		c.Providers[name] = &Provider{
			Upstream:     spec.DefaultUpstream,
			ProbeModel:   spec.ProbeModel,
			ProbeTimeout: 10 * time.Second,
		}
	}
	return c
}

// Provider returns the settings of the named provider, or nil when the
// configuration has none.
func (c *Config) Provider(name string) *Provider {
	return c.Providers[name]
}

// SecretFile is a configured file that holds a secret.
type SecretFile struct {
	Key  string // the config key, such as "keystore.identity_file"
	Path string
}

// SecretFiles returns the files set in c that hold secrets: private keys,
// the identity, the admin token, the Redis password and the shared keys.
func (c *Config) SecretFiles() []SecretFile {
	all := []SecretFile{
		{"keystore.identity_file", c.Keystore.IdentityFile},
		{"admin.token_file", c.Admin.TokenFile},
		{"redis.password_file", c.Redis.PasswordFile},
		{"tls.key_file", c.TLS.KeyFile},
		{"admin.tls.key_file", c.Admin.TLS.KeyFile},
		{"forward.ca_key_file", c.Forward.CAKeyFile},
	}
	for _, name := range slices.Sorted(maps.Keys(c.Providers)) {
		if p := c.Providers[name]; p != nil {
			all = append(all, SecretFile{"providers." + name + ".shared_key_file", p.SharedKeyFile})
		}
	}
	var set []SecretFile
	for _, f := range all {
		if f.Path != "" {
			set = append(set, f)
		}
	}
	return set
}

// SlogLevel converts LogLevel to a slog.Level. A value that Validate rejects
// gives slog.LevelInfo.
func (c *Config) SlogLevel() slog.Level {
	switch c.LogLevel {
	case "debug":
		return slog.LevelDebug
	case "warn":
		return slog.LevelWarn
	case "error":
		return slog.LevelError
	}
	return slog.LevelInfo
}
