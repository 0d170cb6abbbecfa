package proxy

import (
	"bytes"
	"net/http"
	"unicode/utf16"
	"unicode/utf8"
)

// redacted is the text that replaces each form of the key in a response.
const redacted = "[REDACTED]"

// scrubKey replaces every form of key in body from which a client could
// read the key or a part of it. That is the key in any letter case, with
// any of its characters percent-encoded or written as a JSON escape. It is
// also any text that looks like a provider key, masked or cut short (see
// findKeyLike).
//
// Only the whole key is matched against key itself. Provider errors repeat
// what the client sent, such as a model name. Were part of a text replaced
// because it matches the key, a client could send guesses and read the
// key one character at a time. Guessing the whole key at once gains
// nothing.
//
// The key's characters after its published prefix are matched as a whole
// too, because they are as random as the whole key and an upstream may
// quote them alone.
func scrubKey(body []byte, key string) []byte {
	if key == "" {
		return body
	}
	body = replaceKeyForms(body, key)
	if rest := keyBody(key); rest != "" {
		body = replaceKeyForms(body, rest)
	}
	return replaceFound(body, findKeyLike)
}

// keyBody returns the characters of key after its published prefix, or ""
// when key has no such prefix or too few characters after it.
func keyBody(key string) string {
	if n := keyPrefixLen(key); n > 0 && len(key)-n >= minKeyBody {
		return key[n:]
	}
	return ""
}

// minKeyBody is the minimum length of the key's characters after its prefix
// that scrubKey matches on their own. Every provider's key has far more.
const minKeyBody = 16

func scrubText(s, key string) string {
	return string(scrubKey([]byte(s), key))
}

// scrubHeaders removes the injected key from response header values, such as
// a WWW-Authenticate or a redirect's Location that quotes it, and drops a
// header whose name contains it. Text that looks like a key is looked for
// only when masked is set (error and redirect responses, trailers and 1xx
// responses), because looking for it costs a pass over every value.
func scrubHeaders(h http.Header, key string, masked bool) {
	if key == "" {
		return
	}
	rest := keyBody(key)
	for name, values := range h {
		// Every form of the key is at least as long as the key, which is
		// longer than most names and values, so the length is checked
		// first. A name is compared in any letter case because Go rewrites
		// a name's case when it reads it.
		if len(name) >= len(key) && indexKeyForm(name, key) >= 0 ||
			rest != "" && len(name) >= len(rest) && indexKeyForm(name, rest) >= 0 {
			delete(h, name)
			continue
		}
		for i, v := range values {
			if len(v) >= len(key) && indexKeyForm(v, key) >= 0 ||
				rest != "" && len(v) >= len(rest) && indexKeyForm(v, rest) >= 0 || masked && hasKeyLike(v) {
				values[i] = scrubText(v, key)
			}
		}
	}
}

// scrubCutEnd replaces the last word of a body that was cut short, which
// may be the start of the key in any of its forms: scrubKey matches only
// the whole key. The word is replaced whatever it holds, so that the
// replacement gives the client nothing about the key.
func scrubCutEnd(body []byte) []byte {
	i := len(body)
	for i > 0 && cutWordByte(body[i-1]) {
		i--
	}
	if i == len(body) {
		return body
	}
	return append(body[:i:i], redacted...)
}

