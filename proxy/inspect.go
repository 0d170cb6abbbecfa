package proxy

import (
	"bytes"
	"encoding/json"
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
// forwarding it: JSON POSTs to generation endpoints, for the model, the
// stream flag and the OpenAI stream usage option. Other bodies (uploads,
// audio) stream through unread.
func needsBody(prov, method, path string, h http.Header) bool {
	if method != http.MethodPost {
		return false
	}
	ct := h.Get("Content-Type")
	if ct != "" && !strings.Contains(ct, "json") {
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
