package keystore

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"filippo.io/age"

	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/mailbox"
)

const (
	openaiKey  = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789WXYZ"
	openaiKey2 = "sk-proj-ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210abcd"
)

func newStore(t *testing.T) (*Store, *redistest.Server, string) {
	t.Helper()
	srv := redistest.Start(t)
	prefix := srv.Prefix(t)
	ids, err := GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}
	return New(srv.Client(t), prefix, ids), srv, prefix
}

func TestSecretNeverPrints(t *testing.T) {
	s := NewSecret([]byte(openaiKey))
	var logged bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&logged, &slog.HandlerOptions{Level: slog.LevelDebug}))
	log.Debug("with key", "key", s, "struct", struct{ K *Secret }{s})
	data, _ := json.Marshal(map[string]any{"key": s})
	outputs := []string{
		fmt.Sprint(s), fmt.Sprintf("%v %+v %#v %s %q %x", s, s, s, s, s, s),
		fmt.Errorf("wrapped: %v", s).Error(), string(data), logged.String(),
	}
	for _, out := range outputs {
		if strings.Contains(out, "abcdefghij") {
			t.Errorf("secret printed: %s", out)
		}
	}
	if s.Last4() != "WXYZ" {
		t.Errorf("Last4 = %q", s.Last4())
	}
	b := s.Bytes()
	s.Wipe()
	if !bytes.Equal(b, make([]byte, len(b))) {
		t.Error("Wipe left key bytes in memory")
	}
}

func TestPutReadOpenRoundTrip(t *testing.T) {
	st, srv, prefix := newStore(t)
	ctx := context.Background()
	id := mailbox.ID("alice@example.com")
	status, err := st.PutKey(ctx, id, "openai", []byte(openaiKey))
	if err != nil {
		t.Fatal(err)
	}
	if !status.HasKey || status.Last4 != "WXYZ" || status.Source != SourceShared || status.UpdatedAt == nil {
		t.Errorf("status after put = %+v", status)
	}
	rec, err := st.Read(ctx, id, "openai")
	if err != nil {
		t.Fatal(err)
	}
	if rec.Source != SourceShared {
		t.Errorf("putting a key changed the source to %s", rec.Source)
	}
	key, err := st.Open(rec, id, "openai")
	if err != nil {
		t.Fatal(err)
	}
	if string(key.Bytes()) != openaiKey {
		t.Error("opened key differs from the stored one")
	}

	// The ciphertext is the standard age format, readable with the identity
	// alone (an operator's emergency path with the age command).
	r, err := age.Decrypt(bytes.NewReader(rec.Ciphertext), st.Identities().ids...)
	if err != nil {
		t.Fatalf("age.Decrypt of the stored ciphertext: %v", err)
	}
	var plain bytes.Buffer
	plain.ReadFrom(r)
	if !strings.HasPrefix(plain.String(), "byokproxy-key/v2\nalice@example.com\nopenai\n") || !strings.HasSuffix(plain.String(), "\n"+openaiKey) {
		t.Errorf("payload does not bind mailbox and provider: %q", strings.ReplaceAll(plain.String(), openaiKey, "KEY"))
	}

	for key, value := range srv.Dump(t, prefix) {
		if strings.Contains(value, "abcdefghijklmnop") || strings.Contains(key, "abcdefghijklmnop") {
			t.Errorf("plaintext key stored in Redis under %s", key)
		}
	}
}

func TestKeyFormatRejected(t *testing.T) {
	st, _, _ := newStore(t)
	ctx := context.Background()
	cases := map[string][2]string{
		"anthropic key for openai": {"openai", "sk-ant-api03-abcdefghijklmnopqrstuvwxyz"},
		"openai key for anthropic": {"anthropic", openaiKey},
		"google too short":         {"google", "AIzaSyShort"},
		"google too long":          {"google", "AIza" + strings.Repeat("x", 36)},
		"spaces":                   {"openai", "sk-proj abc def ghi jkl"},
	}
	for name, c := range cases {
		_, err := st.PutKey(ctx, "bob", c[0], []byte(c[1]))
		if !errors.Is(err, ErrBadKey) {
			t.Errorf("%s: err = %v, want ErrBadKey", name, err)
			continue
		}
		if strings.Contains(err.Error(), c[1]) {
			t.Errorf("%s: error echoes the key: %v", name, err)
		}
	}
	if _, err := st.PutKey(ctx, "bob", "google", []byte("AIza"+strings.Repeat("x", 35))); err != nil {
		t.Errorf("valid Google key rejected: %v", err)
	}
}

