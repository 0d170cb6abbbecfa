package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/byokproxy/byokproxy/metrics"
)

// A stream that stays open in Go's HTTP/1 server keeps the connection's
// 4 KiB reader and writer and a 2 KiB chunk buffer. It also keeps the
// server's background reader goroutine, and the handler's goroutine with
// the stack it grew while the request was checked. A response that only
// passes events on needs none of it. So once the upstream has responded to
// a stream with 200, the proxy takes the connection over (Hijack), writes
// the response in HTTP/1.1 chunked framing itself, and lets the handler
// return. docs/benchmarks.md measures the saving at 10,000 idle streams.
// When the stream ends cleanly, the connection goes back to the same
// http.Server, which reads the client's next request from it. A stream is
// detached only while more than Options.AttachedStreams requests are in
// their handlers, since a few attached streams cost little memory and
// detaching costs CPU.

// errDetached is the error modifyResponse returns once a stream runs
// detached, so that the reverse proxy writes nothing more. upstreamError
// recognises it and writes nothing either.
var errDetached = errors.New("stream detached from the HTTP server")

// detachable reports whether a stream request's response may be detached:
// HTTP/1.1 with a Content-Length, on a connection of an http.Server, and
// not inside a forward-proxy tunnel, whose server needs its tunnel details
// for each connection. detach also requires that the request body was read
// to its end, so that no byte of the client's is left to read.
//
// Go's server treats a connection as TLS only when it is a bare *tls.Conn,
// so a TLS connection must go back unwrapped, with no byte read from it.
// Where the socket cannot be watched without reading (see awaitBytes), a
// TLS connection is not detached.
func detachable(r *http.Request, x *exchange) bool {
	return x.stream && r.Method != http.MethodHead && r.ProtoMajor == 1 && r.ProtoMinor == 1 && len(r.TransferEncoding) == 0 &&
		(r.TLS == nil || canAwaitBytes) && r.Context().Value(http.ServerContextKey) != nil && r.Context().Value(tunnelKey{}) == nil
}

// bodySent reports whether a body forwarded unread has been read from the
// client to its end, or its rest would be read as the next request, and
// whether the transport is done with it. The reverse proxy, which returns
// at once for a detached stream, makes the body fail every read after
// that, and a transport still reading it would drop the upstream
// connection. The transport reports the request written a few steps after
// its last read of the body, so once the body has reached its end, bodySent
// waits a little for that report.
func bodySent(x *exchange) bool {
	if !x.streamedBody.eof.Load() {
		return false
	}
	if x.sent.Load() {
		return true
	}
	wait := time.NewTimer(5 * time.Millisecond)
	defer wait.Stop()
	select {
	case <-x.wrote:
	case <-wait.C:
	}
	return x.sent.Load()
}

// clientWriter is the ResponseWriter the reverse proxy gets: a reference
// that detach clears, and the one place the header of an informational
// (1xx) response passes through.
type clientWriter struct {
	http.ResponseWriter
	x *exchange
}

// Unwrap lets http.ResponseController reach the server's writer.
func (c *clientWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }

// WriteHeader removes the key from the header of a 1xx response, such as
// 103 Early Hints. The reverse proxy copies such a header from the
// upstream's and sends it at once, so ModifyResponse never gets it.
//
// It also sets the proxy's request id again, because the reverse proxy
// clears the header after a 1xx response and adds an upstream header of
// the same name to it.
//
// The upstream's 100 Continue is not passed on. The transport starts to
// read the request body when that response arrives, before it reports it,
// and that first read makes the server send the client its own 100
// Continue. Passing the upstream's on as well could give the client two.
func (c *clientWriter) WriteHeader(code int) {
	if code == http.StatusContinue {
		return
	}
	h := c.ResponseWriter.Header()
	if code >= 100 && code < 200 {
		scrubHeaders(h, c.x.keyText, true)
	}
	setRequestID(h, c.x.id)
	c.ResponseWriter.WriteHeader(code)
}

// requestIDHeader names the header that carries the proxy's id of a
// request. The provider's own x-request-id passes through for the SDKs
// that read it.
const requestIDHeader = "X-Byokproxy-Request-Id"

