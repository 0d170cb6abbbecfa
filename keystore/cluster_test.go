package keystore_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/provider"
)

// Keys in each provider's format. The second of each replaces the first in
// rotation checks.
var topologyKeys = map[string][2]string{
	provider.Anthropic: {"sk-ant-api03-clusterCLUSTERcluster0123456789abcdefghijA1b2", "sk-ant-api03-rotatedROTATEDrotated0123456789abcdefghijC3d4"},
	provider.OpenAI:    {"sk-proj-clusterCLUSTERcluster0123456789abcdE5f6", "sk-proj-rotatedROTATEDrotated0123456789abcdG7h8"},
	provider.Google:    {"AIzaClusterCLUSTERcluster0123456789I9j0", "AIzaRotatedROTATEDrotated0123456789K1l2"},
}

// topologyEnv is one running Redis deployment and how byokproxy names it.
type topologyEnv struct {
	redis   config.Redis
	prefix  string
	cluster *redistest.Cluster // nil unless a Redis Cluster
}

// topologies are the Redis deployments OpenRedis supports: one node named by
// redis.url, a Sentinel-watched master named by redis.addrs and
// redis.master_name, and a three-master Cluster named by redis.addrs.
var topologies = []struct {
	name     string
	start    func(t *testing.T) topologyEnv
	wantType string
}{
	{"single", func(t *testing.T) topologyEnv {
		srv := redistest.Start(t)
		return topologyEnv{redis: config.Redis{URL: srv.URL, Timeout: 2 * time.Second}, prefix: srv.Prefix(t)}
	}, "*redis.Client"},
	{"sentinel", func(t *testing.T) topologyEnv {
		s := redistest.StartSentinel(t)
		return topologyEnv{redis: config.Redis{Addrs: s.Addrs, MasterName: s.MasterName, Timeout: 2 * time.Second}, prefix: s.Prefix(t)}
	}, "*redis.Client"},
	{"cluster", func(t *testing.T) topologyEnv {
		c := redistest.StartCluster(t)
		return topologyEnv{redis: config.Redis{Addrs: c.Addrs, Timeout: 2 * time.Second}, prefix: c.Prefix(t), cluster: c}
	}, "*redis.ClusterClient"},
}

// openTopology opens the client byokproxy would use for env.
func openTopology(t *testing.T, env topologyEnv) redis.UniversalClient {
	t.Helper()
	rdb, err := keystore.OpenRedis(env.redis)
	if err != nil {
		t.Fatalf("OpenRedis: %v", err)
	}
	t.Cleanup(func() { rdb.Close() })
	return rdb
}

// spreadMailboxes returns n mailbox ids. On a Cluster they include at least
// one mailbox whose keys every master serves, so a suite over them runs on
// every node.
func spreadMailboxes(t *testing.T, env topologyEnv, n int) []mailbox.ID {
	t.Helper()
	layout := keystore.Layout{Prefix: env.prefix}
	var ids []mailbox.ID
	covered := map[int]bool{}
	for i := 0; i < 200 && (len(ids) < n || (env.cluster != nil && len(covered) < len(env.cluster.Addrs))); i++ {
		id := mailbox.ID(fmt.Sprintf("user-%d@example.com", i))
		if env.cluster == nil {
			ids = append(ids, id)
			continue
		}
		node := env.cluster.NodeOf(t, layout.Mailbox(string(id)))
		if covered[node] && len(ids) >= n {
			continue
		}
		covered[node] = true
		ids = append(ids, id)
	}
	if env.cluster != nil && len(covered) < len(env.cluster.Addrs) {
		t.Fatalf("200 mailbox ids cover %d of %d masters", len(covered), len(env.cluster.Addrs))
	}
	return ids
}

