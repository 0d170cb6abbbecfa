package upstreamtest

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strings"
	"time"
)

// openAIModels are the models GET /v1/models lists.
var openAIModels = []string{"gpt-4o-mini", "gpt-4.1", "text-embedding-3-small"}

// EmbeddingDimensions is the length of every embedding vector the emulators
// return unless the request sets fewer dimensions.
const EmbeddingDimensions = 8

func (s *Server) serveOpenAI(c *call) {
	c.w.Header().Set("X-Request-Id", s.nextID("req_"))
	c.w.Header().Set("Openai-Version", "2020-10-01")
	path := c.r.URL.Path
	switch {
	case c.r.Method == http.MethodPost && path == "/v1/chat/completions":
		if s.requireJSON(c) {
			s.openAIChat(c)
		}
	case c.r.Method == http.MethodPost && path == "/v1/completions":
		if s.requireJSON(c) {
			s.openAICompletions(c)
		}
	case c.r.Method == http.MethodPost && path == "/v1/responses":
		if s.requireJSON(c) {
			s.openAIResponses(c)
		}
	case c.r.Method == http.MethodPost && path == "/v1/embeddings":
		if s.requireJSON(c) {
			s.openAIEmbeddings(c)
		}
	case c.r.Method == http.MethodGet && path == "/v1/models":
		data := []any{}
		for _, m := range openAIModels {
			data = append(data, openAIModel(m))
		}
		s.writeJSON(c, http.StatusOK, map[string]any{"object": "list", "data": data})
	case c.r.Method == http.MethodGet && strings.HasPrefix(path, "/v1/models/"):
		id := strings.TrimPrefix(path, "/v1/models/")
		for _, m := range openAIModels {
			if m == id {
				s.writeJSON(c, http.StatusOK, openAIModel(m))
				return
			}
		}
		s.writeError(c, http.StatusNotFound, fmt.Sprintf("The model '%s' does not exist", id))
	default:
		s.writeOK(c)
	}
}

// requireJSON sends a 400 in the provider's shape when the body is not a JSON
// object, and reports whether it is one.
func (s *Server) requireJSON(c *call) bool {
	if c.json != nil {
		return true
	}
	msg := "We could not parse the JSON body of your request."
	switch s.Provider {
	case Anthropic:
		msg = "invalid JSON body"
	case Google:
		msg = "Invalid JSON payload received."
	}
	s.writeError(c, http.StatusBadRequest, msg)
	return false
}

func openAIModel(id string) map[string]any {
	return map[string]any{"id": id, "object": "model", "created": 1715367049, "owned_by": "system"}
}

func stringField(m map[string]any, key string) string {
	v, _ := m[key].(string)
	return v
}

func boolField(m map[string]any, keys ...string) bool {
	for _, k := range keys[:len(keys)-1] {
		m, _ = m[k].(map[string]any)
	}
	v, _ := m[keys[len(keys)-1]].(bool)
	return v
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("upstreamtest: encode event: %v", err))
	}
	return string(b)
}

// sse formats one server-sent event; an empty name leaves out the event line.
func sse(name, data string) string {
	if name == "" {
		return "data: " + data + "\n\n"
	}
	return "event: " + name + "\ndata: " + data + "\n\n"
}

func openAIChatUsage(u Usage) map[string]any {
	return map[string]any{
		"prompt_tokens":     u.InputTokens,
		"completion_tokens": u.OutputTokens,
		"total_tokens":      u.InputTokens + u.OutputTokens,
		"prompt_tokens_details": map[string]any{
			"cached_tokens": 0, "audio_tokens": 0,
		},
		"completion_tokens_details": map[string]any{
			"reasoning_tokens": 0, "audio_tokens": 0,
			"accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
		},
	}
}

