package usage

import (
	"bytes"
	"compress/gzip"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const (
	sseType  = "text/event-stream"
	jsonType = "application/json; charset=utf-8"
)

// fixture is a recorded-shape response body with the counts it reports.
type fixture struct {
	file        string
	provider    string
	contentType string
	want        Counts
}

var fixtures = []fixture{
	{"openai_chat_stream.sse", "openai", sseType,
		Counts{InputTokens: 412, OutputTokens: 23, Model: "gpt-4.1-mini-2025-04-14", Seen: true, Final: true}},
	{"openai_chat_stream_nousage.sse", "openai", sseType,
		Counts{Model: "gpt-4.1-mini-2025-04-14"}},
	{"openai_chat.json", "openai", "application/json",
		Counts{InputTokens: 75, OutputTokens: 1186, Model: "o4-mini-2025-04-16", Seen: true, Final: true}},
	{"openai_responses_stream.sse", "openai", "text/event-stream; charset=utf-8",
		Counts{InputTokens: 37, OutputTokens: 11, Model: "gpt-4.1-2025-04-14", Seen: true, Final: true}},
	{"openai_responses.json", "openai", jsonType,
		Counts{InputTokens: 1530, OutputTokens: 342, Model: "o3-2025-04-16", Seen: true, Final: true}},
	{"openai_embeddings.json", "openai", "application/json",
		Counts{InputTokens: 16, Model: "text-embedding-3-small", Seen: true, Final: true}},
	{"anthropic_messages_stream.sse", "anthropic", sseType,
		Counts{InputTokens: 18 + 2051 + 4096, OutputTokens: 219, Model: "claude-sonnet-4-5-20250929", Seen: true, Final: true}},
	{"anthropic_messages_stream_old.sse", "anthropic", sseType,
		Counts{InputTokens: 25, OutputTokens: 15, Model: "claude-3-5-haiku-20241022", Seen: true, Final: true}},
	{"anthropic_messages.json", "anthropic", "application/json",
		Counts{InputTokens: 2095 + 1800, OutputTokens: 503, Model: "claude-opus-4-1-20250805", Seen: true, Final: true}},
	{"anthropic_count_tokens.json", "anthropic", "application/json", Counts{}},
	{"google_stream.sse", "google", sseType,
		Counts{InputTokens: 11, OutputTokens: 16 + 121, Model: "gemini-2.5-flash", Seen: true}},
	{"google_stream_array.json", "google", jsonType,
		Counts{InputTokens: 11, OutputTokens: 16 + 121, Model: "gemini-2.5-pro", Seen: true}},
	{"google_generate.json", "google", jsonType,
		Counts{InputTokens: 5310 + 64, OutputTokens: 42 + 64, Model: "gemini-2.5-pro", Seen: true}},
	{"google_embed.json", "google", jsonType, Counts{}},
	{"google_count_tokens.json", "google", jsonType, Counts{}},
	{"google_openai_compat.json", "google", "application/json",
		Counts{InputTokens: 6, OutputTokens: 3, Model: "gemini-2.5-flash", Seen: true, Final: true}},
}

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatalf("read fixture: %v", err)
	}
	return data
}

// runTap writes each chunk to a new Tap and returns its counts. It fails the
// test if the Tap recovered from a panic.
func runTap(t testing.TB, provider, contentType string, chunks ...[]byte) Counts {
	t.Helper()
	tap := NewTap(provider, contentType)
	for _, chunk := range chunks {
		n, err := tap.Write(chunk)
		if n != len(chunk) || err != nil {
			t.Fatalf("Write returned %d, %v; want %d, nil", n, err, len(chunk))
		}
	}
	if tap.panicked != "" {
		t.Fatalf("Tap panicked: %s", tap.panicked)
	}
	return tap.Counts()
}

func oneBytePerChunk(data []byte) [][]byte {
	chunks := make([][]byte, len(data))
	for i := range data {
		chunks[i] = data[i : i+1]
	}
	return chunks
}

func randomChunks(data []byte, rng *rand.Rand) [][]byte {
	var chunks [][]byte
	for len(data) > 0 {
		n := min(1+rng.IntN(64), len(data))
		chunks = append(chunks, data[:n])
		data = data[n:]
	}
	return chunks
}

func gzipBytes(t testing.TB, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(data); err != nil {
		t.Fatalf("gzip: %v", err)
	}
	if err := zw.Close(); err != nil {
		t.Fatalf("gzip: %v", err)
	}
	return buf.Bytes()
}

