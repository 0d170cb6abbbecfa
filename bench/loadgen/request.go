package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// requestBody returns a request body of about size bytes for kind: a chat
// completion request whose conversation history is padded to the size, or
// a Gemini streamGenerateContent request. The JSON is compact, as the
// provider SDKs send it.
func requestBody(kind string, size int) ([]byte, error) {
	filler := "Summarize the thread below and list the open questions, with one line per question and the person who asked it. "
	switch kind {
	case "chat", "chat-stream", "chat-stream-usage":
		type message struct {
			Role    string `json:"role"`
			Content string `json:"content"`
		}
		type streamOptions struct {
			IncludeUsage bool `json:"include_usage"`
		}
		type chat struct {
			Model         string         `json:"model"`
			Messages      []message      `json:"messages"`
			Temperature   float64        `json:"temperature"`
			MaxTokens     int            `json:"max_tokens"`
			Stream        bool           `json:"stream,omitempty"`
			StreamOptions *streamOptions `json:"stream_options,omitempty"`
		}
		req := chat{Model: "gpt-4o-mini", Temperature: 0.2, MaxTokens: 256}
		req.Messages = append(req.Messages, message{"system", "You are a concise assistant for a support team."})
		req.Stream = kind != "chat"
		if kind == "chat-stream-usage" {
			req.StreamOptions = &streamOptions{IncludeUsage: true}
		}
		return padded(size, filler, func(history string) any {
			msgs := append(req.Messages[:1:1], message{"user", history})
			r := req
			r.Messages = msgs
			return r
		})
	case "gemini-stream":
		type part struct {
			Text string `json:"text"`
		}
		type content struct {
			Role  string `json:"role"`
			Parts []part `json:"parts"`
		}
		type generate struct {
			Contents         []content      `json:"contents"`
			GenerationConfig map[string]int `json:"generationConfig"`
		}
		return padded(size, filler, func(history string) any {
			return generate{
				Contents:         []content{{Role: "user", Parts: []part{{Text: history}}}},
				GenerationConfig: map[string]int{"maxOutputTokens": 256},
			}
		})
	}
	return nil, fmt.Errorf("unknown -kind %q", kind)
}

// padded grows the history text until the encoded body reaches size.
func padded(size int, filler string, build func(history string) any) ([]byte, error) {
	var history strings.Builder
	for {
		body, err := json.Marshal(build(history.String()))
		if err != nil || len(body) >= size {
			return body, err
		}
		history.WriteString(filler[:min(len(filler), size-len(body))])
	}
}

// requester sends the configured request.
type requester struct {
	client  *http.Client
	url     string
	body    []byte
	headers http.Header
}

func newRequester(o options, client *http.Client) (*requester, error) {
	if o.url == "" {
		return nil, errors.New("missing -url")
	}
	body, err := requestBody(o.kind, o.bodyBytes)
	if err != nil {
		return nil, err
	}
	h := http.Header{}
	h.Set("Content-Type", "application/json")
	h.Set("User-Agent", "byokproxy-bench/1")
	if o.token != "" {
		h.Set("Authorization", "Bearer "+o.token)
	}
	for _, kv := range o.headers {
		name, value, ok := strings.Cut(kv, ":")
		if !ok {
			return nil, fmt.Errorf("invalid -header %q: use NAME:VALUE", kv)
		}
		h.Add(strings.TrimSpace(name), strings.TrimSpace(value))
	}
	return &requester{client: client, url: o.url, body: body, headers: h}, nil
}

func (rq *requester) send(ctx context.Context) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, rq.url, bytes.NewReader(rq.body))
	if err != nil {
		return nil, err
	}
	req.Header = rq.headers.Clone()
	resp, err := rq.client.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 300))
		resp.Body.Close()
		return nil, fmt.Errorf("status %d: %s", resp.StatusCode, bytes.TrimSpace(msg))
	}
	return resp, nil
}

// do sends one non-streaming request and reads the whole response.
func (rq *requester) do(ctx context.Context) error {
	resp, err := rq.send(ctx)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = io.Copy(io.Discard, resp.Body)
	return err
}

// streamOutcome is the result of reading one stream.
type streamOutcome struct {
	ttfe   time.Duration
	events int
	done   bool
	err    error
}

// readStream reads an SSE response to its end. It notes when the first
// complete event arrived, counts the data events and whether [DONE] came.
func readStream(body io.Reader, sched time.Time) streamOutcome {
	var out streamOutcome
	var all []byte
	buf := make([]byte, 16<<10)
	for {
		n, err := body.Read(buf)
		all = append(all, buf[:n]...)
		if out.ttfe == 0 && bytes.Contains(all, []byte("\n\n")) {
			out.ttfe = time.Since(sched)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			out.err = err
			break
		}
	}
	for _, block := range bytes.Split(bytes.ReplaceAll(all, []byte("\r\n"), []byte("\n")), []byte("\n\n")) {
		switch {
		case bytes.Equal(block, []byte("data: [DONE]")):
			out.done = true
		case bytes.HasPrefix(block, []byte("data: ")):
			out.events++
		}
	}
	return out
}
