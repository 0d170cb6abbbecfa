package audit

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"
)

// requestJSON is the wire form of a request event as encoding/json renders
// it: every field present, and key_last4 only on byok events.
type requestJSON struct {
	Time         string `json:"time"`
	Kind         string `json:"kind"`
	RequestID    string `json:"request_id"`
	Mailbox      string `json:"mailbox"`
	Provider     string `json:"provider"`
	Source       string `json:"source"`
	KeyLast4     string `json:"key_last4,omitempty"`
	Model        string `json:"model"`
	Method       string `json:"method"`
	Path         string `json:"path"`
	Status       int    `json:"status"`
	Stream       bool   `json:"stream"`
	InputTokens  int64  `json:"input_tokens"`
	OutputTokens int64  `json:"output_tokens"`
	DurationMS   int64  `json:"duration_ms"`
	Error        string `json:"error"`
}

// referenceJSON renders a request event with encoding/json, as
// MarshalJSON did before it appended the fields itself.
func referenceJSON(e Event) []byte {
	last4 := ""
	if e.Kind == KindBYOK {
		last4 = e.KeyLast4
	}
	out, err := json.Marshal(requestJSON{
		Time: e.Time.UTC().Format(time.RFC3339Nano), Kind: e.Kind, RequestID: e.RequestID,
		Mailbox: e.Mailbox, Provider: e.Provider, Source: e.Kind, KeyLast4: last4, Model: e.Model,
		Method: e.Method, Path: e.Path, Status: e.Status, Stream: e.Stream,
		InputTokens: e.InputTokens, OutputTokens: e.OutputTokens,
		DurationMS: e.DurationMS, Error: e.Error,
	})
	if err != nil {
		panic(err)
	}
	return out
}

// TestRequestEventJSONMatchesEncoding compares MarshalJSON with
// encoding/json on strings that need each kind of escape.
func TestRequestEventJSONMatchesEncoding(t *testing.T) {
	strs := []string{
		"", "plain", `quote"`, `back\slash`, "a<b", "a>b", "a&b", "<tag>&amp;", "tab\tnewline\n", "\x00", "\x1f", "\x7f",
		"caf\u00e9", "\u2028\u2029", "\xff\xfe invalid", "emoji \U0001F600", "a/b?c=d#e",
	}
	times := []time.Time{
		time.Date(2026, 12, 5, 19, 30, 1, 123456789, time.UTC),
		time.Date(2026, 1, 2, 3, 4, 5, 0, time.FixedZone("x", -7*3600)),
		{},
	}
	for i, s := range strs {
		for _, kind := range []string{KindBYOK, KindMetered} {
			e := Event{
				Time: times[i%len(times)], Kind: kind, RequestID: s, Mailbox: s, Provider: s,
				KeyLast4: s, Model: s, Method: s, Path: "/openai/" + s, Status: 200 + i,
				Stream: i%2 == 0, InputTokens: int64(i) * 1000, OutputTokens: -int64(i),
				DurationMS: 1 << 40, Error: s,
			}
			got, err := e.MarshalJSON()
			if err != nil {
				t.Fatalf("%q: %v", s, err)
			}
			if want := referenceJSON(e); !bytes.Equal(got, want) {
				t.Errorf("%s event with %q:\n got %s\nwant %s", kind, s, got, want)
			}
		}
	}
}

// FuzzRequestEventJSON holds MarshalJSON to encoding/json's bytes for any
// field values.
func FuzzRequestEventJSON(f *testing.F) {
	f.Add(true, "r1", "alice@example.com", "gpt-4o", "/openai/v1/chat", "", "WXYZ", int64(1700000000123), 200, int64(10), int64(20))
	f.Add(false, "\u2028", "<m>", "\xff", `"\`, "cut off: \x00", "", int64(-1), -5, int64(-1), int64(1<<62))
	f.Fuzz(func(t *testing.T, byok bool, id, mb, model, path, errText, last4 string, nanos int64, status int, in, out int64) {
		kind := KindMetered
		if byok {
			kind = KindBYOK
		}
		e := Event{
			Time: time.Unix(0, nanos), Kind: kind, RequestID: id, Mailbox: mb, Provider: "openai",
			KeyLast4: last4, Model: model, Method: "POST", Path: path, Status: status,
			Stream: status%2 == 0, InputTokens: in, OutputTokens: out, DurationMS: in ^ out, Error: errText,
		}
		got, err := e.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		if want := referenceJSON(e); !bytes.Equal(got, want) {
			t.Fatalf("got  %s\nwant %s", got, want)
		}
	})
}
