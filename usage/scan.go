package usage

import (
	"bytes"
	"encoding/json"
	"math"
)

var (
	responseIDPrefix  = []byte("resp_")
	reasoningIDPrefix = []byte("rs_")
)

// target is the meaning of the value under a key for usage counting. It is a
// container node whose keys are matched further, a leaf field, or tNone for a
// value that is skipped together with everything nested in it.
type target uint8

const (
	tNone target = iota

	// Container nodes.
	nRecord           // one response object or stream event
	nRecordList       // top-level array of records (Google streamGenerateContent without alt=sse)
	nOpenAIResponse   // "response" of an OpenAI Responses stream event
	nOpenAIUsage      // "usage" of OpenAI chat, completions, embeddings, Responses
	nAnthropicMessage // "message" of an Anthropic message_start event
	nAnthropicUsage   // "usage" of an Anthropic message or message_delta event
	// nAnthropicStartUsage is the "usage" of a message_start event's message,
	// which a stream's message_delta later completes.
	nAnthropicStartUsage
	nGoogleUsage    // "usageMetadata" of a Gemini response
	nAnthropicDelta // "delta" of an Anthropic message_delta event
	// nAnthropicContainer is the "container" of an Anthropic message, of its
	// message_start event or of a message_delta's delta.
	nAnthropicContainer
	nOpenAIOutput // "output" array of an OpenAI Responses response
	// nOpenAIItem is an element of nOpenAIOutput, or the "item" of a Responses
	// stream event such as response.output_item.done.
	nOpenAIItem
	// nAnthropicIterations is the "iterations" array of Anthropic usage, one
	// element per sampling step of a request that ran more steps than the
	// reply, such as a context compaction. The top-level counts leave
	// compaction steps out, while the provider bills every step.
	nAnthropicIterations
	nAnthropicIteration // an element of nAnthropicIterations

	// Leaf fields. The numeric ones index record.values, starting at firstCount.
	fModel
	// fContainerID is the id of a code execution container: Anthropic
	// container.id, or OpenAI container_id of a code_interpreter_call item.
	fContainerID
	// fItemID is the id of an OpenAI output item. Only reasoning item ids,
	// which start with "rs_", are kept: the Responses API looks a reasoning
	// item passed back by id up in its storage.
	fItemID
	// fResponseID is the id of an OpenAI response: the top-level id of a
	// body, or response.id of a Responses stream event. Only ids that start
	// with "resp_" are kept, which leaves out chat completion ids.
	fResponseID
	fPromptTokens     // OpenAI usage.prompt_tokens, includes cached input
	fCompletionTokens // OpenAI usage.completion_tokens, includes reasoning
	fInputTokens      // OpenAI Responses or Anthropic usage.input_tokens
	fOutputTokens     // OpenAI Responses or Anthropic usage.output_tokens
	fCacheCreation    // Anthropic usage.cache_creation_input_tokens
	fCacheRead        // Anthropic usage.cache_read_input_tokens
	fGooglePrompt     // Gemini promptTokenCount, includes cachedContentTokenCount
	fGoogleToolPrompt // Gemini toolUsePromptTokenCount
	fGoogleCandidates // Gemini candidatesTokenCount
	fGoogleThoughts   // Gemini thoughtsTokenCount
	// The Anthropic counts of one usage.iterations element. Unlike every
	// other count, a record sums them over the array's elements.
	fIterationInput         // input_tokens of an iteration
	fIterationOutput        // output_tokens of an iteration
	fIterationCacheCreation // cache_creation_input_tokens of an iteration
	fIterationCacheRead     // cache_read_input_tokens of an iteration
	targetEnd
)

const (
	firstCount = fPromptTokens
	countCount = int(targetEnd - firstCount)
)

func (t target) isCount() bool { return t >= firstCount && t < targetEnd }

func (t target) isIterationCount() bool { return t >= fIterationInput && t < targetEnd }

// providerKind selects which keys lookupKey matches.
type providerKind uint8

const (
	providerUnknown providerKind = iota
	providerAnthropic
	providerOpenAI
	providerGoogle
)

