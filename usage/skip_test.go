package usage

import (
	"bytes"
	"slices"
	"testing"
)

// tapView contains everything a Tap reports.
type tapView struct {
	counts     Counts
	responseID string
	containers []string
	reasoning  []string
}

func viewOf(t testing.TB, tap *Tap) tapView {
	t.Helper()
	if tap.panicked != "" {
		t.Fatalf("Tap panicked: %s", tap.panicked)
	}
	return tapView{tap.Counts(), tap.ResponseID(), tap.Containers(0), tap.ReasoningItems(0)}
}

func (v tapView) equal(w tapView) bool {
	return v.counts == w.counts && v.responseID == w.responseID &&
		slices.Equal(v.containers, w.containers) && slices.Equal(v.reasoning, w.reasoning)
}

const openaiDelta = `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}` + "\n\n"

func TestSkipNeutralEvent(t *testing.T) {
	tests := []struct {
		name     string
		provider string
		model    string // the model the Tap has read before
		event    string
		skip     bool
	}{
		{"openai delta, model known", "openai", "gpt-4o", openaiDelta, true},
		{"openai delta, model not read yet", "openai", "", openaiDelta, false},
		{"openai delta, another model", "openai", "gpt-4o-mini", openaiDelta, false},
		{"model that is a prefix of the known one", "openai", "gpt-4o-2024",
			`data: {"model":"gpt-4o"}` + "\n\n", false},
		{"known model that is a prefix of the event's", "openai", "gpt",
			`data: {"model":"gpt-4o"}` + "\n\n", false},
		{"empty model, none known", "openai", "", `data: {"model":""}` + "\n\n", true},
		{"usage object", "openai", "gpt-4o",
			`data: {"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":1}}` + "\n\n", false},
		{"usage null after a space", "openai", "gpt-4o",
			`data: {"model":"gpt-4o","usage": null}` + "\n\n", false},
		{"usage as a string value", "openai", "", `data: {"text":"usage"}` + "\n\n", false},
		{"key that begins with usage", "openai", "", `data: {"usage_x":null}` + "\n\n", false},
		{"escaped key", "openai", "", `data: {"\u0075sage":{"prompt_tokens":1}}` + "\n\n", false},
		{"response id", "openai", "", `data: {"id":"resp_1"}` + "\n\n", false},
		{"reasoning id", "openai", "", `data: {"item":{"id":"rs_1"}}` + "\n\n", false},
		{"container", "anthropic", "", `data: {"delta":{"container":{"id":"c"}}}` + "\n\n", false},
		{"anthropic text delta", "anthropic", "",
			"event: content_block_delta\n" + `data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}` + "\n\n", true},
		{"anthropic ping", "anthropic", "", "event: ping\ndata: {\"type\": \"ping\"}\n\n", true},
		{"comment only", "anthropic", "", ": keep-alive\n\n", true},
		{"gemini model version, known", "google", "gemini-2.5-flash",
			`data: {"candidates":[],"modelVersion":"gemini-2.5-flash"}` + "\n\n", true},
		{"gemini model version, another", "google", "gemini-2.5-pro",
			`data: {"candidates":[],"modelVersion":"gemini-2.5-flash"}` + "\n\n", false},
		{"key that begins with model", "openai", "gpt-4o", `data: {"modelX":"gpt-4o"}` + "\n\n", false},
		{"known model with a quote", "openai", `a"b`, `data: {"x":1}` + "\n\n", true},
		{"known model with a quote, model key", "openai", `a"b`, `data: {"model":"a\"b"}` + "\n\n", false},
		{"two data lines", "openai", "", "data: {\"a\":\ndata: 1}\n\n", false},
		{"data line without a colon", "openai", "", "data\n\n", false},
		{"CRLF line ends", "openai", "gpt-4o", "data: {\"x\":1}\r\n\r\n", false},
		{"event not ended", "openai", "gpt-4o", "data: {\"x\":1}\n", false},
		{"blank line first", "openai", "gpt-4o", "\ndata: {\"x\":1}\n\n", false},
		{"invalid JSON without keys", "openai", "", "data: {{{\n\n", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tap := NewTap(tt.provider, sseType)
			tap.tally.model = tt.model
			n := tap.skipNeutralEvent([]byte(tt.event))
			if got := n > 0; got != tt.skip {
				t.Fatalf("skipped %d bytes, want skip=%v", n, tt.skip)
			}
			if n > 0 && n != len(tt.event) {
				t.Fatalf("skipped %d bytes, want the whole event of %d", n, len(tt.event))
			}
		})
	}
}

