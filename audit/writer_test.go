package audit

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/keystore"
)

func requestEntry(i int) Entry {
	return Entry{
		Event: Event{
			Time: time.Now(), Kind: KindMetered, RequestID: fmt.Sprintf("req-%04d", i), Mailbox: "mb",
			Provider: "openai", Model: "gpt-4o-mini", Method: "POST", Path: "/openai/v1/chat/completions",
			Status: 200, InputTokens: 3, OutputTokens: 2,
		},
		Usage: &keystore.UsageRecord{
			RequestID: fmt.Sprintf("req-%04d", i), Mailbox: "mb", Provider: "openai",
			Source: keystore.SourceShared, InputTokens: 3, OutputTokens: 2, Time: time.Now(),
		},
	}
}

func streamIDs(t *testing.T, rdb redis.UniversalClient, key string) map[string]int {
	t.Helper()
	entries, err := rdb.XRange(context.Background(), key, "-", "+").Result()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for _, e := range entries {
		var ev map[string]any
		json.Unmarshal([]byte(fmt.Sprint(e.Values["event"])), &ev)
		seen[fmt.Sprint(ev["request_id"])]++
	}
	return seen
}

func TestEventJSONFields(t *testing.T) {
	e := requestEntry(1).Event
	e.Kind, e.KeyLast4 = KindBYOK, "WXYZ"
	data, _ := json.Marshal(e)
	var m map[string]any
	json.Unmarshal(data, &m)
	for _, f := range []string{"time", "kind", "request_id", "mailbox", "provider", "source", "key_last4", "model", "method", "path", "status", "stream", "input_tokens", "output_tokens", "duration_ms", "error"} {
		if _, ok := m[f]; !ok {
			t.Errorf("byok event lacks %q: %s", f, data)
		}
	}
	if m["source"] != "byok" {
		t.Errorf("source = %v, want byok", m["source"])
	}
	e.Kind = KindMetered
	data, _ = json.Marshal(e)
	if strings.Contains(string(data), "key_last4") {
		t.Errorf("metered event carries key_last4: %s", data)
	}
	change, _ := json.Marshal(Event{Time: time.Now(), Kind: KindKeySet, Mailbox: "mb", Provider: "openai", KeyLast4: "WXYZ"})
	if !strings.Contains(string(change), `"kind":"key.set"`) || !strings.Contains(string(change), `"key_last4":"WXYZ"`) {
		t.Errorf("change event: %s", change)
	}
}

func TestOutageLosesNothing(t *testing.T) {
	srv := redistest.StartOwn(t)
	prefix := srv.Prefix(t)
	opts, _ := redis.ParseURL(srv.URL)
	opts.MaxRetries = -1
	opts.DialTimeout = 200 * time.Millisecond
	opts.ReadTimeout = 200 * time.Millisecond
	rdb := redis.NewClient(opts)
	t.Cleanup(func() { rdb.Close() })
	layout := keystore.Layout{Prefix: prefix}
	dropped := prometheus.NewCounter(prometheus.CounterOpts{Name: "dropped"})
	w := NewWriter(rdb, layout, Options{QueueSize: 1000, Dropped: dropped})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)

	for i := 0; i < 50; i++ {
		w.Record(requestEntry(i))
	}
	waitEmpty(t, w)
	check := srv.Client(t)
	if n := len(streamIDs(t, check, layout.Audit())); n != 50 {
		t.Fatalf("events before the outage = %d, want 50", n)
	}
	// The test server keeps nothing on disk, so it restarts empty: what
	// arrives afterwards is exactly what waited in the queue.
	srv.Stop()
	// Events recorded while Redis is down wait in the queue.
	start := time.Now()
	for i := 50; i < 150; i++ {
		w.Record(requestEntry(i))
	}
	if d := time.Since(start); d > 100*time.Millisecond {
		t.Errorf("Record blocked for %v while Redis was down", d)
	}
	time.Sleep(500 * time.Millisecond)
	srv.Restart()
	waitEmpty(t, w)
	time.Sleep(200 * time.Millisecond)

	seen := streamIDs(t, check, layout.Audit())
	for i := 50; i < 150; i++ {
		id := fmt.Sprintf("req-%04d", i)
		if seen[id] == 0 {
			t.Errorf("event %s lost", id)
		}
	}
	u, _ := keystore.New(check, prefix, nil).Usage(context.Background(), "mb", keystore.Month(time.Now()))
	if c := u.Providers["openai"]["shared"]; c.Requests != 100 || c.InputTokens != 300 {
		t.Errorf("usage after outage = %+v, want 100 requests and 300 input tokens, each counted once", c)
	}
	for id, n := range seen {
		if n > 1 {
			t.Errorf("event %s delivered %d times", id, n)
		}
	}
	if got := testutil.ToFloat64(dropped); got != 0 {
		t.Errorf("dropped = %v, want 0", got)
	}
}