// lookupKey returns what the value under key means inside a container of the
// given node. Each provider matches only its own field names, so one response
// never mixes two providers' counting rules. Google also matches the OpenAI chat
// names because Gemini serves an OpenAI-compatible endpoint under the same host.
func lookupKey(p providerKind, node target, key []byte) target {
	switch node {
	case nRecord:
		switch string(key) {
		case "model":
			return fModel
		case "usage":
			switch p {
			case providerAnthropic:
				return nAnthropicUsage
			case providerOpenAI, providerGoogle:
				return nOpenAIUsage
			}
		case "response":
			if p == providerOpenAI {
				return nOpenAIResponse
			}
		case "message":
			if p == providerAnthropic {
				return nAnthropicMessage
			}
		case "delta":
			if p == providerAnthropic {
				return nAnthropicDelta
			}
		case "container":
			if p == providerAnthropic {
				return nAnthropicContainer
			}
		case "output":
			if p == providerOpenAI {
				return nOpenAIOutput
			}
		case "id":
			if p == providerOpenAI {
				return fResponseID
			}
		case "item":
			if p == providerOpenAI {
				return nOpenAIItem
			}
		case "modelVersion":
			if p == providerGoogle {
				return fModel
			}
		case "usageMetadata":
			if p == providerGoogle {
				return nGoogleUsage
			}
		}
	case nOpenAIResponse:
		switch string(key) {
		case "model":
			return fModel
		case "usage":
			return nOpenAIUsage
		case "output":
			return nOpenAIOutput
		case "id":
			return fResponseID
		}
	case nOpenAIItem:
		switch string(key) {
		case "container_id":
			return fContainerID
		case "id":
			return fItemID
		}
	case nAnthropicMessage:
		switch string(key) {
		case "model":
			return fModel
		case "usage":
			return nAnthropicStartUsage
		case "container":
			return nAnthropicContainer
		}
	case nAnthropicDelta:
		if string(key) == "container" {
			return nAnthropicContainer
		}
	case nAnthropicContainer:
		if string(key) == "id" {
			return fContainerID
		}
	case nOpenAIUsage:
		switch string(key) {
		case "prompt_tokens":
			return fPromptTokens
		case "completion_tokens":
			return fCompletionTokens
		case "input_tokens":
			if p == providerOpenAI {
				return fInputTokens
			}
		case "output_tokens":
			if p == providerOpenAI {
				return fOutputTokens
			}
		}
	case nAnthropicUsage, nAnthropicStartUsage:
		switch string(key) {
		case "input_tokens":
			return fInputTokens
		case "output_tokens":
			return fOutputTokens
		case "cache_creation_input_tokens":
			return fCacheCreation
		case "cache_read_input_tokens":
			return fCacheRead
		case "iterations":
			return nAnthropicIterations
		}
	case nAnthropicIteration:
		switch string(key) {
		case "input_tokens":
			return fIterationInput
		case "output_tokens":
			return fIterationOutput
		case "cache_creation_input_tokens":
			return fIterationCacheCreation
		case "cache_read_input_tokens":
			return fIterationCacheRead
		}
	case nGoogleUsage:
		switch string(key) {
		case "promptTokenCount":
			return fGooglePrompt
		case "toolUsePromptTokenCount":
			return fGoogleToolPrompt
		case "candidatesTokenCount":
			return fGoogleCandidates
		case "thoughtsTokenCount":
			return fGoogleThoughts
		}
	}
	return tNone
}

// maxCapture bounds the bytes kept of a key or model name. Longer strings are
// still parsed but never match.
const maxCapture = 256

// maxDepth bounds the nesting the scanner follows. Deeper input is treated as
// malformed, which keeps the stack at most maxDepth bytes.
const maxDepth = 4096

// record is the usage, model and container reported by one response object
// or stream event.
type record struct {
	values   [countCount]int64
	set      uint32 // bit i set when values[i] was read
	model    [maxCapture]byte
	modelLen int
	// final is set when a count was read from usage that the provider
	// reports once, complete: OpenAI usage, or Anthropic usage outside a
	// message_start event.
	final bool
	// containers are the container ids the record named, at most
	// maxContainers. They are rare, so only a record with one allocates.
	containers []string
	// reasoning are the reasoning item ids the record named, at most
	// maxReasoning.
	reasoning []string
}

func (r *record) reset() {
	r.set = 0
	r.final = false
	r.modelLen = 0
	r.containers = r.containers[:0]
	r.reasoning = r.reasoning[:0]
}

type scanState uint8

