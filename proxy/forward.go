package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/http/httputil"
	"strconv"
	"strings"
	"time"

	"github.com/byokproxy/byokproxy/audit"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/metrics"
	"github.com/byokproxy/byokproxy/provider"
	"github.com/byokproxy/byokproxy/usage"
)

// forward sends the request upstream and streams the response back, then
// records the exchange. Its setup and ending are separate functions because
// its frame stays below the reverse proxy while a stream is open, so it must
// stay small (see admit).
func (h *Handler) forward(w http.ResponseWriter, r *http.Request, x *exchange, log *slog.Logger) {
	out := h.startForward(w, r, x, log)
	// endForward runs even when the reverse proxy aborts the handler with
	// http.ErrAbortHandler after an upstream breaks off mid-stream.
	defer h.endForward(r, x, log)
	reverseProxy := x.up.proxy
	if x.stream {
		reverseProxy = x.up.streamProxy
	}
	// The reverse proxy's 1xx hook keeps the writer it is given for as long
	// as the upstream request lives, and the writer keeps the server's
	// connection state. detach can clear this reference.
	x.cw = clientWriter{ResponseWriter: w, x: x}
	x.w = &x.cw
	reverseProxy.ServeHTTP(x.w, out)
	// The reverse proxy returns normally only after it has written all it
	// read (and flushed it, on a stream), and aborts the handler on a failed
	// write.
	if !x.detached {
		x.delivered = x.bodyEnded
	}
}

// startForward prepares the upstream request of x.
func (h *Handler) startForward(w http.ResponseWriter, r *http.Request, x *exchange, log *slog.Logger) *http.Request {
	x.up.series.InFlight().Inc()
	if x.source == keystore.SourceShared && tracksOwnership(x.up.spec.Name, x.rest) {
		x.owner = &ownerRecorder{h: h, x: x, ctx: r.Context(), log: log, responses: x.up.spec.Name == provider.OpenAI}
	}

	// Once the response header is flushed, the HTTP/1 server closes the
	// request body unless full duplex is on, and the transport then drops
	// the upstream connection, cutting the stream (golang/go#40747). Not
	// every ResponseWriter supports it (HTTP/2 is always full duplex).
	http.NewResponseController(w).EnableFullDuplex()

	parent := r.Context()
	// Detaching a stream costs CPU (a Hijack, two goroutines, and handing
	// the connection back afterwards) and saves memory only while the stream
	// is open, which matters when many are. So a stream stays with its
	// handler while few requests are in theirs, as every stream through
	// HTTP/2 does.
	x.detachable = detachable(r, x) && h.running.Load() > h.attachedStreams
	if x.detachable {
		h.streams.watch(r.Context().Value(http.ServerContextKey).(*http.Server))
		parent = context.WithoutCancel(parent)
		x.in, x.log = r, log
	}
	// A provider sends a non-streamed reply's header once it has generated
	// the whole reply, so its usage is owed. On the shared key a client that
	// leaves after that does not end the upstream request, and
	// tapBody.Close reads the rest for the usage, which the estimate from
	// bytes received would miss.
	x.readsOn = x.source == keystore.SourceShared && !x.stream && !x.detachable
	if x.readsOn {
		parent = context.WithoutCancel(parent)
	}
	ctx, cancel := context.WithCancelCause(parent)
	x.cancel = cancel
	if x.readsOn {
		x.unfollow = context.AfterFunc(r.Context(), func() {
			if !x.responded.Load() {
				cancel(nil)
			}
		})
	}
	if x.detachable {
		x.unfollow = context.AfterFunc(r.Context(), func() { cancel(nil) })
		if x.streamedBody != nil {
			x.wrote = make(chan struct{})
		}
	}
	ctx = context.WithValue(ctx, exchangeKey{}, x)
	out := r.WithContext(ctx)
	if x.streamedBody != nil {
		out.Body = x.streamedBody
	}
	return out
}

