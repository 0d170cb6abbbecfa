package proxy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/byokproxy/byokproxy/provider"
	"github.com/tidwall/gjson"
)

// requestInfo holds the fields the proxy reads from a JSON request body.
type requestInfo struct {
	Model         string
	Stream        bool
	StreamOptions json.RawMessage
	// streamOptionsAt is the offset of StreamOptions in the body.
	streamOptionsAt    int
	PreviousResponseID string
	// Container and Tools are raw values, read by requestedContainers.
	Container json.RawMessage
	Tools     json.RawMessage
	// Background requests that the Responses API run the response later
	// and store it.
	Background bool
	// Conversation and Input are raw values, read by storedItemReference.
	Conversation json.RawMessage
	Input        json.RawMessage
}

// requestFields are the top-level names readRequestInfo reads, in the order
// of requestInfo's fields.
var requestFields = []string{"model", "stream", "stream_options", "previous_response_id", "container", "tools", "background", "conversation", "input"}

// Errors of readRequestInfo.
var (
	errBodyNotJSON   = errors.New("the request body is not valid JSON")
	errBodyNotObject = errors.New("the request body is not a JSON object")
)

// duplicateFieldError reports a body that names a field more than once.
type duplicateFieldError struct{ name string }

func (e *duplicateFieldError) Error() string {
	return fmt.Sprintf("the request body names %q more than once; send each field once", e.name)
}

// invalidField reports a field whose value has the wrong JSON type.
func invalidField(name, want string) error {
	return fmt.Errorf("invalid %q in the request body: send %s", name, want)
}

// readRequestInfo reads the fields the proxy acts on, by exact name, and
// rejects a body that names one twice. encoding/json also matches "MODEL" and
// keeps the last copy, so the proxy could check another model or response id
// than the one the provider reads.
func readRequestInfo(body []byte) (requestInfo, error) {
	var info requestInfo
	err := scanObject(body, requestFields, func(field, at int, value []byte) error {
		name := requestFields[field]
		switch field {
		case 0:
			if decodeString(value, &info.Model) != nil {
				return invalidField(name, "a string")
			}
		case 1:
			if decodeBool(value, &info.Stream) != nil {
				return invalidField(name, "true or false")
			}
		case 2:
			info.StreamOptions = value
			info.streamOptionsAt = at
		case 3:
			if decodeString(value, &info.PreviousResponseID) != nil {
				return invalidField(name, "a string")
			}
		case 4:
			info.Container = value
		case 5:
			info.Tools = value
		case 6:
			if decodeBool(value, &info.Background) != nil {
				return invalidField(name, "true or false")
			}
		case 7:
			info.Conversation = value
		default:
			info.Input = value
		}
		return nil
	})
	return info, err
}

// decodeString decodes the JSON value of a request field into dst, as
// encoding/json would. A string with no escapes, control characters or
// invalid UTF-8, which is how clients send model names and ids, decodes to
// its bytes, so it is copied without encoding/json's scan and reflection.
func decodeString(value []byte, dst *string) error {
	if n := len(value); n >= 2 && value[0] == '"' && value[n-1] == '"' {
		inner := value[1 : n-1]
		plain := utf8.Valid(inner)
		for _, c := range inner {
			if c < 0x20 || c == '"' || c == '\\' {
				plain = false
				break
			}
		}
		if plain {
			*dst = string(inner)
			return nil
		}
	}
	return json.Unmarshal(value, dst)
}

// decodeBool decodes the JSON value of a request field into dst, as
// encoding/json would.
func decodeBool(value []byte, dst *bool) error {
	switch string(value) {
	case "true":
		*dst = true
		return nil
	case "false":
		*dst = false
		return nil
	}
	return json.Unmarshal(value, dst)
}

