package usage

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

const usageChunk = `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1754312117,"model":"gpt-4.1-mini","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}`

// readAllFiltered runs body through the filter and returns everything read.
func readAllFiltered(t testing.TB, body io.Reader) []byte {
	t.Helper()
	out, err := io.ReadAll(NewUsageChunkFilter(io.NopCloser(body)))
	if err != nil {
		t.Fatalf("read filtered body: %v", err)
	}
	return out
}

// splitReader returns its data in the given parts, one per Read.
type splitReader struct {
	parts [][]byte
}

func (r *splitReader) Read(p []byte) (int, error) {
	for len(r.parts) > 0 && len(r.parts[0]) == 0 {
		r.parts = r.parts[1:]
	}
	if len(r.parts) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.parts[0])
	r.parts[0] = r.parts[0][n:]
	return n, nil
}

// withoutUsageEvent returns the fixture's stream and the same stream with
// its one usage-only event removed.
func withoutUsageEvent(t testing.TB, ending string) (input, want []byte) {
	t.Helper()
	text := strings.ReplaceAll(string(readFixture(t, "openai_chat_stream.sse")), "\n", ending)
	events := strings.SplitAfter(text, ending+ending)
	var kept []string
	removed := 0
	for _, event := range events {
		if strings.Contains(event, `"choices":[],"usage":{`) {
			removed++
			continue
		}
		kept = append(kept, event)
	}
	if removed != 1 {
		t.Fatalf("fixture has %d usage-only events, want 1", removed)
	}
	return []byte(text), []byte(strings.Join(kept, ""))
}

var lineEndings = []struct {
	name   string
	ending string
}{
	{"lf", "\n"},
	{"crlf", "\r\n"},
	{"cr", "\r"},
}

func TestFilterRemovesUsageChunk(t *testing.T) {
	for _, le := range lineEndings {
		t.Run(le.name, func(t *testing.T) {
			input, want := withoutUsageEvent(t, le.ending)
			readers := map[string]io.Reader{
				"whole":    bytes.NewReader(input),
				"one byte": iotest.OneByteReader(bytes.NewReader(input)),
				"half":     iotest.HalfReader(bytes.NewReader(input)),
				"data+EOF": iotest.DataErrReader(bytes.NewReader(input)),
			}
			for name, r := range readers {
				if got := readAllFiltered(t, r); !bytes.Equal(got, want) {
					t.Errorf("%s reader: got\n%q\nwant\n%q", name, got, want)
				}
			}
		})
	}
}

// TestFilterSplitAtEveryByte delivers the stream in two reads, split at every
// position, including inside "\r\n" pairs.
func TestFilterSplitAtEveryByte(t *testing.T) {
	for _, le := range lineEndings {
		input, want := withoutUsageEvent(t, le.ending)
		for k := range len(input) + 1 {
			r := &splitReader{parts: [][]byte{input[:k], input[k:]}}
			if got := readAllFiltered(t, r); !bytes.Equal(got, want) {
				t.Fatalf("%s split at %d: got\n%q\nwant\n%q", le.name, k, got, want)
			}
		}
	}
}

func TestFilterSmallCallerBuffer(t *testing.T) {
	input, want := withoutUsageEvent(t, "\n")
	filter := NewUsageChunkFilter(io.NopCloser(bytes.NewReader(input)))
	got, err := io.ReadAll(iotest.OneByteReader(filter))
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("got\n%q\nwant\n%q", got, want)
	}
}

