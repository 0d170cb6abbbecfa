package usage

import (
	"bytes"
	"encoding/json"
	"io"
)

// maxHeldEvent bounds the bytes held of one incomplete event. A usage-only
// chunk is a few hundred bytes, so an event longer than this is passed on as
// it arrives and never dropped.
const maxHeldEvent = 1 << 20

// filterReadSize is the free space kept in the buffer for each read from the
// body.
const filterReadSize = 8 << 10

// maxEmptyReads bounds consecutive reads that return 0, nil before the filter
// reports io.ErrNoProgress.
const maxEmptyReads = 100

// NewUsageChunkFilter wraps an OpenAI chat completions SSE body
// (text/event-stream). It passes every byte through unchanged except the
// usage-only chunk, which OpenAI sends once per stream: a data event whose
// JSON has "choices":[] (present and empty) and a non-null "usage". The proxy
// requests that chunk with stream_options.include_usage on the client's
// behalf, so a client that did not ask for it never receives it.
//
// The filter holds back only the bytes of an event that is not complete yet
// (no blank line seen), and at most maxHeldEvent of them, so Read returns a
// complete event without waiting for more of the body. Events may
// be split across reads at any byte, with \n, \r\n or \r line endings. An
// incomplete event at the end of the body is passed on unchanged. Close
// closes the body.
func NewUsageChunkFilter(body io.ReadCloser) io.ReadCloser {
	return &chunkFilter{body: body}
}

// chunkFilter keeps one buffer: buf[read:ready] is checked and waits for the
// caller, and buf[ready:] is the start of the event being received, scanned up
// to len(buf).
type chunkFilter struct {
	body  io.ReadCloser
	buf   []byte
	read  int
	ready int
	err   error // from the body, returned once buf is drained

	lineLen int  // bytes of the current line so far
	afterCR bool // the last line ended with '\r' at the end of buf
	// crEndedEvent and crDropped describe the event that ended at that '\r',
	// which owns a '\n' that arrives next.
	crEndedEvent bool
	crDropped    bool
	// passing is set when the current event grew past maxHeldEvent and is
	// being passed on unchecked.
	passing bool
}

func (f *chunkFilter) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for empty := 0; ; {
		if f.read < f.ready {
			n := copy(p, f.buf[f.read:f.ready])
			f.read += n
			return n, nil
		}
		if f.err != nil {
			if f.ready < len(f.buf) {
				// The body ended inside an event: pass it on as it is.
				f.ready = len(f.buf)
				continue
			}
			return 0, f.err
		}
		f.compact()
		start := len(f.buf)
		n, err := f.body.Read(f.buf[start:cap(f.buf)])
		f.buf = f.buf[:start+n]
		f.scan(start)
		if err != nil {
			f.err = err
		}
		if n == 0 && err == nil {
			empty++
			if empty >= maxEmptyReads {
				f.err = io.ErrNoProgress
			}
		}
	}
}

func (f *chunkFilter) Close() error {
	return f.body.Close()
}

// compact moves the held bytes to the front of buf and makes room for a read.
func (f *chunkFilter) compact() {
	held := len(f.buf) - f.ready
	if f.ready > 0 {
		copy(f.buf, f.buf[f.ready:])
		f.buf = f.buf[:held]
		f.read, f.ready = 0, 0
	}
	if cap(f.buf)-len(f.buf) < filterReadSize {
		grown := make([]byte, len(f.buf), max(2*cap(f.buf), len(f.buf)+2*filterReadSize))
		copy(grown, f.buf)
		f.buf = grown
	}
}

