package keystore_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"filippo.io/age"
	"filippo.io/age/armor"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/audit"
	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/internal/upstreamtest"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/metrics"
	"github.com/byokproxy/byokproxy/provider"
	"github.com/byokproxy/byokproxy/proxy"
)

func openaiKey(t testing.TB) string {
	t.Helper()
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 40)
	if _, err := rand.Read(b); err != nil {
		t.Fatalf("random: %v", err)
	}
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return "sk-proj-" + string(b)
}

// rotation is an old identity, a new one, and the identity file text of a
// rotation in progress: the new identity first, the old one after it.
type rotation struct {
	oldIDs, newIDs, both *keystore.Identities
	newX25519            *age.X25519Identity
}

func newRotation(t *testing.T) rotation {
	t.Helper()
	oldIDs, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatalf("GenerateIdentities: %v", err)
	}
	newIDs, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatalf("GenerateIdentities: %v", err)
	}
	both, err := keystore.ParseIdentities(strings.NewReader(newIDs.SecretText() + oldIDs.SecretText()))
	if err != nil {
		t.Fatalf("ParseIdentities: %v", err)
	}
	x, err := age.ParseX25519Identity(strings.TrimSpace(newIDs.SecretText()))
	if err != nil {
		t.Fatalf("ParseX25519Identity: %v", err)
	}
	return rotation{oldIDs: oldIDs, newIDs: newIDs, both: both, newX25519: x}
}

// openWithNewOnly decrypts a stored ciphertext with the new identity alone
// and returns the payload.
func (r rotation) openWithNewOnly(ct string) (string, error) {
	pr, err := age.Decrypt(strings.NewReader(ct), r.newX25519)
	if err != nil {
		return "", err
	}
	payload, err := io.ReadAll(pr)
	return string(payload), err
}

// boundPayload returns the payload of key bound to mailbox m and provider
// prov by the new identity.
func (r rotation) boundPayload(m, prov, key string) string {
	return string(r.newIDs.Bind([]byte(key), mailbox.ID(m), prov))
}

// encryptBare returns the age ciphertext of a bare key, the payload format
// written before keys were bound to their mailbox and provider.
func encryptBare(t *testing.T, recipient *age.X25519Recipient, key string, armored bool) string {
	t.Helper()
	var out bytes.Buffer
	var dst io.Writer = &out
	var aw io.WriteCloser
	if armored {
		aw = armor.NewWriter(&out)
		dst = aw
	}
	w, err := age.Encrypt(dst, recipient)
	if err != nil {
		t.Fatalf("age.Encrypt: %v", err)
	}
	io.WriteString(w, key+"\n")
	if err := w.Close(); err != nil {
		t.Fatalf("close age writer: %v", err)
	}
	if aw != nil {
		if err := aw.Close(); err != nil {
			t.Fatalf("close armor writer: %v", err)
		}
	}
	return out.String()
}

// putKeys stores one OpenAI key per mailbox m0..m(n-1) with store, selects
// byok, and returns the keys by mailbox.
func putKeys(t *testing.T, store *keystore.Store, n int) map[string]string {
	t.Helper()
	ctx := context.Background()
	keys := map[string]string{}
	for i := range n {
		m := "m" + strconv.Itoa(i)
		key := openaiKey(t)
		if _, err := store.PutKey(ctx, mailbox.ID(m), provider.OpenAI, []byte(key)); err != nil {
			t.Fatalf("PutKey %s: %v", m, err)
		}
		if _, err := store.SetSource(ctx, mailbox.ID(m), provider.OpenAI, keystore.SourceBYOK); err != nil {
			t.Fatalf("SetSource %s: %v", m, err)
		}
		keys[m] = key
	}
	return keys
}

func ciphertext(t *testing.T, rdb redis.Cmdable, store *keystore.Store, m string) string {
	t.Helper()
	ct, err := rdb.HGet(context.Background(), store.Layout().Mailbox(m), "ct:openai").Result()
	if err != nil {
		t.Fatalf("HGET ct:openai of %s: %v", m, err)
	}
	return ct
}

