package keystore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"filippo.io/age"
	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/provider"
)

// RewrapOptions configure Store.Rewrap.
type RewrapOptions struct {
	// Count is the COUNT hint of each SCAN call; 0 means 100.
	Count int64
	// Checkpoint saves the SCAN cursor under {prefix}rewrap:cursor after each
	// batch, so a run that stops early resumes from there. A completed run
	// deletes the checkpoint.
	Checkpoint bool
	// Restart ignores and deletes an existing checkpoint.
	Restart bool
	// Progress, when not nil, receives the running totals every
	// ProgressEvery keys and at least every ProgressInterval. Calls never
	// overlap.
	Progress func(RewrapStats)
	// ProgressEvery is a number of keys; 0 means 1000.
	ProgressEvery int64
	// ProgressInterval is a duration; 0 means 5 seconds.
	ProgressInterval time.Duration
	// Logger receives one line per key that could not be rewrapped. Nil
	// discards them.
	Logger *slog.Logger
	// TagUntagged binds again, with a tag, the payloads written without
	// one: byokproxy-key/v1 payloads and bare keys from older versions.
	// Anyone who can write Redis could have written such a payload, so a
	// rewrap leaves them alone, counted as failed, unless this is set for
	// the one run right after an upgrade.
	TagUntagged bool
}

// RewrapStats counts the outcome of a rewrap, one unit per stored key (one
// mailbox and provider).
type RewrapStats struct {
	// Mailboxes is the number of mailbox hashes scanned.
	Mailboxes int64 `json:"mailboxes"`
	// Rewrapped keys were encrypted again to the first recipient.
	Rewrapped int64 `json:"rewrapped"`
	// Current keys were encrypted to the first recipient only, with the
	// binding, and were left alone.
	Current int64 `json:"current"`
	// Skipped keys changed between the read and the write, such as a key
	// rotated through the admin API; the newer value was kept.
	Skipped int64 `json:"skipped"`
	// Failed keys could not be decrypted, were bound to another mailbox or
	// provider, or could not be written. They were left unchanged.
	Failed int64 `json:"failed"`
}

// Keys returns the number of stored keys examined.
func (s RewrapStats) Keys() int64 {
	return s.Rewrapped + s.Current + s.Skipped + s.Failed
}

// RewrapCheckpoint returns the key of the rewrap checkpoint hash.
func (l Layout) RewrapCheckpoint() string { return l.Prefix + "rewrap:cursor" }

// checkpointTTL bounds how long an abandoned checkpoint stays in Redis.
const checkpointTTL = 7 * 24 * time.Hour

// Fields of the checkpoint hash. The recipient field ties the saved cursors
// to one first recipient: a checkpoint left by a rewrap to another recipient
// is discarded, because the keys it passed are not current for this one.
const (
	checkpointRecipient = "recipient"
	checkpointCursor    = "cursor:"
	checkpointDone      = "done"
)