func TestStoreOnEveryTopology(t *testing.T) {
	for _, topo := range topologies {
		t.Run(topo.name, func(t *testing.T) {
			env := topo.start(t)
			rdb := openTopology(t, env)
			if got := fmt.Sprintf("%T", rdb); got != topo.wantType {
				t.Errorf("OpenRedis returned %s, want %s", got, topo.wantType)
			}
			ids, err := keystore.GenerateIdentities()
			if err != nil {
				t.Fatal(err)
			}
			store := keystore.New(rdb, env.prefix, ids)
			if err := store.Ping(context.Background()); err != nil {
				t.Fatalf("Ping: %v", err)
			}
			runStoreSuite(t, store, rdb, spreadMailboxes(t, env, 3))
			if err := store.CheckEviction(context.Background()); err != nil {
				t.Errorf("CheckEviction on servers without maxmemory: %v", err)
			}
			if env.cluster != nil {
				checkClusterEviction(t, store, env.cluster)
			}
		})
	}
}

// checkClusterEviction sets one master of c to evict and expects
// CheckEviction to name it, because each master holds its own mailboxes.
func checkClusterEviction(t *testing.T, store *keystore.Store, c *redistest.Cluster) {
	t.Helper()
	ctx := context.Background()
	addr := c.Addrs[len(c.Addrs)-1]
	node := redis.NewClient(&redis.Options{Addr: addr})
	defer node.Close()
	if err := node.ConfigSet(ctx, "maxmemory-policy", "volatile-lru").Err(); err != nil {
		t.Fatal(err)
	}
	if err := node.ConfigSet(ctx, "maxmemory", "512mb").Err(); err != nil {
		t.Fatal(err)
	}
	defer node.ConfigSet(ctx, "maxmemory", "0")
	err := store.CheckEviction(ctx)
	if !errors.Is(err, keystore.ErrEvicting) {
		t.Fatalf("CheckEviction with %s on volatile-lru: %v, want ErrEvicting", addr, err)
	}
	if !strings.Contains(err.Error(), addr) {
		t.Errorf("CheckEviction error %q does not name the node %s", err, addr)
	}
}

// runStoreSuite exercises every Store operation on each mailbox in ids. It
// needs at least two mailboxes, for the binding and ownership checks. The
// inspect client reads and changes stored data directly, as an operator
// could, and may have more rights than the store's client.
func runStoreSuite(t *testing.T, store *keystore.Store, inspect redis.UniversalClient, ids []mailbox.ID) {
	t.Helper()
	if len(ids) < 2 {
		t.Fatalf("runStoreSuite needs two mailboxes, got %d", len(ids))
	}
	for i, id := range ids {
		other := ids[(i+1)%len(ids)]
		t.Run(string(id), func(t *testing.T) {
			suiteFreshMailbox(t, store, id)
			suiteKeyLifecycle(t, store, id)
			suiteWrongBinding(t, store, inspect, id, other)
			suiteGenerations(t, store, id)
			suiteLimit(t, store, id)
			suiteUsage(t, store, inspect, id)
			suiteResponses(t, store, id, other)
			suiteDeleteMailbox(t, store, id)
		})
	}
}

func suiteFreshMailbox(t *testing.T, store *keystore.Store, id mailbox.ID) {
	t.Helper()
	ctx := context.Background()
	for _, p := range provider.Names {
		rec, err := store.Read(ctx, id, p)
		if err != nil {
			t.Fatalf("Read %s: %v", p, err)
		}
		if rec.Generation != 0 || rec.Source != keystore.SourceShared || rec.Ciphertext != nil || rec.Limit != nil || rec.UsedShared != 0 {
			t.Errorf("fresh %s record = %+v, want generation 0, shared, nothing stored", p, rec)
		}
	}
	all, err := store.Mailbox(ctx, id)
	if err != nil {
		t.Fatalf("Mailbox: %v", err)
	}
	for _, p := range provider.Names {
		if st := all[p]; st.Source != keystore.SourceShared || st.HasKey {
			t.Errorf("fresh %s status = %+v, want shared without key", p, st)
		}
	}
}

