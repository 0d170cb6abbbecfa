package config

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"filippo.io/age"
	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/provider"
)

// minSecretBytes is the shortest admin token or token secret accepted: 16
// random bytes are beyond guessing.
const minSecretBytes = 16

// Problem is one invalid setting.
type Problem struct {
	// Key is the dotted config key, such as "redis.url", or the config file's
	// path for a problem with the file as a whole.
	Key string
	// Message describes what is wrong and Fix what to do about it.
	Message string
	Fix     string
}

// String formats p as "config: KEY: MESSAGE; FIX".
func (p Problem) String() string {
	return "config: " + p.Key + ": " + p.Message + "; " + p.Fix
}

// Error lists every problem found in one configuration, one per line.
type Error struct {
	Problems []Problem
}

func (e *Error) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}

type problems []Problem

func (ps *problems) add(key, message, fix string) {
	*ps = append(*ps, Problem{Key: key, Message: message, Fix: fix})
}

func (ps problems) err() error {
	if len(ps) == 0 {
		return nil
	}
	return &Error{Problems: ps}
}

// Validate checks the whole configuration and returns an *Error listing
// every problem, or nil. It reads the identity, certificate and CA files it
// names. It expects the *_file secrets to be read already, as Load does, so a
// set admin.token_file counts as a token.
//
// With Dev set, the admin token, identity file, token secrets and Redis
// address may be missing, because the caller generates them, but every
// listener must be on a loopback address.
func (c *Config) Validate() error {
	var ps problems
	c.validate(&ps)
	return ps.err()
}

func (c *Config) validate(ps *problems) {
	c.validateListeners(ps)
	validateKeyPair(ps, "tls.cert_file", "tls.key_file", c.TLS)
	validateKeyPair(ps, "admin.tls.cert_file", "admin.tls.key_file", c.Admin.TLS)
	c.validateForward(ps)
	c.validateRedis(ps)
	c.validateIdentityFile(ps)
	c.validateSecrets(ps)
	c.validateScalars(ps)
	c.validateProviders(ps)
}

func (c *Config) validateListeners(ps *problems) {
	listeners := []struct {
		key, addr, example string
	}{
		{"listen", c.Listen, "127.0.0.1:8080"},
		{"admin.listen", c.Admin.Listen, "127.0.0.1:8081"},
		{"metrics.listen", c.Metrics.Listen, "127.0.0.1:9090"},
		{"forward.listen", c.Forward.Listen, "127.0.0.1:8443"},
	}
	usedBy := map[string]string{}
	for _, l := range listeners {
		if l.addr == "" {
			// An empty forward.listen turns the forward proxy off.
			if l.key != "forward.listen" {
				ps.add(l.key, "missing", "set a host:port address such as "+l.example)
			}
			continue
		}
		host, port, err := net.SplitHostPort(l.addr)
		if err != nil {
			ps.add(l.key, fmt.Sprintf("%q is not a host:port address", l.addr),
				"set one such as "+l.example)
			continue
		}
		n, err := strconv.Atoi(port)
		if err != nil || n < 0 || n > 65535 {
			ps.add(l.key, fmt.Sprintf("port %q of %q is not a number from 0 to 65535", port, l.addr),
				"set an address such as "+l.example)
			continue
		}
		if c.Dev && !isLoopback(host) {
			ps.add(l.key, l.addr+" is not a loopback address, and --dev listens on loopback only",
				"use 127.0.0.1 or localhost, or run without --dev")
		}
		// Port 0 picks a free port for each listener, so it may repeat.
		if n == 0 {
			continue
		}
		if other, ok := usedBy[l.addr]; ok {
			ps.add(l.key, l.addr+" is also the address of "+other, "give each listener its own port")
			continue
		}
		usedBy[l.addr] = l.key
	}
}

