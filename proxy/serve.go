package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/byokproxy/byokproxy/audit"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/metrics"
	"github.com/byokproxy/byokproxy/provider"
	"github.com/byokproxy/byokproxy/usage"
)

// exchange is the state of one proxied request, shared between the handler,
// the reverse proxy's hooks and the response tap through the request context.
type exchange struct {
	id      string
	start   time.Time
	up      *upstream
	method  string
	rest    string // path below the provider prefix, without a leading slash
	mailbox mailbox.ID
	source  string // keystore.SourceShared or keystore.SourceBYOK
	last4   string
	key     *keystore.Secret
	keyText string // the key as the header holds it, for scrubbing error bodies

	model       string
	stream      bool
	body        []byte // the request body read before forwarding, or nil
	injectUsage bool   // the proxy added stream_options.include_usage
	// info holds the fields read from body, and bodyErr why they could not
	// be read. The shared key's rules need both, the own key's neither.
	info    requestInfo
	bodyErr error
	// previousResponse is the Responses API previous_response_id, if any.
	previousResponse string
	// namedIDs are the ids of existing code execution containers and of
	// reasoning items passed back that a shared request names. Each must
	// be one the mailbox created on the shared key.
	namedIDs []string
	// background is set for a Responses API request that runs later.
	background bool
	// rebaseBase is the proxy URL of the route prefix that URLs on the
	// upstream in the response are rewritten to, or "" to leave them.
	rebaseBase string

	// requestBytes, received and decoded count the request body and the
	// response bytes from the upstream as sent and as decoded, for
	// estimating usage the provider never reported. A gzip body passed
	// through is a fraction of its decoded size. The decoder has written
	// decoded by the time the body is closed. A body that is not encoded
	// leaves decoded at 0.
	requestBytes int64
	received     int64
	decoded      int64
	// streamedBody counts a request body that is forwarded without being
	// read first, or is nil.
	streamedBody *countingBody

	// limited is set for a shared request of a mailbox with an allowance.
	// pending is the mailbox's usage charged here and not yet reported
	// written when the request arrived. charge, once set, holds this
	// request's own.
	limited bool
	pending []keystore.PendingUsage
	charge  *pendingCharge

	status int
	// responded is set once the upstream's response header arrived, so
	// status is the provider's rather than one the proxy chose. It is
	// atomic because a client that leaves reads it on another goroutine.
	responded atomic.Bool
	// readsOn is set for a shared non-streamed request, whose upstream
	// request outlives its client once responded is set, so that the whole
	// reply's usage is read and charged.
	readsOn bool
	errText string
	ttfb    time.Time
	tap     *usage.Tap
	// cancel ends the upstream request with a cause, such as a stall.
	cancel context.CancelCauseFunc
	// owner stores the response and container ids a shared response
	// creates, or is nil.
	owner     *ownerRecorder
	cancelled bool
	// bodyEnded is set once the response body the reverse proxy copies to
	// the client has been read to its end.
	bodyEnded bool
	// delivered is set once the reverse proxy has written and flushed the
	// whole response.
	delivered bool
	// reqLog holds the request's logger.
	reqLog requestLog
	// sent is set once the transport has written the whole request.
	sent atomic.Bool

	// detachable is set for a stream whose response detach may take off the
	// HTTP server. Its upstream request then does not end with the
	// server's request context, which ends when the handler returns, but
	// follows it through unfollow until the response is detached.
	detachable bool
	unfollow   func() bool
	// w, in and log are the handler's, kept for detach until it runs. w
	// points to cw, or is nil once detach has run.
	cw  clientWriter
	w   *clientWriter
	in  *http.Request
	log *slog.Logger
	// detached is set once the response runs on a goroutine of its own,
	// which then ends the exchange in place of endForward.
	detached bool
	// wrote is closed once the transport reports the request written, for
	// a detachable stream whose body is forwarded unread, or is nil.
	wrote     chan struct{}
	wroteOnce sync.Once
}

type exchangeKey struct{}

func exchangeOf(ctx context.Context) *exchange {
	x, _ := ctx.Value(exchangeKey{}).(*exchange)
	return x
}

