package upstreamtest

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"io"
	"math"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

const (
	openAIKey    = "sk-proj-emulatortestkey0123456789abcdefghijklmnopqrstuv"
	anthropicKey = "sk-ant-api03-emulatortestkey0123456789abcdefghijklmnop"
	googleKey    = "AIzaSyEmulatorTestKey0123456789abcdef"
)

type sseEvent struct {
	name string
	data string
}

// parseSSE splits a server-sent event stream into events. It accepts "\n"
// and "\r\n" line ends, as the specification does.
func parseSSE(t *testing.T, body string) []sseEvent {
	t.Helper()
	body = strings.ReplaceAll(body, "\r\n", "\n")
	var events []sseEvent
	for _, block := range strings.Split(body, "\n\n") {
		if strings.TrimSpace(block) == "" {
			continue
		}
		var ev sseEvent
		for _, line := range strings.Split(block, "\n") {
			switch {
			case strings.HasPrefix(line, "event: "):
				ev.name = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: "):
				ev.data = strings.TrimPrefix(line, "data: ")
			default:
				t.Fatalf("unexpected SSE line %q", line)
			}
		}
		events = append(events, ev)
	}
	return events
}

func do(t *testing.T, req *http.Request) (*http.Response, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := http.DefaultClient.Do(req.WithContext(ctx))
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body of %s %s: %v", req.Method, req.URL, err)
	}
	return resp, string(body)
}

func newRequest(t *testing.T, method, url, body string, header map[string]string) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	return req
}

func decode(t *testing.T, s string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		t.Fatalf("decode %q: %v", s, err)
	}
	return m
}

func TestInputTokens(t *testing.T) {
	tests := []struct {
		name string
		body string
		want int
	}{
		{"not json", "x", BaseInputTokens},
		{"chat string content", `{"model":"m","messages":[{"role":"user","content":"one two three"}]}`, BaseInputTokens + 3},
		{"chat parts", `{"messages":[{"role":"user","content":[{"type":"text","text":"a b"}]}]}`, BaseInputTokens + 2},
		{"anthropic system", `{"system":"be brief","messages":[{"role":"user","content":"hi"}]}`, BaseInputTokens + 3},
		{"responses input", `{"input":"four words in here","instructions":"x"}`, BaseInputTokens + 5},
		{"embeddings list", `{"input":["a b","c"]}`, BaseInputTokens + 3},
		{"gemini contents", `{"contents":[{"role":"user","parts":[{"text":"x y z"}]}]}`, BaseInputTokens + 3},
		{"ignores other fields", `{"model":"many words here","temperature":1,"messages":[]}`, BaseInputTokens},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := InputTokens([]byte(tt.body)); got != tt.want {
				t.Errorf("InputTokens(%s) = %d, want %d", tt.body, got, tt.want)
			}
		})
	}
}

func TestOutputTokensLimit(t *testing.T) {
	tests := []struct {
		body string
		want int
	}{
		{`{}`, len(ReplyDeltas)},
		{`{"max_tokens":1}`, 1},
		{`{"max_tokens":1000}`, len(ReplyDeltas)},
		{`{"max_completion_tokens":2}`, 2},
		{`{"max_output_tokens":3}`, 3},
		{`{"generationConfig":{"maxOutputTokens":4}}`, 4},
		{`{"max_tokens":0}`, len(ReplyDeltas)},
	}
	for _, tt := range tests {
		if got := OutputTokens([]byte(tt.body)); got != tt.want {
			t.Errorf("OutputTokens(%s) = %d, want %d", tt.body, got, tt.want)
		}
	}
}

