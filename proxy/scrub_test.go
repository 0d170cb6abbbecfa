package proxy

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
)

// jsonEscaped writes every character of s as a JSON \u escape, with the
// hex digits in upper case when upper is set.
func jsonEscaped(s string, upper bool) string {
	var b strings.Builder
	for _, c := range []byte(s) {
		if upper {
			fmt.Fprintf(&b, `\u%04X`, c)
		} else {
			fmt.Fprintf(&b, `\u%04x`, c)
		}
	}
	return b.String()
}

// percentEncoded writes every character of s as a %XX escape.
func percentEncoded(s string) string {
	var b strings.Builder
	for _, c := range []byte(s) {
		fmt.Fprintf(&b, "%%%02X", c)
	}
	return b.String()
}

func TestScrubKeyForms(t *testing.T) {
	const key = "sk-proj-Ab12Cd34/Ef56Gh78_Ij90Kl12-WXYZ"
	cases := []struct {
		name string
		text string
	}{
		{"raw", "key " + key + " is invalid"},
		{"upper case", "KEY " + strings.ToUpper(key) + " IS INVALID"},
		{"lower case", "key " + strings.ToLower(key)},
		{"query escaped", "k=" + url.QueryEscape(key)},
		{"path escaped", "/v1/" + url.PathEscape(key)},
		{"every character percent-encoded", "k=" + percentEncoded(key)},
		{"JSON escaped dashes", `{"m":"` + strings.ReplaceAll(key, "-", `\u002d`) + `"}`},
		{"JSON escaped slash", `{"m":"` + strings.ReplaceAll(key, "/", `\/`) + `"}`},
		{"JSON escaped throughout", `{"m":"` + jsonEscaped(key, false) + `"}`},
		{"JSON escaped in upper-case hex", `{"m":"` + jsonEscaped(key, true) + `"}`},
		{"stars", "provided: sk-proj-Ab1************WXYZ."},
		{"two stars", "provided: sk-proj-Ab12**WXYZ."},
		{"three dots", "provided: sk-proj-Ab12...WXYZ."},
		{"ellipsis", "provided: sk-proj-Ab12…WXYZ."},
		{"bullets", "provided: ••••••WXYZ"},
		{"first characters only", "provided: sk-proj-Ab12..."},
		{"last characters only, lower case", "provided: ...wxyz"},
		{"escaped ellipsis", `{"m":"provided: ` + key[:20] + `\u2026"}`},
		{"escaped bullets", `{"m":"provided: \u2022\u2022\u2022\u2022` + key[len(key)-8:] + `"}`},
		{"percent-encoded first characters", "k=%73%6B%2D" + key[3:20] + "..."},
		{"percent-encoded ellipsis", "k=" + key[:20] + "%E2%80%A6"},
		{"escaped last characters", `{"m":"` + key[:10] + `...` + jsonEscaped(key[len(key)-4:], false) + `"}`},
		{"after a JSON newline", `{"m":"Error code: 401\nIncorrect API key provided:\n` + key[:12] + `…WXYZ"}`},
		{"after a JSON tab", `{"m":"key:\t` + key[:len(key)-1] + `"}`},
		{"mask after a JSON newline", `{"m":"key\n•••WXYZ"}`},
		{"without its prefix", "key " + strings.TrimPrefix(key, "sk-proj-") + " is invalid"},
		{"without its prefix, JSON escaped", `{"m":"` + jsonEscaped(strings.TrimPrefix(key, "sk-proj-"), false) + `"}`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := scrubText(c.text, key)
			if !strings.Contains(got, redacted) {
				t.Fatalf("nothing redacted in %q", got)
			}
			for _, part := range []string{"Ab12", "WXYZ", "wxyz", "ab12", "Ij90", `\u0057\u0058`} {
				if strings.Contains(got, part) {
					t.Errorf("%q still shows %q", got, part)
				}
			}
			if strings.Contains(got, `\u00`) && !strings.Contains(c.text[:4], `\u`) && strings.Contains(c.name, "JSON") {
				t.Errorf("an escape of the key is left: %q", got)
			}
		})
	}
}

func TestScrubKeyLeavesOtherText(t *testing.T) {
	const key = "sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12WXYZ"
	for _, text := range []string{
		"Rate limit reached... please wait and retry.",
		"Please see https://platform.openai.com/account/api-keys.",
		"**Note**: the model is overloaded…",
		"You exceeded your quota. Check your plan and billing details.",
		`{"error":{"message":"Invalid \u0022model\u0022","type":"invalid_request_error"}}`,
		"model gpt-4o... not found",
		"sk-",
		"Invalid value *** in messages[0]; field password=abc***xyz",
	} {
		if got := scrubText(text, key); got != text {
			t.Errorf("scrubText(%q) = %q, want it unchanged", text, got)
		}
	}
}

