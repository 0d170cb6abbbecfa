package usage

import (
	"bytes"
	"io"
	"testing"
	"time"
)

// decoderCase is one Content-Encoding the fuzz target feeds to NewDecoder,
// with the encoder that produces a valid body for it.
type decoderCase struct {
	encoding string
	encode   func(testing.TB, []byte) []byte
}

var decoderCases = []decoderCase{
	{"gzip", gzipBytes},
	{"x-gzip", gzipBytes},
	{"deflate", zlibBytes},
	{"deflate", flateBytes},
	{"identity", func(_ testing.TB, b []byte) []byte { return b }},
	{"br", func(_ testing.TB, b []byte) []byte { return b }},
}

// decodeTimeout bounds one decoder run, so a decoder that hangs fails the
// fuzz input instead of stalling the fuzzer.
const decodeTimeout = 10 * time.Second

// feedDecoder writes body to a decoder in two parts split at k, then closes
// it, and returns what reached the writer behind it. Write must accept every
// byte and leave the caller's buffer unchanged, because the proxy sends that
// same buffer to the client.
func feedDecoder(t *testing.T, encoding string, body []byte, k int, sink *bytes.Buffer, tap *Tap) {
	t.Helper()
	done := make(chan string, 1)
	go func() {
		var w io.Writer = sink
		if tap != nil {
			w = &teeWriter{a: sink, b: tap}
		}
		dec := NewDecoder(encoding, w)
		for _, part := range [][]byte{body[:k], body[k:]} {
			before := bytes.Clone(part)
			n, err := dec.Write(part)
			if n != len(part) || err != nil {
				done <- "Write returned a short count or an error"
				return
			}
			if !bytes.Equal(part, before) {
				done <- "Write changed the caller's buffer"
				return
			}
		}
		if err := dec.Close(); err != nil {
			done <- "Close returned an error"
			return
		}
		done <- ""
	}()
	select {
	case msg := <-done:
		if msg != "" {
			t.Fatalf("%s decoder: %s", encoding, msg)
		}
	case <-time.After(decodeTimeout):
		t.Fatalf("%s decoder did not finish within %v", encoding, decodeTimeout)
	}
}

// teeWriter writes to a and b. Neither fails in these tests.
type teeWriter struct{ a, b io.Writer }

func (w *teeWriter) Write(p []byte) (int, error) {
	w.a.Write(p)
	return w.b.Write(p)
}

// FuzzDecoder checks the Content-Encoding path in front of the usage tap. A
// valid body decodes to exactly its plaintext whatever the split, and the tap
// behind it counts what a tap on the plaintext counts. A cut body decodes to
// a prefix of its plaintext. Arbitrary bytes never panic or hang the decoder,
// and an encoding it cannot read delivers nothing, so it counts no usage.
func FuzzDecoder(f *testing.F) {
	for i, fx := range fixtures {
		f.Add(uint8(i), uint8(i), true, readFixture(f, fx.file), uint16(31), uint16(200))
	}
	f.Add(uint8(0), uint8(0), false, []byte("\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"), uint16(4), uint16(0))
	f.Add(uint8(2), uint8(1), false, []byte("\x78\x9c\x03\x00"), uint16(1), uint16(0))
	f.Add(uint8(3), uint8(2), false, []byte("not compressed at all"), uint16(7), uint16(0))
	f.Add(uint8(5), uint8(1), true, []byte(`{"usage":{"prompt_tokens":5}}`), uint16(3), uint16(9))

	f.Fuzz(func(t *testing.T, caseIndex, tapIndex uint8, valid bool, data []byte, split, cut uint16) {
		dc := decoderCases[int(caseIndex)%len(decoderCases)]
		fx := fixtures[int(tapIndex)%len(fixtures)]

		body := data
		if valid {
			body = dc.encode(t, data)
		}
		k := 0
		if len(body) > 0 {
			k = int(split) % (len(body) + 1)
		}

		var got bytes.Buffer
		tap := NewTap(fx.provider, fx.contentType)
		feedDecoder(t, dc.encoding, body, k, &got, tap)
		if tap.panicked != "" {
			t.Fatalf("Tap panicked: %s", tap.panicked)
		}

		switch {
		case dc.encoding == "br":
			if got.Len() != 0 || tap.Counts() != (Counts{}) {
				t.Fatalf("unknown encoding delivered %d bytes and counts %+v", got.Len(), tap.Counts())
			}
		case valid:
			if !bytes.Equal(got.Bytes(), data) {
				t.Fatalf("%s: decoded %d bytes that differ from the %d-byte plaintext", dc.encoding, got.Len(), len(data))
			}
			if want := runTap(t, fx.provider, fx.contentType, data); tap.Counts() != want {
				t.Fatalf("%s: counts %+v behind the decoder, %+v on the plaintext", dc.encoding, tap.Counts(), want)
			}
		case dc.encoding == "identity":
			if !bytes.Equal(got.Bytes(), data) {
				t.Fatal("identity encoding changed the body")
			}
		}

		// A body cut short, as when the upstream connection drops, yields a
		// prefix of the plaintext and nothing else.
		if valid && len(body) > 0 && dc.encoding != "br" {
			n := int(cut) % len(body)
			var partial bytes.Buffer
			feedDecoder(t, dc.encoding, body[:n], n/2, &partial, nil)
			if !bytes.HasPrefix(data, partial.Bytes()) {
				t.Fatalf("%s cut at %d of %d bytes: decoded bytes are not a prefix of the plaintext", dc.encoding, n, len(body))
			}
		}
	})
}
