package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"
)

// sseUpstream reads the whole request body, as a provider does, then
// streams 20 events and [DONE] with a pause between them.
func sseUpstream(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		for i := range 20 {
			if _, err := io.WriteString(w, "data: {\"n\":"+strings.Repeat("1", i+1)+"}\n\n"); err != nil {
				return
			}
			rc.Flush()
			time.Sleep(5 * time.Millisecond)
		}
		io.WriteString(w, "data: [DONE]\n\n")
	}))
	t.Cleanup(srv.Close)
	return srv
}

// slowEOFBody delays the read that follows the body's last bytes. The
// Transport makes that read, after it has sent Content-Length bytes, to
// check that the body ends there. Under load its goroutine can be
// descheduled at exactly that point, and the delay makes that certain.
type slowEOFBody struct {
	io.ReadCloser
	remaining int64
	delay     time.Duration
	// endErr receives the error of the delayed read.
	endErr chan error
}

func (b *slowEOFBody) Read(p []byte) (int, error) {
	if b.remaining > 0 {
		n, err := b.ReadCloser.Read(p)
		b.remaining -= int64(n)
		return n, err
	}
	time.Sleep(b.delay)
	n, err := b.ReadCloser.Read(p)
	select {
	case b.endErr <- err:
	default:
	}
	return n, err
}

// streamThrough sends one streaming request of bodySize bytes through a
// floor proxy and returns whether the client received the whole stream.
// With readFirst, the proxy reads the body into memory before forwarding it,
// as byokproxy does for the JSON bodies it inspects.
// It also returns the error of the Transport's read after the body's end.
func streamThrough(t *testing.T, fullDuplex, readFirst bool, bodySize int) (complete bool, detail string, endErr error) {
	t.Helper()
	up := sseUpstream(t)
	target, _ := url.Parse(up.URL)
	floor := newHandler(target, "sk-floor", fullDuplex, &http.Transport{})
	endErrs := make(chan error, 1)
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if readFirst {
			buffered, err := io.ReadAll(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(buffered))
		}
		r.Body = &slowEOFBody{ReadCloser: r.Body, remaining: r.ContentLength, delay: 50 * time.Millisecond, endErr: endErrs}
		floor.ServeHTTP(w, r)
	}))
	t.Cleanup(proxy.Close)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	body := bytes.Repeat([]byte("x"), bodySize)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, proxy.URL+"/v1/chat/completions", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("request: %v", err)
	}
	defer resp.Body.Close()
	events := 0
	sc := bufio.NewScanner(resp.Body)
	done := false
	for sc.Scan() {
		line := sc.Text()
		if line == "data: [DONE]" {
			done = true
		} else if strings.HasPrefix(line, "data: ") {
			events++
		}
	}
	select {
	case endErr = <-endErrs:
	case <-ctx.Done():
		t.Fatal("the Transport never read past the body's end")
	}
	switch {
	case sc.Err() != nil:
		return false, sc.Err().Error(), endErr
	case !done:
		return false, "stream ended without [DONE]", endErr
	case events != 20:
		return false, "incomplete stream", endErr
	}
	return true, "", endErr
}

// TestFullDuplexKeepsStreams shows why byokproxy turns on full duplex. When
// the handler writes the response header, the HTTP/1 server reads what is
// left of the request body and closes it, unless full duplex is on. The
// Transport may still be about to read that body: after sending
// Content-Length bytes it reads once more to see the end. That read then
// fails with "http: invalid Read on closed Body", the Transport closes the
// upstream connection, and the stream the client is receiving is cut. Body
// size does not matter. For a body that is not in memory, the Transport
// flushes the header first and writes the body straight to the connection,
// so the upstream can respond before that last read. A body the proxy read
// into memory first is not exposed, since the server's close does not reach
// the copy.
func TestFullDuplexKeepsStreams(t *testing.T) {
	tests := []struct {
		name       string
		fullDuplex bool
		readFirst  bool
		bodySize   int
		complete   bool
	}{
		{"full duplex, 16 KiB body", true, false, 16 << 10, true},
		{"full duplex, 300 byte body", true, false, 300, true},
		{"default, 16 KiB body", false, false, 16 << 10, false},
		{"default, 300 byte body", false, false, 300, false},
		{"default, body read first", false, true, 16 << 10, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			complete, detail, endErr := streamThrough(t, tt.fullDuplex, tt.readFirst, tt.bodySize)
			if complete != tt.complete {
				t.Errorf("stream complete: %v (%s), want %v", complete, detail, tt.complete)
			}
			wantClosed := !tt.complete
			if closed := errors.Is(endErr, http.ErrBodyReadAfterClose); closed != wantClosed {
				t.Errorf("read after the body's end: %v, want http.ErrBodyReadAfterClose: %v", endErr, wantClosed)
			}
			if !complete {
				t.Logf("client saw %s; the Transport's read after the body's end: %v", detail, endErr)
			}
		})
	}
}
