package proxy_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
)

// expectConn sends a POST request's header with Expect: 100-continue and
// returns the connection and a reader of the proxy's responses.
func expectConn(t *testing.T, s *teststack.Stack, path, token string, bodyLen int) (net.Conn, *bufio.Reader) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", strings.TrimPrefix(s.ProxyURL, "http://"), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n",
		path, token, bodyLen)
	return conn, bufio.NewReader(conn)
}

// checkRejectedEarly sends a request header with Expect: 100-continue and
// checks that the first response is the final status want, before any
// body is sent, and that nothing reached the upstream.
func checkRejectedEarly(t *testing.T, s *teststack.Stack, path, token string, want int) *http.Response {
	t.Helper()
	prov, _, _ := strings.Cut(strings.TrimPrefix(path, "/"), "/")
	up := s.Upstreams[prov]
	up.Reset()
	_, rd := expectConn(t, s, path, token, len(slowChat))
	resp, err := http.ReadResponse(rd, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != want {
		t.Errorf("first response %d, want %d before any body is sent", resp.StatusCode, want)
	}
	if n := len(up.Requests()); n != 0 {
		t.Errorf("%d requests reached the upstream, want 0", n)
	}
	return resp
}

// A request that waits for 100 Continue gets its final status at once when
// the record rejects it, so the client never sends the body.
func TestExpectContinueRejectedEarly(t *testing.T) {
	s := teststack.Start(t)

	t.Run("revoked token", func(t *testing.T) {
		token := s.Token(t, "expect-revoked")
		if code, body := s.AdminDo(t, http.MethodPost, "/admin/v1/mailboxes/expect-revoked/token/revoke", nil); code != http.StatusOK {
			t.Fatalf("revoking: %d %s", code, body)
		}
		checkRejectedEarly(t, s, chatPath, token, http.StatusUnauthorized)
	})

	t.Run("endpoint not on the shared key", func(t *testing.T) {
		token := s.Token(t, "expect-endpoint")
		checkRejectedEarly(t, s, "/openai/v2/chat/completions", token, http.StatusForbidden)
	})

	t.Run("allowance used up", func(t *testing.T) {
		token := s.Token(t, "expect-limit")
		if resp, body := s.Do(t, http.MethodPost, "/openai/v1/chat/completions", token, slowChat); resp.StatusCode != http.StatusOK {
			t.Fatalf("first request: %d %s", resp.StatusCode, body)
		}
		if code, body := s.AdminDo(t, http.MethodPut, "/admin/v1/mailboxes/expect-limit/limit", map[string]any{"monthly_token_limit": 1}); code != http.StatusOK {
			t.Fatalf("setting the limit: %d %s", code, body)
		}

		// The usage of the first request reaches Redis through the audit
		// writer, and the record cache holds the old limit for up to 1 s.
		deadline := time.Now().Add(5 * time.Second)
		for {
			resp, _ := s.Do(t, http.MethodPost, "/openai/v1/chat/completions", token, slowChat)
			if resp.StatusCode == http.StatusTooManyRequests {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the allowance did not take effect within 5 s: last status %d", resp.StatusCode)
			}
			time.Sleep(50 * time.Millisecond)
		}

		resp := checkRejectedEarly(t, s, chatPath, token, http.StatusTooManyRequests)
		if resp.Header.Get("Retry-After") == "" {
			t.Error("the 429 has no Retry-After")
		}
		// The shared key reads a Google body too, but only after these
		// checks.
		checkRejectedEarly(t, s, "/google/v1beta/models/gemini-2.5-flash:generateContent", token, http.StatusTooManyRequests)
	})
}

const chatPath = "/openai/v1/chat/completions"

// An accepted request that waits for 100 Continue gets exactly one. The
// upstream gets no Expect header when the proxy has read the body, as it
// does on the shared key. It gets one when the body streams through, so
// that there the client sends its body only after the upstream's 100
// Continue.
func TestExpectContinueAnsweredOnce(t *testing.T) {
	s := teststack.Start(t)
	const geminiBody = `{"contents":[{"parts":[{"text":"hello"}]}]}`
	for _, c := range []struct {
		name, prov, source, path, body string
		upstreamExpects                bool
	}{
		{"openai shared", provider.OpenAI, "shared", chatPath, slowChat, false},
		{"openai byok", provider.OpenAI, "byok", chatPath, slowChat, false},
		{"google shared", provider.Google, "shared", "/google/v1beta/models/gemini-2.5-flash:generateContent", geminiBody, false},
		{"google byok", provider.Google, "byok", "/google/v1beta/models/gemini-2.5-flash:generateContent", geminiBody, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			m := "expect-once-" + c.prov + "-" + c.source
			if c.source == "byok" {
				s.UseBYOK(t, m, c.prov)
			}
			token := s.Token(t, m)
			up := s.Upstreams[c.prov]
			up.Reset()
			conn, rd := expectConn(t, s, c.path, token, len(c.body))

			interim := 0
			var final *http.Response
			for final == nil {
				resp, err := http.ReadResponse(rd, nil)
				if err != nil {
					t.Fatalf("after %d interim responses: %v", interim, err)
				}
				if resp.StatusCode >= 200 {
					final = resp
					break
				}
				if resp.StatusCode != http.StatusContinue {
					t.Fatalf("interim response %d, want 100", resp.StatusCode)
				}
				interim++
				if interim == 1 {
					if _, err := conn.Write([]byte(c.body)); err != nil {
						t.Fatal(err)
					}
				}
				if interim > 3 {
					t.Fatal("more than three interim responses")
				}
			}
			final.Body.Close()
			if final.StatusCode != http.StatusOK {
				t.Fatalf("status %d, want 200", final.StatusCode)
			}
			if interim != 1 {
				t.Errorf("the client got %d 100 Continue responses, want 1", interim)
			}
			sent := up.Requests()
			if len(sent) != 1 {
				t.Fatalf("%d upstream requests, want 1", len(sent))
			}
			if got := sent[0].Header.Get("Expect") != ""; got != c.upstreamExpects {
				t.Errorf("the upstream got Expect %v, want %v", got, c.upstreamExpects)
			}
			if string(sent[0].Body) != c.body {
				t.Errorf("the upstream got body %q, want the request's", sent[0].Body)
			}
		})
	}
}