func TestFullQueueDropsAndCounts(t *testing.T) {
	srv := redistest.StartOwn(t)
	prefix := srv.Prefix(t)
	rdb := srv.Client(t)
	dropped := prometheus.NewCounter(prometheus.CounterOpts{Name: "dropped"})
	w := NewWriter(rdb, keystore.Layout{Prefix: prefix}, Options{QueueSize: 10, Dropped: dropped})
	srv.Stop()
	// No Run: nothing drains, so the eleventh entry finds the queue full.
	start := time.Now()
	for i := 0; i < 25; i++ {
		w.Record(requestEntry(i))
	}
	if d := time.Since(start); d > 50*time.Millisecond {
		t.Errorf("Record blocked for %v on a full queue", d)
	}
	if got := testutil.ToFloat64(dropped); got != 15 {
		t.Errorf("dropped = %v, want 15", got)
	}
	if w.Pending() != 10 {
		t.Errorf("pending = %d, want 10", w.Pending())
	}
}

func TestFullQueueKeepsRoomForUsage(t *testing.T) {
	srv := redistest.Start(t)
	dropped := prometheus.NewCounter(prometheus.CounterOpts{Name: "dropped"})
	w := NewWriter(srv.Client(t), keystore.Layout{Prefix: srv.Prefix(t)}, Options{QueueSize: 5, Dropped: dropped})
	// No Run: nothing drains. Rejected requests carry no usage.
	for i := range 6 {
		e := requestEntry(i)
		e.Usage = nil
		e.Event.Status, e.Event.InputTokens, e.Event.OutputTokens = 503, 0, 0
		w.Record(e)
	}

	if got := testutil.ToFloat64(dropped); got != 3 {
		t.Errorf("dropped = %v after 6 entries without usage, want 3", got)
	}
	for i := range 3 {
		w.Record(requestEntry(10 + i))
	}
	if w.Pending() != 5 {
		t.Errorf("pending = %d, want 5", w.Pending())
	}
	if got := testutil.ToFloat64(dropped); got != 4 {
		t.Errorf("dropped = %v after 3 entries with usage, want 4: only the last finds the queue full", got)
	}

	w.Record(Entry{Event: Event{Time: time.Now(), Kind: KindTokenRevoked, Mailbox: "mb"}})
	if got := testutil.ToFloat64(dropped); got != 5 {
		t.Errorf("dropped = %v after a key change event on a full queue, want 5", got)
	}

	withUsage := 0
	for range 5 {
		if e := <-w.queue; e.Usage != nil {
			withUsage++
		}
	}
	if withUsage != 2 {
		t.Errorf("%d queued entries with usage, want 2", withUsage)
	}
}

func TestKeyChangeEventsUseWholeQueue(t *testing.T) {
	srv := redistest.Start(t)
	dropped := prometheus.NewCounter(prometheus.CounterOpts{Name: "dropped"})
	w := NewWriter(srv.Client(t), keystore.Layout{Prefix: srv.Prefix(t)}, Options{QueueSize: 4, Dropped: dropped})
	// No Run: nothing drains.
	for _, kind := range []string{KindKeySet, KindTokenRevoked, KindSourceChanged, KindMailboxDeleted, KindKeyRemoved} {
		w.Record(Entry{Event: Event{Time: time.Now(), Kind: kind, Mailbox: "mb"}})
	}

	if w.Pending() != 4 {
		t.Errorf("pending = %d, want 4: key change events fill the whole queue", w.Pending())
	}
	if got := testutil.ToFloat64(dropped); got != 1 {
		t.Errorf("dropped = %v, want 1", got)
	}
}