// suiteKeyLifecycle stores, selects, rotates and removes a key of every
// provider, reading it back after each step.
func suiteKeyLifecycle(t *testing.T, store *keystore.Store, id mailbox.ID) {
	t.Helper()
	ctx := context.Background()
	for _, p := range provider.Names {
		first, second := topologyKeys[p][0], topologyKeys[p][1]
		if _, err := store.SetSource(ctx, id, p, keystore.SourceBYOK); !errors.Is(err, keystore.ErrNoKey) {
			t.Errorf("%s: byok without a key: error %v, want ErrNoKey", p, err)
		}

		st, err := store.PutKey(ctx, id, p, []byte(first))
		if err != nil {
			t.Fatalf("%s: PutKey: %v", p, err)
		}
		if !st.HasKey || st.Last4 != first[len(first)-4:] || st.Source != keystore.SourceShared || st.UpdatedAt == nil {
			t.Errorf("%s: status after PutKey = %+v, want the key's last four, still shared", p, st)
		}
		suiteExpectKey(t, store, id, p, keystore.SourceShared, first)

		if st, err = store.SetSource(ctx, id, p, keystore.SourceBYOK); err != nil || st.Source != keystore.SourceBYOK {
			t.Fatalf("%s: SetSource byok: %+v, %v", p, st, err)
		}
		suiteExpectKey(t, store, id, p, keystore.SourceBYOK, first)

		if _, err := store.PutKey(ctx, id, p, []byte(second)); err != nil {
			t.Fatalf("%s: rotate: %v", p, err)
		}
		suiteExpectKey(t, store, id, p, keystore.SourceBYOK, second)

		if _, _, err := store.DeleteKey(ctx, id, p); err != nil {
			t.Fatalf("%s: DeleteKey: %v", p, err)
		}
		rec, err := store.Read(ctx, id, p)
		if err != nil {
			t.Fatalf("%s: Read after DeleteKey: %v", p, err)
		}
		if rec.Source != keystore.SourceShared || rec.Ciphertext != nil || rec.Last4 != "" {
			t.Errorf("%s: record after DeleteKey = source %s, %d ciphertext bytes, last4 %q; want shared and nothing stored",
				p, rec.Source, len(rec.Ciphertext), rec.Last4)
		}
		if _, err := store.Open(rec, id, p); !errors.Is(err, keystore.ErrNoKey) {
			t.Errorf("%s: Open after DeleteKey: %v, want ErrNoKey", p, err)
		}
	}
}

// suiteExpectKey checks that Read and Open return key with source.
func suiteExpectKey(t *testing.T, store *keystore.Store, id mailbox.ID, prov, source, key string) {
	t.Helper()
	rec, err := store.Read(context.Background(), id, prov)
	if err != nil {
		t.Fatalf("%s: Read: %v", prov, err)
	}
	if rec.Source != source {
		t.Errorf("%s: source %s, want %s", prov, rec.Source, source)
	}
	if rec.Last4 != key[len(key)-4:] {
		t.Errorf("%s: last4 %q, want %q", prov, rec.Last4, key[len(key)-4:])
	}
	if strings.Contains(string(rec.Ciphertext), key) {
		t.Errorf("%s: the stored ciphertext contains the plaintext key", prov)
	}
	secret, err := store.Open(rec, id, prov)
	if err != nil {
		t.Fatalf("%s: Open: %v", prov, err)
	}
	defer secret.Wipe()
	if string(secret.Bytes()) != key {
		t.Errorf("%s: Open returned a different key (last four %s), want last four %s", prov, secret.Last4(), key[len(key)-4:])
	}
}

// suiteWrongBinding copies id's stored ciphertext into other's hash, which
// may sit on another node, and expects Open to reject it.
func suiteWrongBinding(t *testing.T, store *keystore.Store, inspect redis.UniversalClient, id, other mailbox.ID) {
	t.Helper()
	ctx := context.Background()
	const p = provider.OpenAI
	if _, err := store.PutKey(ctx, id, p, []byte(topologyKeys[p][0])); err != nil {
		t.Fatalf("PutKey: %v", err)
	}
	rec, err := store.Read(ctx, id, p)
	if err != nil {
		t.Fatalf("Read: %v", err)
	}
	layout := store.Layout()
	if err := inspect.HSet(ctx, layout.Mailbox(string(other)), "ct:"+p, rec.Ciphertext).Err(); err != nil {
		t.Fatalf("copy ciphertext: %v", err)
	}
	copied, err := store.Read(ctx, other, p)
	if err != nil {
		t.Fatalf("Read copy: %v", err)
	}
	if _, err := store.Open(copied, other, p); !errors.Is(err, keystore.ErrWrongBinding) {
		t.Errorf("Open of a ciphertext copied to %s: %v, want ErrWrongBinding", other, err)
	}
	if _, err := store.Open(rec, id, provider.Anthropic); !errors.Is(err, keystore.ErrWrongBinding) {
		t.Errorf("Open of an openai ciphertext as anthropic: %v, want ErrWrongBinding", err)
	}
	for _, m := range []mailbox.ID{id, other} {
		if _, _, err := store.DeleteKey(ctx, m, p); err != nil {
			t.Fatalf("DeleteKey %s: %v", m, err)
		}
	}
}