func TestTapFixtures(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, fx := range fixtures {
		t.Run(fx.file, func(t *testing.T) {
			data := readFixture(t, fx.file)
			if got := runTap(t, fx.provider, fx.contentType, data); got != fx.want {
				t.Errorf("whole body: got %+v, want %+v", got, fx.want)
			}
			if got := runTap(t, fx.provider, fx.contentType, oneBytePerChunk(data)...); got != fx.want {
				t.Errorf("one byte per write: got %+v, want %+v", got, fx.want)
			}
			for range 5 {
				if got := runTap(t, fx.provider, fx.contentType, randomChunks(data, rng)...); got != fx.want {
					t.Errorf("random chunks: got %+v, want %+v", got, fx.want)
				}
			}
		})
	}
}

func TestTapFixturesGzip(t *testing.T) {
	for _, fx := range fixtures {
		t.Run(fx.file, func(t *testing.T) {
			compressed := gzipBytes(t, readFixture(t, fx.file))
			tap := NewTap(fx.provider, fx.contentType)
			dec := NewDecoder("gzip", tap)
			// Small writes make the decoder's goroutine wait for input mid-stream.
			for len(compressed) > 0 {
				n := min(7, len(compressed))
				if k, err := dec.Write(compressed[:n]); k != n || err != nil {
					t.Fatalf("decoder Write returned %d, %v", k, err)
				}
				compressed = compressed[n:]
			}
			if err := dec.Close(); err != nil {
				t.Fatalf("decoder Close: %v", err)
			}
			if got := tap.Counts(); got != fx.want {
				t.Errorf("got %+v, want %+v", got, fx.want)
			}
		})
	}
}

// TestTapSplitAtEveryByte writes each body in two parts, split at every
// position, so every parser state meets a write boundary.
func TestTapSplitAtEveryByte(t *testing.T) {
	for _, fx := range fixtures {
		data := readFixture(t, fx.file)
		for k := range len(data) + 1 {
			if got := runTap(t, fx.provider, fx.contentType, data[:k], data[k:]); got != fx.want {
				t.Fatalf("%s split at %d: got %+v, want %+v", fx.file, k, got, fx.want)
			}
		}
	}
}

func TestTapSSELineEndings(t *testing.T) {
	endings := map[string]string{"crlf": "\r\n", "cr": "\r"}
	for _, fx := range fixtures {
		if !strings.HasPrefix(fx.contentType, sseType) {
			continue
		}
		data := strings.ReplaceAll(string(readFixture(t, fx.file)), "\r\n", "\n")
		for name, ending := range endings {
			converted := []byte(strings.ReplaceAll(data, "\n", ending))
			if got := runTap(t, fx.provider, fx.contentType, converted); got != fx.want {
				t.Errorf("%s with %s: got %+v, want %+v", fx.file, name, got, fx.want)
			}
			if got := runTap(t, fx.provider, fx.contentType, oneBytePerChunk(converted)...); got != fx.want {
				t.Errorf("%s with %s, one byte per write: got %+v, want %+v", fx.file, name, got, fx.want)
			}
		}
	}
}

func TestTapSSECases(t *testing.T) {
	tests := []struct {
		name     string
		provider string
		body     string
		want     Counts
	}{
		{
			name:     "data split over lines",
			provider: "openai",
			body:     "data: {\"model\":\"m\",\ndata: \"choices\":[],\ndata:\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n",
			want:     Counts{InputTokens: 3, OutputTokens: 4, Model: "m", Seen: true, Final: true},
		},
		{
			name:     "comments and unknown fields",
			provider: "openai",
			body:     ": keep-alive\nid: 7\nretry: 1000\nevent: message\ndata: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n",
			want:     Counts{InputTokens: 1, OutputTokens: 2, Seen: true, Final: true},
		},
		{
			name:     "event without blank line at end",
			provider: "openai",
			body:     "data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n",
			want:     Counts{},
		},
		{
			name:     "invalid event skipped",
			provider: "openai",
			body: "data: {\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":9}\n\n" +
				"data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}} x\n\n" +
				"data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6}}\n\n" +
				"data: [DONE]\n\n",
			want: Counts{InputTokens: 5, OutputTokens: 6, Seen: true, Final: true},
		},
		{
			name:     "usage null",
			provider: "openai",
			body:     "data: {\"model\":\"gpt\",\"choices\":[],\"usage\":null}\n\n",
			want:     Counts{Model: "gpt"},
		},
		{
			name:     "responses incomplete",
			provider: "openai",
			body: "event: response.incomplete\ndata: {\"type\":\"response.incomplete\",\"response\":{\"model\":\"gpt-5\"," +
				"\"status\":\"incomplete\",\"usage\":{\"input_tokens\":10,\"output_tokens\":64,\"output_tokens_details\":{\"reasoning_tokens\":64}}}}\n\n",
			want: Counts{InputTokens: 10, OutputTokens: 64, Model: "gpt-5", Seen: true, Final: true},
		},
		{
			name:     "anthropic delta keeps non-zero input",
			provider: "anthropic",
			body: "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude\",\"usage\":{\"input_tokens\":100,\"cache_read_input_tokens\":50,\"output_tokens\":1}}}\n\n" +
				"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":0,\"cache_read_input_tokens\":null,\"output_tokens\":40}}\n\n",
			want: Counts{InputTokens: 150, OutputTokens: 40, Model: "claude", Seen: true, Final: true},
		},
		{
			// message_start reports the input and one output token; only
			// message_delta completes the usage.
			name:     "anthropic start alone is not final",
			provider: "anthropic",
			body: "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude\",\"usage\":{\"input_tokens\":100,\"output_tokens\":1}}}\n\n" +
				"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
			want: Counts{InputTokens: 100, OutputTokens: 1, Model: "claude", Seen: true},
		},
		{
			name:     "anthropic error event",
			provider: "anthropic",
			body:     "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
			want:     Counts{},
		},
		{
			name:     "openai fields ignored for anthropic",
			provider: "anthropic",
			body:     "data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6}}\n\n",
			want:     Counts{},
		},
		{
			name:     "escaped model and key",
			provider: "openai",
			body:     "data: {\"model\":\"gpt\\u002d4o\\/mini\",\"\\u0075sage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\n",
			want:     Counts{InputTokens: 2, OutputTokens: 1, Model: "gpt-4o/mini", Seen: true, Final: true},
		},
		{
			name:     "non-integer counts ignored",
			provider: "openai",
			body:     "data: {\"usage\":{\"prompt_tokens\":2.5,\"completion_tokens\":-1}}\n\n",
			want:     Counts{Seen: false},
		},
		{
			name:     "count overflow ignored",
			provider: "google",
			body:     "data: {\"usageMetadata\":{\"promptTokenCount\":99999999999999999999,\"candidatesTokenCount\":7}}\n\n",
			want:     Counts{OutputTokens: 7, Seen: true},
		},
		{
			name:     "model too long ignored",
			provider: "openai",
			body:     "data: {\"model\":\"" + strings.Repeat("m", maxCapture+1) + "\",\"usage\":{\"prompt_tokens\":1}}\n\n",
			want:     Counts{InputTokens: 1, Seen: true, Final: true},
		},
		{
			name:     "top-level array is not a record",
			provider: "google",
			body:     "data: [{\"usageMetadata\":{\"promptTokenCount\":3}}]\n\n",
			want:     Counts{},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body := []byte(tt.body)
			if got := runTap(t, tt.provider, sseType, body); got != tt.want {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
			if got := runTap(t, tt.provider, sseType, oneBytePerChunk(body)...); got != tt.want {
				t.Errorf("one byte per write: got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestTapJSONCases(t *testing.T) {
	tests := []struct {
		name     string
		provider string
		body     string
		want     Counts
	}{
		{
			name:     "cut body",
			provider: "openai",
			body:     `{"model":"gpt","usage":{"prompt_tokens":5,"completion_tokens":6}`,
			want:     Counts{},
		},
		{
			name:     "garbage after record keeps count",
			provider: "openai",
			body:     `{"model":"gpt","usage":{"prompt_tokens":5,"completion_tokens":6}} {"usage":{"prompt_tokens":7}}`,
			want:     Counts{InputTokens: 5, OutputTokens: 6, Model: "gpt", Seen: true, Final: true},
		},
		{
			name:     "array cut after first element",
			provider: "google",
			body:     `[{"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":1},"modelVersion":"g"},{"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":9}`,
			want:     Counts{InputTokens: 4, OutputTokens: 1, Model: "g", Seen: true},
		},
		{
			name:     "malformed array element stops counting",
			provider: "google",
			body:     `[{"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":1}},{"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":9,}}]`,
			want:     Counts{InputTokens: 4, OutputTokens: 1, Seen: true},
		},
		{
			name:     "nested arrays skipped",
			provider: "google",
			body:     `[[{"usageMetadata":{"promptTokenCount":4}}]]`,
			want:     Counts{},
		},
		{
			name:     "error body",
			provider: "anthropic",
			body:     `{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"}}`,
			want:     Counts{},
		},
		{
			name:     "html body",
			provider: "google",
			body:     "<html><body>502 Bad Gateway</body></html>",
			want:     Counts{},
		},
		{
			name:     "empty usage object is seen",
			provider: "openai",
			body:     `{"usage":{"prompt_tokens":0}}`,
			want:     Counts{Seen: true, Final: true},
		},
		{
			name:     "leading zero is invalid",
			provider: "openai",
			body:     `{"usage":{"prompt_tokens":012}}`,
			want:     Counts{},
		},
		{
			name:     "raw control character is invalid",
			provider: "openai",
			body:     "{\"model\":\"a\tb\",\"usage\":{\"prompt_tokens\":1}}",
			want:     Counts{},
		},
		{
			name:     "unknown provider",
			provider: "mistral",
			body:     `{"usage":{"prompt_tokens":5,"completion_tokens":6}}`,
			want:     Counts{},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body := []byte(tt.body)
			if got := runTap(t, tt.provider, "application/json", body); got != tt.want {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
			if got := runTap(t, tt.provider, "application/json", oneBytePerChunk(body)...); got != tt.want {
				t.Errorf("one byte per write: got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestTapGarbage(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	inputs := [][]byte{
		nil,
		[]byte("\x00\x01\x02\xff\xfe"),
		[]byte(strings.Repeat("[", 10*maxDepth)),
		[]byte(strings.Repeat(`{"usage":`, 10*maxDepth)),
		[]byte("data: " + strings.Repeat("{\"a\":", 10*maxDepth) + "\n\n"),
		[]byte("\n\n\n\r\r\r::::data\ndata\n\n"),
		[]byte(`{"usage":{"prompt_tokens":"12","completion_tokens":true}}`),
	}
	for range 20 {
		junk := make([]byte, 1+rng.IntN(4096))
		for i := range junk {
			junk[i] = byte(rng.Uint32())
		}
		inputs = append(inputs, junk)
	}
	for _, provider := range []string{"anthropic", "openai", "google"} {
		for _, contentType := range []string{sseType, jsonType} {
			for i, input := range inputs {
				got := runTap(t, provider, contentType, input)
				if got.Seen || got.InputTokens != 0 || got.OutputTokens != 0 {
					t.Errorf("%s %s input %d: got %+v, want nothing seen", provider, contentType, i, got)
				}
			}
		}
	}
}

// TestTapLargeBodyNoAllocs feeds a Gemini batch embedding body of over 16
// MiB and checks that parsing it allocates nothing, so memory stays bounded
// whatever the body size.
func TestTapLargeBodyNoAllocs(t *testing.T) {
	var body bytes.Buffer
	body.WriteString(`{"embeddings":[`)
	for i := range 12000 {
		if i > 0 {
			body.WriteByte(',')
		}
		body.WriteString(`{"values":[`)
		for j := range 100 {
			if j > 0 {
				body.WriteByte(',')
			}
			body.WriteString("-0.0123456789")
		}
		body.WriteString(`],"note":"usageMetadata \"promptTokenCount\": 5"}`)
	}
	body.WriteString(`]}`)
	data := body.Bytes()

	tap := NewTap("google", "application/json")
	const chunk = 64 << 10
	offset := 0
	allocs := testing.AllocsPerRun(len(data)/chunk, func() {
		end := min(offset+chunk, len(data))
		tap.Write(data[offset:end])
		offset = end
	})
	tap.Write(data[offset:])
	if allocs != 0 {
		t.Errorf("allocations per 64 KiB write: got %v, want 0", allocs)
	}
	if tap.stopped {
		t.Errorf("valid body stopped the tap")
	}
	if got := tap.Counts(); got != (Counts{}) {
		t.Errorf("got %+v, want nothing seen", got)
	}
}

func TestTapCountsWhileWriting(t *testing.T) {
	data := readFixture(t, "anthropic_messages_stream.sse")
	tap := NewTap("anthropic", sseType)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range data {
			tap.Write(data[i : i+1])
		}
	}()
	for range 100 {
		tap.Counts()
	}
	<-done
	if got := tap.Counts(); got.OutputTokens != 219 {
		t.Errorf("output tokens: got %d, want 219", got.OutputTokens)
	}
}

// TestTapContentTypes checks which Content-Type values make a Tap read
// server-sent events: the media type alone decides, in any case and with
// any parameters, valid or not.
func TestTapContentTypes(t *testing.T) {
	const event = "data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n"
	for contentType, sse := range map[string]bool{
		"text/event-stream":                     true,
		"Text/Event-Stream":                     true,
		" text/event-stream ; charset=utf-8":    true,
		"text/event-stream;":                    true,
		"text/event-stream; charset=\"utf-8":    true,
		"text/event-stream; =broken":            true,
		"text/event-streams":                    false,
		"text/event-\u017ftream":                false,
		"text/event":                            false,
		"application/json":                      false,
		"":                                      false,
		"text/event-stream\x00":                 false,
		"application/json; x=text/event-stream": false,
	} {
		tap := NewTap("openai", contentType)
		tap.Write([]byte(event))
		if got := tap.Counts().InputTokens == 3; got != sse {
			t.Errorf("Content-Type %q: read as events = %v, want %v", contentType, got, sse)
		}
	}
}

// Anthropic bills every sampling step of a request that compacts its
// context, and lists the steps in usage.iterations, while the top-level
// counts leave the compaction steps out.
func TestTapAnthropicIterations(t *testing.T) {
	compaction := `"iterations":[{"type":"compaction","input_tokens":180000,"output_tokens":3500},` +
		`{"type":"message","input_tokens":23000,"output_tokens":1000}]`
	cases := []struct {
		name        string
		contentType string
		body        string
		in, out     int64
	}{
		{"json body", "application/json",
			`{"id":"msg_1","type":"message","model":"claude-opus-4-6","content":[],` +
				`"usage":{"input_tokens":23000,"output_tokens":1000,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,` + compaction + `}}`,
			203000, 4500},
		{"stream", sseType,
			"event: message_start\ndata: " +
				`{"type":"message_start","message":{"id":"msg_1","model":"claude-opus-4-6","content":[],"usage":{"input_tokens":23000,"output_tokens":1}}}` + "\n\n" +
				"event: message_delta\ndata: " +
				`{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"input_tokens":23000,"output_tokens":1000,` + compaction + `}}` + "\n\n" +
				"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
			203000, 4500},
		{"zero top-level counts", "application/json",
			`{"type":"message","usage":{"input_tokens":0,"output_tokens":0,"iterations":[{"type":"compaction","input_tokens":150000,"output_tokens":4000}]}}`,
			150000, 4000},
		{"cache counts in iterations", "application/json",
			`{"type":"message","usage":{"input_tokens":10,"cache_read_input_tokens":500,"output_tokens":20,"iterations":[` +
				`{"type":"compaction","input_tokens":100,"cache_creation_input_tokens":7,"cache_read_input_tokens":900,"output_tokens":30},` +
				`{"type":"message","input_tokens":10,"cache_read_input_tokens":500,"output_tokens":20}]}}`,
			1517, 50},
		{"iterations below the top level", "application/json",
			`{"type":"message","usage":{"input_tokens":400,"output_tokens":90,"iterations":[{"type":"message","input_tokens":300,"output_tokens":80}]}}`,
			400, 90},
		{"iterations not an array", "application/json",
			`{"type":"message","usage":{"input_tokens":400,"output_tokens":90,"iterations":{"input_tokens":9000,"output_tokens":9000}}}`,
			400, 90},
		{"counts near the int64 limit", "application/json",
			`{"type":"message","usage":{"input_tokens":1,"output_tokens":1,"iterations":[` +
				`{"input_tokens":9223372036854775000,"output_tokens":1},{"input_tokens":9223372036854775000,"output_tokens":1}]}}`,
			math.MaxInt64, 2},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, split := range []bool{false, true} {
				chunks := [][]byte{[]byte(c.body)}
				if split {
					chunks = oneBytePerChunk([]byte(c.body))
				}
				got := runTap(t, "anthropic", c.contentType, chunks...)
				if got.InputTokens != c.in {
					t.Errorf("split %v: input tokens %d, want %d", split, got.InputTokens, c.in)
				}
				if got.OutputTokens != c.out {
					t.Errorf("split %v: output tokens %d, want %d", split, got.OutputTokens, c.out)
				}
				if !got.Final {
					t.Errorf("split %v: counts not final", split)
				}
			}
		})
	}
}

func TestCountsTotal(t *testing.T) {
	cases := []struct {
		in, out, want int64
	}{
		{3, 4, 7},
		{0, 0, 0},
		{math.MaxInt64, 1, math.MaxInt64},
		{math.MaxInt64 - 1, math.MaxInt64 - 1, math.MaxInt64},
		{-5, 4, 4},
	}
	for _, c := range cases {
		if got := (Counts{InputTokens: c.in, OutputTokens: c.out}).Total(); got != c.want {
			t.Errorf("Total of %d and %d = %d, want %d", c.in, c.out, got, c.want)
		}
	}
}
