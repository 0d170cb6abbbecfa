// Package usage reads token usage from Anthropic, OpenAI and Google AI
// response bodies while the proxy streams them to the client.
//
// A Tap parses a copy of the body, so it never changes or delays a byte the
// client gets. It understands server-sent event streams and JSON bodies
// (including the JSON array that Gemini streams without alt=sse) and keeps
// bounded memory whatever the body size. NewDecoder undoes a gzip or deflate
// Content-Encoding in front of a Tap. NewUsageChunkFilter removes the
// usage-only chunk that the proxy requests on OpenAI chat completion streams
// when the client did not ask for it.
package usage

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"math/bits"
	"slices"
	"strings"
	"sync"
)

// Counts is the token usage one response reported.
type Counts struct {
	InputTokens  int64  // input incl. cache reads and cache writes
	OutputTokens int64  // output incl. reasoning/thinking tokens
	Model        string // model named by the response, "" if none
	Seen         bool   // true once any usage field was read
	// Final is true once usage that the provider reports complete was read:
	// OpenAI usage, or Anthropic usage other than message_start's. Gemini
	// repeats its cumulative usageMetadata on every chunk, so it never sets
	// Final.
	Final bool
}

// Total returns input plus output tokens, held at math.MaxInt64 rather
// than wrapping around, since the counts come from the provider.
func (c Counts) Total() int64 {
	in, out := max(c.InputTokens, 0), max(c.OutputTokens, 0)
	return min(in, math.MaxInt64-out) + out
}

// maxContainers and maxReasoning bound the container and reasoning item
// ids kept of one response.
const (
	maxContainers = 4
	maxReasoning  = 64
)

// tally accumulates the records of one response.
type tally struct {
	values [countCount]int64
	has    [countCount]bool
	model  string
	seen   bool
	final  bool
	// containers are the distinct container ids the records named, in
	// order, at most maxContainers.
	containers []string
	// reasoning are the distinct reasoning item ids, at most maxReasoning.
	reasoning []string
}

// add merges a record. A field keeps its latest non-zero value, because
// stream events report cumulative counts (Anthropic message_delta, Gemini
// usageMetadata) and a later event may leave a field at zero or out.
func (t *tally) add(r *record) {
	for i := range countCount {
		if r.set&(1<<i) == 0 {
			continue
		}
		t.seen = true
		if v := r.values[i]; v != 0 || !t.has[i] {
			t.values[i] = v
			t.has[i] = true
		}
	}
	if r.modelLen > 0 && string(r.model[:r.modelLen]) != t.model {
		t.model = string(r.model[:r.modelLen])
	}
	t.final = t.final || r.final
	t.containers = addDistinct(t.containers, r.containers, maxContainers)
	t.reasoning = addDistinct(t.reasoning, r.reasoning, maxReasoning)
}

// addDistinct appends to list the ids it does not contain yet, up to limit
// ids in all.
func addDistinct(list, ids []string, limit int) []string {
	for _, id := range ids {
		if len(list) < limit && !slices.Contains(list, id) {
			list = append(list, id)
		}
	}
	return list
}

func (t *tally) value(f target) int64 { return t.values[f-firstCount] }

// counts adds up the fields. Each provider's lookupKey table records only its
// own fields, so a plain sum applies each provider's rule. OpenAI prompt and
// completion tokens already include cached and reasoning tokens. Anthropic
// input_tokens excludes cache writes and reads, which are added. Gemini's
// promptTokenCount already includes cachedContentTokenCount but not
// toolUsePromptTokenCount, which is added.
//
// Anthropic's top-level counts leave out the iterations of a context
// compaction, and the provider bills the sum over usage.iterations. So
// where that sum is larger on a side, it is charged instead. Taking the
// larger rather than adding cannot count a step twice.
func (t *tally) counts() Counts {
	// input_tokens and output_tokens are OpenAI Responses or Anthropic
	// counts, and only Anthropic's have iterations.
	input := max(t.value(fInputTokens)+t.value(fCacheCreation)+t.value(fCacheRead),
		t.value(fIterationInput)+t.value(fIterationCacheCreation)+t.value(fIterationCacheRead))
	output := max(t.value(fOutputTokens), t.value(fIterationOutput))
	return Counts{
		InputTokens: t.value(fPromptTokens) + input +
			t.value(fGooglePrompt) + t.value(fGoogleToolPrompt),
		OutputTokens: t.value(fCompletionTokens) + output +
			t.value(fGoogleCandidates) + t.value(fGoogleThoughts),
		Model: t.model,
		Seen:  t.seen,
		Final: t.final,
	}
}

