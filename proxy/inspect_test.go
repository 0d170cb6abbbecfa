package proxy

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"
)

// TestReadRequestInfoErrors checks the error of each kind of body the walk
// rejects, because on the shared key the client gets that message.
func TestReadRequestInfoErrors(t *testing.T) {
	cases := []struct {
		body string
		want string
	}{
		{`{"model":`, "the request body is not valid JSON"},
		{`null`, "the request body is not a JSON object"},
		{` [{"model":"m"}]`, "the request body is not a JSON object"},
		{`{"model":1}`, `invalid "model" in the request body: send a string`},
		{`{"stream":"yes"}`, `invalid "stream" in the request body: send true or false`},
		{`{"previous_response_id":{}}`, `invalid "previous_response_id" in the request body: send a string`},
		{`{"stream":true,"x":{"stream":1},"stream":false}`, `the request body names "stream" more than once; send each field once`},
	}
	for _, c := range cases {
		_, err := readRequestInfo([]byte(c.body))
		if err == nil {
			t.Errorf("%s: no error, want %q", c.body, c.want)
			continue
		}
		if err.Error() != c.want {
			t.Errorf("%s: error %q, want %q", c.body, err, c.want)
		}
	}

	var dup *duplicateFieldError
	if _, err := readRequestInfo([]byte(`{"model":"a","mod\u0065l":"b"}`)); !errors.As(err, &dup) || dup.name != "model" {
		t.Errorf("an escaped second model: error %v, want a duplicate model", err)
	}
	info, err := readRequestInfo([]byte(`{"messages":[{"model":"x","stream":true}],"MODEL":"y","model":"m","stream":null}`))
	if err != nil {
		t.Fatalf("valid body: %v", err)
	}
	if info.Model != "m" || info.Stream {
		t.Errorf("valid body read as model %q stream %v, want model \"m\" and no stream", info.Model, info.Stream)
	}
}

