package proxy

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestStoredReference(t *testing.T) {
	cases := []struct {
		name, body string
		responses  bool
		want       string
	}{
		{"plain chat", `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"what is a file_id?"}]}`, false, ""},
		{"chat file part", `{"model":"m","messages":[{"role":"user","content":[{"type":"file","file":{"file_id":"file-abc"}}]}]}`, false, "a file (file_id)"},
		{"null file_id", `{"model":"m","messages":[{"role":"user","content":[{"type":"file","file":{"file_id":null,"file_data":"x"}}]}]}`, false, ""},
		{"responses input_file", `{"model":"m","input":[{"role":"user","content":[{"type":"input_file","file_id":"file-abc"}]}]}`, true, "a file (file_id)"},
		{"responses input_image", `{"model":"m","input":[{"role":"user","content":[{"type":"input_image","file_id":"file-img"}]}]}`, true, "a file (file_id)"},
		{"anthropic document", `{"model":"m","messages":[{"role":"user","content":[{"type":"document","source":{"type":"file","file_id":"file_011"}}]}]}`, false, "a file (file_id)"},
		{"anthropic container_upload", `{"model":"m","messages":[{"role":"user","content":[{"type":"container_upload","file_id":"file_012"}]}]}`, false, "a file (file_id)"},
		{"inside a tool result", `{"model":"m","messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"image","source":{"type":"file","file_id":"file_013"}}]}]}]}`, false, "a file (file_id)"},
		{"escaped name", `{"model":"m","messages":[{"role":"user","content":[{"type":"file","file":{"file\u005fid":"file-abc"}}]}]}`, false, "a file (file_id)"},
		{"escaped text only", `{"model":"m","messages":[{"role":"user","content":"caf\u00e9"}]}`, false, ""},
		{"vector store", `{"model":"m","input":"hi","tools":[{"type":"file_search","vector_store_ids":["vs_1"]}]}`, true, "a vector store (vector_store_ids)"},
		{"chat custom voice", `{"model":"m","audio":{"voice":{"id":"voice_1"},"format":"wav"},"messages":[{"role":"user","content":"hi"}]}`, false, "a custom voice (voice.id)"},
		{"chat built-in voice", `{"model":"m","audio":{"voice":"alloy","format":"wav"},"messages":[{"role":"user","content":"hi"}]}`, false, ""},
		{"voice id in function arguments", `{"model":"m","messages":[{"role":"assistant","tool_calls":[{"function":{"arguments":{"voice":{"id":"v"}}}}]}]}`, false, ""},
		{"no vector store", `{"model":"m","input":"hi","tools":[{"type":"file_search","vector_store_ids":[]}]}`, true, ""},
		{"stored prompt", `{"prompt":{"id":"pmpt_1","version":"2"},"input":"hi"}`, true, "a stored prompt (prompt)"},
		{"prompt on chat", `{"model":"m","prompt":"legacy completions text"}`, false, ""},
		{"nested prompt", `{"model":"m","input":[{"role":"user","content":"hi","prompt":{"id":"x"}}]}`, true, ""},
		{"case differs", `{"model":"m","messages":[{"role":"user","content":[{"type":"file","file":{"File_Id":"file-abc"}}]}]}`, false, ""},
		{"code interpreter files", `{"model":"m","input":"hi","tools":[{"type":"code_interpreter","container":{"type":"auto","file_ids":["file-1"]}}]}`, true, "files (file_ids)"},
		{"code interpreter no files", `{"model":"m","input":"hi","tools":[{"type":"code_interpreter","container":{"type":"auto","file_ids":[ ]}}]}`, true, ""},
		{"shell files", `{"model":"m","input":"hi","tools":[{"type":"shell","environment":{"type":"container_auto","file_ids":["file-2"]}}]}`, true, "files (file_ids)"},
		{"shell skill", `{"model":"m","input":"hi","tools":[{"type":"shell","environment":{"type":"container_auto","skills":[{"skill_id":"skill_1","type":"skill_reference"}]}}]}`, true, "a skill (skill_id)"},
		{"anthropic custom skill", `{"model":"m","container":{"skills":[{"type":"custom","skill_id":"skill_01","version":"latest"}]},"messages":[]}`, false, "a skill (skill_id)"},
		{"anthropic public skill", `{"model":"m","container":{"skills":[{"type":"anthropic","skill_id":"pptx","version":"latest"}]},"messages":[]}`, false, ""},
		{"computer screenshot", `{"model":"m","input":[{"type":"computer_call_output","call_id":"c","output":{"type":"computer_screenshot","file_id":"file-3"}}]}`, true, "a file (file_id)"},
		{"function output file", `{"model":"m","input":[{"type":"function_call_output","call_id":"c","output":[{"type":"input_file","file_id":"file-4"}]}]}`, true, "a file (file_id)"},
		{"chat audio", `{"model":"m","messages":[{"role":"assistant","audio":{"id":"audio_1"}},{"role":"user","content":"and?"}]}`, false, "a stored audio response (audio.id)"},
		{"function parameters", `{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"open","parameters":{"type":"object","properties":{"file_id":{"type":"string"},"file_ids":{"type":"array"}}}}}]}`, false, ""},
		{"responses function parameters", `{"model":"m","input":"hi","tools":[{"type":"function","name":"open","parameters":{"properties":{"file_id":{"type":"string"}}}}]}`, true, ""},
		{"tool call input", `{"model":"m","messages":[{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"open","input":{"file_id":"report-7","skill_id":"x"}}]}]}`, false, ""},
		{"response format and metadata", `{"model":"m","input":"hi","text":{"format":{"type":"json_schema","schema":{"properties":{"file_id":{}}}}},"metadata":{"file_id":"mine"}}`, true, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, tooDeep := storedReference([]byte(c.body), c.responses)
			if got != c.want || tooDeep {
				t.Errorf("storedReference = %q, too deep %v; want %q", got, tooDeep, c.want)
			}
		})
	}

	t.Run("too deep", func(t *testing.T) {
		// Nesting counts everywhere, also where names are not checked.
		body := `{"messages":` + strings.Repeat("[", maxStoredDepth+1) + strings.Repeat("]", maxStoredDepth+1) + `,"file_id":null}`
		if _, tooDeep := storedReference([]byte(body), false); !tooDeep {
			t.Errorf("a body nested %d levels was read to its end", maxStoredDepth+2)
		}
	})
}