func (s *Server) openAIChat(c *call) {
	model, u, stream, finish := s.startCompletion(c)
	out := u.OutputTokens
	id := s.nextID("chatcmpl-")
	created := time.Now().Unix()

	if !stream {
		s.writeJSON(c, http.StatusOK, map[string]any{
			"id":      id,
			"object":  "chat.completion",
			"created": created,
			"model":   model,
			"choices": []any{map[string]any{
				"index":         0,
				"message":       map[string]any{"role": "assistant", "content": ReplyText(out), "refusal": nil, "annotations": []any{}},
				"logprobs":      nil,
				"finish_reason": finish,
			}},
			"usage":              openAIChatUsage(u),
			"service_tier":       "default",
			"system_fingerprint": "fp_emulator",
		})
		return
	}

	includeUsage := boolField(c.json, "stream_options", "include_usage")
	chunk := func(choices []any, usage any) string {
		m := map[string]any{
			"id":                 id,
			"object":             "chat.completion.chunk",
			"created":            created,
			"model":              model,
			"service_tier":       "default",
			"system_fingerprint": "fp_emulator",
			"choices":            choices,
		}
		if includeUsage {
			m["usage"] = usage
		}
		return sse("", mustJSON(m))
	}
	choice := func(delta map[string]any, finish any) []any {
		return []any{map[string]any{"index": 0, "delta": delta, "logprobs": nil, "finish_reason": finish}}
	}

	st := s.startStream(c, "text/event-stream; charset=utf-8")
	if st.send(chunk(choice(map[string]any{"role": "assistant", "content": "", "refusal": nil}, nil), nil), false) != nil {
		return
	}
	for _, d := range ReplyDeltas[:out] {
		if st.send(chunk(choice(map[string]any{"content": d}, nil), nil), true) != nil {
			return
		}
	}
	if st.send(chunk(choice(map[string]any{}, finish), nil), false) != nil {
		return
	}
	if includeUsage {
		if st.send(chunk([]any{}, openAIChatUsage(u)), false) != nil {
			return
		}
	}
	st.send(sse("", "[DONE]"), false)
}

// startCompletion reads and records the model of a chat or legacy
// completion request, the usage its reply reports, whether it streams, and
// its finish reason.
func (s *Server) startCompletion(c *call) (model string, u Usage, stream bool, finish string) {
	model = stringField(c.json, "model")
	out, cut := outputTokens(c.json)
	u = Usage{InputTokens: inputTokens(c.json), OutputTokens: out}
	stream = boolField(c.json, "stream")
	s.setResult(c, model, stream, u)
	finish = "stop"
	if cut {
		finish = "length"
	}
	return model, u, stream, finish
}

// openAICompletions serves the legacy completions API. Its stream reports
// usage, in a last chunk with no choices, only when stream_options requests
// it.
func (s *Server) openAICompletions(c *call) {
	model, u, stream, finish := s.startCompletion(c)
	out := u.OutputTokens
	id := s.nextID("cmpl-")
	created := time.Now().Unix()
	completion := func(choices []any, usage any) map[string]any {
		return map[string]any{
			"id": id, "object": "text_completion", "created": created, "model": model,
			"system_fingerprint": "fp_emulator", "choices": choices, "usage": usage,
		}
	}
	choice := func(text string, finish any) []any {
		return []any{map[string]any{"text": text, "index": 0, "logprobs": nil, "finish_reason": finish}}
	}
	if !stream {
		s.writeJSON(c, http.StatusOK, completion(choice(ReplyText(out), finish), openAIChatUsage(u)))
		return
	}

	includeUsage := boolField(c.json, "stream_options", "include_usage")
	chunk := func(choices []any, usage any) string {
		m := completion(choices, usage)
		if !includeUsage {
			delete(m, "usage")
		}
		return sse("", mustJSON(m))
	}
	st := s.startStream(c, "text/event-stream; charset=utf-8")
	for _, d := range ReplyDeltas[:out] {
		if st.send(chunk(choice(d, nil), nil), true) != nil {
			return
		}
	}
	if st.send(chunk(choice("", finish), nil), false) != nil {
		return
	}
	if includeUsage {
		if st.send(chunk([]any{}, openAIChatUsage(u)), false) != nil {
			return
		}
	}
	st.send(sse("", "[DONE]"), false)
}

