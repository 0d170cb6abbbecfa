package admin

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/audit"
	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/keystore"
)

const (
	testAdminToken = "ui-test-admin-token-0123456789"
	testMailbox    = "ui-unit@example.com"
	testOpenAIKey  = "sk-uitest0123456789abcdefWXYZ"
)

// newTestUI returns the page handler in front of an API on a real Redis, and
// the store behind it.
func newTestUI(t *testing.T, enabled bool) (*UI, *keystore.Store) {
	t.Helper()
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	ids, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatalf("generate identities: %v", err)
	}
	store := keystore.New(rdb, srv.Prefix(t), ids)
	writer := audit.NewWriter(rdb, store.Layout(), audit.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	go writer.Run(ctx)
	t.Cleanup(func() {
		closeCtx, cancelClose := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancelClose()
		writer.Close(closeCtx)
		cancel()
	})
	api := New(Options{Store: store, Audit: writer, Token: testAdminToken})
	return NewUI(api, UIOptions{Enabled: enabled, Token: testAdminToken}), store
}

// do sends one request to h and returns the recorded response.
func do(h http.Handler, method, url, body string, header http.Header, cookies ...*http.Cookie) *httptest.ResponseRecorder {
	req := httptest.NewRequest(method, url, strings.NewReader(body))
	for name, values := range header {
		for _, v := range values {
			req.Header.Add(name, v)
		}
	}
	for _, c := range cookies {
		req.AddCookie(c)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec
}

var jsonHeader = http.Header{"Content-Type": {"application/json"}}

// signIn starts a session with the test admin token and returns its cookie
// and CSRF token.
func signIn(t *testing.T, h http.Handler) (*http.Cookie, string) {
	t.Helper()
	return signInWith(t, h, testAdminToken)
}

func signInWith(t *testing.T, h http.Handler, token string) (*http.Cookie, string) {
	t.Helper()
	rec := do(h, http.MethodPost, "http://admin.test/ui/session", `{"token":"`+token+`"}`, jsonHeader)
	if rec.Code != http.StatusOK {
		t.Fatalf("sign-in status = %d, want 200; body %s", rec.Code, rec.Body)
	}
	var answer struct {
		CSRFToken string `json:"csrf_token"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &answer); err != nil || answer.CSRFToken == "" {
		t.Fatalf("sign-in answer %s: no csrf_token (%v)", rec.Body, err)
	}
	return sessionCookie(t, rec), answer.CSRFToken
}

func sessionCookie(t *testing.T, rec *httptest.ResponseRecorder) *http.Cookie {
	t.Helper()
	for _, c := range rec.Result().Cookies() {
		if c.Name == SessionCookie {
			return c
		}
	}
	t.Fatalf("no %s cookie in response; Set-Cookie: %q", SessionCookie, rec.Header().Values("Set-Cookie"))
	return nil
}

func TestUISignInCookieFlags(t *testing.T) {
	h, _ := newTestUI(t, true)
	tests := []struct {
		name       string
		url        string
		proto      string // X-Forwarded-Proto
		wantSecure bool
	}{
		{"plain http", "http://admin.test/ui/session", "", false},
		{"tls", "https://admin.test/ui/session", "", true},
		{"tls ended by a load balancer", "http://admin.test/ui/session", "HTTPS", true},
		{"plain http through a proxy", "http://admin.test/ui/session", "http", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := time.Now()
			header := jsonHeader.Clone()
			if tt.proto != "" {
				header.Set("X-Forwarded-Proto", tt.proto)
			}
			rec := do(h, http.MethodPost, tt.url, `{"token":"`+testAdminToken+`"}`, header)
			if rec.Code != http.StatusOK {
				t.Fatalf("status = %d, want 200; body %s", rec.Code, rec.Body)
			}
			c := sessionCookie(t, rec)
			if !c.HttpOnly {
				t.Error("cookie is not HttpOnly")
			}
			if c.SameSite != http.SameSiteStrictMode {
				t.Errorf("SameSite = %v, want Strict", c.SameSite)
			}
			if c.Secure != tt.wantSecure {
				t.Errorf("Secure = %v, want %v", c.Secure, tt.wantSecure)
			}
			if c.MaxAge != int(DefaultSessionTTL/time.Second) {
				t.Errorf("Max-Age = %d, want %d", c.MaxAge, int(DefaultSessionTTL/time.Second))
			}
			if c.Path != "/" {
				t.Errorf("Path = %q, want /", c.Path)
			}
			if exp := before.Add(DefaultSessionTTL); c.Expires.Before(exp.Add(-2*time.Second)) || c.Expires.After(exp.Add(2*time.Second)) {
				t.Errorf("Expires = %v, want about %v", c.Expires, exp)
			}
			if strings.Contains(c.Value, testAdminToken) {
				t.Error("cookie value contains the admin token")
			}
			if got := rec.Header().Get("Cache-Control"); got != "no-store" {
				t.Errorf("Cache-Control = %q, want no-store", got)
			}
		})
	}
}

func TestUISignInRejected(t *testing.T) {
	h, _ := newTestUI(t, true)
	tests := []struct {
		name   string
		body   string
		header http.Header
		want   int
	}{
		{"wrong token", `{"token":"not-the-admin-token"}`, jsonHeader, http.StatusUnauthorized},
		{"empty token", `{"token":""}`, jsonHeader, http.StatusUnauthorized},
		{"token prefix", `{"token":"` + testAdminToken[:10] + `"}`, jsonHeader, http.StatusUnauthorized},
		{"form body", "token=" + testAdminToken, http.Header{"Content-Type": {"application/x-www-form-urlencoded"}}, http.StatusUnsupportedMediaType},
		{"malformed json", `{"token":`, jsonHeader, http.StatusBadRequest},
		{"oversized body", `{"token":"` + strings.Repeat("a", maxSignInBody) + `"}`, jsonHeader, http.StatusRequestEntityTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := do(h, http.MethodPost, "http://admin.test/ui/session", tt.body, tt.header)
			if rec.Code != tt.want {
				t.Errorf("status = %d, want %d; body %s", rec.Code, tt.want, rec.Body)
			}
			if got := rec.Header().Values("Set-Cookie"); len(got) != 0 {
				t.Errorf("Set-Cookie = %q, want none", got)
			}
		})
	}
}

func TestUISessionReadsAPI(t *testing.T) {
	h, store := newTestUI(t, true)
	cookie, csrf := signIn(t, h)
	_, otherCSRF := signIn(t, h)

	// A read with the cookie alone could come from any request the browser
	// was made to send, so it needs the page's CSRF token as a change does.
	for name, header := range map[string]http.Header{
		"no csrf header":          nil,
		"wrong csrf header":       {CSRFHeader: {"bm90LXRoZS10b2tlbg"}},
		"csrf of another session": {CSRFHeader: {otherCSRF}},
		"cross-site fetch":        {CSRFHeader: {csrf}, "Sec-Fetch-Site": {"cross-site"}},
	} {
		for _, path := range []string{"/admin/v1/recipient", "/admin/v1/mailboxes/" + testMailbox, "/admin/v1/mailboxes/" + testMailbox + "/usage"} {
			rec := do(h, http.MethodGet, "http://admin.test"+path, "", header, cookie)
			if rec.Code != http.StatusForbidden {
				t.Errorf("%s: GET %s status = %d, want 403; body %s", name, path, rec.Code, rec.Body)
			}
			if strings.Contains(rec.Body.String(), "age1") || strings.Contains(rec.Body.String(), `"providers"`) {
				t.Errorf("%s: GET %s returned data: %s", name, path, rec.Body)
			}
		}
	}

	withCSRF := http.Header{CSRFHeader: {csrf}}
	rec := do(h, http.MethodGet, "http://admin.test/admin/v1/recipient", "", withCSRF, cookie)
	if rec.Code != http.StatusOK {
		t.Fatalf("GET recipient status = %d, want 200; body %s", rec.Code, rec.Body)
	}
	if want := store.Identities().Recipient().String(); !strings.Contains(rec.Body.String(), want) {
		t.Errorf("recipient answer %s does not contain %s", rec.Body, want)
	}
	if got := rec.Header().Get("Cache-Control"); got != "no-store" {
		t.Errorf("Cache-Control = %q, want no-store", got)
	}

	rec = do(h, http.MethodGet, "http://admin.test/admin/v1/mailboxes/"+testMailbox, "", withCSRF, cookie)
	if rec.Code != http.StatusOK {
		t.Errorf("GET mailbox status = %d, want 200; body %s", rec.Code, rec.Body)
	}

	rec = do(h, http.MethodGet, "http://admin.test/ui/session", "", nil, cookie)
	if rec.Code != http.StatusOK || !strings.Contains(rec.Body.String(), "csrf_token") {
		t.Errorf("GET /ui/session = %d %s, want 200 with csrf_token", rec.Code, rec.Body)
	}
}

func TestUISessionCSRF(t *testing.T) {
	h, store := newTestUI(t, true)
	cookie, csrf := signIn(t, h)
	_, otherCSRF := signIn(t, h)
	url := "http://admin.test/admin/v1/mailboxes/" + testMailbox + "/providers/openai/key"
	body := `{"key":"` + testOpenAIKey + `"}`

	tests := []struct {
		name   string
		header http.Header
		want   int
	}{
		{"no csrf header", http.Header{}, http.StatusForbidden},
		{"empty csrf header", http.Header{CSRFHeader: {""}}, http.StatusForbidden},
		{"wrong csrf header", http.Header{CSRFHeader: {"bm90LXRoZS10b2tlbg"}}, http.StatusForbidden},
		{"csrf of another session", http.Header{CSRFHeader: {otherCSRF}}, http.StatusForbidden},
		{"cross-site fetch", http.Header{CSRFHeader: {csrf}, "Sec-Fetch-Site": {"cross-site"}}, http.StatusForbidden},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			header := tt.header.Clone()
			header.Set("Content-Type", "application/json")
			rec := do(h, http.MethodPut, url, body, header, cookie)
			if rec.Code != tt.want {
				t.Errorf("status = %d, want %d; body %s", rec.Code, tt.want, rec.Body)
			}
			st, err := store.ProviderStatus(context.Background(), testMailbox, "openai")
			if err != nil {
				t.Fatalf("read status: %v", err)
			}
			if st.HasKey {
				t.Error("a rejected request stored the key")
			}
		})
	}

	for _, call := range []struct{ method, path string }{
		{http.MethodPost, "/admin/v1/mailboxes/" + testMailbox + "/token/revoke"},
		{http.MethodDelete, "/admin/v1/mailboxes/" + testMailbox},
		{http.MethodDelete, "/admin/v1/mailboxes/" + testMailbox + "/providers/openai/key"},
	} {
		rec := do(h, call.method, "http://admin.test"+call.path, "", nil, cookie)
		if rec.Code != http.StatusForbidden {
			t.Errorf("%s %s without csrf header: status = %d, want 403", call.method, call.path, rec.Code)
		}
	}

	rec := do(h, http.MethodPut, url, body, http.Header{"Content-Type": {"application/json"}, CSRFHeader: {csrf}}, cookie)
	if rec.Code != http.StatusOK {
		t.Fatalf("with the session's csrf header: status = %d, want 200; body %s", rec.Code, rec.Body)
	}
	st, err := store.ProviderStatus(context.Background(), testMailbox, "openai")
	if err != nil {
		t.Fatalf("read status: %v", err)
	}
	if !st.HasKey || st.Last4 != testOpenAIKey[len(testOpenAIKey)-4:] {
		t.Errorf("status after put = %+v, want the key stored with last four %q", st, testOpenAIKey[len(testOpenAIKey)-4:])
	}
}

func TestUISessionRejected(t *testing.T) {
	h, _ := newTestUI(t, true)
	cookie, _ := signIn(t, h)

	const otherToken = "another-admin-token-0123456789"
	other := NewUI(New(Options{Token: otherToken}), UIOptions{Enabled: true, Token: otherToken})
	foreign, _ := signInWith(t, other, otherToken)

	raw, err := base64.RawURLEncoding.DecodeString(cookie.Value)
	if err != nil {
		t.Fatalf("decode cookie: %v", err)
	}
	flipMAC := append([]byte(nil), raw...)
	flipMAC[len(flipMAC)-1] ^= 1
	// A later expiry with the old MAC: extending a session must not work.
	extended := append([]byte(nil), raw...)
	extended[1]++

	tests := []struct {
		name  string
		value string
		now   time.Time
	}{
		{"expired", cookie.Value, time.Now().Add(DefaultSessionTTL + time.Second)},
		{"forged mac", base64.RawURLEncoding.EncodeToString(flipMAC), time.Now()},
		{"extended expiry", base64.RawURLEncoding.EncodeToString(extended), time.Now()},
		{"garbage", "not-a-session", time.Now()},
		{"empty", "", time.Now()},
		{"signed by another admin token", foreign.Value, time.Now()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h.now = func() time.Time { return tt.now }
			t.Cleanup(func() { h.now = time.Now })
			c := &http.Cookie{Name: SessionCookie, Value: tt.value}
			rec := do(h, http.MethodGet, "http://admin.test/admin/v1/recipient", "", nil, c)
			if rec.Code != http.StatusUnauthorized {
				t.Errorf("status = %d, want 401; body %s", rec.Code, rec.Body)
			}
			if tt.value != "" {
				cleared := sessionCookie(t, rec)
				if cleared.MaxAge >= 0 {
					t.Errorf("rejected cookie not cleared: Max-Age = %d", cleared.MaxAge)
				}
			}
		})
	}

	t.Run("admin token changed", func(t *testing.T) {
		h.SetToken("rotated-admin-token-0123456789")
		rec := do(h, http.MethodGet, "http://admin.test/admin/v1/recipient", "", nil, cookie)
		if rec.Code != http.StatusUnauthorized {
			t.Errorf("status = %d, want 401", rec.Code)
		}
		rec = do(h, http.MethodGet, "http://admin.test/admin/v1/recipient", "", http.Header{"Authorization": {"Bearer rotated-admin-token-0123456789"}})
		if rec.Code != http.StatusOK {
			t.Errorf("bearer with the new token: status = %d, want 200", rec.Code)
		}
	})
}

func TestUISignInTokenMismatch(t *testing.T) {
	h, _ := newTestUI(t, true)
	// A reload that changes only the API's token leaves the page with the
	// old one; signing in must then fail with either token.
	h.api.SetToken("reloaded-admin-token-0123456789")
	for _, token := range []string{testAdminToken, "reloaded-admin-token-0123456789"} {
		rec := do(h, http.MethodPost, "http://admin.test/ui/session", `{"token":"`+token+`"}`, jsonHeader)
		if rec.Code != http.StatusUnauthorized {
			t.Errorf("sign-in with %q: status = %d, want 401", token, rec.Code)
		}
	}
}

func TestUIBearerWins(t *testing.T) {
	h, _ := newTestUI(t, true)
	cookie, _ := signIn(t, h)
	rec := do(h, http.MethodGet, "http://admin.test/admin/v1/recipient", "", http.Header{"Authorization": {"Bearer wrong"}}, cookie)
	if rec.Code != http.StatusUnauthorized {
		t.Errorf("wrong bearer with a valid cookie: status = %d, want 401", rec.Code)
	}
	rec = do(h, http.MethodGet, "http://admin.test/admin/v1/recipient", "", http.Header{"Authorization": {"Bearer " + testAdminToken}})
	if rec.Code != http.StatusOK {
		t.Errorf("bearer admin token: status = %d, want 200", rec.Code)
	}
}

func TestUISignOut(t *testing.T) {
	h, _ := newTestUI(t, true)
	cookie, csrf := signIn(t, h)

	rec := do(h, http.MethodDelete, "http://admin.test/ui/session", "", nil, cookie)
	if rec.Code != http.StatusForbidden {
		t.Errorf("sign-out without csrf header: status = %d, want 403", rec.Code)
	}

	rec = do(h, http.MethodDelete, "http://admin.test/ui/session", "", http.Header{CSRFHeader: {csrf}}, cookie)
	if rec.Code != http.StatusNoContent {
		t.Fatalf("sign-out status = %d, want 204; body %s", rec.Code, rec.Body)
	}
	if cleared := sessionCookie(t, rec); cleared.MaxAge >= 0 || cleared.Value != "" {
		t.Errorf("sign-out cookie = %+v, want an empty value with Max-Age < 0", cleared)
	}

	rec = do(h, http.MethodGet, "http://admin.test/admin/v1/recipient", "", nil, cookie)
	if rec.Code != http.StatusUnauthorized {
		t.Errorf("signed-out cookie: status = %d, want 401", rec.Code)
	}
	rec = do(h, http.MethodGet, "http://admin.test/ui/session", "", nil, cookie)
	if rec.Code != http.StatusUnauthorized {
		t.Errorf("GET /ui/session with a signed-out cookie: status = %d, want 401", rec.Code)
	}

	rec = do(h, http.MethodDelete, "http://admin.test/ui/session", "", nil)
	if rec.Code != http.StatusNoContent {
		t.Errorf("sign-out without a session: status = %d, want 204", rec.Code)
	}
}

func TestUIPageHeaders(t *testing.T) {
	h, _ := newTestUI(t, true)
	rec := do(h, http.MethodGet, "http://admin.test/ui/", "", nil)
	if rec.Code != http.StatusOK {
		t.Fatalf("GET /ui/ status = %d, want 200", rec.Code)
	}
	want := map[string]string{
		"Content-Security-Policy": contentSecurityPolicy,
		"X-Frame-Options":         "DENY",
		"Referrer-Policy":         "no-referrer",
		"X-Content-Type-Options":  "nosniff",
	}
	for name, value := range want {
		if got := rec.Header().Get(name); got != value {
			t.Errorf("%s = %q, want %q", name, got, value)
		}
	}
	csp := rec.Header().Get("Content-Security-Policy")
	for _, directive := range []string{"default-src 'self'", "script-src 'self'", "frame-ancestors 'none'", "connect-src 'self'"} {
		if !strings.Contains(csp, directive) {
			t.Errorf("CSP %q lacks %q", csp, directive)
		}
	}
	if strings.Contains(csp, "unsafe-inline") || strings.Contains(csp, "http") {
		t.Errorf("CSP %q allows inline code or another host", csp)
	}
	if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
		t.Errorf("Content-Type = %q, want text/html", ct)
	}

	page := rec.Body.String()
	scripts := regexp.MustCompile(`<script[^>]*>`).FindAllString(page, -1)
	if len(scripts) == 0 {
		t.Fatal("the page has no script tag")
	}
	for _, tag := range scripts {
		if !strings.Contains(tag, `src="/ui/assets/`) {
			t.Errorf("script tag %q does not load a file under /ui/assets/", tag)
		}
	}
	if strings.Contains(page, " style=") || strings.Contains(page, "<style") {
		t.Error("the page has inline styles, which the CSP blocks")
	}

	src := regexp.MustCompile(`src="(/ui/assets/[^"]+\.js)"`).FindStringSubmatch(page)
	if src == nil {
		t.Fatal("no script source found")
	}
	rec = do(h, http.MethodGet, "http://admin.test"+src[1], "", nil)
	if rec.Code != http.StatusOK {
		t.Fatalf("GET %s status = %d, want 200", src[1], rec.Code)
	}
	if ct := rec.Header().Get("Content-Type"); !strings.Contains(ct, "javascript") {
		t.Errorf("script Content-Type = %q, want JavaScript", ct)
	}
	if got := rec.Header().Get("Content-Security-Policy"); got != contentSecurityPolicy {
		t.Errorf("script CSP = %q, want %q", got, contentSecurityPolicy)
	}
}

func TestUIPaths(t *testing.T) {
	h, _ := newTestUI(t, true)
	tests := []struct {
		method string
		path   string
		want   int
	}{
		{http.MethodGet, "/ui", http.StatusFound},
		{http.MethodGet, "/ui/index.html", http.StatusOK},
		{http.MethodHead, "/ui/", http.StatusOK},
		{http.MethodGet, "/ui/assets/", http.StatusNotFound},
		{http.MethodGet, "/ui/assets", http.StatusNotFound},
		{http.MethodGet, "/ui/missing.js", http.StatusNotFound},
		{http.MethodGet, "/ui/../admin/v1/recipient", http.StatusNotFound},
		{http.MethodPost, "/ui/", http.StatusMethodNotAllowed},
		{http.MethodPut, "/ui/session", http.StatusMethodNotAllowed},
		{http.MethodGet, "/ui/session", http.StatusUnauthorized},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			req := httptest.NewRequest(tt.method, "http://admin.test/", nil)
			// httptest.NewRequest cleans dot segments; set the raw path.
			req.URL.Path = tt.path
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != tt.want {
				t.Errorf("status = %d, want %d", rec.Code, tt.want)
			}
		})
	}
}

