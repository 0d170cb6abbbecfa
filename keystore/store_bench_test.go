package keystore

import (
	"context"
	"testing"
	"time"

	"filippo.io/age"

	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/mailbox"
)

// benchStore returns a store on a real redis-server holding a byok key for
// one mailbox.
func benchStore(b *testing.B) (*Store, mailbox.ID) {
	b.Helper()
	srv := redistest.Start(b)
	ids, err := GenerateIdentities()
	if err != nil {
		b.Fatal(err)
	}
	s := New(srv.Client(b), srv.Prefix(b), ids)
	id := mailbox.ID("bench@example.com")
	ctx := context.Background()
	if _, err := s.PutKey(ctx, id, "openai", []byte("sk-proj-Qx3v9T2mB7kLp4RzW8nY1cD6fH0jS5aE")); err != nil {
		b.Fatal(err)
	}
	if _, err := s.SetSource(ctx, id, "openai", SourceBYOK); err != nil {
		b.Fatal(err)
	}
	return s, id
}

// BenchmarkStoreRead measures the one Redis round trip of each request:
// generation, source, ciphertext, limit and this month's usage.
func BenchmarkStoreRead(b *testing.B) {
	s, id := benchStore(b)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.Read(ctx, id, "openai"); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkStoreLookup measures the request path's read of a mailbox record:
// from Redis with the cache off, from the cache, and from the cache with an
// allowance, which still reads the usage counter from Redis.
func BenchmarkStoreLookup(b *testing.B) {
	s, id := benchStore(b)
	ctx := context.Background()
	cached := New(s.rdb, s.layout.Prefix, s.Identities())
	cached.EnableCache(MaxCacheTTL)
	startWatch(b, cached)
	for !cached.cache.live.Load() {
		time.Sleep(time.Millisecond)
	}
	shared := mailbox.ID("bench-shared@example.com")
	for _, tc := range []struct {
		name  string
		store *Store
		id    mailbox.ID
		limit int64
	}{
		{"uncached", s, id, 0},
		{"cached", cached, id, 0},
		{"cached-allowance", cached, shared, 1_000_000},
	} {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := tc.store.Lookup(ctx, tc.id, "openai", tc.limit); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkStoreOpen measures decrypting a stored key and checking its
// binding, with age's X25519 identity and with the fast identity.
func BenchmarkStoreOpen(b *testing.B) {
	s, id := benchStore(b)
	rec, err := s.Read(context.Background(), id, "openai")
	if err != nil {
		b.Fatal(err)
	}
	ageIDs := s.Identities()
	fastIDs := &Identities{ids: fastIdentities(b, ageIDs.x25519), x25519: ageIDs.x25519, recipient: ageIDs.recipient}
	for _, tc := range []struct {
		name string
		ids  *Identities
	}{
		{"age-identity", &Identities{ids: []age.Identity{ageIDs.x25519[0]}, x25519: ageIDs.x25519, recipient: ageIDs.recipient}},
		{"fast-identity", fastIDs},
	} {
		b.Run(tc.name, func(b *testing.B) {
			s.SetIdentities(tc.ids)
			b.ReportAllocs()
			for b.Loop() {
				key, err := s.Open(rec, id, "openai")
				if err != nil {
					b.Fatal(err)
				}
				key.Wipe()
			}
		})
	}
}