func responsesUsage(u Usage) map[string]any {
	return map[string]any{
		"input_tokens":          u.InputTokens,
		"input_tokens_details":  map[string]any{"cached_tokens": 0},
		"output_tokens":         u.OutputTokens,
		"output_tokens_details": map[string]any{"reasoning_tokens": 0},
		"total_tokens":          u.InputTokens + u.OutputTokens,
	}
}

func (s *Server) openAIResponses(c *call) {
	model := stringField(c.json, "model")
	out, cut := outputTokens(c.json)
	u := Usage{InputTokens: inputTokens(c.json), OutputTokens: out}
	stream := boolField(c.json, "stream")
	s.setResult(c, model, stream, u)

	id := s.nextID("resp_")
	msgID := s.nextID("msg_")
	text := ReplyText(out)
	var prev any
	if p := stringField(c.json, "previous_response_id"); p != "" {
		prev = p
	}
	response := func(status string, output []any, usage any) map[string]any {
		var incomplete any
		if status == "incomplete" {
			incomplete = map[string]any{"reason": "max_output_tokens"}
		}
		return map[string]any{
			"id":                   id,
			"object":               "response",
			"created_at":           time.Now().Unix(),
			"status":               status,
			"error":                nil,
			"incomplete_details":   incomplete,
			"instructions":         c.json["instructions"],
			"max_output_tokens":    c.json["max_output_tokens"],
			"model":                model,
			"output":               output,
			"parallel_tool_calls":  true,
			"previous_response_id": prev,
			"reasoning":            map[string]any{"effort": nil, "summary": nil},
			"store":                true,
			"temperature":          1.0,
			"text":                 map[string]any{"format": map[string]any{"type": "text"}},
			"tool_choice":          "auto",
			"tools":                []any{},
			"top_p":                1.0,
			"truncation":           "disabled",
			"usage":                usage,
			"user":                 nil,
			"metadata":             map[string]any{},
		}
	}
	part := func(t string) map[string]any {
		return map[string]any{"type": "output_text", "text": t, "annotations": []any{}, "logprobs": []any{}}
	}
	item := func(status string, content []any) map[string]any {
		return map[string]any{"id": msgID, "type": "message", "status": status, "role": "assistant", "content": content}
	}
	final := "completed"
	if cut {
		final = "incomplete"
	}
	// A request with reasoning options gets a reasoning item, and a
	// code_interpreter tool runs once, in the container the request names
	// or in a new one, both before the message.
	var calls []any
	if c.json["reasoning"] != nil {
		calls = append(calls, map[string]any{"id": s.nextID("rs_"), "type": "reasoning", "summary": []any{}})
	}
	if container := s.openAIContainer(c.json); container != "" {
		calls = append(calls, map[string]any{
			"id": s.nextID("ci_"), "type": "code_interpreter_call", "status": "completed",
			"container_id": container, "code": "print(6 * 7)", "outputs": nil,
		})
	}
	msgIndex := len(calls)

	if !stream {
		s.writeJSON(c, http.StatusOK, response(final, append(slices.Clip(calls), item("completed", []any{part(text)})), responsesUsage(u)))
		return
	}

	seq := 0
	event := func(typ string, fields map[string]any) string {
		fields["type"] = typ
		fields["sequence_number"] = seq
		seq++
		return sse(typ, mustJSON(fields))
	}
	steps := []step{
		{event("response.created", map[string]any{"response": response("in_progress", []any{}, nil)}), false},
		{event("response.in_progress", map[string]any{"response": response("in_progress", []any{}, nil)}), false},
	}
	for i, call := range calls {
		steps = append(steps,
			step{event("response.output_item.added", map[string]any{"output_index": i, "item": call}), false},
			step{event("response.output_item.done", map[string]any{"output_index": i, "item": call}), false})
	}
	steps = append(steps,
		step{event("response.output_item.added", map[string]any{"output_index": msgIndex, "item": item("in_progress", []any{})}), false},
		step{event("response.content_part.added", map[string]any{"item_id": msgID, "output_index": msgIndex, "content_index": 0, "part": part("")}), false},
	)
	for _, d := range ReplyDeltas[:out] {
		steps = append(steps, step{event("response.output_text.delta", map[string]any{"item_id": msgID, "output_index": msgIndex, "content_index": 0, "delta": d, "logprobs": []any{}}), true})
	}
	steps = append(steps,
		step{event("response.output_text.done", map[string]any{"item_id": msgID, "output_index": msgIndex, "content_index": 0, "text": text, "logprobs": []any{}}), false},
		step{event("response.content_part.done", map[string]any{"item_id": msgID, "output_index": msgIndex, "content_index": 0, "part": part(text)}), false},
		step{event("response.output_item.done", map[string]any{"output_index": msgIndex, "item": item("completed", []any{part(text)})}), false},
		step{event("response."+final, map[string]any{"response": response(final, append(slices.Clip(calls), item("completed", []any{part(text)})), responsesUsage(u))}), false},
	)
	s.startStream(c, "text/event-stream; charset=utf-8").sendAll(steps)
}

