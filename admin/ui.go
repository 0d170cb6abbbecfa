package admin

import (
	"bytes"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"embed"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"mime"
	"net/http"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// uiAssets is the built key settings page: the output of "npm run build" in
// ui/, committed so that "go build" needs no Node.js.
//
//go:embed all:uiassets
var uiAssets embed.FS

const (
	// SessionCookie is the name of the page's session cookie.
	SessionCookie = "byokproxy_ui_session"
	// CSRFHeader carries the session's CSRF token on every admin API call
	// the page makes.
	CSRFHeader = "X-CSRF-Token"
	// DefaultSessionTTL is the lifetime of a page session.
	DefaultSessionTTL = 12 * time.Hour

	// contentSecurityPolicy allows the page's own script, style and API
	// calls only: no inline code, no other host, no framing.
	contentSecurityPolicy = "default-src 'self'; connect-src 'self'; script-src 'self'; style-src 'self'; " +
		"img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"

	// maxSignInBody bounds the sign-in body; an admin token is far shorter.
	maxSignInBody = 4 << 10
	// maxRevoked bounds the sign-out list of one process.
	maxRevoked = 10_000
)

// Session cookie layout: version, expiry in Unix seconds, random session id,
// then an HMAC-SHA256 of those three under a key derived from the admin token.
const (
	sessionVersion   = 1
	sessionIDLen     = 16
	sessionSignedLen = 1 + 8 + sessionIDLen
	sessionLen       = sessionSignedLen + sha256.Size
)

// UIOptions configure the key settings page.
type UIOptions struct {
	// Enabled serves the page under /ui/ and lets the admin API accept the
	// page's session cookie. When false, /ui/ returns 404 and only bearer
	// tokens reach the API.
	Enabled bool
	// Token is the admin token: it signs the operator in, and the session
	// signing key is derived from it.
	Token string
	// SessionTTL is the lifetime of a session; zero means DefaultSessionTTL.
	SessionTTL time.Duration
	Logger     *slog.Logger
}

// UI is the handler of the admin listener when the settings page may be on.
// It serves the page under /ui/, its sign-in and sign-out endpoints, and
// passes /admin/v1 requests to the API, authorizing those that carry a valid
// session cookie and the session's CSRF header.
//
// Sessions are stateless signed cookies, so every replica with the same admin
// token accepts them. Changing the admin token ends every session.
type UI struct {
	api     *API
	enabled bool
	ttl     time.Duration
	log     *slog.Logger
	assets  fs.FS
	keys    atomic.Pointer[sessionKeys]
	now     func() time.Time

	mu      sync.Mutex
	revoked map[[sessionIDLen]byte]time.Time
}

// sessionKeys are the admin token and the keys derived from it.
type sessionKeys struct {
	token     string
	tokenHash [32]byte
	// signing signs session cookies and CSRF tokens; nil when the admin
	// token is empty, so that no session can be made or verified.
	signing []byte
}

// session is a verified session cookie.
type session struct {
	id      [sessionIDLen]byte
	expires time.Time
}

// NewUI returns the handler that serves the settings page in front of api.
func NewUI(api *API, opts UIOptions) *UI {
	assets, err := fs.Sub(uiAssets, "uiassets")
	if err != nil {
		panic("admin: embedded page assets missing: " + err.Error())
	}
	u := &UI{
		api:     api,
		enabled: opts.Enabled,
		ttl:     opts.SessionTTL,
		log:     opts.Logger,
		assets:  assets,
		now:     time.Now,
		revoked: map[[sessionIDLen]byte]time.Time{},
	}
	if u.ttl <= 0 {
		u.ttl = DefaultSessionTTL
	}
	if u.log == nil {
		u.log = slog.New(slog.DiscardHandler)
	}
	u.keys.Store(deriveKeys(opts.Token))
	return u
}

// SetToken replaces the admin token of the page and of the API, for a reload.
// Sessions made with the old token stop working.
func (u *UI) SetToken(token string) {
	u.api.SetToken(token)
	u.keys.Store(deriveKeys(token))
}

func deriveKeys(token string) *sessionKeys {
	k := &sessionKeys{token: token, tokenHash: sha256.Sum256([]byte(token))}
	if token == "" {
		return k
	}
	signing, err := hkdf.Key(sha256.New, []byte(token), nil, "byokproxy ui session v1", 32)
	if err != nil {
		panic("admin: derive session key: " + err.Error())
	}
	k.signing = signing
	return k
}

// ServeHTTP routes /ui/ to the page, /admin/ requests with a session cookie
// and no Authorization header through the session check, and everything else
// to the API unchanged.
func (u *UI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	setSecurityHeaders(w.Header())
	p := r.URL.Path
	switch {
	case p == "/ui" || strings.HasPrefix(p, "/ui/"):
		if !u.enabled {
			w.Header().Set("Cache-Control", "no-store")
			writeError(w, http.StatusNotFound, "the key settings page is off; set admin.ui: true to serve it")
			return
		}
		u.servePage(w, r)
	case u.enabled && strings.HasPrefix(p, "/admin/") && r.Header.Get("Authorization") == "" && hasSessionCookie(r):
		u.serveWithSession(w, r)
	default:
		u.api.ServeHTTP(w, r)
	}
}

func setSecurityHeaders(h http.Header) {
	h.Set("Content-Security-Policy", contentSecurityPolicy)
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
	h.Set("Cross-Origin-Resource-Policy", "same-origin")
}

func hasSessionCookie(r *http.Request) bool {
	_, err := r.Cookie(SessionCookie)
	return err == nil
}

func (u *UI) servePage(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Path
	if p == "/ui/session" {
		w.Header().Set("Cache-Control", "no-store")
		switch r.Method {
		case http.MethodPost:
			u.signIn(w, r)
		case http.MethodGet:
			u.sessionInfo(w, r)
		case http.MethodDelete:
			u.signOut(w, r)
		default:
			w.Header().Set("Allow", "GET, POST, DELETE")
			writeError(w, http.StatusMethodNotAllowed, "use POST to sign in, GET to read the session, DELETE to sign out")
		}
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		writeError(w, http.StatusMethodNotAllowed, "the page's files are read-only")
		return
	}
	if p == "/ui" {
		http.Redirect(w, r, "/ui/", http.StatusFound)
		return
	}
	u.serveAsset(w, r, strings.TrimPrefix(p, "/ui/"))
}

// serveAsset serves one embedded file. Directories are never listed.
func (u *UI) serveAsset(w http.ResponseWriter, r *http.Request, name string) {
	if name == "" {
		name = "index.html"
	}
	if !fs.ValidPath(name) {
		writeError(w, http.StatusNotFound, "no such file")
		return
	}
	data, err := fs.ReadFile(u.assets, name)
	if err != nil {
		// ReadFile of a directory fails too, so directories get 404.
		writeError(w, http.StatusNotFound, "no such file")
		return
	}
	if name == "index.html" {
		w.Header().Set("Cache-Control", "no-cache")
	} else {
		// Vite puts a content hash in every asset name under assets/.
		w.Header().Set("Cache-Control", "public, max-age=31536000, immutable")
	}
	if ct := mime.TypeByExtension(path.Ext(name)); ct != "" {
		w.Header().Set("Content-Type", ct)
	}
	http.ServeContent(w, r, name, time.Time{}, bytes.NewReader(data))
}

// sessionResponse is the body of a successful sign-in or session read.
type sessionResponse struct {
	CSRFToken string    `json:"csrf_token"`
	ExpiresAt time.Time `json:"expires_at"`
}

// signIn checks the admin token in the JSON body and starts a session: it
// sets the session cookie and returns the session's CSRF token.
func (u *UI) signIn(w http.ResponseWriter, r *http.Request) {
	token, ok := readSignInToken(w, r)
	if !ok {
		return
	}

	keys := u.keys.Load()
	sum := sha256.Sum256([]byte(token))
	if keys.signing == nil || subtle.ConstantTimeCompare(sum[:], keys.tokenHash[:]) != 1 {
		u.log.Warn("ui sign-in rejected: invalid admin token", "remote", r.RemoteAddr)
		writeError(w, http.StatusUnauthorized, "invalid admin token")
		return
	}
	if !u.api.Authorized(bearerRequest(token)) {
		// A session would be useless: the API rejects the token it forwards.
		u.log.Error("ui sign-in rejected: the API has another admin token; change tokens with UI.SetToken", "remote", r.RemoteAddr)
		writeError(w, http.StatusUnauthorized, "invalid admin token")
		return
	}

	s := session{expires: u.now().Add(u.ttl).Truncate(time.Second)}
	rand.Read(s.id[:])
	http.SetCookie(w, u.cookie(r, encodeSession(keys.signing, s), s.expires))
	u.log.Info("ui session started", "remote", r.RemoteAddr, "expires_at", s.expires.UTC())
	writeJSON(w, http.StatusOK, sessionResponse{CSRFToken: csrfToken(keys.signing, s), ExpiresAt: s.expires.UTC()})
}

// readSignInToken reads {"token":"..."} from a bounded JSON body, writing
// the error response when the body is not one.
func readSignInToken(w http.ResponseWriter, r *http.Request) (string, bool) {
	mediaType, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if mediaType != "application/json" {
		writeError(w, http.StatusUnsupportedMediaType, `send the admin token as JSON: {"token":"..."} with Content-Type: application/json`)
		return "", false
	}
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxSignInBody))
	if err != nil {
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf(`the sign-in body exceeds %d bytes or could not be read; send only {"token":"..."}`, maxSignInBody))
		return "", false
	}
	var body struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal(data, &body); err != nil {
		writeError(w, http.StatusBadRequest, `the sign-in body is not valid JSON: send {"token":"..."}`)
		return "", false
	}
	return body.Token, true
}