// endForward releases what startForward took and records the exchange,
// unless the response was detached, which then does both when it ends.
func (h *Handler) endForward(r *http.Request, x *exchange, log *slog.Logger) {
	if x.unfollow != nil {
		x.unfollow()
	}
	if x.detached {
		return
	}
	x.up.series.InFlight().Dec()
	// A client that closes its connection once it has the whole response
	// ends the request's context too, so only a response not delivered in
	// full counts as a disconnect.
	if r.Context().Err() != nil && x.errText == "" && !x.delivered {
		x.cancelled = true
		x.errText = h.goneText(x)
	}
	h.finish(x, metrics.SourceLabel(x.source), log)

	// With full duplex on, draining an unread body after the handler returns
	// races the read of the next request (golang/go#68560), so it is closed here.
	r.Body.Close()
	x.cancel(nil)
}

// rewrite builds the upstream request: the configured upstream only, the
// client's credentials removed, the key injected.
func (h *Handler) rewrite(pr *httputil.ProxyRequest) {
	x := exchangeOf(pr.In.Context())
	out := pr.Out
	base := x.up.base

	// The target is always the configured upstream: the client's Host
	// header, absolute-form target or path cannot change the host.
	out.URL.Scheme = base.Scheme
	out.URL.Host = base.Host
	out.URL.Path = strings.TrimSuffix(base.Path, "/") + "/" + x.rest
	out.URL.RawPath = ""
	out.URL.RawQuery = stripQueryCredentials(out.URL.RawQuery, x.source == keystore.SourceShared)
	out.Host = ""

	for _, name := range credentialHeaders {
		out.Header.Del(name)
	}
	// The credential, billing and format checks read the header section.
	// Trailers sent after a chunked body would reach the upstream unchecked,
	// and no provider API reads any.
	out.Trailer = nil
	if x.source == keystore.SourceShared {
		// The shared key's checks match header names with dashes. A front
		// end that reads "_" as "-", as CGI-style gateways do, would take
		// X_Goog_User_Project for the header they remove, so on the shared
		// key no name with "_" goes upstream. The own key passes the
		// client's other headers unchanged.
		for name := range out.Header {
			if strings.Contains(name, "_") {
				delete(out.Header, name)
			}
		}
	}
	// The reverse proxy drops the client's forwarding headers before
	// Rewrite. The upstream gets them as the client sent them, like the
	// client's other headers: the proxy itself routes by none of them.
	for _, name := range forwardingHeaders {
		if values, ok := pr.In.Header[name]; ok {
			out.Header[name] = values
		}
	}
	if x.source == keystore.SourceShared && x.up.spec.Name == provider.Google {
		// It names the Google Cloud project to bill, which on the shared
		// key is the platform's choice.
		out.Header.Del("X-Goog-User-Project")
	}
	if x.source == keystore.SourceShared && x.up.spec.Name == provider.OpenAI {
		out.Header.Del("OpenAI-Organization")
		out.Header.Del("OpenAI-Project")
		if x.up.org != "" {
			out.Header.Set("OpenAI-Organization", x.up.org)
		}
		if x.up.project != "" {
			out.Header.Set("OpenAI-Project", x.up.project)
		}
	}
	x.up.spec.SetAuth(out.Header, x.keyText)
	if rebasesURLs(x.up.spec.Name, pr.In.Method, x.rest) {
		x.rebaseBase = routeURL(pr.In, x.up.spec.Name)
	}

	if x.body != nil && x.source == keystore.SourceShared {
		// The shared key's checks read the body as JSON. A client's
		// Connection header can have the reverse proxy remove the
		// Content-Type they accepted, so the upstream gets it from here.
		out.Header.Set("Content-Type", "application/json")
	}
	if x.body != nil {
		// The server sent the client its 100 Continue when the body was read.
		// Passed on, the expectation would bring the upstream's 100 Continue
		// to the client as a second one, and make the transport hold back a
		// body that is already here until that came. A body that streams
		// through keeps it, so that the client sends it only once the
		// upstream has sent its 100 Continue.
		out.Header.Del("Expect")
		out.Body = io.NopCloser(bytes.NewReader(x.body))
		if x.stream {
			// A stream can stay open for minutes, so its request body is
			// dropped once sent rather than held that long.
			out.Body = &sentBody{rest: x.body}
		}
		out.ContentLength = int64(len(x.body))
		out.TransferEncoding = nil
		out.Header.Set("Content-Length", strconv.Itoa(len(x.body)))
		out.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(x.body)), nil }
	}

	// The usage tap can decode gzip only. Without an Accept-Encoding the
	// transport requests gzip itself and decodes it transparently. With one,
	// it passes the encoded body through, and the tap decodes a copy in
	// another goroutine, which could see a created id only after the client
	// does. So a response whose ids the proxy records always comes decoded,
	// as does one whose URLs it rewrites.
	if acceptsGzip(pr.In.Header) && !x.injectUsage && x.owner == nil && x.rebaseBase == "" {
		out.Header.Set("Accept-Encoding", "gzip")
	} else {
		out.Header.Del("Accept-Encoding")
	}
}

