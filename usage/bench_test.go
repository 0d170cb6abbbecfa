package usage

import (
	"bytes"
	"io"
	"strings"
	"testing"
)

// benchEvents are typical SSE events: a content delta, which is most of a
// stream, and the event that carries the usage.
var benchEvents = []struct {
	provider string
	kind     string
	event    string
}{
	{"openai", "delta", `data: {"id":"chatcmpl-C1fQm8ZrT4xWvY2kLhN7pEoa9dXbu","object":"chat.completion.chunk","created":1754312117,"model":"gpt-4.1-mini-2025-04-14","service_tier":"default","system_fingerprint":"fp_6f2eabb9a5","choices":[{"index":0,"delta":{"content":" the quick brown fox"},"logprobs":null,"finish_reason":null}],"usage":null}` + "\n\n"},
	{"openai", "usage", `data: {"id":"chatcmpl-C1fQm8ZrT4xWvY2kLhN7pEoa9dXbu","object":"chat.completion.chunk","created":1754312117,"model":"gpt-4.1-mini-2025-04-14","service_tier":"default","system_fingerprint":"fp_6f2eabb9a5","choices":[],"usage":{"prompt_tokens":412,"completion_tokens":23,"total_tokens":435,"prompt_tokens_details":{"cached_tokens":384,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}` + "\n\n"},
	{"anthropic", "delta", "event: content_block_delta\n" + `data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":" the quick brown fox"}}` + "\n\n"},
	{"anthropic", "usage", "event: message_delta\n" + `data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":18,"cache_creation_input_tokens":2051,"cache_read_input_tokens":4096,"output_tokens":219}}` + "\n\n"},
	{"google", "delta", `data: {"candidates": [{"content": {"parts": [{"text": " the quick brown fox"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 11,"candidatesTokenCount": 8,"totalTokenCount": 140,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 11}],"thoughtsTokenCount": 121},"modelVersion": "gemini-2.5-flash","responseId": "Xo2RaNbAJ8WVz7IPq4Hk2Ak"}` + "\r\n\r\n"},
}

// BenchmarkTapSSEEvent measures one Write of one complete SSE event.
func BenchmarkTapSSEEvent(b *testing.B) {
	for _, be := range benchEvents {
		b.Run(be.provider+"/"+be.kind, func(b *testing.B) {
			event := []byte(be.event)
			tap := NewTap(be.provider, sseType)
			b.ReportAllocs()
			b.SetBytes(int64(len(event)))
			for b.Loop() {
				tap.Write(event)
			}
			if tap.panicked != "" || tap.stopped {
				b.Fatalf("tap stopped: %q", tap.panicked)
			}
		})
	}
}

// BenchmarkTapJSONBody measures a whole non-streaming response body.
func BenchmarkTapJSONBody(b *testing.B) {
	for _, name := range []string{"openai_responses.json", "anthropic_messages.json", "google_generate.json"} {
		provider, _, _ := strings.Cut(name, "_")
		b.Run(provider, func(b *testing.B) {
			body := readFixture(b, name)
			b.ReportAllocs()
			b.SetBytes(int64(len(body)))
			for b.Loop() {
				NewTap(provider, "application/json").Write(body)
			}
		})
	}
}

// BenchmarkUsageChunkFilter measures filtering a chat stream of 1000 delta
// chunks and one usage chunk.
func BenchmarkUsageChunkFilter(b *testing.B) {
	var stream bytes.Buffer
	for range 1000 {
		stream.WriteString(benchEvents[0].event)
	}
	stream.WriteString(benchEvents[1].event)
	stream.WriteString("data: [DONE]\n\n")
	data := stream.Bytes()
	buf := make([]byte, 32<<10)
	b.ReportAllocs()
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		filter := NewUsageChunkFilter(io.NopCloser(bytes.NewReader(data)))
		for {
			if _, err := filter.Read(buf); err != nil {
				break
			}
		}
	}
}
