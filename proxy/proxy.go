// Package proxy is byokproxy's request path. It routes /{provider}/... to the
// provider's configured upstream and identifies the mailbox from its token.
// It resolves the mailbox's key source and swaps the client's credentials for
// the provider key. It streams the response back as it arrives and reads
// token usage from a copy of it for metering, audit and metrics.
package proxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"iter"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/byokproxy/byokproxy/audit"
	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/metrics"
	"github.com/byokproxy/byokproxy/provider"
)

// Options are the parts a Handler is built from.
type Options struct {
	Config  *config.Config
	Store   *keystore.Store
	Signer  *mailbox.Signer
	Audit   *audit.Writer
	Metrics *metrics.Metrics
	Logger  *slog.Logger
	// AttachedStreams is how many provider requests may be in their
	// handlers at once before a new stream is taken off the HTTP server (see
	// detach.go). A detached stream has left its handler, so this bounds the
	// streams that stay attached. Zero means DefaultAttachedStreams, and a
	// negative value detaches every stream that can be.
	AttachedStreams int
}

// DefaultAttachedStreams is the default of Options.AttachedStreams. The
// streams kept attached use at most about 2.5 MiB more than detached ones
// would (about 20 KiB each), and they save the CPU that detaching costs
// (docs/benchmarks.md).
const DefaultAttachedStreams = 128

// Handler serves the provider routes, /healthz and /readyz.
type Handler struct {
	store   *keystore.Store
	audit   *audit.Writer
	metrics *metrics.Metrics
	log     *slog.Logger
	// ownedTTL is how long the ids of responses and containers created on
	// the shared key are remembered.
	ownedTTL time.Duration

	// settings holds what a reload may replace: signer, limits, upstreams
	// and shared keys. Requests load it once and use that value throughout.
	settings atomic.Pointer[settings]

	// streams are the responses running detached from the HTTP server.
	streams detachedStreams
	// pending is the shared usage charged here and not yet reported written.
	pending pendingUsage
	// running counts the provider requests whose handler runs, so that
	// Drain can wait for them to record their exchanges.
	running atomic.Int64
	// cutting is set once shutdown's grace period has run out.
	cutting atomic.Bool
	// attachedStreams is Options.AttachedStreams, with its default applied.
	attachedStreams int64
}

type settings struct {
	signer             *mailbox.Signer
	trustMailboxHeader bool
	maxBodyBytes       int64
	maxHeaderBytes     int
	monthlyLimit       int64
	upstreams          map[string]*upstream
}

// upstream is one provider's configured target.
type upstream struct {
	spec      *provider.Spec
	base      *url.URL
	sharedKey string
	models    map[string]bool
	org       string
	project   string
	proxy     *httputil.ReverseProxy
	// streamProxy forwards stream requests: the same as proxy, flushing
	// after every read whatever the response, with a smaller copy buffer,
	// because a stream holds its buffer while it stays open.
	streamProxy *httputil.ReverseProxy
	// idleTimeout bounds the wait for the next response bytes.
	idleTimeout time.Duration
	series      *metrics.Series
}

// New returns a handler for opts.
func New(opts Options) (*Handler, error) {
	h := &Handler{store: opts.Store, audit: opts.Audit, metrics: opts.Metrics, log: opts.Logger,
		ownedTTL: opts.Config.Metering.ResponseTTL}
	if h.ownedTTL <= 0 {
		h.ownedTTL = 30 * 24 * time.Hour
	}
	h.attachedStreams = int64(opts.AttachedStreams)
	if h.attachedStreams == 0 {
		h.attachedStreams = DefaultAttachedStreams
	}
	// Each Redis call of a request's admission ends after one
	// redis.timeout, without the client's retry.
	h.store.SetCallTimeout(opts.Config.Redis.Timeout)
	if h.log == nil {
		h.log = slog.New(slog.DiscardHandler)
	}
	h.log = slog.New(withLazyAttrs(h.log.Handler()))
	if err := h.Apply(opts.Config, opts.Signer); err != nil {
		return nil, err
	}
	return h, nil
}