// gotFirstResponseByte and wroteRequest are the exchange's client trace
// hooks, which tracedTransport installs.
func (x *exchange) gotFirstResponseByte() { x.ttfb = time.Now() }

// wroteRequest runs on the transport's writer goroutine, maybe while the
// handler's goroutine records a disconnect, hence the atomic.
func (x *exchange) wroteRequest(info httptrace.WroteRequestInfo) {
	x.sent.Store(info.Err == nil)
	if x.wrote != nil {
		x.wroteOnce.Do(func() { close(x.wrote) })
	}
}

// tracedTransport adds the exchange's client trace hooks to each upstream
// request. httputil.ReverseProxy puts a trace of its own, with only
// Got1xxResponse set, on every outgoing request (Go 1.26). A second trace
// from httptrace.WithClientTrace would make it merge the two through
// reflection, which took about 6 µs per request in a perf profile of
// bench/run.sh's stream load on 2 vCPUs. The reverse proxy allocates its
// trace per request, so the hooks are set on it in place. It also keeps the
// response's Content-* headers from being named in Connection (see
// keepContentHeaders).
type tracedTransport struct{ next http.RoundTripper }

func (t *tracedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if x := exchangeOf(req.Context()); x != nil {
		trace := httptrace.ContextClientTrace(req.Context())
		if trace != nil && trace.GotFirstResponseByte == nil && trace.WroteRequest == nil {
			trace.GotFirstResponseByte = x.gotFirstResponseByte
			trace.WroteRequest = x.wroteRequest
		} else {
			req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
				GotFirstResponseByte: x.gotFirstResponseByte,
				WroteRequest:         x.wroteRequest,
			}))
		}
	}
	resp, err := t.next.RoundTrip(req)
	if resp != nil {
		keepContentHeaders(resp.Header)
	}
	return resp, err
}

// keepContentHeaders removes the Content-* names from a response's
// Connection header. The reverse proxy removes every header that
// Connection names before ModifyResponse runs. Without Content-Encoding or
// Content-Type, the usage tap would read a gzip body or an event stream as
// plain JSON and count no usage.
func keepContentHeaders(h http.Header) {
	values, ok := h["Connection"]
	if !ok {
		return
	}
	remaining := make([]string, 0, len(values))
	for _, v := range values {
		var tokens []string
		for token := range strings.SplitSeq(v, ",") {
			if token = strings.TrimSpace(token); token != "" && !strings.HasPrefix(strings.ToLower(token), "content-") {
				tokens = append(tokens, token)
			}
		}
		if len(tokens) > 0 {
			remaining = append(remaining, strings.Join(tokens, ", "))
		}
	}
	if len(remaining) == 0 {
		delete(h, "Connection")
		return
	}
	h["Connection"] = remaining
}

// forwardingHeaders are the headers that httputil.ReverseProxy removes from
// the outgoing request in Rewrite mode.
var forwardingHeaders = []string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"}

// sentBody is a request body that lets go of its bytes once the Transport
// has read them all. Close leaves them alone, because HTTP/2 may call it
// from another goroutine while a read is still running.
type sentBody struct{ rest []byte }

func (b *sentBody) Read(p []byte) (int, error) {
	if len(b.rest) == 0 {
		b.rest = nil
		return 0, io.EOF
	}
	n := copy(p, b.rest)
	b.rest = b.rest[n:]
	return n, nil
}

func (b *sentBody) Close() error { return nil }

func acceptsGzip(h http.Header) bool {
	for _, v := range h.Values("Accept-Encoding") {
		for part := range strings.SplitSeq(v, ",") {
			coding, params, _ := strings.Cut(strings.TrimSpace(part), ";")
			if strings.EqualFold(strings.TrimSpace(coding), "gzip") && !strings.Contains(strings.ReplaceAll(params, " ", ""), "q=0") {
				return true
			}
		}
	}
	return false
}

// maxErrorBody bounds an upstream error body read for scrubbing.
const maxErrorBody = 1 << 20