func TestFilterCases(t *testing.T) {
	tests := []struct {
		name  string
		input string
		want  string
	}{
		{
			name:  "no usage chunk",
			input: string(readFixture(t, "openai_chat_stream_nousage.sse")),
			want:  string(readFixture(t, "openai_chat_stream_nousage.sse")),
		},
		{
			name:  "anthropic stream unchanged",
			input: string(readFixture(t, "anthropic_messages_stream.sse")),
			want:  string(readFixture(t, "anthropic_messages_stream.sse")),
		},
		{
			name:  "usage null kept",
			input: "data: {\"choices\":[],\"usage\":null}\n\ndata: [DONE]\n\n",
			want:  "data: {\"choices\":[],\"usage\":null}\n\ndata: [DONE]\n\n",
		},
		{
			name:  "usage with choices kept",
			input: "data: {\"choices\":[{\"index\":0,\"delta\":{}}],\"usage\":{\"prompt_tokens\":1}}\n\n",
			want:  "data: {\"choices\":[{\"index\":0,\"delta\":{}}],\"usage\":{\"prompt_tokens\":1}}\n\n",
		},
		{
			name:  "choices missing kept",
			input: "data: {\"usage\":{\"prompt_tokens\":1}}\n\n",
			want:  "data: {\"usage\":{\"prompt_tokens\":1}}\n\n",
		},
		{
			name:  "choices null kept",
			input: "data: {\"choices\":null,\"usage\":{\"prompt_tokens\":1}}\n\n",
			want:  "data: {\"choices\":null,\"usage\":{\"prompt_tokens\":1}}\n\n",
		},
		{
			name:  "empty choices inside a string kept",
			input: "data: {\"choices\":[{\"delta\":{\"content\":\"\\\"choices\\\":[]\"}}],\"usage\":{\"prompt_tokens\":1}}\n\n",
			want:  "data: {\"choices\":[{\"delta\":{\"content\":\"\\\"choices\\\":[]\"}}],\"usage\":{\"prompt_tokens\":1}}\n\n",
		},
		{
			name:  "invalid JSON kept",
			input: "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}\n\n",
			want:  "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}\n\n",
		},
		{
			name:  "whitespace variants dropped",
			input: ": ping\n\ndata:{ \"choices\" : [ \t ] , \"usage\" : {\"prompt_tokens\":1} }\n\ndata: [DONE]\n\n",
			want:  ": ping\n\ndata: [DONE]\n\n",
		},
		{
			name:  "multi-line data dropped",
			input: "data: {\"choices\":\ndata: [],\ndata: \"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\n",
			want:  "data: [DONE]\n\n",
		},
		{
			name:  "extra blank lines kept",
			input: "\n\n" + usageChunk + "\n\n\n\ndata: [DONE]\n\n\n",
			want:  "\n\n\n\ndata: [DONE]\n\n\n",
		},
		{
			name:  "incomplete usage chunk at end kept",
			input: "data: [DONE]\n\n" + usageChunk + "\n",
			want:  "data: [DONE]\n\n" + usageChunk + "\n",
		},
		{
			name:  "empty body",
			input: "",
			want:  "",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := readAllFiltered(t, strings.NewReader(tt.input)); string(got) != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
			oneByte := iotest.OneByteReader(strings.NewReader(tt.input))
			if got := readAllFiltered(t, oneByte); string(got) != tt.want {
				t.Errorf("one byte per read: got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestFilterLongEventPassesThrough(t *testing.T) {
	long := "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1},\"pad\":\"" +
		strings.Repeat("x", maxHeldEvent+10) + "\"}\n\n"
	input := long + usageChunk + "\n\ndata: [DONE]\n\n"
	want := long + "data: [DONE]\n\n"
	if got := readAllFiltered(t, strings.NewReader(input)); string(got) != want {
		t.Errorf("got %d bytes, want %d bytes", len(got), len(want))
	}
}

// TestFilterEmitsCompleteEvents checks that a complete event is returned
// while the next event is still incomplete and the body has nothing more.
func TestFilterEmitsCompleteEvents(t *testing.T) {
	pr, pw := io.Pipe()
	defer pr.Close()
	filter := NewUsageChunkFilter(pr)

	type result struct {
		data []byte
		err  error
	}
	read := func() result {
		ch := make(chan result, 1)
		go func() {
			buf := make([]byte, 64<<10)
			n, err := filter.Read(buf)
			ch <- result{buf[:n], err}
		}()
		select {
		case r := <-ch:
			return r
		case <-time.After(5 * time.Second):
			t.Fatal("Read did not return a complete event within 5s")
			return result{}
		}
	}
	write := func(s string) {
		go func() {
			if _, err := pw.Write([]byte(s)); err != nil {
				t.Errorf("pipe write: %v", err)
			}
		}()
	}

	first := "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"
	write(first + "data: {\"choices\":[],")
	if r := read(); string(r.data) != first || r.err != nil {
		t.Fatalf("first Read: got %q, %v; want %q, nil", r.data, r.err, first)
	}

	// The rest of the usage chunk completes it, so it is dropped, and the
	// [DONE] event that follows is returned at once.
	write("\"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\n")
	if r := read(); string(r.data) != "data: [DONE]\n\n" || r.err != nil {
		t.Fatalf("second Read: got %q, %v; want [DONE] event", r.data, r.err)
	}

	go pw.Close()
	if r := read(); len(r.data) != 0 || r.err != io.EOF {
		t.Fatalf("last Read: got %q, %v; want EOF", r.data, r.err)
	}
}

func TestFilterBodyError(t *testing.T) {
	errCut := errors.New("connection reset")
	input := "data: {\"choices\":[{}]}\n\ndata: {\"choi"
	body := io.MultiReader(strings.NewReader(input), iotest.ErrReader(errCut))
	filter := NewUsageChunkFilter(io.NopCloser(body))
	got, err := io.ReadAll(filter)
	if !errors.Is(err, errCut) {
		t.Errorf("error: got %v, want %v", err, errCut)
	}
	if string(got) != input {
		t.Errorf("got %q, want %q", got, input)
	}
}

// emptyReader returns 0, nil for ever.
type emptyReader struct{}

func (emptyReader) Read([]byte) (int, error) { return 0, nil }

func TestFilterNoProgress(t *testing.T) {
	_, err := NewUsageChunkFilter(io.NopCloser(emptyReader{})).Read(make([]byte, 10))
	if !errors.Is(err, io.ErrNoProgress) {
		t.Errorf("error: got %v, want %v", err, io.ErrNoProgress)
	}
}

type closeRecorder struct {
	io.Reader
	closed int
}

func (c *closeRecorder) Close() error {
	c.closed++
	return nil
}

func TestFilterCloseClosesBody(t *testing.T) {
	body := &closeRecorder{Reader: strings.NewReader("data: [DONE]\n\n")}
	filter := NewUsageChunkFilter(body)
	if err := filter.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if body.closed != 1 {
		t.Errorf("body closed %d times, want 1", body.closed)
	}
}
