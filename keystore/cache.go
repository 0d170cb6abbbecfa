package keystore

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/maypok86/otter/v2"
	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/provider"
)

// The record cache spares the request path its Redis round trip for
// mailboxes it has seen within the last TTL. It holds what Read returns
// except the usage counter: generation, source, ciphertext, last four and
// limit. Those change only through the Store's write methods, and each write
// publishes the mailbox id on the changes channel, so every replica drops its
// copy within a round trip of the write. The TTL bounds how long a copy can
// outlive a notice that never arrived (a writer that died between its write
// and its publish), which is why it may not exceed one second.
//
// The cache serves only while its subscription is confirmed. When the
// subscription drops (Redis stopped, a failover, a network fault) the cache
// empties and every request reads Redis again, so an outage still fails
// requests with 503 rather than serving what it remembers.
//
// Usage counts change with every metered request and are written by the
// audit writer, not the Store, so they are never cached: a shared request
// under a finite allowance still reads its counter from Redis.

// MaxCacheTTL is the longest a replica may reuse a record it read, the
// bound on how late a change is seen when its notice is lost.
const MaxCacheTTL = time.Second

// cacheSize bounds the records held. A record is about 400 bytes, so a full
// cache takes some 40 MB.
const cacheSize = 100_000

type recordCache struct {
	ttl     time.Duration
	entries *otter.Cache[string, *Record]
	// epoch rises with every invalidation, so a read that raced one can tell
	// and not store what it read.
	epoch atomic.Uint64
	// live is true while the subscription to the changes channel is
	// confirmed.
	live atomic.Bool
	log  atomic.Pointer[slog.Logger]
}

func newRecordCache(ttl time.Duration) *recordCache {
	c := &recordCache{
		ttl: ttl,
		entries: otter.Must(&otter.Options[string, *Record]{
			MaximumSize:      cacheSize,
			ExpiryCalculator: otter.ExpiryWriting[string, *Record](ttl),
		}),
	}
	c.log.Store(slog.New(slog.DiscardHandler))
	return c
}

func cacheKey(id mailbox.ID, prov string) string {
	return prov + "\x00" + string(id)
}

// get returns the cached record, which the caller must not modify.
func (c *recordCache) get(key string) (*Record, bool) {
	if !c.live.Load() {
		return nil, false
	}
	return c.entries.GetIfPresent(key)
}

// put stores rec, read from Redis after the epoch was start, unless an
// invalidation may have come in between.
func (c *recordCache) put(key string, rec *Record, start uint64) {
	if !c.live.Load() || c.epoch.Load() != start {
		return
	}
	c.entries.Set(key, rec)
	// An invalidation between the check above and Set would have missed
	// the new entry, so check the epoch again.
	if !c.live.Load() || c.epoch.Load() != start {
		c.entries.Invalidate(key)
	}
}

// invalidate drops every provider's record of mailbox id.
func (c *recordCache) invalidate(id string) {
	c.epoch.Add(1)
	for _, p := range provider.Names {
		c.entries.Invalidate(p + "\x00" + id)
	}
}

func (c *recordCache) invalidateAll() {
	c.epoch.Add(1)
	c.entries.InvalidateAll()
}

// EnableCache turns on the record cache with ttl, at most MaxCacheTTL.
// Records are cached only while Watch runs and its subscription is
// confirmed. Call it before the store is used.
func (s *Store) EnableCache(ttl time.Duration) {
	if ttl <= 0 {
		return
	}
	s.cache = newRecordCache(min(ttl, MaxCacheTTL))
}

// Watch keeps the record cache in step with Redis: it subscribes to the
// changes channel and drops the records each notice names, until ctx ends.
// Without EnableCache it returns at once.
func (s *Store) Watch(ctx context.Context, log *slog.Logger) {
	c := s.cache
	if c == nil {
		return
	}
	c.log.Store(log)
	ps := s.rdb.Subscribe(ctx, s.layout.Changes())
	// A receive blocks in a socket read that ctx does not interrupt; closing
	// the subscription does.
	stop := context.AfterFunc(ctx, func() { ps.Close() })
	defer func() {
		if stop() {
			ps.Close()
		}
	}()
	defer c.live.Store(false)
	log.Info("record cache watching for changes", "channel", s.layout.Changes())

	const quiet = 5 * time.Second
	backoff := 100 * time.Millisecond
	pinged, failing := false, false
	for ctx.Err() == nil {
		msg, err := ps.ReceiveTimeout(ctx, quiet)
		if err != nil {
			var netErr interface{ Timeout() bool }
			if errors.As(err, &netErr) && netErr.Timeout() && !pinged {
				// The channel is quiet, so check that the connection
				// still responds. The pong arrives as a message.
				pinged = true
				if perr := ps.Ping(ctx); perr == nil {
					continue
				}
			}
			if ctx.Err() != nil {
				return
			}
			wasLive := c.live.Swap(false)
			c.invalidateAll()
			if !failing {
				failing = true
				if wasLive {
					log.Warn("record cache off: lost the changes subscription, reading Redis on every request", "error", err)
				} else {
					log.Error("record cache off: subscribing to the changes channel failed, reading Redis on every request; allow the channel and PUBLISH and SUBSCRIBE for the Redis user",
						"channel", s.layout.Changes(), "error", err)
				}
			}
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return
			}
			backoff = min(backoff*2, 2*time.Second)
			pinged = false
			// The next receive dials a lost connection and subscribes
			// again. A rejected subscription (an ACL without the channel,
			// say) must be requested again.
			var rejected redis.Error
			if errors.As(err, &rejected) {
				ps.Subscribe(ctx, s.layout.Changes())
			}
			continue
		}
		pinged = false
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" {
				// Notices sent while unsubscribed are lost, so start
				// from nothing.
				c.invalidateAll()
				c.live.Store(true)
				log.Info("record cache on", "ttl", c.ttl.String())
				failing = false
				backoff = 100 * time.Millisecond
			}
		case *redis.Message:
			c.invalidate(m.Payload)
		}
	}
}

// changed drops the local records of mailbox id and publishes its id, so
// every replica does the same. The write itself has succeeded, so a failed notice is logged
// rather than returned: other replicas then see the change when their copy
// expires, within MaxCacheTTL.
func (s *Store) changed(ctx context.Context, id mailbox.ID) {
	if s.cache != nil {
		s.cache.invalidate(string(id))
	}
	if err := s.rdb.Publish(ctx, s.layout.Changes(), string(id)).Err(); err != nil {
		log := slog.Default()
		if s.cache != nil {
			log = s.cache.log.Load()
		}
		log.Warn("publishing a mailbox change failed, other replicas see it when their copy expires",
			"mailbox", string(id), "error", err)
	}
}
