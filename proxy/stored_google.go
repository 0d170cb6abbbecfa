package proxy

import (
	"bytes"
	"net/url"
	"strings"
)

// Google's generation requests name stored objects in four ways: a file
// of the Files API in a part's fileData.fileUri, a context cache in
// cachedContent, file search stores in a fileSearch tool, and a custom
// voice, whose id starts with "voice_", in the speech settings. On the
// shared key all four would be the platform's, as with OpenAI and
// Anthropic.
//
// Google's JSON parser accepts each field by its lowerCamelCase name or its
// proto name, and rejects a name it does not know, so a request can hold
// these only where the schema has them, spelled one of two ways. The scan
// therefore looks everywhere except in the values that are the
// application's own data (a function call's arguments, a function's
// response, and schemas), where any name may appear.

// googleDataMembers are the members whose values Google takes as data
// rather than as fields of its schema: google.protobuf.Struct and Value
// fields, and the Schema objects of function declarations and structured
// output, whose properties the application names.
var googleDataMembers = map[string]bool{
	"args": true, "response": true, "partMetadata": true, "part_metadata": true,
	"parameters": true, "parametersJsonSchema": true, "parameters_json_schema": true,
	"responseSchema": true, "response_schema": true,
	"responseJsonSchema": true, "response_json_schema": true, "_responseJsonSchema": true,
}

// googleStoredReference returns a description of the stored object that a
// shared Google request body names, or "" when it names none. otherModel is
// set to a model named in the body, as countTokens and batchEmbedContents
// requests do, that is not pathModel, the model of the request's path.
// tooDeep is set for a body that nests beyond maxStoredDepth. body must be
// valid JSON.
func googleStoredReference(body []byte, pathModel string) (reference, otherModel string, tooDeep bool) {
	if !bytes.Contains(body, []byte(`\u`)) &&
		!bytes.Contains(body, []byte("ileUri")) && !bytes.Contains(body, []byte("ile_uri")) &&
		!bytes.Contains(body, []byte("achedContent")) && !bytes.Contains(body, []byte("ached_content")) &&
		!bytes.Contains(body, []byte("ileSearch")) && !bytes.Contains(body, []byte("ile_search")) &&
		!bytes.Contains(body, []byte("peechConfig")) && !bytes.Contains(body, []byte("peech_config")) &&
		!bytes.Contains(body, []byte(`"model"`)) {
		return "", "", false
	}
	s := googleScan{pathModel: pathModel}
	tooDeep = walkJSON(body, &s)
	return s.reference, s.otherModel, tooDeep
}

type googleFrame struct {
	object bool
	// data is set inside the application's own data, and speech inside the
	// speech settings.
	data   bool
	speech bool
	name   string
}

type googleScan struct {
	pathModel  string
	stack      []googleFrame
	reference  string
	otherModel string
}

func (s *googleScan) top() *googleFrame { return &s.stack[len(s.stack)-1] }

func (s *googleScan) open(object bool, _ int, _ []byte) bool {
	f := googleFrame{object: object}
	if len(s.stack) > 0 {
		parent := s.top()
		f.data = parent.data || (parent.object && googleDataMembers[parent.name])
		f.speech = parent.speech || (parent.object && (parent.name == "speechConfig" || parent.name == "speech_config"))
		if !f.data && parent.object && (parent.name == "fileSearch" || parent.name == "file_search") {
			s.reference = "file search stores (fileSearch)"
		}
	}
	s.stack = append(s.stack, f)
	return s.clean()
}

// clean reports whether the scan has found nothing yet, so that it goes on.
func (s *googleScan) clean() bool { return s.reference == "" && s.otherModel == "" }

func (s *googleScan) close() bool {
	s.stack = s.stack[:len(s.stack)-1]
	if len(s.stack) > 0 && s.top().object {
		s.top().name = ""
	}
	return true
}

func (s *googleScan) name(name string) { s.top().name = name }

func (s *googleScan) value(raw []byte) bool {
	if len(s.stack) == 0 || !s.top().object || s.top().data {
		return true
	}
	f := s.top()
	name := f.name
	f.name = ""
	if len(raw) == 0 || raw[0] != '"' {
		// Both fields are strings, and Google rejects any other value.
		return true
	}
	switch name {
	case "fileUri", "file_uri":
		if !externalFileURI(unquote(raw)) {
			s.reference = "a file (fileData.fileUri)"
		}
	case "cachedContent", "cached_content":
		if unquote(raw) != "" {
			s.reference = "cached content (cachedContent)"
		}
	case "model":
		if m := unquote(raw); m != "" && m != s.pathModel && m != "models/"+s.pathModel {
			s.otherModel = m
		}
	default:
		// Built-in voices have names such as "Kore", while a voice created
		// with the Voices API has an id such as "voice_abc" that names it
		// as an object of the account. Only members that name a voice count:
		// a speaker's label is the application's own.
		if !f.speech || !strings.Contains(strings.ToLower(name), "voice") {
			break
		}
		if v := unquote(raw); strings.HasPrefix(v, "voice_") || strings.HasPrefix(v, "voices/") {
			s.reference = "a custom voice (speechConfig)"
		}
	}
	return s.clean()
}

// externalFileURI reports whether a fileData URI names a web resource that
// Google fetches as anyone would, such as a YouTube video. Any other URI may
// name an object that the account holds: a file of the Files API, a Cloud
// Storage object (gs:// or a Google storage host), or anything else on a
// Google host.
func externalFileURI(uri string) bool {
	if strings.ContainsAny(uri, "\\ \t\r\n") {
		return false
	}
	u, err := url.Parse(uri)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.User != nil || u.Opaque != "" {
		return false
	}
	// A resolver may map other dots or letters onto ASCII (IDNA), so only
	// an ASCII name or address is compared.
	host := strings.TrimRight(strings.ToLower(u.Hostname()), ".")
	if host == "" || strings.IndexFunc(host, func(r rune) bool {
		return !('a' <= r && r <= 'z' || '0' <= r && r <= '9' || r == '.' || r == '-' || r == ':')
	}) >= 0 {
		return false
	}
	for _, google := range []string{"googleapis.com", "google.com"} {
		if host == google || strings.HasSuffix(host, "."+google) {
			return false
		}
	}
	return true
}