const (
	stValue      scanState = iota // a value must follow
	stValueOrEnd                  // after '[': a value or ']'
	stKeyOrEnd                    // after '{': a key or '}'
	stKey                         // after ',' in an object: a key
	stColon                       // after a key
	stAfterValue                  // ',' or the container's closing bracket
	stString
	stEscape
	stUnicode
	stNumber
	stLiteral
	stDone  // the top-level value is complete: only whitespace may follow
	stError // malformed input: everything else is ignored
)

// Sub-states of a JSON number, following the grammar
// -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?.
const (
	numMinus uint8 = iota
	numZero
	numInt
	numDot
	numFrac
	numExp
	numExpSign
	numExpDigits
)

const arrayBit = 0x80

// scanner is an incremental JSON tokenizer that keeps only the values that
// lookupKey selects. It validates the grammar, holds no input bytes beyond
// one captured key or model name, and never allocates on the hot path, so its
// memory stays bounded whatever the size of the body.
type scanner struct {
	provider providerKind
	// recordList lets a top-level array hold records (JSON bodies only).
	recordList bool
	// onRecord, when set, receives every record as soon as its object closes.
	// When nil, the caller takes the record after checking the whole value.
	onRecord func(*record)

	state scanState
	// stack has one byte per open container: its node, ORed with arrayBit
	// for arrays.
	stack []byte
	// next is the target of the value that starts next.
	next target

	// String being read.
	strIsKey   bool
	strCapture bool
	strTarget  target
	unicode    int // hex digits left in a \u escape
	capture    [maxCapture]byte
	capLen     int
	capLong    bool
	capEscaped bool

	// Number being read.
	numState  uint8
	numTarget target
	numValue  int64
	numOK     bool

	// Literal being read.
	literal    string
	literalPos int

	rec record
	// recordDone is set when a record object closed without error.
	recordDone bool
	// responseID is the first OpenAI response id read, kept as soon as it
	// is read: a parse error later in a large body would otherwise lose
	// an id that came first.
	responseID string
}

// reset prepares the scanner for a new top-level value.
func (s *scanner) reset() {
	s.state = stValue
	s.stack = s.stack[:0]
	s.next = nRecord
	s.recordDone = false
	s.rec.reset()
}

// complete reports whether the input so far is exactly one valid JSON value
// followed by optional whitespace.
func (s *scanner) complete() bool {
	if s.state == stNumber && len(s.stack) == 0 {
		s.endNumber()
	}
	return s.state == stDone
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r'
}

// feed parses p as the continuation of the input so far.
func (s *scanner) feed(p []byte) {
	i := 0
	for i < len(p) && s.state != stError {
		switch s.state {
		case stString:
			i = s.scanString(p, i)
		case stNumber:
			i = s.scanNumber(p, i)
		case stEscape:
			s.scanEscape(p[i])
			i++
		case stUnicode:
			if !isHex(p[i]) {
				s.state = stError
				break
			}
			s.captureByte(p[i])
			i++
			s.unicode--
			if s.unicode == 0 {
				s.state = stString
			}
		case stLiteral:
			if p[i] != s.literal[s.literalPos] {
				s.state = stError
				break
			}
			i++
			s.literalPos++
			if s.literalPos == len(s.literal) {
				s.endValue()
			}
		default:
			c := p[i]
			i++
			if isSpace(c) {
				continue
			}
			s.structural(c)
		}
	}
}

// structural handles one non-space byte outside strings, numbers and literals.
func (s *scanner) structural(c byte) {
	switch s.state {
	case stValue:
		s.startValue(c)
	case stValueOrEnd:
		if c == ']' {
			s.pop(true)
			return
		}
		s.startValue(c)
	case stKeyOrEnd:
		if c == '}' {
			s.pop(false)
			return
		}
		s.startKey(c)
	case stKey:
		s.startKey(c)
	case stColon:
		if c != ':' {
			s.state = stError
			return
		}
		s.state = stValue
	case stAfterValue:
		top := s.stack[len(s.stack)-1]
		isArray := top&arrayBit != 0
		switch {
		case c == ',' && isArray:
			s.next = elementTarget(top)
			s.state = stValue
		case c == ',':
			s.state = stKey
		case c == ']' && isArray, c == '}' && !isArray:
			s.pop(isArray)
		default:
			s.state = stError
		}
	default: // stDone
		s.state = stError
	}
}

