package audit_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/audit"
	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/provider"
)

// deliveryTimeout bounds every wait for the writer to deliver its queue.
const deliveryTimeout = 20 * time.Second

// clusterMailboxes returns one mailbox per master of c, and the master of
// each.
func clusterMailboxes(t *testing.T, c *redistest.Cluster, layout keystore.Layout) ([]string, map[string]int) {
	t.Helper()
	var ids []string
	nodeOf := map[string]int{}
	covered := map[int]bool{}
	for i := 0; i < 200 && len(covered) < len(c.Addrs); i++ {
		id := fmt.Sprintf("meter-%d@example.com", i)
		node := c.NodeOf(t, layout.Mailbox(id))
		if covered[node] {
			continue
		}
		covered[node] = true
		ids = append(ids, id)
		nodeOf[id] = node
	}
	if len(covered) < len(c.Addrs) {
		t.Fatalf("200 mailbox ids cover %d of %d masters", len(covered), len(c.Addrs))
	}
	return ids, nodeOf
}

// meteredEntry is a shared-key request event of mailbox m with its usage
// increment and, for OpenAI, a response id.
func meteredEntry(m, requestID, prov string, input, output int64) audit.Entry {
	now := time.Now()
	e := audit.Entry{
		Event: audit.Event{
			Time: now, Kind: audit.KindMetered, RequestID: requestID, Mailbox: m, Provider: prov,
			Model: "model-x", Method: "POST", Path: "/" + prov + "/v1/x", Status: 200,
			InputTokens: input, OutputTokens: output,
		},
		Usage: &keystore.UsageRecord{
			RequestID: requestID, Mailbox: m, Provider: prov, Source: keystore.SourceShared,
			InputTokens: input, OutputTokens: output, Time: now,
		},
	}
	if prov == provider.OpenAI {
		e.Owned = []string{"resp_" + requestID}
	}
	return e
}

// auditRequestIDs counts the request events in the stream by request id.
func auditRequestIDs(t *testing.T, rdb redis.UniversalClient, key string) map[string]int {
	t.Helper()
	entries, err := rdb.XRange(context.Background(), key, "-", "+").Result()
	if err != nil {
		t.Fatalf("XRANGE %s: %v", key, err)
	}
	out := map[string]int{}
	for _, e := range entries {
		raw, _ := e.Values["event"].(string)
		var ev struct {
			RequestID string `json:"request_id"`
			Kind      string `json:"kind"`
		}
		if err := json.Unmarshal([]byte(raw), &ev); err != nil {
			t.Fatalf("audit entry %s is not JSON: %v", e.ID, err)
		}
		out[ev.RequestID]++
	}
	return out
}

// startWriter runs a writer on rdb until the test ends, with its log in logs.
func startWriter(t *testing.T, rdb redis.UniversalClient, layout keystore.Layout, logs *lockedBuffer) *audit.Writer {
	t.Helper()
	w := audit.NewWriter(rdb, layout, audit.Options{
		QueueSize: 1000, BatchSize: 64, StreamMaxLen: 10000,
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		w.Run(ctx)
		close(done)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return w
}

// closeWriter flushes the writer's queue within deliveryTimeout.
func closeWriter(t *testing.T, w *audit.Writer) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), deliveryTimeout)
	defer cancel()
	if err := w.Close(ctx); err != nil {
		t.Fatalf("Close: %d entries not delivered in %v: %v", w.Pending(), deliveryTimeout, err)
	}
}

// usageOf returns the shared usage of mailbox m this month.
func usageOf(t *testing.T, store *keystore.Store, m string) keystore.MonthUsage {
	t.Helper()
	u, err := store.Usage(context.Background(), mailbox.ID(m), keystore.Month(time.Now()))
	if err != nil {
		t.Fatalf("Usage %s: %v", m, err)
	}
	return u
}