// FuzzStoredReference runs the scan on any valid JSON body: it must end
// without a panic, and a body whose first member is a message with a file
// part is always caught, whatever follows.
func FuzzStoredReference(f *testing.F) {
	f.Add([]byte(`{"model":"m","messages":[{"role":"user","content":[{"type":"file","file":{"file_id":"f"}}]}]}`), true)
	f.Add([]byte(`{"prompt":{"id":"p"},"tools":[{"vector_store_ids":["v"]}]}`), true)
	f.Add([]byte(`[[[[{"a\u0062":null}]]]]`), false)
	f.Add([]byte(`{"container":{"skills":[{"skill_id":"s","type":"custom"}]}}`), false)
	f.Fuzz(func(t *testing.T, body []byte, responses bool) {
		if !json.Valid(body) {
			return
		}
		storedReference(body, responses)
		trimmed := bytes.TrimSpace(body)
		if len(trimmed) < 2 || trimmed[0] != '{' {
			return
		}
		const first = `{"messages":[{"content":[{"type":"file","file_id":"x"}]}]`
		withFile := []byte(first + "}")
		if rest := bytes.TrimSpace(trimmed[1:]); !bytes.Equal(rest, []byte("}")) {
			withFile = append([]byte(first+","), trimmed[1:]...)
		}
		if !json.Valid(withFile) {
			t.Fatalf("built invalid JSON %s", withFile)
		}
		if got, tooDeep := storedReference(withFile, responses); got != "a file (file_id)" && !tooDeep {
			t.Errorf("storedReference(%s) = %q, want the file", withFile, got)
		}
	})
}

// BenchmarkStoredReference measures the scan on bodies that defeat the
// prefilter: a long message, and the same bytes nested 127 levels deep.
// The scan reads each byte once, so both take about the same time.
func BenchmarkStoredReference(b *testing.B) {
	text := `"` + strings.Repeat(`caf\u00e9 `, 100_000) + `"`
	flat := []byte(`{"model":"m","messages":[{"role":"user","content":` + text + `}]}`)
	deep := []byte(`{"metadata":` + strings.Repeat("[", 126) + text + strings.Repeat("]", 126) + `}`)
	for _, c := range []struct {
		name string
		body []byte
	}{{"flat", flat}, {"deep", deep}} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(int64(len(c.body)))
			for b.Loop() {
				if ref, tooDeep := storedReference(c.body, false); ref != "" || tooDeep {
					b.Fatalf("storedReference = %q, %v", ref, tooDeep)
				}
			}
		})
	}
}
