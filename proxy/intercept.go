package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/elazarl/goproxy"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/provider"
)

// Forward proxy timing and certificate limits.
const (
	// handshakeTimeout bounds the "200 Connection established" write and
	// the TLS handshake of an intercepted connection.
	handshakeTimeout = 10 * time.Second
	// tokenCheckTimeout bounds the Redis read of a mailbox's generation when
	// a CONNECT carries a token.
	tokenCheckTimeout = 2 * time.Second
	// leafLifetime is the validity of a minted host certificate, and
	// leafRenewBefore how long before its end a new one replaces it.
	leafLifetime    = 7 * 24 * time.Hour
	leafRenewBefore = 24 * time.Hour
	// maxLeafs bounds the certificate cache. CONNECT reaches configured
	// upstream hosts only, so it holds a handful unless reloads keep
	// changing the upstreams.
	maxLeafs = 64
)

// Forward is byokproxy's HTTPS_PROXY-style front. It accepts CONNECT only to
// the host:port of a configured https upstream and terminates the client's
// TLS with a certificate for that host signed by its CA. The Handler serves
// the decrypted requests as if they had arrived on the provider's route
// prefix: https://api.openai.com/v1/chat/completions is served as
// /openai/v1/chat/completions, with the same token check, key injection,
// streaming, audit events and metrics.
//
// A mailbox token in Proxy-Authorization (Basic, the password is the token)
// is checked at CONNECT time, where a wrong or revoked one gets 407, and
// then replaces whatever credential the intercepted requests carry. Without
// one, each intercepted request needs its token in its usual auth slot.
// Plain HTTP proxy requests and CONNECT to any other destination get 403.
// The proxy never opens a connection to the destination a client names.
//
// goproxy parses the CONNECT request and hijacks the connection. An
// http.Server of its own then serves the intercepted connections, in place
// of goproxy's MITM loop (v1.9.4), which takes a whole *http.Response from a
// handler and has no header size limit, idle timeout or graceful shutdown.
// Served this way, the Handler flushes each streamed event, gets
// full-duplex HTTP/1.1 and HTTP/2, and finishes its streams on shutdown.
type Forward struct {
	h     *Handler
	log   *slog.Logger
	leafs *leafCache

	connect *goproxy.ProxyHttpServer
	server  *http.Server
	ln      *tunnelListener
	// tunnels holds each intercepted *tls.Conn's CONNECT details until the
	// server's ConnContext picks them up.
	tunnels sync.Map
}

// tunnel is the CONNECT target and proxy token of one intercepted
// connection.
type tunnel struct {
	authority string // host:port, host in lower case
	host      string // authority without the port
	token     string // mailbox token from Proxy-Authorization, or empty
}

type tunnelKey struct{}

var errNoDirectDial = errors.New("the forward proxy never connects to a client-named destination")

// NewForward returns the forward proxy of h, minting host certificates with
// ca, whose private key must be a crypto.Signer. Serve it on its own
// listener and call Shutdown when stopping, after the listener's server
// stopped accepting.
func NewForward(h *Handler, ca tls.Certificate, log *slog.Logger) (*Forward, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	leafs, err := newLeafCache(ca)
	if err != nil {
		return nil, err
	}
	f := &Forward{h: h, log: log, leafs: leafs, ln: newTunnelListener()}

	gp := goproxy.NewProxyHttpServer()
	gp.Logger = goproxyLogger{log}
	gp.NonproxyHandler = http.HandlerFunc(f.rejectPlain)
	// Every CONNECT is either rejected or hijacked below, so goproxy's own
	// tunnels and round trips never run, and these dialers stop them if they
	// ever did.
	gp.Tr = &http.Transport{
		Proxy: nil,
		DialContext: func(context.Context, string, string) (net.Conn, error) {
			return nil, errNoDirectDial
		},
	}
	gp.ConnectDial = func(string, string) (net.Conn, error) { return nil, errNoDirectDial }
	gp.OnRequest().HandleConnectFunc(f.handleConnect)
	f.connect = gp

	maxHeader := h.settings.Load().maxHeaderBytes
	f.server = &http.Server{
		Handler:           http.HandlerFunc(f.serveIntercepted),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if t, ok := f.tunnels.LoadAndDelete(c); ok {
				ctx = context.WithValue(ctx, tunnelKey{}, t)
			}
			return ctx
		},
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	if maxHeader > 0 {
		// The Handler rejects oversized headers in the provider's shape, and
		// the server's own limit sits above it as a hard stop.
		f.server.MaxHeaderBytes = 2 * maxHeader
	}
	go f.server.Serve(f.ln)
	return f, nil
}