// SSE line states.
const (
	lineField     uint8 = iota // reading the field name at the start of a line
	lineDataSpace              // after "data:", where one space is skipped
	lineData                   // inside the value of a data line
	lineSkip                   // inside a line whose field is ignored
)

// maxFieldName is the longest SSE field name kept. Only "data" matters.
const maxFieldName = 8

// Tap parses a copy of a response body incrementally. Write never fails and
// never blocks long: it always returns len(p), nil. A malformed JSON body
// stops counting at the first error, and Counts keeps the records completed
// before it. In an event stream, an event whose data is not one valid JSON
// value is skipped. A panic inside Write is recovered and stops counting.
// Write and Counts may be called from different goroutines.
type Tap struct {
	mu      sync.Mutex
	sse     bool
	stopped bool
	// panicked holds a recovered panic, so tests can fail on it while the
	// proxy carries on without counting.
	panicked string

	scan  scanner
	tally tally

	// Server-sent event state.
	line      uint8
	field     [maxFieldName]byte
	fieldLen  int
	fieldLong bool
	afterCR   bool // the last line ended with '\r': a '\n' next belongs to it
	dataLines int  // data lines of the current event
}

// NewTap returns a Tap for a response from provider ("anthropic", "openai"
// or "google") with the given Content-Type. A text/event-stream body is read
// as server-sent events, anything else as JSON. An unknown provider gives a
// Tap that never counts.
func NewTap(provider, contentType string) *Tap {
	t := &Tap{}
	switch strings.ToLower(provider) {
	case "anthropic":
		t.scan.provider = providerAnthropic
	case "openai":
		t.scan.provider = providerOpenAI
	case "google":
		t.scan.provider = providerGoogle
	}
	if t.scan.provider == providerUnknown {
		t.stopped = true
	}
	// Only the media type matters. mime.ParseMediaType returns the same
	// lowercased, trimmed text for a valid header, plus a map of the
	// parameters it allocates.
	mediaType, _, _ := strings.Cut(contentType, ";")
	t.sse = strings.ToLower(strings.TrimSpace(mediaType)) == "text/event-stream"
	if !t.sse {
		t.scan.recordList = true
		t.scan.onRecord = t.tally.add
	}
	t.scan.reset()
	return t
}

// Write parses p. It always returns len(p), nil.
func (t *Tap) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		return len(p), nil
	}
	// A bug in the parser must cost the count of one response, not the
	// proxy process, so a panic stops counting instead of spreading.
	defer func() {
		if r := recover(); r != nil {
			t.panicked = fmt.Sprint(r)
			t.stopped = true
		}
	}()
	if t.sse {
		t.writeEvents(p)
		return len(p), nil
	}
	t.scan.feed(p)
	if t.scan.state == stError {
		t.stopped = true
	}
	return len(p), nil
}

// EventStream reports whether the Tap reads its body as server-sent events.
func (t *Tap) EventStream() bool { return t.sse }

// Containers returns the code execution container ids that the records
// completed so far named, starting with the from-th. It allocates only when
// there are new ones.
func (t *Tap) Containers(from int) []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return idsFrom(t.tally.containers, from)
}

// ReasoningItems returns the OpenAI reasoning item ids that the records
// completed so far named, starting with the from-th.
func (t *Tap) ReasoningItems(from int) []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return idsFrom(t.tally.reasoning, from)
}

// idsFrom returns a copy of ids from the from-th on, or nil if there are
// none.
func idsFrom(ids []string, from int) []string {
	if from >= len(ids) {
		return nil
	}
	return slices.Clone(ids[from:])
}

// ResponseID returns the id of the OpenAI response read so far, or "". It
// is the top-level id of a body or the response.id of a stream event, read
// as soon as its string ends.
func (t *Tap) ResponseID() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.scan.responseID
}

// Counts returns what the response reported so far.
func (t *Tap) Counts() Counts {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.tally.counts()
}

