package admin_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/admin"
	"github.com/byokproxy/byokproxy/audit"
	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/provider"
)

const fuzzAdminToken = "fuzz-admin-token-0123456789abcdef"

// fuzzEndpoint is an admin route that takes a JSON body or a query.
type fuzzEndpoint struct {
	method string
	suffix string // after /admin/v1/mailboxes/{m}; "{p}" is the provider
}

var fuzzEndpoints = []fuzzEndpoint{
	{http.MethodPut, "/providers/{p}/key"},
	{http.MethodPut, "/providers/{p}/source"},
	{http.MethodPut, "/limit"},
	{http.MethodGet, "/usage?month={body}"},
	{http.MethodPost, "/token"},
	{http.MethodPost, "/token/revoke"},
	{http.MethodGet, ""},
	{http.MethodDelete, "/providers/{p}/key"},
}

// Status codes the admin API may return. A 500 means a body or path value
// reached code that did not expect it. The redirects come from http.ServeMux
// for paths with dot segments, after the token check.
var fuzzAdminStatuses = map[int]bool{
	200: true, 204: true, 301: true, 307: true, 308: true,
	400: true, 401: true, 404: true, 405: true, 409: true, 413: true,
}

// newFuzzAPI returns an admin API on a real Redis under a fresh prefix.
func newFuzzAPI(t testing.TB) *admin.API {
	t.Helper()
	rs := redistest.Start(t)
	prefix := rs.Prefix(t)
	rdb := rs.Client(t)
	ids, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	store := keystore.New(rdb, prefix, ids)
	signer, err := mailbox.NewSigner([]string{"fuzz-token-secret-0123456789abcdef"})
	if err != nil {
		t.Fatal(err)
	}
	writer := audit.NewWriter(rdb, store.Layout(), audit.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	go writer.Run(ctx)
	t.Cleanup(func() {
		closeCtx, done := context.WithTimeout(context.Background(), 5*time.Second)
		defer done()
		writer.Close(closeCtx)
		cancel()
	})
	return admin.New(admin.Options{Store: store, Signer: signer, Audit: writer, Token: fuzzAdminToken})
}

// FuzzAdminRequest sends arbitrary JSON bodies, mailbox ids, provider names
// and Authorization headers to the admin API. It must not panic or return
// 500, and it rejects a request without the admin token. Every response is
// JSON, and no response repeats a key that the body carried, beyond its last
// four characters.
func FuzzAdminRequest(f *testing.F) {
	api := newFuzzAPI(f)
	good := "Bearer " + fuzzAdminToken

	f.Add(uint8(0), "alice@example.com", uint8(1), `{"key":"sk-proj-abcdefghijklmnop0123"}`, good)
	f.Add(uint8(0), "alice", uint8(0), `{"key":"sk-ant-api03-abcdefghijklmnop"}`, good)
	f.Add(uint8(0), "bob", uint8(2), `{"key":"AIzaSyA0123456789abcdefghijklmnopqrstu"}`, good)
	f.Add(uint8(0), "bob", uint8(1), `{"key":"sk-ant-api03-is-not-an-openai-key"}`, good)
	f.Add(uint8(0), "carol", uint8(1), `{"key":"sk-proj-abc","age":"x"}`, good)
	f.Add(uint8(0), "carol", uint8(1), `{"age":"-----BEGIN AGE ENCRYPTED FILE-----\nYWdl\n-----END AGE ENCRYPTED FILE-----\n"}`, good)
	f.Add(uint8(0), "carol", uint8(1), `{"key":"sk-proj-secretsecretsecret0123"} trailing`, good)
	f.Add(uint8(0), "carol", uint8(3), `{"key":"sk-proj-secretsecretsecret0123"}`, good)
	f.Add(uint8(1), "dave", uint8(1), `{"source":"byok"}`, good)
	f.Add(uint8(1), "dave", uint8(0), `{"source":"shared"}`, good)
	f.Add(uint8(1), "dave", uint8(2), `{"source":1}`, good)
	f.Add(uint8(2), "erin", uint8(0), `{"monthly_token_limit":1000}`, good)
	f.Add(uint8(2), "erin", uint8(0), `{"monthly_token_limit":null}`, good)
	f.Add(uint8(2), "erin", uint8(0), `{"monthly_token_limit":-1}`, good)
	f.Add(uint8(2), "erin", uint8(0), `{"monthly_token_limit":1e400}`, good)
	f.Add(uint8(2), "erin", uint8(0), `{"monthly_token_limit":9223372036854775808}`, good)
	f.Add(uint8(2), "erin", uint8(0), `[]`, good)
	f.Add(uint8(3), "frank", uint8(0), "2025-13", good)
	f.Add(uint8(3), "frank", uint8(0), "2025-01", good)
	f.Add(uint8(4), "bad id/../x", uint8(0), "", good)
	f.Add(uint8(5), strings.Repeat("m", 129), uint8(0), "", good)
	f.Add(uint8(6), "grace", uint8(0), "", "Bearer "+fuzzAdminToken+"x")
	f.Add(uint8(6), "grace", uint8(0), "", "bearer "+fuzzAdminToken)
	f.Add(uint8(7), "grace", uint8(1), "", "Basic "+fuzzAdminToken)

	f.Fuzz(func(t *testing.T, endpointIndex uint8, mbox string, providerIndex uint8, body, authorization string) {
		ep := fuzzEndpoints[int(endpointIndex)%len(fuzzEndpoints)]
		prov := "unknown-provider"
		if i := int(providerIndex) % (len(provider.Names) + 1); i < len(provider.Names) {
			prov = provider.Names[i]
		}
		suffix := strings.ReplaceAll(ep.suffix, "{p}", prov)
		reqBody := body
		if strings.Contains(suffix, "{body}") {
			suffix = strings.ReplaceAll(suffix, "{body}", url.QueryEscape(body))
			reqBody = ""
		}
		target := "/admin/v1/mailboxes/" + url.PathEscape(mbox) + suffix
		req, err := http.NewRequest(ep.method, target, strings.NewReader(reqBody))
		if err != nil {
			return
		}
		req.Header.Set("Content-Type", "application/json")
		if authorization != "" {
			req.Header.Set("Authorization", authorization)
		}
		rec := httptest.NewRecorder()
		api.ServeHTTP(rec, req)

		if !fuzzAdminStatuses[rec.Code] {
			t.Fatalf("%s %s: status %d: %s", ep.method, target, rec.Code, rec.Body.Bytes())
		}
		if rec.Code != http.StatusUnauthorized && !strings.Contains(authorization, fuzzAdminToken) {
			t.Fatalf("%s %s: status %d without the admin token (Authorization %q)", ep.method, target, rec.Code, authorization)
		}
		if rec.Code == http.StatusNoContent || rec.Code/100 == 3 {
			return
		}
		if !json.Valid(rec.Body.Bytes()) {
			t.Fatalf("%s %s: status %d with a body that is not JSON: %q", ep.method, target, rec.Code, rec.Body.Bytes())
		}
		if rec.Code == http.StatusOK && !validMailbox(mbox) {
			t.Fatalf("%s %s: 200 for invalid mailbox id %q", ep.method, target, mbox)
		}
		checkNoKeyEcho(t, rec.Body.Bytes(), reqBody, mbox, prov)
	})
}

// checkNoKeyEcho fails if the response contains a "key" or "age" string from
// the request body. Values short enough to match ordinary message text by
// chance, or that are part of the path, are skipped.
func checkNoKeyEcho(t *testing.T, answer []byte, body, mbox, prov string) {
	t.Helper()
	var fields map[string]any
	if json.Unmarshal([]byte(body), &fields) != nil {
		return
	}
	for _, name := range []string{"key", "age"} {
		s, _ := fields[name].(string)
		if len(s) < 12 || strings.Contains(mbox, s) || strings.Contains(prov, s) {
			continue
		}
		if bytes.Contains(answer, []byte(s)) {
			t.Fatalf("response repeats the %q value of the request body: %s", name, answer)
		}
		if encoded, _ := json.Marshal(s); bytes.Contains(answer, encoded[1:len(encoded)-1]) {
			t.Fatalf("response repeats the JSON-escaped %q value of the request body: %s", name, answer)
		}
	}
}

func validMailbox(s string) bool {
	_, err := mailbox.ParseID(s)
	return err == nil
}
