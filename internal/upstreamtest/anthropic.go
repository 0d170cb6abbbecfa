package upstreamtest

import (
	"net/http"
	"strings"
	"time"
)

// anthropicModels are the models GET /v1/models lists, id and display name.
var anthropicModels = [][2]string{
	{"claude-sonnet-4-5", "Claude Sonnet 4.5"},
	{"claude-haiku-4-5", "Claude Haiku 4.5"},
}

func (s *Server) serveAnthropic(c *call) {
	c.w.Header().Set("Request-Id", s.nextID("req_"))
	path := c.r.URL.Path
	known := strings.HasPrefix(path, "/v1/messages") || strings.HasPrefix(path, "/v1/models")
	if known && c.r.Header.Get("Anthropic-Version") == "" {
		s.writeError(c, http.StatusBadRequest, "anthropic-version: header is required")
		return
	}
	if tail, ok := strings.CutPrefix(path, "/v1/messages/batches"); ok && (tail == "" || tail[0] == '/') {
		s.serveAnthropicBatches(c, tail)
		return
	}
	switch {
	case c.r.Method == http.MethodPost && path == "/v1/messages":
		if s.requireJSON(c) {
			s.anthropicMessages(c)
		}
	case c.r.Method == http.MethodPost && path == "/v1/messages/count_tokens":
		if s.requireJSON(c) {
			s.setResult(c, stringField(c.json, "model"), false, Usage{})
			s.writeJSON(c, http.StatusOK, map[string]any{"input_tokens": inputTokens(c.json)})
		}
	case c.r.Method == http.MethodGet && path == "/v1/models":
		data := []any{}
		for _, m := range anthropicModels {
			data = append(data, anthropicModel(m))
		}
		s.writeJSON(c, http.StatusOK, map[string]any{
			"data":     data,
			"has_more": false,
			"first_id": anthropicModels[0][0],
			"last_id":  anthropicModels[len(anthropicModels)-1][0],
		})
	case c.r.Method == http.MethodGet && strings.HasPrefix(path, "/v1/models/"):
		id := strings.TrimPrefix(path, "/v1/models/")
		for _, m := range anthropicModels {
			if m[0] == id {
				s.writeJSON(c, http.StatusOK, anthropicModel(m))
				return
			}
		}
		s.writeError(c, http.StatusNotFound, "model: "+id)
	default:
		s.writeOK(c)
	}
}

func anthropicModel(m [2]string) map[string]any {
	return map[string]any{"type": "model", "id": m[0], "display_name": m[1], "created_at": "2025-10-01T00:00:00Z"}
}

func (s *Server) anthropicMessages(c *call) {
	if _, ok := c.json["max_tokens"].(float64); !ok {
		s.writeError(c, http.StatusBadRequest, "max_tokens: Field required")
		return
	}
	model := stringField(c.json, "model")
	out, cut := outputTokens(c.json)
	u := Usage{InputTokens: inputTokens(c.json), OutputTokens: out}
	stream := boolField(c.json, "stream")
	s.setResult(c, model, stream, u)
	stop := "end_turn"
	if cut {
		stop = "max_tokens"
	}
	id := s.nextID("msg_")
	container := s.anthropicContainer(c.json)

	if !stream {
		s.writeJSON(c, http.StatusOK, map[string]any{
			"id":            id,
			"type":          "message",
			"role":          "assistant",
			"model":         model,
			"content":       []any{map[string]any{"type": "text", "text": ReplyText(out)}},
			"container":     container,
			"stop_reason":   stop,
			"stop_sequence": nil,
			"usage":         anthropicUsage(u.InputTokens, u.OutputTokens),
		})
		return
	}

	// message_start reports one output token, as the API does; the final
	// count comes in message_delta.
	steps := []step{
		{sse("message_start", mustJSON(map[string]any{
			"type": "message_start",
			"message": map[string]any{
				"id": id, "type": "message", "role": "assistant", "model": model,
				"content": []any{}, "stop_reason": nil, "stop_sequence": nil,
				"usage": anthropicUsage(u.InputTokens, 1),
			},
		})), false},
		{sse("content_block_start", `{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}`), false},
		{sse("ping", `{"type": "ping"}`), false},
	}
	for _, d := range ReplyDeltas[:out] {
		steps = append(steps, step{sse("content_block_delta", mustJSON(map[string]any{
			"type": "content_block_delta", "index": 0,
			"delta": map[string]any{"type": "text_delta", "text": d},
		})), true})
	}
	steps = append(steps,
		step{sse("content_block_stop", `{"type":"content_block_stop","index":0}`), false},
		step{sse("message_delta", mustJSON(map[string]any{
			"type":  "message_delta",
			"delta": map[string]any{"stop_reason": stop, "stop_sequence": nil, "container": container},
			"usage": map[string]any{"output_tokens": out},
		})), false},
		step{sse("message_stop", `{"type":"message_stop"}`), false},
	)
	s.startStream(c, "text/event-stream; charset=utf-8").sendAll(steps)
}

// anthropicContainer returns the container a message reports: the one the
// request names, as an id or an object with one, or a new one when the
// request offers a code execution tool, or nil. As on the API, the
// container shows up in the message and in the message_delta event.
func (s *Server) anthropicContainer(req map[string]any) any {
	id, _ := req["container"].(string)
	if obj, ok := req["container"].(map[string]any); ok {
		id, _ = obj["id"].(string)
	}
	if id == "" {
		tools, _ := req["tools"].([]any)
		for _, t := range tools {
			tool, _ := t.(map[string]any)
			if typ, _ := tool["type"].(string); strings.HasPrefix(typ, "code_execution") {
				id = s.nextID("container_")
				break
			}
		}
	}
	if id == "" {
		return nil
	}
	return map[string]any{"id": id, "expires_at": time.Now().Add(time.Hour).UTC().Format(time.RFC3339)}
}

func anthropicUsage(input, output int) map[string]any {
	return map[string]any{
		"input_tokens":                input,
		"cache_creation_input_tokens": 0,
		"cache_read_input_tokens":     0,
		"output_tokens":               output,
		"service_tier":                "standard",
	}
}
