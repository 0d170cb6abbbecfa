package upstreamtest

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// googleModels are the models GET /{version}/models lists, id and display
// name.
var googleModels = [][2]string{
	{"gemini-2.5-flash", "Gemini 2.5 Flash"},
	{"gemini-2.5-pro", "Gemini 2.5 Pro"},
	{"gemini-embedding-001", "Gemini Embedding 001"},
}

func (s *Server) serveGoogle(c *call) {
	if version, ok := strings.CutPrefix(c.r.URL.Path, "/upload/"); ok {
		if version, ok = strings.CutSuffix(version, "/files"); ok && c.r.Method == http.MethodPost {
			s.googleUpload(c, version)
			return
		}
	}
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

// googleUpload follows the resumable upload protocol of the Files API. A
// request with the start command opens a session and returns its URL in
// X-Goog-Upload-URL, on the host the request was sent to. The file's bytes
// then go to that URL in order, each request naming its offset, and the one
// with the finalize command gets the file's metadata.
func (s *Server) googleUpload(c *call, version string) {
	h := c.r.Header
	command := strings.ToLower(h.Get("X-Goog-Upload-Command"))
	if id := c.r.URL.Query().Get("upload_id"); id != "" {
		s.mu.Lock()
		up := s.uploads[id]
		s.mu.Unlock()
		offset, err := strconv.Atoi(h.Get("X-Goog-Upload-Offset"))
		switch {
		case up == nil:
			s.writeError(c, http.StatusNotFound, "no upload session "+id)
			return
		case err != nil || offset != len(up.data):
			s.writeError(c, http.StatusBadRequest, "X-Goog-Upload-Offset must be "+strconv.Itoa(len(up.data)))
			return
		case !strings.Contains(command, "upload"):
			s.writeError(c, http.StatusBadRequest, "X-Goog-Upload-Command must be upload or upload, finalize")
			return
		}
		s.mu.Lock()
		up.data = append(up.data, c.body...)
		s.mu.Unlock()
		if !strings.Contains(command, "finalize") {
			c.w.Header().Set("X-Goog-Upload-Status", "active")
			s.writeEmpty(c)
			return
		}
		if len(up.data) != up.size {
			s.writeError(c, http.StatusBadRequest, "the upload has "+strconv.Itoa(len(up.data))+" bytes, not the "+strconv.Itoa(up.size)+" announced")
			return
		}
		s.mu.Lock()
		delete(s.uploads, id)
		s.mu.Unlock()
		sum := sha256.Sum256(up.data)
		now := time.Now().UTC()
		c.w.Header().Set("X-Goog-Upload-Status", "final")
		s.writeJSON(c, http.StatusOK, map[string]any{"file": map[string]any{
			"name":           "files/" + id,
			"displayName":    up.displayName,
			"mimeType":       up.mimeType,
			"sizeBytes":      strconv.Itoa(up.size),
			"createTime":     now.Format(time.RFC3339Nano),
			"updateTime":     now.Format(time.RFC3339Nano),
			"expirationTime": now.Add(48 * time.Hour).Format(time.RFC3339Nano),
			"sha256Hash":     base64.StdEncoding.EncodeToString([]byte(hex.EncodeToString(sum[:]))),
			"uri":            origin(c.r) + "/" + version + "/files/" + id,
			"state":          "ACTIVE",
			"source":         "UPLOADED",
		}})
		return
	}

	size, err := strconv.Atoi(h.Get("X-Goog-Upload-Header-Content-Length"))
	if !strings.EqualFold(h.Get("X-Goog-Upload-Protocol"), "resumable") || command != "start" || err != nil || size < 0 {
		s.writeError(c, http.StatusBadRequest, "a new upload needs X-Goog-Upload-Protocol: resumable, X-Goog-Upload-Command: start and X-Goog-Upload-Header-Content-Length")
		return
	}
	up := &upload{size: size, mimeType: h.Get("X-Goog-Upload-Header-Content-Type")}
	if file, ok := c.json["file"].(map[string]any); ok {
		up.displayName, _ = file["displayName"].(string)
	}
	id := s.nextID("upload-")
	s.mu.Lock()
	if s.uploads == nil {
		s.uploads = map[string]*upload{}
	}
	s.uploads[id] = up
	s.mu.Unlock()
	c.w.Header().Set("X-Goog-Upload-URL", origin(c.r)+"/upload/"+version+"/files?upload_id="+id+"&upload_protocol=resumable")
	c.w.Header().Set("X-Goog-Upload-Status", "active")
	c.w.Header().Set("X-Goog-Upload-Chunk-Granularity", "8388608")
	s.writeEmpty(c)
}

// writeEmpty sends 200 with no body, as the upload protocol does for every
// step but the last.
func (s *Server) writeEmpty(c *call) {
	if c.gz != nil {
		c.gz = nil
		c.w.Header().Del("Content-Encoding")
	}
	s.setStatus(c, http.StatusOK)
	c.w.Header().Set("Content-Length", "0")
	c.w.WriteHeader(http.StatusOK)
}

// upload is an open resumable upload session.
type upload struct {
	size        int
	mimeType    string
	displayName string
	data        []byte
}

// origin returns the scheme and host of the URL the request was sent to.
func origin(r *http.Request) string {
	if r.TLS != nil {
		return "https://" + r.Host
	}
	return "http://" + r.Host
}
