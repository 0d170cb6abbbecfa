// Package upstreamtest runs local HTTP servers that respond like the OpenAI,
// Anthropic and Google AI (Gemini) APIs, in their real wire formats, so the
// proxy and the official SDKs can be tested end to end without network access.
//
// Each Server checks credentials the way its provider does, records every
// request it receives, and produces deterministic replies and token usage (see
// InputTokens and OutputTokens). Streams flush after every event and can be
// held, slowed down or cut off to test streaming through the proxy.
package upstreamtest

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"time"
)

// Provider names, the same as the proxy's route prefixes.
const (
	OpenAI    = "openai"
	Anthropic = "anthropic"
	Google    = "google"
)

// HoldTimeout bounds how long a held stream waits for Release.
const HoldTimeout = 30 * time.Second

// Request is one request as the emulator received it.
type Request struct {
	Method   string
	Path     string
	RawQuery string
	Header   http.Header
	Body     []byte
	// Key is the credential found where the provider reads it (empty when
	// none was sent), whether or not it was accepted.
	Key string
	// Authorized reports whether Key was one of the accepted keys.
	Authorized bool
	// Stream reports whether the response was a stream.
	Stream bool
	// Model is the model named in the body or, for Google, in the path.
	Model string
	// Usage is the token usage the request consumed, as the response reported
	// it. It is zero for token counting, model listing, Google embeddings,
	// errors and unknown paths.
	Usage Usage
	// Status is the HTTP status the emulator sent.
	Status int
}

// Server is a running emulator of one provider's API on 127.0.0.1.
type Server struct {
	// URL is the base URL, such as http://127.0.0.1:41234, with no path.
	URL string
	// Provider is OpenAI, Anthropic or Google.
	Provider string

	srv     *httptest.Server
	handler func(*Server, *call)
	idBase  string

	mu          sync.Mutex
	keys        map[string]bool
	requests    []*Request
	holdPending bool
	holdGate    chan struct{}
	heldStreams int
	eventDelay  time.Duration
	failMid     bool
	echoKey     bool
	gzip        bool
	errStatus   int
	idCounter   int
	uploads     map[string]*upload
	batches     []*anthropicBatch
}

// NewOpenAI starts an OpenAI emulator over plain HTTP that accepts keys.
func NewOpenAI(keys ...string) *Server { return start(OpenAI, false, keys) }

// NewAnthropic starts an Anthropic emulator over plain HTTP that accepts keys.
func NewAnthropic(keys ...string) *Server { return start(Anthropic, false, keys) }

// NewGoogle starts a Google AI emulator over plain HTTP that accepts keys.
func NewGoogle(keys ...string) *Server { return start(Google, false, keys) }

// NewOpenAITLS starts an OpenAI emulator over HTTPS (HTTP/1.1) with a
// certificate from net/http/httptest; see CertPEM.
func NewOpenAITLS(keys ...string) *Server { return start(OpenAI, true, keys) }

// NewAnthropicTLS starts an Anthropic emulator over HTTPS; see NewOpenAITLS.
func NewAnthropicTLS(keys ...string) *Server { return start(Anthropic, true, keys) }

// NewGoogleTLS starts a Google AI emulator over HTTPS; see NewOpenAITLS.
func NewGoogleTLS(keys ...string) *Server { return start(Google, true, keys) }

// New starts an emulator of the named provider, over HTTPS when tls is true.
// It panics on an unknown provider name.
func New(provider string, tls bool, keys ...string) *Server { return start(provider, tls, keys) }

func start(provider string, tls bool, keys []string) *Server {
	s := &Server{Provider: provider, keys: map[string]bool{}}
	switch provider {
	case OpenAI:
		s.handler = (*Server).serveOpenAI
	case Anthropic:
		s.handler = (*Server).serveAnthropic
	case Google:
		s.handler = (*Server).serveGoogle
	default:
		panic(fmt.Sprintf("upstreamtest: unknown provider %q", provider))
	}
	for _, k := range keys {
		s.keys[k] = true
	}
	b := make([]byte, 4)
	rand.Read(b)
	s.idBase = hex.EncodeToString(b)

	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(s.serveHTTP))
	if tls {
		s.srv.StartTLS()
	} else {
		s.srv.Start()
	}
	s.URL = s.srv.URL
	return s
}

// Close stops the server. Held streams are released first so Close does not
// wait for their timeout.
func (s *Server) Close() {
	s.Release()
	s.srv.CloseClientConnections()
	s.srv.Close()
}

// Client returns an HTTP client that trusts the server's certificate.
func (s *Server) Client() *http.Client { return s.srv.Client() }

// CertPEM returns the PEM-encoded certificate of a TLS server, for
// providers.NAME.ca_file, or nil for a plain HTTP server.
func (s *Server) CertPEM() []byte {
	if s.srv.Certificate() == nil {
		return nil
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.srv.Certificate().Raw})
}