// scanObject calls visit with the offset and the raw value, which shares
// body's memory, of each top-level member of the JSON object body whose
// unescaped name is in names. A name given twice ends the scan with a
// *duplicateFieldError.
func scanObject(body []byte, names []string, visit func(field, at int, value []byte) error) error {
	// Once the body is known to be valid, the walk below only has to find
	// where each name and value ends.
	if !validJSON(body) {
		return errBodyNotJSON
	}
	i := skipSpace(body, 0)
	if body[i] != '{' {
		return errBodyNotObject
	}
	var seen uint64
	for i = skipSpace(body, i+1); body[i] != '}'; i = skipSpace(body, i) {
		if body[i] == ',' {
			i = skipSpace(body, i+1)
		}
		nameEnd := stringEnd(body, i)
		rawName := body[i:nameEnd]
		i = skipSpace(body, nameEnd) + 1 // the colon
		i = skipSpace(body, i)
		at := i
		i = valueEnd(body, i)
		value := body[at:i]

		field := fieldIndex(rawName, names)
		if field < 0 {
			continue
		}
		if seen&(1<<field) != 0 {
			return &duplicateFieldError{name: names[field]}
		}
		seen |= 1 << field
		if err := visit(field, at, value); err != nil {
			return err
		}
	}
	return nil
}

// fieldIndex returns the index in names of a quoted JSON name, or -1.
func fieldIndex(quoted []byte, names []string) int {
	name := quoted[1 : len(quoted)-1]
	if bytes.IndexByte(name, '\\') >= 0 {
		var unescaped string
		if json.Unmarshal(quoted, &unescaped) != nil {
			return -1
		}
		name = []byte(unescaped)
	}
	for n, want := range names {
		if string(name) == want {
			return n
		}
	}
	return -1
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// stringEnd returns the index after the valid JSON string that starts at
// b[i]. Most strings of a request body are either short or long message
// text, so it steps through up to 32 bytes and then jumps to the next quote
// with bytes.IndexByte, which checks many bytes per instruction. Where
// escaped quotes come close together, as in a hostile body, every jump
// ends at one and the byte loop does most of the work.
func stringEnd(b []byte, i int) int {
	j := i + 1
	for {
		for end := min(j+32, len(b)); j < end; j++ {
			switch b[j] {
			case '\\':
				j++
			case '"':
				return j + 1
			}
		}
		if j >= len(b) {
			return len(b)
		}
		k := bytes.IndexByte(b[j:], '"')
		if k < 0 {
			return len(b)
		}
		// No escape is open at j, so an odd run of backslashes between j
		// and the quote escapes it, and an even run is escaped backslashes.
		q := j + k
		p := q - 1
		for p >= j && b[p] == '\\' {
			p--
		}
		if (q-1-p)%2 == 0 {
			return q + 1
		}
		j = q + 1
	}
}

// valueEnd returns the index after the valid JSON value that starts at b[i].
func valueEnd(b []byte, i int) int {
	switch b[i] {
	case '"':
		return stringEnd(b, i)
	case '{', '[':
		depth := 0
		for j := i; j < len(b); j++ {
			switch b[j] {
			case '"':
				j = stringEnd(b, j) - 1
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return j + 1
				}
			}
		}
		return len(b)
	}
	// A number or a literal ends at the next delimiter.
	j := i
	for j < len(b) && strings.IndexByte(",}] \t\n\r", b[j]) < 0 {
		j++
	}
	return j
}

// needsBody reports whether the proxy reads the request body before
// forwarding it: POSTs to generation endpoints, for the model, the stream
// flag and the OpenAI stream usage option. These endpoints take JSON only, so
// the body is read whatever its Content-Type, so a model allowlist cannot be
// skipped by mislabelling the body. Other bodies (uploads, audio) stream
// through unread.
func needsBody(prov, method, path string) bool {
	if method != http.MethodPost {
		return false
	}
	switch prov {
	case provider.OpenAI:
		return strings.HasSuffix(path, "/chat/completions") || strings.HasSuffix(path, "/completions") ||
			strings.HasSuffix(path, "/responses") || strings.HasSuffix(path, "/embeddings") ||
			strings.HasSuffix(path, "/moderations")
	case provider.Anthropic:
		return strings.HasSuffix(path, "/messages") || strings.HasSuffix(path, "/messages/count_tokens")
	}
	// Google names the model in the path and the stream in the method, so
	// only the shared key needs its body (see readsSharedBody).
	return false
}

// readsSharedBody reports whether the body of a request that needsBody lets
// stream through is read all the same once the record sends it to the
// shared key. That is the case for a Google generation request, which may
// name a file, a context cache or file search stores of the platform.
func readsSharedBody(prov, method, path string) bool {
	if prov != provider.Google || method != http.MethodPost {
		return false
	}
	allowed, _ := sharedEndpoint(prov, method, path)
	return allowed
}