// cutWordByte reports whether c can belong to a key in any of its forms,
// escaped or masked: a key character, an escape's '%' or '\\', a mask's
// '*' or '.', or a byte of a multi-byte character such as '…'.
func cutWordByte(c byte) bool {
	return tokenChar(c) || c == '%' || c == '\\' || c == '*' || c == '.' || c >= 0x80
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

// minMaskedPart is how many characters a masked form must show after its
// mask to be taken for a key's last characters.
const minMaskedPart = 4

// keyPrefixes are the prefixes that the providers publish for their keys,
// in lower case, longest first: text that names a prefix alone, such as
// "keys start with sk-ant-api03-", is not taken for a key.
var keyPrefixes = []string{
	"sk-ant-admin01-", "sk-ant-api03-", "sk-svcacct-", "sk-admin-", "sk-proj-", "sk-ant-", "sk-", "aiza",
}

// findKeyLike returns the first span of s, at or after from, that looks
// like a provider key, or a start of -1. That is either
//   - a word that starts with a published key prefix and has four or more
//     characters or a mask after it, such as "sk-proj-Ab12****wxyz",
//     "sk-ant-api03-Xy7Qp2" or "AIzaSy…", or
//   - a mask that starts a word and has four or more key characters after
//     it, such as "••••wxyz" or "...WXYZ".
//
// Neither depends on the key itself, so whether a text is replaced gives
// a client nothing about the key (see scrubKey). For the same reason, a
// part of the key without its prefix, such as its middle characters, is
// not found. Callers pass a view with escapes decoded (see decodeEscapes).
func findKeyLike(s []byte, from int) (start, end int) {
	for i := from; i < len(s); i++ {
		wordStart := i == 0 || !alnum(s[i-1])
		if !wordStart {
			continue
		}
		if n := keyPrefixLen(s[i:]); n > 0 {
			end, masked := keyLikeEnd(s, i+n)
			if masked || end-(i+n) >= minMaskedPart {
				return i, end
			}
			continue
		}
		if i > 0 && tokenChar(s[i-1]) {
			continue
		}
		run, _, standalone := maskRun(s, i)
		if standalone {
			end := i + run
			for end < len(s) && tokenChar(s[end]) {
				end++
			}
			if end-(i+run) >= minMaskedPart {
				return i, end
			}
		}
		if run > 1 {
			// The rest of the run starts no mask of its own that this
			// one did not, and scanning it again for each of its bytes
			// would take quadratic time.
			i += run - 1
		}
	}
	return -1, -1
}

// keyPrefixLen returns the length of the longest published key prefix that
// s starts with, in any letter case, or 0.
func keyPrefixLen[T string | []byte](s T) int {
	for _, p := range keyPrefixes {
		if len(s) >= len(p) && equalFold(s[:len(p)], p) {
			return len(p)
		}
	}
	return 0
}

// keyLikeEnd returns where the key characters and masks from i on end, and
// whether there was a mask among them.
func keyLikeEnd(s []byte, i int) (end int, masked bool) {
	for i < len(s) {
		if tokenChar(s[i]) {
			i++
			continue
		}
		run, ok, _ := maskRun(s, i)
		if !ok {
			break
		}
		i += run
		masked = true
	}
	return i, masked
}

// replaceFound replaces each span of b that find returns in b's view with
// escapes decoded (see decodeEscapes). find returns the first span at or
// after from, or a start of -1.
func replaceFound(b []byte, find func(view []byte, from int) (start, end int)) []byte {
	view, from, to := decodeEscapes(b)
	i := 0 // where the search in view goes on
	return replaceSpans(b, func(last int) (int, int) {
		start, end := find(view, i)
		if start < 0 {
			return -1, -1
		}
		i = end
		if from != nil {
			start, end = from[start], to[end-1]
		}
		return max(start, last), end
	})
}

// hasKeyLike reports whether s holds text that looks like a provider key
// (see findKeyLike), escaped or not.
func hasKeyLike(s string) bool {
	view, _, _ := decodeEscapes([]byte(s))
	start, _ := findKeyLike(view, 0)
	return start >= 0
}

// decodeEscapes returns b with its JSON escapes ("\u2026" within the Basic
// Multilingual Plane, "\n", "\/" and the like) and percent escapes
// ("%E2%80%A6") decoded. For each
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
		case b[i] == '\\' && i+1 < len(b) && jsonEscapes[b[i+1]] != 0:
			emit([]byte{jsonEscapes[b[i+1]]}, i, i+2)
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

// jsonEscapes maps the letter of each two-character JSON escape to the
// byte it stands for. A key that follows "\\n" in a message then starts a
// word in the decoded view, as it does in the text the message holds.
var jsonEscapes = [256]byte{'"': '"', '\\': '\\', '/': '/', 'b': '\b', 'f': '\f', 'n': '\n', 'r': '\r', 't': '\t'}

// maskRun returns the length in bytes of the run of mask characters at i
// ('*', '.', '•' and '…'). inWord reports whether the run can mask a key
// within a word: two stars or bullets, three dots or an ellipsis.
// standalone reports whether it can at the start of a word: three stars or
// bullets, three dots or an ellipsis. Shorter runs, such as a sentence's
// full stop or Markdown's "**", are ordinary text.
func maskRun[T string | []byte](s T, i int) (n int, inWord, standalone bool) {
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
			marks, dots, j = marks+3, dots+3, j+3
		default:
			return j - i, marks >= 2 || dots >= 3, marks >= 3 || dots >= 3
		}
	}
	return j - i, marks >= 2 || dots >= 3, marks >= 3 || dots >= 3
}

// tokenChar reports whether c can be part of a provider key: a letter, a
// digit, '-', '_', '+' or '/'.
func tokenChar(c byte) bool {
	return alnum(c) || c == '-' || c == '_' || c == '+' || c == '/'
}

func alnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
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