// Rewrap encrypts every stored key again to the first identity's recipient,
// while the proxy keeps serving. It runs SCAN over {prefix}mbx:* on every
// master (every node of a Redis Cluster). For each ct:PROVIDER field it
// decrypts with all identities, and leaves the field alone when only the
// first identity's single recipient stanza opens it and the payload carries
// its mailbox and provider binding. Otherwise it encrypts the key again,
// bound to its mailbox and provider, which adds the binding to legacy payloads
// that contain only the bare key. The write is a compare-and-set, so a field
// that changed since it was read (such as a key rotated through the admin API
// meanwhile) is kept and counted as skipped.
//
// A payload bound to another mailbox or provider is never rebound. It is
// counted as failed and left as it is, so it stays unusable.
//
// Rewrap is idempotent: running it again converges, and with
// RewrapOptions.Checkpoint a run resumes where an interrupted one stopped.
// Every proxy replica must already hold the new identity before Rewrap runs,
// or replicas without it cannot decrypt the rewrapped keys.
//
// It returns the totals and ctx.Err() when ctx ends first, or a Redis error
// that stopped the scan. Failures of single keys do not stop it.
func (s *Store) Rewrap(ctx context.Context, opts RewrapOptions) (RewrapStats, error) {
	if opts.Count <= 0 {
		opts.Count = 100
	}
	if opts.ProgressEvery <= 0 {
		opts.ProgressEvery = 1000
	}
	if opts.ProgressInterval <= 0 {
		opts.ProgressInterval = 5 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	ids := s.Identities()
	if ids == nil || ids.Len() == 0 {
		return RewrapStats{}, errors.New("rewrap: no age identity loaded")
	}
	rw := &rewrapper{
		store:     s,
		ids:       ids,
		opts:      opts,
		recipient: ids.Recipient().String(),
		lastTime:  time.Now(),
	}
	if err := rw.prepareCheckpoint(ctx); err != nil {
		return RewrapStats{}, err
	}

	var err error
	if cluster, ok := s.rdb.(*redis.ClusterClient); ok {
		err = cluster.ForEachMaster(ctx, func(ctx context.Context, node *redis.Client) error {
			return rw.scanNode(ctx, node, node.Options().Addr)
		})
	} else {
		err = rw.scanNode(ctx, s.rdb, "default")
	}
	if ctx.Err() != nil {
		// A Redis call cut short by the end of ctx fails with a wrapped
		// error; the cause worth reporting is the end of ctx.
		err = ctx.Err()
	}
	if err == nil && opts.Checkpoint {
		// Deleting the checkpoint makes the next run start from the beginning,
		// which is what a run after a completed one needs.
		if derr := s.rdb.Del(ctx, s.layout.RewrapCheckpoint()).Err(); derr != nil {
			opts.Logger.Warn("rewrap checkpoint not deleted; the next run resumes from it", "key", s.layout.RewrapCheckpoint(), "error", derr)
		}
	}
	return rw.snapshot(), err
}

// rewrapper is the state of one Rewrap call, shared by the per-node scans,
// which run concurrently on a Redis Cluster.
type rewrapper struct {
	store     *Store
	ids       *Identities
	opts      RewrapOptions
	recipient string

	mu        sync.Mutex
	stats     RewrapStats
	lastKeys  int64
	lastTime  time.Time
	progress  sync.Mutex // serializes calls of opts.Progress
	nodeStart map[string]uint64
}

// prepareCheckpoint loads the saved cursors. It clears a checkpoint that
// belongs to another recipient, and any checkpoint when Restart is set.
func (rw *rewrapper) prepareCheckpoint(ctx context.Context) error {
	rw.nodeStart = map[string]uint64{}
	if !rw.opts.Checkpoint {
		return nil
	}
	key := rw.store.layout.RewrapCheckpoint()
	saved, err := rw.store.rdb.HGetAll(ctx, key).Result()
	if err != nil {
		return fmt.Errorf("%w: read rewrap checkpoint: %v", ErrUnavailable, err)
	}
	if rw.opts.Restart || (len(saved) > 0 && saved[checkpointRecipient] != rw.recipient) {
		if len(saved) > 0 {
			rw.opts.Logger.Info("discarding the rewrap checkpoint", "key", key, "restart", rw.opts.Restart)
		}
		saved = nil
	}
	if len(saved) == 0 {
		// The recipient is written before any cursor, so a checkpoint is
		// never read without knowing which recipient its cursors are for.
		pipe := rw.store.rdb.TxPipeline()
		pipe.Del(ctx, key)
		pipe.HSet(ctx, key, checkpointRecipient, rw.recipient)
		pipe.Expire(ctx, key, checkpointTTL)
		if _, err := pipe.Exec(ctx); err != nil {
			return fmt.Errorf("%w: write rewrap checkpoint: %v", ErrUnavailable, err)
		}
		return nil
	}
	for field, value := range saved {
		node, ok := strings.CutPrefix(field, checkpointCursor)
		if !ok {
			continue
		}
		if value == checkpointDone {
			rw.nodeStart[node] = doneCursor
			continue
		}
		cursor, err := strconv.ParseUint(value, 10, 64)
		if err != nil {
			rw.opts.Logger.Warn("invalid cursor in the rewrap checkpoint; scanning that node from the start", "node", node)
			continue
		}
		rw.nodeStart[node] = cursor
		rw.opts.Logger.Info("resuming rewrap from the checkpoint", "node", node, "cursor", cursor)
	}
	return nil
}

// doneCursor marks a node whose scan finished in an earlier run. SCAN
// cursors are never this large in practice.
const doneCursor = ^uint64(0)

// scanNode runs SCAN over one node and rewraps what it finds.
func (rw *rewrapper) scanNode(ctx context.Context, node redis.Cmdable, name string) error {
	cursor := rw.nodeStart[name]
	if cursor == doneCursor {
		return nil
	}
	match := escapeGlob(rw.store.layout.Prefix) + "mbx:*"
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		keys, next, err := node.ScanType(ctx, cursor, match, rw.opts.Count, "hash").Result()
		if err != nil {
			return fmt.Errorf("%w: scan %s: %v", ErrUnavailable, name, err)
		}
		for _, key := range keys {
			if err := ctx.Err(); err != nil {
				return err
			}
			rw.rewrapMailbox(ctx, key)
		}
		if err := ctx.Err(); err != nil {
			// The batch may be cut short, so its cursor is not saved and a
			// resumed run repeats it.
			return err
		}
		cursor = next
		if err := rw.saveCursor(ctx, name, cursor); err != nil {
			return err
		}
		if cursor == 0 {
			return nil
		}
	}
}

