package proxy

import (
	"bytes"
	"encoding/json"
)

// Files, vector stores, skills, stored prompts and stored audio live in the
// provider account whose key created them. On the shared key that is the
// platform's account, and a mailbox cannot create any there, because the
// shared key serves none of the endpoints that do. A shared request that
// names one by id therefore names the platform's own, or a file that code
// execution wrote for another mailbox, and is rejected.
//
// The providers read those ids only in certain places: content parts and
// blocks, tool definitions and code execution containers. The scan looks
// only there, so that an application's own data that happens to use the
// same names (a function's parameter schema, a tool call's input, metadata)
// is not taken for a reference.

// maxStoredDepth bounds the nesting of a shared request body. Request bodies
// of the provider APIs nest about ten levels.
const maxStoredDepth = 128

// storedRoots are the top-level members under which the providers read
// references to stored objects: chat and Anthropic messages, Responses
// input items, tools, Anthropic's code execution container, system blocks
// and a chat completion's audio output settings.
var storedRoots = map[string]bool{"messages": true, "input": true, "tools": true, "container": true, "system": true, "audio": true}

// storedBranches are the members, below a root, that hold content parts,
// file sources, containers, tool environments, skills, function call
// output, a chat message's audio and an audio output's voice. Every other
// member's value, such as a function's parameters or a tool call's input,
// is the application's data and is not looked into.
var storedBranches = map[string]bool{
	"content": true, "source": true, "file": true, "container": true,
	"environment": true, "output": true, "skills": true, "audio": true,
	"voice": true,
}

// storedReference returns a description of the stored object that a shared
// request body names, such as "a file (file_id)", or "" when it names none.
// Member names count after JSON unescaping, as the providers read them.
// prompt counts only at the top level of a Responses API request, where it
// names a stored prompt. tooDeep is set for a body that nests beyond
// maxStoredDepth. The scan reads each byte once, and body must be valid
// JSON, as readRequestInfo has checked.
func storedReference(body []byte, responses bool) (reference string, tooDeep bool) {
	// A \u escape could spell any name, so only a body without one may skip
	// the scan for lack of the names themselves.
	if !bytes.Contains(body, []byte(`\u`)) && !bytes.Contains(body, []byte("file_id")) &&
		!bytes.Contains(body, []byte("vector_store_ids")) && !bytes.Contains(body, []byte("skill_id")) &&
		!bytes.Contains(body, []byte(`"audio"`)) && !(responses && bytes.Contains(body, []byte(`"prompt"`))) {
		return "", false
	}
	s := storedScan{responses: responses}
	tooDeep = walkJSON(body, &s)
	return s.reference, tooDeep
}

// storedFrame is one open object or array of the scan.
type storedFrame struct {
	object bool
	// checked is set when the container's members are checked and its
	// branches followed.
	checked bool
	// name is the current member's unescaped name, in an object.
	name string
	// audio is set for the object under a member named audio, and voice
	// for the object under one named voice, which names a custom voice
	// stored in the account by its id.
	audio bool
	voice bool
	// typ is the object's type member, and skillID is set once it has a
	// skill_id: whether that names a stored skill depends on the type,
	// which may come later.
	typ     string
	skillID bool
}

type storedScan struct {
	responses bool
	stack     []storedFrame
	reference string
}

func (s *storedScan) top() *storedFrame { return &s.stack[len(s.stack)-1] }

func (s *storedScan) open(object bool, at int, body []byte) bool {
	f := storedFrame{object: object}
	if len(s.stack) == 0 {
		f.checked = object
	} else {
		parent := s.top()
		switch {
		case !parent.checked:
		case !parent.object:
			f.checked = true
		case len(s.stack) == 1:
			f.checked = storedRoots[parent.name]
			if parent.name == "prompt" && s.responses {
				s.reference = "a stored prompt (prompt)"
			}
		default:
			f.checked = storedBranches[parent.name]
			f.audio = object && parent.name == "audio"
			f.voice = object && parent.name == "voice"
			if !object && namesIDs(parent.name) && body[skipSpace(body, at+1)] != ']' {
				s.reference = idsReference(parent.name)
			}
		}
	}
	s.stack = append(s.stack, f)
	return s.reference == ""
}

