package proxy

import (
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
		{"no vector store", `{"model":"m","input":"hi","tools":[{"type":"file_search","vector_store_ids":[]}]}`, true, ""},
		{"stored prompt", `{"prompt":{"id":"pmpt_1","version":"2"},"input":"hi"}`, true, "a stored prompt (prompt)"},
		{"prompt on chat", `{"model":"m","prompt":"legacy completions text"}`, false, ""},
		{"nested prompt", `{"model":"m","input":[{"role":"user","content":"hi","prompt":{"id":"x"}}]}`, true, ""},
		{"case differs", `{"model":"m","messages":[{"role":"user","content":[{"type":"file","file":{"File_Id":"file-abc"}}]}]}`, false, ""},
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
		body := `{"messages":` + strings.Repeat("[", maxStoredDepth+1) + strings.Repeat("]", maxStoredDepth+1) + `,"file_id":null}`
		if _, tooDeep := storedReference([]byte(body), false); !tooDeep {
			t.Errorf("a body nested %d levels was read to its end", maxStoredDepth+2)
		}
	})
}

// FuzzStoredReference runs the walk on any valid JSON body: it must end
// without a panic, and a body that names file_id at its top level with a
// string is always caught.
func FuzzStoredReference(f *testing.F) {
	f.Add([]byte(`{"model":"m","messages":[{"role":"user","content":[{"type":"file","file":{"file_id":"f"}}]}]}`), true)
	f.Add([]byte(`{"prompt":{"id":"p"},"tools":[{"vector_store_ids":["v"]}]}`), true)
	f.Add([]byte(`[[[[{"a\u0062":null}]]]]`), false)
	f.Fuzz(func(t *testing.T, body []byte, responses bool) {
		if !json.Valid(body) {
			return
		}
		storedReference(body, responses)
		if len(body) > 0 && body[0] == '{' {
			withFile := append([]byte(`{"file_id":"x",`), body[1:]...)
			if strings.TrimSpace(string(body[1:])) == "}" {
				withFile = []byte(`{"file_id":"x"}`)
			}
			if !json.Valid(withFile) {
				return
			}
			if got, tooDeep := storedReference(withFile, responses); got == "" && !tooDeep {
				t.Errorf("storedReference(%s) found no file", withFile)
			}
		}
	})
}