// includeUsage reports whether stream_options requests usage. Options that
// are not an object, or that name include_usage twice, count as not
// requesting it, so the proxy rewrites them with a single include_usage.
func (ri *requestInfo) includeUsage() bool {
	if len(ri.StreamOptions) == 0 {
		return false
	}
	include := false
	err := scanObject(ri.StreamOptions, []string{"include_usage"}, func(_, _ int, value []byte) error {
		return decodeBool(value, &include)
	})
	return err == nil && include
}

// withIncludeUsage returns body, which ri was read from, with
// stream_options.include_usage set to true. Only that member changes, so
// the rest of the body, the client's other stream options included, goes
// upstream byte for byte. The walk that read ri has already found where
// stream_options is.
func (ri *requestInfo) withIncludeUsage(body []byte) ([]byte, error) {
	// A member added last is what a parser that matches names regardless
	// of case and keeps the last match reads, rather than a client's
	// "Stream_Options" or "Include_Usage".
	if ri.StreamOptions == nil {
		return appendMember(body, `"stream_options":{"include_usage":true}`), nil
	}
	at, end := ri.streamOptionsAt, ri.streamOptionsAt+len(ri.StreamOptions)
	var options []byte
	switch ri.StreamOptions[0] {
	case 'n': // null
		options = []byte(`{"include_usage":true}`)
	case '{':
		var err error
		if options, err = setIncludeUsage(ri.StreamOptions); err != nil {
			return nil, err
		}
	default:
		return nil, errors.New("invalid stream_options: expected a JSON object or null")
	}
	return slices.Concat(body[:at], options, body[end:]), nil
}

// setIncludeUsage returns the JSON object options with include_usage set to
// true: its value replaced where options has the member, or the member
// added last.
func setIncludeUsage(options []byte) ([]byte, error) {
	at, end := -1, -1
	err := scanObject(options, []string{"include_usage"}, func(_, start int, value []byte) error {
		at, end = start, start+len(value)
		return nil
	})
	var dup *duplicateFieldError
	if errors.As(err, &dup) {
		// Setting one copy would leave the other for a parser that reads
		// it, so the object is written again with a single member.
		decoded := map[string]json.RawMessage{}
		if err := json.Unmarshal(options, &decoded); err != nil {
			return nil, err
		}
		decoded["include_usage"] = json.RawMessage("true")
		return json.Marshal(decoded)
	}
	if err != nil {
		return nil, err
	}
	if at >= 0 {
		return slices.Concat(options[:at], []byte("true"), options[end:]), nil
	}
	return appendMember(options, `"include_usage":true`), nil
}

// appendMember returns the valid JSON object obj with member added last.
func appendMember(obj []byte, member string) []byte {
	closing := len(obj) - 1
	for obj[closing] != '}' {
		closing--
	}
	if obj[skipSpace(obj, skipSpace(obj, 0)+1)] != '}' {
		member = "," + member
	}
	return slices.Concat(obj[:closing], []byte(member), obj[closing:])
}

// isGoogleStream reports whether a Google path requests a stream.
func isGoogleStream(path string) bool {
	return strings.HasSuffix(path, ":streamGenerateContent")
}

// requestedContainers returns the ids of existing code execution containers
// that a request body requests to run in. On Anthropic that is the top-level
// container, as an id or as an object with one. On the OpenAI Responses API
// it is a tool's container id or its environment's container_id
// (code_interpreter and shell). Objects that name a member twice are
// rejected, because the provider could read another copy than the one
// checked.
func requestedContainers(prov, rest string, info *requestInfo) ([]string, error) {
	switch {
	case prov == provider.Anthropic && len(info.Container) > 0:
		id, err := containerValue(info.Container, "id", "container")
		if err != nil || id == "" {
			return nil, err
		}
		return []string{id}, nil
	case isResponsesAPI(prov, rest) && len(info.Tools) > 0:
		tools := gjson.ParseBytes(info.Tools)
		if !tools.IsArray() {
			return nil, nil
		}
		var ids []string
		var err error
		tools.ForEach(func(_, tool gjson.Result) bool {
			if !tool.IsObject() {
				return true
			}
			err = scanObject([]byte(tool.Raw), []string{"container", "environment"}, func(field, _ int, value []byte) error {
				var id string
				var err error
				if field == 0 {
					id, err = containerValue(value, "", "tools[].container")
				} else {
					id, err = containerValue(value, "container_id", "tools[].environment")
				}
				if id != "" {
					ids = append(ids, id)
				}
				return err
			})
			return err == nil
		})
		return ids, err
	}
	return nil, nil
}

