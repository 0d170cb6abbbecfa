// Package admin serves the admin API: per-mailbox keys, key sources, tokens,
// allowances and usage, behind a bearer admin token. Keys arrive here in
// plaintext (or age-encrypted by the client) and leave only as ciphertext in
// Redis and their last four characters.
package admin

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"

	"github.com/byokproxy/byokproxy/audit"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/provider"
)

// Options are the parts an API is built from.
type Options struct {
	Store  *keystore.Store
	Signer *mailbox.Signer
	Audit  *audit.Writer
	// Token is the admin bearer token.
	Token string
	// MonthlyTokenLimit is the default allowance; 0 is unlimited.
	MonthlyTokenLimit int64
	// Prober runs the key test. Without one, the test endpoint returns 501.
	Prober Prober
	Logger *slog.Logger
}

// Prober sends the smallest real request a provider accepts with a key.
type Prober interface {
	Probe(r *http.Request, prov string, key *keystore.Secret) ProbeResult
}

// ProbeResult is the outcome of a key test.
type ProbeResult struct {
	OK     bool   `json:"ok"`
	Status int    `json:"status"`
	Error  string `json:"error"`
}

// API is the admin HTTP handler.
type API struct {
	store  *keystore.Store
	audit  *audit.Writer
	prober Prober
	log    *slog.Logger
	mux    *http.ServeMux

	// tokenHash is the SHA-256 of the admin token; comparing hashes in
	// constant time does not reveal the token's length.
	tokenHash atomic.Pointer[[32]byte]
	signer    atomic.Pointer[mailbox.Signer]
	limit     atomic.Int64

	rejected rejectedLog
}

// rejectedLog spaces out the log lines of requests with a bad admin token,
// which anyone who reaches the listener can send at any rate.
type rejectedLog struct {
	mu      sync.Mutex
	last    time.Time
	skipped int
}

// rejectedLogInterval is the minimum time between two such lines.
const rejectedLogInterval = time.Second

// maxLoggedPath bounds the request path in such a line.
const maxLoggedPath = 256

// take reports whether a line may be written at now, and how many were
// skipped since the last one.
func (l *rejectedLog) take(now time.Time) (ok bool, skipped int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() && now.Sub(l.last) < rejectedLogInterval {
		l.skipped++
		return false, 0
	}
	skipped, l.skipped = l.skipped, 0
	l.last = now
	return true, skipped
}

// maxBody bounds an admin request body; a key with its JSON is far smaller.
const maxBody = 64 << 10

// New returns the admin API.
func New(opts Options) *API {
	a := &API{store: opts.Store, audit: opts.Audit, prober: opts.Prober, log: opts.Logger, mux: http.NewServeMux()}
	if a.log == nil {
		a.log = slog.New(slog.DiscardHandler)
	}
	a.SetToken(opts.Token)
	a.signer.Store(opts.Signer)
	a.limit.Store(opts.MonthlyTokenLimit)

	a.mux.HandleFunc("GET /admin/v1/mailboxes/{m}", a.getMailbox)
	a.mux.HandleFunc("DELETE /admin/v1/mailboxes/{m}", a.deleteMailbox)
	a.mux.HandleFunc("PUT /admin/v1/mailboxes/{m}/providers/{p}/key", a.putKey)
	a.mux.HandleFunc("DELETE /admin/v1/mailboxes/{m}/providers/{p}/key", a.deleteKey)
	a.mux.HandleFunc("PUT /admin/v1/mailboxes/{m}/providers/{p}/source", a.putSource)
	a.mux.HandleFunc("POST /admin/v1/mailboxes/{m}/providers/{p}/test", a.testKey)
	a.mux.HandleFunc("POST /admin/v1/mailboxes/{m}/token", a.issueToken)
	a.mux.HandleFunc("POST /admin/v1/mailboxes/{m}/token/revoke", a.revokeToken)
	a.mux.HandleFunc("GET /admin/v1/mailboxes/{m}/usage", a.getUsage)
	a.mux.HandleFunc("PUT /admin/v1/mailboxes/{m}/limit", a.putLimit)
	a.mux.HandleFunc("GET /admin/v1/recipient", a.getRecipient)
	a.mux.HandleFunc("/admin/", a.noEndpoint)
	return a
}

// routeMethods are the methods the admin API's routes use.
var routeMethods = []string{http.MethodGet, http.MethodPut, http.MethodPost, http.MethodDelete}