func (h *Handler) serveProvider(w http.ResponseWriter, r *http.Request) {
	x, log := h.admit(w, r)
	if x == nil {
		return
	}
	defer x.key.Wipe()
	h.forward(w, r, x, log)
}

// admit runs every check before a request goes upstream. It returns the
// exchange with the key to inject, or nil after writing an error response.
// It returns instead of calling forward, because its frame is about 600
// bytes. Without that frame below the reverse proxy, a stream's handler
// goroutine stays within 8 KiB of stack when the server writes the response
// header, rather than growing to 16 KiB for as long as the stream is open.
func (h *Handler) admit(w http.ResponseWriter, r *http.Request) (*exchange, *slog.Logger) {
	s := h.settings.Load()
	x := &exchange{id: newRequestID(), start: time.Now(), method: r.Method}
	setRequestID(w.Header(), x.id)

	name, rest, _ := splitRoute(r.URL.Path)
	up := s.upstreams[name]
	if up == nil {
		spec := provider.Guess(r)
		msg := fmt.Sprintf("unknown provider prefix %q: use /anthropic/, /openai/ or /google/", "/"+name+"/")
		if name == "" {
			msg = "missing provider prefix: use /anthropic/, /openai/ or /google/"
		}
		spec.WriteError(w, provider.NotFound, msg, 0)
		h.log.Info("request for unknown provider", "request_id", x.id, "path", r.URL.Path)
		return nil, nil
	}
	x.up, x.rest = up, rest
	spec := up.spec
	log := x.reqLog.start(h.log, x.id, spec.Name)

	// Check the request's shape before any store access, so hostile input
	// costs no Redis round trip.
	if headerBytes(r) > s.maxHeaderBytes {
		h.reject(w, x, log, provider.HeadersTooLarge, fmt.Sprintf("request headers exceed %d bytes", s.maxHeaderBytes), 0)
		return nil, nil
	}
	if r.ContentLength > s.maxBodyBytes {
		h.reject(w, x, log, provider.TooLarge, fmt.Sprintf("request body of %d bytes exceeds the limit of %d bytes", r.ContentLength, s.maxBodyBytes), 0)
		return nil, nil
	}
	if unsafePath(r.URL) {
		h.reject(w, x, log, provider.BadRequest, "invalid request path: empty or dot segments, backslashes and encoded slashes or dots are not allowed", 0)
		return nil, nil
	}
	if !forwardedMethods[r.Method] {
		h.reject(w, x, log, provider.BadRequest, fmt.Sprintf("method %s is not forwarded to providers: use GET, HEAD, POST, PUT, PATCH, DELETE or OPTIONS", r.Method), 0)
		return nil, nil
	}
	if overridesMethod(r) {
		h.reject(w, x, log, provider.BadRequest, "method override headers and parameters are not allowed: send the request with the method it means", 0)
		return nil, nil
	}

	// Identify the mailbox. A token, when present, wins over X-Mailbox-Id.
	token, err := mailboxToken(r)
	if err != nil {
		h.reject(w, x, log, provider.Unauthenticated, err.Error(), 0)
		return nil, nil
	}
	if s.trustMailboxHeader && r.Header.Get("X-Mailbox-Id") != "" && !mailbox.LooksLikeToken(token) {
		// The official SDKs refuse to send a request without an API key,
		// so a sidecar's clients send a placeholder next to the header.
		token = ""
	}
	var gen int64 = -1
	switch {
	case token != "":
		x.mailbox, gen, err = s.signer.Verify(token)
		if err != nil {
			h.reject(w, x, log, provider.Unauthenticated, "invalid mailbox token: use the token issued by the byokproxy admin API", 0)
			return nil, nil
		}
	case s.trustMailboxHeader && r.Header.Get("X-Mailbox-Id") != "":
		if len(r.Header.Values("X-Mailbox-Id")) > 1 {
			h.reject(w, x, log, provider.BadRequest, "more than one X-Mailbox-Id header; send exactly one", 0)
			return nil, nil
		}
		x.mailbox, err = mailbox.ParseID(r.Header.Get("X-Mailbox-Id"))
		if err != nil {
			h.reject(w, x, log, provider.BadRequest, err.Error(), 0)
			return nil, nil
		}
	default:
		h.reject(w, x, log, provider.Unauthenticated, "missing mailbox token: send it where the SDK sends an API key", 0)
		return nil, nil
	}
	log = x.reqLog.withMailbox(log, string(x.mailbox))

	// A client that waits for 100 Continue sends its body only on request.
	// When the record already decides the status, RFC 9110 section 10.1.1
	// has the proxy send it at once rather than request a body it rejects.
	if expectsContinue(r) && needsBody(spec.Name, r.Method, rest) && !h.precheck(w, r, x, gen, s, log) {
		return nil, nil
	}

	// The body comes before the record, so the record is read when the
	// request is about to be forwarded. A client that sends its body slowly
	// would otherwise keep a revoked token, a removed key or an allowance
	// it has since used up for as long as the body takes.
	if !h.readBody(w, r, x, s, log) {
		return nil, nil
	}

	// Read before the record: usage that leaves this list only once Redis
	// has counted it is then either in the list or in the record's total.
	x.pending = h.pending.get(x.mailbox)

	rec := h.record(w, r, x, gen, s, log)
	if rec == nil {
		return nil, nil
	}
	if rec.Source == keystore.SourceShared && x.streamedBody != nil && readsSharedBody(spec.Name, r.Method, rest) {
		// The checks that need no body come first, so a client that waits
		// for 100 Continue uploads nothing that they reject. As with the
		// other providers, the record is read again once the body is in,
		// so a slow body keeps no record it started with.
		x.source = rec.Source
		if !h.checkSharedEarly(w, r, x, rec, s, log) || !h.readSharedGoogleBody(w, r, x, s, log) {
			return nil, nil
		}
		x.pending = h.pending.get(x.mailbox)
		if rec = h.record(w, r, x, gen, s, log); rec == nil {
			return nil, nil
		}
	}
	x.source = rec.Source

	if x.source == keystore.SourceBYOK {
		if !h.openKey(w, x, rec, log) {
			return nil, nil
		}
	} else if !h.admitShared(w, r, x, rec, s, log) {
		return nil, nil
	}
	// The fields point into the body, which a stream lets go of once its
	// response begins.
	x.info = requestInfo{}
	return x, log
}