// forbiddenSharedTool returns a description of the first tool of a
// Responses API request that the shared key does not serve, or "". The
// image generation tool runs an image model of its own, which the model
// allowlist does not check, and the shared key serves no image generation.
// A tool object that names its type twice is rejected, because the
// provider could read another copy than the one checked.
func forbiddenSharedTool(info *requestInfo) (string, error) {
	tools := gjson.ParseBytes(info.Tools)
	if !tools.IsArray() {
		return "", nil
	}
	var found string
	var err error
	tools.ForEach(func(_, tool gjson.Result) bool {
		if !tool.IsObject() {
			return true
		}
		err = scanObject([]byte(tool.Raw), []string{"type"}, func(_, _ int, value []byte) error {
			var typ string
			if json.Unmarshal(value, &typ) == nil && typ == "image_generation" {
				found = "the image generation tool (image_generation)"
			}
			return nil
		})
		return err == nil && found == ""
	})
	return found, err
}

// containerValue returns the container id that value names: value itself
// when it is a string, or its member idField when it is an object and
// idField is not "". Other JSON types name no container.
func containerValue(value []byte, idField, name string) (string, error) {
	var id string
	switch value[0] {
	case '"':
		if json.Unmarshal(value, &id) != nil {
			return "", invalidField(name, "a string")
		}
	case '{':
		if idField == "" {
			return "", nil
		}
		err := scanObject(value, []string{idField}, func(_, _ int, member []byte) error {
			if member[0] == 'n' { // null
				return nil
			}
			if json.Unmarshal(member, &id) != nil {
				return invalidField(name+"."+idField, "a string")
			}
			return nil
		})
		if err != nil {
			return "", err
		}
	}
	return id, nil
}

// inspectInput reads what a Responses API request names of the items stored
// upstream, other than previous_response_id. It returns a description of a
// conversation, or of an input item that refers to a stored item by id
// (type item_reference, or no type and an id). The proxy cannot tell which
// mailbox created those, so a shared request may name none. It also returns
// the ids that must be the mailbox's own. Those are the container_id of any
// input item, such as a code_interpreter_call passed back, and the id of a
// reasoning item passed back, which the Responses API looks up in its
// storage.
func inspectInput(info *requestInfo) (reference string, owned []string, err error) {
	if len(info.Conversation) > 0 && !bytes.Equal(info.Conversation, []byte("null")) {
		return "a conversation", nil, nil
	}
	input := gjson.ParseBytes(info.Input)
	if !input.IsArray() {
		return "", nil, nil
	}
	input.ForEach(func(_, item gjson.Result) bool {
		if !item.IsObject() {
			return true
		}
		typ, id, hasID := "", "", false
		err = scanObject([]byte(item.Raw), []string{"type", "id", "container_id"}, func(field, _ int, value []byte) error {
			switch field {
			case 0:
				json.Unmarshal(value, &typ)
			case 1:
				hasID = value[0] != 'n' // not null
				json.Unmarshal(value, &id)
			default:
				if value[0] == '"' {
					var container string
					if json.Unmarshal(value, &container) != nil {
						return invalidField("input[].container_id", "a string")
					}
					owned = append(owned, container)
				}
			}
			return nil
		})
		switch {
		case err != nil:
		case typ == "item_reference", typ == "" && hasID:
			reference = "an input item that refers to a stored item by id"
		case typ == "image_generation_call" && hasID:
			// The Responses API reads the image of a call passed back by
			// id from its storage.
			reference = "an image generation call passed back by id"
		case typ == "reasoning" && hasID && id == "":
			err = invalidField("input[].id", "a string")
		case typ == "reasoning" && id != "":
			owned = append(owned, id)
		}
		return err == nil && reference == ""
	})
	return reference, owned, err
}
