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

// A Message Batch names its results file by an absolute results_url, which
// the SDK requests as it is. The proxy points it at its own /anthropic/
// route, so the results come with the mailbox's key.
func TestAnthropicBatchResultsURL(t *testing.T) {
	s := teststack.Start(t)
	up := s.Upstreams[provider.Anthropic]
	version := []string{"Anthropic-Version", "2023-06-01"}
	const create = `{"requests":[` +
		`{"custom_id":"first","params":{"model":"claude-haiku-4-5","max_tokens":3,"messages":[{"role":"user","content":"hello"}]}},` +
		`{"custom_id":"second","params":{"model":"claude-haiku-4-5","max_tokens":2,"messages":[{"role":"user","content":"again"}]}}]}`

	s.UseBYOK(t, "batcher", provider.Anthropic)
	token := s.Token(t, "batcher")
	up.Reset()
	resp, body := s.Do(t, http.MethodPost, "/anthropic/v1/messages/batches", token, create, version...)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("create: status %d %s", resp.StatusCode, body)
	}
	var batch struct {
		ID         string `json:"id"`
		ResultsURL string `json:"results_url"`
	}
	if err := json.Unmarshal(body, &batch); err != nil {
		t.Fatalf("create: %v in %s", err, body)
	}
	want := s.ProxyURL + "/anthropic/v1/messages/batches/" + batch.ID + "/results"
	if batch.ResultsURL != want {
		t.Fatalf("created batch's results_url %q, want %q", batch.ResultsURL, want)
	}
	if got := resp.Header.Get("Content-Length"); got != strconv.Itoa(len(body)) {
		t.Errorf("Content-Length %s for a body of %d bytes", got, len(body))
	}

	for _, c := range []struct{ method, path string }{
		{http.MethodGet, "/anthropic/v1/messages/batches/" + batch.ID},
		{http.MethodPost, "/anthropic/v1/messages/batches/" + batch.ID + "/cancel"},
	} {
		resp, body := s.Do(t, c.method, c.path, token, "", version...)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s %s: status %d %s", c.method, c.path, resp.StatusCode, body)
		}
		if !strings.Contains(string(body), `"results_url":"`+want+`"`) {
			t.Errorf("%s %s: results_url not rebased in %s", c.method, c.path, body)
		}
	}
	resp, body = s.Do(t, http.MethodGet, "/anthropic/v1/messages/batches", token, "", version...)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("list: status %d %s", resp.StatusCode, body)
	}
	if !strings.Contains(string(body), `"results_url":"`+want+`"`) || strings.Contains(string(body), up.URL) {
		t.Errorf("list: results_url not rebased in %s", body)
	}

	resp, body = s.Do(t, http.MethodGet, strings.TrimPrefix(batch.ResultsURL, s.ProxyURL), token, "", version...)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("results: status %d %s", resp.StatusCode, body)
	}
	lines := strings.Split(strings.TrimSpace(string(body)), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], `"custom_id":"first"`) || !strings.Contains(lines[1], `"custom_id":"second"`) {
		t.Errorf("results: %d lines %q, want first and second", len(lines), lines)
	}
	for i, r := range up.Requests() {
		if r.Key != teststack.BYOKKeys[provider.Anthropic] {
			t.Errorf("upstream request %d (%s %s) carried key %q, want the mailbox's own", i, r.Method, r.Path, r.Key)
		}
	}

	// Batches are not among the shared key's endpoints.
	shared := s.Token(t, "batcher-shared")
	if resp, body := s.Do(t, http.MethodPost, "/anthropic/v1/messages/batches", shared, create, version...); resp.StatusCode != http.StatusForbidden {
		t.Errorf("shared create: status %d %s, want 403", resp.StatusCode, body)
	}
}