// record returns the mailbox's record (generation, source, ciphertext and
// limit, with usage when it is limited) from the record cache or one round
// trip. It returns nil after writing an error response when the store
// cannot be read or the token's generation has been revoked.
func (h *Handler) record(w http.ResponseWriter, r *http.Request, x *exchange, gen int64, s *settings, log *slog.Logger) *keystore.Record {
	name := x.up.spec.Name
	rec, err := h.store.Lookup(r.Context(), x.mailbox, name, s.monthlyLimit)
	if err == nil && gen > rec.Generation {
		// A token newer than the record was issued after a revocation
		// whose notice has not reached this replica yet.
		rec, err = h.store.Refresh(r.Context(), x.mailbox, name, s.monthlyLimit)
	}
	if err != nil {
		h.storeFailed(w, r, x, log, "key store read failed", err)
		return nil
	}
	if gen >= 0 && gen != rec.Generation {
		h.reject(w, x, log, provider.Unauthenticated, "mailbox token revoked: request a new token from the byokproxy admin API", 0)
		return nil
	}
	return rec
}

// precheck rejects a request before its body is requested when the record
// and the request header reject it whatever the body. That covers a revoked
// token, an unreadable store, and on the shared key an endpoint it does not
// serve or an allowance already used up. admit checks the record again once
// the body has arrived.
func (h *Handler) precheck(w http.ResponseWriter, r *http.Request, x *exchange, gen int64, s *settings, log *slog.Logger) bool {
	rec := h.record(w, r, x, gen, s, log)
	if rec == nil {
		return false
	}
	x.source = rec.Source
	if rec.Source == keystore.SourceBYOK {
		// So the audit event of a body rejected before the key is opened
		// names the key, as every byok event does.
		x.last4 = rec.Last4
	}
	return rec.Source != keystore.SourceShared || h.checkSharedEarly(w, r, x, rec, s, log)
}

