package proxy

import (
	"context"
	"log/slog"
	"strings"
	"time"

	"github.com/byokproxy/byokproxy/provider"
	"github.com/byokproxy/byokproxy/usage"
)

// ownerStoreTimeout bounds the Redis write that records a created id. The
// response waits for it, so a slow Redis delays one response by at most this
// much, and the audit writer retries the ids it could not store.
const ownerStoreTimeout = time.Second

// tracksOwnership reports whether a shared response of prov on path rest can
// create a response or container that a later request may name: Anthropic
// messages (code execution containers) and the OpenAI Responses API.
func tracksOwnership(prov, rest string) bool {
	switch prov {
	case provider.Anthropic:
		return strings.HasSuffix(rest, "messages")
	case provider.OpenAI:
		return isResponsesAPI(prov, rest)
	}
	return false
}

// isResponsesAPI reports whether path rest of prov creates a response of
// the OpenAI Responses API.
func isResponsesAPI(prov, rest string) bool {
	return prov == provider.OpenAI && strings.HasSuffix(rest, "responses")
}

// ownerRecorder stores the ids of the responses and containers that a shared
// response creates, as the response passes to the client. It writes to Redis
// before the bytes that complete the JSON body or stream event carrying an
// id are released, so a client that continues at once, with
// previous_response_id or the container, finds the id owned on every
// replica. It is written to after the usage tap, whose records supply the
// ids, read by their JSON path.
type ownerRecorder struct {
	h   *Handler
	x   *exchange
	ctx context.Context
	log *slog.Logger
	tap *usage.Tap
	// responses is set on the OpenAI Responses API, whose response ids a
	// later request may name.
	responses  bool
	responseID string
	containers int // container ids of the tap already handled
	reasoning  int // reasoning item ids of the tap already handled
	// pending are the ids that could not be stored, left to the audit writer.
	pending []string
}

func (o *ownerRecorder) Write(p []byte) (int, error) {
	var ids []string
	if o.responses && o.responseID == "" {
		if o.responseID = o.tap.ResponseID(); o.responseID != "" {
			ids = append(ids, o.responseID)
		}
	}
	if found := o.tap.Containers(o.containers); len(found) > 0 {
		o.containers += len(found)
		ids = append(ids, found...)
	}
	if o.responses {
		if found := o.tap.ReasoningItems(o.reasoning); len(found) > 0 {
			o.reasoning += len(found)
			ids = append(ids, found...)
		}
	}
	if len(ids) > 0 {
		o.store(ids)
	}
	return len(p), nil
}

func (o *ownerRecorder) store(ids []string) {
	// The write outlives a client that hangs up meanwhile, because the
	// response may have been created upstream all the same.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(o.ctx), ownerStoreTimeout)
	defer cancel()
	if err := o.h.store.RecordOwned(ctx, o.x.mailbox, ids, o.h.ownedTTL); err != nil {
		o.log.Warn("storing created ids failed; the audit writer retries them", "error", err, "ids", len(ids))
		o.pending = append(o.pending, ids...)
	}
}
