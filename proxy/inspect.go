package proxy

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"strings"

	"github.com/byokproxy/byokproxy/provider"
)

// requestInfo holds the fields the proxy reads from a JSON request body.
type requestInfo struct {
	Model              string          `json:"model"`
	Stream             bool            `json:"stream"`
	StreamOptions      json.RawMessage `json:"stream_options"`
	PreviousResponseID string          `json:"previous_response_id"`
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
	// Google names the model in the path and the stream in the method.
	return false
}

// includeUsage reports whether stream_options requests usage.
func (ri *requestInfo) includeUsage() bool {
	if len(ri.StreamOptions) == 0 {
		return false
	}
	var opts struct {
		IncludeUsage bool `json:"include_usage"`
	}
	json.Unmarshal(ri.StreamOptions, &opts)
	return opts.IncludeUsage
}

// withIncludeUsage returns body with stream_options.include_usage set to
// true, keeping the client's other stream options.
func withIncludeUsage(body []byte) ([]byte, error) {
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(body, &doc); err != nil {
		return nil, err
	}
	if doc == nil {
		// A JSON null decodes into a nil map without an error.
		return nil, errors.New("request body is not a JSON object")
	}
	opts := map[string]json.RawMessage{}
	if raw, ok := doc["stream_options"]; ok && !bytes.Equal(bytes.TrimSpace(raw), []byte("null")) {
		if err := json.Unmarshal(raw, &opts); err != nil {
			return nil, err
		}
	}
	opts["include_usage"] = json.RawMessage("true")
	encoded, err := json.Marshal(opts)
	if err != nil {
		return nil, err
	}
	doc["stream_options"] = encoded
	return json.Marshal(doc)
}

// isGoogleStream reports whether a Google path requests a stream.
func isGoogleStream(path string) bool {
	return strings.HasSuffix(path, ":streamGenerateContent")
}

// duplicateKey reports whether the top-level JSON object in body has key
// more than once. Parsers differ on which copy wins, so a body naming two
// models could pass the allowlist with one and reach the provider with the
// other.
func duplicateKey(body []byte, key string) bool {
	dec := json.NewDecoder(bytes.NewReader(body))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return false
	}
	seen := false
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return false
		}
		if name, _ := tok.(string); name == key {
			if seen {
				return true
			}
			seen = true
		}
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return false
		}
	}
	return false
}
