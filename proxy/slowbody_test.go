package proxy_test

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
)

// sendSlowly sends the request headers and half the body, calls change
// while the proxy waits for the rest, waits until visible reports true,
// then sends the rest and returns the response's status.
func sendSlowly(t *testing.T, s *teststack.Stack, path, token, body string, change func(), visible func() bool) int {
	t.Helper()
	conn, err := net.DialTimeout("tcp", strings.TrimPrefix(s.ProxyURL, "http://"), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	conn.SetDeadline(time.Now().Add(15 * time.Second))
	half := len(body) / 2
	fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
		path, token, len(body), body[:half])
	// Give the handler time to start reading the body.
	time.Sleep(200 * time.Millisecond)

	change()
	deadline := time.Now().Add(3 * time.Second)
	for !visible() {
		if time.Now().After(deadline) {
			t.Fatal("the change did not reach the proxy within 3 s")
		}
		time.Sleep(20 * time.Millisecond)
	}

	if _, err := conn.Write([]byte(body[half:])); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

const slowChat = `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"a request whose body arrives slowly"}]}`

// A change made while a request's body is still arriving applies to that
// request: the record is read once the body is in.
func TestSlowBodySeesLaterChanges(t *testing.T) {
	s := teststack.Start(t)
	up := s.Upstreams[provider.OpenAI]

	t.Run("key removed", func(t *testing.T) {
		s.UseBYOK(t, "slow-key", provider.OpenAI)
		token := s.Token(t, "slow-key")
		up.Reset()
		status := sendSlowly(t, s, chatPath, token, slowChat, func() {
			if code, body := s.AdminDo(t, http.MethodDelete, "/admin/v1/mailboxes/slow-key/providers/openai/key", nil); code != http.StatusNoContent {
				t.Fatalf("removing the key: %d %s", code, body)
			}
		}, func() bool {
			s.Do(t, http.MethodPost, "/openai/v1/chat/completions", token, slowChat)
			sent := up.Requests()
			return len(sent) > 0 && sent[len(sent)-1].Key == teststack.SharedKeys[provider.OpenAI]
		})
		if status != http.StatusOK {
			t.Errorf("status %d, want 200 on the shared key", status)
		}
		for i, r := range up.Requests() {
			if r.Key == teststack.BYOKKeys[provider.OpenAI] {
				t.Errorf("upstream request %d carried the removed key", i)
			}
		}
	})

	t.Run("token revoked", func(t *testing.T) {
		token := s.Token(t, "slow-revoke")
		up.Reset()
		status := sendSlowly(t, s, chatPath, token, slowChat, func() {
			if code, body := s.AdminDo(t, http.MethodPost, "/admin/v1/mailboxes/slow-revoke/token/revoke", nil); code != http.StatusOK {
				t.Fatalf("revoking: %d %s", code, body)
			}
		}, func() bool {
			resp, _ := s.Do(t, http.MethodGet, "/openai/v1/models", token, "")
			return resp.StatusCode == http.StatusUnauthorized
		})
		if status != http.StatusUnauthorized {
			t.Errorf("status %d, want 401 for the revoked token", status)
		}
		if n := len(up.Requests()); n != 0 {
			t.Errorf("%d requests reached the upstream, want 0", n)
		}
	})

	t.Run("token revoked on a shared google request", func(t *testing.T) {
		// The shared key reads a Google body too, and reads the record
		// again once it is in.
		const gemini = "/google/v1beta/models/gemini-2.5-flash:generateContent"
		const body = `{"contents":[{"parts":[{"text":"a request whose body arrives slowly"}]}]}`
		token := s.Token(t, "slow-revoke-google")
		google := s.Upstreams[provider.Google]
		google.Reset()
		status := sendSlowly(t, s, gemini, token, body, func() {
			if code, body := s.AdminDo(t, http.MethodPost, "/admin/v1/mailboxes/slow-revoke-google/token/revoke", nil); code != http.StatusOK {
				t.Fatalf("revoking: %d %s", code, body)
			}
		}, func() bool {
			resp, _ := s.Do(t, http.MethodGet, "/google/v1beta/models", token, "")
			return resp.StatusCode == http.StatusUnauthorized
		})
		if status != http.StatusUnauthorized {
			t.Errorf("status %d, want 401 for the revoked token", status)
		}
		if n := len(google.Requests()); n != 0 {
			t.Errorf("%d requests reached the upstream, want 0", n)
		}
	})

	t.Run("allowance used up", func(t *testing.T) {
		token := s.Token(t, "slow-limit")
		if resp, body := s.Do(t, http.MethodPost, "/openai/v1/chat/completions", token, slowChat); resp.StatusCode != http.StatusOK {
			t.Fatalf("first request: %d %s", resp.StatusCode, body)
		}
		status := sendSlowly(t, s, chatPath, token, slowChat, func() {
			if code, body := s.AdminDo(t, http.MethodPut, "/admin/v1/mailboxes/slow-limit/limit", map[string]any{"monthly_token_limit": 1}); code != http.StatusOK {
				t.Fatalf("setting the limit: %d %s", code, body)
			}
		}, func() bool {
			resp, _ := s.Do(t, http.MethodPost, "/openai/v1/chat/completions", token, slowChat)
			return resp.StatusCode == http.StatusTooManyRequests
		})
		if status != http.StatusTooManyRequests {
			t.Errorf("status %d, want 429 once the allowance is used up", status)
		}
	})
}