// Apply installs a new configuration for the requests that start after it.
// Requests in flight finish with the configuration they started with.
func (h *Handler) Apply(cfg *config.Config, signer *mailbox.Signer) error {
	s := &settings{
		signer:             signer,
		trustMailboxHeader: cfg.Auth.TrustMailboxHeader,
		maxBodyBytes:       cfg.Limits.MaxBodyBytes,
		maxHeaderBytes:     cfg.Limits.MaxHeaderBytes,
		monthlyLimit:       cfg.Metering.MonthlyTokenLimit,
		upstreams:          map[string]*upstream{},
	}
	for _, name := range provider.Names {
		pc := cfg.Provider(name)
		if pc == nil {
			continue
		}
		up, err := h.newUpstream(provider.Lookup(name), pc, cfg.Upstream.Timeout)
		if err != nil {
			return err
		}
		s.upstreams[name] = up
		h.metrics.AddProvider(name)
	}
	h.settings.Store(s)
	return nil
}

func (h *Handler) newUpstream(spec *provider.Spec, pc *config.Provider, timeout time.Duration) (*upstream, error) {
	base, err := url.Parse(pc.Upstream)
	if err != nil {
		return nil, fmt.Errorf("providers.%s.upstream: %w", spec.Name, err)
	}
	transport, err := newTransport(pc.CAFile, timeout)
	if err != nil {
		return nil, fmt.Errorf("providers.%s.ca_file: %w", spec.Name, err)
	}
	up := &upstream{
		spec: spec, base: base, sharedKey: pc.SharedKey, idleTimeout: timeout,
		org: pc.Organization, project: pc.Project, series: h.metrics.Series(spec.Name),
	}
	if len(pc.SharedModels) > 0 {
		up.models = map[string]bool{}
		for _, m := range pc.SharedModels {
			up.models[m] = true
		}
	}
	// A response of known length that is not an event stream is flushed
	// when it ends, and a long one passes on as the server's buffer fills.
	// With -1, the reverse proxy would flush after every read. Its first
	// flush, run at once by a timer on a goroutine of its own, would also
	// send the header in a write of its own. Together that made one write
	// call and one goroutine more per JSON response. The reverse proxy
	// flushes event streams and bodies of unknown length after every read,
	// whatever FlushInterval is set to.
	up.proxy = &httputil.ReverseProxy{
		Rewrite:        h.rewrite,
		Transport:      &tracedTransport{next: transport},
		ModifyResponse: h.modifyResponse,
		ErrorHandler:   h.upstreamError,
		ErrorLog:       log.New(scrubbedLog{h.log}, "", 0),
		BufferPool:     copyBuffers,
	}
	stream := *up.proxy
	stream.FlushInterval = -1
	stream.BufferPool = streamBuffers
	up.streamProxy = &stream
	return up, nil
}

// copyBuffers lend the buffers responses are copied through, where
// ReverseProxy would allocate 32 KiB per response. A JSON body takes one
// read and write per 8 KiB. A stream holds its buffer for as long as it
// stays open, and most events are a few hundred bytes, so 2 KiB takes one
// read for nearly every event at a quarter of the memory.
var (
	copyBuffers   = &bufferPool{size: 8 << 10}
	streamBuffers = &bufferPool{size: 2 << 10}
)

type bufferPool struct {
	size int
	pool sync.Pool
}

func (p *bufferPool) Get() []byte {
	if b, ok := p.pool.Get().(*[]byte); ok {
		return *b
	}
	return make([]byte, p.size)
}

func (p *bufferPool) Put(b []byte) {
	if cap(b) == p.size {
		b = b[:p.size]
		p.pool.Put(&b)
	}
}