func TestSourceRules(t *testing.T) {
	st, _, _ := newStore(t)
	ctx := context.Background()
	id := mailbox.ID("carol")
	if _, err := st.SetSource(ctx, id, "openai", SourceBYOK); !errors.Is(err, ErrNoKey) {
		t.Errorf("byok without key: err = %v, want ErrNoKey", err)
	}
	st.PutKey(ctx, id, "openai", []byte(openaiKey))
	if s, err := st.SetSource(ctx, id, "openai", SourceBYOK); err != nil || s.Source != SourceBYOK {
		t.Fatalf("byok with key: %+v, %v", s, err)
	}
	// Switching back keeps the key.
	if s, err := st.SetSource(ctx, id, "openai", SourceShared); err != nil || !s.HasKey {
		t.Errorf("shared keeps the key: %+v, %v", s, err)
	}
	st.SetSource(ctx, id, "openai", SourceBYOK)
	last4, removed, err := st.DeleteKey(ctx, id, "openai")
	if err != nil {
		t.Fatal(err)
	}
	if !removed {
		t.Error("DeleteKey of a stored key reported no key removed")
	}
	if want := openaiKey[len(openaiKey)-4:]; last4 != want {
		t.Errorf("DeleteKey returned last four %q, want %q", last4, want)
	}
	s, _ := st.ProviderStatus(ctx, id, "openai")
	if s.Source != SourceShared || s.HasKey || s.Last4 != "" || s.UpdatedAt != nil {
		t.Errorf("after delete: %+v, want shared and no key", s)
	}
	_, removed, err = st.DeleteKey(ctx, id, "openai")
	if err != nil {
		t.Fatal(err)
	}
	if removed {
		t.Error("DeleteKey with no key stored reported a key removed")
	}
	if _, err := st.SetSource(ctx, id, "openai", "other"); err == nil {
		t.Error("unknown source accepted")
	}
}

func TestWrongBindingDetected(t *testing.T) {
	st, _, _ := newStore(t)
	ctx := context.Background()
	st.PutKey(ctx, "victim", "openai", []byte(openaiKey))
	rec, _ := st.Read(ctx, "victim", "openai")
	if _, err := st.Open(rec, "thief", "openai"); !errors.Is(err, ErrWrongBinding) {
		t.Errorf("other mailbox: err = %v, want ErrWrongBinding", err)
	}
	if _, err := st.Open(rec, "victim", "anthropic"); !errors.Is(err, ErrWrongBinding) {
		t.Errorf("other provider: err = %v, want ErrWrongBinding", err)
	}
	other, _ := GenerateIdentities()
	foreign := New(st.Client(), st.Layout().Prefix, other)
	if _, err := foreign.Open(rec, "victim", "openai"); !errors.Is(err, ErrDecrypt) {
		t.Errorf("other identity: err = %v, want ErrDecrypt", err)
	}
}

// Anyone who can write Redis can encrypt to the public recipient, so a
// payload the proxy did not write must not open, however well it names its
// owner.
func TestForgedBindingRejected(t *testing.T) {
	st, _, _ := newStore(t)
	ids := st.Identities()
	const forgedKey = "sk-proj-FORGEDforgedFORGEDforged0123456789EVIL"
	genuine := ids.bind([]byte(forgedKey), "victim", "openai")
	tagged := func(tag string) []byte {
		return []byte(payloadHeader + "victim\nopenai\n" + tag + "\n" + forgedKey)
	}
	other, err := GenerateIdentities()
	if err != nil {
		t.Fatal(err)
	}

	cases := map[string][]byte{
		"v1 payload":              []byte(payloadHeaderV1 + "victim\nopenai\n" + forgedKey),
		"no tag line":             []byte(payloadHeader + "victim\nopenai\n" + forgedKey),
		"empty tag":               tagged(""),
		"tag of zeros":            tagged(tagEncoding.EncodeToString(make([]byte, 32))),
		"tag of another identity": other.bind([]byte(forgedKey), "victim", "openai"),
		"tag with a changed key":  bytes.Replace(bytes.Clone(genuine), []byte("EVIL"), []byte("EVIM"), 1),
		"short tag":               tagged(tagEncoding.EncodeToString(make([]byte, 31))),
	}
	for name, payload := range cases {
		ct, err := ids.encrypt(payload)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := st.Open(&Record{Ciphertext: ct}, "victim", "openai"); !errors.Is(err, ErrWrongBinding) {
			t.Errorf("%s: err = %v, want ErrWrongBinding", name, err)
		}
	}

	ct, err := ids.encrypt(genuine)
	if err != nil {
		t.Fatal(err)
	}
	key, err := st.Open(&Record{Ciphertext: ct}, "victim", "openai")
	if err != nil || string(key.Bytes()) != forgedKey {
		t.Errorf("a payload bound by the proxy's identity: err = %v", err)
	}
}

