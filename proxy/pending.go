package proxy

import (
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
)

// pendingUsage holds, per mailbox, the shared usage this process has
// charged to mailboxes with an allowance and the audit writer has not yet
// reported written. The writer sends usage after the response has ended, so
// without it a client that sends its next request at once would be checked
// against a total that lacks the last one, and could go past its allowance.
type pendingUsage struct {
	// entries is the number of mailboxes in requests, so that the usual
	// case, with nothing pending, takes no lock.
	entries  atomic.Int64
	mu       sync.Mutex
	requests map[mailbox.ID][]keystore.PendingUsage
}

// add holds n tokens of request requestID, begun at start, for id, until
// the returned charge is done.
func (p *pendingUsage) add(id mailbox.ID, start time.Time, requestID string, n int64) *pendingCharge {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.requests == nil {
		p.requests = make(map[mailbox.ID][]keystore.PendingUsage)
	}
	if len(p.requests[id]) == 0 {
		p.entries.Add(1)
	}
	p.requests[id] = append(p.requests[id], keystore.PendingUsage{RequestID: requestID, Month: keystore.Month(start), Tokens: n})
	return &pendingCharge{p: p, id: id, requestID: requestID}
}

// pendingCharge is one request's usage held in a pendingUsage.
type pendingCharge struct {
	p         *pendingUsage
	id        mailbox.ID
	requestID string
	once      sync.Once
}

// set changes the tokens held to n, the request's final count.
func (c *pendingCharge) set(n int64) {
	c.p.mu.Lock()
	defer c.p.mu.Unlock()
	for i, u := range c.p.requests[c.id] {
		if u.RequestID == c.requestID {
			c.p.requests[c.id][i].Tokens = n
		}
	}
}

// done lets the tokens go, once the writer has delivered or dropped them.
func (c *pendingCharge) done() {
	c.once.Do(func() {
		p := c.p
		p.mu.Lock()
		defer p.mu.Unlock()
		list := slices.DeleteFunc(p.requests[c.id], func(u keystore.PendingUsage) bool { return u.RequestID == c.requestID })
		if len(list) == 0 {
			delete(p.requests, c.id)
			p.entries.Add(-1)
			return
		}
		p.requests[c.id] = list
	})
}

// get returns a copy of the usage pending for id.
func (p *pendingUsage) get(id mailbox.ID) []keystore.PendingUsage {
	if p.entries.Load() == 0 {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.requests[id])
}

// chargePending holds the usage of x as pending once its upstream body has
// ended, before the client is sent the end of the response, so that the
// client's next request is checked against it. finish sets the final count,
// and does it for a response that ends otherwise.
func (h *Handler) chargePending(x *exchange) {
	if !x.limited || x.charge != nil || x.tap == nil {
		return
	}
	c := x.tap.Counts()
	if n := c.Total(); n > 0 {
		x.charge = h.pending.add(x.mailbox, x.start, x.id, n)
	}
}