// modifyResponse wraps a successful response body in the usage tap, and
// scrubs any form of the injected key from an error body.
func (h *Handler) modifyResponse(resp *http.Response) error {
	x := exchangeOf(resp.Request.Context())
	x.status = resp.StatusCode
	x.responded.Store(true)
	if x.ttfb.IsZero() {
		x.ttfb = time.Now()
	}
	x.up.series.TTFB().Observe(x.ttfb.Sub(x.start).Seconds())

	// The response has begun, so the body will not be sent again.
	x.body = nil

	// The proxy's request id is its own. A 101 response's header reaches
	// the client without passing clientWriter.
	resp.Header.Del(requestIDHeader)
	if x.rebaseBase != "" {
		rebaseUploadURLs(resp.Header, x.up.base, x.rebaseBase)
	}
	scrubHeaders(resp.Header, x.keyText, resp.StatusCode < 200 || resp.StatusCode >= 300)
	// The reverse proxy announces the names of declared trailers in the
	// header; their values arrive with the end of the body (see tapBody).
	scrubHeaders(resp.Trailer, x.keyText, false)
	if resp.StatusCode == http.StatusSwitchingProtocols {
		return nil
	}
	if resp.StatusCode >= 300 && resp.StatusCode != http.StatusNotModified {
		return scrubErrorBody(resp, x)
	}
	if x.rebaseBase != "" && x.up.spec.Name == provider.Anthropic && resp.StatusCode == http.StatusOK {
		rebaseBatchURLs(resp, x)
	}

	encoding := strings.ToLower(resp.Header.Get("Content-Encoding"))
	plain := encoding == "" || encoding == "identity"
	x.tap = usage.NewTap(x.up.spec.Name, resp.Header.Get("Content-Type"))
	// A request body the proxy could not read went upstream as it was, so
	// the response's Content-Type is what shows that it requested a stream.
	if x.tap.EventStream() {
		x.stream = true
	}
	tb := &tapBody{ReadCloser: resp.Body, ctx: resp.Request.Context(), h: h, x: x, resp: resp}
	if x.owner == nil && plain {
		// Unencoded bytes go straight to the tap, whose Write returns no
		// error, and decoded stays 0 because it would equal received.
		tb.tap = x.tap
	} else {
		var sink io.Writer = x.tap
		if x.owner != nil {
			x.owner.tap = x.tap
			sink = io.MultiWriter(x.tap, x.owner)
		}
		tb.sink = usage.NewDecoder(encoding, &countingWriter{w: sink, n: &x.decoded})
	}
	if idle := x.up.idleTimeout; idle > 0 {
		// An upstream that stops sending mid-stream would hold the client
		// forever. So upstream.timeout bounds each wait for the next bytes,
		// as it bounds the wait for the headers. Only time spent waiting in
		// a read counts, never the time the proxy spends writing to a
		// client that reads slowly or not at all.
		tb.idle = idle
		tb.stall = newStallWatch(tb.ctx, idle, func() { x.cancel(errUpstreamStalled) })
	}
	var body io.ReadCloser = tb
	// The tap reads the upstream bytes before the filter removes the usage
	// chunk that the proxy requested for itself.
	if x.injectUsage && x.tap.EventStream() && plain {
		body = usage.NewUsageChunkFilter(body)
		// The filter removes bytes, so a length the upstream declared would
		// make the client wait for bytes that never come.
		resp.ContentLength = -1
		resp.Header.Del("Content-Length")
	}
	resp.Body = body
	if x.detachable && h.detach(resp, x) {
		return errDetached
	}
	return nil
}

// tapBody copies what the client is sent to the usage tap as it passes.
type tapBody struct {
	io.ReadCloser
	ctx context.Context
	h   *Handler
	x   *exchange
	// Exactly one of tap and sink is set. tap gets the bytes as they are,
	// and sink decodes them first or passes them to more than the tap.
	tap  *usage.Tap
	sink io.WriteCloser
	// resp is the upstream response, whose Trailer the transport fills in
	// before the body's last read returns.
	resp *http.Response
	// stall cancels the upstream request when no bytes arrive for idle.
	stall *stallWatch
	idle  time.Duration
}

// countingWriter counts the bytes written through it into n.
type countingWriter struct {
	w io.Writer
	n *int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	*c.n += int64(len(p))
	return c.w.Write(p)
}

