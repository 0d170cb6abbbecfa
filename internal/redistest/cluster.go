package redistest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// clusterReadyTimeout bounds the wait for a new or restarted cluster node.
const clusterReadyTimeout = 30 * time.Second

// Cluster is a Redis Cluster of three masters without replicas, each a
// redis-server process started by the test on 127.0.0.1. It needs Redis 7 or
// later, whose cluster-port setting lets both ports of a node be picked free.
type Cluster struct {
	// Addrs are the host:port addresses of the three masters.
	Addrs []string

	t     testing.TB
	nodes []*clusterNode
}

// clusterNode is one redis-server process of a Cluster.
type clusterNode struct {
	process
	port    int
	busPort int
}

// process is a redis-server that a test starts, stops and restarts with the
// same arguments.
type process struct {
	addr string
	dir  string
	args []string

	mu  sync.Mutex
	cmd *exec.Cmd
}

func (p *process) start(t testing.TB) {
	t.Helper()
	cmd := exec.Command("redis-server", p.args...)
	if err := cmd.Start(); err != nil {
		t.Fatalf("redistest: start redis-server on %s: %v", p.addr, err)
	}
	p.mu.Lock()
	p.cmd = cmd
	p.mu.Unlock()
	go cmd.Wait()
}

func (p *process) running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd != nil
}

// stop kills the process, if running, and waits until its port is closed.
func (p *process) stop() {
	p.mu.Lock()
	cmd := p.cmd
	p.cmd = nil
	p.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return
	}
	cmd.Process.Kill()
	waitClosed(p.addr)
}

// StartCluster starts three cluster-enabled redis-server processes, joins
// them with "redis-cli --cluster create" and waits until every node reports
// cluster_state:ok. The processes are stopped when the test ends.
func StartCluster(t testing.TB) *Cluster {
	t.Helper()
	for _, bin := range []string{"redis-server", "redis-cli"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s not found on PATH: install Redis 7 or later (Debian: apt-get install redis-server)", bin)
		}
	}
	c := &Cluster{t: t}
	root := t.TempDir()
	for i := range 3 {
		n := &clusterNode{port: FreePort(t), busPort: FreePort(t)}
		if n.busPort == n.port {
			n.busPort = FreePort(t)
		}
		n.addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(n.port))
		n.dir = filepath.Join(root, "node"+strconv.Itoa(i))
		// The node's directory keeps nodes.conf, its identity and slots,
		// across a restart.
		n.args = []string{
			"--cluster-enabled", "yes",
			"--cluster-config-file", filepath.Join(n.dir, "nodes.conf"),
			"--port", strconv.Itoa(n.port),
			"--cluster-port", strconv.Itoa(n.busPort),
			"--bind", "127.0.0.1",
			"--save", "", "--appendonly", "no",
			"--dir", n.dir,
			"--logfile", filepath.Join(n.dir, "redis.log"),
		}
		if err := os.MkdirAll(n.dir, 0o700); err != nil {
			t.Fatalf("redistest: create %s: %v", n.dir, err)
		}
		c.nodes = append(c.nodes, n)
		c.Addrs = append(c.Addrs, n.addr)
	}
	t.Cleanup(func() {
		for _, n := range c.nodes {
			n.stop()
		}
	})
	for _, n := range c.nodes {
		n.start(t)
	}
	for _, n := range c.nodes {
		waitPing(t, n.addr)
	}
	c.create()
	for _, n := range c.nodes {
		c.waitClusterOK(n)
	}
	return c
}

// create assigns the slots evenly to the three masters.
func (c *Cluster) create() {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), clusterReadyTimeout)
	defer cancel()
	args := append([]string{"--cluster", "create"}, c.Addrs...)
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	out, err := exec.CommandContext(ctx, "redis-cli", args...).CombinedOutput()
	if err != nil {
		c.t.Fatalf("redistest: redis-cli --cluster create %s: %v\n%s", strings.Join(c.Addrs, " "), err, out)
	}
}