// newTransport returns the transport of one upstream. The default transport
// keeps two idle connections per host, so under load it would keep opening
// new ones. A proxy talks to one host per provider, so it keeps many.
func newTransport(caFile string, headerTimeout time.Duration) (*http.Transport, error) {
	t := &http.Transport{
		Proxy: nil, // requests go to the configured upstream, never through an environment proxy
		DialContext: (&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          1024,
		MaxIdleConnsPerHost:   512,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: headerTimeout,
		ExpectContinueTimeout: time.Second,
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, err
		}
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, errors.New("no PEM certificate found in " + caFile)
		}
		t.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return t, nil
}

// ServeHTTP routes a request.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// Go's HTTP/1 server frames a request that has both Content-Length and
	// Transfer-Encoding by the latter and keeps the connection open, which
	// RFC 9112 section 6.1 forbids. A front proxy that framed it by
	// Content-Length would send the rest as the next request. The server
	// removes Content-Length before the handler runs, so every request with
	// a Transfer-Encoding closes its connection.
	if r.ProtoMajor == 1 && len(r.TransferEncoding) > 0 {
		w.Header().Set("Connection", "close")
	}
	switch r.URL.Path {
	case "/healthz", "/readyz":
		w.Header().Set("Content-Type", "text/plain")
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			// A probe sent with another method is misconfigured, and a 200
			// would hide that.
			w.Header().Set("Allow", "GET, HEAD")
			w.WriteHeader(http.StatusMethodNotAllowed)
			w.Write([]byte("use GET\n"))
			return
		}
		if r.URL.Path == "/readyz" {
			h.ready(w, r)
			return
		}
		w.Write([]byte("ok\n"))
		return
	}
	h.running.Add(1)
	defer h.running.Add(-1)
	h.serveProvider(w, r)
}

// ready returns 200 when an identity is loaded and Redis responds to PING
// and cannot evict keys.
func (h *Handler) ready(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if h.store.Identities() == nil || h.store.Identities().Len() == 0 {
		w.WriteHeader(http.StatusServiceUnavailable)
		w.Write([]byte("no age identity loaded\n"))
		return
	}
	if err := h.store.Ping(ctx); err != nil {
		h.log.Warn("readiness check failed: redis unreachable", "error", err)
		w.WriteHeader(http.StatusServiceUnavailable)
		w.Write([]byte("redis unreachable\n"))
		return
	}
	if err := h.store.CheckEviction(ctx); err != nil {
		h.log.Warn("readiness check failed", "error", err)
		w.WriteHeader(http.StatusServiceUnavailable)
		if errors.Is(err, keystore.ErrEvicting) {
			w.Write([]byte("redis may evict keys: set maxmemory-policy to noeviction\n"))
		} else {
			w.Write([]byte("redis unreachable\n"))
		}
		return
	}
	w.Write([]byte("ok\n"))
}

// newRequestID returns a random request id. It is never taken from the
// client: the id names the marker that keeps a request's usage from being
// counted twice, so a client that repeated an id would be charged once.
func newRequestID() string {
	var b [12]byte
	idRandom.read(b[:])
	return hex.EncodeToString(b[:])
}

// idRandom hands out bytes from crypto/rand in blocks, so that a request id
// costs a copy rather than a call into crypto/rand, which took about 3 µs
// per request in a perf profile of bench/run.sh's stream load on 2 vCPUs.
// Every byte is handed out once.
var idRandom = &randomBlock{}

type randomBlock struct {
	mu   sync.Mutex
	buf  [4096]byte
	used int
}

func (r *randomBlock) read(p []byte) {
	r.mu.Lock()
	if r.used == 0 || r.used+len(p) > len(r.buf) {
		rand.Read(r.buf[:])
		r.used = 0
	}
	r.used += copy(p, r.buf[r.used:])
	r.mu.Unlock()
}

// splitRoute returns the provider name and the rest of the path (no leading
// slash) of a request path such as /openai/v1/chat/completions.
func splitRoute(path string) (prov, rest string, ok bool) {
	trimmed, found := strings.CutPrefix(path, "/")
	if !found {
		return "", "", false
	}
	prov, rest, _ = strings.Cut(trimmed, "/")
	return prov, rest, prov != ""
}

