// Package keystore keeps each mailbox's provider keys, key sources, token
// generation and allowance in Redis, and is the only package that ever holds
// a plaintext provider key.
//
// A stored key is an age ciphertext (X25519, standard age format) whose
// payload names the mailbox and provider as well as the key, so a ciphertext
// copied to another mailbox or provider is detected and never used. The
// plaintext exists only inside Resolve's caller for the length of one
// request, as a [Secret] that never prints itself.
package keystore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/provider"
)

// Key sources, as the admin API names them.
const (
	SourceShared = "shared"
	SourceBYOK   = "byok"
)

// Errors that callers branch on. Messages never contain key material.
var (
	// ErrUnavailable wraps a Redis failure.
	ErrUnavailable = errors.New("key store unavailable")
	// ErrNoKey means byok was chosen, or a test requested, with no key stored.
	ErrNoKey = errors.New("no key stored")
	// ErrDecrypt means a stored ciphertext could not be decrypted with any
	// identity.
	ErrDecrypt = errors.New("stored key cannot be decrypted")
	// ErrWrongBinding means a ciphertext names another mailbox or provider.
	ErrWrongBinding = errors.New("stored key is bound to another mailbox or provider")
	// ErrBadKey means a key does not have its provider's format.
	ErrBadKey = errors.New("invalid key format")
)

// Store reads and writes the Redis side of the key store.
type Store struct {
	rdb    redis.UniversalClient
	layout Layout
	// ids is swapped whole on a reload while requests decrypt with it.
	ids atomic.Pointer[Identities]
	now func() time.Time
	// cache is nil unless EnableCache turned it on.
	cache *recordCache
	// callTimeout, in nanoseconds, bounds each Redis call of the request
	// path; 0 leaves only the client's own timeouts.
	callTimeout atomic.Int64
}

// SetCallTimeout bounds each Redis call that Lookup, Refresh and Owns make
// by d. A Redis that accepts connections but does not reply then fails a
// request after about d, where the client's retry would double it. A cached
// record costs no call, and no timer either.
func (s *Store) SetCallTimeout(d time.Duration) { s.callTimeout.Store(int64(d)) }

// bound returns ctx with the call timeout, when one is set.
func (s *Store) bound(ctx context.Context) (context.Context, context.CancelFunc) {
	d := time.Duration(s.callTimeout.Load())
	if d <= 0 {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, d)
}

// New returns a store on rdb under prefix, encrypting to ids.
func New(rdb redis.UniversalClient, prefix string, ids *Identities) *Store {
	s := &Store{rdb: rdb, layout: Layout{Prefix: prefix}, now: time.Now}
	s.ids.Store(ids)
	return s
}

// Layout returns the key layout of the store.
func (s *Store) Layout() Layout { return s.layout }

// Client returns the Redis client of the store.
func (s *Store) Client() redis.UniversalClient { return s.rdb }

// Identities returns the identities the store decrypts with.
func (s *Store) Identities() *Identities { return s.ids.Load() }

// SetIdentities replaces the identities, for a reload. Safe to call while
// requests are served.
func (s *Store) SetIdentities(ids *Identities) { s.ids.Store(ids) }

// Record is everything the request path needs about one mailbox and provider,
// read in a single round trip.
type Record struct {
	// Generation is the mailbox's current token generation.
	Generation int64
	// Source is SourceShared or SourceBYOK.
	Source string
	// Ciphertext is the stored key's age ciphertext, nil without a key.
	Ciphertext []byte
	// Last4 is the stored key's last four characters.
	Last4 string
	// Limit is the mailbox's own allowance, or nil to use the default.
	Limit *int64
	// UsedShared is the shared tokens counted this month.
	UsedShared int64
}

// Read returns the record of mailbox id and provider, with this month's
// shared usage. It costs one Redis round trip.
func (s *Store) Read(ctx context.Context, id mailbox.ID, prov string) (*Record, error) {
	pipe := s.rdb.Pipeline()
	fields := pipe.HMGet(ctx, s.layout.Mailbox(string(id)),
		fieldGeneration, fieldSource(prov), fieldCipher(prov), fieldLast4(prov), fieldLimit)
	used := pipe.HGet(ctx, s.layout.Usage(string(id), Month(s.now())), UsageTotalField)
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	v := fields.Val()
	rec := &Record{Source: SourceShared}
	rec.Generation = parseInt(v[0])
	if src, _ := v[1].(string); src == SourceBYOK {
		rec.Source = SourceBYOK
	}
	if ct, _ := v[2].(string); ct != "" {
		rec.Ciphertext = []byte(ct)
	}
	rec.Last4, _ = v[3].(string)
	if lim, ok := v[4].(string); ok {
		n, err := strconv.ParseInt(lim, 10, 64)
		if err == nil {
			rec.Limit = &n
		}
	}
	rec.UsedShared, _ = strconv.ParseInt(used.Val(), 10, 64)
	return rec, nil
}