// writeEvents splits p into server-sent event lines. Data lines go straight
// to the JSON scanner, joined by '\n' as the SSE specification joins them,
// so no event is buffered. A blank line ends the event and commits its record
// when the data was one valid JSON value.
func (t *Tap) writeEvents(p []byte) {
	for i := 0; i < len(p); {
		if t.afterCR {
			t.afterCR = false
			if p[i] == '\n' {
				i++
				continue
			}
		}
		if t.line == lineField && t.fieldLen == 0 && !t.fieldLong && t.dataLines == 0 {
			if n := t.skipNeutralEvent(p[i:]); n > 0 {
				i += n
				continue
			}
		}
		switch t.line {
		case lineField:
			i = t.readFieldName(p, i)
		case lineDataSpace:
			t.line = lineData
			if p[i] == ' ' {
				i++
			}
		case lineData:
			end := i + lineEnd(p[i:])
			t.scan.feed(p[i:end])
			i = t.endLine(p, end)
		default: // lineSkip
			i = t.endLine(p, i+lineEnd(p[i:]))
		}
	}
}

// skipNeutralEvent returns the length of the whole event at the start of
// p when parsing it could change nothing the Tap reports, and 0 otherwise.
// Most events of a stream are text deltas that carry no usage, and the JSON
// scanner steps through every byte of them. neutral rules such an event out
// in about a third of the scanner's time (BenchmarkTapSSEEvent). Only an
// event that ends within p, with one data line and '\n' line ends, is
// considered, so how a body is split into writes decides which events are
// skipped, never what is counted.
func (t *Tap) skipNeutralEvent(p []byte) int {
	end := bytes.Index(p, blankLine)
	if end < 0 || p[0] == '\n' || bytes.IndexByte(p[:end], '\r') >= 0 {
		return 0
	}
	var data []byte
	dataLines := 0
	for rest := p[:end+1]; len(rest) > 0; {
		nl := bytes.IndexByte(rest, '\n')
		line := rest[:nl]
		rest = rest[nl+1:]
		name, value, hasColon := bytes.Cut(line, colon)
		if string(name) != "data" {
			continue
		}
		if !hasColon {
			return 0 // a data line with an empty value
		}
		if dataLines++; dataLines > 1 {
			return 0
		}
		data = bytes.TrimPrefix(value, space)
	}
	if dataLines == 1 && !t.neutral(data) {
		return 0
	}
	return end + len(blankLine)
}

// neutral reports whether the JSON text data, whether valid or not, could
// leave no mark on the Tap: no usage count, no response, reasoning item or
// container id, and no model other than the one already read. A key or value
// that matters begins right after a '"', unless it is written with a \u
// escape, so it looks at the bytes after each '"' and gives up at any such
// escape.
func (t *Tap) neutral(data []byte) bool {
	if bytes.Contains(data, unicodeEscape) {
		return false
	}
	model := t.tally.model
	// Testing every quote took most of neutral's time in a CPU profile,
	// and few quotes open a key or value that matters. So the loop compares
	// eight bytes at a time and looks only at a quote before u, m, c or r.
	i := 0
	for ; i+9 <= len(data); i += 8 {
		word := binary.LittleEndian.Uint64(data[i:])
		next := binary.LittleEndian.Uint64(data[i+1:])
		marks := zeroBytes(word^quotes) & (zeroBytes(next^letterU) | zeroBytes(next^letterM) |
			zeroBytes(next^letterC) | zeroBytes(next^letterR))
		for ; marks != 0; marks &= marks - 1 {
			if !neutralAt(data[i+bits.TrailingZeros64(marks)/8+1:], model) {
				return false
			}
		}
	}
	for ; i+1 < len(data); i++ {
		if data[i] == '"' && !neutralAt(data[i+1:], model) {
			return false
		}
	}
	return true
}