// waitClusterOK polls CLUSTER INFO on one node until it reports
// cluster_state:ok: in that node's view, a reachable master serves every slot.
func (c *Cluster) waitClusterOK(n *clusterNode) {
	c.t.Helper()
	client := redis.NewClient(&redis.Options{Addr: n.addr})
	defer client.Close()
	deadline := time.Now().Add(clusterReadyTimeout)
	last := ""
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		info, err := client.ClusterInfo(ctx).Result()
		cancel()
		if err == nil && strings.Contains(info, "cluster_state:ok") {
			return
		}
		last = fmt.Sprint(err)
		if err == nil {
			last = firstLine(info, "cluster_state:")
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.t.Fatalf("redistest: cluster node %s not ok after %v (%s); log in %s", n.addr, clusterReadyTimeout, last, filepath.Join(n.dir, "redis.log"))
}

func firstLine(text, prefix string) string {
	for line := range strings.SplitSeq(text, "\n") {
		if strings.HasPrefix(line, prefix) {
			return strings.TrimSpace(line)
		}
	}
	return ""
}

// Client returns a cluster client of the three masters, closed when the test
// ends.
func (c *Cluster) Client(t testing.TB) *redis.ClusterClient {
	t.Helper()
	client := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs})
	t.Cleanup(func() { client.Close() })
	return client
}

// Prefix returns a key prefix unique to this test and removes every key under
// it from every master when the test ends.
func (c *Cluster) Prefix(t testing.TB) string {
	t.Helper()
	prefix := newPrefix()
	t.Cleanup(func() { c.deletePrefix(prefix) })
	return prefix
}

func (c *Cluster) deletePrefix(prefix string) {
	for _, n := range c.nodes {
		if !n.running() {
			continue
		}
		client := redis.NewClient(&redis.Options{Addr: n.addr})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		// SCAN on one node lists only that node's keys, and DEL of one key
		// at a time never crosses slots.
		iter := client.Scan(ctx, 0, prefix+"*", 1000).Iterator()
		for iter.Next(ctx) {
			client.Del(ctx, iter.Val())
		}
		cancel()
		client.Close()
	}
}

// NodeOf returns the index in Addrs of the master that serves key.
func (c *Cluster) NodeOf(t testing.TB, key string) int {
	t.Helper()
	client := redis.NewClient(&redis.Options{Addr: c.Addrs[0]})
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	slot, err := client.ClusterKeySlot(ctx, key).Result()
	if err != nil {
		t.Fatalf("redistest: CLUSTER KEYSLOT %q: %v", key, err)
	}
	shards, err := client.ClusterShards(ctx).Result()
	if err != nil {
		t.Fatalf("redistest: CLUSTER SHARDS: %v", err)
	}
	for _, shard := range shards {
		for _, r := range shard.Slots {
			if slot < r.Start || slot > r.End {
				continue
			}
			for _, n := range shard.Nodes {
				addr := net.JoinHostPort(n.IP, strconv.FormatInt(n.Port, 10))
				if i := slices.Index(c.Addrs, addr); i >= 0 && n.Role == "master" {
					return i
				}
			}
		}
	}
	t.Fatalf("redistest: no master of slot %d among %v", slot, c.Addrs)
	return -1
}

// StopNode kills master i. Its slots stay assigned to it, so commands for
// them fail until RestartNode.
func (c *Cluster) StopNode(i int) {
	c.nodes[i].stop()
}

// RestartNode starts master i again on the same ports with the same
// nodes.conf and waits until every node reports cluster_state:ok. The node
// comes back empty, because persistence is off.
func (c *Cluster) RestartNode(i int) {
	c.t.Helper()
	n := c.nodes[i]
	n.start(c.t)
	waitPing(c.t, n.addr)
	for _, other := range c.nodes {
		c.waitClusterOK(other)
	}
}

// waitClosed waits up to 5 s until nothing accepts connections on addr, so a
// restart can bind it again.
func waitClosed(addr string) {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		conn, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
		if err != nil {
			return
		}
		conn.Close()
		time.Sleep(20 * time.Millisecond)
	}
}