// setRequestID makes id the only value of requestIDHeader in h. It
// allocates nothing when h has that value already.
func setRequestID(h http.Header, id string) {
	if v := h[requestIDHeader]; len(v) != 1 || v[0] != id {
		h[requestIDHeader] = []string{id}
	}
}

// detachedStream is a streamed response that runs on its own goroutine,
// outside the HTTP server.
type detachedStream struct {
	h      *Handler
	x      *exchange
	log    *slog.Logger
	conn   net.Conn
	srv    *http.Server
	body   io.ReadCloser
	header http.Header
	// resp is the upstream response, whose Trailer the transport sets once
	// the body has ended, and tapBody then scrubs.
	resp *http.Response
	// keepAlive is false when the client asked to close the connection.
	keepAlive bool
	// buffered holds what the server had read beyond the request when the
	// connection was taken over, such as a pipelined next request.
	buffered []byte

	// out is the buffered writer lent to chunks for one write at a time,
	// so an idle stream holds no write buffer.
	out    *bufio.Writer
	chunks io.WriteCloser
	// watched is closed when watchClient has returned.
	watched chan struct{}

	// mu hands the connection from run to watchClient once the response
	// has ended, and guards the fields below.
	mu sync.Mutex
	// watchEnded is set when watchClient's read has returned.
	watchEnded bool
	// streamEnded is set when run has recorded the exchange and left the
	// connection to watchClient.
	streamEnded bool
	// next is the first byte of the client's next request, if it came.
	next []byte
	// clientGone is set when the client closed its side or the connection
	// failed.
	clientGone bool

	// cut is set when shutdown ended the stream.
	cut atomic.Bool
}

// detach takes the client connection of x over for resp, or reports false
// and leaves everything as it was. It runs in the handler's goroutine,
// inside the reverse proxy, before the response header is written.
func (h *Handler) detach(resp *http.Response, x *exchange) bool {
	// A response of known length, with trailers or without a Content-Type
	// would need more of the server's framing rules than the stream path
	// writes.
	if resp.StatusCode != http.StatusOK || resp.ContentLength >= 0 || len(resp.Trailer) > 0 ||
		resp.Header.Get("Content-Type") == "" {
		return false
	}
	if x.streamedBody != nil && !bodySent(x) {
		return false
	}
	srv, _ := x.in.Context().Value(http.ServerContextKey).(*http.Server)
	if srv == nil {
		return false
	}
	conn, rw, err := http.NewResponseController(x.w).Hijack()
	if err != nil {
		return false
	}

	// From here on only the stream's own watch ends its upstream request:
	// the server ends the request's context when the handler returns.
	x.unfollow()
	if x.streamedBody != nil {
		x.requestBytes = max(x.requestBytes, x.streamedBody.n.Load())
		x.streamedBody.release()
	}
	// The reverse proxy would add the upstream's header to the one the
	// handler set, such as X-Byokproxy-Request-Id.
	header := x.w.Header().Clone()
	x.w.ResponseWriter = nil
	for k, vs := range resp.Header {
		for _, v := range vs {
			header.Add(k, v)
		}
	}
	setRequestID(header, x.id)
	s := &detachedStream{
		h: h, x: x, log: x.log, conn: conn, srv: srv, body: resp.Body, header: header, resp: resp,
		keepAlive: !x.in.Close, watched: make(chan struct{}),
	}
	if n := rw.Reader.Buffered(); n > 0 {
		buffered, _ := rw.Reader.Peek(n)
		s.buffered = bytes.Clone(buffered)
	}
	// A connection that went back to the server after an earlier stream
	// arrives wrapped in an earlyConn. Unwrapping it keeps the wrapping to
	// one layer, however many streams the connection carries. The bytes the
	// wrapper has not returned yet come after those the server buffered.
	if wrapped, ok := conn.(*earlyConn); ok {
		s.buffered = append(s.buffered, wrapped.early...)
		s.conn = wrapped.Conn
	}
	if _, isTLS := s.conn.(*tls.Conn); isTLS && len(s.buffered) > 0 {
		// The server read ahead, so the connection could only go back
		// wrapped, without its TLS state. After the stream's Connection:
		// close, a client sends its next request again.
		s.keepAlive = false
	}
	s.chunks = httputil.NewChunkedWriter(s)

	// Neither may hold the server's connection state past this point.
	x.w, x.in = nil, nil
	x.detached = true
	resp.Body = http.NoBody
	h.streams.add(s, srv)
	go s.run()
	return true
}