// neutralAt reports whether rest, which follows a '"', begins no key or
// value that could change what the Tap reports.
func neutralAt(rest []byte, model string) bool {
	switch rest[0] {
	case 'u':
		// Every key that begins with "usage" must have the value null.
		return !bytes.HasPrefix(rest, usageKey) || bytes.HasPrefix(rest, nullUsage)
	case 'm':
		// Every key that begins with "model" must be "model" or
		// "modelVersion" and name the model already read.
		return !bytes.HasPrefix(rest, modelKey) || sameModel(rest[len(modelKey):], model)
	case 'c':
		return !bytes.HasPrefix(rest, containerKey)
	case 'r':
		return !bytes.HasPrefix(rest, responseIDPrefix) && !bytes.HasPrefix(rest, reasoningIDPrefix)
	}
	return true
}

// Each byte of these words is the same character, so that eight bytes are
// compared with it at once.
const (
	lowBits  = 0x0101010101010101
	quotes   = '"' * lowBits
	letterU  = 'u' * lowBits
	letterM  = 'm' * lowBits
	letterC  = 'c' * lowBits
	letterR  = 'r' * lowBits
	low7Bits = 0x7f * lowBits
)

// zeroBytes returns x with the top bit of each zero byte set and every
// other bit clear. No carry crosses a byte, so unlike the shorter
// (x-lowBits)&^x form it marks only zero bytes.
func zeroBytes(x uint64) uint64 {
	return ^((x&low7Bits + low7Bits) | x | low7Bits)
}

// sameModel reports whether rest, what follows a key that begins with
// "model", is the rest of "model" or "modelVersion" and a string value
// equal to model without escapes.
func sameModel(rest []byte, model string) bool {
	rest = bytes.TrimPrefix(rest, versionSuffix)
	v, ok := bytes.CutPrefix(rest, modelValue)
	return ok && len(v) > len(model) && string(v[:len(model)]) == model && v[len(model)] == '"' &&
		strings.IndexByte(model, '"') < 0 && strings.IndexByte(model, '\\') < 0
}

var (
	blankLine     = []byte("\n\n")
	colon         = []byte(":")
	space         = []byte(" ")
	unicodeEscape = []byte(`\u`)
	containerKey  = []byte("container")
	usageKey      = []byte("usage")
	nullUsage     = []byte(`usage":null`)
	modelKey      = []byte("model")
	versionSuffix = []byte("Version")
	modelValue    = []byte(`":"`)
)

// readFieldName reads the field name of a line from p[i:] and returns the
// next index.
func (t *Tap) readFieldName(p []byte, i int) int {
	j := i
	for j < len(p) && p[j] != ':' && p[j] != '\n' && p[j] != '\r' {
		j++
	}
	n := copy(t.field[t.fieldLen:], p[i:j])
	t.fieldLen += n
	if n < j-i {
		t.fieldLong = true
	}
	if j == len(p) {
		return j
	}

	isData := !t.fieldLong && string(t.field[:t.fieldLen]) == "data"
	if p[j] == ':' {
		if isData {
			t.startDataLine()
			t.line = lineDataSpace
		} else {
			t.line = lineSkip
		}
		t.fieldLen = 0
		t.fieldLong = false
		return j + 1
	}

	// A line without a colon is a field with an empty value, and an empty
	// line ends the event.
	blank := t.fieldLen == 0 && !t.fieldLong
	if isData {
		t.startDataLine()
	}
	next := t.endLine(p, j)
	if blank {
		t.dispatch()
	}
	return next
}

func (t *Tap) startDataLine() {
	if t.dataLines > 0 {
		t.scan.feed(newline)
	}
	t.dataLines++
}

// endLine handles the line terminator at p[end], if any, and returns the
// index after it.
func (t *Tap) endLine(p []byte, end int) int {
	if end == len(p) {
		return end
	}
	t.line = lineField
	t.fieldLen = 0
	t.fieldLong = false
	if p[end] == '\r' {
		t.afterCR = true
	}
	return end + 1
}

// dispatch ends the current event.
func (t *Tap) dispatch() {
	if t.dataLines > 0 && t.scan.complete() && t.scan.recordDone {
		t.tally.add(&t.scan.rec)
	}
	t.dataLines = 0
	t.scan.reset()
}

var newline = []byte{'\n'}

// lineEnd returns the index of the first '\r' or '\n' in p, or len(p).
func lineEnd(p []byte) int {
	n := bytes.IndexByte(p, '\n')
	if n < 0 {
		n = len(p)
	}
	if r := bytes.IndexByte(p[:n], '\r'); r >= 0 {
		return r
	}
	return n
}