// noEndpoint writes the error for a request that matches no route: 405
// with an Allow header when the path has routes for other methods, else 404.
func (a *API) noEndpoint(w http.ResponseWriter, r *http.Request) {
	var allowed []string
	for _, method := range routeMethods {
		probe := &http.Request{Method: method, URL: r.URL, Host: r.Host}
		if _, pattern := a.mux.Handler(probe); pattern != "" && pattern != "/admin/" {
			allowed = append(allowed, method)
		}
	}
	if len(allowed) == 0 {
		writeError(w, http.StatusNotFound, "no admin endpoint "+r.Method+" "+r.URL.Path)
		return
	}
	w.Header().Set("Allow", strings.Join(allowed, ", "))
	writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("%s is not allowed on %s: use %s", r.Method, r.URL.Path, strings.Join(allowed, " or ")))
}

// SetToken replaces the admin token, for a reload.
func (a *API) SetToken(token string) {
	sum := sha256.Sum256([]byte(token))
	a.tokenHash.Store(&sum)
}

// SetSigner replaces the token signer, for a reload.
func (a *API) SetSigner(s *mailbox.Signer) { a.signer.Store(s) }

// SetDefaultLimit replaces the default monthly allowance, for a reload.
func (a *API) SetDefaultLimit(n int64) { a.limit.Store(n) }

