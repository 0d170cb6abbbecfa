package proxy

import (
	"bytes"
	"net/http"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

// redacted is the text that replaces each form of the key in a response.
const redacted = "[REDACTED]"

// scrubKey replaces every form of key in body from which a client could
// read the key or a part of it. That is the key in any letter case, with any
// of its characters percent-encoded or written as a JSON escape. It is also
// a masked form that keeps some of the key's first or last characters, and
// any run of minFragment or more of the key's characters.
func scrubKey(body []byte, key string) []byte {
	return scrubKeyFor(body, key, nil)
}

// scrubKeyFor is scrubKey for a response to a client that sent sent. A
// partial form of the key (a mask or a fragment) that the client sent
// itself is left alone. Were it replaced, a client could send a guess
// that a provider error repeats, such as a model name, and learn from the
// replacement whether the guess matches the key, one character at a time.
// With sent unknown, no partial form is looked for at all, for the same
// reason. The whole key is replaced always, since guessing it gains
// nothing.
func scrubKeyFor(body []byte, key string, sent *sentText) []byte {
	if key == "" {
		return body
	}
	body = replaceKeyForms(body, key)
	if sent.unknown() {
		return body
	}
	return replaceKeyFragments(replacePartialMasks(body, key, sent), key, sent)
}

// sentText holds the text a client sent with a request, decoded as the
// scrubber decodes a response (see decodeEscapes) and in lower case. A nil
// *sentText stands for nothing sent.
type sentText struct {
	lower []byte
	// notKept is set when the request body was forwarded as it came,
	// without a copy, so what the client sent is not known.
	notKept bool
}

// unknownSent is the sentText of a request whose body was not kept.
var unknownSent = &sentText{notKept: true}

// newSentText returns the sentText of the given parts of a request.
func newSentText(parts ...[]byte) *sentText {
	t := &sentText{}
	for _, p := range parts {
		view, _, _ := decodeEscapes(p)
		for _, c := range view {
			t.lower = append(t.lower, lowerASCII(c))
		}
		t.lower = append(t.lower, '\n')
	}
	return t
}

func (t *sentText) unknown() bool { return t != nil && t.notKept }

// contains reports whether the client sent b, in any letter case.
func (t *sentText) contains(b []byte) bool {
	if t == nil || len(b) == 0 {
		return false
	}
	lower := make([]byte, len(b))
	for i, c := range b {
		lower[i] = lowerASCII(c)
	}
	return bytes.Contains(t.lower, lower)
}

func scrubText(s, key string) string {
	return string(scrubKey([]byte(s), key))
}

// scrubHeaders removes the injected key from response header values, such as
// a WWW-Authenticate or a redirect's Location that quotes it, and drops a
// header whose name contains it. The partial forms are looked for only when
// masked is set (error and redirect responses, trailers and 1xx responses),
// because looking for them costs a pass over every value. Those the client
// sent are left alone, as scrubKeyFor leaves them. A nil sent replaces
// them all.
func scrubHeaders(h http.Header, key string, masked bool, sent *sentText) {
	if key == "" {
		return
	}
	var fragments lazyFragments
	partial := func(s string) bool {
		return masked && !sent.unknown() && (hasPartialMask(s, key) || fragments.in(s, key))
	}
	for name, values := range h {
		// Every form of the key is at least as long as the key, which is
		// longer than most names and values, so the length is checked
		// first. A name is compared in any letter case because Go rewrites
		// a name's case when it reads it.
		if len(name) >= len(key) && indexKeyForm(name, key) >= 0 ||
			partial(name) && string(scrubKeyFor([]byte(name), key, sent)) != name {
			delete(h, name)
			continue
		}
		for i, v := range values {
			if len(v) >= len(key) && indexKeyForm(v, key) >= 0 || partial(v) {
				values[i] = string(scrubKeyFor([]byte(v), key, sent))
			}
		}
	}
}

// scrubKeyPrefix replaces the end of a body that was cut inside the key, in
// any of its forms: the key's first characters do not match the whole key,
// so scrubKey leaves them. As with the other partial forms (see
// scrubKeyFor), an end that the client sent itself is left alone.
func scrubKeyPrefix(body []byte, key string, sent *sentText) []byte {
	if sent.unknown() {
		return body
	}
	// A form takes at most six bytes per character of the key.
	for i := max(0, len(body)-6*len(key)); i < len(body); i++ {
		if isKeyFormPrefix(body[i:], key) {
			if view, _, _ := decodeEscapes(body[i:]); sent.contains(view) {
				return body
			}
			return append(body[:i:i], redacted...)
		}
	}
	return body
}

// isKeyFormPrefix reports whether s is a form (see keyFormLen) of the key's
// first characters, all of s, and may end inside the escape of the next
// one. The whole key does not count.
func isKeyFormPrefix(s []byte, key string) bool {
	j := 0
	for k := 0; k < len(key); k++ {
		if j == len(s) {
			return j > 0
		}
		n := charFormLen(s[j:], key[k])
		if n == 0 {
			return escapeStart(s[j:], key[k])
		}
		j += n
	}
	return false
}

// escapeStart reports whether s is the start, cut short, of an escape of c
// in either letter case.
func escapeStart(s []byte, c byte) bool {
	const hex = "0123456789abcdef"
	for _, b := range []byte{lowerASCII(c), upperASCII(c)} {
		forms := []string{
			`\u00` + string(hex[b>>4]) + string(hex[b&15]),
			"%" + string(hex[b>>4]) + string(hex[b&15]),
		}
		if b == '/' {
			forms = append(forms, `\/`)
		}
		for _, form := range forms {
			if len(s) < len(form) && equalFold(s, form[:len(s)]) {
				return true
			}
		}
	}
	return false
}

// replaceKeyForms replaces each occurrence of a form of key in b (see
// keyFormLen) with redacted. It returns b itself when there is none.
func replaceKeyForms(b []byte, key string) []byte {
	return replaceSpans(b, func(from int) (int, int) {
		i := indexKeyForm(b[from:], key)
		if i < 0 {
			return -1, -1
		}
		i += from
		return i, i + keyFormLen(b[i:], key)
	})
}

// replaceSpans returns b with each span that next finds replaced by
// redacted, or b itself when next finds none. next returns the first span
// that starts at or after from, or a start of -1.
func replaceSpans(b []byte, next func(from int) (start, end int)) []byte {
	var out []byte
	last := 0
	for last < len(b) {
		start, end := next(last)
		if start < 0 {
			break
		}
		if out == nil {
			out = make([]byte, 0, len(b))
		}
		out = append(out, b[last:start]...)
		out = append(out, redacted...)
		last = end
	}
	if out == nil {
		return b
	}
	return append(out, b[last:]...)
}

// indexKeyForm returns the offset of the first form of key in s, or -1.
func indexKeyForm[T string | []byte](s T, key string) int {
	first := lowerASCII(key[0])
	for i := 0; i+len(key) <= len(s); i++ {
		if c := s[i]; c != '%' && c != '\\' && lowerASCII(c) != first {
			continue
		}
		if keyFormLen(s[i:], key) > 0 {
			return i
		}
	}
	return -1
}

// keyFormLen returns the length of the form of key that s starts with, or 0.
// Each character of the key may appear as itself in either letter case, as
// a %XX escape or as a JSON \u00XX escape, and '/' also as JSON's "\/".
// An upstream that quotes the key in a JSON string, a URL or a message that
// changes its case thus cannot pass it to the client. A key is random
// enough that a text matching it this loosely is still the key.
func keyFormLen[T string | []byte](s T, key string) int {
	j := 0
	for k := 0; k < len(key); k++ {
		n := charFormLen(s[j:], key[k])
		if n == 0 {
			return 0
		}
		j += n
	}
	return j
}

// charFormLen returns the length of the form of c that s starts with, or 0.
func charFormLen[T string | []byte](s T, c byte) int {
	if len(s) == 0 {
		return 0
	}
	switch b := s[0]; {
	case lowerASCII(b) == lowerASCII(c):
		return 1
	case b == '%' && len(s) >= 3:
		if v, ok := hexByte(s[1], s[2]); ok && lowerASCII(v) == lowerASCII(c) {
			return 3
		}
	case b == '\\' && len(s) >= 2 && s[1] == '/' && c == '/':
		return 2
	case b == '\\' && len(s) >= 6 && s[1] == 'u':
		hi, ok1 := hexByte(s[2], s[3])
		lo, ok2 := hexByte(s[4], s[5])
		if ok1 && ok2 && hi == 0 && lowerASCII(lo) == lowerASCII(c) {
			return 6
		}
	}
	return 0
}

func upperASCII(c byte) byte {
	if 'a' <= c && c <= 'z' {
		return c - 'a' + 'A'
	}
	return c
}

func lowerASCII(c byte) byte {
	if 'A' <= c && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

func hexByte(a, b byte) (byte, bool) {
	x, ok1 := hexDigit(a)
	y, ok2 := hexDigit(b)
	return x<<4 | y, ok1 && ok2
}

func hexDigit(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// minMaskedPart is how many of the key's first or last characters a masked
// form must show to be taken for the key.
const minMaskedPart = 4

// replacePartialMasks replaces the masked forms of key in b, such as
// "sk-abc1*****wxyz", "sk-abcd...wxyz", "sk-abcd…wxyz" or "••••wxyz": a run
// of mask characters with the key's first characters before it or its last
// ones after it. Providers put such forms in error messages. A run of mask
// characters next to other text, such as "abc***xyz", is left alone. The
// forms are looked for with escapes decoded (see decodeEscapes), so a mask
// written as "\u2026" or a key character as "%2D" is found too.
func replacePartialMasks(b []byte, key string, sent *sentText) []byte {
	return replaceFound(b, sent, func(view []byte, from int) (int, int) {
		start := partialMaskAt(view, key, from)
		if start < 0 {
			return -1, -1
		}
		return start, maskedPartEnd(view, key, start)
	})
}

// replaceFound replaces each span of b that find returns in b's view with
// escapes decoded (see decodeEscapes), unless the client sent its text.
// find returns the first span at or after from, or a start of -1.
func replaceFound(b []byte, sent *sentText, find func(view []byte, from int) (start, end int)) []byte {
	view, from, to := decodeEscapes(b)
	i := 0 // where the search in view goes on
	return replaceSpans(b, func(last int) (int, int) {
		for {
			start, end := find(view, i)
			if start < 0 {
				return -1, -1
			}
			i = end
			if sent.contains(view[start:end]) {
				continue
			}
			if from != nil {
				start, end = from[start], to[end-1]
			}
			return max(start, last), end
		}
	})
}

// hasPartialMask reports whether s holds a masked form of key, escaped or
// not.
func hasPartialMask(s, key string) bool {
	view, _, _ := decodeEscapes([]byte(s))
	return partialMaskAt(view, key, 0) >= 0
}

// decodeEscapes returns b with its JSON escapes of the Basic Multilingual
// Plane ("\u2026"), "\/" and percent escapes ("%E2%80%A6") decoded. For each
// byte of the result, from and to give the offsets in b of the escape or
// byte it comes from. When b holds no backslash or percent sign, it returns
// b itself and nil offsets.
func decodeEscapes(b []byte) (view []byte, from, to []int) {
	if bytes.IndexByte(b, '\\') < 0 && bytes.IndexByte(b, '%') < 0 {
		return b, nil, nil
	}
	view = make([]byte, 0, len(b))
	from = make([]int, 0, len(b))
	to = make([]int, 0, len(b))
	emit := func(p []byte, start, end int) {
		for _, c := range p {
			view = append(view, c)
			from = append(from, start)
			to = append(to, end)
		}
	}
	for i := 0; i < len(b); {
		switch {
		case b[i] == '\\' && i+1 < len(b) && b[i+1] == '/':
			emit([]byte{'/'}, i, i+2)
			i += 2
			continue
		case b[i] == '\\' && i+5 < len(b) && b[i+1] == 'u':
			hi, ok1 := hexByte(b[i+2], b[i+3])
			lo, ok2 := hexByte(b[i+4], b[i+5])
			if r := rune(hi)<<8 | rune(lo); ok1 && ok2 && !utf16.IsSurrogate(r) {
				emit(utf8.AppendRune(nil, r), i, i+6)
				i += 6
				continue
			}
		case b[i] == '%' && i+2 < len(b):
			if v, ok := hexByte(b[i+1], b[i+2]); ok {
				emit([]byte{v}, i, i+3)
				i += 3
				continue
			}
		}
		emit(b[i:i+1], i, i+1)
		i++
	}
	return view, from, to
}

// partialMaskAt returns the offset, from from on, of the first masked form
// of key in s, or -1. The form begins with the key characters before the
// mask run.
func partialMaskAt[T string | []byte](s T, key string, from int) int {
	for i := from; i < len(s); i++ {
		run, ok := maskRun(s, i)
		if run == 0 {
			continue
		}
		if ok {
			start := i
			for start > from && keyChar(s[start-1], key) {
				start--
			}
			end := i + run
			for end < len(s) && keyChar(s[end], key) {
				end++
			}
			before, after := s[start:i], s[i+run:end]
			if len(before) >= minMaskedPart && len(before) <= len(key) && equalFold(before, key[:len(before)]) ||
				len(after) >= minMaskedPart && len(after) <= len(key) && equalFold(after, key[len(key)-len(after):]) {
				return start
			}
		}
		i += run - 1
	}
	return -1
}

// maskedPartEnd returns the end of the masked form that starts at start.
func maskedPartEnd(b []byte, key string, start int) int {
	i := start
	for i < len(b) && keyChar(b[i], key) {
		i++
	}
	run, _ := maskRun(b, i)
	i += run
	for i < len(b) && keyChar(b[i], key) {
		i++
	}
	return i
}

// maskRun returns the length in bytes of the run of mask characters at i
// ('*', '.', '•' and '…'), and whether it is long enough to mask a key: two
// stars or bullets, three dots or an ellipsis. Shorter runs, such as a
// sentence's full stop, are ordinary text.
func maskRun[T string | []byte](s T, i int) (int, bool) {
	j, marks, dots := i, 0, 0
	for j < len(s) {
		switch {
		case s[j] == '*':
			marks, j = marks+1, j+1
		case s[j] == '.':
			dots, j = dots+1, j+1
		case j+2 < len(s) && s[j] == 0xe2 && s[j+1] == 0x80 && s[j+2] == 0xa2: // •
			marks, j = marks+1, j+3
		case j+2 < len(s) && s[j] == 0xe2 && s[j+1] == 0x80 && s[j+2] == 0xa6: // …
			marks, dots, j = marks+2, dots+3, j+3
		default:
			return j - i, marks >= 2 || dots >= 3
		}
	}
	return j - i, marks >= 2 || dots >= 3
}

// keyChar reports whether c can be part of a provider key: a letter, a
// digit, '-' or '_', or any other character of key.
func keyChar(c byte, key string) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_' ||
		strings.IndexByte(key, c) >= 0
}

func equalFold[T string | []byte](a T, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range len(b) {
		if lowerASCII(a[i]) != lowerASCII(b[i]) {
			return false
		}
	}
	return true
}

// minFragment is how many consecutive characters of the key a text must
// show to be taken for a part of it. The prefixes that providers publish,
// such as "sk-ant-api03-", are shorter, and 16 of a key's random characters
// are very unlikely to turn up in other text.
const minFragment = 16

// keyFragments finds the runs of minFragment or more characters of a key,
// in any letter case. It is built for one scrub, because it holds the key.
type keyFragments struct {
	// grams holds each minFragment-long part of the key, in lower case.
	grams map[string]struct{}
	// pairs has a bit set for each pair of adjacent characters of the key,
	// in lower case, so most positions of other text are passed over
	// without a map lookup.
	pairs [1 << 16 / 64]uint64
}

func newKeyFragments(key string) *keyFragments {
	lower := strings.ToLower(key)
	f := &keyFragments{grams: make(map[string]struct{}, len(lower))}
	for i := 0; i+minFragment <= len(lower); i++ {
		f.grams[lower[i:i+minFragment]] = struct{}{}
	}
	for i := 0; i+1 < len(lower); i++ {
		pair := uint16(lower[i])<<8 | uint16(lower[i+1])
		f.pairs[pair/64] |= 1 << (pair % 64)
	}
	return f
}

// matchAt reports whether the minFragment bytes of s at i are a part of the
// key.
func (f *keyFragments) matchAt(s []byte, i int) bool {
	if i+minFragment > len(s) {
		return false
	}
	pair := uint16(lowerASCII(s[i]))<<8 | uint16(lowerASCII(s[i+1]))
	if f.pairs[pair/64]&(1<<(pair%64)) == 0 {
		return false
	}
	var window [minFragment]byte
	for j := range window {
		window[j] = lowerASCII(s[i+j])
	}
	_, ok := f.grams[string(window[:])]
	return ok
}

// next returns the first run of s, at or after from, made of overlapping
// parts of the key, or -1.
func (f *keyFragments) next(s []byte, from int) (start, end int) {
	for i := from; i+minFragment <= len(s); i++ {
		if !f.matchAt(s, i) {
			continue
		}
		end := i + minFragment
		for f.matchAt(s, end-minFragment+1) {
			end++
		}
		return i, end
	}
	return -1, -1
}

// replaceKeyFragments replaces each run of minFragment or more of the key's
// characters in b, such as a key cut short or with its first characters
// left out. They are looked for with escapes decoded (see decodeEscapes).
func replaceKeyFragments(b []byte, key string, sent *sentText) []byte {
	if len(key) < minFragment || len(b) < minFragment {
		return b
	}
	return replaceFound(b, sent, newKeyFragments(key).next)
}

// lazyFragments builds the keyFragments of a key on first use, so that
// header values too short to hold a fragment cost nothing.
type lazyFragments struct{ f *keyFragments }

// in reports whether s holds a run of minFragment or more of the key's
// characters, escaped or not.
func (l *lazyFragments) in(s, key string) bool {
	if len(key) < minFragment || len(s) < minFragment {
		return false
	}
	if l.f == nil {
		l.f = newKeyFragments(key)
	}
	view, _, _ := decodeEscapes([]byte(s))
	start, _ := l.f.next(view, 0)
	return start >= 0
}
