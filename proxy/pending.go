package proxy

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
)

// pendingUsage counts, per mailbox and month, the shared tokens this
// process has charged to mailboxes with an allowance and the audit writer
// has not yet added to Redis. The writer sends usage in batches, so without
// this count a client that sends its next request as soon as one ends would
// be checked against a total that lacks the last one, and could go past its
// allowance.
type pendingUsage struct {
	// entries is the number of keys in tokens, so that the usual case, with
	// nothing pending, takes no lock.
	entries atomic.Int64
	mu      sync.Mutex
	tokens  map[string]int64
}

func pendingKey(id mailbox.ID, t time.Time) string {
	return string(id) + "\x00" + keystore.Month(t)
}

// add counts n tokens for id in the month of t, and returns the function
// that takes them off again once the writer has delivered or dropped them.
func (p *pendingUsage) add(id mailbox.ID, t time.Time, n int64) func() {
	key := pendingKey(id, t)
	p.mu.Lock()
	if p.tokens == nil {
		p.tokens = make(map[string]int64)
	}
	if _, ok := p.tokens[key]; !ok {
		p.entries.Add(1)
	}
	p.tokens[key] += n
	p.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			p.mu.Lock()
			defer p.mu.Unlock()
			if p.tokens[key] -= n; p.tokens[key] <= 0 {
				delete(p.tokens, key)
				p.entries.Add(-1)
			}
		})
	}
}

// get returns the tokens pending for id in the current month.
func (p *pendingUsage) get(id mailbox.ID) int64 {
	if p.entries.Load() == 0 {
		return 0
	}
	key := pendingKey(id, time.Now())
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.tokens[key]
}
