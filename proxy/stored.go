package proxy

import (
	"bytes"

	"github.com/tidwall/gjson"
)

// Files, vector stores and stored prompts live in the provider account
// whose key created them. On the shared key that is the platform's account,
// and a mailbox cannot create any there, because the shared key serves none
// of the endpoints that do. A shared request that names one by id therefore
// names the platform's own, or a file that code execution wrote for another
// mailbox, and is rejected.

// maxStoredDepth bounds how deep storedReference looks into a body. Request
// bodies of the provider APIs nest about ten levels.
const maxStoredDepth = 128

// storedReference returns a description of the stored object that a JSON
// request body names, such as "a file (file_id)", or "" when it names none.
// It compares member names as the providers do, exactly and after JSON
// unescaping, at any depth. prompt counts only at the top level of a
// Responses API request, where it names a stored prompt. tooDeep is set when
// the body nests beyond maxStoredDepth, where a name could hide unchecked.
func storedReference(body []byte, responses bool) (reference string, tooDeep bool) {
	// Any escape could spell a name, so only a body without one may skip the
	// walk for lack of the names themselves.
	if !bytes.Contains(body, []byte(`\u`)) && !bytes.Contains(body, []byte("file_id")) &&
		!bytes.Contains(body, []byte("vector_store_ids")) && !(responses && bytes.Contains(body, []byte("prompt"))) {
		return "", false
	}
	w := storedWalk{responses: responses}
	w.value(gjson.ParseBytes(body), 0)
	return w.reference, w.tooDeep
}

type storedWalk struct {
	responses bool
	reference string
	tooDeep   bool
}

func (w *storedWalk) value(v gjson.Result, depth int) {
	if !v.IsObject() && !v.IsArray() {
		return
	}
	if depth >= maxStoredDepth {
		w.tooDeep = true
		return
	}
	v.ForEach(func(key, member gjson.Result) bool {
		if v.IsObject() {
			w.member(key.String(), member, depth)
		}
		if w.reference == "" && !w.tooDeep {
			w.value(member, depth+1)
		}
		return w.reference == "" && !w.tooDeep
	})
}

func (w *storedWalk) member(name string, value gjson.Result, depth int) {
	if value.Type == gjson.Null {
		return
	}
	switch {
	case name == "file_id":
		w.reference = "a file (file_id)"
	case name == "vector_store_ids" && !(value.IsArray() && len(value.Array()) == 0):
		w.reference = "a vector store (vector_store_ids)"
	case name == "prompt" && depth == 0 && w.responses:
		w.reference = "a stored prompt (prompt)"
	}
}
