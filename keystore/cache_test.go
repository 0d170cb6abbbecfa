package keystore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/provider"
)

// cachedReplica returns a store with the record cache on, watching for
// changes, on the same Redis data and identities as base: another replica.
func cachedReplica(t *testing.T, base *Store, ttl time.Duration) *Store {
	t.Helper()
	s := New(base.rdb, base.layout.Prefix, base.Identities())
	s.EnableCache(ttl)
	startWatch(t, s)
	waitLive(t, s)
	return s
}

// startWatch runs s.Watch until the test ends, and waits for it to return
// in the test's cleanup.
func startWatch(tb testing.TB, s *Store) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		s.Watch(ctx, slog.New(slog.DiscardHandler))
		close(done)
	}()
	tb.Cleanup(func() {
		cancel()
		<-done
	})
}

func waitLive(t *testing.T, s *Store) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !s.cache.live.Load() {
		if time.Now().After(deadline) {
			t.Fatal("the record cache did not go live within 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitFor polls cond every 5 ms for up to limit and reports whether it held.
func waitFor(limit time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(limit)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestCacheServesWithoutRedis(t *testing.T) {
	writer, _, _ := newStore(t)
	ctx := context.Background()
	id := mailbox.ID("cache-hit")
	if _, err := writer.PutKey(ctx, id, provider.OpenAI, []byte(openaiKey)); err != nil {
		t.Fatal(err)
	}
	r := cachedReplica(t, writer, time.Second)
	first, err := r.Lookup(ctx, id, provider.OpenAI, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Change the hash behind the store's back, with no notice: a cached
	// replica keeps its copy, so this shows the copy is used.
	if err := writer.rdb.HSet(ctx, writer.layout.Mailbox(string(id)), fieldLast4(provider.OpenAI), "QQQQ").Err(); err != nil {
		t.Fatal(err)
	}
	second, err := r.Lookup(ctx, id, provider.OpenAI, 0)
	if err != nil {
		t.Fatal(err)
	}
	if second.Last4 != first.Last4 || !bytes.Equal(second.Ciphertext, first.Ciphertext) {
		t.Fatalf("second lookup read Redis (last4 %q, then %q); want the cached record", first.Last4, second.Last4)
	}
	// Without a cache the same lookup returns the change.
	if rec, err := writer.Lookup(ctx, id, provider.OpenAI, 0); err != nil || rec.Last4 != "QQQQ" {
		t.Fatalf("uncached Lookup = %+v, %v; want last4 QQQQ", rec, err)
	}
}

func TestCacheTTLBoundsAMissedNotice(t *testing.T) {
	writer, _, _ := newStore(t)
	ctx := context.Background()
	id := mailbox.ID("cache-ttl")
	ttl := 300 * time.Millisecond
	r := cachedReplica(t, writer, ttl)
	if _, err := r.Lookup(ctx, id, provider.OpenAI, 0); err != nil {
		t.Fatal(err)
	}
	// A revocation whose notice never went out, as if its writer died.
	changedAt := time.Now()
	if err := writer.rdb.HIncrBy(ctx, writer.layout.Mailbox(string(id)), fieldGeneration, 1).Err(); err != nil {
		t.Fatal(err)
	}
	seen := waitFor(2*time.Second, func() bool {
		rec, err := r.Lookup(ctx, id, provider.OpenAI, 0)
		return err == nil && rec.Generation == 1
	})
	if !seen {
		t.Fatal("a change without a notice was not seen within 2s")
	}
	// The bound is the TTL plus the polling step, with slack for scheduling.
	if took := time.Since(changedAt); took > ttl+200*time.Millisecond {
		t.Errorf("a change without a notice was seen after %v; want within the TTL of %v", took, ttl)
	}
}

func TestCacheDropsChangedRecords(t *testing.T) {
	base, _, _ := newStore(t)
	ctx := context.Background()
	id := mailbox.ID("cache-change")
	other := mailbox.ID("cache-other")
	// Two replicas, each with its own cache. The writer a drops its copy at
	// once, and b drops its copy when the notice arrives.
	a := cachedReplica(t, base, MaxCacheTTL)
	b := cachedReplica(t, base, MaxCacheTTL)

	lookupBoth := func() {
		t.Helper()
		for _, s := range []*Store{a, b} {
			for _, m := range []mailbox.ID{id, other} {
				if _, err := s.Lookup(ctx, m, provider.OpenAI, 0); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	limit := int64(5)
	steps := []struct {
		name  string
		write func() error
		check func(*Record) bool
	}{
		{"put key", func() error { _, err := a.PutKey(ctx, id, provider.OpenAI, []byte(openaiKey)); return err },
			func(r *Record) bool { return r.Last4 == "WXYZ" && len(r.Ciphertext) > 0 }},
		{"select byok", func() error { _, err := a.SetSource(ctx, id, provider.OpenAI, SourceBYOK); return err },
			func(r *Record) bool { return r.Source == SourceBYOK }},
		{"rotate key", func() error { _, err := a.PutKey(ctx, id, provider.OpenAI, []byte(openaiKey2)); return err },
			func(r *Record) bool { return r.Last4 == "abcd" }},
		{"revoke tokens", func() error { _, err := a.Revoke(ctx, id); return err },
			func(r *Record) bool { return r.Generation == 1 }},
		{"set limit", func() error { return a.SetLimit(ctx, id, &limit) },
			func(r *Record) bool { return r.Limit != nil && *r.Limit == 5 }},
		{"remove key", func() error { _, _, err := a.DeleteKey(ctx, id, provider.OpenAI); return err },
			func(r *Record) bool { return r.Source == SourceShared && len(r.Ciphertext) == 0 }},
		{"delete mailbox", func() error { return a.DeleteMailbox(ctx, id) },
			func(r *Record) bool { return r.Generation == 2 && r.Limit == nil }},
	}
	for _, step := range steps {
		lookupBoth()
		start := time.Now()
		if err := step.write(); err != nil {
			t.Fatalf("%s: %v", step.name, err)
		}
		rec, err := a.Lookup(ctx, id, provider.OpenAI, 0)
		if err != nil || !step.check(rec) {
			t.Fatalf("%s: the writing replica's next lookup = %+v, %v; want the change", step.name, rec, err)
		}
		seen := waitFor(MaxCacheTTL, func() bool {
			rec, err := b.Lookup(ctx, id, provider.OpenAI, 0)
			return err == nil && step.check(rec)
		})
		if !seen {
			t.Fatalf("%s: the other replica did not see the change within %v", step.name, MaxCacheTTL)
		}
		// The notice, not the TTL, is what made it visible: well inside it.
		if took := time.Since(start); took > MaxCacheTTL/2 {
			t.Errorf("%s: the other replica saw the change after %v; want it at the notice", step.name, took)
		}
	}
	// A mailbox without changes keeps its cached record on both replicas.
	if err := base.rdb.HSet(ctx, base.layout.Mailbox(string(other)), fieldLast4(provider.OpenAI), "ZZZZ").Err(); err != nil {
		t.Fatal(err)
	}
	for _, s := range []*Store{a, b} {
		rec, err := s.Lookup(ctx, other, provider.OpenAI, 0)
		if err != nil || rec.Last4 == "ZZZZ" {
			t.Errorf("unchanged mailbox: Lookup = %+v, %v; want the cached record", rec, err)
		}
	}
}

func TestCacheNeverHoldsUsage(t *testing.T) {
	writer, _, _ := newStore(t)
	ctx := context.Background()
	id := mailbox.ID("cache-usage")
	r := cachedReplica(t, writer, MaxCacheTTL)
	usageKey := writer.layout.Usage(string(id), Month(time.Now()))
	for want := int64(100); want <= 300; want += 100 {
		if err := writer.rdb.HIncrBy(ctx, usageKey, UsageTotalField, 100).Err(); err != nil {
			t.Fatal(err)
		}
		// With an allowance the counter is read on every lookup.
		rec, err := r.Lookup(ctx, id, provider.OpenAI, 1000)
		if err != nil {
			t.Fatal(err)
		}
		if rec.UsedShared != want {
			t.Fatalf("UsedShared = %d, want %d read from Redis", rec.UsedShared, want)
		}
	}
	// A mailbox's own limit counts as an allowance too.
	limit := int64(1000)
	if err := writer.SetLimit(ctx, id, &limit); err != nil {
		t.Fatal(err)
	}
	if err := writer.rdb.HIncrBy(ctx, usageKey, UsageTotalField, 50).Err(); err != nil {
		t.Fatal(err)
	}
	if !waitFor(MaxCacheTTL, func() bool {
		rec, err := r.Lookup(ctx, id, provider.OpenAI, 0)
		return err == nil && rec.UsedShared == 350
	}) {
		t.Fatal("with its own limit and no default, the usage counter was not read")
	}
}

func TestCacheOffWhileSubscriptionIsDown(t *testing.T) {
	srv := redistest.StartOwn(t)
	ids, err := GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	base := New(srv.Client(t), srv.Prefix(t), ids)
	ctx := context.Background()
	id := mailbox.ID("cache-outage")
	if _, err := base.PutKey(ctx, id, provider.OpenAI, []byte(openaiKey)); err != nil {
		t.Fatal(err)
	}
	r := cachedReplica(t, base, MaxCacheTTL)
	if _, err := r.Lookup(ctx, id, provider.OpenAI, 0); err != nil {
		t.Fatal(err)
	}

	srv.Stop()
	// Once the subscription is known lost, nothing cached is served: the
	// store is unavailable, as it is without a cache.
	if !waitFor(MaxCacheTTL, func() bool { return !r.cache.live.Load() }) {
		t.Fatal("the cache stayed on after Redis stopped")
	}
	if _, err := r.Lookup(ctx, id, provider.OpenAI, 0); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Lookup with Redis stopped = %v, want ErrUnavailable", err)
	}

	// Redis comes back empty, and the record must come from it, not from
	// before the outage.
	srv.Restart()
	waitLive(t, r)
	rec, err := r.Lookup(ctx, id, provider.OpenAI, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(rec.Ciphertext) != 0 {
		t.Fatal("after the restart the cache served the key stored before it")
	}
}

func TestCacheConcurrentWritesSettle(t *testing.T) {
	base, _, _ := newStore(t)
	ctx := context.Background()
	id := mailbox.ID("cache-race")
	a := cachedReplica(t, base, MaxCacheTTL)
	b := cachedReplica(t, base, MaxCacheTTL)

	// Readers on both replicas race 50 revocations. Whatever they cached
	// along the way, both must serve the last generation soon after.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, s := range []*Store{a, b, a, b} {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := s.Lookup(ctx, id, provider.OpenAI, 0); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	var last int64
	for range 50 {
		g, err := a.Revoke(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		last = g
	}
	close(stop)
	wg.Wait()
	for name, s := range map[string]*Store{"writer": a, "other": b} {
		if !waitFor(MaxCacheTTL/2, func() bool {
			rec, err := s.Lookup(ctx, id, provider.OpenAI, 0)
			return err == nil && rec.Generation == last
		}) {
			rec, _ := s.Lookup(ctx, id, provider.OpenAI, 0)
			t.Errorf("%s replica serves generation %d after the writes settled; want %d", name, rec.Generation, last)
		}
	}
}

func TestCacheOffWhenSubscribeRejected(t *testing.T) {
	srv := redistest.StartOwn(t)
	prefix := srv.Prefix(t)
	admin := srv.Client(t)
	ctx := context.Background()
	// A user that may use the keys but no pub/sub channel.
	err := admin.Do(ctx, "ACL", "SETUSER", "nochannels", "reset", "on", ">pw", "~"+prefix+"*",
		"resetchannels", "+@all").Err()
	if err != nil {
		t.Fatal(err)
	}
	opts := *admin.Options()
	opts.Username, opts.Password = "nochannels", "pw"
	rdb := redis.NewClient(&opts)
	t.Cleanup(func() { rdb.Close() })
	s, logged := watchLogged(t, rdb, prefix)

	if !waitFor(2*time.Second, func() bool { return strings.Contains(logged.String(), "subscribing to the changes channel failed") }) {
		t.Fatalf("no error logged for the rejected subscription; log: %s", logged.String())
	}
	if !strings.Contains(logged.String(), "allow the channel and PUBLISH and SUBSCRIBE") {
		t.Errorf("the error does not name the permissions to grant; log: %s", logged.String())
	}
	id := mailbox.ID("cache-refused")
	for want := int64(1); want <= 3; want++ {
		// The notice fails too, and the write must still succeed.
		if _, err := s.Revoke(ctx, id); err != nil {
			t.Fatalf("Revoke with PUBLISH rejected: %v", err)
		}
		rec, err := s.Lookup(ctx, id, provider.OpenAI, 0)
		if err != nil || rec.Generation != want {
			t.Fatalf("Lookup = %+v, %v; want generation %d read from Redis", rec, err, want)
		}
	}
	if s.cache.live.Load() {
		t.Error("the cache is on without a subscription")
	}
	if !strings.Contains(logged.String(), "publishing a mailbox change failed") {
		t.Errorf("failed notice not logged; log: %s", logged.String())
	}
}

// TestCacheOffWhileRedisUnreachable starts the watch with no Redis to
// reach. The warning names the cause, without the advice on permissions
// that a refused subscription gets.
func TestCacheOffWhileRedisUnreachable(t *testing.T) {
	rdb := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t)), MaxRetries: -1})
	t.Cleanup(func() { rdb.Close() })
	s, logged := watchLogged(t, rdb, "unreachable:")

	if !waitFor(2*time.Second, func() bool { return strings.Contains(logged.String(), "record cache off") }) {
		t.Fatalf("no warning logged for the unreachable Redis; log: %s", logged.String())
	}
	if !strings.Contains(logged.String(), "Redis unreachable") {
		t.Errorf("the warning does not name the unreachable Redis; log: %s", logged.String())
	}
	if strings.Contains(logged.String(), "PUBLISH and SUBSCRIBE") {
		t.Errorf("a connection error was logged as a refused subscription; log: %s", logged.String())
	}
	if s.cache.live.Load() {
		t.Error("the cache is on without a subscription")
	}
}

// watchLogged runs Watch for a cached store on rdb until the test ends,
// and returns the store and its log.
func watchLogged(t *testing.T, rdb *redis.Client, prefix string) (*Store, *syncBuffer) {
	t.Helper()
	ids, err := GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	s := New(rdb, prefix, ids)
	s.EnableCache(MaxCacheTTL)
	logged := &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		s.Watch(ctx, slog.New(slog.NewJSONHandler(logged, nil)))
		close(done)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return s, logged
}

// TestCacheAdviceAfterRedisReturns has the first two dials fail, as when
// the proxy starts before Redis, and then Redis deny the channel. The
// advice on permissions must follow the warning about the unreachable
// Redis.
func TestCacheAdviceAfterRedisReturns(t *testing.T) {
	srv := redistest.StartOwn(t)
	prefix := srv.Prefix(t)
	admin := srv.Client(t)
	err := admin.Do(context.Background(), "ACL", "SETUSER", "latechannels", "reset", "on", ">pw", "~"+prefix+"*",
		"resetchannels", "+@all").Err()
	if err != nil {
		t.Fatal(err)
	}
	opts := *admin.Options()
	opts.Username, opts.Password, opts.MaxRetries = "latechannels", "pw", -1
	var dials atomic.Int32
	addr := opts.Addr
	opts.Dialer = func(ctx context.Context, network, _ string) (net.Conn, error) {
		if dials.Add(1) <= 2 {
			return nil, &net.OpError{Op: "dial", Net: network, Err: errors.New("connection refused")}
		}
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	rdb := redis.NewClient(&opts)
	t.Cleanup(func() { rdb.Close() })
	_, logged := watchLogged(t, rdb, prefix)

	if !waitFor(3*time.Second, func() bool { return strings.Contains(logged.String(), "PUBLISH and SUBSCRIBE") }) {
		t.Errorf("no advice on permissions once Redis denied the channel; log: %s", logged.String())
	}
	if !strings.Contains(logged.String(), "Redis unreachable") {
		t.Errorf("no warning while Redis could not be reached; log: %s", logged.String())
	}
}

// TestCacheWrongPasswordNotPermissions checks that a wrong password is
// logged as such, not as a missing channel permission.
func TestCacheWrongPasswordNotPermissions(t *testing.T) {
	srv := redistest.StartOwn(t)
	opts := *srv.Client(t).Options()
	opts.Username, opts.Password = "nosuchuser", "wrong"
	rdb := redis.NewClient(&opts)
	t.Cleanup(func() { rdb.Close() })
	_, logged := watchLogged(t, rdb, srv.Prefix(t))

	if !waitFor(2*time.Second, func() bool { return strings.Contains(logged.String(), "record cache off") }) {
		t.Fatalf("nothing logged for the refused subscription; log: %s", logged.String())
	}
	if !strings.Contains(logged.String(), "check the Redis user and password") {
		t.Errorf("the error does not point at the credentials; log: %s", logged.String())
	}
	if strings.Contains(logged.String(), "PUBLISH and SUBSCRIBE") {
		t.Errorf("a wrong password was logged as a missing channel permission; log: %s", logged.String())
	}
}

// syncBuffer is a bytes.Buffer safe for a logger and a reader at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// afterHook runs a function after each command or pipeline a client sends.
type afterHook struct {
	cmd  func(redis.Cmder)
	pipe func([]redis.Cmder)
}

func (h afterHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h afterHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if h.cmd != nil {
			h.cmd(cmd)
		}
		return err
	}
}

func (h afterHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		if h.pipe != nil {
			h.pipe(cmds)
		}
		return err
	}
}

func TestCacheNoticeOutlivesCanceledCaller(t *testing.T) {
	base, srv, _ := newStore(t)
	ctx := context.Background()
	id := mailbox.ID("cache-cancel")
	other := cachedReplica(t, base, MaxCacheTTL)
	if _, err := other.Lookup(ctx, id, provider.OpenAI, 0); err != nil {
		t.Fatal(err)
	}

	// The admin client goes away right after the write reached Redis.
	reqCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	rdb := srv.Client(t)
	rdb.AddHook(afterHook{cmd: func(cmd redis.Cmder) {
		if cmd.Name() == "hincrby" {
			cancel()
		}
	}})
	writer := New(rdb, base.layout.Prefix, base.Identities())
	start := time.Now()
	gen, err := writer.Revoke(reqCtx, id)
	if err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	if !waitFor(MaxCacheTTL, func() bool {
		rec, err := other.Lookup(ctx, id, provider.OpenAI, 0)
		return err == nil && rec.Generation == gen
	}) {
		t.Fatalf("the other replica did not see the revocation within %v", MaxCacheTTL)
	}
	if took := time.Since(start); took > MaxCacheTTL/2 {
		t.Errorf("the other replica saw the revocation after %v; want it at the notice, which a canceled caller must not stop", took)
	}
}

func TestCacheTTLCountsFromTheRead(t *testing.T) {
	base, srv, _ := newStore(t)
	ctx := context.Background()
	id := mailbox.ID("cache-slow-read")

	// The reply to one read arrives late, as after a network delay or a
	// pause of the process.
	const delay = 700 * time.Millisecond
	var slow atomic.Bool
	answered := make(chan struct{}, 1)
	rdb := srv.Client(t)
	rdb.AddHook(afterHook{pipe: func(cmds []redis.Cmder) {
		if len(cmds) > 0 && cmds[0].Name() == "hmget" && slow.CompareAndSwap(true, false) {
			answered <- struct{}{}
			time.Sleep(delay)
		}
	}})
	r := New(rdb, base.layout.Prefix, base.Identities())
	r.EnableCache(MaxCacheTTL)
	startWatch(t, r)
	waitLive(t, r)

	slow.Store(true)
	lookedUp := make(chan struct{})
	go func() {
		defer close(lookedUp)
		r.Lookup(ctx, id, provider.OpenAI, 0)
	}()
	<-answered
	// A revocation right after Redis returned that read, whose notice is
	// lost, so only the TTL bounds it.
	if err := base.rdb.HIncrBy(ctx, base.layout.Mailbox(string(id)), fieldGeneration, 1).Err(); err != nil {
		t.Fatal(err)
	}
	changedAt := time.Now()
	<-lookedUp
	if !waitFor(2*MaxCacheTTL, func() bool {
		rec, err := r.Lookup(ctx, id, provider.OpenAI, 0)
		return err == nil && rec.Generation == 1
	}) {
		t.Fatal("the revocation was not seen within 2s")
	}
	if took := time.Since(changedAt); took > MaxCacheTTL+100*time.Millisecond {
		t.Errorf("the old generation was served %v after the revocation; want at most %v", took, MaxCacheTTL)
	}
}

func TestCacheBackOnAfterStall(t *testing.T) {
	srv := redistest.StartOwn(t)
	ids, err := GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	base := New(srv.Client(t), srv.Prefix(t), ids)
	r := cachedReplica(t, base, MaxCacheTTL)

	// Redis stops responding but keeps its connections, then recovers on
	// them. The cache must go off, and on again.
	srv.Pause()
	resumed := false
	defer func() {
		if !resumed {
			srv.Resume()
		}
	}()
	if !waitFor(5*time.Second, func() bool { return !r.cache.live.Load() }) {
		t.Fatal("the cache stayed on while Redis did not answer for 5s")
	}
	srv.Resume()
	resumed = true
	if !waitFor(5*time.Second, func() bool { return r.cache.live.Load() }) {
		t.Fatal("the cache did not come back on within 5s of Redis answering again")
	}
}