// elementTarget returns the target of an element of the array whose stack
// entry is top.
func elementTarget(top byte) target {
	switch target(top &^ arrayBit) {
	case nRecordList:
		return nRecord
	case nOpenAIOutput:
		return nOpenAIItem
	case nAnthropicIterations:
		return nAnthropicIteration
	}
	return tNone
}

func (s *scanner) startKey(c byte) {
	if c != '"' {
		s.state = stError
		return
	}
	node := target(s.stack[len(s.stack)-1])
	s.startString(true, node != tNone, tNone)
}

func (s *scanner) startValue(c byte) {
	switch {
	case c == '{':
		node := tNone
		if s.next < fModel {
			node = s.next
		}
		if node == nRecord {
			s.rec.reset()
		}
		s.push(byte(node))
		s.state = stKeyOrEnd
	case c == '[':
		node := tNone
		switch {
		case len(s.stack) == 0 && s.recordList:
			node = nRecordList
		case s.next == nOpenAIOutput, s.next == nAnthropicIterations:
			node = s.next
		}
		s.push(byte(node) | arrayBit)
		s.next = elementTarget(byte(node))
		s.state = stValueOrEnd
	case c == '"':
		s.startString(false, s.next == fModel || s.next == fContainerID || s.next == fItemID || s.next == fResponseID, s.next)
	case c == '-' || (c >= '0' && c <= '9'):
		s.numTarget = s.next
		s.numValue = 0
		s.numOK = c != '-'
		switch c {
		case '-':
			s.numState = numMinus
		case '0':
			s.numState = numZero
		default:
			s.numState = numInt
			s.numValue = int64(c - '0')
		}
		s.state = stNumber
	case c == 't':
		s.startLiteral("true")
	case c == 'f':
		s.startLiteral("false")
	case c == 'n':
		s.startLiteral("null")
	default:
		s.state = stError
	}
}

func (s *scanner) startLiteral(lit string) {
	s.literal = lit
	s.literalPos = 1
	s.state = stLiteral
}

func (s *scanner) push(entry byte) {
	if len(s.stack) >= maxDepth {
		s.state = stError
		return
	}
	s.stack = append(s.stack, entry)
}

func (s *scanner) pop(isArray bool) {
	top := s.stack[len(s.stack)-1]
	s.stack = s.stack[:len(s.stack)-1]
	if !isArray && target(top) == nRecord {
		if s.onRecord != nil {
			s.onRecord(&s.rec)
		} else {
			s.recordDone = true
		}
	}
	s.endValue()
}

// endValue moves on after a complete value.
func (s *scanner) endValue() {
	if len(s.stack) == 0 {
		s.state = stDone
		return
	}
	s.state = stAfterValue
}

func (s *scanner) startString(isKey, capture bool, t target) {
	s.strIsKey = isKey
	s.strCapture = capture
	s.strTarget = t
	s.capLen = 0
	s.capLong = false
	s.capEscaped = false
	s.state = stString
}

func (s *scanner) captureByte(c byte) {
	if !s.strCapture {
		return
	}
	if s.capLen == maxCapture {
		s.capLong = true
		return
	}
	s.capture[s.capLen] = c
	s.capLen++
}

// scanString consumes string bytes from p[i:] and returns the next index.
func (s *scanner) scanString(p []byte, i int) int {
	start := i
	for i < len(p) {
		c := p[i]
		if c == '"' || c == '\\' || c < 0x20 {
			break
		}
		i++
	}
	if s.strCapture && i > start {
		n := copy(s.capture[s.capLen:], p[start:i])
		s.capLen += n
		if n < i-start {
			s.capLong = true
		}
	}
	if i == len(p) {
		return i
	}
	switch c := p[i]; {
	case c == '"':
		s.endString()
	case c == '\\':
		s.capEscaped = true
		s.captureByte(c)
		s.state = stEscape
	default:
		// JSON forbids raw control characters inside strings.
		s.state = stError
	}
	return i + 1
}

func (s *scanner) scanEscape(c byte) {
	switch c {
	case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
		s.captureByte(c)
		s.state = stString
	case 'u':
		s.captureByte(c)
		s.unicode = 4
		s.state = stUnicode
	default:
		s.state = stError
	}
}

func isHex(c byte) bool {
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
}