func TestScrubKeyLikeText(t *testing.T) {
	const key = "sk-ant-api03-Xy7Qp2Lm9Rt4Vb6Nc8Jd1Hf3Kg5Ws0-AbCd"
	secret := strings.ToLower(key[len("sk-ant-api03-"):])
	cases := []struct {
		name string
		text string
	}{
		{"all but the last characters", "key " + key[:len(key)-3] + " is invalid"},
		{"first characters", "key " + key[:20] + ", then"},
		{"upper case", "KEY " + strings.ToUpper(key[:40])},
		{"percent-encoded", "k=" + percentEncoded(key[:30])},
		{"JSON escaped", `{"m":"` + jsonEscaped(key[:34], false) + `"}`},
		{"masked", "key " + key[:16] + "****" + key[len(key)-4:]},
		{"last characters after a mask", "key ****" + key[len(key)-8:]},
		{"two of them", key[:20] + " and " + key[:25]},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := scrubText(c.text, key)
			if !strings.Contains(got, redacted) {
				t.Fatalf("nothing redacted in %q", got)
			}
			lower := strings.ToLower(got)
			for i := 0; i+4 <= len(secret); i++ {
				if strings.Contains(lower, secret[i:i+4]) {
					t.Errorf("%q still shows %q", got, secret[i:i+4])
				}
			}
		})
	}

	for _, text := range []string{
		"Anthropic keys start with sk-ant-api03- and are secret.",
		"task-force sk-a risk-based",
		"**Note**: read the docs",
		"Rate limit reached...please retry.",
	} {
		if got := scrubText(text, key); got != text {
			t.Errorf("scrubText(%q) = %q, want it unchanged", text, got)
		}
	}
}

// TestScrubTellsNothingOfGuesses has a provider error repeat guesses at
// the key, right and wrong, as a model name. Were a right guess replaced
// and a wrong one not, a client could read the key one character at a
// time, so each pair must come out the same.
func TestScrubTellsNothingOfGuesses(t *testing.T) {
	const key = "sk-ant-api03-Xy7Qp2Lm9Rt4Vb6Nc8Jd1Hf3Kg5Ws0-AbCd"
	for _, pair := range [][2]string{
		{"sk-ant-api03-X**", "sk-ant-api03-Z**"},
		{"sk-ant-api03-Xy7", "sk-ant-api03-Xy8"},
		{key[20:36], key[20:35] + "z"},
		{"****" + key[len(key)-4:], "****" + "zzzz"},
		{"**" + key[len(key)-4:], "**" + "zzzz"},
		{key[:len(key)-1], key[:len(key)-2] + "z"},
		{strings.ToUpper(key[:30]), strings.ToUpper(key[:29]) + "Z"},
		{percentEncoded(key[:16]) + "%2e%2e%2e", percentEncoded(key[:15]+"Z") + "%2e%2e%2e"},
	} {
		var got [2]string
		for i, guess := range pair {
			body := `{"error":{"message":"model: ` + guess + ` not found"}}`
			got[i] = strings.ReplaceAll(scrubText(body, key), guess, "GUESS")
		}
		if got[0] != got[1] {
			t.Errorf("right guess %q gave %q, wrong guess %q gave %q", pair[0], got[0], pair[1], got[1])
		}
	}
}

func TestScrubHeaders(t *testing.T) {
	const key = "AIzaSyD-Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op5"
	h := http.Header{}
	h.Set("X-"+key, "1")
	h.Set("Content-Type", "application/json")
	h.Set("X-Echo", "key="+url.QueryEscape(key))
	h.Set("X-Hint", "AIzaSyD-Ab1...Op5")
	scrubHeaders(h, key, false)
	if len(h) != 3 {
		t.Errorf("header named after the key kept: %v", h)
	}
	if h.Get("Content-Type") != "application/json" {
		t.Errorf("Content-Type changed: %q", h.Get("Content-Type"))
	}
	if h.Get("X-Echo") != "key="+redacted {
		t.Errorf("X-Echo = %q, want the key redacted", h.Get("X-Echo"))
	}
	if h.Get("X-Hint") != "AIzaSyD-Ab1...Op5" {
		t.Errorf("masked forms are looked for only when asked: X-Hint = %q", h.Get("X-Hint"))
	}
	h.Set("X-Part", "key="+key[:30])
	scrubHeaders(h, key, false)
	if h.Get("X-Part") != "key="+key[:30] {
		t.Errorf("key-like text is looked for only when asked: X-Part = %q", h.Get("X-Part"))
	}
	scrubHeaders(h, key, true)
	if h.Get("X-Hint") != redacted {
		t.Errorf("X-Hint = %q, want it redacted", h.Get("X-Hint"))
	}
	if h.Get("X-Part") != "key="+redacted {
		t.Errorf("X-Part = %q, want the key's first characters redacted", h.Get("X-Part"))
	}
}

func TestScrubCutEnd(t *testing.T) {
	const key = "sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12WXYZ"
	cut := key[:len(key)-1]
	for _, c := range []struct {
		name, tail string
	}{
		{"raw", cut},
		{"upper case", strings.ToUpper(cut)},
		{"JSON escaped", jsonEscaped(cut, false)},
		{"JSON escaped, cut inside an escape", jsonEscaped(cut, true) + `\u00`},
		{"percent-encoded", percentEncoded(cut)},
		{"percent-encoded, cut inside an escape", percentEncoded(cut) + "%5"},
		{"masked", key[:12] + "***"},
		{"first character only", "s"},
		{"other text", "invalid"},
	} {
		t.Run(c.name, func(t *testing.T) {
			body := `{"error":{"message":"invalid key ` + c.tail
			got := string(scrubCutEnd([]byte(body)))
			if want := `{"error":{"message":"invalid key ` + redacted; got != want {
				t.Errorf("got %q, want %q", got, want)
			}
		})
	}
	for _, body := range []string{`{"error":{"message":"invalid key"}}`, `{"error":{"message":"invalid key "`} {
		if got := string(scrubCutEnd([]byte(body))); got != body {
			t.Errorf("scrubCutEnd(%q) = %q, want it unchanged", body, got)
		}
	}
}
