// Package audit delivers audit events and usage increments to Redis without
// making the request path wait: events go into a bounded in-memory queue that
// one writer drains in batches, retrying with backoff while Redis is down.
//
// Delivery is at least once. A batch whose reply is lost is sent again, so an
// audit event can appear twice in the stream in that case. Usage increments
// carry the request id and are applied once. An event that finds the queue
// full is dropped and counted in byokproxy_audit_events_dropped_total.
package audit

import (
	"encoding/json"
	"time"
)

// Event kinds. Request events are "byok" or "metered"; the rest record
// changes made through the admin API.
const (
	KindBYOK           = "byok"
	KindMetered        = "metered"
	KindKeySet         = "key.set"
	KindKeyRemoved     = "key.removed"
	KindSourceChanged  = "source.changed"
	KindKeyTested      = "key.tested"
	KindTokenRevoked   = "token.revoked"
	KindMailboxDeleted = "mailbox.deleted"
)

// Event is one audit record.
type Event struct {
	Time         time.Time
	Kind         string
	RequestID    string
	Mailbox      string
	Provider     string
	Source       string
	KeyLast4     string
	Model        string
	Method       string
	Path         string
	Status       int
	Stream       bool
	InputTokens  int64
	OutputTokens int64
	DurationMS   int64
	Error        string
}

// requestJSON is the wire form of a request event: every field is present,
// and key_last4 only on byok events.
type requestJSON struct {
	Time         string `json:"time"`
	Kind         string `json:"kind"`
	RequestID    string `json:"request_id"`
	Mailbox      string `json:"mailbox"`
	Provider     string `json:"provider"`
	Source       string `json:"source"`
	KeyLast4     string `json:"key_last4,omitempty"`
	Model        string `json:"model"`
	Method       string `json:"method"`
	Path         string `json:"path"`
	Status       int    `json:"status"`
	Stream       bool   `json:"stream"`
	InputTokens  int64  `json:"input_tokens"`
	OutputTokens int64  `json:"output_tokens"`
	DurationMS   int64  `json:"duration_ms"`
	Error        string `json:"error"`
}

// changeJSON is the wire form of an admin change event.
type changeJSON struct {
	Time      string `json:"time"`
	Kind      string `json:"kind"`
	RequestID string `json:"request_id,omitempty"`
	Mailbox   string `json:"mailbox"`
	Provider  string `json:"provider,omitempty"`
	Source    string `json:"source,omitempty"`
	KeyLast4  string `json:"key_last4,omitempty"`
	Status    int    `json:"status,omitempty"`
	Error     string `json:"error,omitempty"`
}

// MarshalJSON renders the event in its wire form.
func (e Event) MarshalJSON() ([]byte, error) {
	ts := e.Time.UTC().Format(time.RFC3339Nano)
	if e.Kind == KindBYOK || e.Kind == KindMetered {
		last4 := ""
		if e.Kind == KindBYOK {
			last4 = e.KeyLast4
		}
		return json.Marshal(requestJSON{
			Time: ts, Kind: e.Kind, RequestID: e.RequestID, Mailbox: e.Mailbox,
			Provider: e.Provider, Source: e.Kind, KeyLast4: last4, Model: e.Model,
			Method: e.Method, Path: e.Path, Status: e.Status, Stream: e.Stream,
			InputTokens: e.InputTokens, OutputTokens: e.OutputTokens,
			DurationMS: e.DurationMS, Error: e.Error,
		})
	}
	return json.Marshal(changeJSON{
		Time: ts, Kind: e.Kind, RequestID: e.RequestID, Mailbox: e.Mailbox,
		Provider: e.Provider, Source: e.Source, KeyLast4: e.KeyLast4,
		Status: e.Status, Error: e.Error,
	})
}