func (s *scanner) endString() {
	text := s.capture[:s.capLen]
	if s.strCapture && s.capEscaped && !s.capLong {
		text = unescape(text)
	}
	usable := s.strCapture && !s.capLong && text != nil
	if s.strIsKey {
		s.next = tNone
		if usable {
			s.next = lookupKey(s.provider, target(s.stack[len(s.stack)-1]), text)
		}
		s.state = stColon
		return
	}
	switch {
	case !usable:
	case s.strTarget == fModel:
		s.rec.modelLen = copy(s.rec.model[:], text)
	case s.strTarget == fContainerID && len(text) > 0 && len(s.rec.containers) < maxContainers:
		s.rec.containers = append(s.rec.containers, string(text))
	case s.strTarget == fItemID && bytes.HasPrefix(text, reasoningIDPrefix) && len(s.rec.reasoning) < maxReasoning:
		s.rec.reasoning = append(s.rec.reasoning, string(text))
	case s.strTarget == fResponseID && s.responseID == "" && bytes.HasPrefix(text, responseIDPrefix):
		s.responseID = string(text)
	}
	s.endValue()
}

// unescape decodes the body of a JSON string that contains escapes. It
// returns nil when the escapes are invalid, such as a lone surrogate that
// encoding/json would replace.
func unescape(raw []byte) []byte {
	quoted := make([]byte, 0, len(raw)+2)
	quoted = append(quoted, '"')
	quoted = append(quoted, raw...)
	quoted = append(quoted, '"')
	var text string
	if err := json.Unmarshal(quoted, &text); err != nil {
		return nil
	}
	if text == "" {
		return []byte{}
	}
	return []byte(text)
}

// scanNumber consumes number bytes from p[i:] and returns the next index. The
// byte that ends the number is left for the caller.
func (s *scanner) scanNumber(p []byte, i int) int {
	for i < len(p) {
		c := p[i]
		digit := c >= '0' && c <= '9'
		switch s.numState {
		case numMinus:
			switch {
			case c == '0':
				s.numState = numZero
			case digit:
				s.numState = numInt
			default:
				s.state = stError
				return i
			}
		case numZero, numInt:
			switch {
			case digit && s.numState == numInt:
				s.accumulate(c)
			case c == '.':
				s.numState = numDot
				s.numOK = false
			case c == 'e' || c == 'E':
				s.numState = numExp
				s.numOK = false
			default:
				s.endNumber()
				return i
			}
		case numDot:
			if !digit {
				s.state = stError
				return i
			}
			s.numState = numFrac
		case numFrac:
			switch {
			case digit:
			case c == 'e' || c == 'E':
				s.numState = numExp
			default:
				s.endNumber()
				return i
			}
		case numExp:
			switch {
			case c == '+' || c == '-':
				s.numState = numExpSign
			case digit:
				s.numState = numExpDigits
			default:
				s.state = stError
				return i
			}
		case numExpSign:
			if !digit {
				s.state = stError
				return i
			}
			s.numState = numExpDigits
		case numExpDigits:
			if !digit {
				s.endNumber()
				return i
			}
		}
		i++
	}
	return i
}

// accumulate adds one decimal digit to the value of a non-negative integer,
// giving up on values that overflow int64.
func (s *scanner) accumulate(c byte) {
	if !s.numOK {
		return
	}
	d := int64(c - '0')
	if s.numValue > (1<<63-1-d)/10 {
		s.numOK = false
		return
	}
	s.numValue = s.numValue*10 + d
}

func (s *scanner) endNumber() {
	switch s.numState {
	case numZero, numInt, numFrac, numExpDigits:
	default:
		s.state = stError
		return
	}
	// Token counts are non-negative integers. Anything else is left out
	// rather than guessed at.
	if s.numOK && s.numTarget.isCount() {
		i := s.numTarget - firstCount
		switch {
		case s.numTarget.isIterationCount() && s.rec.set&(1<<i) != 0:
			// A sum of non-negative counts, each below 2^63, that stops
			// short of overflowing.
			s.rec.values[i] = min(s.rec.values[i], math.MaxInt64-s.numValue) + s.numValue
		default:
			s.rec.values[i] = s.numValue
		}
		s.rec.set |= 1 << i
		if len(s.stack) > 0 {
			switch target(s.stack[len(s.stack)-1] &^ arrayBit) {
			case nOpenAIUsage, nAnthropicUsage:
				s.rec.final = true
			}
		}
	}
	s.endValue()
}
