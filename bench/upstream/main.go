// Command upstream is the emulated provider of the benchmarks. It serves
// OpenAI chat completions (a JSON body with usage, or a 20-event SSE stream
// ending in the usage chunk) and Gemini streamGenerateContent with as little
// work as it can, so the benchmark measures the proxy and not the provider.
//
// It serves plain HTTP/1.1 on -listen and, with -tls-listen, HTTPS with
// HTTP/2 under a certificate it makes at start and writes to -cert-out.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	stdlog "log"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "plain HTTP/1.1 `address`")
	tlsListen := flag.String("tls-listen", "", "HTTPS (HTTP/2) `address`; empty turns it off")
	certOut := flag.String("cert-out", "", "`file` to write the HTTPS certificate to (PEM), for the proxies' ca_file")
	keys := flag.String("keys", "", "comma-separated provider keys accepted in Authorization: Bearer or x-goog-api-key")
	gap := flag.Duration("gap", time.Millisecond, "pause between stream events")
	flag.Parse()

	e := &emulator{keys: map[string]bool{}, gap: *gap}
	for k := range strings.SplitSeq(*keys, ",") {
		if k != "" {
			e.keys[k] = true
		}
	}
	if len(e.keys) == 0 {
		fail("no -keys given")
	}

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fail(err.Error())
	}
	plain := &http.Server{Handler: e, ReadHeaderTimeout: 10 * time.Second, ErrorLog: quietLog()}
	go func() { fail(plain.Serve(ln).Error()) }()
	fmt.Printf("http %s\n", ln.Addr())

	if *tlsListen != "" {
		cert, pemBytes, err := selfSigned()
		if err != nil {
			fail(err.Error())
		}
		if err := os.WriteFile(*certOut, pemBytes, 0o644); err != nil {
			fail(err.Error())
		}
		tln, err := net.Listen("tcp", *tlsListen)
		if err != nil {
			fail(err.Error())
		}
		secure := &http.Server{
			Handler:           e,
			ReadHeaderTimeout: 10 * time.Second,
			TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
			ErrorLog:          quietLog(),
		}
		go func() { fail(secure.ServeTLS(tln, "", "").Error()) }()
		fmt.Printf("https %s\n", tln.Addr())
	}
	select {}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "upstream:", msg)
	os.Exit(1)
}

// quietLog drops the server's per-connection errors (a load generator
// closing idle connections), which would only fill the log.
func quietLog() *stdlog.Logger {
	return slog.NewLogLogger(slog.DiscardHandler, slog.LevelError)
}

type emulator struct {
	keys map[string]bool
	gap  time.Duration
}

func (e *emulator) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, "reading body: "+err.Error(), http.StatusBadRequest)
		return
	}
	key := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	if key == "" {
		key = r.Header.Get("X-Goog-Api-Key")
	}
	if !e.keys[key] {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		io.WriteString(w, `{"error":{"message":"Incorrect API key provided.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}`)
		return
	}
	hold, _ := time.ParseDuration(r.Header.Get("X-Bench-Hold"))
	switch {
	case r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/chat/completions"):
		if jsonFlag(body, "stream") {
			e.chatStream(w, r, jsonFlag(body, "include_usage"), hold)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(chatBody)))
		w.Write(chatBody)
	case r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, ":streamGenerateContent"):
		e.geminiStream(w, r, hold)
	default:
		http.Error(w, "not emulated", http.StatusNotFound)
	}
}

// jsonFlag reports whether body sets name to true. The load generator and
// the proxies write compact JSON, so a byte search is enough here.
func jsonFlag(body []byte, name string) bool {
	return strings.Contains(string(body), `"`+name+`":true`)
}

