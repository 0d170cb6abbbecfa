package main

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// sample is one measurement of the proxy process.
type sample struct {
	at         time.Time
	goroutines int
	threads    int
	rss        int64 // bytes, from /proc/PID/status VmRSS
	heapInuse  int64 // bytes, go_memstats_heap_inuse_bytes
	fdTotal    int
	fds        map[string]int // open files by fdClass
}

// Classes of open file descriptors, by what is at the other end.
const (
	fdListener = "listening sockets"
	fdClient   = "client connections"
	fdUpstream = "upstream connections"
	fdRedis    = "Redis connections"
	fdSocket   = "other sockets"
	fdOther    = "other files"
)

var fdClasses = []string{fdListener, fdClient, fdUpstream, fdRedis, fdSocket, fdOther}

// sample reads /proc for the proxy's threads, memory and open files, then
// its metrics. It reads /proc first, so the metrics request's own
// connection is not counted.
func (env *environment) sample() (sample, error) {
	s := sample{at: time.Now(), fds: map[string]int{}}
	pid := env.proxyCmd.Process.Pid
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, fmt.Errorf("read /proc status (the soak needs Linux): %w", err)
	}
	for line := range strings.SplitSeq(string(status), "\n") {
		name, value, _ := strings.Cut(line, ":")
		fields := strings.Fields(value)
		if len(fields) == 0 {
			continue
		}
		switch name {
		case "Threads":
			s.threads, _ = strconv.Atoi(fields[0])
		case "VmRSS":
			kib, _ := strconv.ParseInt(fields[0], 10, 64)
			s.rss = kib << 10
		}
	}
	if err := env.countFDs(pid, &s); err != nil {
		return s, err
	}
	metrics, err := scrapeMetrics(env.metricsURL)
	if err != nil {
		return s, err
	}
	s.goroutines = int(metrics["go_goroutines"])
	s.heapInuse = int64(metrics["go_memstats_heap_inuse_bytes"])
	return s, nil
}

// socketEnd is the local and remote TCP port of a socket, and whether it is
// listening.
type socketEnd struct {
	local, remote int
	listening     bool
}

// readSockets maps socket inodes to their ends, from /proc/PID/net/tcp and
// tcp6.
func readSockets(pid int) map[string]socketEnd {
	out := map[string]socketEnd{}
	for _, name := range []string{"tcp", "tcp6"} {
		f, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", pid, name))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		sc.Scan() // header line
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 10 {
				continue
			}
			out[fields[9]] = socketEnd{
				local:     hexPort(fields[1]),
				remote:    hexPort(fields[2]),
				listening: fields[3] == "0A",
			}
		}
		f.Close()
	}
	return out
}

// hexPort returns the port of an address such as 0100007F:1F90.
func hexPort(addr string) int {
	_, port, _ := strings.Cut(addr, ":")
	n, _ := strconv.ParseInt(port, 16, 32)
	return int(n)
}

func (env *environment) countFDs(pid int, s *sample) error {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	sockets := readSockets(pid)
	upstreamPorts := map[int]bool{}
	for _, e := range env.emulators {
		port, _ := strconv.Atoi(e.URL[strings.LastIndex(e.URL, ":")+1:])
		upstreamPorts[port] = true
	}
	listenPorts := map[int]bool{}
	for _, p := range env.ports {
		listenPorts[p] = true
	}
	for _, e := range entries {
		target, err := os.Readlink(dir + "/" + e.Name())
		if err != nil {
			continue // closed between ReadDir and Readlink
		}
		s.fdTotal++
		inode, ok := strings.CutPrefix(target, "socket:[")
		if !ok {
			s.fds[fdOther]++
			continue
		}
		end, ok := sockets[strings.TrimSuffix(inode, "]")]
		switch {
		case !ok:
			s.fds[fdSocket]++
		case end.listening:
			s.fds[fdListener]++
		case end.remote == env.redisPort:
			s.fds[fdRedis]++
		case upstreamPorts[end.remote]:
			s.fds[fdUpstream]++
		case listenPorts[end.local]:
			s.fds[fdClient]++
		default:
			s.fds[fdSocket]++
		}
	}
	return nil
}

// scrapeMetrics returns the samples of a Prometheus text page that have no
// labels, plus byokproxy_audit_events_dropped_total.
func scrapeMetrics(url string) (map[string]float64, error) {
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: status %d", url, resp.StatusCode)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		name, value, ok := strings.Cut(line, " ")
		if !ok || strings.Contains(name, "{") {
			continue
		}
		if v, err := strconv.ParseFloat(strings.TrimSpace(value), 64); err == nil {
			out[name] = v
		}
	}
	return out, sc.Err()
}

// describeMachine returns the CPU model, CPU count, kernel and Go version.
func describeMachine() string {
	model := "unknown CPU"
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(data), "\n") {
			if name, value, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(name) == "model name" {
				model = strings.TrimSpace(value)
				break
			}
		}
	}
	kernel := "unknown kernel"
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = "Linux " + strings.TrimSpace(string(data))
	}
	return fmt.Sprintf("%d CPUs (%s), %s, %s", runtime.NumCPU(), model, kernel, runtime.Version())
}

// commitHash returns the checked-out commit, marked when the tree has
// uncommitted changes.
func commitHash() string {
	out, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		return "unknown (not a git checkout)"
	}
	hash := strings.TrimSpace(string(out))
	if status, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(status) > 0 {
		hash += " with uncommitted changes"
	}
	return hash
}

func mib(b int64) string { return fmt.Sprintf("%.1f", float64(b)/(1<<20)) }