// errUpstreamStalled is the cancellation cause of a response whose upstream
// sent nothing for upstream.timeout.
var errUpstreamStalled = errors.New("upstream stalled")

func (b *tapBody) Read(p []byte) (int, error) {
	if b.stall != nil {
		b.stall.readStarted()
	}
	n, err := b.ReadCloser.Read(p)
	if b.stall != nil {
		b.stall.readDone()
	}
	if err != nil && err != io.EOF {
		err = scrubbedError(err, b.x.keyText)
	}
	if n > 0 {
		b.x.received += int64(n)
		if b.tap != nil {
			b.tap.Write(p[:n])
		} else {
			b.sink.Write(p[:n])
		}
	}
	if err == io.EOF {
		b.x.bodyEnded = true
		// The reverse proxy passes the trailers on once the body has ended,
		// declared or not, and ModifyResponse runs before their values exist.
		scrubHeaders(b.resp.Trailer, b.x.keyText, true)
		for _, name := range forbiddenTrailers {
			delete(b.resp.Trailer, name)
		}
		// After the tap has the last bytes, which often come with EOF.
		b.h.chargePending(b.x)
	}
	if err != nil && err != io.EOF && b.x.errText == "" {
		// A client that hangs up cancels the upstream request, and the
		// upstream body then fails with the context's error.
		if cause := context.Cause(b.ctx); errors.Is(cause, errUpstreamStalled) {
			b.x.errText = "upstream stalled: no response bytes for " + b.idle.String()
		} else if cause == errShutdown {
			b.x.errText = "stream cut off at shutdown"
		} else if b.ctx.Err() != nil {
			b.x.cancelled = true
			b.x.errText = b.h.goneText(b.x)
		} else {
			b.x.errText = "upstream response cut off: " + err.Error()
		}
	}
	return n, err
}

// forbiddenTrailers are the fields that must not come as trailers, because
// they frame, route or describe the message, modify a request or carry
// credentials (the list of https://developer.mozilla.org/en-US/docs/Web/HTTP/Headers/Trailer,
// and Connection), and that a client might act on all the same.
var forbiddenTrailers = []string{
	"Content-Length", "Transfer-Encoding", "Trailer", "Host", "Connection",
	"Content-Type", "Content-Encoding", "Content-Range",
	"Cache-Control", "Max-Forwards", "Te", "Expect", "Range", "If-Match", "If-None-Match",
	"If-Modified-Since", "If-Unmodified-Since", "If-Range",
	"Authorization", "Proxy-Authorization", "Www-Authenticate", "Proxy-Authenticate",
	"Set-Cookie", "Cookie", "Keep-Alive", "Upgrade", "Proxy-Connection",
}

// scrubbedError returns err, or an error wrapping it whose text has key
// scrubbed from it when the text holds the key. The reverse proxy logs the
// errors of reading the upstream body, and the transport's errors quote
// what the upstream sent, such as a malformed trailer line.
func scrubbedError(err error, key string) error {
	text := err.Error()
	if clean := scrubText(text, key); clean != text {
		return &keyScrubbedError{err: err, text: clean}
	}
	return err
}

type keyScrubbedError struct {
	err  error
	text string
}

func (e *keyScrubbedError) Error() string { return e.text }
func (e *keyScrubbedError) Unwrap() error { return e.err }

// maxReadOn bounds what tapBody.Close reads of a reply whose client left.
const maxReadOn = 64 << 20

func (b *tapBody) Close() error {
	if b.x.readsOn && !b.x.stream && !b.x.bodyEnded && b.ctx.Err() == nil {
		// The client left mid-reply. The stall watch still bounds each read.
		io.Copy(io.Discard, io.LimitReader(b, maxReadOn))
	}
	if b.stall != nil {
		b.stall.stop()
	}
	if b.sink != nil {
		b.sink.Close()
	}
	return b.ReadCloser.Close()
}

