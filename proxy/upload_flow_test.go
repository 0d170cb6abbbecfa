package proxy_test

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
)

// A resumable upload to Google's Files API runs through the proxy from
// start to end: the session URL in the provider's response points back at
// the proxy, so the file's bytes get the mailbox's key too.
func TestGoogleResumableUpload(t *testing.T) {
	s := teststack.Start(t)
	up := s.Upstreams[provider.Google]
	const startPath = "/google/upload/v1beta/files"
	file := strings.Repeat("0123456789", 100)
	start := func(token string) (*http.Response, []byte) {
		return s.Do(t, http.MethodPost, startPath, token, `{"file":{"displayName":"notes.txt"}}`,
			"X-Goog-Upload-Protocol", "resumable",
			"X-Goog-Upload-Command", "start",
			"X-Goog-Upload-Header-Content-Length", strconv.Itoa(len(file)),
			"X-Goog-Upload-Header-Content-Type", "text/plain")
	}

	s.UseBYOK(t, "uploader", provider.Google)
	token := s.Token(t, "uploader")
	up.Reset()
	resp, body := start(token)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("start: status %d %s", resp.StatusCode, body)
	}
	session := resp.Header.Get("X-Goog-Upload-URL")
	rest, ok := strings.CutPrefix(session, s.ProxyURL+"/google/upload/v1beta/files?")
	if !ok || !strings.Contains(rest, "upload_id=") {
		t.Fatalf("session URL %q does not point at the proxy's /google/ route", session)
	}
	sessionPath := strings.TrimPrefix(session, s.ProxyURL)

	half := len(file) / 2
	resp, body = s.Do(t, http.MethodPost, sessionPath, token, file[:half],
		"X-Goog-Upload-Command", "upload", "X-Goog-Upload-Offset", "0")
	if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Goog-Upload-Status") != "active" {
		t.Fatalf("first part: status %d, upload status %q, %s", resp.StatusCode, resp.Header.Get("X-Goog-Upload-Status"), body)
	}
	resp, body = s.Do(t, http.MethodPost, sessionPath, token, file[half:],
		"X-Goog-Upload-Command", "upload, finalize", "X-Goog-Upload-Offset", strconv.Itoa(half))
	if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Goog-Upload-Status") != "final" {
		t.Fatalf("last part: status %d, upload status %q, %s", resp.StatusCode, resp.Header.Get("X-Goog-Upload-Status"), body)
	}
	var done struct {
		File struct {
			Name      string `json:"name"`
			SizeBytes string `json:"sizeBytes"`
			MimeType  string `json:"mimeType"`
		} `json:"file"`
	}
	if err := json.Unmarshal(body, &done); err != nil {
		t.Fatalf("last part: %v in %s", err, body)
	}
	if done.File.SizeBytes != strconv.Itoa(len(file)) || done.File.MimeType != "text/plain" || done.File.Name == "" {
		t.Errorf("uploaded file %+v, want %d bytes of text/plain", done.File, len(file))
	}

	sent := up.Requests()
	if len(sent) != 3 {
		t.Fatalf("%d upstream requests, want 3", len(sent))
	}
	for i, r := range sent {
		if r.Key != teststack.BYOKKeys[provider.Google] {
			t.Errorf("upstream request %d carried key %q, want the mailbox's own", i, r.Key)
		}
		for name, values := range r.Header {
			for _, v := range values {
				if strings.Contains(v, token) {
					t.Errorf("upstream request %d carried the mailbox token in %s", i, name)
				}
			}
		}
	}
	if got := string(sent[1].Body) + string(sent[2].Body); got != file {
		t.Errorf("the upstream received %d bytes of file, want %d", len(got), len(file))
	}

	// Files are not among the shared key's endpoints.
	shared := s.Token(t, "uploader-shared")
	up.Reset()
	if resp, body := start(shared); resp.StatusCode != http.StatusForbidden {
		t.Errorf("shared start: status %d %s, want 403", resp.StatusCode, body)
	}
	if n := len(up.Requests()); n != 0 {
		t.Errorf("%d shared upload requests reached the upstream, want 0", n)
	}
}
