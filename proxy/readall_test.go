package proxy

import (
	"bytes"
	"errors"
	"io"
	"runtime"
	"testing"
	"testing/iotest"
)

func TestReadAllSizes(t *testing.T) {
	for _, size := range []int{1, 100, firstBodyBuffer - 1, firstBodyBuffer, firstBodyBuffer + 1, 3*firstBodyBuffer + 7, 1<<20 + 3} {
		want := bytes.Repeat([]byte("0123456789abcdef"), size/16+1)[:size]
		readers := map[string]io.Reader{
			"whole":    bytes.NewReader(want),
			"half":     iotest.HalfReader(bytes.NewReader(want)),
			"data EOF": iotest.DataErrReader(bytes.NewReader(want)),
		}
		for name, r := range readers {
			got, err := readAll(r, int64(size), 8<<20)
			if err != nil {
				t.Errorf("%d bytes, %s: %v", size, name, err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%d bytes, %s: read %d bytes that differ", size, name, len(got))
			}
		}
	}
}

func TestReadAllShortBody(t *testing.T) {
	_, err := readAll(bytes.NewReader(make([]byte, 100)), 200, 1<<20)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("body shorter than Content-Length: error %v, want io.ErrUnexpectedEOF", err)
	}
}

// TestReadAllDeclaredNotSent checks that a body declared at 64 MiB of which
// one byte arrives before the connection fails costs little memory.
func TestReadAllDeclaredNotSent(t *testing.T) {
	failed := errors.New("connection reset")
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range 10 {
		r := io.MultiReader(bytes.NewReader([]byte("{")), iotest.ErrReader(failed))
		if _, err := readAll(r, 64<<20, 64<<20); !errors.Is(err, failed) {
			t.Fatalf("error %v, want the reader's", err)
		}
	}
	runtime.ReadMemStats(&after)
	if grown := after.TotalAlloc - before.TotalAlloc; grown > 4<<20 {
		t.Errorf("10 bodies declared at 64 MiB, 1 byte sent: %d bytes allocated, want at most 4 MiB", grown)
	}
}
