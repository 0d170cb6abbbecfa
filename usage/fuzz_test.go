package usage

import (
	"bytes"
	"encoding/json"
	"io"
	"testing"
	"testing/iotest"
)

var fuzzProviders = []string{"anthropic", "openai", "google"}

// FuzzTap checks that no input panics the Tap, that counts do not depend on
// how the body is split into writes, and that a JSON body is accepted exactly
// when encoding/json finds it valid.
func FuzzTap(f *testing.F) {
	for _, fx := range fixtures {
		provider := uint8(0)
		for i, name := range fuzzProviders {
			if name == fx.provider {
				provider = uint8(i)
			}
		}
		sse := fx.contentType != jsonType && fx.contentType != "application/json"
		f.Add(provider, sse, readFixture(f, fx.file), uint16(17))
	}
	f.Add(uint8(1), true, []byte("data: {\"usage\":{\"prompt_tokens\":1}}\r\r"), uint16(3))
	f.Add(uint8(2), false, []byte(`[{"usageMetadata":{"promptTokenCount":1e5}}]`), uint16(9))
	f.Add(uint8(0), false, []byte(`{"model":"\ud83d\ude00","usage":{"input_tokens":-0}}`), uint16(20))

	f.Fuzz(func(t *testing.T, providerIndex uint8, sse bool, data []byte, split uint16) {
		provider := fuzzProviders[int(providerIndex)%len(fuzzProviders)]
		contentType := "application/json"
		if sse {
			contentType = sseType
		}
		k := 0
		if len(data) > 0 {
			k = int(split) % (len(data) + 1)
		}

		whole := NewTap(provider, contentType)
		whole.Write(data)
		if whole.panicked != "" {
			t.Fatalf("Tap panicked: %s", whole.panicked)
		}
		want := whole.Counts()
		if want.InputTokens < 0 || want.OutputTokens < 0 {
			t.Fatalf("negative counts: %+v", want)
		}
		if got := runTap(t, provider, contentType, data[:k], data[k:]); got != want {
			t.Fatalf("split at %d: got %+v, whole body gave %+v", k, got, want)
		}
		if got := runTap(t, provider, contentType, oneBytePerChunk(data)...); got != want {
			t.Fatalf("one byte per write: got %+v, whole body gave %+v", got, want)
		}

		// Inputs nested deeper than maxDepth are rejected on purpose.
		if !sse && bytes.Count(data, []byte("["))+bytes.Count(data, []byte("{")) < maxDepth {
			accepted := !whole.stopped && whole.scan.complete()
			if valid := json.Valid(data); accepted != valid {
				t.Fatalf("scanner accepted=%v, json.Valid=%v", accepted, valid)
			}
		}
	})
}

// referenceFilter removes usage-only chunks from a whole body at once. It
// shares only isUsageOnlyChunk with the streaming filter.
func referenceFilter(data []byte) []byte {
	var out []byte
	start, lineStart := 0, 0
	for i := 0; i < len(data); {
		c := data[i]
		if c != '\n' && c != '\r' {
			i++
			continue
		}
		end := i + 1
		if c == '\r' && end < len(data) && data[end] == '\n' {
			end++
		}
		if i == lineStart {
			event := data[start:end]
			if !isUsageOnlyChunk(event) {
				out = append(out, event...)
			}
			start = end
		}
		i = end
		lineStart = end
	}
	return append(out, data[start:]...)
}

// FuzzUsageChunkFilter checks the streaming filter against referenceFilter
// for any split of the body, and that a body without a usage key passes
// unchanged.
func FuzzUsageChunkFilter(f *testing.F) {
	for _, name := range []string{"openai_chat_stream.sse", "openai_chat_stream_nousage.sse", "anthropic_messages_stream.sse", "google_stream.sse"} {
		f.Add(readFixture(f, name), uint16(100))
	}
	f.Add([]byte(usageChunk+"\r\n\r\ndata: [DONE]\r\n\r\n"), uint16(len(usageChunk)+3))
	f.Add([]byte(usageChunk+"\r\r\n"), uint16(len(usageChunk)+1))
	f.Add([]byte("data: {\"choices\":[],\ndata:\"usage\":{}}\n\n"), uint16(5))
	f.Add([]byte(":\n\n\r\n\r\r"), uint16(2))

	f.Fuzz(func(t *testing.T, data []byte, split uint16) {
		k := 0
		if len(data) > 0 {
			k = int(split) % (len(data) + 1)
		}
		want := referenceFilter(data)
		if !bytes.Contains(data, []byte(`"usage"`)) && !bytes.Equal(want, data) {
			t.Fatalf("reference changed a body without a usage key")
		}
		readers := map[string]io.Reader{
			"whole":    bytes.NewReader(data),
			"split":    &splitReader{parts: [][]byte{data[:k], data[k:]}},
			"one byte": iotest.OneByteReader(bytes.NewReader(data)),
		}
		for name, r := range readers {
			if got := readAllFiltered(t, r); !bytes.Equal(got, want) {
				t.Fatalf("%s reader: got %q, want %q", name, got, want)
			}
		}
	})
}
