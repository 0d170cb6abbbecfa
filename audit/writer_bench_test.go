package audit

import (
	"context"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/keystore"
)

func benchEntry() Entry {
	e := Event{
		Time: time.Now(), Kind: KindBYOK, RequestID: "6f1c2a9e4b7d3c8a1e5f0b2d", Mailbox: "alice@example.com",
		Provider: "openai", KeyLast4: "9f3a", Model: "gpt-4o-mini", Method: "POST",
		Path: "/openai/v1/chat/completions", Status: 200, Stream: true,
		InputTokens: 412, OutputTokens: 23, DurationMS: 840,
	}
	return Entry{Event: e, Usage: &keystore.UsageRecord{
		RequestID: e.RequestID, Mailbox: e.Mailbox, Provider: e.Provider, Source: keystore.SourceBYOK,
		InputTokens: e.InputTokens, OutputTokens: e.OutputTokens, Time: e.Time,
	}}
}

// BenchmarkRecord measures what a request pays to record its audit event:
// one send on the bounded queue, while a writer delivers to a real Redis.
func BenchmarkRecord(b *testing.B) {
	srv := redistest.Start(b)
	w := NewWriter(srv.Client(b), keystore.Layout{Prefix: srv.Prefix(b)}, Options{QueueSize: 1 << 20})
	ctx, cancel := context.WithCancel(context.Background())
	go w.Run(ctx)
	defer func() {
		closeCtx, stop := context.WithTimeout(context.Background(), 30*time.Second)
		defer stop()
		w.Close(closeCtx)
		cancel()
	}()
	e := benchEntry()
	b.ReportAllocs()
	for b.Loop() {
		w.Record(e)
	}
}

// BenchmarkEventJSON measures rendering one request event, which the
// writer does off the request path with MarshalJSON.
func BenchmarkEventJSON(b *testing.B) {
	e := benchEntry().Event
	b.ReportAllocs()
	for b.Loop() {
		if _, err := e.MarshalJSON(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDeliver measures the writer's side per event: batches of 256
// events with their usage increments sent to a real Redis in one pipeline.
// It reports time per event.
func BenchmarkDeliver(b *testing.B) {
	srv := redistest.Start(b)
	w := NewWriter(srv.Client(b), keystore.Layout{Prefix: srv.Prefix(b)}, Options{StreamMaxLen: 100000})
	batch := make([]Entry, 256)
	for i := range batch {
		batch[i] = benchEntry()
		batch[i].Event.RequestID = time.Now().Format(time.RFC3339Nano) + string(rune('a'+i%26))
		batch[i].Usage.RequestID = batch[i].Event.RequestID
	}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if err := w.send(ctx, batch); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(batch)), "ns/event")
}