// A body over the limit that follows 100 Continue is rejected after the
// record was read, and the audit event of a byok mailbox names its key.
func TestExpectContinueOversizeAudited(t *testing.T) {
	const limit = 4 << 10
	s := teststack.Start(t, func(c *config.Config) { c.Limits.MaxBodyBytes = limit })
	m := "expect-oversize@example.com"
	s.UseBYOK(t, m, provider.OpenAI)
	token := s.Token(t, m)
	conn, err := net.DialTimeout("tcp", strings.TrimPrefix(s.ProxyURL, "http://"), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
		chatPath, token)
	rd := bufio.NewReader(conn)
	cont, err := http.ReadResponse(rd, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cont.StatusCode != http.StatusContinue {
		t.Fatalf("first response %d, want 100", cont.StatusCode)
	}
	chunk := `{"model":"m","pad":"` + strings.Repeat("x", 2*limit) + `"}`
	fmt.Fprintf(conn, "%x\r\n%s\r\n0\r\n\r\n", len(chunk), chunk)
	resp, err := http.ReadResponse(rd, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Fatalf("status %d, want 413", resp.StatusCode)
	}

	s.WaitAudit(t)
	wantLast4 := s.RDB.HGet(context.Background(), s.Store.Layout().Mailbox(m), "last4:"+provider.OpenAI).Val()
	var found bool
	for _, e := range s.AuditEvents(t) {
		if e["mailbox"] != m || e["path"] == nil {
			// The admin API's events of the key and source.
			continue
		}
		found = true
		if e["status"] != float64(http.StatusRequestEntityTooLarge) {
			t.Errorf("audit event status %v, want 413", e["status"])
		}
		if e["kind"] != "byok" {
			t.Errorf("audit event kind %v, want byok", e["kind"])
		}
		if e["key_last4"] != wantLast4 {
			t.Errorf("audit event key_last4 %v, want %q", e["key_last4"], wantLast4)
		}
	}
	if !found {
		t.Error("no audit event for the rejected body")
	}
}