// isLoopback reports whether host names the loopback interface. An empty
// host listens on every interface, so it is not loopback.
func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// validateKeyPair checks a certificate and key pair and returns its leaf
// certificate, or nil when the pair is unset or unusable.
func validateKeyPair(ps *problems, certKey, keyKey string, pair TLS) *x509.Certificate {
	switch {
	case pair.CertFile == "" && pair.KeyFile == "":
		return nil
	case pair.CertFile == "":
		ps.add(certKey, "missing while "+keyKey+" is set", "set both files or neither")
		return nil
	case pair.KeyFile == "":
		ps.add(keyKey, "missing while "+certKey+" is set", "set both files or neither")
		return nil
	}
	// The files are read and the certificate parsed one by one, so that a
	// problem names the setting of the file at fault.
	const hint = "set a PEM certificate file and the PEM file of its private key"
	certPEM, err := os.ReadFile(pair.CertFile)
	if err != nil {
		ps.add(certKey, err.Error(), hint)
		return nil
	}
	keyPEM, err := os.ReadFile(pair.KeyFile)
	if err != nil {
		ps.add(keyKey, err.Error(), hint)
		return nil
	}
	if !hasCertificate(certPEM) {
		ps.add(certKey, pair.CertFile+" holds no PEM certificate", hint)
		return nil
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		ps.add(keyKey, err.Error(), "set the PEM file of the private key of "+pair.CertFile)
		return nil
	}
	return cert.Leaf
}

// hasCertificate reports whether data contains a PEM certificate that parses.
func hasCertificate(data []byte) bool {
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return false
		}
		if block.Type == "CERTIFICATE" {
			_, err := x509.ParseCertificate(block.Bytes)
			return err == nil
		}
	}
}

func (c *Config) validateForward(ps *problems) {
	if c.Forward.Listen != "" {
		c.validateForwardRoutes(ps)
	}
	pair := TLS{CertFile: c.Forward.CACertFile, KeyFile: c.Forward.CAKeyFile}
	if c.Forward.Listen != "" && !c.Dev && pair.CertFile == "" && pair.KeyFile == "" {
		ps.add("forward.ca_cert_file", "missing while forward.listen is set",
			"set forward.ca_cert_file and forward.ca_key_file to the CA that clients trust")
		return
	}
	ca := validateKeyPair(ps, "forward.ca_cert_file", "forward.ca_key_file", pair)
	if ca == nil {
		return
	}
	if !ca.IsCA || (ca.KeyUsage != 0 && ca.KeyUsage&x509.KeyUsageCertSign == 0) {
		ps.add("forward.ca_cert_file", pair.CertFile+" is not a CA certificate that may sign certificates",
			"use a certificate with the CA basic constraint and, if it lists key usages, certificate signing")
	}
}

// validateForwardRoutes reports https upstreams that share their host and
// base path. The forward proxy finds a tunnelled request's provider by the
// host the client connected to and the path it sent, so it would send every
// request for the later provider of such a pair to the earlier one.
func (c *Config) validateForwardRoutes(ps *problems) {
	seen := map[string]string{}
	for _, name := range provider.Names {
		p := c.Provider(name)
		if p == nil {
			continue
		}
		u, err := url.Parse(p.Upstream)
		if err != nil {
			continue
		}
		authority := UpstreamAuthority(u)
		if authority == "" {
			continue
		}
		route := authority + strings.TrimSuffix(u.EscapedPath(), "/")
		if first, ok := seen[route]; ok {
			ps.add("providers."+name+".upstream", "has the host and path of providers."+first+".upstream, so the forward proxy would send its requests to "+first,
				"give each provider its own upstream host or base path, or leave forward.listen empty")
			continue
		}
		seen[route] = name
	}
}

// UpstreamAuthority returns the lower-case host:port an https upstream
// listens on, or "" for any other scheme: a client that reaches an
// upstream through the forward proxy's CONNECT speaks TLS to it.
func UpstreamAuthority(base *url.URL) string {
	if base.Scheme != "https" {
		return ""
	}
	port := base.Port()
	if port == "" {
		port = "443"
	}
	return net.JoinHostPort(strings.TrimSuffix(strings.ToLower(base.Hostname()), "."), port)
}