// validJSONCases are bodies at the edges of the JSON grammar, where a fast
// validator is most likely to part from json.Valid.
var validJSONCases = []string{
	`{}`, ` {"a" : [true, false, null, -0, 1.5e+3, "x"]} `, `"\u00e9\ud83d\ude00"`,
	`{"a":"\ud800"}`, "\"\xff\xfe\"", `[1,2,]`, `{"a":1,}`, `{"a" 1}`, `01`, `-`, `1.`, `1e`,
	`.5`, `+1`, `1e+`, `0x10`, `"\x41"`, `"\u12"`, `"\u12G4"`, "\"a\tb\"", "\"a\nb\"",
	"\"\x0e\"", "\"\x7f\"", "\ufeff{}", "{}\x00", "\f{}", "\v{}", `{}{}`, `{} x`, `tru`,
	`nul`, `[`, `]`, `{"a":{"b":[{"c":[]}]}}`, `NaN`, `Infinity`, `'a'`, `{"a":"b"`,
	`"\/"`, `"\'"`, `[}`, `{]`, `{"a":1]`, `[1}`, `{"a":1 "b":2}`, `[[]`, `[]]`, `{"a"}`,
	`{1:2}`, `[-01]`, `[1.5e]`, `[1E-7, -0.0e+00]`, `"\u00`, `"abc\`, `[true false]`,
}

// TestSpecialInString checks the eight-byte test of validStringEnd against
// a byte-by-byte one: every byte value at every place among plain bytes,
// and random words.
func TestSpecialInString(t *testing.T) {
	special := func(block []byte) bool {
		for _, c := range block {
			if c == '"' || c == '\\' || c < 0x20 {
				return true
			}
		}
		return false
	}
	check := func(block []byte) {
		t.Helper()
		if got, want := specialInString(binary.LittleEndian.Uint64(block)), special(block); got != want {
			t.Errorf("specialInString(%q) = %v, want %v", block, got, want)
		}
	}
	for at := range 8 {
		for c := range 256 {
			for _, fill := range []byte{'a', ' ', 0x7f, 0xff} {
				block := bytes.Repeat([]byte{fill}, 8)
				block[at] = byte(c)
				check(block)
			}
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	block := make([]byte, 8)
	for range 200000 {
		binary.LittleEndian.PutUint64(block, rng.Uint64())
		check(block)
	}
}

// TestValidJSONStringBlocks checks validJSON against json.Valid on strings
// with a quote, a backslash, an escape or a control character at every
// place in and across the eight-byte blocks it skips.
func TestValidJSONStringBlocks(t *testing.T) {
	specials := []string{`"`, `\`, `\\`, `\"`, `\\"`, `\u00e9`, `\u00`, `\x`, "\x00", "\x1f", " ", "\x7f", "\x80", "\xff"}
	for at := range 20 {
		for _, special := range specials {
			for tail := range 10 {
				body := `"` + strings.Repeat("a", at) + special + strings.Repeat("b", tail) + `"`
				for _, c := range []string{body, "[" + body + "]", body[:len(body)-1]} {
					if got, want := validJSON([]byte(c)), json.Valid([]byte(c)); got != want {
						t.Errorf("validJSON(%q) = %v, json.Valid returns %v", c, got, want)
					}
				}
			}
		}
	}
}

// TestValidJSONAgreesWithEncodingJSON checks validJSON against json.Valid on
// the edge cases, and on bodies nested deeper than its first 32 levels and
// around encoding/json's limit.
func TestValidJSONAgreesWithEncodingJSON(t *testing.T) {
	cases := slices.Clone(validJSONCases)
	for _, depth := range []int{31, 32, 33, maxNesting, maxNesting + 1, 20000} {
		cases = append(cases,
			strings.Repeat("[", depth)+strings.Repeat("]", depth),
			strings.Repeat(`{"a":`, depth)+"1"+strings.Repeat("}", depth),
			strings.Repeat("[", depth))
	}
	for _, c := range cases {
		if got, want := validJSON([]byte(c)), json.Valid([]byte(c)); got != want {
			t.Errorf("validJSON(%.40q) = %v, json.Valid returns %v", c, got, want)
		}
	}
}

// FuzzValidJSON checks that validJSON and json.Valid agree on any input.
func FuzzValidJSON(f *testing.F) {
	for _, c := range validJSONCases {
		f.Add([]byte(c))
	}
	f.Add(benchChatBody)
	f.Fuzz(func(t *testing.T, body []byte) {
		if got, want := validJSON(body), json.Valid(body); got != want {
			t.Fatalf("validJSON(%q) = %v, json.Valid returns %v", body, got, want)
		}
	})
}

// scanObjectCases are objects whose members the walk must find where
// encoding/json does: escaped quotes after runs of backslashes, nesting,
// and strings that contain brackets.
var scanObjectCases = []string{
	`{"a":"x\\","b":"y"}`, `{"a":"x\\\"","b":1}`, `{"a":"\\\\\"\\","b":[]}`,
	`{"a\"b":"\"","c":{"d":"}]"}}`, `{"a":["[{\"",{"b":"\\"}],"c":null}`,
	`{ "a" : "" , "b" : "\u0022" }`, `{"\u0061":"\\\\","b":"\/\""}`,
	`{"a":"` + strings.Repeat(`\\`, 40) + `","b":"` + strings.Repeat(`x\"`, 40) + `"}`,
}

// TestScanObjectAgreesWithEncodingJSON checks that scanObject finds the
// value encoding/json reads for each member of the objects above.
func TestScanObjectAgreesWithEncodingJSON(t *testing.T) {
	for _, c := range append(scanObjectCases, string(benchChatBody)) {
		checkScanObject(t, []byte(c))
	}
}

// FuzzScanObject checks scanObject against encoding/json on any object.
func FuzzScanObject(f *testing.F) {
	for _, c := range scanObjectCases {
		f.Add([]byte(c))
	}
	f.Add(benchChatBody)
	f.Fuzz(func(t *testing.T, body []byte) {
		checkScanObject(t, body)
	})
}

// checkScanObject fails t unless scanObject visits, for each member of the
// JSON object body, the bytes that json.Unmarshal reads for it. Bodies
// that are not valid objects, or that repeat a name, are left out, and so
// are those with invalid UTF-8, whose names encoding/json rewrites.
func checkScanObject(t *testing.T, body []byte) {
	t.Helper()
	var want map[string]json.RawMessage
	if !utf8.Valid(body) || json.Unmarshal(body, &want) != nil || want == nil {
		return
	}
	names := slices.Sorted(maps.Keys(want))
	if len(names) > 64 {
		names = names[:64]
	}
	got := map[string]string{}
	err := scanObject(body, names, func(field, at int, value []byte) error {
		if string(body[at:at+len(value)]) != string(value) {
			t.Errorf("scanObject(%q): value of %q is not at offset %d", body, names[field], at)
		}
		got[names[field]] = string(value)
		return nil
	})
	var dup *duplicateFieldError
	if errors.As(err, &dup) {
		return
	}
	if err != nil {
		t.Fatalf("scanObject(%q) = %v for a valid object", body, err)
	}
	for _, name := range names {
		if got[name] != string(want[name]) {
			t.Errorf("scanObject(%q): member %q is %q, encoding/json reads %q", body, name, got[name], want[name])
		}
	}
}

// patchIncludeUsage reads body as the proxy does and then sets
// stream_options.include_usage in it.
func patchIncludeUsage(body []byte) ([]byte, error) {
	info, err := readRequestInfo(body)
	if err != nil {
		return nil, err
	}
	return info.withIncludeUsage(body)
}

// decodeFieldCases are field values whose decoding must match
// encoding/json's, on the fast path and off it.
var decodeFieldCases = []string{
	`"gpt-4o"`, `""`, `"caf\u00e9"`, `"a\"b"`, `"a\\b"`, "\"tab\there\"", "\"\xff\xfe\"",
	`"é"`, `null`, `true`, `false`, `1`, `"`, `"a`, `a"`, `"a"b"`, ` "a"`, `{}`, `[]`, `True`,
}

// checkDecodeField fails t unless decodeString and decodeBool agree with
// json.Unmarshal on value: the same error or none, and the same result.
func checkDecodeField(t *testing.T, value []byte) {
	t.Helper()
	gotS, wantS := "before", "before"
	gotErr, wantErr := decodeString(value, &gotS), json.Unmarshal(value, &wantS)
	if (gotErr == nil) != (wantErr == nil) {
		t.Errorf("decodeString(%q) error %v; encoding/json gives %v", value, gotErr, wantErr)
	}
	if gotS != wantS {
		t.Errorf("decodeString(%q) = %q; encoding/json gives %q", value, gotS, wantS)
	}

	gotB, wantB := true, true
	gotErr, wantErr = decodeBool(value, &gotB), json.Unmarshal(value, &wantB)
	if (gotErr == nil) != (wantErr == nil) {
		t.Errorf("decodeBool(%q) error %v; encoding/json gives %v", value, gotErr, wantErr)
	}
	if gotB != wantB {
		t.Errorf("decodeBool(%q) = %v; encoding/json gives %v", value, gotB, wantB)
	}
}

func TestDecodeFieldAgreesWithEncodingJSON(t *testing.T) {
	for _, c := range decodeFieldCases {
		checkDecodeField(t, []byte(c))
	}
}

// FuzzDecodeField checks decodeString and decodeBool against
// encoding/json on any input.
func FuzzDecodeField(f *testing.F) {
	for _, c := range decodeFieldCases {
		f.Add([]byte(c))
	}
	f.Fuzz(func(t *testing.T, value []byte) {
		checkDecodeField(t, value)
	})
}

// TestWithIncludeUsageKeepsBytes checks that adding include_usage changes
// stream_options only: the provider gets the client's other bytes as sent,
// with their order, spacing and escapes.
func TestWithIncludeUsageKeepsBytes(t *testing.T) {
	cases := []struct{ body, want string }{
		{`{"model":"m","stream":true,"messages":[{"content":"<b>&amp;</b> \u00e9"}]}`,
			`{"model":"m","stream":true,"messages":[{"content":"<b>&amp;</b> \u00e9"}],"stream_options":{"include_usage":true}}`},
		{` { "stream" : true } `, ` { "stream" : true ,"stream_options":{"include_usage":true}} `},
		{`{"Stream_Options":{"include_usage":false}}`, `{"Stream_Options":{"include_usage":false},"stream_options":{"include_usage":true}}`},
		{`{}`, `{"stream_options":{"include_usage":true}}`},
		{"{ \n}", "{ \n\"stream_options\":{\"include_usage\":true}}"},
		{`{"z":1,"stream_options":null,"a":2}`, `{"z":1,"stream_options":{"include_usage":true},"a":2}`},
		{`{"stream_options": {"include_usage":false,"x":[1]} ,"a":2}`, `{"stream_options": {"include_usage":true,"x":[1]} ,"a":2}`},
		{`{"stream_options":{"include\u005fusage":false}}`, `{"stream_options":{"include\u005fusage":true}}`},
		{`{"stream_options":{"zeta":1,"alpha":"<b>&amp;","include_usage":false,"obf":  [1, 2]}}`,
			`{"stream_options":{"zeta":1,"alpha":"<b>&amp;","include_usage":true,"obf":  [1, 2]}}`},
		{"{\"stream_options\":{\"\xff\":1, \"Include_Usage\":false }}", "{\"stream_options\":{\"\xff\":1, \"Include_Usage\":false ,\"include_usage\":true}}"},
		{`{"stream_options":{ }}`, `{"stream_options":{ "include_usage":true}}`},
		{`{"stream_options":{"include_usage":false,"include_usage":null}}`, `{"stream_options":{"include_usage":true}}`},
	}
	for _, c := range cases {
		got, err := patchIncludeUsage([]byte(c.body))
		if err != nil {
			t.Errorf("%s: %v", c.body, err)
			continue
		}
		if string(got) != c.want {
			t.Errorf("%s:\n got %s\nwant %s", c.body, got, c.want)
		}
	}
	for _, body := range []string{`{"stream_options":"yes"}`, `{"stream_options":[]}`, `[]`, `null`, `{"a":`, `{"stream_options":{},"stream_options":null}`} {
		if got, err := patchIncludeUsage([]byte(body)); err == nil {
			t.Errorf("%s: rewritten as %s, want an error", body, got)
		}
	}
}
