package usage

import (
	"bytes"
	"compress/flate"
	"compress/zlib"
	"errors"
	"runtime"
	"strings"
	"testing"
	"time"
)

var decoderInput = []byte(strings.Repeat(`{"usage":{"prompt_tokens":12,"completion_tokens":34}}`+"\n", 200))

func zlibBytes(t testing.TB, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zlib.NewWriter(&buf)
	zw.Write(data)
	if err := zw.Close(); err != nil {
		t.Fatalf("zlib: %v", err)
	}
	return buf.Bytes()
}

func flateBytes(t testing.TB, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	fw, err := flate.NewWriter(&buf, flate.DefaultCompression)
	if err != nil {
		t.Fatalf("flate: %v", err)
	}
	fw.Write(data)
	if err := fw.Close(); err != nil {
		t.Fatalf("flate: %v", err)
	}
	return buf.Bytes()
}

// decode writes body to a new decoder in chunks of the given size and
// returns what reached the underlying writer. It reports failures with
// t.Errorf, so it may run on another goroutine.
func decode(t testing.TB, encoding string, body []byte, chunk int) []byte {
	t.Helper()
	var out bytes.Buffer
	dec := NewDecoder(encoding, &out)
	for len(body) > 0 {
		n := min(chunk, len(body))
		if k, err := dec.Write(body[:n]); k != n || err != nil {
			t.Errorf("Write returned %d, %v; want %d, nil", k, err, n)
		}
		body = body[n:]
	}
	if err := dec.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	return out.Bytes()
}

func TestDecoderEncodings(t *testing.T) {
	gz := gzipBytes(t, decoderInput)
	tests := []struct {
		encoding string
		body     []byte
		want     []byte
	}{
		{"gzip", gz, decoderInput},
		{" GZIP ", gz, decoderInput},
		{"x-gzip", gz, decoderInput},
		{"gzip", append(gzipBytes(t, []byte("first ")), gzipBytes(t, []byte("second"))...), []byte("first second")},
		{"deflate", zlibBytes(t, decoderInput), decoderInput},
		{"deflate", flateBytes(t, decoderInput), decoderInput},
		{"", decoderInput, decoderInput},
		{"identity", decoderInput, decoderInput},
		{"br", gz, nil},
		{"zstd", gz, nil},
		{"gzip", []byte("this is not gzip data at all"), nil},
		{"deflate", []byte{0xff}, nil},
	}
	for _, tt := range tests {
		for _, chunk := range []int{1, 13, 1 << 20} {
			if got := decode(t, tt.encoding, tt.body, chunk); !bytes.Equal(got, tt.want) {
				t.Errorf("%q in chunks of %d: got %d bytes, want %d", tt.encoding, chunk, len(got), len(tt.want))
			}
		}
	}
}

func TestDecoderCorruptMidStream(t *testing.T) {
	gz := gzipBytes(t, decoderInput)
	corrupt := append([]byte(nil), gz...)
	for i := len(corrupt) / 2; i < len(corrupt); i++ {
		corrupt[i] ^= 0x5a
	}
	// DEFLATE data has no checksum before the gzip trailer, so a corrupt
	// stream may decode to wrong bytes before the error shows. What matters
	// is that writing it neither fails nor hangs.
	if got := decode(t, "gzip", corrupt, 16); bytes.Equal(got, decoderInput) {
		t.Errorf("corrupt stream decoded to the original input")
	}
}

// waitForGoroutines waits up to 5s for the goroutine count to drop to want.
func waitForGoroutines(t *testing.T, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > want {
		if time.Now().After(deadline) {
			t.Fatalf("goroutines: got %d, want at most %d", runtime.NumGoroutine(), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestDecoderCutStreamNoLeak(t *testing.T) {
	before := runtime.NumGoroutine()
	gz := gzipBytes(t, decoderInput)
	for i := range 50 {
		tap := NewTap("openai", "application/json")
		dec := NewDecoder("gzip", tap)
		dec.Write(gz[:len(gz)*i/50])
		if err := dec.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
	}
	// A decoder that was never written to starts no goroutine, so leaving it
	// unclosed leaks nothing.
	NewDecoder("gzip", &bytes.Buffer{})
	waitForGoroutines(t, before)
}

// TestDecoderDataAfterEnd checks that bytes after the end of a zlib stream do
// not block Write, although nothing reads them.
func TestDecoderDataAfterEnd(t *testing.T) {
	before := runtime.NumGoroutine()
	body := append(zlibBytes(t, decoderInput), bytes.Repeat([]byte("trailing"), 10000)...)
	done := make(chan []byte, 1)
	go func() { done <- decode(t, "deflate", body, 100) }()
	select {
	case got := <-done:
		if !bytes.Equal(got, decoderInput) {
			t.Errorf("got %d bytes, want %d", len(got), len(decoderInput))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Write blocked on data after the end of the stream")
	}
	waitForGoroutines(t, before)
}

// failingWriter accepts limit bytes and then fails.
type failingWriter struct {
	limit int
	got   int
	calls int
}

func (w *failingWriter) Write(p []byte) (int, error) {
	w.calls++
	if w.got+len(p) > w.limit {
		return 0, errors.New("writer full")
	}
	w.got += len(p)
	return len(p), nil
}

func TestDecoderWriterError(t *testing.T) {
	for _, encoding := range []string{"gzip", "identity"} {
		body := decoderInput
		if encoding == "gzip" {
			body = gzipBytes(t, decoderInput)
		}
		w := &failingWriter{limit: 10}
		dec := NewDecoder(encoding, w)
		for range 3 {
			if n, err := dec.Write(body); n != len(body) || err != nil {
				t.Errorf("%s: Write returned %d, %v; want %d, nil", encoding, n, err, len(body))
			}
		}
		dec.Close()
		if w.calls != 1 {
			t.Errorf("%s: writer called %d times after failing, want 1 call in all", encoding, w.calls)
		}
	}
}

func TestDecoderWriteAfterClose(t *testing.T) {
	var out bytes.Buffer
	dec := NewDecoder("gzip", &out)
	gz := gzipBytes(t, []byte("hello"))
	dec.Close()
	if n, err := dec.Write(gz); n != len(gz) || err != nil {
		t.Errorf("Write after Close returned %d, %v", n, err)
	}
	if err := dec.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if out.Len() != 0 {
		t.Errorf("got %q after Close, want nothing", out.Bytes())
	}
}