// checkSharedEarly applies the shared key's checks that need no request
// body: the endpoint and an allowance already used up.
func (h *Handler) checkSharedEarly(w http.ResponseWriter, r *http.Request, x *exchange, rec *keystore.Record, s *settings, log *slog.Logger) bool {
	if !h.checkSharedRoute(w, r, x, log) {
		return false
	}
	if limit := allowance(rec, s); limit > 0 && rec.UsedShared >= limit {
		h.rejectAllowance(w, x, log, limit)
		return false
	}
	return true
}

// expectsContinue reports whether the client waits for 100 Continue
// before it sends the body, as Go's server decides it.
func expectsContinue(r *http.Request) bool {
	if !r.ProtoAtLeast(1, 1) || r.ContentLength == 0 {
		return false
	}
	for _, v := range r.Header["Expect"] {
		for part := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(part), "100-continue") {
				return true
			}
		}
	}
	return false
}

// allowance returns the mailbox's monthly token limit on the shared key,
// 0 for none.
func allowance(rec *keystore.Record, s *settings) int64 {
	if rec.Limit != nil {
		return *rec.Limit
	}
	return s.monthlyLimit
}

// rejectAllowance sends the 429 for a shared request from a mailbox whose
// allowance is used up.
func (h *Handler) rejectAllowance(w http.ResponseWriter, x *exchange, log *slog.Logger, limit int64) {
	h.metrics.MeteredRejections.WithLabelValues(x.up.spec.Name).Inc()
	reset := nextMonth(time.Now())
	msg := fmt.Sprintf("the monthly allowance of %d tokens on the shared key is used up; it resets at %s, or store your own key",
		limit, reset.Format(time.RFC3339))
	h.rejectAudited(w, x, log, provider.QuotaExceeded, msg, time.Until(reset))
}

// openKey decrypts the mailbox's own key for this request.
func (h *Handler) openKey(w http.ResponseWriter, x *exchange, rec *keystore.Record, log *slog.Logger) bool {
	// Set first, so that the audit event of a key that cannot be used
	// names it too.
	x.last4 = rec.Last4
	key, err := h.store.Open(rec, x.mailbox, x.up.spec.Name)
	if err != nil {
		reason := metrics.ReasonDecryptFailed
		msg := "the stored key cannot be used; store the key again"
		switch {
		case errors.Is(err, keystore.ErrNoKey):
			reason = metrics.ReasonNoKey
			msg = "no key is stored for this mailbox and provider; store one or switch the source to shared"
		case errors.Is(err, keystore.ErrWrongBinding):
			reason = metrics.ReasonWrongBinding
		}
		h.metrics.KeyErrors.WithLabelValues(x.up.spec.Name, reason).Inc()
		log.Error("stored key rejected", "reason", reason, "error", err)
		// Unlike a Redis outage, which the 503 also reports, this lasts
		// until the key is stored again, so the SDKs should not retry.
		w.Header().Set("X-Should-Retry", "false")
		h.rejectAudited(w, x, log, provider.Unavailable, msg, 0)
		return false
	}
	x.key = key
	x.keyText = string(key.Bytes())
	return true
}

// admitShared applies the shared key's rules: configured key, endpoint and
// model allowlists, response ownership and the monthly allowance.
func (h *Handler) admitShared(w http.ResponseWriter, r *http.Request, x *exchange, rec *keystore.Record, s *settings, log *slog.Logger) bool {
	if !h.checkSharedBody(w, x, log) || !h.checkSharedRoute(w, r, x, log) {
		return false
	}
	up := x.up
	if up.models != nil && r.Method == http.MethodPost && !up.models[x.model] {
		msg := fmt.Sprintf("model %q is not available on the shared key", x.model)
		if x.model == "" {
			msg = "the request names no model; name one of the models available on the shared key"
		}
		h.rejectAudited(w, x, log, provider.Forbidden, msg, 0)
		return false
	}
	if x.background {
		// The response would be fetched later from the stored responses,
		// which no shared request may read, while its usage would never
		// pass through the proxy.
		h.rejectAudited(w, x, log, provider.Forbidden, "background responses are not available on the shared key; use your own key for them", 0)
		return false
	}
	if !h.checkOwned(w, r, x, log) {
		return false
	}
	limit := allowance(rec, s)
	x.limited = limit > 0
	used := rec.UsedShared
	if x.limited && len(x.pending) > 0 {
		// Redis may have counted some of this usage since: the script
		// counts each request once.
		var err error
		if used, err = h.store.UsedShared(r.Context(), x.mailbox, x.pending); err != nil {
			h.storeFailed(w, r, x, log, "key store read failed", err)
			return false
		}
	}
	if x.limited && used >= limit {
		h.rejectAllowance(w, x, log, limit)
		return false
	}
	x.key = keystore.NewSecret([]byte(up.sharedKey))
	x.keyText = up.sharedKey
	return true
}