// Lookup returns what the request path needs of mailbox id and provider,
// like Read, but from the record cache when it holds the record. It reads
// the usage counter from Redis only for a shared record whose allowance (its
// own limit, else defaultLimit) is finite, so UsedShared is zero otherwise.
// The caller must not modify the record.
func (s *Store) Lookup(ctx context.Context, id mailbox.ID, prov string, defaultLimit int64) (*Record, error) {
	if s.cache == nil {
		ctx, cancel := s.bound(ctx)
		defer cancel()
		return s.Read(ctx, id, prov)
	}
	key := cacheKey(id, prov)
	if rec, ok := s.cache.get(key); ok {
		if rec.Source != SourceShared || rec.limit(defaultLimit) == 0 {
			return rec, nil
		}
		ctx, cancel := s.bound(ctx)
		defer cancel()
		used, err := s.rdb.HGet(ctx, s.layout.Usage(string(id), Month(s.now())), UsageTotalField).Result()
		if err != nil && !errors.Is(err, redis.Nil) {
			return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
		}
		withUsage := *rec
		withUsage.UsedShared, _ = strconv.ParseInt(used, 10, 64)
		return &withUsage, nil
	}
	readAt := time.Now()
	start := s.cache.epoch.Load()
	ctx, cancel := s.bound(ctx)
	defer cancel()
	rec, err := s.Read(ctx, id, prov)
	if err != nil {
		return nil, err
	}
	cached := *rec
	cached.UsedShared = 0
	s.cache.put(key, &cached, start, readAt)
	return rec, nil
}

// Refresh is Lookup without the cached record of mailbox id and provider,
// for a token newer than that record: it was issued after a revocation
// whose notice has not arrived yet.
func (s *Store) Refresh(ctx context.Context, id mailbox.ID, prov string, defaultLimit int64) (*Record, error) {
	s.forget(id, prov)
	return s.Lookup(ctx, id, prov, defaultLimit)
}

// limit returns the record's allowance: its own, else defaultLimit.
func (r *Record) limit(defaultLimit int64) int64 {
	if r.Limit != nil {
		return *r.Limit
	}
	return defaultLimit
}

func parseInt(v any) int64 {
	s, _ := v.(string)
	n, _ := strconv.ParseInt(s, 10, 64)
	return n
}

// Open decrypts a record's ciphertext for mailbox id and provider. The caller
// must Wipe the returned secret when the request is done.
func (s *Store) Open(rec *Record, id mailbox.ID, prov string) (*Secret, error) {
	if len(rec.Ciphertext) == 0 {
		return nil, ErrNoKey
	}
	ids := s.ids.Load()
	plain, err := ids.decrypt(rec.Ciphertext)
	if err != nil {
		s.forget(id, prov)
		return nil, ErrDecrypt
	}
	key, err := ids.unbind(plain, id, prov)
	if err != nil {
		clear(plain)
		s.forget(id, prov)
		return nil, err
	}
	return key, nil
}

// forget drops a cached record that could not be used, so the next request
// reads it again rather than fail on the same copy: a rewrap may have
// replaced its ciphertext since.
func (s *Store) forget(id mailbox.ID, prov string) {
	if s.cache != nil {
		s.cache.entries.Invalidate(cacheKey(id, prov))
	}
}

// Month returns the calendar month of t in UTC as YYYY-MM, the unit of
// usage counters.
func Month(t time.Time) string {
	return t.UTC().Format("2006-01")
}

// Status is the admin view of one mailbox's provider.
type Status struct {
	Source    string     `json:"source"`
	HasKey    bool       `json:"has_key"`
	Last4     string     `json:"last4"`
	UpdatedAt *time.Time `json:"updated_at"`
}

// Mailbox returns the status of every provider of mailbox id. A mailbox with
// nothing stored reports shared and no key.
func (s *Store) Mailbox(ctx context.Context, id mailbox.ID) (map[string]Status, error) {
	all, err := s.rdb.HGetAll(ctx, s.layout.Mailbox(string(id))).Result()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	out := make(map[string]Status, len(provider.Names))
	for _, p := range provider.Names {
		out[p] = statusOf(all, p)
	}
	return out, nil
}

