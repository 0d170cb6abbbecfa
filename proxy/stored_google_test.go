package proxy

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestGoogleStoredReference(t *testing.T) {
	const file = "a file (fileData.fileUri)"
	part := func(uri string) string {
		return `{"contents":[{"role":"user","parts":[{"text":"look"},{"fileData":{"mimeType":"video/mp4","fileUri":"` + uri + `"}}]}]}`
	}
	cases := []struct{ name, body, want string }{
		{"text only", `{"contents":[{"parts":[{"text":"what is a fileUri or cachedContent?"}]}]}`, ""},
		{"built-in voice", `{"contents":[{"parts":[{"text":"say hi"}]}],"generationConfig":{"responseModalities":["AUDIO"],"speechConfig":{"voiceConfig":{"prebuiltVoiceConfig":{"voiceName":"Kore"}}}}}`, ""},
		{"custom voice", `{"contents":[{"parts":[{"text":"say hi"}]}],"generationConfig":{"speechConfig":{"voiceConfig":{"voice":"voice_abc123"}}}}`, "a custom voice (speechConfig)"},
		{"custom voice by resource name", `{"contents":[{"parts":[{"text":"say hi"}]}],"generation_config":{"speech_config":{"voice_config":{"voice_name":"voices/abc"}}}}`, "a custom voice (speechConfig)"},
		{"speakers named voice_", `{"contents":[{"parts":[{"text":"voice_host: hi"}]}],"generationConfig":{"speechConfig":{"multiSpeakerVoiceConfig":{"speakerVoiceConfigs":[` +
			`{"speaker":"voice_host","voiceConfig":{"prebuiltVoiceConfig":{"voiceName":"Kore"}}},{"speaker":"voice_guest","voiceConfig":{"prebuiltVoiceConfig":{"voiceName":"Puck"}}}]}}}}`, ""},
		{"voice id in text", `{"contents":[{"parts":[{"text":"voice_abc is my favourite"}]}],"generationConfig":{"speechConfig":{"voiceConfig":{"prebuiltVoiceConfig":{"voiceName":"Puck"}}}}}`, ""},
		{"youtube video", part("https://www.youtube.com/watch?v=9hE5-98ZeCg"), ""},
		{"web page", part("http://example.com/report.pdf"), ""},
		{"files api", part("https://generativelanguage.googleapis.com/v1beta/files/abc"), file},
		{"files api in upper case", part("HTTPS://GenerativeLanguage.GoogleAPIs.com./v1beta/files/abc"), file},
		{"file name", part("files/abc"), file},
		{"bucket", part("gs://platform/a.pdf"), file},
		{"storage host", part("https://storage.googleapis.com/platform/a.pdf"), file},
		{"cloud console host", part("https://storage.cloud.google.com/platform/a.pdf"), file},
		{"trailing dots", part("https://generativelanguage.googleapis.com../v1beta/files/abc"), file},
		{"ideographic dots", part("https://generativelanguage。googleapis。com/v1beta/files/abc"), file},
		{"ip address", part("http://192.0.2.7/a.mp4"), ""},
		{"user info", part("https://youtube.com@generativelanguage.googleapis.com/v1beta/files/abc"), file},
		{"backslash", part(`https://example.com\\@generativelanguage.googleapis.com/v1beta/files/abc`), file},
		{"empty", part(""), file},
		{"proto names", `{"contents":[{"parts":[{"file_data":{"file_uri":"files/abc"}}]}]}`, file},
		{"escaped name", `{"contents":[{"parts":[{"fileData":{"file\u0055ri":"files/abc"}}]}]}`, file},
		{"escaped text only", `{"contents":[{"parts":[{"text":"caf\u00e9"}]}]}`, ""},
		{"function response part", `{"contents":[{"role":"user","parts":[{"functionResponse":{"name":"f","response":{},"parts":[{"fileData":{"fileUri":"files/abc"}}]}}]}]}`, file},
		{"system instruction", `{"systemInstruction":{"parts":[{"fileData":{"fileUri":"files/abc"}}]},"contents":[]}`, file},
		{"embedding batch", `{"requests":[{"model":"models/gemini-2.5-flash","content":{"parts":[{"fileData":{"fileUri":"files/abc"}}]}}]}`, file},
		{"cached content", `{"cachedContent":"cachedContents/xyz","contents":[]}`, "cached content (cachedContent)"},
		{"cached content proto name", `{"cached_content":"cachedContents/xyz","contents":[]}`, "cached content (cachedContent)"},
		{"cached content in count tokens", `{"generateContentRequest":{"cachedContent":"cachedContents/xyz"}}`, "cached content (cachedContent)"},
		{"no cached content", `{"cachedContent":"","contents":[]}`, ""},
		{"null cached content", `{"cachedContent":null,"contents":[]}`, ""},
		{"file search", `{"contents":[],"tools":[{"fileSearch":{"fileSearchStoreNames":["fileSearchStores/s"]}}]}`, "file search stores (fileSearch)"},
		{"file search proto name", `{"contents":[],"tools":[{"file_search":{}}]}`, "file search stores (fileSearch)"},
		{"other tools", `{"contents":[],"tools":[{"googleSearch":{}},{"codeExecution":{}},{"urlContext":{}}]}`, ""},
		{"function call arguments", `{"contents":[{"role":"model","parts":[{"functionCall":{"name":"open","args":{"fileUri":"files/mine","cachedContent":"x","fileSearch":{}}}}]}]}`, ""},
		{"function response", `{"contents":[{"role":"user","parts":[{"functionResponse":{"name":"open","response":{"fileData":{"fileUri":"files/mine"}}}}]}]}`, ""},
		{"function parameters", `{"contents":[],"tools":[{"functionDeclarations":[{"name":"open","parameters":{"type":"OBJECT","properties":{"fileUri":{"type":"STRING"},"fileSearch":{"type":"OBJECT"}}}}]}]}`, ""},
		{"function json schema", `{"contents":[],"tools":[{"functionDeclarations":[{"name":"open","parametersJsonSchema":{"properties":{"cachedContent":{"type":"string"}}}}]}]}`, ""},
		{"response schema", `{"contents":[],"generationConfig":{"responseMimeType":"application/json","responseSchema":{"type":"OBJECT","properties":{"fileUri":{"type":"STRING"}}}}}`, ""},
		{"case differs", `{"contents":[{"parts":[{"fileData":{"FileUri":"files/abc"}}]}]}`, ""},
		{"part metadata", `{"contents":[{"parts":[{"text":"hi","partMetadata":{"fileUri":"files/mine","cachedContent":"c","fileSearch":{}}}]}]}`, ""},
		{"path model named", `{"generateContentRequest":{"model":"models/gemini-2.5-flash","contents":[]}}`, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if !json.Valid([]byte(c.body)) {
				t.Fatalf("invalid test body %s", c.body)
			}
			got, model, tooDeep := googleStoredReference([]byte(c.body), "gemini-2.5-flash")
			if got != c.want || model != "" || tooDeep {
				t.Errorf("googleStoredReference = %q, other model %q, too deep %v; want %q", got, model, tooDeep, c.want)
			}
		})
	}

	// countTokens and batchEmbedContents name a model in the body, which
	// must be the path's, as the model allowlist checks only the path.
	for _, c := range []struct{ name, body, want string }{
		{"count tokens", `{"generateContentRequest":{"model":"models/gemini-2.5-pro","contents":[]}}`, "models/gemini-2.5-pro"},
		{"tuned model", `{"generateContentRequest":{"model":"tunedModels/platform-tuned"}}`, "tunedModels/platform-tuned"},
		{"embedding batch", `{"requests":[{"model":"models/gemini-2.5-flash"},{"model":"models/other"}]}`, "models/other"},
		{"escaped name", `{"requests":[{"mod\u0065l":"models/other"}]}`, "models/other"},
	} {
		t.Run("other model/"+c.name, func(t *testing.T) {
			ref, model, tooDeep := googleStoredReference([]byte(c.body), "gemini-2.5-flash")
			if model != c.want || ref != "" || tooDeep {
				t.Errorf("googleStoredReference = %q, other model %q, too deep %v; want other model %q", ref, model, tooDeep, c.want)
			}
		})
	}

	t.Run("too deep", func(t *testing.T) {
		body := `{"contents":` + strings.Repeat("[", maxStoredDepth+1) + strings.Repeat("]", maxStoredDepth+1) + `,"cachedContent":null}`
		if _, _, tooDeep := googleStoredReference([]byte(body), "m"); !tooDeep {
			t.Errorf("a body nested %d levels was read to its end", maxStoredDepth+2)
		}
	})
}