// ServeHTTP handles a request to the forward proxy listener: CONNECT goes to
// goproxy, everything else gets 403.
func (f *Forward) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodConnect {
		f.rejectPlain(w, r)
		return
	}
	f.connect.ServeHTTP(keepBufferedHijacker{w}, r)
}

// keepBufferedHijacker passes on the bytes that the server read past a
// CONNECT's header with the hijacked connection. goproxy drops the
// buffered reader that Hijack returns, and a client may send its TLS
// ClientHello in the same write as the CONNECT.
type keepBufferedHijacker struct {
	http.ResponseWriter
}

func (k keepBufferedHijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	hijacker, ok := k.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, http.ErrNotSupported
	}
	conn, rw, err := hijacker.Hijack()
	if err != nil {
		return nil, nil, err
	}
	if n := rw.Reader.Buffered(); n > 0 {
		buffered, _ := rw.Reader.Peek(n)
		conn = &earlyConn{Conn: conn, early: bytes.Clone(buffered)}
		rw = bufio.NewReadWriter(bufio.NewReader(conn), rw.Writer)
	}
	return conn, rw, nil
}

// StopIntercepting makes every later CONNECT get 503, also on client
// connections already open. Requests already running in intercepted
// connections go on, and those connections take no new request: the
// server of the intercepted connections starts its shutdown, which
// Shutdown then waits for.
func (f *Forward) StopIntercepting() {
	f.ln.Close()
	go f.server.Shutdown(context.Background())
}

// Shutdown stops intercepting new connections and waits, until ctx ends, for
// the requests and streams on intercepted connections to finish.
func (f *Forward) Shutdown(ctx context.Context) error {
	f.ln.Close()
	return f.server.Shutdown(ctx)
}

// Close closes every intercepted connection at once.
func (f *Forward) Close() error {
	f.ln.Close()
	return f.server.Close()
}

func (f *Forward) rejectPlain(w http.ResponseWriter, r *http.Request) {
	http.Error(w, "byokproxy forward proxy: only HTTPS through CONNECT to a configured provider upstream is allowed", http.StatusForbidden)
	// The host only: a query could carry a token.
	f.log.Info("forward proxy request rejected: not a CONNECT",
		"method", r.Method, "host", r.URL.Host, "remote", r.RemoteAddr, "status", http.StatusForbidden)
}

// handleConnect decides a CONNECT: 403 for a destination that is not a
// configured https upstream, 407 for a wrong or revoked token, and
// interception otherwise.
func (f *Forward) handleConnect(authority string, ctx *goproxy.ProxyCtx) (*goproxy.ConnectAction, string) {
	r := ctx.Req
	s := f.h.settings.Load()
	log := f.log.With("target", authority, "remote", r.RemoteAddr)

	if f.ln.closed() {
		ctx.Resp = connectError(http.StatusServiceUnavailable, "byokproxy forward proxy is shutting down; retry shortly")
		log.Info("forward proxy CONNECT rejected: shutting down", "status", http.StatusServiceUnavailable)
		return goproxy.RejectConnect, authority
	}

	t, ok := s.connectTarget(authority)
	if !ok {
		ctx.Resp = connectError(http.StatusForbidden,
			"byokproxy forward proxy: CONNECT to "+authority+" is not allowed; only the hosts of the configured provider upstreams are reachable")
		log.Info("forward proxy CONNECT rejected: not a configured upstream", "status", http.StatusForbidden)
		return goproxy.RejectConnect, authority
	}

	token, present, err := proxyToken(r.Header)
	if err == nil && present {
		err = f.checkToken(r.Context(), s.signer, token, log)
	}
	if err != nil {
		ctx.Resp = connectError(http.StatusProxyAuthRequired,
			"byokproxy forward proxy: "+err.Error()+"; use the mailbox token as the proxy password, as in http://mbx:TOKEN@HOST:PORT")
		log.Info("forward proxy CONNECT rejected: invalid proxy credential", "status", http.StatusProxyAuthRequired, "error", err)
		return goproxy.RejectConnect, authority
	}
	t.token = token

	log.Debug("forward proxy CONNECT intercepted", "token", present)
	return &goproxy.ConnectAction{
		Action: goproxy.ConnectHijack,
		Hijack: func(req *http.Request, client net.Conn, _ *goproxy.ProxyCtx) {
			f.intercept(req, client, t, log)
		},
	}, authority
}

