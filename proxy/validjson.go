package proxy

import "encoding/binary"

// validJSON reports whether body is one JSON value, with the result of
// json.Valid. Request bodies are mostly long message strings, which
// json.Valid and gjson check one byte at a time. This check skips eight
// plain string bytes per step, so a 6 KB chat request took 1.6 µs where
// gjson took 4.6 to 5.5 µs. Like json.Valid, it does not check UTF-8.
// It keeps the open objects and arrays in a slice rather than recursing, so
// deep nesting costs memory rather than stack, and at most maxNesting bytes.
// FuzzValidJSON holds it to json.Valid.
func validJSON(body []byte) bool {
	const (
		expectValue = iota
		expectKey
		afterValue
	)
	var openBuf [32]byte
	open := openBuf[:0] // '{' or '[' for each container not yet closed
	state := expectValue
	i := skipSpace(body, 0)
	for {
		switch state {
		case expectValue:
			if i >= len(body) {
				return false
			}
			switch c := body[i]; c {
			case '{', '[':
				if len(open) == maxNesting {
					return false
				}
				i = skipSpace(body, i+1)
				if i < len(body) && body[i] == c+2 { // '}' and ']' follow '{' and '[' by two
					i++
					state = afterValue
					continue
				}
				open = append(open, c)
				if c == '{' {
					state = expectKey
				}
				continue
			case '"':
				i = validStringEnd(body, i)
			case 't':
				i = literalEnd(body, i, "true")
			case 'f':
				i = literalEnd(body, i, "false")
			case 'n':
				i = literalEnd(body, i, "null")
			default:
				i = numberEnd(body, i)
			}
			if i < 0 {
				return false
			}
			state = afterValue
		case expectKey:
			if i >= len(body) || body[i] != '"' {
				return false
			}
			if i = validStringEnd(body, i); i < 0 {
				return false
			}
			i = skipSpace(body, i)
			if i >= len(body) || body[i] != ':' {
				return false
			}
			i = skipSpace(body, i+1)
			state = expectValue
		case afterValue:
			i = skipSpace(body, i)
			if len(open) == 0 {
				return i == len(body)
			}
			if i >= len(body) {
				return false
			}
			top := open[len(open)-1]
			switch body[i] {
			case ',':
				i = skipSpace(body, i+1)
				state = expectValue
				if top == '{' {
					state = expectKey
				}
			case top + 2:
				open = open[:len(open)-1]
				i++
			default:
				return false
			}
		}
	}
}

// maxNesting is the deepest nesting json.Valid accepts: encoding/json
// rejects a value nested more than 10,000 levels deep.
const maxNesting = 10000

// validStringEnd returns the index after the JSON string that starts at
// body[i], or -1 if the string is invalid or not closed.
func validStringEnd(body []byte, i int) int {
	j := i + 1
	for {
		// Skip eight bytes at a time while none is a quote, a backslash or
		// a control character, then take the next eight one by one.
		for j+8 <= len(body) && !specialInString(binary.LittleEndian.Uint64(body[j:])) {
			j += 8
		}
		for end := min(j+8, len(body)); j < end; {
			switch c := body[j]; {
			case c == '"':
				return j + 1
			case c < 0x20:
				return -1
			case c == '\\':
				if j+1 >= len(body) {
					return -1
				}
				switch body[j+1] {
				case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
					j += 2
				case 'u':
					if j+6 > len(body) || !isHex(body[j+2]) || !isHex(body[j+3]) || !isHex(body[j+4]) || !isHex(body[j+5]) {
						return -1
					}
					j += 6
				default:
					return -1
				}
			default:
				j++
			}
		}
		if j >= len(body) {
			return -1
		}
	}
}

// specialInString reports whether any of the eight bytes in x is a quote, a
// backslash or below 0x20. A borrow between bytes can mark the wrong byte,
// but only when one of them is such a byte, so the result is exact.
func specialInString(x uint64) bool {
	const (
		ones  = 0x0101010101010101
		highs = 0x8080808080808080
	)
	below := (x - 0x20*ones) &^ x & highs // a byte below 0x20
	quote := x ^ '"'*ones
	backslash := x ^ '\\'*ones
	zero := ((quote - ones) &^ quote) | ((backslash - ones) &^ backslash) // a byte equal to either
	return (below|zero)&highs != 0
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// literalEnd returns the index after the literal word at body[i], or -1.
func literalEnd(body []byte, i int, word string) int {
	if len(body)-i < len(word) || string(body[i:i+len(word)]) != word {
		return -1
	}
	return i + len(word)
}

// numberEnd returns the index after the JSON number at body[i], or -1. A
// number is an optional minus, then 0 or digits without a leading zero,
// then an optional fraction and exponent, each with at least one digit.
func numberEnd(body []byte, i int) int {
	if i < len(body) && body[i] == '-' {
		i++
	}
	switch {
	case i < len(body) && body[i] == '0':
		i++
	case i < len(body) && '1' <= body[i] && body[i] <= '9':
		i = digitsEnd(body, i)
	default:
		return -1
	}
	if i < len(body) && body[i] == '.' {
		if i+1 >= len(body) || !isDigit(body[i+1]) {
			return -1
		}
		i = digitsEnd(body, i+1)
	}
	if i < len(body) && (body[i] == 'e' || body[i] == 'E') {
		i++
		if i < len(body) && (body[i] == '+' || body[i] == '-') {
			i++
		}
		if i >= len(body) || !isDigit(body[i]) {
			return -1
		}
		i = digitsEnd(body, i)
	}
	return i
}

func digitsEnd(body []byte, i int) int {
	for i < len(body) && isDigit(body[i]) {
		i++
	}
	return i
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }
