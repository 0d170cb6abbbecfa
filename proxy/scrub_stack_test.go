package proxy_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/textproto"
	"strings"
	"sync"
	"testing"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
)

// echoingUpstream responds to every request with 200 and a JSON body. It
// quotes the credential it received where a response can carry text beyond
// its header values and body: a 103 Early Hints response, a header name,
// and declared and undeclared trailers.
func echoingUpstream(t *testing.T) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		key := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		for _, name := range []string{"X-Api-Key", "X-Goog-Api-Key"} {
			if v := r.Header.Get(name); v != "" {
				key = v
			}
		}
		w.Header().Set("Link", "</assets/app.css?k="+key+">; rel=preload")
		w.Header().Set("X-Early", key)
		w.WriteHeader(http.StatusEarlyHints)
		w.Header().Del("Link")
		w.Header().Del("X-Early")

		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-"+key, "1")
		w.Header().Set("Trailer", "X-Echo")
		w.WriteHeader(http.StatusOK)
		io.WriteString(w, `{"ok":true}`)
		w.Header().Set("X-Echo", key)
		w.Header().Set(http.TrailerPrefix+"X-Late", "sk-"+key[len(key)-8:]+"…"+key[len(key)-4:])
		w.Header().Set(http.TrailerPrefix+"X-Late-Raw", key)
	}))
	t.Cleanup(srv.Close)
	return srv
}

// TestKeyOutsideHeaderAndBodyScrubbed has the upstream quote the injected
// key in a 1xx response, a header name and trailers, on the shared key and
// on a mailbox's own, and checks that none of it reaches the client.
func TestKeyOutsideHeaderAndBodyScrubbed(t *testing.T) {
	up := echoingUpstream(t)
	st := teststack.Start(t, func(c *config.Config) {
		for _, p := range provider.Names {
			c.Provider(p).Upstream = up.URL
		}
	})
	tokens := map[string]string{"shared": st.Token(t, "echo-shared@example.com"), "byok": useBYOKEverywhere(t, st, "echo-byok@example.com")}
	keys := map[string]map[string]string{"shared": teststack.SharedKeys, "byok": teststack.BYOKKeys}
	for _, source := range []string{"shared", "byok"} {
		for _, p := range provider.Names {
			key := keys[source][p]
			var mu sync.Mutex
			var early []string
			trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
				mu.Lock()
				defer mu.Unlock()
				for name, values := range h {
					early = append(early, name+": "+strings.Join(values, ", "))
				}
				return nil
			}}
			ctx := httptrace.WithClientTrace(context.Background(), trace)
			resp, body := send(t, http.DefaultClient, callRequest(ctx, st.ProxyURL, p, tokens[source], nonStream[p]))
			if resp.StatusCode != http.StatusOK || string(body) != `{"ok":true}` {
				t.Errorf("%s %s: %d %s", source, p, resp.StatusCode, body)
				continue
			}
			var seen []string
			mu.Lock()
			seen = append(seen, early...)
			mu.Unlock()
			if len(seen) == 0 {
				t.Errorf("%s %s: the 103 response did not reach the client", source, p)
			}
			for name, values := range resp.Header {
				seen = append(seen, name+": "+strings.Join(values, ", "))
			}
			for name, values := range resp.Trailer {
				seen = append(seen, "trailer "+name+": "+strings.Join(values, ", "))
			}
			if resp.Trailer.Get("X-Echo") != "[REDACTED]" {
				t.Errorf("%s %s: trailer X-Echo = %q, want [REDACTED]", source, p, resp.Trailer.Get("X-Echo"))
			}
			for _, line := range seen {
				lower := strings.ToLower(line)
				if strings.Contains(lower, strings.ToLower(key)) || strings.Contains(lower, strings.ToLower(key[len(key)-4:])) {
					t.Errorf("%s %s: the client got %q", source, p, line)
				}
			}
		}
	}
}

// TestKeyCutShortInErrorScrubbed has the upstream quote most of the
// injected key in an error body, cut short at its end, in other letter case
// or with escapes, and checks that no part of it reaches the client.
func TestKeyCutShortInErrorScrubbed(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		key := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		for _, name := range []string{"X-Api-Key", "X-Goog-Api-Key"} {
			if v := r.Header.Get(name); v != "" {
				key = v
			}
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		fmt.Fprintf(w, `{"error":{"message":"key %s or %s is not valid, nor %s","type":"authentication_error"}}`,
			key[:len(key)-3], strings.ToUpper(key[:len(key)-5]), strings.ReplaceAll(key[:len(key)-2], "-", `\u002d`))
	}))
	t.Cleanup(up.Close)
	st := teststack.Start(t, func(c *config.Config) {
		for _, p := range provider.Names {
			c.Provider(p).Upstream = up.URL
		}
	})
	tokens := map[string]string{"shared": st.Token(t, "cut-short-shared@example.com"), "byok": useBYOKEverywhere(t, st, "cut-short-byok@example.com")}
	keys := map[string]map[string]string{"shared": teststack.SharedKeys, "byok": teststack.BYOKKeys}
	for _, source := range []string{"shared", "byok"} {
		for _, p := range provider.Names {
			key := strings.ToLower(keys[source][p])
			resp, body := send(t, http.DefaultClient, callRequest(context.Background(), st.ProxyURL, p, tokens[source], nonStream[p]))
			if resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("%s %s: status %d, want the upstream's 401", source, p, resp.StatusCode)
			}
			if n := strings.Count(string(body), "[REDACTED]"); n != 3 {
				t.Errorf("%s %s: %d redactions in %s, want 3", source, p, n, body)
			}
			lower := strings.ToLower(strings.ReplaceAll(string(body), `\u002d`, "-"))
			for i := 0; i+8 <= len(key); i++ {
				if strings.Contains(lower, key[i:i+8]) {
					t.Errorf("%s %s: the client got %q of the key in %s", source, p, key[i:i+8], body)
					break
				}
			}
		}
	}
}