func (c *Config) validateRedis(ps *problems) {
	r := c.Redis
	if r.Timeout <= 0 {
		ps.add("redis.timeout", "must be more than 0, got "+r.Timeout.String(), "set a duration such as 1s")
	}
	// A change must reach every replica within a second, and the TTL is
	// what bounds it when a change notice is lost.
	if r.CacheTTL < 0 || r.CacheTTL > time.Second {
		ps.add("redis.cache_ttl", "must be between 0 and 1s, got "+r.CacheTTL.String(), "set 1s, or 0 to read Redis on every request")
	}

	// Each mailbox's keys carry its id as a Cluster hash tag ({id}); a brace
	// in the prefix would become the tag instead and split a mailbox's keys
	// across slots.
	if strings.ContainsAny(r.Prefix, "{}") {
		ps.add("redis.prefix", fmt.Sprintf("%q contains a brace", r.Prefix), `use letters, digits and ":" such as "byok:"`)
	}
	if r.MasterName != "" && len(r.Addrs) == 0 {
		ps.add("redis.master_name", "set without redis.addrs", "list the Sentinel addresses in redis.addrs")
	}
	for _, addr := range r.Addrs {
		if _, port, err := net.SplitHostPort(addr); err != nil || port == "" {
			ps.add("redis.addrs", fmt.Sprintf("%q is not a host:port address", addr),
				"list addresses such as redis-1:6379")
		}
	}

	// --dev runs an in-process store, so the address is unused there.
	if c.Dev || len(r.Addrs) > 0 {
		return
	}
	if r.URL == "" {
		ps.add("redis.url", "missing", "set a URL such as redis://127.0.0.1:6379/0, or list servers in redis.addrs")
		return
	}

	const fix = "set a URL such as redis://HOST:6379/0, or rediss://HOST:6380/0 for TLS"
	// The parse error of net/url quotes the whole URL, password included, so
	// only the redacted form goes into the message.
	if _, err := url.Parse(r.URL); err != nil {
		ps.add("redis.url", redactURL(r.URL)+" is not a valid URL", fix)
		return
	}
	if _, err := redis.ParseURL(r.URL); err != nil {
		ps.add("redis.url", fmt.Sprintf("%s is invalid: %v", redactURL(r.URL), err), fix)
	}
}

// redactURL returns raw with any password replaced by "xxxxx", for messages
// and logs. A URL that does not parse is shown only when it has no user info.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err == nil {
		return u.Redacted()
	}
	if strings.Contains(raw, "@") {
		return "(URL hidden because it may contain a password)"
	}
	return raw
}

func (c *Config) validateIdentityFile(ps *problems) {
	const key = "keystore.identity_file"
	path := c.Keystore.IdentityFile
	if path == "" {
		if !c.Dev {
			ps.add(key, "missing", `create one with "byokproxy identity new" and set its path (or run with --dev)`)
		}
		return
	}
	f, err := os.Open(path)
	if err != nil {
		ps.add(key, err.Error(), `create one with "byokproxy identity new" or fix the path`)
		return
	}
	defer f.Close()
	ids, err := age.ParseIdentities(f)
	if err != nil {
		ps.add(key, path+": "+err.Error(), `write one AGE-SECRET-KEY-1... line per identity, as "byokproxy identity new" does`)
		return
	}
	for _, id := range ids {
		if _, ok := id.(*age.X25519Identity); ok {
			return
		}
	}
	ps.add(key, path+" has no X25519 identity (AGE-SECRET-KEY-1...)", `add one with "byokproxy identity new"`)
}