func (rw *rewrapper) saveCursor(ctx context.Context, node string, cursor uint64) error {
	if !rw.opts.Checkpoint {
		return nil
	}
	value := strconv.FormatUint(cursor, 10)
	if cursor == 0 {
		value = checkpointDone
	}
	err := rw.store.rdb.HSet(ctx, rw.store.layout.RewrapCheckpoint(), checkpointCursor+node, value).Err()
	if err != nil {
		return fmt.Errorf("%w: write rewrap checkpoint: %v", ErrUnavailable, err)
	}
	return nil
}

// rewrapMailbox rewraps every ct:PROVIDER field of one mailbox hash.
func (rw *rewrapper) rewrapMailbox(ctx context.Context, key string) {
	log := rw.opts.Logger
	id, ok := rw.mailboxOf(key)
	if !ok {
		log.Warn("rewrap: skipping a key that is not a mailbox hash", "key", key)
		return
	}
	fields, err := rw.store.rdb.HGetAll(ctx, key).Result()
	if ctx.Err() != nil {
		return
	}
	if err != nil {
		log.Error("rewrap: reading the mailbox failed", "mailbox", string(id), "error", err)
		rw.count(func(st *RewrapStats) { st.Mailboxes++; st.Failed++ })
		return
	}
	rw.count(func(st *RewrapStats) { st.Mailboxes++ })
	for field, ct := range fields {
		prov, ok := strings.CutPrefix(field, "ct:")
		if !ok || ct == "" {
			continue
		}
		outcome, err := rw.rewrapKey(ctx, id, prov, []byte(ct))
		if err != nil && ctx.Err() != nil {
			// Interrupted, not failed: a resumed run handles this key.
			return
		}
		if err != nil {
			log.Error("rewrap: key left unchanged", "mailbox", string(id), "provider", prov, "error", err)
		}
		rw.count(func(st *RewrapStats) {
			switch outcome {
			case outcomeRewrapped:
				st.Rewrapped++
			case outcomeCurrent:
				st.Current++
			case outcomeSkipped:
				st.Skipped++
			default:
				st.Failed++
			}
		})
	}
}

// mailboxOf returns the mailbox id of a key named {prefix}mbx:{ID}.
func (rw *rewrapper) mailboxOf(key string) (mailbox.ID, bool) {
	rest, ok := strings.CutPrefix(key, rw.store.layout.Prefix+"mbx:{")
	if !ok {
		return "", false
	}
	raw, ok := strings.CutSuffix(rest, "}")
	if !ok {
		return "", false
	}
	id, err := mailbox.ParseID(raw)
	return id, err == nil
}

type outcome int

const (
	outcomeFailed outcome = iota
	outcomeRewrapped
	outcomeCurrent
	outcomeSkipped
)

// errUntagged is the failure of a payload without a tag in a run without
// RewrapOptions.TagUntagged.
var errUntagged = errors.New("the payload has no tag: an older version or a direct Redis write stored it; run rewrap with --tag-untagged once, right after the upgrade, to bind it again")

