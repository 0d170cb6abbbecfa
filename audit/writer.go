package audit

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/keystore"
)

// Options configure a Writer.
type Options struct {
	// QueueSize bounds the events waiting for delivery; 0 means 10,000.
	QueueSize int
	// BatchSize bounds the events sent in one pipeline; 0 means 256.
	BatchSize int
	// StreamMaxLen trims the audit stream approximately; 0 means no trim.
	StreamMaxLen int64
	// Stdout, when not nil, receives each event as one JSON line.
	Stdout io.Writer
	// RetentionMonths is how long monthly usage counters are kept.
	RetentionMonths int
	// ResponseTTL is how long the ids of responses and containers created on
	// the shared key are remembered.
	ResponseTTL time.Duration
	// Dropped counts events dropped because the queue was full.
	Dropped prometheus.Counter
	Logger  *slog.Logger
}

// Entry is one unit of delivery: an event and the state changes that go with
// it.
type Entry struct {
	Event Event
	// Usage, when not nil, is added to the mailbox's monthly counters.
	Usage *keystore.UsageRecord
	// Owned are response and container ids to remember as created by
	// Event.Mailbox on the shared key: those the proxy could not store while
	// it forwarded the response.
	Owned []string
	// Prompt is set on an entry that should reach Redis at once rather than
	// wait for a batch: usage that an allowance check is about to read.
	Prompt bool
	// Done, when not nil, is called once the entry is delivered or dropped.
	Done func()
}

// Writer delivers entries to Redis from a bounded queue.
type Writer struct {
	rdb    redis.UniversalClient
	layout keystore.Layout
	opts   Options
	log    *slog.Logger

	queue chan Entry
	// unsent counts the entries recorded and neither delivered nor given
	// up: queued, or in the batch being sent.
	unsent   atomic.Int64
	mu       sync.RWMutex // guards closed against sends on a closed queue
	closed   bool
	closing  chan struct{} // closed by Close, to cut a linger short
	hurry    chan struct{} // sent to by Record for a prompt entry, to cut a linger short
	linger   time.Duration // batchLinger, or another wait in tests
	done     chan struct{}
	stdoutMu sync.Mutex
}