// run streams the response, records the exchange, and then gives the
// connection back to the server or closes it.
func (s *detachedStream) run() {
	defer func() {
		// A bug here must cost one stream, not the process, which the
		// server would have protected had the stream stayed its handler's.
		if p := recover(); p != nil {
			s.log.Error("detached stream failed", "panic", p)
			s.conn.Close()
			if x := s.x; x != nil {
				// No audit entry will let the usage go.
				if x.charge != nil {
					x.charge.done()
				}
				x.cancel(nil)
				s.body.Close()
				x.up.series.InFlight().Dec()
			}
			s.h.streams.remove(s)
		}
	}()
	go s.watchClient(s.x.cancel)

	delivered, writeFailed := s.copy()
	s.body.Close()
	_, isTLS := s.conn.(*tls.Conn)
	reuse := delivered && s.keepAlive
	if !reuse || isTLS || len(s.buffered) > 0 {
		// Stop the watch. A byte read through a TLS connection would hide
		// its TLS state from the server, so such a connection waits for
		// its next request in awaitTLS instead. A connection whose next
		// request has begun goes back to the server at once.
		s.conn.SetReadDeadline(aLongTimeAgo)
		<-s.watched
		early := len(s.buffered)+len(s.next) > 0
		if reuse && isTLS && !early {
			s.conn.SetReadDeadline(idleDeadline(s.srv))
		}
		s.record(delivered, !delivered && (writeFailed || s.clientGone), reuse)
		if !reuse {
			s.conn.Close()
			return
		}
		if isTLS && !early {
			s.awaitTLS()
			return
		}
		s.conn.SetReadDeadline(time.Time{})
		s.handBack()
		return
	}
	// The watch goes on as the wait for the client's next request, bounded
	// as the server bounds the wait between two requests, and whichever of
	// the two goroutines comes second passes the connection on. The
	// deadline comes before record, which ends the wait at once when the
	// server is shutting down.
	s.conn.SetReadDeadline(idleDeadline(s.srv))
	s.record(true, false, true)
	s.mu.Lock()
	watchEnded := s.watchEnded
	s.streamEnded = !watchEnded
	s.mu.Unlock()
	if watchEnded {
		s.passOn()
	}
}

// record ends the exchange as endForward would have. With waiting set, the
// connection stays in s.h.streams until handBack or passOn is done with it.
func (s *detachedStream) record(delivered, disconnected, waiting bool) {
	x := s.x
	switch {
	case delivered || x.errText != "":
	case s.cut.Load():
		x.errText = "stream cut off at shutdown"
	case disconnected:
		x.cancelled = true
		x.errText = "client disconnected"
	}
	x.delivered = delivered
	x.up.series.InFlight().Dec()
	s.h.finish(x, metrics.SourceLabel(x.source), s.log)
	x.cancel(nil)
	s.h.streams.end(s, waiting)
	s.x, s.body = nil, nil
}

// idleDeadline is when the server would give up waiting for the next
// request on a keep-alive connection.
func idleDeadline(srv *http.Server) time.Time {
	d := srv.IdleTimeout
	if d <= 0 {
		d = srv.ReadTimeout
	}
	if d <= 0 {
		return time.Time{}
	}
	return time.Now().Add(d)
}

// copy writes the header and then each read of the body as one chunk, as
// the reverse proxy with FlushInterval -1 would. It reports whether the
// whole body reached the client and whether a write to the client failed.
func (s *detachedStream) copy() (delivered, writeFailed bool) {
	if err := s.writeHeader(); err != nil {
		return false, true
	}
	buf := streamBuffers.Get()
	defer streamBuffers.Put(buf)
	for {
		n, err := s.body.Read(buf)
		if n > 0 {
			if werr := s.send(buf[:n], false); werr != nil {
				// As the HTTP server does when a write fails, end the
				// upstream request rather than read a response no client
				// receives.
				s.x.cancel(nil)
				return false, true
			}
		}
		if err == io.EOF {
			return s.send(nil, true) == nil, false
		}
		if err != nil {
			// Without its last chunk the client sees the response cut
			// off, as when the server aborts a handler.
			return false, false
		}
	}
}