// chatStream sends 19 chunks (role, 17 content deltas, finish), the usage
// chunk when the request asked for it, and [DONE]. With hold, it stops
// after the first chunk until the client leaves or hold passes.
func (e *emulator) chatStream(w http.ResponseWriter, r *http.Request, usage bool, hold time.Duration) {
	w.Header().Set("Content-Type", "text/event-stream; charset=utf-8")
	w.Header().Set("Cache-Control", "no-cache")
	rc := http.NewResponseController(w)
	w.WriteHeader(http.StatusOK)
	events := chatEvents
	if usage {
		events = chatEventsWithUsage
	}
	for i, ev := range events {
		if _, err := w.Write(ev); err != nil {
			return
		}
		if err := rc.Flush(); err != nil {
			return
		}
		if i == 0 && hold > 0 {
			select {
			case <-r.Context().Done():
				return
			case <-time.After(hold):
			}
		}
		if e.gap > 0 {
			time.Sleep(e.gap)
		}
	}
	w.Write([]byte("data: [DONE]\n\n"))
}

func (e *emulator) geminiStream(w http.ResponseWriter, r *http.Request, hold time.Duration) {
	w.Header().Set("Content-Type", "text/event-stream")
	rc := http.NewResponseController(w)
	w.WriteHeader(http.StatusOK)
	for i, ev := range geminiEvents {
		if _, err := w.Write(ev); err != nil {
			return
		}
		if err := rc.Flush(); err != nil {
			return
		}
		if i == 0 && hold > 0 {
			select {
			case <-r.Context().Done():
				return
			case <-time.After(hold):
			}
		}
		if e.gap > 0 {
			time.Sleep(e.gap)
		}
	}
}

// chatBody is a chat.completion of the shape gpt-4o-mini returns.
var chatBody = []byte(`{
  "id": "chatcmpl-C1fQm8ZrT4xWvY2kLhN7pEoa9dXbu",
  "object": "chat.completion",
  "created": 1754312117,
  "model": "gpt-4o-mini-2024-07-18",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": "The proxy forwards each request to the provider, injecting the key the mailbox selected, and streams the answer back unchanged.",
        "refusal": null,
        "annotations": []
      },
      "logprobs": null,
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 412,
    "completion_tokens": 23,
    "total_tokens": 435,
    "prompt_tokens_details": {"cached_tokens": 384, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
  },
  "service_tier": "default",
  "system_fingerprint": "fp_6f2eabb9a5"
}
`)

var (
	chatEvents          = buildChatEvents(false)
	chatEventsWithUsage = buildChatEvents(true)
	geminiEvents        = buildGeminiEvents()
)

func buildChatEvents(usage bool) [][]byte {
	const head = `data: {"id":"chatcmpl-C1fQm8ZrT4xWvY2kLhN7pEoa9dXbu","object":"chat.completion.chunk","created":1754312117,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_6f2eabb9a5","choices":[`
	tail := "]}\n\n"
	if usage {
		tail = `],"usage":null}` + "\n\n"
	}
	var events [][]byte
	events = append(events, []byte(head+`{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}`+tail))
	words := strings.Fields("The proxy forwards each request to the provider injecting the key the mailbox selected and streams it back")
	for _, word := range words[:17] {
		events = append(events, []byte(head+`{"index":0,"delta":{"content":" `+word+`"},"logprobs":null,"finish_reason":null}`+tail))
	}
	events = append(events, []byte(head+`{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}`+tail))
	if usage {
		events = append(events, []byte(head+`],"usage":{"prompt_tokens":412,"completion_tokens":17,"total_tokens":429,"prompt_tokens_details":{"cached_tokens":384,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}`+"\n\n"))
	}
	return events
}

func buildGeminiEvents() [][]byte {
	var events [][]byte
	for i := range 20 {
		finish := ""
		if i == 19 {
			finish = `,"finishReason": "STOP"`
		}
		events = append(events, []byte(`data: {"candidates": [{"content": {"parts": [{"text": " word"}],"role": "model"}`+finish+`,"index": 0}],"usageMetadata": {"promptTokenCount": 412,"candidatesTokenCount": `+strconv.Itoa(i+1)+`,"totalTokenCount": `+strconv.Itoa(413+i)+`},"modelVersion": "gemini-2.5-flash","responseId": "Xo2RaNbAJ8WVz7IPq4Hk2Ak"}`+"\r\n\r\n"))
	}
	return events
}

// selfSigned returns a certificate for 127.0.0.1 and its PEM encoding.
func selfSigned() (tls.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "byokproxy bench upstream"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	return cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}