func TestUIOff(t *testing.T) {
	h, _ := newTestUI(t, false)
	on := NewUI(h.api, UIOptions{Enabled: true, Token: testAdminToken})
	cookie, csrf := signIn(t, on)

	for _, path := range []string{"/ui/", "/ui", "/ui/index.html", "/ui/session"} {
		rec := do(h, http.MethodGet, "http://admin.test"+path, "", nil)
		if rec.Code != http.StatusNotFound {
			t.Errorf("GET %s with the page off: status = %d, want 404", path, rec.Code)
		}
	}
	rec := do(h, http.MethodPost, "http://admin.test/ui/session", `{"token":"`+testAdminToken+`"}`, jsonHeader)
	if rec.Code != http.StatusNotFound {
		t.Errorf("sign-in with the page off: status = %d, want 404", rec.Code)
	}
	if got := rec.Header().Values("Set-Cookie"); len(got) != 0 {
		t.Errorf("sign-in with the page off set cookies %q", got)
	}

	// Both handlers share the API and admin token, so the cookie would
	// verify; with the page off it must not authorize anything.
	rec = do(h, http.MethodGet, "http://admin.test/admin/v1/recipient", "", http.Header{CSRFHeader: {csrf}}, cookie)
	if rec.Code != http.StatusUnauthorized {
		t.Errorf("session cookie with the page off: status = %d, want 401", rec.Code)
	}
	rec = do(h, http.MethodGet, "http://admin.test/admin/v1/recipient", "", http.Header{"Authorization": {"Bearer " + testAdminToken}})
	if rec.Code != http.StatusOK {
		t.Errorf("bearer with the page off: status = %d, want 200", rec.Code)
	}
	body, _ := io.ReadAll(rec.Body)
	if !strings.Contains(string(body), "age1") {
		t.Errorf("recipient answer %s has no age recipient", body)
	}
}