// ProviderStatus returns the status of one provider of mailbox id.
func (s *Store) ProviderStatus(ctx context.Context, id mailbox.ID, prov string) (Status, error) {
	all, err := s.Mailbox(ctx, id)
	if err != nil {
		return Status{}, err
	}
	return all[prov], nil
}

// statusOf builds a provider's status from its mailbox hash fields. It only
// tests the ciphertext field for presence.
func statusOf(fields map[string]string, prov string) Status {
	st := Status{Source: SourceShared}
	if fields[fieldSource(prov)] == SourceBYOK {
		st.Source = SourceBYOK
	}
	st.HasKey = fields[fieldCipher(prov)] != ""
	st.Last4 = fields[fieldLast4(prov)]
	if upd, err := time.Parse(time.RFC3339, fields[fieldUpdated(prov)]); err == nil {
		upd = upd.UTC()
		st.UpdatedAt = &upd
	}
	return st
}

// PutKey validates key for the provider, encrypts it bound to mailbox id and
// provider, and overwrites any earlier ciphertext in one atomic write. It
// does not change the source. PutKey wipes key before it returns.
func (s *Store) PutKey(ctx context.Context, id mailbox.ID, prov string, key []byte) (Status, error) {
	defer clear(key)
	spec := provider.Lookup(prov)
	if spec == nil {
		return Status{}, fmt.Errorf("unknown provider %q", prov)
	}
	if !spec.ValidKey(key) {
		return Status{}, fmt.Errorf("%w: %s", ErrBadKey, spec.KeyRule)
	}
	ids := s.ids.Load()
	payload := ids.bind(key, id, prov)
	ct, err := ids.encrypt(payload)
	clear(payload)
	if err != nil {
		return Status{}, err
	}
	last4 := string(key[len(key)-4:])
	now := s.now().UTC().Truncate(time.Second)
	// One HSET of several fields is atomic, so a concurrent reader sees the
	// old ciphertext and last four or the new ones, never a mix. The source
	// is read in the same transaction: a separate read that failed would
	// report an error for a key that is stored and in force.
	var source *redis.StringCmd
	_, err = s.rdb.TxPipelined(ctx, func(pipe redis.Pipeliner) error {
		pipe.HSet(ctx, s.layout.Mailbox(string(id)),
			fieldCipher(prov), ct,
			fieldLast4(prov), last4,
			fieldUpdated(prov), now.Format(time.RFC3339))
		source = pipe.HGet(ctx, s.layout.Mailbox(string(id)), fieldSource(prov))
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return Status{}, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	s.changed(ctx, id)
	return statusOf(map[string]string{
		fieldSource(prov):  source.Val(),
		fieldCipher(prov):  "stored",
		fieldLast4(prov):   last4,
		fieldUpdated(prov): now.Format(time.RFC3339),
	}, prov), nil
}

// PutSealedKey stores a key that the client encrypted to the proxy's
// recipient: the armored (or binary) age ciphertext of the bare key. The proxy
// decrypts it once to check its format and take its last four, then stores
// its own ciphertext bound to mailbox and provider.
func (s *Store) PutSealedKey(ctx context.Context, id mailbox.ID, prov string, sealed []byte) (Status, error) {
	plain, err := s.ids.Load().decrypt(sealed)
	if err != nil {
		return Status{}, fmt.Errorf("%w: the ciphertext does not decrypt with this proxy's identity; encrypt the bare key to the recipient from GET /admin/v1/recipient", ErrBadKey)
	}
	// Pasted keys often end in a newline.
	key := bytes.TrimSpace(plain)
	st, err := s.PutKey(ctx, id, prov, key)
	clear(plain)
	return st, err
}

// deleteKeyScript returns the last four characters of the key it removes,
// read in the same step, or nil (false in Lua) when no key was stored.
var deleteKeyScript = redis.NewScript(`
local last4 = redis.call('HGET', KEYS[1], ARGV[2])
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[2], ARGV[3], ARGV[4])
if removed == 0 then
  return false
end
return last4 or ''
`)

// DeleteKey removes the provider's key of mailbox id and sets its source back
// to shared, atomically. It returns the removed key's last four characters,
// and removed is false when no key was stored.
func (s *Store) DeleteKey(ctx context.Context, id mailbox.ID, prov string) (last4 string, removed bool, err error) {
	last4, err = deleteKeyScript.Run(ctx, s.rdb, []string{s.layout.Mailbox(string(id))},
		fieldCipher(prov), fieldLast4(prov), fieldUpdated(prov), fieldSource(prov)).Text()
	if err != nil && !errors.Is(err, redis.Nil) {
		return "", false, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	s.changed(ctx, id)
	return last4, err == nil, nil
}

// setSourceScript refuses byok without a stored key inside Redis, so a key
// removed concurrently cannot leave a mailbox on byok with nothing to use.
// It returns {0} when it rejects byok, and otherwise {1, ciphertext present
// (1 or 0), last four, update time}, read in the same step as the write.
var setSourceScript = redis.NewScript(`
local has = redis.call('HEXISTS', KEYS[1], ARGV[3])
if ARGV[2] == 'byok' and has == 0 then
  return {0}
end
if ARGV[2] == 'byok' then
  redis.call('HSET', KEYS[1], ARGV[1], 'byok')
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return {1, has, redis.call('HGET', KEYS[1], ARGV[4]) or '', redis.call('HGET', KEYS[1], ARGV[5]) or ''}
`)

// SetSource selects the provider's source for mailbox id. Selecting byok
// without a stored key returns ErrNoKey.
func (s *Store) SetSource(ctx context.Context, id mailbox.ID, prov, source string) (Status, error) {
	if source != SourceShared && source != SourceBYOK {
		return Status{}, fmt.Errorf("invalid source %q: use %q or %q", source, SourceShared, SourceBYOK)
	}
	reply, err := setSourceScript.Run(ctx, s.rdb, []string{s.layout.Mailbox(string(id))},
		fieldSource(prov), source, fieldCipher(prov), fieldLast4(prov), fieldUpdated(prov)).Slice()
	if err != nil {
		return Status{}, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	if len(reply) == 1 {
		return Status{}, ErrNoKey
	}
	s.changed(ctx, id)
	if len(reply) != 4 {
		return Status{}, fmt.Errorf("%w: source script returned %d values, want 4", ErrUnavailable, len(reply))
	}
	fields := map[string]string{fieldSource(prov): source}
	if has, _ := reply[1].(int64); has == 1 {
		fields[fieldCipher(prov)] = "stored"
	}
	fields[fieldLast4(prov)], _ = reply[2].(string)
	fields[fieldUpdated(prov)], _ = reply[3].(string)
	return statusOf(fields, prov), nil
}

// Generation returns the mailbox's current token generation.
func (s *Store) Generation(ctx context.Context, id mailbox.ID) (int64, error) {
	v, err := s.rdb.HGet(ctx, s.layout.Mailbox(string(id)), fieldGeneration).Int64()
	if errors.Is(err, redis.Nil) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return v, nil
}

// Revoke raises the mailbox's token generation, so every token issued before
// stops working, and returns the new generation.
func (s *Store) Revoke(ctx context.Context, id mailbox.ID) (int64, error) {
	v, err := s.rdb.HIncrBy(ctx, s.layout.Mailbox(string(id)), fieldGeneration, 1).Result()
	if err != nil {
		return 0, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	s.changed(ctx, id)
	return v, nil
}

// deleteMailboxScript clears the mailbox hash and its response ids but keeps
// a raised generation, so no token issued before the deletion can ever be
// valid again.
var deleteMailboxScript = redis.NewScript(`
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'gen', gen)
return gen
`)

// DeleteMailbox removes every key, source, limit and response id of mailbox
// id in one atomic step and revokes its tokens for good. Usage counters stay.
func (s *Store) DeleteMailbox(ctx context.Context, id mailbox.ID) error {
	err := deleteMailboxScript.Run(ctx, s.rdb,
		[]string{s.layout.Mailbox(string(id)), s.layout.Owned(string(id))}).Err()
	if err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	s.changed(ctx, id)
	return nil
}

// SetLimit sets the mailbox's own monthly token allowance (0 is unlimited),
// or removes it with nil so the default applies.
func (s *Store) SetLimit(ctx context.Context, id mailbox.ID, limit *int64) error {
	key := s.layout.Mailbox(string(id))
	var err error
	if limit == nil {
		err = s.rdb.HDel(ctx, key, fieldLimit).Err()
	} else {
		err = s.rdb.HSet(ctx, key, fieldLimit, *limit).Err()
	}
	if err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	s.changed(ctx, id)
	return nil
}

// Limit returns the mailbox's own allowance, or nil if it has none.
func (s *Store) Limit(ctx context.Context, id mailbox.ID) (*int64, error) {
	v, err := s.rdb.HGet(ctx, s.layout.Mailbox(string(id)), fieldLimit).Int64()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return &v, nil
}

// Ping checks that Redis responds.
func (s *Store) Ping(ctx context.Context) error {
	return s.rdb.Ping(ctx).Err()
}

// CheckEviction runs CheckEviction on the store's Redis client.
func (s *Store) CheckEviction(ctx context.Context) error {
	return CheckEviction(ctx, s.rdb)
}