func TestSealedKey(t *testing.T) {
	st, _, _ := newStore(t)
	ctx := context.Background()
	var ct bytes.Buffer
	w, _ := age.Encrypt(&ct, st.Identities().Recipient())
	w.Write([]byte(openaiKey + "\n"))
	w.Close()
	armored, err := Armor(ct.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	status, err := st.PutSealedKey(ctx, "dave", "openai", []byte(armored))
	if err != nil {
		t.Fatal(err)
	}
	if status.Last4 != "WXYZ" {
		t.Errorf("last4 = %q, want WXYZ", status.Last4)
	}
	rec, _ := st.Read(ctx, "dave", "openai")
	key, err := st.Open(rec, "dave", "openai")
	if err != nil || string(key.Bytes()) != openaiKey {
		t.Errorf("sealed key does not open to the key: %v", err)
	}
	other, _ := GenerateIdentities()
	var wrong bytes.Buffer
	w, _ = age.Encrypt(&wrong, other.Recipient())
	w.Write([]byte(openaiKey))
	w.Close()
	if _, err := st.PutSealedKey(ctx, "dave", "openai", wrong.Bytes()); !errors.Is(err, ErrBadKey) {
		t.Errorf("ciphertext to another recipient: err = %v, want ErrBadKey", err)
	}
}

func TestRotationIsAtomicUnderReads(t *testing.T) {
	st, _, _ := newStore(t)
	ctx := context.Background()
	id := mailbox.ID("erin")
	st.PutKey(ctx, id, "openai", []byte(openaiKey))
	st.SetSource(ctx, id, "openai", SourceBYOK)

	var stop atomic.Bool
	var wg sync.WaitGroup
	var mixed, reads atomic.Int64
	for r := 0; r < 4; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 2000 && !stop.Load(); i++ {
				rec, err := st.Read(ctx, id, "openai")
				if err != nil {
					t.Error(err)
					return
				}
				key, err := st.Open(rec, id, "openai")
				if err != nil {
					t.Errorf("open during rotation: %v", err)
					return
				}
				// The last four and the ciphertext come from one write.
				if key.Last4() != rec.Last4 {
					mixed.Add(1)
				}
				reads.Add(1)
			}
		}()
	}
	deadline := time.Now().Add(3 * time.Second)
	for i := 0; i < 200 && time.Now().Before(deadline); i++ {
		key := openaiKey
		if i%2 == 0 {
			key = openaiKey2
		}
		if _, err := st.PutKey(ctx, id, "openai", []byte(key)); err != nil {
			t.Fatal(err)
		}
	}
	stop.Store(true)
	wg.Wait()
	if mixed.Load() != 0 {
		t.Errorf("%d of %d reads saw a key and last four from different writes", mixed.Load(), reads.Load())
	}
	if reads.Load() == 0 {
		t.Error("no reads ran during the rotation")
	}
}

func TestRevokeAndDeleteGenerations(t *testing.T) {
	st, _, _ := newStore(t)
	ctx := context.Background()
	id := mailbox.ID("frank")
	if g, _ := st.Generation(ctx, id); g != 0 {
		t.Errorf("initial generation = %d", g)
	}
	g1, _ := st.Revoke(ctx, id)
	st.PutKey(ctx, id, "openai", []byte(openaiKey))
	limit := int64(10)
	st.SetLimit(ctx, id, &limit)
	if err := st.DeleteMailbox(ctx, id); err != nil {
		t.Fatal(err)
	}
	g2, _ := st.Generation(ctx, id)
	if g2 <= g1 {
		t.Errorf("generation after delete = %d, want above %d", g2, g1)
	}
	if l, _ := st.Limit(ctx, id); l != nil {
		t.Errorf("limit kept after delete: %d", *l)
	}
	if s, _ := st.ProviderStatus(ctx, id, "openai"); s.HasKey {
		t.Error("key kept after delete")
	}
}