func suiteGenerations(t *testing.T, store *keystore.Store, id mailbox.ID) {
	t.Helper()
	ctx := context.Background()
	before, err := store.Generation(ctx, id)
	if err != nil {
		t.Fatalf("Generation: %v", err)
	}
	for want := before + 1; want <= before+2; want++ {
		got, err := store.Revoke(ctx, id)
		if err != nil {
			t.Fatalf("Revoke: %v", err)
		}
		if got != want {
			t.Errorf("Revoke returned generation %d, want %d", got, want)
		}
		rec, err := store.Read(ctx, id, provider.Google)
		if err != nil {
			t.Fatalf("Read: %v", err)
		}
		if rec.Generation != want {
			t.Errorf("Read generation %d after Revoke, want %d", rec.Generation, want)
		}
	}
}

func suiteLimit(t *testing.T, store *keystore.Store, id mailbox.ID) {
	t.Helper()
	ctx := context.Background()
	for _, want := range []int64{100, 0} {
		if err := store.SetLimit(ctx, id, &want); err != nil {
			t.Fatalf("SetLimit %d: %v", want, err)
		}
		got, err := store.Limit(ctx, id)
		if err != nil || got == nil || *got != want {
			t.Errorf("Limit after SetLimit %d = %v, %v", want, got, err)
		}
		rec, err := store.Read(ctx, id, provider.OpenAI)
		if err != nil || rec.Limit == nil || *rec.Limit != want {
			t.Errorf("Read limit after SetLimit %d = %+v, %v", want, rec, err)
		}
	}
	if err := store.SetLimit(ctx, id, nil); err != nil {
		t.Fatalf("SetLimit nil: %v", err)
	}
	if got, err := store.Limit(ctx, id); err != nil || got != nil {
		t.Errorf("Limit after removing it = %v, %v, want nil", got, err)
	}
}

// suiteUsage applies usage increments through a pipeline, as the audit
// writer does, with one request sent twice.
func suiteUsage(t *testing.T, store *keystore.Store, inspect redis.UniversalClient, id mailbox.ID) {
	t.Helper()
	ctx := context.Background()
	now := time.Now()
	records := []keystore.UsageRecord{
		{RequestID: "req-shared-1", Mailbox: string(id), Provider: provider.OpenAI, Source: keystore.SourceShared, InputTokens: 3, OutputTokens: 4, Time: now},
		{RequestID: "req-shared-1", Mailbox: string(id), Provider: provider.OpenAI, Source: keystore.SourceShared, InputTokens: 3, OutputTokens: 4, Time: now},
		{RequestID: "req-shared-2", Mailbox: string(id), Provider: provider.Google, Source: keystore.SourceShared, InputTokens: 10, OutputTokens: 1, Time: now},
		{RequestID: "req-byok-1", Mailbox: string(id), Provider: provider.Anthropic, Source: keystore.SourceBYOK, InputTokens: 5, OutputTokens: 6, Time: now},
	}
	pipe := store.Client().Pipeline()
	for _, u := range records {
		store.Layout().QueueUsage(ctx, pipe, u, 13)
	}
	cmds, err := pipe.Exec(ctx)
	if err != nil {
		t.Fatalf("usage pipeline: %v", err)
	}
	applied := 0
	for _, c := range cmds {
		if n, _ := c.(*redis.Cmd).Int(); n == 1 {
			applied++
		}
	}
	if applied != 3 {
		t.Errorf("%d usage increments applied, want 3 (one request was sent twice)", applied)
	}

	got, err := store.Usage(ctx, id, keystore.Month(now))
	if err != nil {
		t.Fatalf("Usage: %v", err)
	}
	if got.SharedTotal != 18 {
		t.Errorf("shared total %d, want 3+4+10+1 = 18", got.SharedTotal)
	}
	want := map[string]map[string]keystore.Counts{
		provider.OpenAI:    {keystore.SourceShared: {Requests: 1, InputTokens: 3, OutputTokens: 4}},
		provider.Google:    {keystore.SourceShared: {Requests: 1, InputTokens: 10, OutputTokens: 1}},
		provider.Anthropic: {keystore.SourceBYOK: {Requests: 1, InputTokens: 5, OutputTokens: 6}},
	}
	if fmt.Sprint(got.Providers) != fmt.Sprint(want) {
		t.Errorf("usage = %v, want %v", got.Providers, want)
	}
	rec, err := store.Read(ctx, id, provider.Anthropic)
	if err != nil {
		t.Fatalf("Read: %v", err)
	}
	if rec.UsedShared != 18 {
		t.Errorf("Read UsedShared = %d, want 18", rec.UsedShared)
	}
	ttl, err := inspect.TTL(ctx, store.Layout().Usage(string(id), keystore.Month(now))).Result()
	if err != nil || ttl <= 0 {
		t.Errorf("usage counters have TTL %v (%v), want an expiry", ttl, err)
	}
}