// unsafePath reports a path that could address something other than what
// it seems to once the upstream decodes it: dot segments, and encoded dots,
// slashes or backslashes.
func unsafePath(u *url.URL) bool {
	raw := strings.ToLower(u.EscapedPath())
	if strings.Contains(raw, "%2e") || strings.Contains(raw, "%2f") || strings.Contains(raw, "%5c") ||
		strings.Contains(raw, "\\") || strings.Contains(raw, "//") {
		return true
	}
	for seg := range strings.SplitSeq(u.Path, "/") {
		if seg == "." || seg == ".." {
			return true
		}
	}
	return false
}

// methodOverrideHeaders are the headers with which a client asks a server to
// treat a POST as another method. Google's API front end honours the first.
var methodOverrideHeaders = []string{"X-Http-Method-Override", "X-Http-Method", "X-Method-Override"}

// overridesMethod reports whether a request names a method for the upstream
// other than its own. The proxy checks the shared key's endpoints, and records
// each request, by its own method, so that method must be the one the
// upstream acts on.
func overridesMethod(r *http.Request) bool {
	for _, name := range methodOverrideHeaders {
		if _, ok := r.Header[name]; ok {
			return true
		}
	}
	// A name can hide the word behind percent escapes (%68ttpMethod).
	if !strings.Contains(strings.ToLower(r.URL.RawQuery), "httpmethod") && !strings.Contains(r.URL.RawQuery, "%") {
		return false
	}
	for name := range queryParams(r.URL.RawQuery) {
		if strings.EqualFold(strings.TrimPrefix(name, "$"), "httpMethod") {
			return true
		}
	}
	return false
}

// queryParams yields each parameter of a raw query as a lenient server may
// read it. Some servers split parameters at ';' as well as '&' and trim
// spaces from names, so this does too. Names and values are percent-decoded
// where they decode.
func queryParams(rawQuery string) iter.Seq2[string, string] {
	return func(yield func(name, value string) bool) {
		for pair := range strings.FieldsFuncSeq(rawQuery, func(c rune) bool { return c == '&' || c == ';' }) {
			name, value, _ := strings.Cut(pair, "=")
			if unescaped, err := url.QueryUnescape(name); err == nil {
				name = unescaped
			}
			if unescaped, err := url.QueryUnescape(value); err == nil {
				value = unescaped
			}
			if !yield(strings.TrimSpace(name), value) {
				return
			}
		}
	}
}

// upgrades reports whether a request requests a protocol switch, as a
// WebSocket handshake does.
func upgrades(r *http.Request) bool {
	if len(r.Header.Values("Upgrade")) > 0 {
		return true
	}
	for _, v := range r.Header.Values("Connection") {
		for token := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(token), "upgrade") {
				return true
			}
		}
	}
	return false
}

// forwardedMethods are the methods the provider APIs use. TRACE in
// particular is not forwarded: a server responds to it by echoing the
// request, which would carry the injected key back to the client.
var forwardedMethods = map[string]bool{
	http.MethodGet: true, http.MethodHead: true, http.MethodPost: true, http.MethodPut: true,
	http.MethodPatch: true, http.MethodDelete: true, http.MethodOptions: true,
}

// headerBytes estimates the size of the request's header section.
func headerBytes(r *http.Request) int {
	n := len(r.Method) + len(r.RequestURI) + 12
	for k, vs := range r.Header {
		for _, v := range vs {
			n += len(k) + len(v) + 4
		}
	}
	return n
}

// scrubbedLog writes the lines of the reverse proxy's own log to the
// proxy's log at debug level. They quote errors of the transport, which can
// quote what the upstream sent, and the request's key is not known there.
// So every text that looks like a provider key is replaced (see
// findKeyLike), which covers each key a provider issues.
type scrubbedLog struct{ log *slog.Logger }

func (l scrubbedLog) Write(p []byte) (int, error) {
	line := replaceFound(bytes.TrimRight(p, "\n"), findKeyLike)
	l.log.Debug(string(line))
	return len(p), nil
}