func TestCloseFlushesAndStdout(t *testing.T) {
	srv := redistest.Start(t)
	prefix := srv.Prefix(t)
	rdb := srv.Client(t)
	var out syncBuffer
	w := NewWriter(rdb, keystore.Layout{Prefix: prefix}, Options{Stdout: &out, StreamMaxLen: 1000})
	go w.Run(context.Background())
	for i := 0; i < 20; i++ {
		w.Record(requestEntry(i))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := w.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if n := len(streamIDs(t, rdb, keystore.Layout{Prefix: prefix}.Audit())); n != 20 {
		t.Errorf("events in stream after Close = %d, want 20", n)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 20 {
		t.Fatalf("stdout lines = %d, want 20", len(lines))
	}
	var first map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &first); err != nil || first["kind"] != "metered" {
		t.Errorf("stdout line is not an event: %s", lines[0])
	}
	// After Close, Record drops instead of panicking on the closed queue.
	w.Record(requestEntry(99))
}

func waitEmpty(t *testing.T, w *Writer) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for w.Pending() > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("audit queue still holds %d entries after 15s", w.Pending())
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// commandCalls returns how many times the server ran each command, from
// INFO commandstats.
func commandCalls(t *testing.T, rdb *redis.Client) map[string]int {
	t.Helper()
	info, err := rdb.Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	calls := map[string]int{}
	for _, line := range strings.Split(info, "\r\n") {
		name, rest, ok := strings.Cut(strings.TrimPrefix(line, "cmdstat_"), ":calls=")
		if !ok {
			continue
		}
		n, _, _ := strings.Cut(rest, ",")
		var v int
		fmt.Sscan(n, &v)
		calls[name] = v
	}
	return calls
}

func TestUsageScriptBySHA(t *testing.T) {
	// A server of its own: the test reads its command counts and empties
	// its script cache.
	srv := redistest.StartOwn(t)
	prefix := srv.Prefix(t)
	rdb := srv.Client(t)
	layout := keystore.Layout{Prefix: prefix}
	w := NewWriter(rdb, layout, Options{QueueSize: 1000})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)

	deliverAll := func(from, to int) {
		t.Helper()
		for i := from; i < to; i++ {
			w.Record(requestEntry(i))
		}
		waitEmpty(t, w)
	}
	deliverAll(0, 40)
	// A server that has lost its scripts, as after a restart.
	if err := rdb.ScriptFlush(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	deliverAll(40, 80)
	deliverAll(80, 120)

	calls := commandCalls(t, rdb)
	// The script source goes once after each loss: the first batch of 40 and
	// the first after the flush, however those batches were cut.
	// the first after the flush, however the writer cut its batches; the
	// last 40 go by digest alone.
	if calls["eval"] == 0 || calls["eval"] > 80 || calls["evalsha"] < 120 {
		t.Errorf("eval %d, evalsha %d calls; want every increment tried by digest and the source sent only where the script was missing",
			calls["eval"], calls["evalsha"])
	}
	seen := streamIDs(t, rdb, layout.Audit())
	if len(seen) != 120 {
		t.Errorf("%d events in the stream, want 120", len(seen))
	}
	for id, n := range seen {
		if n != 1 {
			t.Errorf("event %s written %d times; a missing script must not repeat the batch", id, n)
		}
	}
	u, err := keystore.New(rdb, prefix, nil).Usage(context.Background(), "mb", keystore.Month(time.Now()))
	if err != nil {
		t.Fatal(err)
	}
	if c := u.Providers["openai"]["shared"]; c.Requests != 120 || c.InputTokens != 360 || c.OutputTokens != 240 {
		t.Errorf("usage = %+v, want 120 requests, 360 input and 240 output tokens", c)
	}
}

// TestPromptEntrySkipsLinger holds a batch open far longer than the test
// runs, and checks that a prompt entry sends it, together with the entry
// that was waiting, and that each entry's Done runs.
func TestPromptEntrySkipsLinger(t *testing.T) {
	srv := redistest.Start(t)
	prefix := srv.Prefix(t)
	rdb := srv.Client(t)
	layout := keystore.Layout{Prefix: prefix}
	w := NewWriter(rdb, layout, Options{})
	w.linger = time.Hour
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)

	var done sync.WaitGroup
	done.Add(2)
	waiting := requestEntry(1)
	waiting.Done = done.Done
	w.Record(waiting)
	time.Sleep(200 * time.Millisecond)
	if n := len(streamIDs(t, rdb, layout.Audit())); n != 0 {
		t.Fatalf("%d events delivered before the linger ended", n)
	}

	prompt := requestEntry(2)
	prompt.Prompt = true
	prompt.Done = done.Done
	w.Record(prompt)
	deadline := time.Now().Add(5 * time.Second)
	for len(streamIDs(t, rdb, layout.Audit())) < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if seen := streamIDs(t, rdb, layout.Audit()); seen["req-0001"] != 1 || seen["req-0002"] != 1 {
		t.Fatalf("delivered %v, want req-0001 and req-0002 once each", seen)
	}
	finished := make(chan struct{})
	go func() {
		done.Wait()
		close(finished)
	}()
	select {
	case <-finished:
	case <-time.After(5 * time.Second):
		t.Error("Done did not run for both delivered entries")
	}
}

// TestDroppedEntryDone checks that an entry the full queue drops still
// runs its Done, so a count of pending usage does not keep it forever.
func TestDroppedEntryDone(t *testing.T) {
	srv := redistest.Start(t)
	w := NewWriter(srv.Client(t), keystore.Layout{Prefix: srv.Prefix(t)}, Options{QueueSize: 1})
	ran := 0
	for i := range 3 {
		e := requestEntry(i)
		e.Done = func() { ran++ }
		w.Record(e)
	}
	if ran != 2 {
		t.Errorf("Done ran for %d entries, want the 2 dropped", ran)
	}
}