// checkSharedRoute applies the shared key's rules that the request header
// decides: a configured key, the endpoint allowlist and Google's response
// filters. It sets the model that a Google path names.
func (h *Handler) checkSharedRoute(w http.ResponseWriter, r *http.Request, x *exchange, log *slog.Logger) bool {
	up := x.up
	if up.sharedKey == "" {
		h.rejectAudited(w, x, log, provider.Forbidden, "no shared key is configured for "+up.spec.Title+"; store your own key", 0)
		return false
	}
	allowed, pathModel := sharedEndpoint(up.spec.Name, r.Method, x.rest)
	if !allowed {
		msg := fmt.Sprintf("%s /%s is not available on the shared key; use your own key for it", r.Method, x.rest)
		if base := misplacedVersion(up.spec.Name, x.rest); base != "" {
			// Storing a key would not help a client whose base URL is wrong.
			msg = fmt.Sprintf("%s /%s is not a path of the %s API: set the SDK's base URL to this proxy's %s", r.Method, x.rest, up.spec.Title, base)
		}
		h.rejectAudited(w, x, log, provider.Forbidden, msg, 0)
		return false
	}
	if pathModel != "" {
		x.model = pathModel
	}
	if needsBody(up.spec.Name, r.Method, x.rest) {
		if msg := encodedBody(r); msg != "" {
			h.rejectAudited(w, x, log, provider.BadRequest, msg, 0)
			return false
		}
	}
	if upgrades(r) {
		// No shared endpoint switches protocols, and a tunnel would carry
		// traffic that the usage tap never reads.
		h.rejectAudited(w, x, log, provider.BadRequest, "protocol upgrades (the Upgrade header) are not available on the shared key; use your own key for Realtime", 0)
		return false
	}
	if up.spec.Name == provider.Google {
		if filter := googleResponseFilter(r); filter != "" {
			h.rejectAudited(w, x, log, provider.Forbidden, filter+" is not available on the shared key, because a response it changes may lose its token usage; use your own key for it", 0)
			return false
		}
		// The endpoint is allowed, so a POST is a generation request, whose
		// body the shared key reads.
		if r.Method == http.MethodPost {
			if msg := googleRequestFormat(r); msg != "" {
				h.rejectAudited(w, x, log, provider.BadRequest, msg, 0)
				return false
			}
		}
	}
	return true
}

// checkOwned reports whether the mailbox created, on the shared key, the
// previous response and every container the request names. Otherwise it
// writes a 403, or a 503 when Redis cannot tell.
func (h *Handler) checkOwned(w http.ResponseWriter, r *http.Request, x *exchange, log *slog.Logger) bool {
	ids := x.namedIDs
	if x.previousResponse != "" {
		ids = append([]string{x.previousResponse}, ids...)
	}
	if len(ids) == 0 {
		return true
	}
	missing, err := h.store.FirstNotOwned(r.Context(), x.mailbox, ids)
	if err != nil {
		h.storeFailed(w, r, x, log, "ownership check failed", err)
		return false
	}
	if missing == "" {
		return true
	}
	subject := "the request names a code execution container"
	if strings.HasPrefix(missing, "rs_") {
		subject = "the request names a reasoning item"
	}
	if missing == x.previousResponse {
		subject = "previous_response_id names a response"
	}
	h.rejectAudited(w, x, log, provider.Forbidden, subject+" that this mailbox did not create on the shared key", 0)
	return false
}

