package upstreamtest

import (
	"net/http"
	"strings"
)

// googleModels are the models GET /{version}/models lists, id and display
// name.
var googleModels = [][2]string{
	{"gemini-2.5-flash", "Gemini 2.5 Flash"},
	{"gemini-2.5-pro", "Gemini 2.5 Pro"},
	{"gemini-embedding-001", "Gemini Embedding 001"},
}

func (s *Server) serveGoogle(c *call) {
	version, rest, ok := strings.Cut(strings.TrimPrefix(c.r.URL.Path, "/"), "/")
	if !ok || (version != "v1" && version != "v1beta" && version != "v1alpha") || !strings.HasPrefix(rest, "models") {
		s.writeOK(c)
		return
	}
	if rest == "models" {
		if c.r.Method != http.MethodGet {
			s.writeOK(c)
			return
		}
		list := []any{}
		for _, m := range googleModels {
			list = append(list, googleModel(m))
		}
		s.writeJSON(c, http.StatusOK, map[string]any{"models": list})
		return
	}
	name := strings.TrimPrefix(rest, "models/")
	model, method, hasMethod := strings.Cut(name, ":")
	if !hasMethod {
		if c.r.Method != http.MethodGet {
			s.writeOK(c)
			return
		}
		for _, m := range googleModels {
			if m[0] == model {
				s.writeJSON(c, http.StatusOK, googleModel(m))
				return
			}
		}
		s.writeError(c, http.StatusNotFound, "models/"+model+" is not found for API version "+version)
		return
	}
	if c.r.Method != http.MethodPost {
		s.writeOK(c)
		return
	}
	switch method {
	case "generateContent", "streamGenerateContent":
		if s.requireJSON(c) {
			s.googleGenerate(c, model, method == "streamGenerateContent")
		}
	case "countTokens":
		if s.requireJSON(c) {
			req := c.json
			if inner, ok := req["generateContentRequest"].(map[string]any); ok {
				req = inner
			}
			n := inputTokens(req)
			s.setResult(c, model, false, Usage{})
			s.writeJSON(c, http.StatusOK, map[string]any{
				"totalTokens":         n,
				"promptTokensDetails": []any{map[string]any{"modality": "TEXT", "tokenCount": n}},
			})
		}
	case "embedContent":
		if s.requireJSON(c) {
			s.setResult(c, model, false, Usage{})
			s.writeJSON(c, http.StatusOK, map[string]any{
				"embedding": map[string]any{"values": EmbeddingVector(0, googleDimensions(c.json))},
			})
		}
	case "batchEmbedContents":
		if s.requireJSON(c) {
			s.setResult(c, model, false, Usage{})
			requests, _ := c.json["requests"].([]any)
			list := []any{}
			for i, r := range requests {
				req, _ := r.(map[string]any)
				list = append(list, map[string]any{"values": EmbeddingVector(i, googleDimensions(req))})
			}
			s.writeJSON(c, http.StatusOK, map[string]any{"embeddings": list})
		}
	default:
		s.writeOK(c)
	}
}

func googleDimensions(req map[string]any) int {
	if v, ok := req["outputDimensionality"].(float64); ok && v > 0 && int(v) < EmbeddingDimensions {
		return int(v)
	}
	return EmbeddingDimensions
}

func googleModel(m [2]string) map[string]any {
	return map[string]any{
		"name":                       "models/" + m[0],
		"version":                    "001",
		"displayName":                m[1],
		"description":                "Emulated " + m[1] + ".",
		"inputTokenLimit":            1048576,
		"outputTokenLimit":           65536,
		"supportedGenerationMethods": []string{"generateContent", "countTokens"},
	}
}

func googleUsage(input, output int) map[string]any {
	return map[string]any{
		"promptTokenCount":     input,
		"candidatesTokenCount": output,
		"totalTokenCount":      input + output,
		"promptTokensDetails":  []any{map[string]any{"modality": "TEXT", "tokenCount": input}},
	}
}

// googleGenerate serves generateContent and streamGenerateContent. A stream
// is server-sent events with alt=sse ("data: {...}" events separated by
// "\r\n\r\n"), and otherwise one JSON array whose elements are sent as they
// are produced. Every element carries usageMetadata with the output so far.
func (s *Server) googleGenerate(c *call, model string, stream bool) {
	out, cut := outputTokens(c.json)
	u := Usage{InputTokens: inputTokens(c.json), OutputTokens: out}
	s.setResult(c, model, stream, u)
	finish := "STOP"
	if cut {
		finish = "MAX_TOKENS"
	}
	id := s.nextID("")
	response := func(text string, finishReason string, outputSoFar int) map[string]any {
		candidate := map[string]any{
			"content": map[string]any{"parts": []any{map[string]any{"text": text}}, "role": "model"},
			"index":   0,
		}
		if finishReason != "" {
			candidate["finishReason"] = finishReason
		}
		return map[string]any{
			"candidates":    []any{candidate},
			"usageMetadata": googleUsage(u.InputTokens, outputSoFar),
			"modelVersion":  model,
			"responseId":    id,
		}
	}

	if !stream {
		s.writeJSON(c, http.StatusOK, response(ReplyText(out), finish, out))
		return
	}

	sseMode := c.r.URL.Query().Get("alt") == "sse"
	steps := []step{}
	for i, d := range ReplyDeltas[:out] {
		reason := ""
		if i == out-1 {
			reason = finish
		}
		data := mustJSON(response(d, reason, i+1))
		switch {
		case sseMode:
			data = "data: " + data + "\r\n\r\n"
		case i == 0:
			data = "[" + data
		default:
			data = ",\r\n" + data
		}
		steps = append(steps, step{data, true})
	}
	contentType := "text/event-stream"
	if !sseMode {
		steps = append(steps, step{"]", false})
		contentType = "application/json; charset=UTF-8"
	}
	s.startStream(c, contentType).sendAll(steps)
}