func (s *Server) openAIEmbeddings(c *call) {
	model := stringField(c.json, "model")
	u := Usage{InputTokens: inputTokens(c.json)}
	s.setResult(c, model, false, u)

	inputs := 1
	if list, ok := c.json["input"].([]any); ok {
		inputs = len(list)
		// A list of token ids is one input, not many.
		if inputs > 0 {
			if _, isNumber := list[0].(float64); isNumber {
				inputs = 1
			}
		}
	}
	dims := EmbeddingDimensions
	if v, ok := c.json["dimensions"].(float64); ok && v > 0 && int(v) < dims {
		dims = int(v)
	}
	base64Format := stringField(c.json, "encoding_format") == "base64"
	data := []any{}
	for i := range inputs {
		vec := EmbeddingVector(i, dims)
		var embedding any = vec
		if base64Format {
			buf := make([]byte, 4*len(vec))
			for j, f := range vec {
				binary.LittleEndian.PutUint32(buf[4*j:], math.Float32bits(f))
			}
			embedding = base64.StdEncoding.EncodeToString(buf)
		}
		data = append(data, map[string]any{"object": "embedding", "index": i, "embedding": embedding})
	}
	s.writeJSON(c, http.StatusOK, map[string]any{
		"object": "list",
		"data":   data,
		"model":  model,
		"usage":  map[string]any{"prompt_tokens": u.InputTokens, "total_tokens": u.InputTokens},
	})
}

// EmbeddingVector returns the embedding the emulators return for the input at
// index: dims values, element j being (index+1)/10 + j/100, exact in float32
// only approximately, so compare with a tolerance.
func EmbeddingVector(index, dims int) []float32 {
	vec := make([]float32, dims)
	for j := range vec {
		vec[j] = float32(index+1)/10 + float32(j)/100
	}
	return vec
}

// openAIContainer returns the container a Responses request runs its
// code_interpreter tool in: the id the tool names, or a new one for an
// automatic container, or "" without the tool.
func (s *Server) openAIContainer(req map[string]any) string {
	tools, _ := req["tools"].([]any)
	for _, t := range tools {
		tool, _ := t.(map[string]any)
		if tool["type"] != "code_interpreter" {
			continue
		}
		if id, ok := tool["container"].(string); ok {
			return id
		}
		return s.nextID("cntr_")
	}
	return ""
}
