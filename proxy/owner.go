package proxy

import (
	"context"
	"log/slog"
	"regexp"
	"strings"
	"time"

	"github.com/byokproxy/byokproxy/provider"
	"github.com/byokproxy/byokproxy/usage"
)

// sniffLimit bounds how much of a Responses API body is searched for the
// response id. The id comes first in both the JSON body and the stream's
// response.created event, so a few KiB are enough.
const sniffLimit = 8 << 10

var responseIDPattern = regexp.MustCompile(`"id"\s*:\s*"(resp_[A-Za-z0-9_\-]{1,200})"`)

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
		return strings.HasSuffix(rest, "responses")
	}
	return false
}

// ownerRecorder stores the ids of the responses and containers that a shared
// response creates, as the response passes to the client. It writes to Redis
// before the bytes that carry an id are released, so a client that continues
// at once, with previous_response_id or the container, finds the id owned on
// every replica. It is written to after the usage tap, whose records supply
// the container ids.
type ownerRecorder struct {
	h       *Handler
	x       *exchange
	ctx     context.Context
	log     *slog.Logger
	tap     *usage.Tap
	sniffID bool // search the body for a Responses API id

	buf        []byte // the start of the body, searched for the response id
	responseID string
	containers int // container ids of the tap already handled
	// pending are the ids that could not be stored, left to the audit writer.
	pending []string
}

func (o *ownerRecorder) Write(p []byte) (int, error) {
	var ids []string
	if o.sniffID && o.responseID == "" && len(o.buf) < sniffLimit {
		o.buf = append(o.buf, p[:min(len(p), sniffLimit-len(o.buf))]...)
		if m := responseIDPattern.FindSubmatch(o.buf); m != nil {
			o.responseID = string(m[1])
			o.buf = nil
			ids = append(ids, o.responseID)
		}
	}
	if found := o.tap.Containers(o.containers); len(found) > 0 {
		o.containers += len(found)
		ids = append(ids, found...)
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
