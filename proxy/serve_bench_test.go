package proxy

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/byokproxy/byokproxy/audit"
	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/metrics"
	"github.com/byokproxy/byokproxy/provider"
)

// benchChatBody is a short chat completion request of about 1 KiB.
var benchChatBody = []byte(`{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a concise assistant for a support team."},{"role":"user","content":"` +
	strings.Repeat("Summarize the thread below and list the open questions. ", 15) + `"}],"temperature":0.2,"max_tokens":256}`)

const benchSharedKey = "sk-bench-shared-4d1f0c8e2b7a9f3e6c5d1a0b"
const benchBYOKKey = "sk-bench-byok-9e2c7b1d4f6a8c0e3b5d7f9a"

// benchUpstream responds to chat completions with a fixed body, or with a
// stream of 20 events when the request sets stream.
func benchUpstream(b *testing.B) *httptest.Server {
	b.Helper()
	chunk := []byte(`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1754312117,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":" word"},"finish_reason":null}],"usage":null}` + "\n\n")
	usageChunk := []byte(`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1754312117,"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":412,"completion_tokens":19,"total_tokens":431}}` + "\n\n")
	body := []byte(`{"id":"chatcmpl-1","object":"chat.completion","created":1754312117,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"The proxy forwards each request."},"finish_reason":"stop"}],"usage":{"prompt_tokens":412,"completion_tokens":23,"total_tokens":435}}`)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		req, _ := io.ReadAll(r.Body)
		if !bytes.Contains(req, []byte(`"stream":true`)) {
			w.Header().Set("Content-Type", "application/json")
			w.Write(body)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		for range 19 {
			w.Write(chunk)
			rc.Flush()
		}
		w.Write(usageChunk)
		w.Write([]byte("data: [DONE]\n\n"))
	}))
	b.Cleanup(srv.Close)
	return srv
}

// benchStack is a Handler on a real redis-server and a loopback upstream,
// with a shared and a byok mailbox.
type benchStack struct {
	handler *Handler
	shared  string
	byok    string
}

func newBenchStack(b *testing.B) *benchStack {
	b.Helper()
	srv := redistest.Start(b)
	rdb := srv.Client(b)
	prefix := srv.Prefix(b)
	up := benchUpstream(b)

	cfg := config.Defaults()
	for _, name := range provider.Names {
		cfg.Provider(name).Upstream = up.URL
	}
	cfg.Provider(provider.OpenAI).SharedKey = benchSharedKey
	ids, err := keystore.GenerateIdentities()
	if err != nil {
		b.Fatal(err)
	}
	store := keystore.New(rdb, prefix, ids)
	signer, err := mailbox.NewSigner([]string{"bench-token-secret-0123456789"})
	if err != nil {
		b.Fatal(err)
	}
	m := metrics.New(prometheus.NewRegistry())
	writer := audit.NewWriter(rdb, store.Layout(), audit.Options{Dropped: m.AuditDropped})
	ctx, cancel := context.WithCancel(context.Background())
	go writer.Run(ctx)
	b.Cleanup(cancel)
	// The record cache as the proxy runs it by default.
	store.EnableCache(cfg.Redis.CacheTTL)
	go store.Watch(ctx, slog.New(slog.DiscardHandler))

	// The JSON handler formats every log line as in production, and only
	// the write is discarded.
	log := slog.New(slog.NewJSONHandler(io.Discard, nil))
	h, err := New(Options{Config: cfg, Store: store, Signer: signer, Audit: writer, Metrics: m, Logger: log})
	if err != nil {
		b.Fatal(err)
	}
	byokID := mailbox.ID("bench-byok@example.com")
	if _, err := store.PutKey(ctx, byokID, provider.OpenAI, []byte(benchBYOKKey)); err != nil {
		b.Fatal(err)
	}
	if _, err := store.SetSource(ctx, byokID, provider.OpenAI, keystore.SourceBYOK); err != nil {
		b.Fatal(err)
	}
	return &benchStack{
		handler: h,
		shared:  signer.Issue("bench-shared@example.com", 0),
		byok:    signer.Issue(byokID, 0),
	}
}