// SetKeys replaces the accepted keys.
func (s *Server) SetKeys(keys ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.keys = map[string]bool{}
	for _, k := range keys {
		s.keys[k] = true
	}
}

// Requests returns copies of the requests received so far, oldest first.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Request, 0, len(s.requests))
	for _, r := range s.requests {
		c := *r
		c.Header = r.Header.Clone()
		c.Body = slices.Clone(r.Body)
		out = append(out, c)
	}
	return out
}

// Reset clears the recorded requests, releases held streams and restores the
// default behaviour (no hold, no delay, no failures, no gzip, no key echo).
// The accepted keys stay.
func (s *Server) Reset() {
	s.Release()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests = nil
	s.eventDelay = 0
	s.failMid = false
	s.echoKey = false
	s.gzip = false
	s.errStatus = 0
}

// Hold makes the next stream send its first event and then wait until
// Release, the client going away, or HoldTimeout.
func (s *Server) Hold() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.holdGate == nil {
		s.holdGate = make(chan struct{})
	}
	s.holdPending = true
}

// Release lets held streams go on and cancels a Hold that no stream has
// taken yet.
func (s *Server) Release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.holdGate != nil {
		close(s.holdGate)
		s.holdGate = nil
	}
	s.holdPending = false
}

// HeldStreams returns how many streams are waiting for Release now.
func (s *Server) HeldStreams() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.heldStreams
}

// SetEventDelay sets a pause before each stream event after the first.
func (s *Server) SetEventDelay(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.eventDelay = d
}

// SetFailMidStream makes streams break off right after their first text
// delta: the connection is closed with no terminal event and, over HTTP/1.1,
// no final chunk, as when a provider's connection drops.
func (s *Server) SetFailMidStream(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failMid = on
}

// SetEchoKeyInErrors makes error bodies contain the raw credential the
// request carried, in addition to any masked form, to test that the proxy
// removes it before the client sees the body.
func (s *Server) SetEchoKeyInErrors(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.echoKey = on
}

// SetGzip makes responses gzip-encoded when the request's Accept-Encoding
// allows gzip.
func (s *Server) SetGzip(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.gzip = on
}

// SetError makes every authorized request fail with status and the
// provider's error body for it (429, 500, 503 and Anthropic's 529 get a
// Retry-After of 1 second). Zero turns it off.
func (s *Server) SetError(status int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.errStatus = status
}

// call is one request being served.
type call struct {
	w    http.ResponseWriter
	r    *http.Request
	rec  *Request
	body []byte
	// json is the decoded body, or nil when it is empty or not a JSON object.
	json map[string]any
	out  io.Writer
	gz   *gzip.Writer
}

func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(io.LimitReader(r.Body, 64<<20))
	rec := &Request{
		Method:   r.Method,
		Path:     r.URL.Path,
		RawQuery: r.URL.RawQuery,
		Header:   r.Header.Clone(),
		Body:     body,
		Key:      s.credential(r),
	}
	s.mu.Lock()
	rec.Authorized = rec.Key != "" && s.keys[rec.Key]
	s.requests = append(s.requests, rec)
	useGzip := s.gzip && acceptsGzip(r)
	errStatus := s.errStatus
	s.mu.Unlock()

	c := &call{w: w, r: r, rec: rec, body: body, out: w}
	if len(bytes.TrimSpace(body)) > 0 {
		var m map[string]any
		if json.Unmarshal(body, &m) == nil {
			c.json = m
		}
	}
	if useGzip {
		w.Header().Set("Content-Encoding", "gzip")
		w.Header().Add("Vary", "Accept-Encoding")
		c.gz = gzip.NewWriter(w)
		c.out = c.gz
		defer func() {
			if c.gz != nil {
				c.gz.Close()
			}
		}()
	}

	if !rec.Authorized {
		s.writeAuthError(c)
		return
	}
	if errStatus != 0 {
		s.writeError(c, errStatus, "")
		return
	}
	s.handler(s, c)
}

// credential returns the key where the provider's API reads it.
func (s *Server) credential(r *http.Request) string {
	switch s.Provider {
	case OpenAI:
		v := r.Header.Get("Authorization")
		if len(v) > 7 && strings.EqualFold(v[:7], "Bearer ") {
			return strings.TrimSpace(v[7:])
		}
		return ""
	case Anthropic:
		return r.Header.Get("X-Api-Key")
	default:
		if v := r.Header.Get("X-Goog-Api-Key"); v != "" {
			return v
		}
		return r.URL.Query().Get("key")
	}
}