// waitPing polls PING on addr for up to 10 s.
func waitPing(t testing.TB, addr string) {
	t.Helper()
	client := redis.NewClient(&redis.Options{Addr: addr})
	defer client.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		err := client.Ping(ctx).Err()
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("redistest: redis-server at %s does not respond to PING after 10s: %v", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Sentinel is a Redis master, one replica of it and one Sentinel that
// watches them, each a process started by the test on 127.0.0.1. The
// Sentinel alone forms the quorum, so it fails over about one second after
// the master stops responding.
type Sentinel struct {
	// MasterName is the name the Sentinel monitors the master under.
	MasterName string
	// Addrs holds the host:port address of the Sentinel.
	Addrs []string
	// MasterAddr and ReplicaAddr are the data nodes as started. After a
	// failover the replica is the master.
	MasterAddr  string
	ReplicaAddr string

	t        testing.TB
	master   *process
	replica  *process
	sentinel *process
}

// sentinelFailoverTimeout bounds the wait for a failover to finish.
const sentinelFailoverTimeout = 30 * time.Second

// StartSentinel starts the master, the replica and the Sentinel, and waits
// until the replica is in sync and the Sentinel has discovered both. The redis-server
// binary runs the Sentinel with --sentinel. Everything is stopped when the
// test ends.
func StartSentinel(t testing.TB) *Sentinel {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatalf("redis-server not found on PATH: install it (Debian: apt-get install redis-server)")
	}
	root := t.TempDir()
	s := &Sentinel{MasterName: "byokproxy-test", t: t}
	newProcess := func(name string, args ...string) *process {
		port := strconv.Itoa(FreePort(t))
		dir := filepath.Join(root, name)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatalf("redistest: create %s: %v", dir, err)
		}
		return &process{
			addr: net.JoinHostPort("127.0.0.1", port),
			dir:  dir,
			args: append([]string{"--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
				"--dir", dir, "--logfile", filepath.Join(dir, "redis.log")}, args...),
		}
	}
	s.master = newProcess("master")
	_, masterPort, _ := net.SplitHostPort(s.master.addr)
	s.replica = newProcess("replica", "--replicaof", "127.0.0.1", masterPort)
	s.MasterAddr, s.ReplicaAddr = s.master.addr, s.replica.addr

	// Sentinel rewrites its configuration file, so it gets one of its own.
	sentinelPort := FreePort(t)
	s.sentinel = &process{addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(sentinelPort)), dir: filepath.Join(root, "sentinel")}
	if err := os.MkdirAll(s.sentinel.dir, 0o700); err != nil {
		t.Fatalf("redistest: create %s: %v", s.sentinel.dir, err)
	}
	conf := filepath.Join(s.sentinel.dir, "sentinel.conf")
	text := fmt.Sprintf(`port %d
bind 127.0.0.1
dir %s
logfile %s
sentinel monitor %s 127.0.0.1 %s 1
sentinel down-after-milliseconds %[4]s 1000
sentinel failover-timeout %[4]s 10000
`, sentinelPort, s.sentinel.dir, filepath.Join(s.sentinel.dir, "sentinel.log"), s.MasterName, masterPort)
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		t.Fatalf("redistest: write %s: %v", conf, err)
	}
	s.sentinel.args = []string{conf, "--sentinel"}
	s.Addrs = []string{s.sentinel.addr}

	t.Cleanup(func() {
		s.sentinel.stop()
		s.replica.stop()
		s.master.stop()
	})
	for _, p := range []*process{s.master, s.replica, s.sentinel} {
		p.start(t)
		waitPing(t, p.addr)
	}
	s.waitReplicaSynced()
	s.waitSentinelSees()
	return s
}