// BenchmarkServeHTTP runs whole requests through the handler: token check,
// one Redis read, decryption for byok, forwarding over loopback to an
// in-process upstream, the usage tap and the audit record. The upstream's
// own work is part of each iteration.
func BenchmarkServeHTTP(b *testing.B) {
	st := newBenchStack(b)
	streamBody := bytes.Replace(benchChatBody, []byte(`"max_tokens":256`), []byte(`"max_tokens":256,"stream":true,"stream_options":{"include_usage":true}`), 1)
	cases := []struct {
		name  string
		token string
		body  []byte
	}{
		{"shared/json", st.shared, benchChatBody},
		{"byok/json", st.byok, benchChatBody},
		{"shared/stream", st.shared, streamBody},
		{"byok/stream", st.byok, streamBody},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				req := httptest.NewRequest(http.MethodPost, "/openai/v1/chat/completions", bytes.NewReader(c.body))
				req.Header.Set("Authorization", "Bearer "+c.token)
				req.Header.Set("Content-Type", "application/json")
				rec := httptest.NewRecorder()
				st.handler.ServeHTTP(rec, req)
				if rec.Code != http.StatusOK {
					b.Fatalf("status %d: %s", rec.Code, rec.Body.String())
				}
			}
		})
	}
}

// BenchmarkRewrite measures building the upstream request: target, removal
// of the client's credentials and injection of the key. ReverseProxy
// clones the request before Rewrite, so the clone is part of each
// iteration, and the clone-only case gives its share.
func BenchmarkRewrite(b *testing.B) {
	h := &Handler{}
	base, _ := url.Parse("https://api.openai.com")
	x := &exchange{
		up:      &upstream{spec: provider.Lookup(provider.OpenAI), base: base},
		rest:    "v1/chat/completions",
		source:  keystore.SourceBYOK,
		keyText: benchBYOKKey,
		body:    benchChatBody,
	}
	in := httptest.NewRequest(http.MethodPost, "/openai/v1/chat/completions", nil)
	in.Header.Set("Authorization", "Bearer bp1.YmVuY2g.0.c2lnbmF0dXJl")
	in.Header.Set("Content-Type", "application/json")
	in.Header.Set("User-Agent", "OpenAI/Python 1.99.0")
	in.Header.Set("X-Stainless-Lang", "python")
	in.Header.Set("Accept", "application/json")
	in = in.WithContext(context.WithValue(in.Context(), exchangeKey{}, x))

	b.Run("clone+rewrite", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			pr := &httputil.ProxyRequest{In: in, Out: in.Clone(in.Context())}
			h.rewrite(pr)
		}
	})
	b.Run("clone-only", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_ = in.Clone(in.Context())
		}
	})
}

// BenchmarkRequestInfo measures reading model and stream flag from a
// request body, reading a stream request that lacks
// stream_options.include_usage and adding it, and reading a body whose
// message is 64 KB of escaped quotes.
func BenchmarkRequestInfo(b *testing.B) {
	streamBody := bytes.Replace(benchChatBody, []byte(`"max_tokens":256`), []byte(`"max_tokens":256,"stream":true`), 1)
	b.Run("decode", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(benchChatBody)))
		for b.Loop() {
			if _, err := readRequestInfo(benchChatBody); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("include_usage", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(streamBody)))
		for b.Loop() {
			if _, err := patchIncludeUsage(streamBody); err != nil {
				b.Fatal(err)
			}
		}
	})
	// A message of nothing but escaped quotes is the worst case for the
	// eight-byte skips and the jumps from quote to quote.
	escapedQuotes := []byte(`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"` +
		strings.Repeat(`\"`, 32<<10) + `"}],"stream":true}`)
	b.Run("escaped_quotes", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(escapedQuotes)))
		for b.Loop() {
			if _, err := readRequestInfo(escapedQuotes); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkMailboxToken measures finding the token in the request.
func BenchmarkMailboxToken(b *testing.B) {
	req := httptest.NewRequest(http.MethodPost, "/openai/v1/chat/completions", nil)
	req.Header.Set("Authorization", "Bearer bp1.YmVuY2g.0.c2lnbmF0dXJl")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := mailboxToken(req); err != nil {
			b.Fatal(err)
		}
	}
}