func (c *Config) validateSecrets(ps *problems) {
	switch {
	case c.Admin.Token != "":
		validateSecret(ps, "admin.token", "", c.Admin.Token)
	case c.Admin.TokenFile == "" && !c.Dev:
		ps.add("admin.token", "missing", "set admin.token or admin.token_file (or run with --dev)")
	}

	if len(c.Auth.TokenSecrets) == 0 && !c.Dev {
		ps.add("auth.token_secrets", "missing",
			fmt.Sprintf("set at least one random secret of %d or more bytes, such as the output of \"openssl rand -hex 32\" (or run with --dev)", minSecretBytes))
	}
	for i, s := range c.Auth.TokenSecrets {
		validateSecret(ps, "auth.token_secrets", fmt.Sprintf("entry %d ", i+1), s)
	}

	if c.Auth.TrustMailboxHeader {
		for _, l := range []struct{ key, addr string }{{"listen", c.Listen}, {"forward.listen", c.Forward.Listen}} {
			host, _, err := net.SplitHostPort(l.addr)
			if l.addr == "" || err != nil || isLoopback(host) {
				continue
			}
			ps.add("auth.trust_mailbox_header",
				fmt.Sprintf("%s %s is not a loopback address, so any client that reaches it could name a mailbox in X-Mailbox-Id", l.key, l.addr),
				"bind "+l.key+" to 127.0.0.1 or set auth.trust_mailbox_header to false")
		}
	}
}

// validateSecret checks the length and characters of a secret without
// putting any part of it in the message. entry names the list entry, if any,
// as "entry 2 ". Secrets end up in HTTP headers, so
// they must be printable ASCII without spaces.
func validateSecret(ps *problems, key, entry, s string) {
	if len(s) < minSecretBytes {
		ps.add(key, fmt.Sprintf("%sis %d bytes, shorter than %d", entry, len(s), minSecretBytes),
			`use a random value such as the output of "openssl rand -hex 32"`)
		return
	}
	if !isHeaderToken(s) {
		ps.add(key, entry+"contains a space, a control character or non-ASCII text",
			"use printable ASCII without spaces")
	}
}

// isHeaderToken reports whether s is non-empty printable ASCII without
// spaces, and so can go into an HTTP header value as it is.
func isHeaderToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] > '~' {
			return false
		}
	}
	return true
}

func (c *Config) validateScalars(ps *problems) {
	if !slices.Contains([]string{"debug", "info", "warn", "error"}, c.LogLevel) {
		ps.add("log_level", fmt.Sprintf("%q is not a log level", c.LogLevel), "use debug, info, warn or error")
	}
	if c.LogFormat != "json" && c.LogFormat != "text" {
		ps.add("log_format", fmt.Sprintf("%q is not a log format", c.LogFormat), "use json or text")
	}
	if c.ShutdownGrace < 0 {
		ps.add("shutdown_grace", "must not be negative, got "+c.ShutdownGrace.String(), "set a duration such as 30s")
	}
	if c.Limits.MaxBodyBytes <= 0 {
		ps.add("limits.max_body_bytes", fmt.Sprintf("must be more than 0, got %d", c.Limits.MaxBodyBytes),
			"set a size in bytes such as 67108864 (64 MiB)")
	}
	if c.Limits.MaxHeaderBytes <= 0 {
		ps.add("limits.max_header_bytes", fmt.Sprintf("must be more than 0, got %d", c.Limits.MaxHeaderBytes),
			"set a size in bytes such as 1048576 (1 MiB)")
	}
	if c.Upstream.Timeout <= 0 {
		ps.add("upstream.timeout", "must be more than 0, got "+c.Upstream.Timeout.String(), "set a duration such as 10m")
	}
	if c.Metering.MonthlyTokenLimit < 0 {
		ps.add("metering.monthly_token_limit", fmt.Sprintf("must not be negative, got %d", c.Metering.MonthlyTokenLimit),
			"set a number of tokens, or 0 for unlimited")
	}
	if c.Metering.RetentionMonths < 1 {
		ps.add("metering.retention_months", fmt.Sprintf("must be at least 1, got %d", c.Metering.RetentionMonths),
			"set a number of months such as 13")
	}
	if c.Metering.ResponseTTL <= 0 {
		ps.add("metering.response_ttl", "must be more than 0, got "+c.Metering.ResponseTTL.String(),
			"set a duration such as 720h")
	}
	if c.Audit.StreamMaxLen <= 0 {
		ps.add("audit.stream_maxlen", fmt.Sprintf("must be more than 0, got %d", c.Audit.StreamMaxLen),
			"set a number of events such as 1000000")
	}
	if c.Audit.QueueSize <= 0 {
		ps.add("audit.queue_size", fmt.Sprintf("must be more than 0, got %d", c.Audit.QueueSize),
			"set a number of events such as 10000")
	}
}