// scrubErrorBody replaces every form of the injected key that scrubKey
// finds in an upstream error body, plain or decoded from its encoding.
func scrubErrorBody(resp *http.Response, x *exchange) error {
	// The body is read whole before any of it is sent, so upstream.timeout
	// bounds the whole read, as it bounds the headers.
	if idle := x.up.idleTimeout; idle > 0 {
		stall := time.AfterFunc(idle, func() { x.cancel(errUpstreamStalled) })
		defer stall.Stop()
	}
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody+1))
	resp.Body.Close()
	// The body is replaced, and the upstream's trailers go with it.
	resp.Trailer = nil
	if err != nil {
		x.errText = "reading upstream error body: " + err.Error()
	}
	cut := err != nil || len(raw) > maxErrorBody
	raw = raw[:min(len(raw), maxErrorBody)]
	if encoding := strings.Join(resp.Header.Values("Content-Encoding"), ","); encoding != "" {
		// Bytes that do not decode are dropped, never passed on: without
		// their Content-Encoding the scrubber cannot see a key in them, but
		// a client that decompresses them can. So is a body in a coding
		// the proxy does not decode.
		var decoded []byte
		zr, zerr := usage.NewReader(encoding, bytes.NewReader(raw))
		switch {
		case errors.Is(zerr, usage.ErrUnsupportedEncoding):
			decoded = x.up.spec.ErrorBody(provider.BadGateway, fmt.Sprintf(
				"the provider's error body used Content-Encoding %q, which the proxy cannot check for the key, so it was removed", encoding))
			cut = false
		case zerr == nil:
			var derr error
			decoded, derr = io.ReadAll(io.LimitReader(zr, maxErrorBody+1))
			cut = cut || derr != nil || len(decoded) > maxErrorBody
			decoded = decoded[:min(len(decoded), maxErrorBody)]
		}
		raw = decoded
		resp.Header.Del("Content-Encoding")
	}
	if charset := unreadableCharset(resp.Header.Get("Content-Type")); charset != "" {
		// In UTF-16 or UTF-32 the key's bytes are interleaved with zeros,
		// which the scrubber does not look for, while a client that decodes
		// the charset reads the key. Providers send UTF-8.
		raw = x.up.spec.ErrorBody(provider.BadGateway, fmt.Sprintf(
			"the provider's error body used charset %q, which the proxy cannot check for the key, so it was removed", charset))
		resp.Header.Set("Content-Type", "application/json")
		cut = false
	}
	clean := scrubKey(raw, x.keyText)
	if cut {
		clean = scrubCutEnd(clean)
	}
	resp.Body = io.NopCloser(bytes.NewReader(clean))
	// The scrubbed body is all in memory, so the copy reaches its end.
	x.bodyEnded = true
	resp.ContentLength = int64(len(clean))
	resp.Header.Set("Content-Length", strconv.Itoa(len(clean)))
	if x.errText == "" {
		x.errText = upstreamStatusText(resp.StatusCode)
	}
	return nil
}

// unreadableCharset returns the charset that contentType names when the
// scrubber cannot read text in it: any charset but UTF-8 and ASCII, in any
// letter case. A Content-Type that does not parse but mentions a charset
// counts as unreadable too, since a client may still find the charset in
// it. It returns "" otherwise.
func unreadableCharset(contentType string) string {
	_, params, err := mime.ParseMediaType(contentType)
	if err != nil {
		if strings.Contains(strings.ToLower(contentType), "charset") {
			return contentType
		}
		return ""
	}
	charset, ok := params["charset"]
	if !ok {
		return ""
	}
	switch strings.ToLower(strings.TrimSpace(charset)) {
	case "utf-8", "utf8", "us-ascii", "ascii":
		return ""
	}
	return charset
}

// upstreamStatusText is the audit error of a response whose only fault is
// the upstream's own error status.
func upstreamStatusText(status int) string {
	return "upstream status " + strconv.Itoa(status)
}