func acceptsGzip(r *http.Request) bool {
	for _, part := range strings.Split(r.Header.Get("Accept-Encoding"), ",") {
		name, params, _ := strings.Cut(strings.TrimSpace(part), ";")
		if strings.EqualFold(strings.TrimSpace(name), "gzip") && strings.ReplaceAll(params, " ", "") != "q=0" {
			return true
		}
	}
	return false
}

func (s *Server) nextID(prefix string) string {
	s.mu.Lock()
	s.idCounter++
	n := s.idCounter
	s.mu.Unlock()
	return fmt.Sprintf("%s%s%06d", prefix, s.idBase, n)
}

// writeJSON sends a complete JSON response.
func (s *Server) writeJSON(c *call, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("upstreamtest: encode response: %v", err))
	}
	c.w.Header().Set("Content-Type", "application/json")
	s.setStatus(c, status)
	c.w.WriteHeader(status)
	c.out.Write(body)
}

func (s *Server) setStatus(c *call, status int) {
	s.mu.Lock()
	c.rec.Status = status
	s.mu.Unlock()
}

func (s *Server) setResult(c *call, model string, stream bool, u Usage) {
	s.mu.Lock()
	c.rec.Model = model
	c.rec.Stream = stream
	c.rec.Usage = u
	s.mu.Unlock()
}

// writeOK responds to a path the emulator has no handler for.
func (s *Server) writeOK(c *call) {
	s.writeJSON(c, http.StatusOK, map[string]any{"ok": true})
}

// errAborted reports that a stream was cut off on purpose or by the client.
var errAborted = errors.New("stream aborted")

// stream writes one streamed response, applying the server's hold, delay and
// failure settings between events.
type stream struct {
	s       *Server
	c       *call
	ctx     context.Context
	gate    chan struct{}
	delay   time.Duration
	failMid bool
	events  int
	aborted bool
}

// startStream sends the response headers of a stream and takes a pending Hold.
func (s *Server) startStream(c *call, contentType string) *stream {
	s.mu.Lock()
	st := &stream{s: s, c: c, ctx: c.r.Context(), delay: s.eventDelay, failMid: s.failMid}
	if s.holdPending {
		st.gate = s.holdGate
		s.holdPending = false
	}
	s.mu.Unlock()

	h := c.w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	s.setStatus(c, http.StatusOK)
	c.w.WriteHeader(http.StatusOK)
	return st
}

// send writes one event and flushes it to the client. textDelta marks events
// that carry part of the reply text, after the first of which a stream set to
// fail mid-stream is cut off.
func (st *stream) send(data string, textDelta bool) error {
	if st.aborted {
		return errAborted
	}
	if st.events > 0 && st.delay > 0 {
		t := time.NewTimer(st.delay)
		select {
		case <-t.C:
		case <-st.ctx.Done():
			t.Stop()
			st.aborted = true
			return errAborted
		}
	}
	// The stream is counted as held before its first event leaves, so a
	// client that has that event always finds the count raised.
	hold := st.events == 0 && st.gate != nil
	if hold {
		st.s.addHeld(1)
		defer st.s.addHeld(-1)
	}
	if _, err := io.WriteString(st.c.out, data); err != nil {
		st.aborted = true
		return errAborted
	}
	st.flush()
	st.events++

	if textDelta && st.failMid {
		st.cut()
		return errAborted
	}
	if hold {
		st.wait()
	}
	return nil
}

func (s *Server) addHeld(n int) {
	s.mu.Lock()
	s.heldStreams += n
	s.mu.Unlock()
}

// step is one event of a stream prepared in advance.
type step struct {
	data string
	// delta marks an event that carries part of the reply text.
	delta bool
}

// sendAll sends steps in order and stops at the first that fails.
func (st *stream) sendAll(steps []step) {
	for _, s := range steps {
		if st.send(s.data, s.delta) != nil {
			return
		}
	}
}

func (st *stream) flush() {
	if st.c.gz != nil {
		st.c.gz.Flush()
	}
	if f, ok := st.c.w.(http.Flusher); ok {
		f.Flush()
	}
}

func (st *stream) wait() {
	t := time.NewTimer(HoldTimeout)
	defer t.Stop()
	select {
	case <-st.gate:
	case <-t.C:
	case <-st.ctx.Done():
		st.aborted = true
	}
}

// cut closes the connection under the response so the client sees the body
// end without its terminator.
func (st *stream) cut() {
	st.aborted = true
	// The gzip stream must not be finished when the handler returns.
	st.c.gz = nil
	st.c.out = io.Discard
	hj, ok := st.c.w.(http.Hijacker)
	if !ok {
		panic("upstreamtest: response writer cannot be hijacked (HTTP/2?)")
	}
	conn, _, err := hj.Hijack()
	if err != nil {
		panic(fmt.Sprintf("upstreamtest: hijack connection: %v", err))
	}
	conn.Close()
}