// servingProxy runs the proxy handler on store against an OpenAI emulator
// that accepts keys, and returns its URL and the token signer.
func servingProxy(t *testing.T, rdb redis.UniversalClient, store *keystore.Store, keys []string) (string, *mailbox.Signer) {
	t.Helper()
	upstream := upstreamtest.NewOpenAI(keys...)
	t.Cleanup(upstream.Close)
	cfg := config.Defaults()
	cfg.Providers[provider.OpenAI].Upstream = upstream.URL

	signer, err := mailbox.NewSigner([]string{"rewrap-test-token-secret-0123456789"})
	if err != nil {
		t.Fatalf("NewSigner: %v", err)
	}
	writer := audit.NewWriter(rdb, store.Layout(), audit.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	go writer.Run(ctx)
	t.Cleanup(func() {
		closeCtx, done := context.WithTimeout(context.Background(), 5*time.Second)
		defer done()
		writer.Close(closeCtx)
		cancel()
	})
	handler, err := proxy.New(proxy.Options{
		Config: cfg, Store: store, Signer: signer, Audit: writer,
		Metrics: metrics.New(prometheus.NewRegistry()),
	})
	if err != nil {
		t.Fatalf("proxy.New: %v", err)
	}
	srv := httptest.NewServer(handler)
	t.Cleanup(srv.Close)
	return srv.URL, signer
}

func chat(client *http.Client, base, token string) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/openai/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

func TestRewrapWhileServing(t *testing.T) {
	rs := redistest.Start(t)
	prefix := rs.Prefix(t)
	rdb := rs.Client(t)
	ctx := context.Background()
	rot := newRotation(t)

	oldStore := keystore.New(rdb, prefix, rot.oldIDs)
	const bound = 80
	keys := putKeys(t, oldStore, bound)

	// Legacy payloads: the bare key, binary and armored, with no last four
	// stored.
	legacy := map[string]string{}
	for i := range 6 {
		m := "legacy" + strconv.Itoa(i)
		key := openaiKey(t)
		legacy[m] = key
		ct := encryptBare(t, rot.oldIDs.Recipient(), key, i%2 == 1)
		if err := rdb.HSet(ctx, oldStore.Layout().Mailbox(m), "ct:openai", ct, "src:openai", "byok").Err(); err != nil {
			t.Fatalf("HSET legacy: %v", err)
		}
	}
	// A ciphertext copied from another mailbox, and one that no identity
	// opens: both must be left exactly as they are.
	copied := ciphertext(t, rdb, oldStore, "m0")
	stranger, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatalf("GenerateIdentities: %v", err)
	}
	foreign := encryptBare(t, stranger.Recipient(), openaiKey(t), false)
	rdb.HSet(ctx, oldStore.Layout().Mailbox("copied"), "ct:openai", copied, "src:openai", "byok")
	rdb.HSet(ctx, oldStore.Layout().Mailbox("foreign"), "ct:openai", foreign, "src:openai", "byok")

	var allKeys []string
	for _, k := range keys {
		allKeys = append(allKeys, k)
	}
	for _, k := range legacy {
		allKeys = append(allKeys, k)
	}
	// The serving proxy was reloaded with the new identity in front, as the
	// rotation procedure requires before a rewrap.
	serving := keystore.New(rdb, prefix, rot.both)
	base, signer := servingProxy(t, rdb, serving, allKeys)
	tokens := make([]string, 0, bound)
	for i := range bound {
		tokens = append(tokens, signer.Issue(mailbox.ID("m"+strconv.Itoa(i)), 0))
	}

	// Requests run through the byok path until the rewrap is done and some
	// more have completed after it.
	var sent, failed atomic.Int64
	var firstFailure atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	client := &http.Client{}
	deadline := time.Now().Add(60 * time.Second)
	for w := range 4 {
		wg.Go(func() {
			for i := w; i < 20000 && time.Now().Before(deadline); i++ {
				select {
				case <-stop:
					return
				default:
				}
				status, err := chat(client, base, tokens[i%bound])
				sent.Add(1)
				if err != nil || status != http.StatusOK {
					failed.Add(1)
					firstFailure.CompareAndSwap(nil, fmt.Sprintf("status %d, error %v", status, err))
				}
			}
		})
	}
	waitFor(t, func() bool { return sent.Load() >= 40 }, "40 requests before the rewrap")

	before := sent.Load()
	rewrapper := keystore.New(rdb, prefix, rot.both)
	var progressCalls atomic.Int64
	stats, err := rewrapper.Rewrap(ctx, keystore.RewrapOptions{
		Count: 10, ProgressEvery: 10, TagUntagged: true,
		Progress: func(keystore.RewrapStats) { progressCalls.Add(1) },
	})
	during := sent.Load() - before
	waitFor(t, func() bool { return sent.Load() >= before+during+40 }, "40 requests after the rewrap")
	close(stop)
	wg.Wait()

	if err != nil {
		t.Fatalf("Rewrap: %v", err)
	}
	if n := failed.Load(); n != 0 {
		t.Errorf("%d of %d requests failed during the rewrap; first: %v", n, sent.Load(), firstFailure.Load())
	}
	if during == 0 {
		t.Errorf("no request completed while the rewrap ran")
	}
	t.Logf("requests: %d in total, %d while the rewrap ran", sent.Load(), during)
	want := keystore.RewrapStats{Mailboxes: bound + 6 + 2, Rewrapped: bound + 6, Failed: 2}
	if stats != want {
		t.Errorf("stats = %+v, want %+v", stats, want)
	}
	if progressCalls.Load() == 0 {
		t.Errorf("Progress was never called")
	}

	for m, key := range keys {
		payload, err := rot.openWithNewOnly(ciphertext(t, rdb, oldStore, m))
		if err != nil {
			t.Errorf("%s does not decrypt with the new identity alone: %v", m, err)
		} else if payload != rot.boundPayload(m, provider.OpenAI, key) {
			t.Errorf("%s payload is not the key bound to its mailbox and provider", m)
		}
	}
	for m, key := range legacy {
		payload, err := rot.openWithNewOnly(ciphertext(t, rdb, oldStore, m))
		if err != nil {
			t.Errorf("legacy %s does not decrypt with the new identity alone: %v", m, err)
			continue
		}
		if payload != rot.boundPayload(m, provider.OpenAI, key) {
			t.Errorf("legacy %s was not rewritten with the binding", m)
		}
		if last4 := rdb.HGet(ctx, oldStore.Layout().Mailbox(m), "last4:openai").Val(); last4 != key[len(key)-4:] {
			t.Errorf("legacy %s last4 = %q, want %q", m, last4, key[len(key)-4:])
		}
		if status, err := chat(client, base, signer.Issue(mailbox.ID(m), 0)); err != nil || status != http.StatusOK {
			t.Errorf("request with rewrapped legacy key of %s: status %d, %v", m, status, err)
		}
	}
	if got := ciphertext(t, rdb, oldStore, "copied"); got != copied {
		t.Errorf("a ciphertext bound to another mailbox was rewritten")
	}
	if got := ciphertext(t, rdb, oldStore, "foreign"); got != foreign {
		t.Errorf("a ciphertext no identity opens was rewritten")
	}

	// A second run finds nothing to do.
	again, err := rewrapper.Rewrap(ctx, keystore.RewrapOptions{})
	if err != nil {
		t.Fatalf("second Rewrap: %v", err)
	}
	if want := (keystore.RewrapStats{Mailboxes: bound + 8, Current: bound + 6, Failed: 2}); again != want {
		t.Errorf("second run stats = %+v, want %+v", again, want)
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestRewrapResumesAfterInterruption(t *testing.T) {
	rs := redistest.Start(t)
	prefix := rs.Prefix(t)
	rdb := rs.Client(t)
	rot := newRotation(t)
	const total = 150
	keys := putKeys(t, keystore.New(rdb, prefix, rot.oldIDs), total)

	store := keystore.New(rdb, prefix, rot.both)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	first, err := store.Rewrap(ctx, keystore.RewrapOptions{
		Count: 10, Checkpoint: true, ProgressEvery: 40,
		Progress: func(keystore.RewrapStats) { cancel() },
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted Rewrap error = %v, want context.Canceled", err)
	}
	if first.Rewrapped < 40 || first.Rewrapped >= total {
		t.Fatalf("interrupted run rewrapped %d keys, want at least 40 and fewer than %d", first.Rewrapped, total)
	}
	checkpoint := rdb.HGetAll(context.Background(), store.Layout().RewrapCheckpoint()).Val()
	if checkpoint["recipient"] != rot.newIDs.Recipient().String() || len(checkpoint) < 2 {
		t.Fatalf("checkpoint after the interruption = %v, want the recipient and a cursor", checkpoint)
	}

	second, err := store.Rewrap(context.Background(), keystore.RewrapOptions{Count: 10, Checkpoint: true})
	if err != nil {
		t.Fatalf("resumed Rewrap: %v", err)
	}
	if got := first.Rewrapped + second.Rewrapped; got != total {
		t.Errorf("rewrapped %d + %d keys, want %d in total", first.Rewrapped, second.Rewrapped, total)
	}
	if second.Keys() >= total {
		t.Errorf("resumed run examined %d keys, want fewer than %d because it starts at the checkpoint", second.Keys(), total)
	}
	if second.Failed != 0 || second.Skipped != 0 {
		t.Errorf("resumed run stats %+v, want no failures or skips", second)
	}
	if n := rdb.Exists(context.Background(), store.Layout().RewrapCheckpoint()).Val(); n != 0 {
		t.Errorf("checkpoint still present after a completed run")
	}
	for m, key := range keys {
		payload, err := rot.openWithNewOnly(ciphertext(t, rdb, store, m))
		if err != nil || payload != rot.boundPayload(m, provider.OpenAI, key) {
			t.Errorf("%s after the resumed rewrap: %v", m, err)
		}
	}
}

func TestRewrapCheckpointOfOtherRecipientIgnored(t *testing.T) {
	rs := redistest.Start(t)
	prefix := rs.Prefix(t)
	rdb := rs.Client(t)
	rot := newRotation(t)
	putKeys(t, keystore.New(rdb, prefix, rot.oldIDs), 30)
	store := keystore.New(rdb, prefix, rot.both)

	// A checkpoint that claims the scan is done, left by a rewrap to some
	// other recipient, must not make this run skip anything.
	rdb.HSet(context.Background(), store.Layout().RewrapCheckpoint(),
		"recipient", rot.oldIDs.Recipient().String(), "cursor:default", "done")
	stats, err := store.Rewrap(context.Background(), keystore.RewrapOptions{Checkpoint: true})
	if err != nil {
		t.Fatalf("Rewrap: %v", err)
	}
	if stats.Rewrapped != 30 {
		t.Errorf("rewrapped %d, want 30", stats.Rewrapped)
	}

	// With the right recipient, a finished checkpoint is honoured unless
	// Restart is set.
	putKeys(t, keystore.New(rdb, prefix, rot.oldIDs), 5)
	rdb.HSet(context.Background(), store.Layout().RewrapCheckpoint(),
		"recipient", rot.newIDs.Recipient().String(), "cursor:default", "done")
	stats, err = store.Rewrap(context.Background(), keystore.RewrapOptions{Checkpoint: true})
	if err != nil || stats.Keys() != 0 {
		t.Errorf("run over a finished checkpoint: %+v, %v; want nothing examined", stats, err)
	}
	rdb.HSet(context.Background(), store.Layout().RewrapCheckpoint(),
		"recipient", rot.newIDs.Recipient().String(), "cursor:default", "done")
	stats, err = store.Rewrap(context.Background(), keystore.RewrapOptions{Checkpoint: true, Restart: true})
	if err != nil || stats.Rewrapped != 5 || stats.Current != 25 {
		t.Errorf("run with Restart: %+v, %v; want 5 rewrapped and 25 current", stats, err)
	}
}

func TestReplaceCiphertextKeepsNewerKey(t *testing.T) {
	rs := redistest.Start(t)
	prefix := rs.Prefix(t)
	rdb := rs.Client(t)
	ctx := context.Background()
	ids, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatalf("GenerateIdentities: %v", err)
	}
	store := keystore.New(rdb, prefix, ids)

	if _, err := store.PutKey(ctx, "nora", provider.OpenAI, []byte(openaiKey(t))); err != nil {
		t.Fatalf("PutKey: %v", err)
	}
	read := ciphertext(t, rdb, store, "nora")
	rotated := openaiKey(t)
	if _, err := store.PutKey(ctx, "nora", provider.OpenAI, []byte(rotated)); err != nil {
		t.Fatalf("PutKey: %v", err)
	}
	current := ciphertext(t, rdb, store, "nora")

	replaced, err := store.ReplaceCiphertext(ctx, "nora", provider.OpenAI, []byte(read), []byte("stale"), "xxxx")
	if err != nil {
		t.Fatalf("ReplaceCiphertext: %v", err)
	}
	if replaced {
		t.Error("ReplaceCiphertext replaced a ciphertext that changed since it was read")
	}
	if got := ciphertext(t, rdb, store, "nora"); got != current {
		t.Error("the rotated key was overwritten")
	}
	if last4 := rdb.HGet(ctx, store.Layout().Mailbox("nora"), "last4:openai").Val(); last4 != rotated[len(rotated)-4:] {
		t.Errorf("last4 = %q, want the rotated key's", last4)
	}

	replaced, err = store.ReplaceCiphertext(ctx, "nora", provider.OpenAI, []byte(current), []byte("next"), "xxxx")
	if err != nil || !replaced {
		t.Errorf("ReplaceCiphertext of the current value = %v, %v; want true", replaced, err)
	}
	if last4 := rdb.HGet(ctx, store.Layout().Mailbox("nora"), "last4:openai").Val(); last4 != rotated[len(rotated)-4:] {
		t.Errorf("an existing last4 was overwritten with %q", last4)
	}
	replaced, err = store.ReplaceCiphertext(ctx, "nobody", provider.OpenAI, []byte(current), []byte("next"), "xxxx")
	if err != nil || replaced {
		t.Errorf("ReplaceCiphertext on a missing mailbox = %v, %v; want false", replaced, err)
	}
	if n := rdb.Exists(ctx, store.Layout().Mailbox("nobody")).Val(); n != 0 {
		t.Error("ReplaceCiphertext created a mailbox")
	}
}

func TestRewrapDuringKeyRotation(t *testing.T) {
	rs := redistest.Start(t)
	prefix := rs.Prefix(t)
	rdb := rs.Client(t)
	rot := newRotation(t)
	const n = 60
	keys := putKeys(t, keystore.New(rdb, prefix, rot.oldIDs), n)

	// Keys are rotated through a store with the new identity in front, as
	// the admin API of a reloaded replica does, while the rewrap runs.
	admin := keystore.New(rdb, prefix, rot.both)
	var mu sync.Mutex
	done := make(chan struct{})
	rotations := make(chan error, 1)
	go func() {
		var err error
		defer func() { rotations <- err }()
		for i := 0; i < 2000; i++ {
			select {
			case <-done:
				return
			default:
			}
			m := "m" + strconv.Itoa(i%n)
			key := openaiKey(t)
			mu.Lock()
			if _, err = admin.PutKey(context.Background(), mailbox.ID(m), provider.OpenAI, []byte(key)); err == nil {
				keys[m] = key
			}
			mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	stats, err := keystore.New(rdb, prefix, rot.both).Rewrap(context.Background(), keystore.RewrapOptions{Count: 5})
	close(done)
	if rerr := <-rotations; rerr != nil {
		t.Fatalf("PutKey during the rewrap: %v", rerr)
	}
	if err != nil {
		t.Fatalf("Rewrap: %v", err)
	}
	t.Logf("stats with concurrent rotation: %+v", stats)
	if stats.Failed != 0 || stats.Keys() != n {
		t.Errorf("stats %+v, want %d keys and no failures", stats, n)
	}
	for m, key := range keys {
		payload, err := rot.openWithNewOnly(ciphertext(t, rdb, admin, m))
		if err != nil {
			t.Errorf("%s does not decrypt with the new identity alone: %v", m, err)
		} else if payload != rot.boundPayload(m, provider.OpenAI, key) {
			t.Errorf("%s holds an older key than the last one stored: the rewrap overwrote a rotation", m)
		}
	}
}

// startSingleNodeCluster starts a redis-server in cluster mode that owns
// every slot, and returns a cluster client of it.
func startSingleNodeCluster(t *testing.T) *redis.ClusterClient {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatalf("redis-server not found on PATH: install it (Debian: apt-get install redis-server)")
	}
	dir := t.TempDir()
	port := strconv.Itoa(redistest.FreePort(t))
	cmd := exec.Command("redis-server",
		"--bind", "127.0.0.1", "--port", port, "--save", "", "--appendonly", "no",
		"--cluster-enabled", "yes", "--cluster-config-file", filepath.Join(dir, "nodes.conf"),
		"--dir", dir, "--logfile", filepath.Join(dir, "redis.log"))
	if err := cmd.Start(); err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})

	addr := "127.0.0.1:" + port
	node := redis.NewClient(&redis.Options{Addr: addr})
	defer node.Close()
	ctx := context.Background()
	waitFor(t, func() bool { return node.Ping(ctx).Err() == nil }, "the cluster node to respond")
	if err := node.Do(ctx, "CLUSTER", "ADDSLOTSRANGE", 0, 16383).Err(); err != nil {
		t.Fatalf("CLUSTER ADDSLOTSRANGE: %v", err)
	}
	waitFor(t, func() bool {
		info, _ := node.ClusterInfo(ctx).Result()
		return strings.Contains(info, "cluster_state:ok")
	}, "cluster_state:ok")

	client := redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{addr}})
	t.Cleanup(func() { client.Close() })
	return client
}