// upstreamError writes the error response when the upstream could not be
// reached or did not send response headers in time.
func (h *Handler) upstreamError(w http.ResponseWriter, r *http.Request, err error) {
	if err == errDetached {
		return
	}
	x := exchangeOf(r.Context())
	log := h.log.With("request_id", x.id, "provider", x.up.spec.Name, "mailbox", string(x.mailbox))
	var tooBig *http.MaxBytesError
	switch {
	case r.Context().Err() != nil:
		// The client went away, so no response is written. Returning would
		// make the server send 200 with an empty body, which a client that
		// only shut its sending side down would read as a success.
		// Aborting closes the connection without a response.
		x.cancelled = true
		x.status = statusClientClosed
		x.errText = h.goneText(x)
		panic(http.ErrAbortHandler)
	case errors.As(err, &tooBig):
		x.errText = "request body over the limit"
		x.up.spec.WriteError(w, provider.TooLarge, "request body exceeds the limit of "+strconv.FormatInt(tooBig.Limit, 10)+" bytes", 0)
		x.status = http.StatusRequestEntityTooLarge
	case isTimeout(err):
		x.errText = "upstream timed out"
		x.up.spec.WriteError(w, provider.GatewayTimeout, x.up.spec.Title+" did not respond in time", 0)
		x.status = http.StatusGatewayTimeout
	default:
		x.errText = "upstream unreachable"
		x.up.spec.WriteError(w, provider.BadGateway, x.up.spec.Title+" could not be reached", 0)
		x.status = http.StatusBadGateway
	}
	// The transport's error can quote what the upstream sent, such as a
	// malformed status or header line, and an upstream can put the key there.
	log.Warn("upstream request failed", "error", scrubText(err.Error(), x.keyText), "status", x.status)
}

// goneText is the error recorded for x when its client connection ended
// before the response did: the client left, or, once the grace period of a
// shutdown has run out, the server closed the connection.
func (h *Handler) goneText(x *exchange) string {
	switch {
	case !h.cutting.Load():
		return "client disconnected"
	case x.stream:
		return "stream cut off at shutdown"
	default:
		return "request cut off at shutdown"
	}
}

// statusClientClosed is the status recorded for a request whose client
// left before the response began, as nginx logs it. No response is written.
const statusClientClosed = 499

// usageUnreported reports whether a successful response of the endpoint
// carries no token usage though the provider bills its input: Gemini's
// embedContent and batchEmbedContents. The proxy then charges one input
// token per four request bytes.
func usageUnreported(prov, method, rest string) bool {
	return prov == provider.Google && method == http.MethodPost &&
		(strings.HasSuffix(rest, ":embedContent") || strings.HasSuffix(rest, ":batchEmbedContents"))
}

// reportsUsage reports whether a successful response of the endpoint
// carries the provider's token usage: the generation endpoints and OpenAI's
// embeddings. Token counting and moderation report none and cost nothing.
func reportsUsage(prov, method, rest string) bool {
	if prov == provider.Google {
		return method == http.MethodPost && (strings.HasSuffix(rest, ":generateContent") || strings.HasSuffix(rest, ":streamGenerateContent"))
	}
	return needsBody(prov, method, rest) && !strings.HasSuffix(rest, "/moderations") && !strings.HasSuffix(rest, "/count_tokens")
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() || errors.Is(err, context.DeadlineExceeded)
}

