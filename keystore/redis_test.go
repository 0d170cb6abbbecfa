package keystore

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/internal/redistest"
)

func TestCheckEviction(t *testing.T) {
	srv := redistest.StartOwn(t)
	rdb := srv.Client(t)
	ctx := context.Background()
	cases := []struct {
		maxmemory, policy string
		evicts            bool
	}{
		{"0", "noeviction", false},
		// Without a limit no policy ever evicts.
		{"0", "allkeys-lru", false},
		{"64mb", "noeviction", false},
		{"64mb", "allkeys-lru", true},
		{"64mb", "allkeys-random", true},
		{"64mb", "volatile-lru", true},
		{"64mb", "volatile-ttl", true},
	}
	for _, c := range cases {
		t.Run(c.maxmemory+"/"+c.policy, func(t *testing.T) {
			if err := rdb.ConfigSet(ctx, "maxmemory-policy", c.policy).Err(); err != nil {
				t.Fatal(err)
			}
			if err := rdb.ConfigSet(ctx, "maxmemory", c.maxmemory).Err(); err != nil {
				t.Fatal(err)
			}
			err := CheckEviction(ctx, rdb)
			if got := errors.Is(err, ErrEvicting); got != c.evicts {
				t.Fatalf("CheckEviction = %v, want evicting %v", err, c.evicts)
			}
			if c.evicts && !strings.Contains(err.Error(), c.policy) {
				t.Errorf("error %q does not name the policy %s", err, c.policy)
			}
			if c.evicts && !strings.Contains(err.Error(), "noeviction") {
				t.Errorf("error %q does not name the fix", err)
			}
		})
	}
}

func TestCheckEvictionUnreachable(t *testing.T) {
	srv := redistest.StartOwn(t)
	rdb := srv.Client(t)
	srv.Stop()
	err := CheckEviction(context.Background(), rdb)
	if !errors.Is(err, ErrUnavailable) {
		t.Errorf("CheckEviction on a stopped server = %v, want ErrUnavailable", err)
	}
}

func TestCheckEvictionWithoutMemoryInfo(t *testing.T) {
	// The dev mode's store has no memory section in its INFO reply.
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()
	if err := CheckEviction(context.Background(), rdb); err != nil {
		t.Errorf("CheckEviction on a store without memory fields = %v, want nil", err)
	}
}

func TestEvictionSettings(t *testing.T) {
	info := "# Memory\r\nused_memory:1024\r\nmaxmemory:67108864\r\nmaxmemory_human:64.00M\r\nmaxmemory_policy:allkeys-lru\r\n"
	limit, policy := evictionSettings(info)
	if limit != "67108864" {
		t.Errorf("limit = %q, want 67108864", limit)
	}
	if policy != "allkeys-lru" {
		t.Errorf("policy = %q, want allkeys-lru", policy)
	}
	if limit, policy := evictionSettings("# Clients\r\nconnected_clients:1\r\n"); limit != "" || policy != "" {
		t.Errorf("settings of a reply without them = %q, %q, want empty", limit, policy)
	}
}
