package keystore

import (
	"crypto/tls"
	"fmt"

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