// finish records a forwarded exchange: metrics, usage and audit event.
func (h *Handler) finish(x *exchange, source string, log *slog.Logger) {
	name := x.up.spec.Name
	status := x.status
	if status == 0 {
		status = http.StatusBadGateway
	}
	if x.streamedBody != nil {
		x.requestBytes = max(x.requestBytes, x.streamedBody.n.Load())
	}
	// Errors of the transport quote what the upstream sent, such as a
	// malformed trailer line, which may hold the key. The text goes to the
	// audit event and the log.
	if x.errText != "" {
		x.errText = scrubText(x.errText, x.keyText)
	}
	var counts usage.Counts
	if x.tap != nil {
		counts = x.tap.Counts()
		if counts.Model != "" && x.model == "" {
			x.model = counts.Model
		}
	}
	// Gemini repeats its usage so far on every chunk, so its usage is
	// complete only when the response ended cleanly.
	final := counts.Final || (name == provider.Google && counts.Seen && x.errText == "")
	switch {
	case x.source != keystore.SourceShared:
	case status < 400 && !final && (x.errText != "" || x.tap != nil && x.tap.EventStream() || reportsUsage(name, x.method, x.rest)):
		// A response that ended before the provider's final usage, cut off,
		// left by its client or closed after an error event, could
		// otherwise take the output for free: Anthropic reports one output
		// token when a stream starts, and Google the output so far. So could
		// a whole reply whose usage the tap could not read.
		// TODO: the estimate counts bytes received, so a client that leaves
		// a stream, or a request before its header, pays nothing for the
		// reasoning tokens generated so far, which add no bytes.
		counts = estimateUsage(x, counts)
	case x.sent.Load() && !x.responded.Load() && (status == statusClientClosed || status == http.StatusGatewayTimeout):
		// The provider had the whole request and may bill for it, though
		// the client left or the proxy gave up before the response began.
		counts.InputTokens = (x.requestBytes + 3) / 4
		x.errText += "; input usage estimated from the request's bytes"
	case status < 400 && x.errText == "" && !counts.Seen && usageUnreported(name, x.method, x.rest):
		counts.InputTokens = (x.requestBytes + 3) / 4
	}
	x.up.series.Request(source, status, time.Since(x.start).Seconds())
	x.up.series.Tokens(source, counts.InputTokens, counts.OutputTokens)

	entry := audit.Entry{Event: h.event(x, &counts)}
	if counts.InputTokens > 0 || counts.OutputTokens > 0 || status < 400 {
		entry.Usage = &keystore.UsageRecord{
			RequestID: x.id, Mailbox: string(x.mailbox), Provider: name, Source: x.source,
			InputTokens: counts.InputTokens, OutputTokens: counts.OutputTokens, Time: x.start,
		}
	}
	if x.owner != nil {
		entry.Owned = x.owner.pending
	}
	if tokens := counts.Total(); x.charge != nil {
		// Held at the end of the body, maybe before an estimate.
		x.charge.set(tokens)
	} else if x.limited && tokens > 0 {
		x.charge = h.pending.add(x.mailbox, x.start, x.id, tokens)
	}
	if x.charge != nil {
		entry.Done = x.charge.done
		entry.Prompt = true
	}
	h.audit.Record(entry)

	// The audit event already records every request, so a request that
	// went well logs only at debug. Formatting the line took about 30 µs per
	// stream at 100 streams/s, as much as the usage tap. An upstream's 4xx
	// response is the client's concern and logs at debug too, except a
	// rejected or rate-limited shared key, which is the platform's.
	level := slog.LevelDebug
	if status >= 500 || x.errText != "" && x.errText != upstreamStatusText(status) ||
		x.source == keystore.SourceShared && (status == http.StatusUnauthorized || status == http.StatusForbidden || status == http.StatusTooManyRequests) {
		level = slog.LevelWarn
	}
	if !log.Enabled(context.Background(), level) {
		// Boxing the attributes below costs allocations even when the
		// logger then drops the line.
		return
	}
	log.Log(context.Background(), level, "request done",
		"source", x.source, "status", status, "model", x.model, "stream", x.stream,
		"input_tokens", counts.InputTokens, "output_tokens", counts.OutputTokens,
		"duration_ms", time.Since(x.start).Milliseconds(), "error", x.errText)
}

// event builds the audit event of an exchange.
func (h *Handler) event(x *exchange, counts *usage.Counts) audit.Event {
	kind := audit.KindMetered
	if x.source == keystore.SourceBYOK {
		kind = audit.KindBYOK
	}
	e := audit.Event{
		Time: x.start, Kind: kind, RequestID: x.id, Mailbox: string(x.mailbox),
		Provider: x.up.spec.Name, KeyLast4: x.last4, Model: x.model,
		Method: x.method, Path: "/" + x.up.spec.Name + "/" + x.rest, Status: x.status,
		Stream: x.stream, DurationMS: time.Since(x.start).Milliseconds(), Error: x.errText,
	}
	if counts != nil {
		e.InputTokens = counts.InputTokens
		e.OutputTokens = counts.OutputTokens
	}
	return e
}

// estimateUsage charges a shared request that ended before the provider
// reported its final usage, such as a stream the client cut off, so cutting
// streams cannot make the shared key free. It counts one token per four
// bytes of request body and of response received: more than the provider
// bills, since the response bytes include the JSON around the text. Input
// the provider already reported is kept, and output is charged at least the
// estimate.
func estimateUsage(x *exchange, counts usage.Counts) usage.Counts {
	input := counts.InputTokens
	if !counts.Seen {
		input = (x.requestBytes + 3) / 4
	}
	output := max(counts.OutputTokens, (max(x.received, x.decoded)+3)/4)
	if input == counts.InputTokens && output == counts.OutputTokens {
		return counts
	}
	counts.InputTokens, counts.OutputTokens = input, output
	const note = "usage estimated from bytes because the response ended before the provider reported it"
	if x.errText == "" {
		x.errText = note
	} else {
		x.errText += "; " + note
	}
	return counts
}