func TestWriterOnSingleNodeAndCluster(t *testing.T) {
	topologies := []struct {
		name  string
		start func(t *testing.T) (redis.UniversalClient, string, []string)
	}{
		{"single", func(t *testing.T) (redis.UniversalClient, string, []string) {
			srv := redistest.Start(t)
			return srv.Client(t), srv.Prefix(t), []string{"a@example.com", "b@example.com", "c@example.com"}
		}},
		{"cluster", func(t *testing.T) (redis.UniversalClient, string, []string) {
			c := redistest.StartCluster(t)
			prefix := c.Prefix(t)
			ids, _ := clusterMailboxes(t, c, keystore.Layout{Prefix: prefix})
			return c.Client(t), prefix, ids
		}},
	}
	for _, topo := range topologies {
		t.Run(topo.name, func(t *testing.T) {
			rdb, prefix, mailboxes := topo.start(t)
			layout := keystore.Layout{Prefix: prefix}
			store := keystore.New(rdb, prefix, nil)
			w := startWriter(t, rdb, layout, &lockedBuffer{})

			// Every mailbox gets requests on each provider, and each request
			// is recorded twice, as a retried batch would deliver it.
			const rounds = 5
			for _, m := range mailboxes {
				for i := range rounds {
					for _, p := range provider.Names {
						e := meteredEntry(m, fmt.Sprintf("%s-%s-%d", m, p, i), p, 10, 2)
						w.Record(e)
						w.Record(e)
					}
				}
			}
			closeWriter(t, w)

			ids := auditRequestIDs(t, rdb, layout.Audit())
			for _, m := range mailboxes {
				u := usageOf(t, store, m)
				want := int64(rounds * len(provider.Names) * 12)
				if u.SharedTotal != want {
					t.Errorf("%s: shared total %d, want %d (each request counted once)", m, u.SharedTotal, want)
				}
				for _, p := range provider.Names {
					c := u.Providers[p][keystore.SourceShared]
					if c.Requests != rounds || c.InputTokens != rounds*10 || c.OutputTokens != rounds*2 {
						t.Errorf("%s %s: counts %+v, want %d requests of 10 input and 2 output tokens", m, p, c, rounds)
					}
					for i := range rounds {
						id := fmt.Sprintf("%s-%s-%d", m, p, i)
						if ids[id] != 2 {
							t.Errorf("request %s has %d audit entries, want the 2 recorded", id, ids[id])
						}
					}
				}
				owns, err := store.Owns(context.Background(), mailbox.ID(m), "resp_"+m+"-openai-0")
				if err != nil || !owns {
					t.Errorf("%s: Owns of its response = %v, %v, want true", m, owns, err)
				}
			}
		})
	}
}

// TestWriterClusterNodeOutage stops one master while a batch is delivered.
// The batch fails on that master only, the writer sends all of it again,
// and the usage of every request still counts once: the increments that
// landed on the other masters the first time are not applied twice.
func TestWriterClusterNodeOutage(t *testing.T) {
	c := redistest.StartCluster(t)
	prefix := c.Prefix(t)
	layout := keystore.Layout{Prefix: prefix}
	mailboxes, nodeOf := clusterMailboxes(t, c, layout)
	rdb := c.Client(t)
	store := keystore.New(rdb, prefix, nil)

	// Stop a master that serves neither the audit stream nor the first
	// mailbox, so the stream and that mailbox's counters stay reachable.
	streamNode := c.NodeOf(t, layout.Audit())
	down := -1
	for i := range c.Addrs {
		if i != streamNode && i != nodeOf[mailboxes[0]] {
			down = i
		}
	}
	if down < 0 {
		t.Fatalf("the audit stream (master %d) and %s (master %d) leave no third master", streamNode, mailboxes[0], nodeOf[mailboxes[0]])
	}

	logs := &lockedBuffer{}
	w := startWriter(t, rdb, layout, logs)
	c.StopNode(down)
	const perMailbox = 20
	for _, m := range mailboxes {
		for i := range perMailbox {
			w.Record(meteredEntry(m, fmt.Sprintf("%s-%d", m, i), provider.Anthropic, 3, 4))
		}
	}

	deadline := time.Now().Add(deliveryTimeout)
	for !strings.Contains(logs.String(), "audit delivery failed, retrying") && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), "audit delivery failed, retrying") {
		t.Fatalf("no failed delivery logged within %v while master %d was down; log:\n%s", deliveryTimeout, down, logs.String())
	}
	live := mailboxes[0]
	if got := usageOf(t, store, live).SharedTotal; got == 0 {
		t.Errorf("%s on a live master: no usage counted during the outage, want the first attempt applied", live)
	}

	c.RestartNode(down)
	closeWriter(t, w)

	if !strings.Contains(logs.String(), "audit delivery resumed") {
		t.Errorf("no resumed delivery logged; log:\n%s", logs.String())
	}
	ids := auditRequestIDs(t, rdb, layout.Audit())
	for _, m := range mailboxes {
		if got, want := usageOf(t, store, m).SharedTotal, int64(perMailbox*7); got != want {
			t.Errorf("%s (master %d, stopped %d): shared total %d, want %d", m, nodeOf[m], down, got, want)
		}
		for i := range perMailbox {
			if id := fmt.Sprintf("%s-%d", m, i); ids[id] < 1 {
				t.Errorf("request %s has no audit entry", id)
			}
		}
	}
}

// lockedBuffer is a bytes.Buffer safe for the writer's goroutine and the
// test.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