// TestSkipKeepsCounts runs each stream fixture through a Tap in one write,
// where whole events may be skipped, and one byte per write, where none is.
func TestSkipKeepsCounts(t *testing.T) {
	for _, fx := range fixtures {
		if fx.contentType == jsonType || fx.contentType == "application/json" {
			continue
		}
		t.Run(fx.file, func(t *testing.T) {
			data := readFixture(t, fx.file)
			whole := NewTap(fx.provider, fx.contentType)
			whole.Write(data)
			bytewise := NewTap(fx.provider, fx.contentType)
			for _, c := range oneBytePerChunk(data) {
				bytewise.Write(c)
			}
			if got, want := viewOf(t, whole), viewOf(t, bytewise); !got.equal(want) {
				t.Fatalf("one write: %+v\none byte per write: %+v", got, want)
			}
			if got := whole.Counts(); got != fx.want {
				t.Fatalf("counts %+v, want %+v", got, fx.want)
			}
		})
	}
}

// FuzzSkipNeutralEvent checks that skipping events changes nothing the Tap
// reports: a body written whole, where events are skipped, must give what
// it gives one byte per write, where no event is ever whole in one write.
func FuzzSkipNeutralEvent(f *testing.F) {
	f.Add(uint8(1), []byte(openaiDelta+openaiDelta))
	f.Add(uint8(1), []byte(`data: {"model":"a"}`+"\n\n"+`data: {"model":"b","usage":null}`+"\n\n"))
	f.Add(uint8(1), []byte(`data: {"model":"a"}`+"\n\n"+`data: {"item":{"id":"rs_1"},"model":"a"}`+"\n\n"))
	f.Add(uint8(1), []byte(`data: {"model":"a"}`+"\n\n"+`data: {"response":{"id":"\u0072esp_1"}}`+"\n\n"))
	f.Add(uint8(0), []byte("event: message_start\n"+`data: {"message":{"model":"c","usage":{"input_tokens":3}}}`+"\n\n"+
		`data: {"delta":{"container":{"id":"x"}}}`+"\n\n: c\n\n"))
	f.Add(uint8(2), []byte(`data: {"modelVersion":"g","usageMetadata":{"promptTokenCount":2}}`+"\n\n"+
		`data: {"modelVersion":"g","usageMetadata":null}`+"\n\n"))
	for _, fx := range fixtures {
		if fx.contentType != jsonType && fx.contentType != "application/json" {
			for i, name := range fuzzProviders {
				if name == fx.provider {
					f.Add(uint8(i), readFixture(f, fx.file))
				}
			}
		}
	}
	f.Fuzz(func(t *testing.T, providerIndex uint8, data []byte) {
		provider := fuzzProviders[int(providerIndex)%len(fuzzProviders)]
		whole := NewTap(provider, sseType)
		whole.Write(data)
		bytewise := NewTap(provider, sseType)
		for _, c := range oneBytePerChunk(data) {
			bytewise.Write(c)
		}
		if got, want := viewOf(t, whole), viewOf(t, bytewise); !got.equal(want) {
			t.Fatalf("one write: %+v\none byte per write: %+v", got, want)
		}
	})
}

// neutralEachQuote is neutral without the eight-byte filter: it looks at
// every quote.
func neutralEachQuote(data []byte, model string) bool {
	if bytes.Contains(data, unicodeEscape) {
		return false
	}
	for i := 0; i+1 < len(data); i++ {
		if data[i] == '"' && !neutralAt(data[i+1:], model) {
			return false
		}
	}
	return true
}

// FuzzNeutral checks that the eight-byte filter of neutral passes over no
// quote that matters, wherever it falls within or across words.
func FuzzNeutral(f *testing.F) {
	f.Add(`{"id":"chatcmpl-1","model":"gpt-4o","usage":null}`, "gpt-4o")
	f.Add(`{"x":1,"usage":{"prompt_tokens":1}}`, "")
	f.Add(`1234567"usage"`, "")
	f.Add(`12345678"u`, "")
	f.Add(`"rs_1"`, "")
	f.Add(`{"a":"b","c":"container"}`, "")
	f.Add(`{"modelVersion":"g","x":"resp_2"}`, "g")
	f.Fuzz(func(t *testing.T, data, model string) {
		tap := NewTap("openai", sseType)
		tap.tally.model = model
		got, want := tap.neutral([]byte(data)), neutralEachQuote([]byte(data), model)
		if got != want {
			t.Fatalf("neutral(%q) with model %q = %v, looking at every quote gives %v", data, model, got, want)
		}
	})
}