func TestAuthErrors(t *testing.T) {
	oa := NewOpenAI(openAIKey)
	defer oa.Close()
	an := NewAnthropic(anthropicKey)
	defer an.Close()
	gg := NewGoogle(googleKey)
	defer gg.Close()

	wrongOpenAI := "sk-proj-wrongkey0123456789abcdefghijklmnopqrstuvwxyz"
	tests := []struct {
		name       string
		srv        *Server
		path       string
		header     map[string]string
		wantStatus int
		wantInBody string
	}{
		{"openai none", oa, "/v1/models", nil, 401, "You didn't provide an API key"},
		{"openai wrong", oa, "/v1/models", map[string]string{"Authorization": "Bearer " + wrongOpenAI}, 401, MaskKey(wrongOpenAI)},
		{"openai wrong code", oa, "/v1/models", map[string]string{"Authorization": "Bearer " + wrongOpenAI}, 401, `"code":"invalid_api_key"`},
		{"openai x-api-key ignored", oa, "/v1/models", map[string]string{"X-Api-Key": openAIKey}, 401, "You didn't provide"},
		{"openai ok", oa, "/v1/models", map[string]string{"Authorization": "Bearer " + openAIKey}, 200, `"object":"list"`},
		{"anthropic none", an, "/v1/models", map[string]string{"Anthropic-Version": "2023-06-01"}, 401, `"type":"authentication_error"`},
		{"anthropic wrong", an, "/v1/models", map[string]string{"X-Api-Key": "sk-ant-wrong", "Anthropic-Version": "2023-06-01"}, 401, "invalid x-api-key"},
		{"anthropic bearer ignored", an, "/v1/models", map[string]string{"Authorization": "Bearer " + anthropicKey, "Anthropic-Version": "2023-06-01"}, 401, "x-api-key header is required"},
		{"anthropic no version", an, "/v1/models", map[string]string{"X-Api-Key": anthropicKey}, 400, "anthropic-version"},
		{"anthropic ok", an, "/v1/models", map[string]string{"X-Api-Key": anthropicKey, "Anthropic-Version": "2023-06-01"}, 200, `"has_more":false`},
		{"google none", gg, "/v1beta/models", nil, 403, `"status":"PERMISSION_DENIED"`},
		{"google wrong", gg, "/v1beta/models", map[string]string{"X-Goog-Api-Key": "AIzaWrong"}, 400, "API_KEY_INVALID"},
		{"google header ok", gg, "/v1beta/models", map[string]string{"X-Goog-Api-Key": googleKey}, 200, `"models/gemini-2.5-flash"`},
		{"google query ok", gg, "/v1beta/models?key=" + googleKey, nil, 200, `"models/gemini-2.5-flash"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := do(t, newRequest(t, "GET", tt.srv.URL+tt.path, "", tt.header))
			if resp.StatusCode != tt.wantStatus {
				t.Errorf("status = %d, want %d (body %s)", resp.StatusCode, tt.wantStatus, body)
			}
			if !strings.Contains(body, tt.wantInBody) {
				t.Errorf("body %s does not contain %q", body, tt.wantInBody)
			}
			if strings.Contains(body, wrongOpenAI) {
				t.Errorf("body %s contains the raw key without SetEchoKeyInErrors", body)
			}
		})
	}
}

func TestEchoKeyInErrors(t *testing.T) {
	for _, srv := range []*Server{NewOpenAI(openAIKey), NewAnthropic(anthropicKey), NewGoogle(googleKey)} {
		t.Run(srv.Provider, func(t *testing.T) {
			defer srv.Close()
			srv.SetEchoKeyInErrors(true)
			const wrong = "AIzaWrongKeyThatShouldBeEchoed-0123456789"
			hdr := map[string]string{"Authorization": "Bearer " + wrong, "X-Api-Key": wrong, "X-Goog-Api-Key": wrong, "Anthropic-Version": "2023-06-01"}
			_, body := do(t, newRequest(t, "GET", srv.URL+"/v1/models", "", hdr))
			if !strings.Contains(body, wrong) {
				t.Errorf("auth error %s does not echo the key", body)
			}

			// Errors of accepted keys echo them too.
			srv.SetError(http.StatusTooManyRequests)
			good := map[string]string{"Authorization": "Bearer " + openAIKey, "X-Api-Key": anthropicKey, "X-Goog-Api-Key": googleKey, "Anthropic-Version": "2023-06-01"}
			resp, body := do(t, newRequest(t, "GET", srv.URL+"/v1/models", "", good))
			if resp.StatusCode != http.StatusTooManyRequests {
				t.Errorf("status = %d, want 429", resp.StatusCode)
			}
			if resp.Header.Get("Retry-After") != "1" {
				t.Errorf("Retry-After = %q, want 1", resp.Header.Get("Retry-After"))
			}
			if !strings.Contains(body, srv.Requests()[1].Key) {
				t.Errorf("error %s does not echo the accepted key", body)
			}
		})
	}
}

func TestSetErrorShapes(t *testing.T) {
	tests := []struct {
		srv    *Server
		status int
		header map[string]string
		want   string
	}{
		{NewOpenAI(openAIKey), 500, map[string]string{"Authorization": "Bearer " + openAIKey}, `"type":"server_error"`},
		{NewAnthropic(anthropicKey), 529, map[string]string{"X-Api-Key": anthropicKey}, `"type":"overloaded_error"`},
		{NewGoogle(googleKey), 503, map[string]string{"X-Goog-Api-Key": googleKey}, `"status":"UNAVAILABLE"`},
	}
	for _, tt := range tests {
		t.Run(tt.srv.Provider, func(t *testing.T) {
			defer tt.srv.Close()
			tt.srv.SetError(tt.status)
			resp, body := do(t, newRequest(t, "POST", tt.srv.URL+"/v1/anything", "{}", tt.header))
			if resp.StatusCode != tt.status {
				t.Errorf("status = %d, want %d", resp.StatusCode, tt.status)
			}
			if !strings.Contains(body, tt.want) {
				t.Errorf("body %s does not contain %s", body, tt.want)
			}
			tt.srv.Reset()
			resp, _ = do(t, newRequest(t, "POST", tt.srv.URL+"/v1/anything", "{}", tt.header))
			if resp.StatusCode != http.StatusOK {
				t.Errorf("status after Reset = %d, want 200", resp.StatusCode)
			}
		})
	}
}

func TestUnknownPathRecorded(t *testing.T) {
	srv := NewOpenAI(openAIKey)
	defer srv.Close()
	resp, body := do(t, newRequest(t, "POST", srv.URL+"/v1/files?purpose=batch", `{"a":1}`, map[string]string{"Authorization": "Bearer " + openAIKey, "X-Extra": "yes"}))
	if resp.StatusCode != http.StatusOK || body != `{"ok":true}` {
		t.Fatalf("got %d %s, want 200 {\"ok\":true}", resp.StatusCode, body)
	}
	reqs := srv.Requests()
	if len(reqs) != 1 {
		t.Fatalf("recorded %d requests, want 1", len(reqs))
	}
	r := reqs[0]
	if r.Method != "POST" || r.Path != "/v1/files" || r.RawQuery != "purpose=batch" {
		t.Errorf("recorded %s %s ? %s", r.Method, r.Path, r.RawQuery)
	}
	if r.Key != openAIKey || !r.Authorized {
		t.Errorf("recorded key %q authorized %v", r.Key, r.Authorized)
	}
	if r.Header.Get("X-Extra") != "yes" {
		t.Errorf("recorded header X-Extra = %q", r.Header.Get("X-Extra"))
	}
	if string(r.Body) != `{"a":1}` {
		t.Errorf("recorded body %q", r.Body)
	}
	srv.Reset()
	if n := len(srv.Requests()); n != 0 {
		t.Errorf("after Reset %d requests remain", n)
	}
}

func TestOpenAIChat(t *testing.T) {
	srv := NewOpenAI(openAIKey)
	defer srv.Close()
	auth := map[string]string{"Authorization": "Bearer " + openAIKey}
	const prompt = `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"say hello please"}]`
	wantIn := BaseInputTokens + 3

	t.Run("non-streaming", func(t *testing.T) {
		resp, body := do(t, newRequest(t, "POST", srv.URL+"/v1/chat/completions", prompt+"}", auth))
		if resp.StatusCode != 200 {
			t.Fatalf("status %d: %s", resp.StatusCode, body)
		}
		var out struct {
			Object  string
			Model   string
			Choices []struct {
				Message      struct{ Role, Content string }
				FinishReason string `json:"finish_reason"`
			}
			Usage struct{ PromptTokens, CompletionTokens, TotalTokens int }
		}
		json.Unmarshal([]byte(body), &out)
		if out.Object != "chat.completion" || out.Model != "gpt-4o-mini" {
			t.Errorf("object %q model %q", out.Object, out.Model)
		}
		if len(out.Choices) != 1 || out.Choices[0].Message.Content != ReplyText(len(ReplyDeltas)) || out.Choices[0].FinishReason != "stop" {
			t.Errorf("choices = %+v", out.Choices)
		}
		m := decode(t, body)["usage"].(map[string]any)
		if m["prompt_tokens"] != float64(wantIn) || m["completion_tokens"] != float64(len(ReplyDeltas)) {
			t.Errorf("usage = %v, want %d in, %d out", m, wantIn, len(ReplyDeltas))
		}
		if u := srv.Requests()[0].Usage; u.InputTokens != wantIn || u.OutputTokens != len(ReplyDeltas) {
			t.Errorf("recorded usage %+v", u)
		}
	})

	for _, includeUsage := range []bool{false, true} {
		name := "stream without usage"
		body := prompt + `,"stream":true}`
		if includeUsage {
			name = "stream with usage"
			body = prompt + `,"stream":true,"stream_options":{"include_usage":true}}`
		}
		t.Run(name, func(t *testing.T) {
			resp, raw := do(t, newRequest(t, "POST", srv.URL+"/v1/chat/completions", body, auth))
			if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
				t.Errorf("Content-Type = %q", ct)
			}
			events := parseSSE(t, raw)
			if events[len(events)-1].data != "[DONE]" {
				t.Fatalf("last event %q, want [DONE]", events[len(events)-1].data)
			}
			var text strings.Builder
			usageChunks := 0
			for i, ev := range events[:len(events)-1] {
				chunk := decode(t, ev.data)
				if chunk["object"] != "chat.completion.chunk" {
					t.Errorf("chunk %d object %v", i, chunk["object"])
				}
				usage, hasUsage := chunk["usage"]
				if hasUsage != includeUsage {
					t.Errorf("chunk %d has usage field %v, want %v", i, hasUsage, includeUsage)
				}
				choices := chunk["choices"].([]any)
				if len(choices) == 0 {
					usageChunks++
					u := usage.(map[string]any)
					if u["prompt_tokens"] != float64(wantIn) || u["completion_tokens"] != float64(len(ReplyDeltas)) {
						t.Errorf("usage chunk %v", u)
					}
					continue
				}
				if hasUsage && usage != nil {
					t.Errorf("chunk %d with choices has usage %v, want null", i, usage)
				}
				delta := choices[0].(map[string]any)["delta"].(map[string]any)
				if s, ok := delta["content"].(string); ok {
					text.WriteString(s)
				}
			}
			if text.String() != ReplyText(len(ReplyDeltas)) {
				t.Errorf("streamed text %q", text.String())
			}
			wantUsageChunks := 0
			if includeUsage {
				wantUsageChunks = 1
			}
			if usageChunks != wantUsageChunks {
				t.Errorf("%d usage-only chunks, want %d", usageChunks, wantUsageChunks)
			}
		})
	}

	t.Run("max_tokens", func(t *testing.T) {
		_, body := do(t, newRequest(t, "POST", srv.URL+"/v1/chat/completions", prompt+`,"max_tokens":1}`, auth))
		m := decode(t, body)
		choice := m["choices"].([]any)[0].(map[string]any)
		if choice["finish_reason"] != "length" || choice["message"].(map[string]any)["content"] != ReplyDeltas[0] {
			t.Errorf("choice = %v", choice)
		}
	})
}

func TestOpenAIResponses(t *testing.T) {
	srv := NewOpenAI(openAIKey)
	defer srv.Close()
	auth := map[string]string{"Authorization": "Bearer " + openAIKey}
	wantIn := BaseInputTokens + 2

	_, body := do(t, newRequest(t, "POST", srv.URL+"/v1/responses", `{"model":"gpt-4.1","input":"hi there"}`, auth))
	m := decode(t, body)
	if m["object"] != "response" || m["status"] != "completed" || !strings.HasPrefix(m["id"].(string), "resp_") {
		t.Errorf("response = %s", body)
	}
	text := m["output"].([]any)[0].(map[string]any)["content"].([]any)[0].(map[string]any)["text"]
	if text != ReplyText(len(ReplyDeltas)) {
		t.Errorf("output text %v", text)
	}
	if u := m["usage"].(map[string]any); u["input_tokens"] != float64(wantIn) || u["output_tokens"] != float64(len(ReplyDeltas)) {
		t.Errorf("usage %v", u)
	}

	_, raw := do(t, newRequest(t, "POST", srv.URL+"/v1/responses", `{"model":"gpt-4.1","input":"hi there","stream":true}`, auth))
	events := parseSSE(t, raw)
	var names []string
	var streamed strings.Builder
	for i, ev := range events {
		d := decode(t, ev.data)
		if d["type"] != ev.name {
			t.Errorf("event %d named %q has type %v", i, ev.name, d["type"])
		}
		if d["sequence_number"] != float64(i) {
			t.Errorf("event %d sequence_number %v", i, d["sequence_number"])
		}
		if ev.name == "response.output_text.delta" {
			streamed.WriteString(d["delta"].(string))
		}
		if len(names) == 0 || names[len(names)-1] != ev.name {
			names = append(names, ev.name)
		}
	}
	want := []string{
		"response.created", "response.in_progress", "response.output_item.added",
		"response.content_part.added", "response.output_text.delta", "response.output_text.done",
		"response.content_part.done", "response.output_item.done", "response.completed",
	}
	if !slices.Equal(names, want) {
		t.Errorf("events %v, want %v", names, want)
	}
	if streamed.String() != ReplyText(len(ReplyDeltas)) {
		t.Errorf("streamed %q", streamed.String())
	}
	last := decode(t, events[len(events)-1].data)["response"].(map[string]any)["usage"].(map[string]any)
	if last["input_tokens"] != float64(wantIn) || last["output_tokens"] != float64(len(ReplyDeltas)) {
		t.Errorf("completed usage %v", last)
	}
}

func TestOpenAIEmbeddings(t *testing.T) {
	srv := NewOpenAI(openAIKey)
	defer srv.Close()
	auth := map[string]string{"Authorization": "Bearer " + openAIKey}

	_, body := do(t, newRequest(t, "POST", srv.URL+"/v1/embeddings", `{"model":"text-embedding-3-small","input":["a b","c"],"encoding_format":"base64"}`, auth))
	var out struct {
		Data []struct {
			Index     int
			Embedding string
		}
		Usage struct {
			PromptTokens int `json:"prompt_tokens"`
		}
	}
	if err := json.Unmarshal([]byte(body), &out); err != nil {
		t.Fatalf("decode %s: %v", body, err)
	}
	if len(out.Data) != 2 {
		t.Fatalf("%d embeddings, want 2", len(out.Data))
	}
	for i, d := range out.Data {
		raw, err := base64.StdEncoding.DecodeString(d.Embedding)
		if err != nil {
			t.Fatalf("embedding %d: %v", i, err)
		}
		want := EmbeddingVector(i, EmbeddingDimensions)
		for j := range want {
			got := math.Float32frombits(binary.LittleEndian.Uint32(raw[4*j:]))
			if got != want[j] {
				t.Errorf("embedding %d[%d] = %v, want %v", i, j, got, want[j])
			}
		}
	}
	if out.Usage.PromptTokens != BaseInputTokens+3 {
		t.Errorf("prompt_tokens = %d", out.Usage.PromptTokens)
	}

	_, body = do(t, newRequest(t, "POST", srv.URL+"/v1/embeddings", `{"model":"m","input":"x","dimensions":3}`, auth))
	vec := decode(t, body)["data"].([]any)[0].(map[string]any)["embedding"].([]any)
	if len(vec) != 3 {
		t.Errorf("float embedding of %d values, want 3", len(vec))
	}
}

func TestAnthropicMessages(t *testing.T) {
	srv := NewAnthropic(anthropicKey)
	defer srv.Close()
	hdr := map[string]string{"X-Api-Key": anthropicKey, "Anthropic-Version": "2023-06-01"}
	const req = `{"model":"claude-sonnet-4-5","max_tokens":100,"messages":[{"role":"user","content":"hi"}]`
	wantIn := BaseInputTokens + 1

	resp, body := do(t, newRequest(t, "POST", srv.URL+"/v1/messages", req+"}", hdr))
	if resp.Header.Get("Request-Id") == "" {
		t.Error("no request-id header")
	}
	m := decode(t, body)
	if m["type"] != "message" || m["stop_reason"] != "end_turn" {
		t.Errorf("message = %s", body)
	}
	if text := m["content"].([]any)[0].(map[string]any)["text"]; text != ReplyText(len(ReplyDeltas)) {
		t.Errorf("text %v", text)
	}
	if u := m["usage"].(map[string]any); u["input_tokens"] != float64(wantIn) || u["output_tokens"] != float64(len(ReplyDeltas)) {
		t.Errorf("usage %v", u)
	}

	_, raw := do(t, newRequest(t, "POST", srv.URL+"/v1/messages", req+`,"stream":true}`, hdr))
	events := parseSSE(t, raw)
	var names []string
	var text strings.Builder
	for _, ev := range events {
		d := decode(t, ev.data)
		if d["type"] != ev.name {
			t.Errorf("event %q has type %v", ev.name, d["type"])
		}
		names = append(names, ev.name)
		if ev.name == "content_block_delta" {
			text.WriteString(d["delta"].(map[string]any)["text"].(string))
		}
	}
	want := []string{"message_start", "content_block_start", "ping"}
	for range ReplyDeltas {
		want = append(want, "content_block_delta")
	}
	want = append(want, "content_block_stop", "message_delta", "message_stop")
	if !slices.Equal(names, want) {
		t.Errorf("events %v, want %v", names, want)
	}
	if text.String() != ReplyText(len(ReplyDeltas)) {
		t.Errorf("streamed %q", text.String())
	}
	start := decode(t, events[0].data)["message"].(map[string]any)["usage"].(map[string]any)
	if start["input_tokens"] != float64(wantIn) {
		t.Errorf("message_start usage %v", start)
	}
	delta := decode(t, events[len(events)-2].data)["usage"].(map[string]any)
	if delta["output_tokens"] != float64(len(ReplyDeltas)) {
		t.Errorf("message_delta usage %v", delta)
	}

	_, body = do(t, newRequest(t, "POST", srv.URL+"/v1/messages/count_tokens", `{"model":"m","messages":[{"role":"user","content":"a b c"}]}`, hdr))
	if got := decode(t, body)["input_tokens"]; got != float64(BaseInputTokens+3) {
		t.Errorf("count_tokens = %v", got)
	}

	resp, body = do(t, newRequest(t, "POST", srv.URL+"/v1/messages", `{"model":"m","messages":[]}`, hdr))
	if resp.StatusCode != 400 || !strings.Contains(body, "max_tokens") {
		t.Errorf("without max_tokens: %d %s", resp.StatusCode, body)
	}
}

func TestGoogleGenerate(t *testing.T) {
	srv := NewGoogle(googleKey)
	defer srv.Close()
	hdr := map[string]string{"X-Goog-Api-Key": googleKey}
	const req = `{"contents":[{"role":"user","parts":[{"text":"hello there you"}]}]}`
	wantIn := BaseInputTokens + 3
	base := srv.URL + "/v1beta/models/gemini-2.5-flash"

	_, body := do(t, newRequest(t, "POST", base+":generateContent", req, hdr))
	m := decode(t, body)
	cand := m["candidates"].([]any)[0].(map[string]any)
	if cand["finishReason"] != "STOP" {
		t.Errorf("candidate %v", cand)
	}
	if text := cand["content"].(map[string]any)["parts"].([]any)[0].(map[string]any)["text"]; text != ReplyText(len(ReplyDeltas)) {
		t.Errorf("text %v", text)
	}
	if u := m["usageMetadata"].(map[string]any); u["promptTokenCount"] != float64(wantIn) || u["candidatesTokenCount"] != float64(len(ReplyDeltas)) {
		t.Errorf("usage %v", u)
	}

	collect := func(chunks []map[string]any) string {
		var b strings.Builder
		for _, c := range chunks {
			parts := c["candidates"].([]any)[0].(map[string]any)["content"].(map[string]any)["parts"].([]any)
			b.WriteString(parts[0].(map[string]any)["text"].(string))
		}
		return b.String()
	}

	resp, raw := do(t, newRequest(t, "POST", base+":streamGenerateContent?alt=sse", req, hdr))
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Errorf("SSE Content-Type %q", ct)
	}
	if strings.Count(raw, "\r\n\r\n") != len(ReplyDeltas) {
		t.Errorf("SSE events not separated by CRLF CRLF: %q", raw)
	}
	var chunks []map[string]any
	for _, ev := range parseSSE(t, raw) {
		chunks = append(chunks, decode(t, ev.data))
	}
	if got := collect(chunks); got != ReplyText(len(ReplyDeltas)) {
		t.Errorf("SSE text %q", got)
	}
	lastUsage := chunks[len(chunks)-1]["usageMetadata"].(map[string]any)
	if lastUsage["candidatesTokenCount"] != float64(len(ReplyDeltas)) || lastUsage["promptTokenCount"] != float64(wantIn) {
		t.Errorf("last chunk usage %v", lastUsage)
	}

	_, raw = do(t, newRequest(t, "POST", base+":streamGenerateContent", req, hdr))
	chunks = nil
	if err := json.Unmarshal([]byte(raw), &chunks); err != nil {
		t.Fatalf("JSON array stream %q: %v", raw, err)
	}
	if got := collect(chunks); got != ReplyText(len(ReplyDeltas)) {
		t.Errorf("JSON array text %q", got)
	}

	_, body = do(t, newRequest(t, "POST", base+":countTokens", req, hdr))
	if got := decode(t, body)["totalTokens"]; got != float64(wantIn) {
		t.Errorf("countTokens = %v", got)
	}
	_, body = do(t, newRequest(t, "POST", srv.URL+"/v1beta/models/gemini-embedding-001:embedContent", `{"content":{"parts":[{"text":"x"}]}}`, hdr))
	if vals := decode(t, body)["embedding"].(map[string]any)["values"].([]any); len(vals) != EmbeddingDimensions {
		t.Errorf("embedContent gave %d values", len(vals))
	}
	_, body = do(t, newRequest(t, "POST", srv.URL+"/v1beta/models/gemini-embedding-001:batchEmbedContents", `{"requests":[{"content":{"parts":[{"text":"x"}]}},{"content":{"parts":[{"text":"y"}]}}]}`, hdr))
	if list := decode(t, body)["embeddings"].([]any); len(list) != 2 {
		t.Errorf("batchEmbedContents gave %d embeddings", len(list))
	}
	resp, _ = do(t, newRequest(t, "GET", srv.URL+"/v1beta/models/no-such-model", "", hdr))
	if resp.StatusCode != 404 {
		t.Errorf("unknown model status %d", resp.StatusCode)
	}
	resp, body = do(t, newRequest(t, "GET", srv.URL+"/v1/models/gemini-2.5-pro", "", hdr))
	if resp.StatusCode != 200 || decode(t, body)["name"] != "models/gemini-2.5-pro" {
		t.Errorf("get model: %d %s", resp.StatusCode, body)
	}
	if r := srv.Requests()[1]; !r.Stream || r.Model != "gemini-2.5-flash" || r.Usage.InputTokens != wantIn {
		t.Errorf("recorded stream request %+v", r)
	}
}

// streamRequests are streaming requests of each provider with valid keys.
func streamRequest(t *testing.T, srv *Server) *http.Request {
	t.Helper()
	switch srv.Provider {
	case OpenAI:
		return newRequest(t, "POST", srv.URL+"/v1/chat/completions",
			`{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}`,
			map[string]string{"Authorization": "Bearer " + openAIKey})
	case Anthropic:
		return newRequest(t, "POST", srv.URL+"/v1/messages",
			`{"model":"m","max_tokens":50,"stream":true,"messages":[{"role":"user","content":"hi"}]}`,
			map[string]string{"X-Api-Key": anthropicKey, "Anthropic-Version": "2023-06-01"})
	default:
		return newRequest(t, "POST", srv.URL+"/v1beta/models/m:streamGenerateContent?alt=sse",
			`{"contents":[{"parts":[{"text":"hi"}]}]}`,
			map[string]string{"X-Goog-Api-Key": googleKey})
	}
}

func allServers() []*Server {
	return []*Server{NewOpenAI(openAIKey), NewAnthropic(anthropicKey), NewGoogle(googleKey)}
}

func TestHoldRelease(t *testing.T) {
	for _, srv := range allServers() {
		t.Run(srv.Provider, func(t *testing.T) {
			defer srv.Close()
			srv.Hold()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			resp, err := http.DefaultClient.Do(streamRequest(t, srv).WithContext(ctx))
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			r := bufio.NewReader(resp.Body)
			first, err := r.ReadString('\n')
			if err != nil || !strings.HasPrefix(first, "event: ") && !strings.HasPrefix(first, "data: ") {
				t.Fatalf("first line %q, %v", first, err)
			}

			deadline := time.Now().Add(5 * time.Second)
			for srv.HeldStreams() != 1 && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			if n := srv.HeldStreams(); n != 1 {
				t.Fatalf("HeldStreams = %d, want 1", n)
			}
			srv.Release()
			rest, err := io.ReadAll(r)
			if err != nil {
				t.Fatalf("read after Release: %v", err)
			}
			if !strings.Contains(string(rest), "data: ") {
				t.Errorf("nothing after Release: %q", rest)
			}
			if n := srv.HeldStreams(); n != 0 {
				t.Errorf("HeldStreams after the stream = %d", n)
			}

			// Hold applies to one stream only.
			_, raw := do(t, streamRequest(t, srv))
			if !strings.Contains(raw, ReplyDeltas[len(ReplyDeltas)-1]) {
				t.Errorf("second stream incomplete: %q", raw)
			}
		})
	}
}

func TestFailMidStream(t *testing.T) {
	for _, srv := range allServers() {
		t.Run(srv.Provider, func(t *testing.T) {
			defer srv.Close()
			srv.SetFailMidStream(true)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			resp, err := http.DefaultClient.Do(streamRequest(t, srv).WithContext(ctx))
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err == nil {
				t.Errorf("stream ended cleanly, want an error; body %q", body)
			}
			if !strings.Contains(string(body), ReplyDeltas[0]) {
				t.Errorf("body before the cut %q lacks the first delta", body)
			}
			if strings.Contains(string(body), ReplyDeltas[1]) {
				t.Errorf("body %q goes on after the first delta", body)
			}
		})
	}
}

func TestGzip(t *testing.T) {
	srv := NewAnthropic(anthropicKey)
	defer srv.Close()
	srv.SetGzip(true)
	req := streamRequest(t, srv)
	req.Header.Set("Accept-Encoding", "gzip")
	resp, raw := do(t, req)
	if resp.Header.Get("Content-Encoding") != "gzip" {
		t.Fatalf("Content-Encoding = %q", resp.Header.Get("Content-Encoding"))
	}
	zr, err := gzip.NewReader(strings.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	plain, err := io.ReadAll(zr)
	if err != nil {
		t.Fatalf("gunzip: %v", err)
	}
	if !bytes.Contains(plain, []byte("event: message_stop")) {
		t.Errorf("gunzipped stream %q", plain)
	}

	req = streamRequest(t, srv)
	req.Header.Set("Accept-Encoding", "identity")
	resp, raw = do(t, req)
	if resp.Header.Get("Content-Encoding") != "" || !strings.Contains(raw, "message_stop") {
		t.Errorf("without gzip accepted: encoding %q body %q", resp.Header.Get("Content-Encoding"), raw)
	}
}

func TestTLS(t *testing.T) {
	srv := NewGoogleTLS(googleKey)
	defer srv.Close()
	if !strings.HasPrefix(srv.URL, "https://127.0.0.1:") {
		t.Errorf("URL = %s", srv.URL)
	}
	if !bytes.HasPrefix(srv.CertPEM(), []byte("-----BEGIN CERTIFICATE-----")) {
		t.Errorf("CertPEM = %q", srv.CertPEM())
	}
	req := newRequest(t, "GET", srv.URL+"/v1beta/models", "", map[string]string{"X-Goog-Api-Key": googleKey})
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("status %d", resp.StatusCode)
	}
	if plain := NewOpenAI(); plain.CertPEM() != nil {
		t.Error("plain HTTP server has a certificate")
		plain.Close()
	} else {
		plain.Close()
	}
}

func TestSetKeys(t *testing.T) {
	srv := NewOpenAI("sk-old")
	defer srv.Close()
	srv.SetKeys("sk-new-1", "sk-new-2")
	for key, want := range map[string]int{"sk-old": 401, "sk-new-1": 200, "sk-new-2": 200} {
		resp, _ := do(t, newRequest(t, "GET", srv.URL+"/v1/models", "", map[string]string{"Authorization": "Bearer " + key}))
		if resp.StatusCode != want {
			t.Errorf("key %s: status %d, want %d", key, resp.StatusCode, want)
		}
	}
}
