package usage

import (
	"bufio"
	"compress/flate"
	"compress/gzip"
	"compress/zlib"
	"errors"
	"io"
	"strings"
)

// errDecoderDone stops the decoder's writer side once decoding has ended.
var errDecoderDone = errors.New("usage: decoder finished")

// NewDecoder returns a writer that decodes the Content-Encoding "gzip",
// "x-gzip" or "deflate" and writes the decoded bytes to w. With "" or
// "identity" the bytes pass through unchanged. Close finishes it and does not
// close w. An unknown encoding, corrupt data or an error from w makes it stop
// writing to w silently, and Write still returns len(p), nil.
//
// Compressed encodings are decoded by one goroutine, started on the first
// Write, which Close ends even when the stream was cut mid-way. Write blocks
// while that goroutine decodes p and writes it to w, so w must not block.
// Memory is bounded by the decompressor's window and buffers.
func NewDecoder(encoding string, w io.Writer) io.WriteCloser {
	switch strings.ToLower(strings.TrimSpace(encoding)) {
	case "", "identity":
		return &identityWriter{w: w}
	case "gzip", "x-gzip":
		return &decoder{w: w, open: openGzip}
	case "deflate":
		return &decoder{w: w, open: openDeflate}
	default:
		return discardCloser{}
	}
}

// identityWriter passes bytes to w until w fails once.
type identityWriter struct {
	w      io.Writer
	failed bool
}

func (d *identityWriter) Write(p []byte) (int, error) {
	if !d.failed {
		if _, err := d.w.Write(p); err != nil {
			d.failed = true
		}
	}
	return len(p), nil
}

func (d *identityWriter) Close() error { return nil }

// discardCloser accepts and drops everything.
type discardCloser struct{}

func (discardCloser) Write(p []byte) (int, error) { return len(p), nil }
func (discardCloser) Close() error                { return nil }

// ErrUnsupportedEncoding is returned by NewReader for a Content-Encoding it
// cannot decode.
var ErrUnsupportedEncoding = errors.New("unsupported Content-Encoding")

// NewReader returns a reader of r's bytes decoded from the Content-Encoding
// encoding: "" or "identity", "gzip", "x-gzip" or "deflate". Any other
// value, such as "br" or a list of codings, returns ErrUnsupportedEncoding.
func NewReader(encoding string, r io.Reader) (io.Reader, error) {
	switch strings.ToLower(strings.TrimSpace(encoding)) {
	case "", "identity":
		return r, nil
	case "gzip", "x-gzip":
		return openGzip(r)
	case "deflate":
		return openDeflate(r)
	}
	return nil, ErrUnsupportedEncoding
}

func openGzip(r io.Reader) (io.Reader, error) {
	return gzip.NewReader(r)
}

// openDeflate accepts both forms that servers send for "deflate": the zlib
// format that RFC 9110 names, and raw DEFLATE data without the zlib header.
func openDeflate(r io.Reader) (io.Reader, error) {
	br := bufio.NewReader(r)
	header, err := br.Peek(2)
	if err != nil {
		return nil, err
	}
	// A zlib header has compression method 8 in the low nibble of its first
	// byte and is a multiple of 31 when read as a big-endian uint16.
	if header[0]&0x0f == 8 && (uint16(header[0])<<8|uint16(header[1]))%31 == 0 {
		return zlib.NewReader(br)
	}
	return flate.NewReader(br), nil
}

// decoder feeds compressed bytes through an io.Pipe to a goroutine that runs
// a pull-based decompressor, because compress/gzip and compress/flate cannot
// resume after running out of input.
type decoder struct {
	w    io.Writer
	open func(io.Reader) (io.Reader, error)

	pw      *io.PipeWriter
	done    chan struct{}
	stopped bool // the goroutine has ended or was never needed
	closed  bool
}

func (d *decoder) Write(p []byte) (int, error) {
	if d.closed || d.stopped || len(p) == 0 {
		return len(p), nil
	}
	if d.pw == nil {
		pr, pw := io.Pipe()
		d.pw = pw
		d.done = make(chan struct{})
		go d.run(pr)
	}
	if _, err := d.pw.Write(p); err != nil {
		d.stopped = true
	}
	return len(p), nil
}

// run decodes everything written to the pipe until the input ends or fails.
// Closing pr with an error afterwards makes every later pipe write return at
// once instead of waiting for a reader that is gone.
func (d *decoder) run(pr *io.PipeReader) {
	defer close(d.done)
	r, err := d.open(pr)
	if err == nil {
		_, err = io.Copy(d.w, r)
	}
	if err == nil {
		err = errDecoderDone
	}
	pr.CloseWithError(err)
}

// Close ends the input and waits for the goroutine to finish. It always
// returns nil.
func (d *decoder) Close() error {
	if d.closed {
		return nil
	}
	d.closed = true
	if d.pw == nil {
		return nil
	}
	d.pw.Close()
	<-d.done
	return nil
}