func TestRewrapOnCluster(t *testing.T) {
	rdb := startSingleNodeCluster(t)
	rot := newRotation(t)
	const prefix = "rewrap-cluster:"
	keys := putKeys(t, keystore.New(rdb, prefix, rot.oldIDs), 25)

	store := keystore.New(rdb, prefix, rot.both)
	stats, err := store.Rewrap(context.Background(), keystore.RewrapOptions{Count: 5, Checkpoint: true})
	if err != nil {
		t.Fatalf("Rewrap on a cluster: %v", err)
	}
	if stats.Rewrapped != 25 || stats.Failed != 0 {
		t.Errorf("stats %+v, want 25 rewrapped", stats)
	}
	for m, key := range keys {
		payload, err := rot.openWithNewOnly(ciphertext(t, rdb, store, m))
		if err != nil || payload != rot.boundPayload(m, provider.OpenAI, key) {
			t.Errorf("%s after the rewrap on a cluster: %v", m, err)
		}
	}
}

func TestRewrapEscapesPrefixPattern(t *testing.T) {
	rs := redistest.Start(t)
	prefix := rs.Prefix(t)
	rdb := rs.Client(t)
	rot := newRotation(t)
	// The glob characters in this prefix would match the other prefix's
	// keys if they were not escaped.
	globPrefix := prefix + "[ab]*?:"
	other := prefix + "a-other:"
	putKeys(t, keystore.New(rdb, globPrefix, rot.oldIDs), 3)
	putKeys(t, keystore.New(rdb, other, rot.oldIDs), 4)

	stats, err := keystore.New(rdb, globPrefix, rot.both).Rewrap(context.Background(), keystore.RewrapOptions{})
	if err != nil {
		t.Fatalf("Rewrap: %v", err)
	}
	if stats.Rewrapped != 3 || stats.Mailboxes != 3 {
		t.Errorf("stats %+v, want only the 3 mailboxes under the prefix", stats)
	}
}