func nextMonth(now time.Time) time.Time {
	now = now.UTC()
	return time.Date(now.Year(), now.Month()+1, 1, 0, 0, 0, 0, time.UTC)
}

// readBody reads a JSON generation request's body, bounded by the body
// limit, for its model and stream flag; other bodies stream through.
func (h *Handler) readBody(w http.ResponseWriter, r *http.Request, x *exchange, s *settings, log *slog.Logger) bool {
	// r.Body itself stays as the server gave it, because the server checks
	// it when the response header is written. A body announced with Expect:
	// 100-continue and not read to its end then makes the server close the
	// connection, so that the rest is not read as the next request.
	limited := http.MaxBytesReader(w, r.Body, s.maxBodyBytes)
	spec := x.up.spec
	if spec.Name == provider.Google {
		x.model = googlePathModel(x.rest)
		x.stream = isGoogleStream(x.rest)
	}
	x.requestBytes = max(r.ContentLength, 0)
	if !needsBody(spec.Name, r.Method, x.rest) {
		// The body streams through unread, and a chunked one has no
		// Content-Length, so the bytes sent are counted as they go.
		x.streamedBody = newCountingBody(limited)
		return true
	}
	body, ok := h.readWhole(w, r, x, limited, s, log)
	if !ok {
		return false
	}
	info, err := readRequestInfo(body)
	if err != nil {
		// The provider explains a malformed body better than the proxy can,
		// except where the proxy needs the body's content: the shared key
		// rejects it in checkSharedBody.
		x.bodyErr = plainJSONError(r, err)
		return true
	}
	x.info = info
	x.model = info.Model
	x.stream = info.Stream
	// Chat completions and legacy completions report a stream's usage only
	// when stream_options requests it.
	if spec.Name == provider.OpenAI && info.Stream && strings.HasSuffix(x.rest, "completions") && !info.includeUsage() {
		if patched, err := info.withIncludeUsage(body); err == nil {
			x.body = patched
			x.injectUsage = true
		}
	}
	x.previousResponse = info.PreviousResponseID
	x.background = info.Background && isResponsesAPI(spec.Name, x.rest)
	return true
}

// readWhole reads the request body from body into x.body, or writes an
// error response and returns false.
func (h *Handler) readWhole(w http.ResponseWriter, r *http.Request, x *exchange, body io.Reader, s *settings, log *slog.Logger) ([]byte, bool) {
	b, err := readAll(body, r.ContentLength, s.maxBodyBytes)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			h.rejectAudited(w, x, log, provider.TooLarge, fmt.Sprintf("request body exceeds the limit of %d bytes", s.maxBodyBytes), 0)
			return nil, false
		}
		log.Warn("reading request body failed", "error", err)
		h.rejectAudited(w, x, log, provider.BadRequest, "the request body could not be read", 0)
		return nil, false
	}
	x.body = b
	x.requestBytes = int64(len(b))
	return b, true
}

// plainJSONError returns the error for a shared request body that is not
// JSON because it was sent compressed, and err for any other body.
func plainJSONError(r *http.Request, err error) error {
	if err == errBodyNotJSON {
		if msg := encodedBody(r); msg != "" {
			return errors.New(msg)
		}
	}
	return err
}

// readSharedGoogleBody reads the body of a Google generation request that
// goes to the shared key, which readBody let stream through, so that
// checkSharedBody can look into it. It returns false after writing an error
// response. On the own key the body still streams through unread.
func (h *Handler) readSharedGoogleBody(w http.ResponseWriter, r *http.Request, x *exchange, s *settings, log *slog.Logger) bool {
	body, ok := h.readWhole(w, r, x, x.streamedBody, s, log)
	if !ok {
		return false
	}
	x.streamedBody = nil
	switch {
	case !validJSON(body):
		// An encoded body was rejected before it was read.
		x.bodyErr = errBodyNotJSON
	case body[skipSpace(body, 0)] != '{':
		x.bodyErr = errors.New("the request body must be a JSON object")
	case !utf8.Valid(body):
		// Names that differ only in invalid bytes could be read by Google
		// as the names the scan looks for.
		x.bodyErr = errors.New("the request body is not valid UTF-8")
	}
	return true
}