// NewWriter returns a writer to rdb under layout. Call Run to start delivery.
func NewWriter(rdb redis.UniversalClient, layout keystore.Layout, opts Options) *Writer {
	if opts.QueueSize <= 0 {
		opts.QueueSize = 10000
	}
	if opts.BatchSize <= 0 {
		opts.BatchSize = 256
	}
	if opts.RetentionMonths <= 0 {
		opts.RetentionMonths = 13
	}
	if opts.ResponseTTL <= 0 {
		opts.ResponseTTL = 30 * 24 * time.Hour
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Writer{
		rdb: rdb, layout: layout, opts: opts, log: opts.Logger,
		queue:   make(chan Entry, opts.QueueSize),
		closing: make(chan struct{}),
		hurry:   make(chan struct{}, 1),
		linger:  batchLinger,
		done:    make(chan struct{}),
	}
}

// Record queues e without blocking. If the queue is full or the writer is
// closed, e is dropped and counted. A request event that changes no state
// (no usage, no owned ids) is dropped once the queue is half full. While
// Redis is unreachable, clients retry their rejected requests, and the
// events of those would otherwise push out the usage of requests that
// completed. Events of key changes may use the whole queue.
func (w *Writer) Record(e Entry) {
	w.mu.RLock()
	defer w.mu.RUnlock()
	reason := "writer closed"
	switch {
	case w.closed:
	case e.Usage == nil && len(e.Owned) == 0 && (e.Event.Kind == KindBYOK || e.Event.Kind == KindMetered) &&
		len(w.queue) >= w.opts.QueueSize-w.opts.QueueSize/2:
		reason = "queue half full, the rest is kept for usage"
	default:
		// Counted before the send, so the writer cannot deliver the entry
		// and count it off first.
		w.unsent.Add(1)
		select {
		case w.queue <- e:
			if e.Prompt {
				select {
				case w.hurry <- struct{}{}:
				default:
				}
			}
			return
		default:
			w.unsent.Add(-1)
			reason = "queue full"
		}
	}
	if e.Done != nil {
		e.Done()
	}
	if w.opts.Dropped != nil {
		w.opts.Dropped.Inc()
	}
	w.log.Warn("audit event dropped: "+reason,
		"request_id", e.Event.RequestID, "mailbox", e.Event.Mailbox,
		"provider", e.Event.Provider, "kind", e.Event.Kind)
}

// Run delivers queued entries until Close is called and the queue is empty,
// or until ctx ends.
func (w *Writer) Run(ctx context.Context) {
	defer close(w.done)
	batch := make([]Entry, 0, w.opts.BatchSize)
	for {
		var first Entry
		var ok bool
		select {
		case first, ok = <-w.queue:
		case <-ctx.Done():
			return
		}
		if !ok {
			return
		}
		batch = append(batch[:0], first)
		batch = w.fill(ctx, batch)
		w.writeStdout(batch)
		delivered := w.deliver(ctx, batch)
		w.unsent.Add(-int64(len(batch)))
		for _, e := range batch {
			if e.Done != nil {
				e.Done()
			}
		}
		if !delivered {
			return
		}
	}
}

// batchLinger is how long the writer waits for more entries after the
// first one of a batch. Without it, moderate traffic sends every event in
// its own round trip, which costs the proxy and Redis more CPU than the
// event itself. With it, an event reaches Redis at most this much later.
// At 100 streams/s, 20 ms gave batches of two events, and each round trip
// also wakes the writer and the network poller.
const batchLinger = 100 * time.Millisecond

// fill waits out batchLinger, unless a full batch is queued already or a
// prompt entry is queued, and then adds what is queued to batch without
// waiting. The writer thus wakes twice per batch rather than once per
// entry, which matters at moderate rates, where waking an idle thread
// costs more CPU than the entry.
func (w *Writer) fill(ctx context.Context, batch []Entry) []Entry {
	// A signal left by a prompt entry that an earlier batch took along can
	// cut one later linger short, which costs a round trip at most.
	if len(w.queue) < w.opts.BatchSize-len(batch) && !batch[0].Prompt {
		timer := time.NewTimer(w.linger)
		select {
		case <-timer.C:
		case <-w.hurry:
		case <-w.closing:
		case <-ctx.Done():
		}
		timer.Stop()
	}
	for len(batch) < w.opts.BatchSize {
		select {
		case e, ok := <-w.queue:
			if !ok {
				return batch
			}
			batch = append(batch, e)
		default:
			return batch
		}
	}
	return batch
}

func (w *Writer) writeStdout(batch []Entry) {
	if w.opts.Stdout == nil {
		return
	}
	w.stdoutMu.Lock()
	defer w.stdoutMu.Unlock()
	for _, e := range batch {
		line, err := e.Event.MarshalJSON()
		if err != nil {
			continue
		}
		w.opts.Stdout.Write(append(line, '\n'))
	}
}

// deliver sends batch, retrying with backoff until it succeeds. It returns
// false if ctx ended first.
func (w *Writer) deliver(ctx context.Context, batch []Entry) bool {
	backoff := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		err := w.send(ctx, batch)
		if err == nil {
			if attempt > 1 {
				w.log.Info("audit delivery resumed", "events", len(batch), "attempts", attempt)
			}
			return true
		}
		w.log.Warn("audit delivery failed, retrying",
			"error", err, "events", len(batch), "attempt", attempt, "backoff", backoff)
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			w.log.Error("audit delivery abandoned", "error", ctx.Err(), "events", len(batch))
			return false
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

func (w *Writer) send(ctx context.Context, batch []Entry) error {
	sendCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	pipe := w.rdb.Pipeline()
	var usage map[redis.Cmder]*keystore.UsageRecord
	for _, e := range batch {
		// MarshalJSON directly: json.Marshal would scan and compact its
		// output once more.
		data, err := e.Event.MarshalJSON()
		if err != nil {
			continue
		}
		args := &redis.XAddArgs{Stream: w.layout.Audit(), Values: []any{"event", data}}
		if w.opts.StreamMaxLen > 0 {
			args.MaxLen = w.opts.StreamMaxLen
			args.Approx = true
		}
		pipe.XAdd(sendCtx, args)
		if e.Usage != nil {
			if usage == nil {
				usage = make(map[redis.Cmder]*keystore.UsageRecord)
			}
			usage[w.layout.QueueUsageBySHA(sendCtx, pipe, *e.Usage, w.opts.RetentionMonths)] = e.Usage
		}
		for _, id := range e.Owned {
			w.layout.QueueOwned(sendCtx, pipe, e.Event.Mailbox, id, e.Event.Time, w.opts.ResponseTTL)
		}
	}
	cmds, err := pipe.Exec(sendCtx)
	if err == nil {
		return nil
	}
	// Increments sent by digest to a server that lacks the script (once
	// after each start of Redis, per Cluster node) counted nothing, while
	// the rest of the batch was applied. Send only those again, with the
	// script's source, so the batch's events are not written twice. Other
	// failures, such as a Cluster node that is down, fail the batch, which
	// is then sent again whole.
	var missing []*keystore.UsageRecord
	failed := false
	for _, c := range cmds {
		cerr := c.Err()
		if cerr == nil || errors.Is(cerr, redis.Nil) {
			continue
		}
		if u, ok := usage[c]; ok && keystore.IsNoScript(cerr) {
			missing = append(missing, u)
			continue
		}
		failed = true
	}
	if len(missing) > 0 {
		w.log.Info("loading the usage script into Redis", "increments", len(missing))
		retry := w.rdb.Pipeline()
		for _, u := range missing {
			w.layout.QueueUsage(sendCtx, retry, *u, w.opts.RetentionMonths)
		}
		if _, rerr := retry.Exec(sendCtx); rerr != nil {
			return rerr
		}
	}
	if failed {
		return err
	}
	return nil
}

// Close stops accepting entries and waits until the queue is delivered or
// ctx ends. Entries still queued when ctx ends are lost, and logged.
func (w *Writer) Close(ctx context.Context) error {
	w.mu.Lock()
	if !w.closed {
		w.closed = true
		close(w.queue)
		close(w.closing)
	}
	w.mu.Unlock()
	select {
	case <-w.done:
		return nil
	case <-ctx.Done():
		w.log.Error("audit queue not flushed before shutdown", "pending", w.Pending(), "error", ctx.Err())
		return ctx.Err()
	}
}

// Pending returns the number of entries recorded and not yet delivered:
// queued, or in the batch being sent.
func (w *Writer) Pending() int {
	return int(w.unsent.Load())
}