// writeHeader writes the status line and header as Go's HTTP/1 server
// would for a response without Content-Length.
func (s *detachedStream) writeHeader() error {
	h := s.header
	h.Del("Content-Length")
	h.Set("Transfer-Encoding", "chunked")
	if _, ok := h["Date"]; !ok {
		h.Set("Date", time.Now().UTC().Format(http.TimeFormat))
	}
	// During a shutdown the server closes the connection after a response,
	// so the header announces it, as the server's own responses do.
	if !s.keepAlive || s.h.streams.shuttingDown(s.srv) {
		h.Set("Connection", "close")
	}
	w := s.lend()
	w.WriteString("HTTP/1.1 200 OK\r\n")
	h.Write(w)
	w.WriteString("\r\n")
	s.header = nil
	return s.giveBack()
}

// send writes p as one chunk, and the last chunk after it when last is set.
func (s *detachedStream) send(p []byte, last bool) error {
	s.lend()
	if len(p) > 0 {
		s.chunks.Write(p)
	}
	if last {
		s.chunks.Close()
		// The trailer section, as Go's server writes the trailers that the
		// reverse proxy passes on, and its end.
		s.resp.Trailer.Write(s.out)
		s.out.WriteString("\r\n")
	}
	return s.giveBack()
}

// chunkWriters lend a buffered writer for one write to a client, so the
// chunk framing and its data leave in one system call.
var chunkWriters = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4<<10) }}

func (s *detachedStream) lend() *bufio.Writer {
	s.out = chunkWriters.Get().(*bufio.Writer)
	s.out.Reset(s.conn)
	return s.out
}

// giveBack flushes the lent writer and returns it to the pool.
func (s *detachedStream) giveBack() error {
	err := s.out.Flush()
	s.out.Reset(nil)
	chunkWriters.Put(s.out)
	s.out = nil
	return err
}

// Write and WriteString are where the chunked writer's output goes: the
// lent writer.
func (s *detachedStream) Write(p []byte) (int, error)         { return s.out.Write(p) }
func (s *detachedStream) WriteString(str string) (int, error) { return s.out.WriteString(str) }

// watchClient waits for the client to close its side, and then ends the
// upstream request with cancel, as the HTTP server's background read does
// for a handler. A byte that arrives instead belongs to the client's next
// request and is kept for the server. Once the response has ended, the
// same read is the wait for that next request, which is far cheaper than
// the server's own wait: no buffers and a goroutine with a small stack.
//
// On a TLS connection the watch only looks at the socket (see awaitBytes),
// because a byte read through TLS would hide the connection's TLS state
// from the server. When bytes arrive there, the watch ends, and a client
// that then closes is noticed at the next failed write.
func (s *detachedStream) watchClient(cancel context.CancelCauseFunc) {
	defer close(s.watched)
	var b [1]byte
	var n int
	var waiting bool
	var err error
	if _, isTLS := s.conn.(*tls.Conn); isTLS {
		waiting, err = awaitBytes(s.conn)
	} else {
		n, err = s.conn.Read(b[:])
	}
	s.mu.Lock()
	s.watchEnded = true
	if n == 1 {
		s.next = append(s.next, b[0])
	} else if !waiting && !errors.Is(err, os.ErrDeadlineExceeded) {
		s.clientGone = true
	}
	streamEnded, clientGone := s.streamEnded, s.clientGone
	s.mu.Unlock()
	if streamEnded {
		s.passOn()
	} else if clientGone {
		cancel(nil)
	}
}

