package keystore

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"strings"

	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/config"
)

// fewRetries is the retry count of every Redis command and dial.
const fewRetries = 1

// OpenRedis returns a client for the configured topology: redis.url for one
// node, redis.addrs with redis.master_name for Sentinel, and redis.addrs
// alone for a Cluster. Username, password, TLS and timeout apply to all.
//
// Retries are kept to one, so a request that needs a Redis that is down
// fails in about two timeouts instead of waiting through go-redis's default
// dial retries (five, with backoff). The audit writer retries on its own.
// Commands also end at their context's deadline, so a caller that bounds a
// call by one timeout is not held through the retry.
func OpenRedis(c config.Redis) (redis.UniversalClient, error) {
	var tlsConfig *tls.Config
	if c.TLS {
		tlsConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	if len(c.Addrs) > 0 {
		return redis.NewUniversalClient(&redis.UniversalOptions{
			Addrs:      c.Addrs,
			MasterName: c.MasterName,
			// Without a master name, addrs names a Cluster even when it
			// lists one seed node, such as a Service in front of the nodes.
			// go-redis would otherwise return a single-node client.
			IsClusterMode: c.MasterName == "",
			Username:      c.Username,
			Password:      c.Password,
			TLSConfig:     tlsConfig,
			DialTimeout:   c.Timeout,
			ReadTimeout:   c.Timeout,
			WriteTimeout:  c.Timeout,
			MaxRetries:    fewRetries,
			DialerRetries: fewRetries,

			ContextTimeoutEnabled: true,
		}), nil
	}
	opts, err := redis.ParseURL(c.URL)
	if err != nil {
		return nil, fmt.Errorf("redis.url: %w", err)
	}
	if c.Username != "" {
		opts.Username = c.Username
	}
	if c.Password != "" {
		opts.Password = c.Password
	}
	if tlsConfig != nil && opts.TLSConfig == nil {
		opts.TLSConfig = tlsConfig
	}
	if c.Timeout > 0 {
		opts.DialTimeout = c.Timeout
		opts.ReadTimeout = c.Timeout
		opts.WriteTimeout = c.Timeout
	}
	opts.MaxRetries = fewRetries
	opts.DialerRetries = fewRetries
	opts.ContextTimeoutEnabled = true
	return redis.NewClient(opts), nil
}

// ErrEvicting means a Redis node may evict keys to stay under its
// maxmemory. An evicted mailbox record resets its token generation, which
// makes revoked tokens valid again, and an evicted usage counter resets a
// month's allowance. Only the noeviction policy rules both out.
var ErrEvicting = errors.New("redis may evict keys")

// CheckEviction returns an error wrapping ErrEvicting if any Redis node of
// rdb has a maxmemory limit and a maxmemory-policy other than noeviction.
// On a Cluster that includes the replicas, since a replica takes over as a
// master at a failover. It reads INFO memory rather than CONFIG GET, which some
// managed Redis services disable. A server whose INFO lacks the section or
// those fields, such as the dev mode's in-process store, passes.
func CheckEviction(ctx context.Context, rdb redis.UniversalClient) error {
	if cluster, ok := rdb.(*redis.ClusterClient); ok {
		return cluster.ForEachShard(ctx, func(ctx context.Context, node *redis.Client) error {
			return checkNodeEviction(ctx, node)
		})
	}
	node, ok := rdb.(*redis.Client)
	if !ok {
		return nil
	}
	return checkNodeEviction(ctx, node)
}

func checkNodeEviction(ctx context.Context, node *redis.Client) error {
	info, err := node.Info(ctx, "memory").Result()
	var reply redis.Error
	if errors.As(err, &reply) {
		// An error reply means the server lacks the section.
		return nil
	}
	if err != nil {
		return fmt.Errorf("%w: INFO memory on %s: %v", ErrUnavailable, node.Options().Addr, err)
	}
	limit, policy := evictionSettings(info)
	if limit == "" || limit == "0" || policy == "" || policy == "noeviction" {
		return nil
	}
	return fmt.Errorf("%w: %s has maxmemory %s and maxmemory-policy %s; set maxmemory-policy to noeviction",
		ErrEvicting, node.Options().Addr, limit, policy)
}

// evictionSettings returns the maxmemory and maxmemory_policy fields of an
// INFO reply, or empty strings for fields it lacks.
func evictionSettings(info string) (limit, policy string) {
	for line := range strings.Lines(info) {
		name, value, ok := strings.Cut(strings.TrimRight(line, "\r\n"), ":")
		if !ok {
			continue
		}
		switch name {
		case "maxmemory":
			limit = value
		case "maxmemory_policy":
			policy = value
		}
	}
	return limit, policy
}