// scan finds the events that end in buf[start:] and moves each one to the
// ready part of buf or drops it.
func (f *chunkFilter) scan(start int) {
	i := start
	if f.afterCR && i < len(f.buf) {
		f.afterCR = false
		if f.buf[i] == '\n' {
			// The '\n' of a "\r\n" split across reads belongs to the line
			// before it, and to the event that line ended.
			if f.crEndedEvent {
				i = f.endEvent(i+1, f.crDropped)
			} else {
				i++
			}
		}
		f.crEndedEvent = false
	}
	for i < len(f.buf) {
		c := f.buf[i]
		if c != '\n' && c != '\r' {
			f.lineLen++
			i++
			continue
		}
		blank := f.lineLen == 0
		f.lineLen = 0
		end := i + 1
		if c == '\r' {
			if end < len(f.buf) {
				if f.buf[end] == '\n' {
					end++
				}
			} else {
				f.afterCR = true
			}
		}
		if !blank {
			i = end
			continue
		}
		drop := !f.passing && end-f.ready <= maxHeldEvent && isUsageOnlyChunk(f.buf[f.ready:end])
		if f.afterCR {
			f.crEndedEvent = true
			f.crDropped = drop
		}
		i = f.endEvent(end, drop)
	}
	if f.passing || len(f.buf)-f.ready > maxHeldEvent {
		f.passing = true
		f.ready = len(f.buf)
	}
}

// endEvent passes on or drops buf[ready:end], which is a complete event or
// the '\n' that completes one, and returns where scanning continues.
func (f *chunkFilter) endEvent(end int, drop bool) int {
	f.passing = false
	if !drop {
		f.ready = end
		return end
	}
	n := copy(f.buf[f.ready:], f.buf[end:])
	f.buf = f.buf[:f.ready+n]
	return f.ready
}

// isUsageOnlyChunk reports whether event, the raw bytes of one SSE event, is
// a chat completion chunk with an empty choices array and a non-null usage.
func isUsageOnlyChunk(event []byte) bool {
	if !bytes.Contains(event, []byte(`"usage"`)) {
		return false
	}
	data, ok := eventData(event)
	// Most chunks of a stream with include_usage carry "usage":null and a
	// non-empty choices array, so a byte search rules them out before the
	// JSON decoder runs.
	if !ok || !hasEmptyArray(data, `"choices"`) {
		return false
	}
	var chunk struct {
		Choices *[]json.RawMessage `json:"choices"`
		Usage   json.RawMessage    `json:"usage"`
	}
	if err := json.Unmarshal(data, &chunk); err != nil {
		return false
	}
	return chunk.Choices != nil && len(*chunk.Choices) == 0 &&
		len(chunk.Usage) > 0 && !bytes.Equal(chunk.Usage, []byte("null"))
}

// eventData joins the values of the event's data lines with '\n', as the SSE
// specification does. The result shares memory with event when there is one
// data line. It reports false when the event has no data line.
func eventData(event []byte) ([]byte, bool) {
	var data []byte
	lines := 0
	for len(event) > 0 {
		end := lineEnd(event)
		line := event[:end]
		if end < len(event) {
			end++
			if event[end-1] == '\r' && end < len(event) && event[end] == '\n' {
				end++
			}
		}
		event = event[end:]
		name, value, found := bytes.Cut(line, []byte(":"))
		if string(name) != "data" {
			continue
		}
		if found && len(value) > 0 && value[0] == ' ' {
			value = value[1:]
		}
		switch lines {
		case 0:
			data = value
		case 1:
			data = append(append(append([]byte(nil), data...), '\n'), value...)
		default:
			data = append(append(data, '\n'), value...)
		}
		lines++
	}
	return data, lines > 0
}

// hasEmptyArray reports whether key, a quoted JSON key, occurs in data
// followed by a colon and an empty array, with optional whitespace between.
func hasEmptyArray(data []byte, key string) bool {
	for {
		i := bytes.Index(data, []byte(key))
		if i < 0 {
			return false
		}
		data = data[i+len(key):]
		rest := skipSpace(data)
		if len(rest) == 0 || rest[0] != ':' {
			continue
		}
		rest = skipSpace(rest[1:])
		if len(rest) == 0 || rest[0] != '[' {
			continue
		}
		rest = skipSpace(rest[1:])
		if len(rest) > 0 && rest[0] == ']' {
			return true
		}
	}
}

func skipSpace(p []byte) []byte {
	for len(p) > 0 && isSpace(p[0]) {
		p = p[1:]
	}
	return p
}