// checkSharedBody applies the shared key's rules to a request body the
// proxy read: it must be JSON the proxy can read, it may name no object
// stored with the provider account (see storedReference), and it may name
// only containers and items that the mailbox's shared requests created.
func (h *Handler) checkSharedBody(w http.ResponseWriter, x *exchange, log *slog.Logger) bool {
	if x.bodyErr != nil {
		h.rejectAudited(w, x, log, provider.BadRequest, x.bodyErr.Error(), 0)
		return false
	}
	if x.body == nil {
		// Forwarded unread, on a route whose body names nothing to check.
		return true
	}
	spec := x.up.spec
	if spec.Name == provider.Google {
		reference, otherModel, tooDeep := googleStoredReference(x.body, x.model)
		if otherModel != "" && !tooDeep {
			h.rejectAudited(w, x, log, provider.Forbidden, fmt.Sprintf("the request body names the model %q, and on the shared key it may name only the model of the path, %q", otherModel, x.model), 0)
			return false
		}
		return h.checkStoredReference(w, x, log, reference, tooDeep)
	}
	responses := isResponsesAPI(spec.Name, x.rest)
	if reference, tooDeep := storedReference(x.body, responses); !h.checkStoredReference(w, x, log, reference, tooDeep) {
		return false
	}
	var err error
	x.namedIDs, err = requestedContainers(spec.Name, x.rest, &x.info)
	if err != nil {
		h.rejectAudited(w, x, log, provider.BadRequest, err.Error(), 0)
		return false
	}
	if responses {
		tool, err := forbiddenSharedTool(&x.info)
		if err != nil {
			h.rejectAudited(w, x, log, provider.BadRequest, err.Error(), 0)
			return false
		}
		if tool != "" {
			h.rejectAudited(w, x, log, provider.Forbidden, "the request uses "+tool+", which runs an image model, and the shared key serves no image generation; use your own key for it", 0)
			return false
		}
		reference, owned, err := inspectInput(&x.info)
		if err != nil {
			h.rejectAudited(w, x, log, provider.BadRequest, err.Error(), 0)
			return false
		}
		if reference != "" {
			h.rejectAudited(w, x, log, provider.Forbidden, "the request names "+reference+", which the shared key does not allow; send previous_response_id or the items themselves, or use your own key", 0)
			return false
		}
		x.namedIDs = append(x.namedIDs, owned...)
	}
	// Items passed back repeat a container's id, and every distinct id is
	// checked, so a request may name only so many.
	slices.Sort(x.namedIDs)
	x.namedIDs = slices.Compact(x.namedIDs)
	if len(x.namedIDs) > maxNamedIDs {
		h.rejectAudited(w, x, log, provider.BadRequest, fmt.Sprintf("the request names %d code execution containers and reasoning items; name at most %d", len(x.namedIDs), maxNamedIDs), 0)
		return false
	}
	return true
}

// checkStoredReference rejects a shared request whose body names a stored
// object, as storedReference or googleStoredReference found it, or nests
// too deep to be read.
func (h *Handler) checkStoredReference(w http.ResponseWriter, x *exchange, log *slog.Logger, reference string, tooDeep bool) bool {
	if tooDeep {
		h.rejectAudited(w, x, log, provider.BadRequest, fmt.Sprintf("the request body nests deeper than %d levels, which the shared key does not read", maxStoredDepth), 0)
		return false
	}
	if reference != "" {
		h.rejectAudited(w, x, log, provider.Forbidden, "the request names "+reference+", which the shared key does not allow, because such objects belong to the platform's provider account; use your own key for it", 0)
		return false
	}
	return true
}

// maxNamedIDs bounds the distinct containers and reasoning items one
// request may name. A long conversation passed back item by item names a
// reasoning item per turn; ZMSCORE checks them all in one round trip.
const maxNamedIDs = 256