func suiteResponses(t *testing.T, store *keystore.Store, id, other mailbox.ID) {
	t.Helper()
	ctx := context.Background()
	pipe := store.Client().Pipeline()
	store.Layout().QueueOwned(ctx, pipe, string(id), "resp_"+string(id), time.Now(), time.Hour)
	if _, err := pipe.Exec(ctx); err != nil {
		t.Fatalf("response pipeline: %v", err)
	}
	owns, err := store.Owns(ctx, id, "resp_"+string(id))
	if err != nil || !owns {
		t.Errorf("Owns of its own response = %v, %v, want true", owns, err)
	}
	if owns, err := store.Owns(ctx, other, "resp_"+string(id)); err != nil || owns {
		t.Errorf("Owns of another mailbox's response = %v, %v, want false", owns, err)
	}
	if owns, err := store.Owns(ctx, id, "resp_unknown"); err != nil || owns {
		t.Errorf("Owns of an unknown response = %v, %v, want false", owns, err)
	}
}

func suiteDeleteMailbox(t *testing.T, store *keystore.Store, id mailbox.ID) {
	t.Helper()
	ctx := context.Background()
	const p = provider.Anthropic
	if _, err := store.PutKey(ctx, id, p, []byte(topologyKeys[p][0])); err != nil {
		t.Fatalf("PutKey: %v", err)
	}
	if _, err := store.SetSource(ctx, id, p, keystore.SourceBYOK); err != nil {
		t.Fatalf("SetSource: %v", err)
	}
	limit := int64(5)
	if err := store.SetLimit(ctx, id, &limit); err != nil {
		t.Fatalf("SetLimit: %v", err)
	}
	genBefore, err := store.Generation(ctx, id)
	if err != nil {
		t.Fatalf("Generation: %v", err)
	}
	usageBefore, err := store.Usage(ctx, id, keystore.Month(time.Now()))
	if err != nil {
		t.Fatalf("Usage: %v", err)
	}

	if err := store.DeleteMailbox(ctx, id); err != nil {
		t.Fatalf("DeleteMailbox: %v", err)
	}
	rec, err := store.Read(ctx, id, p)
	if err != nil {
		t.Fatalf("Read: %v", err)
	}
	if rec.Source != keystore.SourceShared || rec.Ciphertext != nil || rec.Limit != nil {
		t.Errorf("record after DeleteMailbox = %+v, want shared with nothing stored", rec)
	}
	if rec.Generation != genBefore+1 {
		t.Errorf("generation after DeleteMailbox = %d, want %d", rec.Generation, genBefore+1)
	}
	if owns, err := store.Owns(ctx, id, "resp_"+string(id)); err != nil || owns {
		t.Errorf("Owns after DeleteMailbox = %v, %v, want false", owns, err)
	}
	usageAfter, err := store.Usage(ctx, id, keystore.Month(time.Now()))
	if err != nil {
		t.Fatalf("Usage: %v", err)
	}
	if usageAfter.SharedTotal != usageBefore.SharedTotal || usageAfter.SharedTotal == 0 {
		t.Errorf("shared usage after DeleteMailbox = %d, want the %d kept", usageAfter.SharedTotal, usageBefore.SharedTotal)
	}
}