func TestUsageCountedOnce(t *testing.T) {
	st, _, _ := newStore(t)
	ctx := context.Background()
	now := time.Now()
	u := UsageRecord{RequestID: "req-1", Mailbox: "gina", Provider: "openai", Source: SourceShared, InputTokens: 10, OutputTokens: 5, Time: now}
	for i := 0; i < 3; i++ {
		pipe := st.Client().Pipeline()
		st.Layout().QueueUsage(ctx, pipe, u, 13)
		if _, err := pipe.Exec(ctx); err != nil {
			t.Fatal(err)
		}
	}
	byok := u
	byok.RequestID, byok.Source = "req-2", SourceBYOK
	pipe := st.Client().Pipeline()
	st.Layout().QueueUsage(ctx, pipe, byok, 13)
	pipe.Exec(ctx)

	got, err := st.Usage(ctx, "gina", Month(now))
	if err != nil {
		t.Fatal(err)
	}
	if c := got.Providers["openai"][SourceShared]; c.Requests != 1 || c.InputTokens != 10 || c.OutputTokens != 5 {
		t.Errorf("shared counts = %+v, want 1 request of 10/5", c)
	}
	if got.SharedTotal != 15 {
		t.Errorf("shared total = %d, want 15 (byok does not count)", got.SharedTotal)
	}
	if c := got.Providers["openai"][SourceBYOK]; c.Requests != 1 {
		t.Errorf("byok counts = %+v", c)
	}
	ttl := st.Client().TTL(ctx, st.Layout().Usage("gina", Month(now))).Val()
	if ttl < 300*24*time.Hour {
		t.Errorf("usage counters expire in %v, want about 13 months", ttl)
	}
}

func TestUsageHugeCountsAddUp(t *testing.T) {
	st, _, _ := newStore(t)
	ctx := context.Background()
	now := time.Now()
	u := UsageRecord{RequestID: "req-huge", Mailbox: "hugo", Provider: "openai", Source: SourceShared,
		InputTokens: 1 << 39, OutputTokens: 1<<39 + 3, Time: now}
	pipe := st.Client().Pipeline()
	st.Layout().QueueUsage(ctx, pipe, u, 13)
	if _, err := pipe.Exec(ctx); err != nil {
		t.Fatalf("usage script: %v", err)
	}

	// Counts no provider reports, which the script would otherwise turn
	// into a sum HINCRBY rejects, after its first writes.
	over := UsageRecord{RequestID: "req-over", Mailbox: "hugo", Provider: "openai", Source: SourceShared,
		InputTokens: 1 << 62, OutputTokens: -5, Time: now}
	pipe = st.Client().Pipeline()
	st.Layout().QueueUsage(ctx, pipe, over, 13)
	if _, err := pipe.Exec(ctx); err != nil {
		t.Fatalf("usage script with counts out of range: %v", err)
	}

	got, err := st.Usage(ctx, "hugo", Month(now))
	if err != nil {
		t.Fatal(err)
	}
	wantTotal := int64(1<<39+1<<39+3) + maxRecordedTokens
	if got.SharedTotal != wantTotal {
		t.Errorf("shared total = %d, want %d", got.SharedTotal, wantTotal)
	}
	c := got.Providers["openai"][SourceShared]
	if c.Requests != 2 {
		t.Errorf("requests = %d, want 2", c.Requests)
	}
	if c.InputTokens != 1<<39+maxRecordedTokens {
		t.Errorf("input tokens = %d, want %d", c.InputTokens, int64(1<<39+maxRecordedTokens))
	}
	if c.OutputTokens != 1<<39+3 {
		t.Errorf("output tokens = %d, want %d (a negative count adds nothing)", c.OutputTokens, int64(1<<39+3))
	}
}

func TestUsedSharedHugePendingStaysAtLimit(t *testing.T) {
	st, _, _ := newStore(t)
	ctx := context.Background()
	month := Month(time.Now())
	pending := []PendingUsage{
		{RequestID: "req-a", Month: month, Tokens: 1 << 62},
		{RequestID: "req-b", Month: month, Tokens: 1 << 62},
		{RequestID: "req-c", Month: month, Tokens: 5},
	}
	used, err := st.UsedShared(ctx, "hugo-pending", pending)
	if err != nil {
		t.Fatalf("UsedShared: %v", err)
	}
	if want := int64(2*(2*maxRecordedTokens) + 5); used != want {
		t.Errorf("used = %d with two pending charges of 2^62 tokens and one of 5, want %d", used, want)
	}
}
