// Package redistest runs a real redis-server for tests. Each test gets its own
// key prefix, and only keys under that prefix are removed afterwards, so tests
// can share a server (including one named by REDIS_URL) without touching data
// they did not create.
package redistest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Server is a redis-server process started by a test, or the server named by
// REDIS_URL.
type Server struct {
	// URL is the redis:// address of the server.
	URL string

	t    testing.TB
	addr string
	dir  string
	mu   sync.Mutex
	cmd  *exec.Cmd
}

// Start returns a server for t. With REDIS_URL set it uses that server;
// otherwise it starts redis-server on a free loopback port and stops it when
// the test ends. A missing redis-server binary fails the test with the fix.
func Start(t testing.TB) *Server {
	t.Helper()
	if url := os.Getenv("REDIS_URL"); url != "" {
		return &Server{URL: url, t: t}
	}
	return StartOwn(t)
}

// StartOwn always starts a private redis-server, for tests that stop and
// restart it.
func StartOwn(t testing.TB) *Server {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatalf("redis-server not found on PATH: install it (Debian: apt-get install redis-server) or set REDIS_URL")
	}
	s := &Server{t: t, addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(FreePort(t))), dir: t.TempDir()}
	s.URL = "redis://" + s.addr
	s.Restart()
	t.Cleanup(s.Stop)
	return s
}

// Restart starts the server process again after Stop, on the same port.
func (s *Server) Restart() {
	s.t.Helper()
	if s.addr == "" {
		s.t.Fatal("redistest: cannot restart a server named by REDIS_URL")
	}
	_, port, _ := net.SplitHostPort(s.addr)
	cmd := exec.Command("redis-server",
		"--bind", "127.0.0.1", "--port", port,
		"--save", "", "--appendonly", "no",
		"--dir", s.dir, "--logfile", filepath.Join(s.dir, "redis.log"))
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("start redis-server: %v", err)
	}
	s.mu.Lock()
	s.cmd = cmd
	s.mu.Unlock()
	go cmd.Wait()
	s.waitReady()
}

// Stop ends the server process the test started. It is a no-op for a server
// named by REDIS_URL, or one already stopped.
func (s *Server) Stop() {
	s.mu.Lock()
	cmd := s.cmd
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return
	}
	cmd.Process.Kill()
	// Wait until the port is closed, so a restart can bind it again.
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", s.addr, 100*time.Millisecond)
		if err != nil {
			return
		}
		c.Close()
		time.Sleep(20 * time.Millisecond)
	}
}

// Pause stops the server process without closing its connections, as a
// stalled server or a paused VM would, until Resume.
func (s *Server) Pause() { s.signal(syscall.SIGSTOP) }

// Resume continues a server that Pause stopped.
func (s *Server) Resume() { s.signal(syscall.SIGCONT) }

func (s *Server) signal(sig syscall.Signal) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil || s.cmd.Process == nil {
		s.t.Fatal("redistest: no server process of this test to signal")
	}
	if err := s.cmd.Process.Signal(sig); err != nil {
		s.t.Fatalf("redistest: signal %v: %v", sig, err)
	}
}

func (s *Server) waitReady() {
	s.t.Helper()
	opts, err := redis.ParseURL(s.URL)
	if err != nil {
		s.t.Fatalf("redistest: parse %q: %v", s.URL, err)
	}
	c := redis.NewClient(opts)
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		err := c.Ping(ctx).Err()
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("redis-server at %s not ready after 10s: %v", s.addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Client returns a client of the server, closed when the test ends.
func (s *Server) Client(t testing.TB) *redis.Client {
	t.Helper()
	opts, err := redis.ParseURL(s.URL)
	if err != nil {
		t.Fatalf("redistest: parse %q: %v", s.URL, err)
	}
	c := redis.NewClient(opts)
	t.Cleanup(func() { c.Close() })
	return c
}

// Prefix returns a key prefix unique to this test, such as "test:1a2b3c4d:",
// and removes every key under it when the test ends.
func (s *Server) Prefix(t testing.TB) string {
	t.Helper()
	prefix := newPrefix()
	t.Cleanup(func() { s.deletePrefix(prefix) })
	return prefix
}

func (s *Server) deletePrefix(prefix string) {
	opts, err := redis.ParseURL(s.URL)
	if err != nil {
		return
	}
	c := redis.NewClient(opts)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	iter := c.Scan(ctx, 0, prefix+"*", 1000).Iterator()
	for iter.Next(ctx) {
		c.Del(ctx, iter.Val())
	}
}

// Dump returns every key under prefix with its value rendered as text, for
// tests that search stored data.
func (s *Server) Dump(t testing.TB, prefix string) map[string]string {
	t.Helper()
	c := s.Client(t)
	ctx := context.Background()
	out := map[string]string{}
	iter := c.Scan(ctx, 0, prefix+"*", 1000).Iterator()
	for iter.Next(ctx) {
		key := iter.Val()
		typ, _ := c.Type(ctx, key).Result()
		switch typ {
		case "string":
			out[key], _ = c.Get(ctx, key).Result()
		case "hash":
			out[key] = fmt.Sprint(c.HGetAll(ctx, key).Val())
		case "stream":
			out[key] = fmt.Sprint(c.XRange(ctx, key, "-", "+").Val())
		case "set":
			out[key] = fmt.Sprint(c.SMembers(ctx, key).Val())
		case "zset":
			out[key] = fmt.Sprint(c.ZRangeWithScores(ctx, key, 0, -1).Val())
		case "list":
			out[key] = fmt.Sprint(c.LRange(ctx, key, 0, -1).Val())
		default:
			out[key] = typ
		}
	}
	return out
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago and
// that it has not returned before in this process. The kernel may hand a
// port that was just closed to the next listener on port 0, so two calls in
// a row could otherwise return the same port for two listeners.
func FreePort(t testing.TB) int {
	t.Helper()
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("find a free port: %v", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		givenPorts.Lock()
		returnedBefore := givenPorts.set[port]
		givenPorts.set[port] = true
		givenPorts.Unlock()
		if !returnedBefore {
			return port
		}
	}
	t.Fatal("find a free port: 100 tries gave only ports returned before")
	return 0
}

// givenPorts are the ports FreePort has returned.
var givenPorts = struct {
	sync.Mutex
	set map[int]bool
}{set: map[int]bool{}}

// newPrefix returns a random key prefix such as "test:1a2b3c4d5e6f:".
func newPrefix() string {
	b := make([]byte, 6)
	rand.Read(b)
	return "test:" + hex.EncodeToString(b) + ":"
}