// TestClusterMailboxKeysShareSlot proves on a real Cluster that every key of
// one mailbox hashes to one slot, and that the Cluster does reject a script
// whose keys are in different slots, so the suite above is not passing by
// accident.
func TestClusterMailboxKeysShareSlot(t *testing.T) {
	c := redistest.StartCluster(t)
	env := topologyEnv{prefix: c.Prefix(t), cluster: c}
	rdb := c.Client(t)
	layout := keystore.Layout{Prefix: env.prefix}
	ctx := context.Background()
	ids := spreadMailboxes(t, env, 3)

	nodeOf := map[mailbox.ID]int{}
	for _, id := range ids {
		m := string(id)
		keys := []string{
			layout.Mailbox(m),
			layout.Usage(m, "2026-01"),
			layout.Usage(m, keystore.Month(time.Now())),
			layout.Seen(m, "req-0123456789abcdef"),
			layout.Owned(m),
		}
		want, err := rdb.ClusterKeySlot(ctx, keys[0]).Result()
		if err != nil {
			t.Fatalf("CLUSTER KEYSLOT: %v", err)
		}
		for _, k := range keys[1:] {
			got, err := rdb.ClusterKeySlot(ctx, k).Result()
			if err != nil {
				t.Fatalf("CLUSTER KEYSLOT: %v", err)
			}
			if got != want {
				t.Errorf("%s is in slot %d, %s in slot %d", k, got, keys[0], want)
			}
		}
		nodeOf[id] = c.NodeOf(t, keys[0])
	}

	var a, b mailbox.ID
	for _, x := range ids {
		for _, y := range ids {
			if nodeOf[x] != nodeOf[y] {
				a, b = x, y
			}
		}
	}
	if a == "" {
		t.Fatal("no two mailboxes on different masters")
	}
	err := rdb.Eval(ctx, "return redis.call('HLEN', KEYS[1]) + redis.call('HLEN', KEYS[2])",
		[]string{layout.Mailbox(string(a)), layout.Mailbox(string(b))}).Err()
	if err == nil || !strings.Contains(err.Error(), "CROSSSLOT") {
		t.Errorf("script over two mailboxes on different masters: error %v, want CROSSSLOT", err)
	}
}

// TestClusterOneSeedAddress covers redis.addrs naming one node of a Cluster,
// such as a Service or a managed configuration endpoint in front of it.
func TestClusterOneSeedAddress(t *testing.T) {
	c := redistest.StartCluster(t)
	env := topologyEnv{redis: config.Redis{Addrs: c.Addrs[:1], Timeout: 2 * time.Second}, prefix: c.Prefix(t), cluster: c}
	rdb := openTopology(t, env)
	if _, ok := rdb.(*redis.ClusterClient); !ok {
		t.Fatalf("OpenRedis with one address in redis.addrs and no master_name returned %T, want *redis.ClusterClient", rdb)
	}
	ids, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	runStoreSuite(t, keystore.New(rdb, env.prefix, ids), rdb, spreadMailboxes(t, env, 3))
}