// FuzzGoogleStoredReference runs the scan on any valid JSON body: it must
// end without a panic, and a body whose first member names cached content
// is always caught, whatever follows.
func FuzzGoogleStoredReference(f *testing.F) {
	f.Add([]byte(`{"contents":[{"parts":[{"fileData":{"fileUri":"files/a"}}]}]}`))
	f.Add([]byte(`{"tools":[{"functionDeclarations":[{"parameters":{"properties":{"fileUri":{}}}}]}]}`))
	f.Add([]byte(`[[[[{"a\u0062":null}]]]]`))
	f.Add([]byte(`{"contents":[{"parts":[{"functionCall":{"args":{"x":[{}]}}}]}]}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		if !json.Valid(body) {
			return
		}
		googleStoredReference(body, "m")
		trimmed := bytes.TrimSpace(body)
		if len(trimmed) < 2 || trimmed[0] != '{' {
			return
		}
		const first = `{"cachedContent":"cachedContents/x"`
		withCache := []byte(first + "}")
		if rest := bytes.TrimSpace(trimmed[1:]); !bytes.Equal(rest, []byte("}")) {
			withCache = append([]byte(first+","), trimmed[1:]...)
		}
		if !json.Valid(withCache) {
			t.Fatalf("built invalid JSON %s", withCache)
		}
		if got, _, tooDeep := googleStoredReference(withCache, "m"); got != "cached content (cachedContent)" && !tooDeep {
			t.Errorf("googleStoredReference(%s) = %q, want the cached content", withCache, got)
		}
	})
}

// BenchmarkGoogleStoredReference measures the scan of a request with one
// long text part that holds a \u escape, so that the prefilter lets it
// through.
func BenchmarkGoogleStoredReference(b *testing.B) {
	body := []byte(`{"contents":[{"role":"user","parts":[{"text":"` + strings.Repeat(`caf\u00e9 `, 100_000) + `"}]}]}`)
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		if ref, model, tooDeep := googleStoredReference(body, "m"); ref != "" || model != "" || tooDeep {
			b.Fatalf("googleStoredReference = %q, %q, %v", ref, model, tooDeep)
		}
	}
}
