package proxy

import (
	"context"
	"crypto/tls"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
)

func TestRebaseUploadURLs(t *testing.T) {
	const base = "http://127.0.0.1:8080/google"
	cases := []struct {
		name, upstream, header, want string
	}{
		{"session URL", "https://generativelanguage.googleapis.com",
			"https://generativelanguage.googleapis.com/upload/v1beta/files?upload_id=AB-c_1&upload_protocol=resumable",
			base + "/upload/v1beta/files?upload_id=AB-c_1&upload_protocol=resumable"},
		{"default port written", "https://generativelanguage.googleapis.com",
			"https://generativelanguage.googleapis.com:443/upload/v1beta/files?upload_id=1",
			base + "/upload/v1beta/files?upload_id=1"},
		{"upstream with a path", "http://gateway.internal:9000/gemini/",
			"http://gateway.internal:9000/gemini/upload/v1beta/files?upload_id=2",
			base + "/upload/v1beta/files?upload_id=2"},
		{"escaped path kept", "https://generativelanguage.googleapis.com",
			"https://generativelanguage.googleapis.com/upload/v1beta/fileSearchStores/my%20store:uploadToFileSearchStore?upload_id=3",
			base + "/upload/v1beta/fileSearchStores/my%20store:uploadToFileSearchStore?upload_id=3"},
		{"another host", "https://generativelanguage.googleapis.com",
			"https://uploads.example.com/upload/v1beta/files?upload_id=4",
			"https://uploads.example.com/upload/v1beta/files?upload_id=4"},
		{"another scheme", "https://generativelanguage.googleapis.com",
			"http://generativelanguage.googleapis.com/upload/v1beta/files?upload_id=5",
			"http://generativelanguage.googleapis.com/upload/v1beta/files?upload_id=5"},
		{"another port", "https://generativelanguage.googleapis.com",
			"https://generativelanguage.googleapis.com:8443/upload/v1beta/files?upload_id=6",
			"https://generativelanguage.googleapis.com:8443/upload/v1beta/files?upload_id=6"},
		{"dot segments", "https://generativelanguage.googleapis.com",
			"https://generativelanguage.googleapis.com/upload/../../anthropic/v1/messages?upload_id=8",
			"https://generativelanguage.googleapis.com/upload/../../anthropic/v1/messages?upload_id=8"},
		{"encoded dot segments", "https://generativelanguage.googleapis.com",
			"https://generativelanguage.googleapis.com/upload/%2e%2e/../anthropic/v1/messages?upload_id=9",
			"https://generativelanguage.googleapis.com/upload/%2e%2e/../anthropic/v1/messages?upload_id=9"},
		{"encoded slash", "https://generativelanguage.googleapis.com",
			"https://generativelanguage.googleapis.com/upload/v1beta%2F..%2Ffiles?upload_id=10",
			"https://generativelanguage.googleapis.com/upload/v1beta%2F..%2Ffiles?upload_id=10"},
		{"fragment", "https://generativelanguage.googleapis.com",
			"https://generativelanguage.googleapis.com/upload/v1beta/files?upload_id=11#x",
			"https://generativelanguage.googleapis.com/upload/v1beta/files?upload_id=11#x"},
		{"outside the upstream's path", "http://gateway.internal:9000/gemini",
			"http://gateway.internal:9000/other/upload/v1beta/files?upload_id=7",
			"http://gateway.internal:9000/other/upload/v1beta/files?upload_id=7"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			up, err := url.Parse(c.upstream)
			if err != nil {
				t.Fatal(err)
			}
			h := http.Header{}
			h.Set("X-Goog-Upload-URL", c.header)
			h.Set("X-Goog-Upload-Control-URL", c.header)
			rebaseUploadURLs(h, up, base)
			for _, name := range []string{"X-Goog-Upload-URL", "X-Goog-Upload-Control-URL"} {
				if got := h.Get(name); got != c.want {
					t.Errorf("%s = %q, want %q", name, got, c.want)
				}
			}
		})
	}
}

func TestUploadBase(t *testing.T) {
	plain := httptest.NewRequest(http.MethodPost, "http://proxy.internal:8080/google/upload/v1beta/files", nil)
	if got, want := uploadBase(plain, "google"), "http://proxy.internal:8080/google"; got != want {
		t.Errorf("plain HTTP: %q, want %q", got, want)
	}

	secure := plain.Clone(plain.Context())
	secure.TLS = &tls.ConnectionState{}
	if got, want := uploadBase(secure, "google"), "https://proxy.internal:8080/google"; got != want {
		t.Errorf("TLS: %q, want %q", got, want)
	}

	terminated := plain.Clone(plain.Context())
	terminated.Header.Set("X-Forwarded-Proto", "https")
	if got, want := uploadBase(terminated, "google"), "https://proxy.internal:8080/google"; got != want {
		t.Errorf("behind a TLS terminator: %q, want %q", got, want)
	}

	// Through the forward proxy the client reaches the upstream's own host
	// through this proxy again, so its URLs stay as they are.
	tunnelled := plain.WithContext(context.WithValue(plain.Context(), tunnelKey{}, &tunnel{}))
	if got := uploadBase(tunnelled, "google"); got != "" {
		t.Errorf("intercepted: %q, want none", got)
	}

	ipv6 := plain.Clone(plain.Context())
	ipv6.Host = "[::1]:8080"
	if got, want := uploadBase(ipv6, "google"), "http://[::1]:8080/google"; got != want {
		t.Errorf("IPv6 Host: %q, want %q", got, want)
	}

	// A Host that is not a plain host and port would change the URL's path,
	// query or user.
	for _, host := range []string{"", "proxy/x?", "proxy#", "user@proxy", "proxy:port", "proxy\\x", "pro%78y", "proxy x"} {
		bad := plain.Clone(plain.Context())
		bad.Host = host
		if got := uploadBase(bad, "google"); got != "" {
			t.Errorf("Host %q: %q, want none", host, got)
		}
	}
}