// checkToken verifies a token from Proxy-Authorization, including its
// generation, so a revoked token is rejected before any TLS work. When
// Redis is unreachable, the CONNECT goes ahead, because every intercepted
// request reads the generation again and gets 503 while Redis is down.
func (f *Forward) checkToken(ctx context.Context, signer *mailbox.Signer, token string, log *slog.Logger) error {
	id, gen, err := signer.Verify(token)
	if err != nil {
		return errors.New("invalid mailbox token in Proxy-Authorization")
	}
	ctx, cancel := context.WithTimeout(ctx, tokenCheckTimeout)
	defer cancel()
	current, err := f.h.store.Generation(ctx, id)
	if err != nil {
		log.Warn("forward proxy could not check the token generation; each request checks it again", "mailbox", string(id), "error", err)
		return nil
	}
	if current != gen {
		return errors.New("mailbox token in Proxy-Authorization is revoked")
	}
	return nil
}

// intercept sends the CONNECT's 200, completes the TLS handshake as the
// target host and hands the connection to the server of intercepted
// connections.
func (f *Forward) intercept(r *http.Request, client net.Conn, t *tunnel, log *slog.Logger) {
	client.SetDeadline(time.Now().Add(handshakeTimeout))
	established := fmt.Sprintf("HTTP/%d.%d 200 Connection established\r\n\r\n", max(r.ProtoMajor, 1), r.ProtoMinor)
	if _, err := io.WriteString(client, established); err != nil {
		log.Debug("forward proxy client left before the tunnel opened", "error", err)
		client.Close()
		return
	}
	conn := tls.Server(client, &tls.Config{
		MinVersion: tls.VersionTLS12,
		NextProtos: []string{"h2", "http/1.1"},
		// The certificate names the CONNECT host whatever server name the
		// client sends, so a client expecting another name fails to verify.
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return f.leafs.get(t.host)
		},
	})
	if err := conn.HandshakeContext(r.Context()); err != nil {
		log.Warn("forward proxy TLS handshake with the client failed; the client must trust the CA in forward.ca_cert_file", "error", err)
		conn.Close()
		return
	}
	client.SetDeadline(time.Time{})

	f.tunnels.Store(conn, t)
	if !f.ln.push(conn) {
		f.tunnels.Delete(conn)
		conn.Close()
		log.Info("forward proxy is shutting down; intercepted connection closed")
	}
}

// serveIntercepted serves one decrypted request through the Handler on the
// route prefix of the upstream that the tunnel reached.
func (f *Forward) serveIntercepted(w http.ResponseWriter, r *http.Request) {
	t, _ := r.Context().Value(tunnelKey{}).(*tunnel)
	if t == nil {
		// Only connections that went through intercept reach this server.
		http.Error(w, "byokproxy forward proxy: connection state lost", http.StatusInternalServerError)
		return
	}
	if !f.h.settings.Load().rebase(t.authority, r.URL) {
		msg := fmt.Sprintf("no configured provider upstream at https://%s serves path %s", t.authority, r.URL.Path)
		provider.Guess(r).WriteError(w, provider.NotFound, msg, 0)
		f.log.Info("forward proxy request rejected: no upstream route", "target", t.authority, "path", r.URL.Path, "status", http.StatusNotFound)
		return
	}
	if t.token != "" {
		// The proxy credential names the mailbox; whatever the SDK put in
		// its key slot (often a placeholder) is dropped.
		for _, name := range tokenHeaders {
			r.Header.Del(name)
		}
		r.URL.RawQuery = withoutQueryParam(r.URL.RawQuery, "key")
		r.Header.Set("Authorization", "Bearer "+t.token)
	}
	f.h.ServeHTTP(w, r)
}