// quotingUpstream returns for every request an error that repeats what
// the client sent, as providers do: Anthropic's 404 quotes the model, and
// Google's 400 names each unknown field of the body. It also quotes part
// of the key it received.
func quotingUpstream(t *testing.T) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		data, _ := io.ReadAll(r.Body)
		var fields map[string]json.RawMessage
		json.Unmarshal(data, &fields)
		w.Header().Set("Content-Type", "application/json")
		if key := r.Header.Get("X-Goog-Api-Key"); key != "" {
			var names []string
			for name := range fields {
				if name != "contents" {
					names = append(names, name)
				}
			}
			w.WriteHeader(http.StatusBadRequest)
			msg, _ := json.Marshal(fmt.Sprintf("Unknown name %q; key %s", strings.Join(names, ","), key[:24]))
			fmt.Fprintf(w, `{"error":{"code":400,"message":%s,"status":"INVALID_ARGUMENT"}}`, msg)
			return
		}
		key := r.Header.Get("X-Api-Key")
		var model string
		json.Unmarshal(fields["model"], &model)
		w.WriteHeader(http.StatusNotFound)
		msg, _ := json.Marshal("model: " + model + "; key " + key[:16] + "***" + key[len(key)-4:])
		fmt.Fprintf(w, `{"type":"error","error":{"type":"not_found_error","message":%s}}`, msg)
	}))
	t.Cleanup(srv.Close)
	return srv
}

// TestScrubberRevealsNothingOfGuesses sends guesses at the shared key that
// the upstream's errors repeat, right and wrong, and checks that the
// client gets the same response for each, while the upstream's own quotes
// of the key are redacted.
func TestScrubberRevealsNothingOfGuesses(t *testing.T) {
	up := quotingUpstream(t)
	st := teststack.Start(t, func(c *config.Config) {
		c.Provider(provider.Anthropic).Upstream = up.URL
		c.Provider(provider.Google).Upstream = up.URL
	})
	token := st.Token(t, "guesses@example.com")
	anthropicKey := teststack.SharedKeys[provider.Anthropic]
	googleKey := teststack.SharedKeys[provider.Google]
	cases := []struct {
		name, p      string
		right, wrong string
		body         func(guess string) string
	}{
		{"masked first characters", provider.Anthropic, anthropicKey[:14] + "**", anthropicKey[:13] + "Q**",
			func(g string) string { return `{"model":"` + g + `","max_tokens":1,"messages":[]}` }},
		{"sixteen characters", provider.Anthropic, anthropicKey[20:36], anthropicKey[20:35] + "#",
			func(g string) string { return `{"model":"` + g + `","max_tokens":1,"messages":[]}` }},
		{"field name on a streamed body", provider.Google, googleKey[10:26], googleKey[10:25] + "#",
			func(g string) string { return `{"contents":[],"` + g + `":1}` }},
	}
	for _, tc := range cases {
		path := "/anthropic/v1/messages"
		if tc.p == provider.Google {
			path = "/google/v1beta/models/gemini-2.5-flash:generateContent"
		}
		answers := map[string]string{}
		for _, guess := range []string{tc.right, tc.wrong} {
			req := callRequest(context.Background(), st.ProxyURL, tc.p, token, call{path: path, body: tc.body(guess)})
			_, body := send(t, http.DefaultClient, req)
			answers[guess] = strings.ReplaceAll(string(body), guess, "GUESS")
			key := strings.ToLower(teststack.SharedKeys[tc.p])
			if lower := strings.ToLower(answers[guess]); strings.Contains(lower, key[:16]) || strings.Contains(lower, key[len(key)-4:]) {
				t.Errorf("%s: the upstream's own quote of the key reached the client: %s", tc.name, body)
			}
		}
		if answers[tc.right] != answers[tc.wrong] {
			t.Errorf("%s: a right guess got %s\nand a wrong one %s", tc.name, answers[tc.right], answers[tc.wrong])
		}
	}
}