// rewrapKey handles one stored ciphertext. Its errors never contain key
// material.
func (rw *rewrapper) rewrapKey(ctx context.Context, id mailbox.ID, prov string, ct []byte) (outcome, error) {
	spec := provider.Lookup(prov)
	if spec == nil {
		return outcomeFailed, fmt.Errorf("unknown provider %q in field ct:%s", prov, prov)
	}
	plain, current, err := rw.ids.decryptNoting(ct)
	if err != nil {
		return outcomeFailed, ErrDecrypt
	}
	defer clear(plain)

	var key []byte
	switch {
	case bytes.HasPrefix(plain, []byte(payloadHeader)):
		secret, err := rw.ids.unbind(plain, id, prov)
		if err != nil {
			return outcomeFailed, err
		}
		if current {
			return outcomeCurrent, nil
		}
		key = secret.Bytes()
	case !rw.opts.TagUntagged:
		return outcomeFailed, errUntagged
	case bytes.HasPrefix(plain, []byte(payloadHeaderV1)):
		// Bound before payloads carried a tag: the owner is checked, and the
		// key is bound again with one.
		if key, err = unbindV1(plain, id, prov); err != nil {
			return outcomeFailed, err
		}
		if !spec.ValidKey(key) {
			return outcomeFailed, fmt.Errorf("%w: the v1 payload contains an invalid key: %s", ErrBadKey, spec.KeyRule)
		}
	default:
		// A legacy payload is the bare key, possibly with a line break.
		key = bytes.TrimSpace(plain)
		if !spec.ValidKey(key) {
			return outcomeFailed, fmt.Errorf("legacy payload without binding is not a valid key: %s", spec.KeyRule)
		}
	}
	if len(key) < 4 {
		return outcomeFailed, fmt.Errorf("%w: stored key is shorter than 4 characters", ErrBadKey)
	}

	payload := rw.ids.bind(key, id, prov)
	fresh, err := rw.ids.encrypt(payload)
	clear(payload)
	if err != nil {
		return outcomeFailed, err
	}
	replaced, err := rw.store.ReplaceCiphertext(ctx, id, prov, ct, fresh, string(key[len(key)-4:]))
	if err != nil {
		return outcomeFailed, err
	}
	if !replaced {
		return outcomeSkipped, nil
	}
	return outcomeRewrapped, nil
}

// count applies fn to the totals and reports progress when it is due.
func (rw *rewrapper) count(fn func(*RewrapStats)) {
	rw.mu.Lock()
	fn(&rw.stats)
	keys := rw.stats.Keys()
	due := keys-rw.lastKeys >= rw.opts.ProgressEvery || time.Since(rw.lastTime) >= rw.opts.ProgressInterval
	if due {
		rw.lastKeys = keys
		rw.lastTime = time.Now()
	}
	snap := rw.stats
	rw.mu.Unlock()
	if due && rw.opts.Progress != nil {
		rw.progress.Lock()
		rw.opts.Progress(snap)
		rw.progress.Unlock()
	}
}

func (rw *rewrapper) snapshot() RewrapStats {
	rw.mu.Lock()
	defer rw.mu.Unlock()
	return rw.stats
}

// replaceCiphertextScript writes a new ciphertext only if the field still
// holds the one that was read, so a key stored in the meantime is never
// overwritten with an older one. It also fills in a missing last four.
// KEYS: mailbox hash. ARGV: ct field, old ciphertext, new ciphertext, last4
// field, last four.
var replaceCiphertextScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if ARGV[5] ~= '' then
  redis.call('HSETNX', KEYS[1], ARGV[4], ARGV[5])
end
return 1
`)

// ReplaceCiphertext stores next as the provider's ciphertext of mailbox id
// if the stored one is still prev, and reports whether it did. last4, when
// not empty, is stored only where no last four is stored yet. It does not
// check next: the caller must have made it from the same key.
func (s *Store) ReplaceCiphertext(ctx context.Context, id mailbox.ID, prov string, prev, next []byte, last4 string) (bool, error) {
	n, err := replaceCiphertextScript.Run(ctx, s.rdb, []string{s.layout.Mailbox(string(id))},
		fieldCipher(prov), prev, next, fieldLast4(prov), last4).Int()
	if err != nil {
		return false, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	if n == 1 {
		s.changed(ctx, id)
	}
	return n == 1, nil
}

// decryptNoting decrypts ciphertext with every identity and reports whether
// it is current: opened by the first identity, from a header with one
// recipient stanza only. A ciphertext that other identities, or anyone else,
// could also open is not current.
func (ids *Identities) decryptNoting(ciphertext []byte) (plain []byte, current bool, err error) {
	first := &stanzaNoter{id: ids.ids[0]}
	noting := &Identities{ids: append([]age.Identity{first}, ids.ids[1:]...)}
	plain, err = noting.decrypt(ciphertext)
	if err != nil {
		return nil, false, err
	}
	return plain, first.opened && first.stanzas == 1, nil
}

// stanzaNoter wraps an identity and records the number of stanzas in the
// header that age.Decrypt passed to it, and whether this identity opened one.
// age tries identities in order, so the first identity receives every header.
type stanzaNoter struct {
	id      age.Identity
	stanzas int
	opened  bool
}

func (n *stanzaNoter) Unwrap(stanzas []*age.Stanza) ([]byte, error) {
	n.stanzas = len(stanzas)
	fileKey, err := n.id.Unwrap(stanzas)
	n.opened = err == nil
	return fileKey, err
}

// escapeGlob escapes the characters that SCAN MATCH treats as a pattern.
func escapeGlob(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch r {
		case '*', '?', '[', ']', '\\':
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}