// countingBody counts the bytes read from a request body. The transport
// reads it on its own goroutine, hence the atomics.
type countingBody struct {
	body atomic.Pointer[readCloser]
	n    atomic.Int64
	// eof is set once the body has been read to its end.
	eof atomic.Bool
}

type readCloser struct{ io.ReadCloser }

func newCountingBody(body io.ReadCloser) *countingBody {
	b := &countingBody{}
	b.body.Store(&readCloser{body})
	return b
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.body.Load().Read(p)
	b.n.Add(int64(n))
	if err == io.EOF {
		b.eof.Store(true)
	}
	return n, err
}

func (b *countingBody) Close() error { return b.body.Load().Close() }

// release lets go of a body read to its end. The server's request body
// holds the server's state of the connection, which a detached stream
// must not keep, and the transport keeps its request for as long as the
// response lasts.
func (b *countingBody) release() { b.body.Store(&readCloser{http.NoBody}) }

// firstBodyBuffer is the most readAll allocates for a request body before
// any of it has arrived.
const firstBodyBuffer = 64 << 10

// readAll reads a request body of the given Content-Length into one buffer
// for a body up to firstBodyBuffer, where io.ReadAll would grow and copy its
// buffer several times. A longer body's buffer doubles as bytes arrive, up
// to Content-Length, so a client that declares a large body and sends
// little cannot make the proxy allocate it. The server ends the body after
// Content-Length bytes. A body of unknown length, or one over limit, goes
// through io.ReadAll.
func readAll(body io.Reader, contentLength, limit int64) ([]byte, error) {
	if contentLength <= 0 || contentLength > limit {
		return io.ReadAll(body)
	}
	buf := make([]byte, 0, min(contentLength, firstBodyBuffer))
	for int64(len(buf)) < contentLength {
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, int(min(contentLength, 2*int64(cap(buf))))-len(buf))
		}
		n, err := body.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF && int64(len(buf)) < contentLength {
			return nil, io.ErrUnexpectedEOF
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	return buf, nil
}

// reject writes an error response for a request with no known mailbox. It
// records no audit event, because the event would have no mailbox.
func (h *Handler) reject(w http.ResponseWriter, x *exchange, log *slog.Logger, kind provider.ErrorKind, msg string, retry time.Duration) {
	x.up.spec.WriteError(w, kind, msg, retry)
	x.status = kind.Status()
	x.errText = msg
	source := metrics.SourceLabel(x.source)
	h.metrics.Requests.WithLabelValues(x.up.spec.Name, source, strconv.Itoa(x.status)).Inc()
	log.Info("request rejected", "status", x.status, "error", msg)
}

// storeFailed handles a Redis call of the admission that failed with err,
// and logs message with it. A client that leaves during the call ends the
// call's context, which is no outage of the store. Such a request is
// recorded as left by its client, and the handler aborts without a
// response. Returning would send an empty 200, which a client that only
// shut its sending side down would take for a success.
func (h *Handler) storeFailed(w http.ResponseWriter, r *http.Request, x *exchange, log *slog.Logger, message string, err error) {
	if r.Context().Err() != nil {
		x.cancelled = true
		x.status = statusClientClosed
		x.errText = h.goneText(x)
		h.metrics.Requests.WithLabelValues(x.up.spec.Name, metrics.SourceLabel(x.source), strconv.Itoa(x.status)).Inc()
		h.audit.Record(audit.Entry{Event: h.event(x, nil)})
		log.Info("client left during a key store call", "error", err)
		panic(http.ErrAbortHandler)
	}
	h.metrics.KeyErrors.WithLabelValues(x.up.spec.Name, metrics.ReasonStoreUnavailable).Inc()
	log.Error(message, "error", err)
	h.rejectAudited(w, x, log, provider.Unavailable, "the key store is unavailable; retry shortly", 0)
}

// rejectAudited writes an error response for a known mailbox and records
// an audit event for it.
func (h *Handler) rejectAudited(w http.ResponseWriter, x *exchange, log *slog.Logger, kind provider.ErrorKind, msg string, retry time.Duration) {
	h.reject(w, x, log, kind, msg, retry)
	h.audit.Record(audit.Entry{Event: h.event(x, nil)})
}