// waitReplicaSynced waits until the replica reports its link to the master
// up.
func (s *Sentinel) waitReplicaSynced() {
	s.t.Helper()
	client := redis.NewClient(&redis.Options{Addr: s.replica.addr})
	defer client.Close()
	deadline := time.Now().Add(clusterReadyTimeout)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		info, err := client.Info(ctx, "replication").Result()
		cancel()
		if err == nil && strings.Contains(info, "master_link_status:up") {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	s.t.Fatalf("redistest: replica %s not in sync with %s after %v", s.replica.addr, s.master.addr, clusterReadyTimeout)
}

// waitSentinelSees waits until the Sentinel names the master and has found
// the replica, so that it can fail over.
func (s *Sentinel) waitSentinelSees() {
	s.t.Helper()
	client := redis.NewSentinelClient(&redis.Options{Addr: s.sentinel.addr})
	defer client.Close()
	deadline := time.Now().Add(clusterReadyTimeout)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		replicas, err := client.Replicas(ctx, s.MasterName).Result()
		cancel()
		if err == nil && len(replicas) > 0 {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	s.t.Fatalf("redistest: sentinel %s did not find the replica of %s after %v; log in %s",
		s.sentinel.addr, s.MasterName, clusterReadyTimeout, filepath.Join(s.sentinel.dir, "sentinel.log"))
}

// Client returns a Sentinel-backed client of the master, closed when the test
// ends.
func (s *Sentinel) Client(t testing.TB) *redis.Client {
	t.Helper()
	client := redis.NewFailoverClient(&redis.FailoverOptions{MasterName: s.MasterName, SentinelAddrs: s.Addrs})
	t.Cleanup(func() { client.Close() })
	return client
}

// Prefix returns a key prefix unique to this test. Every process is private
// to the test and stopped at its end, so nothing is deleted afterwards.
func (s *Sentinel) Prefix(t testing.TB) string {
	t.Helper()
	return newPrefix()
}

// CurrentMaster returns the master's address as the Sentinel reports it.
func (s *Sentinel) CurrentMaster(t testing.TB) string {
	t.Helper()
	client := redis.NewSentinelClient(&redis.Options{Addr: s.sentinel.addr})
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	addr, err := client.GetMasterAddrByName(ctx, s.MasterName).Result()
	if err != nil || len(addr) != 2 {
		t.Fatalf("redistest: SENTINEL GET-MASTER-ADDR-BY-NAME %s: %v %v", s.MasterName, addr, err)
	}
	return net.JoinHostPort(addr[0], addr[1])
}

// FailOver waits until the replica has every write of the master, kills the
// master, and waits until the Sentinel reports the replica as master and the
// replica accepts writes.
func (s *Sentinel) FailOver() {
	s.t.Helper()
	master := redis.NewClient(&redis.Options{Addr: s.master.addr})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	acked, err := master.Wait(ctx, 1, 5*time.Second).Result()
	cancel()
	master.Close()
	if err != nil || acked < 1 {
		s.t.Fatalf("redistest: WAIT for the replica of %s: %d replicas acknowledged, %v", s.master.addr, acked, err)
	}
	s.master.stop()

	replica := redis.NewClient(&redis.Options{Addr: s.replica.addr})
	defer replica.Close()
	deadline := time.Now().Add(sentinelFailoverTimeout)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		role, err := replica.Do(ctx, "ROLE").Slice()
		cancel()
		if err == nil && len(role) > 0 && role[0] == "master" && s.CurrentMaster(s.t) == s.replica.addr {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.t.Fatalf("redistest: no failover to %s within %v; log in %s",
		s.replica.addr, sentinelFailoverTimeout, filepath.Join(s.sentinel.dir, "sentinel.log"))
}

// ProxyACLCommands are the command rules of a least-privilege Redis ACL user
// for byokproxy: every command it runs, including those its Lua scripts call.
// CLUSTER SLOTS and COMMAND serve the Cluster client, which reads the
// command table to route commands, and SCAN, MULTI and EXEC serve
// "byokproxy identity rewrap".
const ProxyACLCommands = "+ping +hmget +hget +hgetall +hset +hsetnx +hdel +hexists +hincrby " +
	"+set +del +expire +expireat +zadd +zmscore +zremrangebyscore +xadd " +
	"+eval +evalsha +scan +multi +exec +cluster|slots +command +publish +subscribe +unsubscribe"

// AddProxyUser creates an ACL user on each node in addrs that may run only
// ProxyACLCommands, only on keys under prefix. Use it only on servers the
// test started itself, because it changes the server's users.
func AddProxyUser(t testing.TB, addrs []string, user, password, prefix string) {
	t.Helper()
	args := []any{"ACL", "SETUSER", user, "reset", "on", ">" + password, "~" + prefix + "*", "resetchannels", "&" + prefix + "changes", "-@all"}
	for _, rule := range strings.Fields(ProxyACLCommands) {
		args = append(args, rule)
	}
	for _, addr := range addrs {
		client := redis.NewClient(&redis.Options{Addr: addr})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := client.Do(ctx, args...).Err()
		cancel()
		client.Close()
		if err != nil {
			t.Fatalf("redistest: ACL SETUSER %s on %s: %v", user, addr, err)
		}
	}
}