// ServeHTTP checks the admin token, then routes.
func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	if !a.authorized(r) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="byokproxy admin"`)
		writeError(w, http.StatusUnauthorized, "missing or invalid admin token: send Authorization: Bearer ADMIN_TOKEN")
		if ok, skipped := a.rejected.take(time.Now()); ok {
			path := r.URL.Path
			if len(path) > maxLoggedPath {
				path = path[:maxLoggedPath] + "..."
			}
			a.log.Warn("admin request rejected: bad token", "method", r.Method, "path", path, "remote", r.RemoteAddr,
				"rejected_since_last_line", skipped)
		}
		return
	}
	if uncleanPath(r.URL.EscapedPath()) {
		// ServeMux would redirect to the cleaned path, and a client that
		// follows it acts on another mailbox: ".../victim/providers/openai/../../../other"
		// cleans to ".../other".
		writeError(w, http.StatusBadRequest, fmt.Sprintf("invalid admin path %q: empty, \".\" and \"..\" segments are not allowed; write each dot of a mailbox id of . or .. as %%2E", r.URL.EscapedPath()))
		return
	}
	a.mux.ServeHTTP(w, r)
}

// uncleanPath reports whether the escaped path p has a "." or ".." segment,
// or an empty one before its last: the segments ServeMux cleans away. A dot
// written as %2E is left alone, as ServeMux leaves it.
func uncleanPath(p string) bool {
	segments := strings.Split(strings.TrimPrefix(p, "/"), "/")
	for i, segment := range segments {
		if segment == "." || segment == ".." || (segment == "" && i < len(segments)-1) {
			return true
		}
	}
	return false
}

func (a *API) authorized(r *http.Request) bool {
	// Two Authorization headers are ambiguous: components disagree on which
	// one counts, so neither does.
	if len(r.Header.Values("Authorization")) != 1 {
		return false
	}
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
		return false
	}
	sum := sha256.Sum256([]byte(token))
	want := a.tokenHash.Load()
	return subtle.ConstantTimeCompare(sum[:], want[:]) == 1
}

// Authorized reports whether r carries the admin token, for other handlers
// on the admin listener.
func (a *API) Authorized(r *http.Request) bool { return a.authorized(r) }

// pathMailbox validates the {m} path value and writes a 400 when it is
// invalid.
func pathMailbox(w http.ResponseWriter, r *http.Request) (mailbox.ID, bool) {
	id, err := mailbox.ParseID(r.PathValue("m"))
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return "", false
	}
	return id, true
}

func pathProvider(w http.ResponseWriter, r *http.Request) (string, bool) {
	p := r.PathValue("p")
	if provider.Lookup(p) == nil {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("invalid provider %q: use anthropic, openai or google", p))
		return "", false
	}
	return p, true
}

func (a *API) getMailbox(w http.ResponseWriter, r *http.Request) {
	id, ok := pathMailbox(w, r)
	if !ok {
		return
	}
	status, err := a.store.Mailbox(r.Context(), id)
	if err != nil {
		a.storeError(w, r, err, id, "")
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"mailbox": id, "providers": status})
}

func (a *API) deleteMailbox(w http.ResponseWriter, r *http.Request) {
	id, ok := pathMailbox(w, r)
	if !ok {
		return
	}
	if err := a.store.DeleteMailbox(r.Context(), id); err != nil {
		a.storeError(w, r, err, id, "")
		return
	}
	a.record(audit.Event{Kind: audit.KindMailboxDeleted, Mailbox: string(id)})
	a.log.Info("mailbox deleted", "mailbox", string(id))
	w.WriteHeader(http.StatusNoContent)
}

// keyBody is the body of PUT .../key: exactly one of Key and Age.
type keyBody struct {
	Key *string `json:"key"`
	Age *string `json:"age"`
}

func (a *API) putKey(w http.ResponseWriter, r *http.Request) {
	id, ok := pathMailbox(w, r)
	if !ok {
		return
	}
	prov, ok := pathProvider(w, r)
	if !ok {
		return
	}
	var body keyBody
	if !readJSON(w, r, &body) {
		return
	}
	var st keystore.Status
	var err error
	switch {
	case body.Key != nil && body.Age == nil:
		// The key is copied into bytes so PutKey can wipe them; the string
		// that JSON decoding made stays until the garbage collector frees it.
		st, err = a.store.PutKey(r.Context(), id, prov, []byte(*body.Key))
	case body.Age != nil && body.Key == nil:
		st, err = a.store.PutSealedKey(r.Context(), id, prov, []byte(*body.Age))
	default:
		writeError(w, http.StatusBadRequest, `send exactly one of {"key":"..."} or {"age":"ARMORED CIPHERTEXT"}`)
		return
	}
	if errors.Is(err, keystore.ErrBadKey) {
		spec := provider.Lookup(prov)
		msg := err.Error()
		if !strings.Contains(msg, "recipient") {
			msg = fmt.Sprintf("invalid %s key: %s", spec.Title, spec.KeyRule)
		}
		writeError(w, http.StatusBadRequest, msg)
		return
	}
	if err != nil {
		a.storeError(w, r, err, id, prov)
		return
	}
	a.record(audit.Event{Kind: audit.KindKeySet, Mailbox: string(id), Provider: prov, KeyLast4: st.Last4, Source: st.Source})
	a.log.Info("key stored", "mailbox", string(id), "provider", prov, "key_last4", st.Last4)
	writeJSON(w, http.StatusOK, st)
}

func (a *API) deleteKey(w http.ResponseWriter, r *http.Request) {
	id, ok := pathMailbox(w, r)
	if !ok {
		return
	}
	prov, ok := pathProvider(w, r)
	if !ok {
		return
	}
	last4, removed, err := a.store.DeleteKey(r.Context(), id, prov)
	if err != nil {
		a.storeError(w, r, err, id, prov)
		return
	}
	if !removed {
		// Removal is idempotent. With no key stored nothing changed, so no audit
		// event is written.
		a.log.Info("key removal: no key stored", "mailbox", string(id), "provider", prov)
		w.WriteHeader(http.StatusNoContent)
		return
	}
	a.record(audit.Event{Kind: audit.KindKeyRemoved, Mailbox: string(id), Provider: prov, KeyLast4: last4, Source: keystore.SourceShared})
	a.log.Info("key removed", "mailbox", string(id), "provider", prov)
	w.WriteHeader(http.StatusNoContent)
}

func (a *API) putSource(w http.ResponseWriter, r *http.Request) {
	id, ok := pathMailbox(w, r)
	if !ok {
		return
	}
	prov, ok := pathProvider(w, r)
	if !ok {
		return
	}
	var body struct {
		Source string `json:"source"`
	}
	if !readJSON(w, r, &body) {
		return
	}
	if body.Source != keystore.SourceShared && body.Source != keystore.SourceBYOK {
		writeError(w, http.StatusBadRequest, fmt.Sprintf(`invalid source %q: use "shared" or "byok"`, body.Source))
		return
	}
	st, err := a.store.SetSource(r.Context(), id, prov, body.Source)
	if errors.Is(err, keystore.ErrNoKey) {
		writeError(w, http.StatusConflict, "no key is stored for "+prov+"; store a key before selecting byok")
		return
	}
	if err != nil {
		a.storeError(w, r, err, id, prov)
		return
	}
	a.record(audit.Event{Kind: audit.KindSourceChanged, Mailbox: string(id), Provider: prov, Source: st.Source, KeyLast4: st.Last4})
	a.log.Info("source changed", "mailbox", string(id), "provider", prov, "source", st.Source)
	writeJSON(w, http.StatusOK, st)
}

func (a *API) testKey(w http.ResponseWriter, r *http.Request) {
	id, ok := pathMailbox(w, r)
	if !ok {
		return
	}
	prov, ok := pathProvider(w, r)
	if !ok {
		return
	}
	if a.prober == nil {
		writeError(w, http.StatusNotImplemented, "key test is not available on this proxy")
		return
	}
	rec, err := a.store.Read(r.Context(), id, prov)
	if err != nil {
		a.storeError(w, r, err, id, prov)
		return
	}
	key, err := a.store.Open(rec, id, prov)
	if errors.Is(err, keystore.ErrNoKey) {
		writeError(w, http.StatusConflict, "no key is stored for "+prov+"; store a key before testing it")
		return
	}
	if err != nil {
		a.log.Error("stored key cannot be used for a test", "mailbox", string(id), "provider", prov, "error", err)
		writeError(w, http.StatusServiceUnavailable, "the stored key cannot be used: "+err.Error()+"; store the key again")
		return
	}
	result := a.prober.Probe(r, prov, key)
	key.Wipe()
	a.record(audit.Event{Kind: audit.KindKeyTested, Mailbox: string(id), Provider: prov, KeyLast4: rec.Last4, Status: result.Status, Error: result.Error})
	a.log.Info("key tested", "mailbox", string(id), "provider", prov, "ok", result.OK, "status", result.Status)
	writeJSON(w, http.StatusOK, result)
}

func (a *API) issueToken(w http.ResponseWriter, r *http.Request) {
	id, ok := pathMailbox(w, r)
	if !ok {
		return
	}
	gen, err := a.store.Generation(r.Context(), id)
	if err != nil {
		a.storeError(w, r, err, id, "")
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"token": a.signer.Load().Issue(id, gen)})
}

func (a *API) revokeToken(w http.ResponseWriter, r *http.Request) {
	id, ok := pathMailbox(w, r)
	if !ok {
		return
	}
	gen, err := a.store.Revoke(r.Context(), id)
	if err != nil {
		a.storeError(w, r, err, id, "")
		return
	}
	a.record(audit.Event{Kind: audit.KindTokenRevoked, Mailbox: string(id)})
	a.log.Info("mailbox tokens revoked", "mailbox", string(id), "generation", gen)
	writeJSON(w, http.StatusOK, map[string]string{"token": a.signer.Load().Issue(id, gen)})
}

func (a *API) getUsage(w http.ResponseWriter, r *http.Request) {
	id, ok := pathMailbox(w, r)
	if !ok {
		return
	}
	month := r.URL.Query().Get("month")
	if month == "" {
		month = keystore.Month(time.Now())
	} else if _, err := time.Parse("2006-01", month); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("invalid month %q: use YYYY-MM", month))
		return
	}
	u, err := a.store.Usage(r.Context(), id, month)
	if err == nil {
		var own *int64
		own, err = a.store.Limit(r.Context(), id)
		if err == nil {
			writeJSON(w, http.StatusOK, usageAnswer(id, month, u, a.effectiveLimit(own)))
			return
		}
	}
	a.storeError(w, r, err, id, "")
}

func (a *API) effectiveLimit(own *int64) int64 {
	if own != nil {
		return *own
	}
	return a.limit.Load()
}

func usageAnswer(id mailbox.ID, month string, u keystore.MonthUsage, limit int64) map[string]any {
	providers := map[string]map[string]keystore.Counts{}
	for _, p := range provider.Names {
		providers[p] = map[string]keystore.Counts{
			keystore.SourceBYOK:   u.Providers[p][keystore.SourceBYOK],
			keystore.SourceShared: u.Providers[p][keystore.SourceShared],
		}
	}
	var limitValue, remaining any
	if limit > 0 {
		limitValue = limit
		remaining = max(limit-u.SharedTotal, 0)
	}
	return map[string]any{
		"mailbox": id, "month": month, "limit": limitValue, "remaining": remaining,
		"providers": providers,
	}
}

func (a *API) putLimit(w http.ResponseWriter, r *http.Request) {
	id, ok := pathMailbox(w, r)
	if !ok {
		return
	}
	var raw map[string]json.RawMessage
	if !readJSON(w, r, &raw) {
		return
	}
	value, present := raw["monthly_token_limit"]
	if !present {
		writeError(w, http.StatusBadRequest, `missing "monthly_token_limit": send a whole number of tokens (0 for unlimited) or null`)
		return
	}
	var limit *int64
	if string(value) != "null" {
		n, err := parseLimit(value)
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		limit = &n
	}
	if err := a.store.SetLimit(r.Context(), id, limit); err != nil {
		a.storeError(w, r, err, id, "")
		return
	}
	effective := a.effectiveLimit(limit)
	if limit == nil {
		a.log.Info("monthly limit override removed", "mailbox", string(id), "limit", effective)
	} else {
		a.log.Info("monthly limit set", "mailbox", string(id), "limit", effective)
	}
	writeJSON(w, http.StatusOK, map[string]any{"mailbox": id, "monthly_token_limit": effective, "override": limit != nil})
}

func parseLimit(raw json.RawMessage) (int64, error) {
	var n int64
	if err := json.Unmarshal(raw, &n); err != nil || n < 0 {
		return 0, errors.New(`invalid "monthly_token_limit": send a whole number of tokens of 0 or more (0 for unlimited), or null to use the default`)
	}
	return n, nil
}

func (a *API) getRecipient(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"recipient": a.store.Identities().Recipient().String()})
}

func (a *API) record(e audit.Event) {
	e.Time = time.Now()
	a.audit.Record(audit.Entry{Event: e})
}

func (a *API) storeError(w http.ResponseWriter, r *http.Request, err error, id mailbox.ID, prov string) {
	a.log.Error("admin request failed", "method", r.Method, "path", r.URL.Path, "mailbox", string(id), "provider", prov, "error", err)
	if errors.Is(err, keystore.ErrUnavailable) {
		writeError(w, http.StatusServiceUnavailable, "the key store is unavailable; retry shortly")
		return
	}
	writeError(w, http.StatusInternalServerError, "internal error; see the proxy log")
}

// readJSON decodes a bounded JSON body and writes a 400 when it is
// malformed.
func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body exceeds %d bytes", maxBody))
			return false
		}
		writeError(w, http.StatusBadRequest, "the request body could not be read")
		return false
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(v); err != nil {
		// The decoder's message can quote the input, which may be a key.
		writeError(w, http.StatusBadRequest, "the request body is not valid JSON of the expected shape")
		return false
	}
	if _, err := dec.Token(); err != io.EOF {
		writeError(w, http.StatusBadRequest, "the request body has data after the JSON value")
		return false
	}
	if err := checkMembers(data, v); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return false
	}
	return true
}

// checkMembers rejects what encoding/json lets through in an object: a
// member named twice, of which the last would win, and a field's name in
// other letter case, which would fill the field. Either could make the
// proxy store a key other than the one the caller checked. A name is quoted
// in the message only when it is a field's, so the message never echoes
// the body's other text, which may be a key.
func checkMembers(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil
	}
	fields := jsonFields(v)
	seen := make(map[string]bool)
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil
		}
		name, _ := tok.(string)
		folded := foldName(name)
		field, known := fields[folded]
		switch {
		case seen[folded] && known:
			return fmt.Errorf("the request body names %q more than once; send it once", field)
		case seen[folded]:
			return errors.New("the request body names a member more than once; send each once")
		case known && name != field:
			return fmt.Errorf("the request body names %q in other letter case; field names are case-sensitive", field)
		}
		seen[folded] = true
		var value json.RawMessage
		if err := dec.Decode(&value); err != nil {
			return nil
		}
	}
	return nil
}

// foldName returns the same string for every name that encoding/json takes
// for one field: each letter is replaced by the smallest letter it folds to
// under Unicode simple case folding, so "ſource" and "Source" give what
// "source" gives.
func foldName(name string) string {
	return strings.Map(func(r rune) rune {
		least := r
		for f := unicode.SimpleFold(r); f != r; f = unicode.SimpleFold(f) {
			least = min(least, f)
		}
		return least
	}, name)
}

// jsonFields maps the folded JSON name (see foldName) of each field of the
// struct v points to to the name itself. It is empty for other types.
func jsonFields(v any) map[string]string {
	t := reflect.TypeOf(v)
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	fields := make(map[string]string)
	if t.Kind() != reflect.Struct {
		return fields
	}
	for f := range t.Fields() {
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "" || name == "-" {
			name = f.Name
		}
		fields[foldName(name)] = name
	}
	return fields
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// writeError writes {"error":{"status":N,"message":"..."}}.
func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]any{"error": map[string]any{"status": status, "message": msg}})
}