// TestSentinelFailoverKeepsStore fails the master over to its replica and
// expects the same client to find the new master and read what was written
// before.
func TestSentinelFailoverKeepsStore(t *testing.T) {
	s := redistest.StartSentinel(t)
	env := topologyEnv{redis: config.Redis{Addrs: s.Addrs, MasterName: s.MasterName, Timeout: time.Second}, prefix: s.Prefix(t)}
	rdb := openTopology(t, env)
	ids, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	store := keystore.New(rdb, env.prefix, ids)
	ctx := context.Background()
	const id, p = mailbox.ID("failover@example.com"), provider.OpenAI
	if _, err := store.PutKey(ctx, id, p, []byte(topologyKeys[p][0])); err != nil {
		t.Fatalf("PutKey: %v", err)
	}
	if _, err := store.SetSource(ctx, id, p, keystore.SourceBYOK); err != nil {
		t.Fatalf("SetSource: %v", err)
	}

	s.FailOver()

	// The client learns of the new master from the Sentinel; until then
	// calls fail, as requests do with 503. The loop is bounded.
	var lastErr error
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if _, lastErr = store.Revoke(ctx, id); lastErr == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if lastErr != nil {
		t.Fatalf("no write through the Sentinel client 15s after the failover: %v", lastErr)
	}
	if got := s.CurrentMaster(t); got != s.ReplicaAddr {
		t.Errorf("Sentinel names %s as master, want the former replica %s", got, s.ReplicaAddr)
	}
	suiteExpectKey(t, store, id, p, keystore.SourceBYOK, topologyKeys[p][0])
	if gen, err := store.Generation(ctx, id); err != nil || gen != 1 {
		t.Errorf("generation after failover and one revoke = %d, %v, want 1", gen, err)
	}
}

// TestRewrapAcrossClusterMasters rewraps keys stored on every master of a Cluster.
func TestRewrapAcrossClusterMasters(t *testing.T) {
	c := redistest.StartCluster(t)
	env := topologyEnv{redis: config.Redis{Addrs: c.Addrs, Timeout: 2 * time.Second}, prefix: c.Prefix(t), cluster: c}
	rdb := openTopology(t, env)
	oldIDs, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	mailboxes := spreadMailboxes(t, env, 3)
	old := keystore.New(rdb, env.prefix, oldIDs)
	for _, id := range mailboxes {
		if _, err := old.PutKey(ctx, id, provider.Google, []byte(topologyKeys[provider.Google][0])); err != nil {
			t.Fatalf("PutKey: %v", err)
		}
	}

	// The new identity comes first and the old one stays for decryption.
	fresh, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	both, err := keystore.ParseIdentities(strings.NewReader(fresh.SecretText() + "\n" + oldIDs.SecretText() + "\n"))
	if err != nil {
		t.Fatalf("ParseIdentities: %v", err)
	}
	stats, err := keystore.New(rdb, env.prefix, both).Rewrap(ctx, keystore.RewrapOptions{Checkpoint: true})
	if err != nil {
		t.Fatalf("Rewrap: %v", err)
	}
	if stats.Rewrapped != int64(len(mailboxes)) || stats.Failed != 0 {
		t.Errorf("Rewrap stats %+v, want %d rewrapped and none failed", stats, len(mailboxes))
	}
	onlyFresh := keystore.New(rdb, env.prefix, fresh)
	for _, id := range mailboxes {
		suiteExpectKey(t, onlyFresh, id, provider.Google, keystore.SourceShared, topologyKeys[provider.Google][0])
	}
}