func (s *storedScan) close() bool {
	f := s.top()
	if f.object && f.skillID && f.typ != "anthropic" {
		// Anthropic's own skills are public; every other skill was uploaded
		// to an account.
		s.reference = "a skill (skill_id)"
	}
	s.stack = s.stack[:len(s.stack)-1]
	if len(s.stack) > 0 && s.top().object {
		s.top().name = ""
	}
	return s.reference == ""
}

func (s *storedScan) name(name string) { s.top().name = name }

func (s *storedScan) value(raw []byte) bool {
	if len(s.stack) == 0 || !s.top().object || !s.top().checked {
		return true
	}
	f := s.top()
	name := f.name
	f.name = ""
	null := string(raw) == "null"
	switch {
	case len(s.stack) == 1:
		if name == "prompt" && s.responses && !null {
			s.reference = "a stored prompt (prompt)"
		}
	case null:
	case name == "file_id":
		s.reference = "a file (file_id)"
	case name == "skill_id":
		f.skillID = true
	case name == "type":
		f.typ = unquote(raw)
	case name == "id" && f.audio:
		s.reference = "a stored audio response (audio.id)"
	case name == "id" && f.voice:
		s.reference = "a custom voice (voice.id)"
	case namesIDs(name):
		// A list of ids given as anything but an array still names them.
		s.reference = idsReference(name)
	}
	return s.reference == ""
}

// jsonScan receives the tokens of a JSON body from walkJSON. open, close
// and value return false to end the walk.
type jsonScan interface {
	// open enters the object or array that starts at body[at].
	open(object bool, at int, body []byte) bool
	// close leaves the innermost object or array.
	close() bool
	// name sets the unescaped name of the member whose value comes next.
	name(name string)
	// value takes a scalar: a member's value or an array element.
	value(raw []byte) bool
}

// walkJSON reads body, which must be valid JSON, once from start to end
// and reports its tokens to s. It stops where s returns false, and at a
// container nested deeper than maxStoredDepth, for which it returns true.
// Containers are kept in a slice rather than by recursion, so a deep body
// costs no stack.
func walkJSON(body []byte, s jsonScan) (tooDeep bool) {
	var objectsBuf [32]bool
	objects := objectsBuf[:0] // for each open container, whether it is an object
	for i := skipSpace(body, 0); i < len(body); i = skipSpace(body, i) {
		switch c := body[i]; c {
		case '{', '[':
			if len(objects) >= maxStoredDepth {
				return true
			}
			objects = append(objects, c == '{')
			if !s.open(c == '{', i, body) {
				return false
			}
			i++
		case '}', ']':
			if len(objects) == 0 {
				return false
			}
			objects = objects[:len(objects)-1]
			if !s.close() {
				return false
			}
			i++
		case ',', ':':
			i++
		case '"':
			end := stringEnd(body, i)
			if len(objects) > 0 && objects[len(objects)-1] && startsMember(body, i) {
				s.name(unquote(body[i:end]))
			} else if !s.value(body[i:end]) {
				return false
			}
			i = end
		default:
			end := valueEnd(body, i)
			if end <= i || !s.value(body[i:end]) {
				return false
			}
			i = end
		}
	}
	return false
}

// startsMember reports whether the string at body[i], inside an object, is
// a member name, which follows the object's opening brace or a comma.
func startsMember(body []byte, i int) bool {
	j := i - 1
	for j >= 0 && (body[j] == ' ' || body[j] == '\t' || body[j] == '\n' || body[j] == '\r') {
		j--
	}
	return j >= 0 && (body[j] == '{' || body[j] == ',')
}

// namesIDs reports whether a member of that name lists stored objects.
func namesIDs(name string) bool {
	return name == "file_ids" || name == "vector_store_ids"
}

// idsReference returns the description of the objects that a list member
// of that name refers to.
func idsReference(name string) string {
	if name == "file_ids" {
		return "files (file_ids)"
	}
	return "a vector store (vector_store_ids)"
}

// unquote returns the text of a JSON string, or "" for any other value.
func unquote(raw []byte) string {
	if len(raw) < 2 || raw[0] != '"' {
		return ""
	}
	if bytes.IndexByte(raw, '\\') < 0 {
		return string(raw[1 : len(raw)-1])
	}
	var text string
	if json.Unmarshal(raw, &text) != nil {
		return ""
	}
	return text
}