// tokenHeaders are the headers mailboxToken reads a token from.
var tokenHeaders = []string{"Authorization", "X-Api-Key", "X-Goog-Api-Key", "Api-Key"}

// connectTarget returns the tunnel of a CONNECT to authority when authority
// is the host:port of a configured https upstream.
func (s *settings) connectTarget(authority string) (*tunnel, bool) {
	host, port, err := net.SplitHostPort(authority)
	if err != nil || host == "" || port == "" {
		return nil, false
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	authority = net.JoinHostPort(host, port)
	for _, up := range s.upstreams {
		if config.UpstreamAuthority(up.base) == authority {
			return &tunnel{authority: authority, host: host}, true
		}
	}
	return nil, false
}

// rebase rewrites the URL of a request intercepted on a tunnel to authority
// to the route prefix of the upstream it addresses: https://HOST/v1/models
// becomes /openai/v1/models. An upstream whose base URL has a path, such as
// https://gateway.example/openai, takes only paths below it, and that path
// is removed, as a client that uses the upstream's own base URL sends it.
// When several upstreams share the host, the longest matching base path
// wins, then the first provider in provider.Names order.
func (s *settings) rebase(authority string, u *url.URL) bool {
	var best *upstream
	var bestName, bestPath string
	for _, name := range provider.Names {
		up := s.upstreams[name]
		if up == nil || config.UpstreamAuthority(up.base) != authority {
			continue
		}
		base := strings.TrimSuffix(up.base.EscapedPath(), "/")
		if !underPath(u.EscapedPath(), base) {
			continue
		}
		if best == nil || len(base) > len(bestPath) {
			best, bestName, bestPath = up, name, base
		}
	}
	if best == nil {
		return false
	}
	prefix := "/" + bestName
	if bestPath != "" {
		plain := strings.TrimSuffix(best.base.Path, "/")
		if !underPath(u.Path, plain) {
			return false
		}
		u.Path = prefix + strings.TrimPrefix(u.Path, plain)
	} else {
		u.Path = prefix + u.Path
	}
	if u.RawPath != "" {
		u.RawPath = prefix + strings.TrimPrefix(u.RawPath, bestPath)
	}
	return true
}

// underPath reports whether path is base or below it. Every path is below
// the empty base.
func underPath(path, base string) bool {
	if !strings.HasPrefix(path, "/") {
		return false
	}
	return base == "" || path == base || strings.HasPrefix(path, base+"/")
}

// proxyToken returns the mailbox token of a Proxy-Authorization header:
// the password of Basic credentials (the user name when the password is
// empty, for proxy URLs written as http://TOKEN@HOST:PORT), or a Bearer
// token. present is false when the header is absent.
func proxyToken(h http.Header) (token string, present bool, err error) {
	v := strings.TrimSpace(h.Get("Proxy-Authorization"))
	if v == "" {
		return "", false, nil
	}
	scheme, cred, _ := strings.Cut(v, " ")
	cred = strings.TrimSpace(cred)
	switch {
	case strings.EqualFold(scheme, "Basic"):
		raw, err := base64.StdEncoding.DecodeString(cred)
		if err != nil {
			return "", true, errors.New("invalid Basic credentials in Proxy-Authorization")
		}
		user, password, _ := strings.Cut(string(raw), ":")
		token = password
		if token == "" {
			token = user
		}
	case strings.EqualFold(scheme, "Bearer"):
		token = cred
	default:
		return "", true, errors.New("unsupported Proxy-Authorization scheme: use Basic or Bearer")
	}
	if token == "" {
		return "", true, errors.New("no mailbox token in Proxy-Authorization")
	}
	return token, true, nil
}

// connectError is the response goproxy writes before closing a rejected
// CONNECT.
func connectError(status int, msg string) *http.Response {
	body := msg + "\n"
	resp := &http.Response{
		StatusCode: status,
		Proto:      "HTTP/1.1",
		ProtoMajor: 1,
		ProtoMinor: 1,
		Header: http.Header{
			"Content-Type":           {"text/plain; charset=utf-8"},
			"X-Content-Type-Options": {"nosniff"},
		},
		Body:          io.NopCloser(strings.NewReader(body)),
		ContentLength: int64(len(body)),
		Close:         true,
	}
	if status == http.StatusProxyAuthRequired {
		resp.Header.Set("Proxy-Authenticate", `Basic realm="byokproxy"`)
	}
	return resp
}

// goproxyLogger sends goproxy's warnings to slog. goproxy prints only
// warnings unless its Verbose field is set.
type goproxyLogger struct{ log *slog.Logger }

func (l goproxyLogger) Printf(format string, v ...any) {
	l.log.Warn("forward proxy: " + strings.TrimSpace(fmt.Sprintf(format, v...)))
}

// tunnelListener hands intercepted connections to an http.Server.
type tunnelListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newTunnelListener() *tunnelListener {
	return &tunnelListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

// push hands c to the server, or returns false once the listener is closed.
func (l *tunnelListener) push(c net.Conn) bool {
	if l.closed() {
		return false
	}
	select {
	case l.conns <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *tunnelListener) closed() bool {
	select {
	case <-l.done:
		return true
	default:
		return false
	}
}

func (l *tunnelListener) Accept() (net.Conn, error) {
	if l.closed() {
		return nil, net.ErrClosed
	}
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *tunnelListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *tunnelListener) Addr() net.Addr { return tunnelAddr{} }

type tunnelAddr struct{}

func (tunnelAddr) Network() string { return "tunnel" }
func (tunnelAddr) String() string  { return "forward-proxy-tunnels" }

// leafCache mints and keeps one certificate per intercepted host.
type leafCache struct {
	ca    *x509.Certificate
	chain [][]byte // the CA's certificate chain, sent after each leaf
	key   crypto.Signer
	now   func() time.Time

	mu    sync.Mutex
	leafs map[string]*tls.Certificate
}

func newLeafCache(ca tls.Certificate) (*leafCache, error) {
	if len(ca.Certificate) == 0 {
		return nil, errors.New("forward proxy CA: no certificate")
	}
	cert := ca.Leaf
	if cert == nil {
		var err error
		if cert, err = x509.ParseCertificate(ca.Certificate[0]); err != nil {
			return nil, fmt.Errorf("forward proxy CA: %w", err)
		}
	}
	if !cert.IsCA || (cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0) {
		return nil, errors.New("forward proxy CA: the certificate is not a CA that may sign certificates")
	}
	if time.Now().After(cert.NotAfter) {
		return nil, fmt.Errorf("forward proxy CA: the certificate expired at %s; create a new one with \"byokproxy ca new\"", cert.NotAfter.UTC().Format(time.RFC3339))
	}
	key, ok := ca.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("forward proxy CA: unsupported private key type %T", ca.PrivateKey)
	}
	return &leafCache{ca: cert, chain: ca.Certificate, key: key, now: time.Now, leafs: map[string]*tls.Certificate{}}, nil
}

// get returns the certificate of host, minting one when there is none or
// the cached one is about to expire.
func (c *leafCache) get(host string) (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	if leaf := c.leafs[host]; leaf != nil && now.Before(leaf.Leaf.NotAfter.Add(-leafRenewBefore)) {
		return leaf, nil
	}
	leaf, err := c.mint(host, now)
	if err != nil {
		return nil, err
	}
	if len(c.leafs) >= maxLeafs {
		clear(c.leafs)
	}
	c.leafs[host] = leaf
	return leaf, nil
}

func (c *leafCache) mint(host string, now time.Time) (*tls.Certificate, error) {
	notAfter := now.Add(leafLifetime)
	if notAfter.After(c.ca.NotAfter) {
		notAfter = c.ca.NotAfter
	}
	if !notAfter.After(now) {
		return nil, fmt.Errorf("forward proxy CA expired at %s", c.ca.NotAfter.UTC().Format(time.RFC3339))
	}
	notBefore := now.Add(-time.Hour) // tolerates clients whose clocks run behind
	if notBefore.Before(c.ca.NotBefore) {
		notBefore = c.ca.NotBefore
	}

	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: host},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	if ip := net.ParseIP(host); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	} else {
		tmpl.DNSNames = []string{host}
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.ca, &key.PublicKey, c.key)
	if err != nil {
		return nil, fmt.Errorf("sign certificate for %s: %w", host, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &tls.Certificate{
		Certificate: append([][]byte{der}, c.chain...),
		PrivateKey:  key,
		Leaf:        leaf,
	}, nil
}