// TestRedisACLUser runs the store and rewrap checks as an ACL user limited to
// the key prefix and redistest.ProxyACLCommands, with the password read from
// redis.password_file through config.Load.
func TestRedisACLUser(t *testing.T) {
	// go-redis logs, rather than returns, some failures, such as a COMMAND
	// the cluster client could not run.
	logs := &redisLog{}
	redis.SetLogger(logs)
	for _, topo := range []string{"single", "cluster"} {
		t.Run(topo, func(t *testing.T) {
			logs.reset()
			var env topologyEnv
			var nodes []string
			var inspect redis.UniversalClient
			if topo == "single" {
				srv := redistest.StartOwn(t)
				env = topologyEnv{prefix: srv.Prefix(t)}
				env.redis.URL = srv.URL
				nodes = []string{strings.TrimPrefix(srv.URL, "redis://")}
				inspect = srv.Client(t)
			} else {
				c := redistest.StartCluster(t)
				env = topologyEnv{prefix: c.Prefix(t), cluster: c}
				env.redis.Addrs = c.Addrs
				nodes = c.Addrs
				inspect = c.Client(t)
			}
			const user, password = "byokproxy", "acl-password-for-tests-0123456789"
			redistest.AddProxyUser(t, nodes, user, password, env.prefix)

			cfg := loadACLConfig(t, env.redis, user, password)
			if cfg.Redis.Password != password {
				t.Fatalf("redis.password_file was not read into redis.password")
			}
			env.redis = cfg.Redis
			rdb := openTopology(t, env)
			ids, err := keystore.GenerateIdentities()
			if err != nil {
				t.Fatal(err)
			}
			store := keystore.New(rdb, env.prefix, ids)
			if err := store.Ping(context.Background()); err != nil {
				t.Errorf("Ping as the ACL user: %v", err)
			}
			runStoreSuite(t, store, inspect, spreadMailboxes(t, env, 2))
			audit := &redis.XAddArgs{Stream: store.Layout().Audit(), MaxLen: 1000, Approx: true, Values: []any{"event", "{}"}}
			if err := rdb.XAdd(context.Background(), audit).Err(); err != nil {
				t.Errorf("XADD to the audit stream as the ACL user: %v", err)
			}
			if _, err := store.Rewrap(context.Background(), keystore.RewrapOptions{Checkpoint: true}); err != nil {
				t.Errorf("Rewrap as the ACL user: %v", err)
			}
			if err := rdb.Set(context.Background(), "outside-the-prefix", "x", time.Minute).Err(); err == nil || !strings.Contains(err.Error(), "NOPERM") {
				t.Errorf("write outside the prefix: %v, want NOPERM", err)
			}

			for _, line := range logs.all() {
				if strings.Contains(line, "NOPERM") {
					t.Errorf("go-redis logged a permission error: %s", line)
				}
			}

			env.redis.Password = "wrong-password"
			wrong := openTopology(t, env)
			if err := wrong.Ping(context.Background()).Err(); err == nil {
				t.Error("Ping with a wrong password succeeded")
			}
		})
	}
}

// redisLog records go-redis's log lines and copies them to the standard
// logger, as go-redis does by default.
// NOTE: go-redis has no way to restore the previous logger, so it stays set
// for the rest of the package's tests.
type redisLog struct {
	mu    sync.Mutex
	lines []string
}

func (l *redisLog) Printf(_ context.Context, format string, v ...any) {
	line := fmt.Sprintf(format, v...)
	l.mu.Lock()
	l.lines = append(l.lines, line)
	l.mu.Unlock()
	log.Print("redis: " + line)
}

func (l *redisLog) reset() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = nil
}

func (l *redisLog) all() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.lines)
}

// loadACLConfig runs config.Load with the Redis settings of base, the user
// name and a password file, plus the other settings it requires, all from
// environment variables.
func loadACLConfig(t *testing.T, base config.Redis, user, password string) *config.Config {
	t.Helper()
	dir := t.TempDir()
	ids, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	identityFile := filepath.Join(dir, "identity.txt")
	passwordFile := filepath.Join(dir, "redis-password")
	if err := os.WriteFile(identityFile, []byte(ids.SecretText()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(passwordFile, []byte(password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	env := []string{
		"BYOKPROXY_ADMIN_TOKEN=admin-token-for-tests-0123456789",
		"BYOKPROXY_AUTH_TOKEN_SECRETS=token-secret-for-tests-0123456789",
		"BYOKPROXY_KEYSTORE_IDENTITY_FILE=" + identityFile,
		"BYOKPROXY_REDIS_USERNAME=" + user,
		"BYOKPROXY_REDIS_PASSWORD_FILE=" + passwordFile,
		"BYOKPROXY_REDIS_TIMEOUT=2s",
	}
	if base.URL != "" {
		env = append(env, "BYOKPROXY_REDIS_URL="+base.URL)
	}
	if len(base.Addrs) > 0 {
		env = append(env, "BYOKPROXY_REDIS_ADDRS="+strings.Join(base.Addrs, ","))
	}

	cfg, err := config.Load(nil, env)
	if err != nil {
		t.Fatalf("config.Load: %v", err)
	}
	return cfg
}