// Payloads bound before they carried a tag open nowhere, since anyone who can
// write Redis could have written one. Only a rewrap with TagUntagged binds
// them again with a tag, once their owner checks out.
func TestRewrapTagsV1Payloads(t *testing.T) {
	rs := redistest.Start(t)
	prefix := rs.Prefix(t)
	rdb := rs.Client(t)
	ctx := context.Background()
	ids, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	store := keystore.New(rdb, prefix, ids)
	key := openaiKey(t)
	var ct bytes.Buffer
	w, err := age.Encrypt(&ct, ids.Recipient())
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(w, "byokproxy-key/v1\nowner\nopenai\n"+key)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{"owner", "thief"} {
		if err := rdb.HSet(ctx, store.Layout().Mailbox(m), "ct:openai", ct.String(), "src:openai", "byok").Err(); err != nil {
			t.Fatal(err)
		}
	}

	rec, err := store.Read(ctx, "owner", provider.OpenAI)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := store.Open(rec, "owner", provider.OpenAI); !errors.Is(err, keystore.ErrWrongBinding) {
		t.Errorf("v1 payload before the rewrap: err = %v, want ErrWrongBinding", err)
	}

	// A rewrap without TagUntagged, such as one for an identity rotation,
	// leaves untagged payloads alone.
	stats, err := store.Rewrap(ctx, keystore.RewrapOptions{})
	if err != nil {
		t.Fatalf("Rewrap: %v", err)
	}
	if want := (keystore.RewrapStats{Mailboxes: 2, Failed: 2}); stats != want {
		t.Errorf("stats without TagUntagged = %+v, want %+v", stats, want)
	}
	if got := ciphertext(t, rdb, store, "owner"); got != ct.String() {
		t.Errorf("a rewrap without TagUntagged rewrote the v1 payload")
	}

	stats, err = store.Rewrap(ctx, keystore.RewrapOptions{TagUntagged: true})
	if err != nil {
		t.Fatalf("Rewrap: %v", err)
	}
	if want := (keystore.RewrapStats{Mailboxes: 2, Rewrapped: 1, Failed: 1}); stats != want {
		t.Errorf("stats = %+v, want %+v", stats, want)
	}
	rec, err = store.Read(ctx, "owner", provider.OpenAI)
	if err != nil {
		t.Fatal(err)
	}
	opened, err := store.Open(rec, "owner", provider.OpenAI)
	if err != nil || string(opened.Bytes()) != key {
		t.Errorf("owner's key after the rewrap: err = %v", err)
	}
	if got := ciphertext(t, rdb, store, "thief"); got != ct.String() {
		t.Errorf("the copy under another mailbox was rewritten")
	}
}