// sessionInfo returns the CSRF token of the current session, so that a
// reloaded page can go on without a new sign-in. Only a page of this origin
// can read the response.
func (u *UI) sessionInfo(w http.ResponseWriter, r *http.Request) {
	s, keys, err := u.readSession(r)
	if err != nil {
		u.rejectSession(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, sessionResponse{CSRFToken: csrfToken(keys.signing, s), ExpiresAt: s.expires.UTC()})
}

// signOut clears the cookie and, for a valid session, revokes it in this
// process. A session that is valid needs its CSRF token to be ended, so that
// another site cannot sign the operator out.
func (u *UI) signOut(w http.ResponseWriter, r *http.Request) {
	s, keys, err := u.readSession(r)
	if err == nil {
		if !validCSRF(r, keys.signing, s) {
			writeError(w, http.StatusForbidden, "missing or invalid "+CSRFHeader+" header")
			return
		}
		u.revoke(s)
		u.log.Info("ui session ended", "remote", r.RemoteAddr)
	}
	http.SetCookie(w, u.expiredCookie(r))
	w.WriteHeader(http.StatusNoContent)
}

// serveWithSession authorizes an admin API request by its session cookie and
// passes it on with the admin token set, as if the page had sent it.
func (u *UI) serveWithSession(w http.ResponseWriter, r *http.Request) {
	s, keys, err := u.readSession(r)
	if err != nil {
		w.Header().Set("Cache-Control", "no-store")
		u.rejectSession(w, r, err)
		return
	}
	// Reads need the header too: the cookie alone proves only that a
	// browser holds the session, not that the page made the call.
	if r.Header.Get("Sec-Fetch-Site") == "cross-site" || !validCSRF(r, keys.signing, s) {
		w.Header().Set("Cache-Control", "no-store")
		u.log.Warn("ui request rejected: missing or invalid CSRF token", "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr)
		writeError(w, http.StatusForbidden, "missing or invalid "+CSRFHeader+" header; reload the page")
		return
	}
	inner := r.Clone(r.Context())
	inner.Header.Set("Authorization", "Bearer "+keys.token)
	inner.Header.Del("Cookie")
	inner.Header.Del(CSRFHeader)
	u.api.ServeHTTP(w, inner)
}

func bearerRequest(token string) *http.Request {
	return &http.Request{Header: http.Header{"Authorization": {"Bearer " + token}}}
}

var (
	errNoSession      = errors.New("no session cookie")
	errSessionInvalid = errors.New("session cookie is malformed or not signed by this admin token")
	errSessionExpired = errors.New("session expired")
	errSessionRevoked = errors.New("session was signed out")
)

func (u *UI) rejectSession(w http.ResponseWriter, r *http.Request, err error) {
	if !errors.Is(err, errNoSession) {
		u.log.Info("ui session rejected", "reason", err.Error(), "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr)
		http.SetCookie(w, u.expiredCookie(r))
	}
	writeError(w, http.StatusUnauthorized, "not signed in: the session has ended or is invalid; sign in again")
}

// readSession verifies the session cookie of r.
func (u *UI) readSession(r *http.Request) (session, *sessionKeys, error) {
	keys := u.keys.Load()
	c, err := r.Cookie(SessionCookie)
	if err != nil {
		return session{}, keys, errNoSession
	}
	if keys.signing == nil {
		return session{}, keys, errSessionInvalid
	}
	s, err := decodeSession(keys.signing, c.Value)
	if err != nil {
		return session{}, keys, err
	}
	if !u.now().Before(s.expires) {
		return session{}, keys, errSessionExpired
	}
	if u.isRevoked(s) {
		return session{}, keys, errSessionRevoked
	}
	return s, keys, nil
}

func encodeSession(key []byte, s session) string {
	buf := make([]byte, sessionSignedLen, sessionLen)
	buf[0] = sessionVersion
	binary.BigEndian.PutUint64(buf[1:9], uint64(s.expires.Unix()))
	copy(buf[9:], s.id[:])
	mac := hmac.New(sha256.New, key)
	mac.Write(buf)
	return base64.RawURLEncoding.EncodeToString(mac.Sum(buf))
}

func decodeSession(key []byte, value string) (session, error) {
	buf, err := base64.RawURLEncoding.DecodeString(value)
	if err != nil || len(buf) != sessionLen || buf[0] != sessionVersion {
		return session{}, errSessionInvalid
	}
	mac := hmac.New(sha256.New, key)
	mac.Write(buf[:sessionSignedLen])
	if !hmac.Equal(mac.Sum(nil), buf[sessionSignedLen:]) {
		return session{}, errSessionInvalid
	}
	var s session
	s.expires = time.Unix(int64(binary.BigEndian.Uint64(buf[1:9])), 0)
	copy(s.id[:], buf[9:sessionSignedLen])
	return s, nil
}

// csrfToken binds a CSRF token to one session. The page learns it from the
// sign-in response, which another site cannot read. Nor can another site
// compute it, because the session id is in an HttpOnly cookie and the key is
// secret.
func csrfToken(key []byte, s session) string {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte("csrf\x00"))
	mac.Write(s.id[:])
	return base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
}

func validCSRF(r *http.Request, key []byte, s session) bool {
	got := r.Header.Get(CSRFHeader)
	if got == "" {
		return false
	}
	return subtle.ConstantTimeCompare([]byte(got), []byte(csrfToken(key, s))) == 1
}

func (u *UI) cookie(r *http.Request, value string, expires time.Time) *http.Cookie {
	return &http.Cookie{
		Name:     SessionCookie,
		Value:    value,
		Path:     "/",
		Expires:  expires,
		MaxAge:   int(u.ttl / time.Second),
		HttpOnly: true,
		Secure:   r.TLS != nil || forwardedHTTPS(r),
		SameSite: http.SameSiteStrictMode,
	}
}

// forwardedHTTPS reports whether a proxy in front, such as a load balancer
// that ends TLS, reports that the client connected over HTTPS. The header is not
// trusted for anything else: a client that sends it only gets a cookie its
// browser keeps off plain HTTP.
func forwardedHTTPS(r *http.Request) bool {
	return strings.EqualFold(strings.TrimSpace(r.Header.Get("X-Forwarded-Proto")), "https")
}

func (u *UI) expiredCookie(r *http.Request) *http.Cookie {
	c := u.cookie(r, "", time.Unix(0, 0))
	c.MaxAge = -1
	return c
}

// revoke remembers a signed-out session until it expires.
//
// NOTE: the list lives in this process only. If a cookie was copied before
// the browser dropped it, another replica accepts it until it expires.
// Changing the admin token ends every session on every replica.
func (u *UI) revoke(s session) {
	u.mu.Lock()
	defer u.mu.Unlock()
	now := u.now()
	for id, exp := range u.revoked {
		if !now.Before(exp) {
			delete(u.revoked, id)
		}
	}
	if len(u.revoked) >= maxRevoked {
		u.log.Warn("ui sign-out list full; the session stays valid until it expires", "max", maxRevoked)
		return
	}
	u.revoked[s.id] = s.expires
}

func (u *UI) isRevoked(s session) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	_, ok := u.revoked[s.id]
	return ok
}