func (c *Config) validateProviders(ps *problems) {
	names := make([]string, 0, len(c.Providers))
	for name := range c.Providers {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		if provider.Lookup(name) == nil {
			ps.add("providers."+name, "unknown provider", "use "+providerList())
		}
	}
	for _, name := range provider.Names {
		p := c.Providers[name]
		if p == nil {
			ps.add("providers."+name, "missing", "start from config.Defaults(), which sets every provider")
			continue
		}
		p.validate(ps, "providers."+name+".", provider.Lookup(name))
	}
}

// providerList returns the provider names as "anthropic, openai or google".
func providerList() string {
	n := provider.Names
	if len(n) == 1 {
		return n[0]
	}
	return strings.Join(n[:len(n)-1], ", ") + " or " + n[len(n)-1]
}

func (p *Provider) validate(ps *problems, prefix string, spec *provider.Spec) {
	validateUpstream(ps, prefix+"upstream", p.Upstream, spec.DefaultUpstream)

	if p.SharedKey != "" && !isHeaderToken(p.SharedKey) {
		ps.add(prefix+"shared_key", "contains a space, a control character or non-ASCII text",
			"set the key exactly as the provider issued it")
	}
	for i, m := range p.SharedModels {
		if strings.TrimSpace(m) == "" {
			ps.add(prefix+"shared_models", fmt.Sprintf("entry %d is empty", i+1), "remove it or name a model")
		}
	}
	for _, h := range []struct{ key, value string }{{"organization", p.Organization}, {"project", p.Project}} {
		if h.value != "" && !isHeaderToken(h.value) {
			ps.add(prefix+h.key, "contains a space, a control character or non-ASCII text",
				"set the id exactly as the provider shows it")
		}
	}

	if p.CAFile != "" {
		pem, err := os.ReadFile(p.CAFile)
		switch {
		case err != nil:
			ps.add(prefix+"ca_file", err.Error(), "fix the path, or leave it empty to trust the system roots only")
		case !x509.NewCertPool().AppendCertsFromPEM(pem):
			ps.add(prefix+"ca_file", p.CAFile+" contains no PEM certificate", "set a file of PEM CERTIFICATE blocks")
		}
	}

	if p.ProbeModel == "" {
		ps.add(prefix+"probe_model", "missing", "set a model the key test may call, such as "+spec.ProbeModel)
	}
	if p.ProbeTimeout <= 0 {
		ps.add(prefix+"probe_timeout", "must be more than 0, got "+p.ProbeTimeout.String(), "set a duration such as 10s")
	}
}

// validateUpstream accepts only a base URL, because a query or fragment would
// be lost when paths are joined and user info would be a second credential.
func validateUpstream(ps *problems, key, raw, example string) {
	fix := "set an absolute URL such as " + example
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		ps.add(key, fmt.Sprintf("%q is not an http(s) URL", redactURL(raw)), fix)
		return
	}
	switch {
	case u.User != nil:
		ps.add(key, u.Redacted()+" contains user info", "remove it and put the key in shared_key")
	case u.RawQuery != "" || u.ForceQuery:
		ps.add(key, fmt.Sprintf("%q has a query string", raw), "remove it; "+fix)
	case u.Fragment != "":
		ps.add(key, fmt.Sprintf("%q has a fragment", raw), "remove it; "+fix)
	}
}