// passOn hands the connection back to the server when the client has begun
// its next request, and closes it when the client left or sent nothing in
// time.
func (s *detachedStream) passOn() {
	// Between two requests the server waits, within its IdleTimeout, for
	// the first 4 bytes of the next one, and only then starts its
	// ReadHeaderTimeout. The same wait is done here, before hand-back.
	for len(s.next) > 0 && len(s.next) < 4 {
		var b [4]byte
		n, err := s.conn.Read(b[:4-len(s.next)])
		s.next = append(s.next, b[:n]...)
		if err != nil {
			s.next = nil
		}
	}
	if len(s.next) == 0 {
		s.conn.Close()
		s.h.streams.remove(s)
		return
	}
	s.conn.SetReadDeadline(time.Time{})
	s.handBack()
}

// awaitTLS waits for the next request on a TLS connection, within the
// read deadline set before, without reading from the connection. It then
// gives the connection back to the server, or closes it when the client
// left or sent nothing in time.
func (s *detachedStream) awaitTLS() {
	next, err := awaitBytes(s.conn)
	if errors.Is(err, errors.ErrUnsupported) {
		// NOTE: without a way to look at the socket, the connection goes
		// back at once, and the server then waits for its next request
		// only as long as its ReadHeaderTimeout.
		next = true
	}
	if !next {
		s.conn.Close()
		s.h.streams.remove(s)
		return
	}
	s.conn.SetReadDeadline(time.Time{})
	s.handBack()
}

// aLongTimeAgo is a read deadline in the past, which makes a pending read
// return at once.
var aLongTimeAgo = time.Unix(1, 0)

// handBack gives the connection to the server the request came from. The
// server then serves it as a new connection, or closes it when it is
// shutting down.
func (s *detachedStream) handBack() {
	defer s.h.streams.remove(s)
	conn := s.conn
	if early := append(s.buffered, s.next...); len(early) > 0 {
		conn = &earlyConn{Conn: conn, early: early}
	}
	l := &handBackListener{conn: conn}
	s.srv.Serve(l)
	if !l.accepted {
		s.conn.Close()
	}
}

// handBackListener is a net.Listener that accepts one connection, for
// http.Server.Serve, and then reports itself closed so Serve returns.
type handBackListener struct {
	conn     net.Conn
	accepted bool
}

func (l *handBackListener) Accept() (net.Conn, error) {
	if l.accepted {
		return nil, net.ErrClosed
	}
	l.accepted = true
	return l.conn, nil
}

// Close leaves the connection open: Serve closes its listener when it
// returns, while the server goes on serving the connection.
func (l *handBackListener) Close() error   { return nil }
func (l *handBackListener) Addr() net.Addr { return l.conn.LocalAddr() }

// earlyConn is a connection whose first bytes were read already.
type earlyConn struct {
	net.Conn
	early []byte
}

// NetConn returns the connection underneath, as tls.Conn's method of that
// name does.
func (c *earlyConn) NetConn() net.Conn { return c.Conn }

// CloseWrite shuts down the writing side, which the server does before it
// closes a connection so that the client reads the whole response.
func (c *earlyConn) CloseWrite() error {
	if closer, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return closer.CloseWrite()
	}
	return nil
}

func (c *earlyConn) Read(p []byte) (int, error) {
	if len(c.early) > 0 {
		n := copy(p, c.early)
		c.early = c.early[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// detachedStreams are the streams running detached, so that shutdown can
// wait for them, and the connections of ended streams that wait for their
// next request, so that shutdown can close them as the server closes its
// idle connections.
type detachedStreams struct {
	mu      sync.Mutex
	open    map[*detachedStream]struct{}
	waiting map[*detachedStream]struct{}
	// servers are those whose Shutdown closes the waiting connections,
	// mapped to whether Shutdown has begun.
	servers map[*http.Server]bool
}

// add records s as open.
func (d *detachedStreams) add(s *detachedStream, srv *http.Server) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.watchLocked(srv)
	d.open[s] = struct{}{}
}

// watch has srv's Shutdown close the connections that wait after a stream
// and tell later streams to close theirs. It runs for each request that may
// detach, before it can, because a hook registered once Shutdown has begun
// never runs.
func (d *detachedStreams) watch(srv *http.Server) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.watchLocked(srv)
}

func (d *detachedStreams) watchLocked(srv *http.Server) {
	if d.open == nil {
		d.open = map[*detachedStream]struct{}{}
		d.waiting = map[*detachedStream]struct{}{}
		d.servers = map[*http.Server]bool{}
	}
	if _, ok := d.servers[srv]; !ok {
		d.servers[srv] = false
		srv.RegisterOnShutdown(func() { d.shutDown(srv) })
	}
}

// shuttingDown reports whether srv's Shutdown, or Drain, has begun.
func (d *detachedStreams) shuttingDown(srv *http.Server) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.servers[srv]
}

