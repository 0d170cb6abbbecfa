package upstreamtest

import (
	"net/http"
	"strconv"
	"strings"
	"time"
)

// anthropicBatch is a Message Batch. The emulator completes every request of
// a batch when the batch is created, so a batch has always ended.
type anthropicBatch struct {
	id        string
	created   time.Time
	canceled  time.Time
	succeeded int
	// results are the lines of the results file, in request order.
	results []string
}

// serveAnthropicBatches serves the Message Batches API: create, list,
// retrieve, cancel, delete and results. A batch object names its results
// file by an absolute results_url on the host the request was sent to, as
// the API does on its own host.
func (s *Server) serveAnthropicBatches(c *call, tail string) {
	id, action, _ := strings.Cut(strings.TrimPrefix(tail, "/"), "/")
	switch {
	case tail == "" && c.r.Method == http.MethodPost:
		if s.requireJSON(c) {
			s.createAnthropicBatch(c)
		}
		return
	case tail == "" && c.r.Method == http.MethodGet:
		s.mu.Lock()
		data := []any{}
		list := map[string]any{"has_more": false, "first_id": nil, "last_id": nil}
		for _, b := range s.batches {
			data = append(data, b.object(c.r))
		}
		if len(s.batches) > 0 {
			list["first_id"] = s.batches[0].id
			list["last_id"] = s.batches[len(s.batches)-1].id
		}
		s.mu.Unlock()
		list["data"] = data
		s.writeJSON(c, http.StatusOK, list)
		return
	}

	s.mu.Lock()
	var batch *anthropicBatch
	for i, b := range s.batches {
		if b.id == id {
			batch = b
			if c.r.Method == http.MethodDelete && action == "" {
				s.batches = append(s.batches[:i], s.batches[i+1:]...)
			}
			break
		}
	}
	if batch != nil && action == "cancel" && c.r.Method == http.MethodPost && batch.canceled.IsZero() {
		batch.canceled = time.Now().UTC()
	}
	s.mu.Unlock()
	if batch == nil {
		s.writeError(c, http.StatusNotFound, "batch not found: "+id)
		return
	}

	switch {
	case action == "" && c.r.Method == http.MethodGet, action == "cancel" && c.r.Method == http.MethodPost:
		s.writeJSON(c, http.StatusOK, batch.object(c.r))
	case action == "" && c.r.Method == http.MethodDelete:
		s.writeJSON(c, http.StatusOK, map[string]any{"id": batch.id, "type": "message_batch_deleted"})
	case action == "results" && c.r.Method == http.MethodGet:
		c.w.Header().Set("Content-Type", "application/binary")
		s.setStatus(c, http.StatusOK)
		c.w.WriteHeader(http.StatusOK)
		c.out.Write([]byte(strings.Join(batch.results, "\n") + "\n"))
	default:
		s.writeError(c, http.StatusNotFound, "no route "+c.r.Method+" /v1/messages/batches"+tail)
	}
}

func (s *Server) createAnthropicBatch(c *call) {
	requests, _ := c.json["requests"].([]any)
	if len(requests) == 0 {
		s.writeError(c, http.StatusBadRequest, "requests: at least one request is required")
		return
	}
	batch := &anthropicBatch{id: s.nextID("msgbatch_"), created: time.Now().UTC()}
	for i, r := range requests {
		req, _ := r.(map[string]any)
		params, _ := req["params"].(map[string]any)
		customID := stringField(req, "custom_id")
		if params == nil || customID == "" {
			s.writeError(c, http.StatusBadRequest, "requests."+strconv.Itoa(i)+": custom_id and params are required")
			return
		}
		out, cut := outputTokens(params)
		stop := "end_turn"
		if cut {
			stop = "max_tokens"
		}
		batch.results = append(batch.results, mustJSON(map[string]any{
			"custom_id": customID,
			"result": map[string]any{
				"type": "succeeded",
				"message": map[string]any{
					"id":            s.nextID("msg_"),
					"type":          "message",
					"role":          "assistant",
					"model":         stringField(params, "model"),
					"content":       []any{map[string]any{"type": "text", "text": ReplyText(out)}},
					"stop_reason":   stop,
					"stop_sequence": nil,
					"usage":         anthropicUsage(inputTokens(params), out),
				},
			},
		}))
		batch.succeeded++
	}
	s.mu.Lock()
	s.batches = append(s.batches, batch)
	s.mu.Unlock()
	s.writeJSON(c, http.StatusOK, batch.object(c.r))
}

// object returns the batch as the API returns it to a request r.
func (b *anthropicBatch) object(r *http.Request) map[string]any {
	var canceled any
	if !b.canceled.IsZero() {
		canceled = b.canceled.Format(time.RFC3339Nano)
	}
	return map[string]any{
		"id":                  b.id,
		"type":                "message_batch",
		"processing_status":   "ended",
		"request_counts":      map[string]any{"processing": 0, "succeeded": b.succeeded, "errored": 0, "canceled": 0, "expired": 0},
		"created_at":          b.created.Format(time.RFC3339Nano),
		"ended_at":            b.created.Format(time.RFC3339Nano),
		"expires_at":          b.created.Add(24 * time.Hour).Format(time.RFC3339Nano),
		"archived_at":         nil,
		"cancel_initiated_at": canceled,
		"results_url":         origin(r) + "/v1/messages/batches/" + b.id + "/results",
	}
}
