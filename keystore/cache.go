package keystore

import (
	"context"
	"errors"
	"log/slog"
	"strings"
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
// and its publish), which is why it may not exceed one second. It counts
// from before the read, so a late reply cannot stretch it.
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
	entries *otter.Cache[string, cachedRecord]
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
		entries: otter.Must(&otter.Options[string, cachedRecord]{
			MaximumSize: cacheSize,
			ExpiryCalculator: otter.ExpiryWritingFunc(func(e otter.Entry[string, cachedRecord]) time.Duration {
				return max(time.Until(e.Value.expires), 0)
			}),
		}),
	}
	c.log.Store(slog.New(slog.DiscardHandler))
	return c
}

func cacheKey(id mailbox.ID, prov string) string {
	return prov + "\x00" + string(id)
}

// cachedRecord is a record with the end of its life: the TTL counted from
// before the read that returned it, so a slow reply or a slow writer cannot
// stretch how long it is used.
type cachedRecord struct {
	rec     *Record
	expires time.Time
}

// get returns the cached record, which the caller must not modify.
func (c *recordCache) get(key string) (*Record, bool) {
	if !c.live.Load() {
		return nil, false
	}
	v, ok := c.entries.GetIfPresent(key)
	if !ok || !time.Now().Before(v.expires) {
		return nil, false
	}
	return v.rec, true
}

// put stores rec, read from Redis after the epoch was start and the clock
// readAt, unless an invalidation may have come in between.
func (c *recordCache) put(key string, rec *Record, start uint64, readAt time.Time) {
	expires := readAt.Add(c.ttl)
	if !c.live.Load() || c.epoch.Load() != start || !time.Now().Before(expires) {
		return
	}
	c.entries.Set(key, cachedRecord{rec: rec, expires: expires})
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
// Without EnableCache it logs that the cache is off and returns at once.
func (s *Store) Watch(ctx context.Context, log *slog.Logger) {
	c := s.cache
	if c == nil {
		log.Info("record cache off: redis.cache_ttl is 0, reading Redis on every request")
		return
	}
	c.log.Store(log)
	defer c.live.Store(false)
	log.Info("record cache watching for changes", "channel", s.layout.Changes())

	backoff := 100 * time.Millisecond
	// logged is the cause of the last failure logged, so that a failure
	// that repeats is logged once, and one with another cause again.
	logged := ""
	for ctx.Err() == nil {
		err := s.watchOnce(ctx, log)
		if ctx.Err() != nil {
			return
		}
		wasLive := c.live.Swap(false)
		c.invalidateAll()
		if err == nil {
			// The subscription was confirmed before it failed.
			backoff, logged = 100*time.Millisecond, ""
			err = errors.New("subscription ended")
		}
		cause := subscribeFailure(err)
		if wasLive {
			cause = "lost"
		}
		if cause != logged {
			logged = cause
			switch cause {
			case "lost":
				log.Warn("record cache off: lost the changes subscription, reading Redis on every request", "error", err)
			case "permission":
				log.Error("record cache off: subscribing to the changes channel failed, reading Redis on every request; allow the channel and PUBLISH and SUBSCRIBE for the Redis user",
					"channel", s.layout.Changes(), "error", err)
			case "rejected":
				log.Error("record cache off: Redis rejected the subscription, reading Redis on every request; check the Redis user and password",
					"channel", s.layout.Changes(), "error", err)
			default:
				log.Warn("record cache off: Redis unreachable, subscribing to the changes channel again until it responds",
					"channel", s.layout.Changes(), "error", err)
			}
		}
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

// subscribeFailure names the cause of a failed subscription: "permission"
// when Redis denies the channel or command, as an ACL does, "rejected" for
// any other error reply (such as a wrong password), and "unreachable" for
// a network error.
func subscribeFailure(err error) string {
	var reply redis.Error
	switch {
	case !errors.As(err, &reply):
		return "unreachable"
	case strings.HasPrefix(reply.Error(), "NOPERM"):
		return "permission"
	default:
		return "rejected"
	}
}

// watchOnce runs one subscription on a connection of its own until it
// fails or ctx ends. It returns nil if the subscription was confirmed
// before it failed, and the error otherwise. Each failure ends the
// connection, so a stalled one is never waited on again, and the next
// subscription starts over on a new connection.
func (s *Store) watchOnce(ctx context.Context, log *slog.Logger) error {
	c := s.cache
	ps := s.rdb.Subscribe(ctx, s.layout.Changes())
	// A receive blocks in a socket read that ctx does not interrupt; closing
	// the subscription does.
	stop := context.AfterFunc(ctx, func() { ps.Close() })
	defer func() {
		if stop() {
			ps.Close()
		}
	}()

	// quiet is how long the channel may stay silent before a ping checks
	// that the connection still responds. The pong arrives as a message.
	const quiet = time.Second
	confirmed, pinged := false, false
	for {
		msg, err := ps.ReceiveTimeout(ctx, quiet)
		if err != nil {
			var netErr interface{ Timeout() bool }
			if errors.As(err, &netErr) && netErr.Timeout() && !pinged {
				pinged = true
				if perr := ps.Ping(ctx); perr == nil {
					continue
				}
			}
			if confirmed {
				return nil
			}
			return err
		}
		pinged = false
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" {
				// Notices sent while unsubscribed are lost, so start
				// from nothing.
				c.invalidateAll()
				c.live.Store(true)
				confirmed = true
				log.Info("record cache on", "ttl", c.ttl.String())
			}
		case *redis.Message:
			c.invalidate(m.Payload)
		}
	}
}

// changed drops the local records of mailbox id and publishes its id, so
// every replica does the same. The write itself has succeeded, so a failed
// notice is logged rather than returned: other replicas then see the change
// when their copy expires, within MaxCacheTTL. The notice goes out even when
// the caller's context has ended since the write.
func (s *Store) changed(ctx context.Context, id mailbox.ID) {
	if s.cache != nil {
		s.cache.invalidate(string(id))
	}
	var err error
	for range 2 {
		pubCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		err = s.rdb.Publish(pubCtx, s.layout.Changes(), string(id)).Err()
		cancel()
		if err == nil {
			return
		}
	}
	log := slog.Default()
	if s.cache != nil {
		log = s.cache.log.Load()
	}
	log.Warn("publishing a mailbox change failed, other replicas see it when their copy expires",
		"mailbox", string(id), "error", err)
}