// end moves s from the open streams to the waiting connections, or only
// removes it when waiting is false. It does both under one lock, so that
// Drain finds s in one set or the other. Once its server is shutting down,
// a connection stops waiting at once.
func (d *detachedStreams) end(s *detachedStream, waiting bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.open, s)
	if !waiting {
		return
	}
	d.waiting[s] = struct{}{}
	if d.servers[s.srv] {
		s.conn.SetReadDeadline(aLongTimeAgo)
	}
}

func (d *detachedStreams) remove(s *detachedStream) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.open, s)
	delete(d.waiting, s)
}

// shutDown ends the wait for the next request on every connection of srv,
// which then closes.
func (d *detachedStreams) shutDown(srv *http.Server) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.servers[srv] = true
	for s := range d.waiting {
		if s.srv == srv {
			s.conn.SetReadDeadline(aLongTimeAgo)
		}
	}
}

// shutDownAll does what shutDown does for every server seen so far.
func (d *detachedStreams) shutDownAll() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for srv := range d.servers {
		d.servers[srv] = true
	}
	for s := range d.waiting {
		s.conn.SetReadDeadline(aLongTimeAgo)
	}
}

// counts returns the number of open streams and of waiting connections.
func (d *detachedStreams) counts() (open, waiting int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.open), len(d.waiting)
}

// cut ends every open stream: its upstream request with cause, and its
// client connection, which a client that stopped reading could otherwise
// keep blocked in a write.
func (d *detachedStreams) cut(cause error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for s := range d.open {
		s.cut.Store(true)
		s.x.cancel(cause)
		s.conn.Close()
	}
}

// DetachedStreams returns how many streams run detached from the HTTP
// server at the moment.
func (h *Handler) DetachedStreams() int {
	open, _ := h.streams.counts()
	return open
}

// errShutdown is the cause of the streams that Drain cuts.
var errShutdown = errors.New("proxy shutting down")

// Cut marks the end of a shutdown's grace period. A request whose client
// connection ends from then on is recorded as cut off at shutdown rather
// than left by its client. Call it before closing the server's
// connections.
func (h *Handler) Cut() { h.cutting.Store(true) }

// Drain waits until no stream runs detached from the HTTP server. When ctx
// ends first, it cuts the streams still open. Then it closes the
// connections that wait for a next request after a stream, and waits up to
// a second for all of them, and for the handlers still running, to finish.
// Call it after the server's Shutdown, because Shutdown does not wait for
// these streams, and after the server's Close when Shutdown failed, because
// Close does not wait for the handlers.
func (h *Handler) Drain(ctx context.Context) error {
	var err error
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	// A handler still running may yet detach its stream: between its
	// Hijack and the stream's start the server no longer counts the
	// connection, and Drain does not count the stream yet.
	for open, _ := h.streams.counts(); (open > 0 || h.running.Load() > 0) && err == nil; open, _ = h.streams.counts() {
		select {
		case <-ctx.Done():
			if open > 0 {
				err = errors.New("detached streams still open at the deadline, cut: " + strconv.Itoa(open))
			} else {
				err = ctx.Err()
			}
			h.Cut()
			h.streams.cut(errShutdown)
		case <-tick.C:
		}
	}
	h.streams.shutDownAll()
	deadline := time.Now().Add(time.Second)
	for open, waiting := h.streams.counts(); open+waiting+int(h.running.Load()) > 0 && time.Now().Before(deadline); open, waiting = h.streams.counts() {
		if open > 0 && err != nil {
			// A stream that a handler detached after the cut.
			h.streams.cut(errShutdown)
		}
		<-tick.C
	}
	return err
}
