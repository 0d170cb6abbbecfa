// Command loadgen drives the benchmarks and prints one JSON result per run.
//
// Modes:
//
//	open    open loop: requests at a fixed rate. Latency counts from each
//	        request's scheduled send time, so a slow target cannot slow the
//	        arrivals down and hide its own queueing
//	sat     closed loop: -conns workers send back to back, for the highest
//	        throughput the target reaches
//	stream  open loop of SSE streams: time to first event, complete and cut
//	        streams
//	idle    holds -streams concurrent streams open after their first event
//	        and reads the target's resident memory at each level
//	ports   prints -n free loopback ports
//
// With -pid, the CPU time of that process over the measured window is
// divided by the requests completed in it, so the load generator's own CPU
// is never counted. It is read from the process's CPU-time clock, or from
// utime+stime in /proc/PID/stat where the clock cannot be read.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

type options struct {
	mode        string
	url         string
	token       string
	headers     headerFlags
	kind        string
	bodyBytes   int
	rate        float64
	duration    time.Duration
	warmup      time.Duration
	conns       int
	maxInFlight int
	timeout     time.Duration
	streams     string
	ramp        float64
	settle      time.Duration
	events      int
	pids        pidFlags
	clkTck      int
	target      string
	phase       string
	round       int
	n           int
}

type headerFlags []string

func (h *headerFlags) String() string     { return strings.Join(*h, ", ") }
func (h *headerFlags) Set(v string) error { *h = append(*h, v); return nil }

// pidFlags are NAME=PID pairs, of which the first is the target's process.
type pidFlags []namedPID

type namedPID struct {
	name string
	pid  int
}

func (p *pidFlags) String() string { return fmt.Sprint(*p) }
func (p *pidFlags) Set(v string) error {
	name, num, ok := strings.Cut(v, "=")
	pid, err := strconv.Atoi(num)
	if !ok || err != nil || pid <= 0 {
		return fmt.Errorf("invalid -pid %q: use NAME=PID", v)
	}
	*p = append(*p, namedPID{name, pid})
	return nil
}

func main() {
	var o options
	flag.StringVar(&o.mode, "mode", "open", "open, sat, stream, idle or ports")
	flag.StringVar(&o.url, "url", "", "request `URL`")
	flag.StringVar(&o.token, "token", "", "sent as Authorization: Bearer TOKEN")
	flag.Var(&o.headers, "header", "extra request header `NAME:VALUE` (repeatable)")
	flag.StringVar(&o.kind, "kind", "chat", "request body: chat, chat-stream, chat-stream-usage or gemini-stream")
	flag.IntVar(&o.bodyBytes, "body-bytes", 1024, "approximate request body size in `bytes`")
	flag.Float64Var(&o.rate, "rate", 1000, "requests (or streams) per second in open, stream and idle modes")
	flag.DurationVar(&o.duration, "duration", 5*time.Second, "measured window")
	flag.DurationVar(&o.warmup, "warmup", time.Second, "load before the measured window, not counted")
	flag.IntVar(&o.conns, "conns", 64, "concurrent connections in sat mode")
	flag.IntVar(&o.maxInFlight, "max-inflight", 4096, "requests in flight beyond which open-loop arrivals are dropped and counted as errors")
	flag.DurationVar(&o.timeout, "timeout", 30*time.Second, "per-request timeout")
	flag.StringVar(&o.streams, "streams", "1000,10000", "idle mode: comma-separated stream counts to reach and measure")
	flag.Float64Var(&o.ramp, "ramp", 2000, "idle mode: new streams per second")
	flag.DurationVar(&o.settle, "settle", 2*time.Second, "idle mode: wait before reading memory at each level")
	flag.IntVar(&o.events, "events", 20, "events a complete stream carries, not counting [DONE]")
	flag.Var(&o.pids, "pid", "process `NAME=PID` whose CPU (and, for the first, memory) is measured (repeatable)")
	flag.IntVar(&o.clkTck, "clk-tck", 100, "clock ticks per second of /proc/PID/stat (getconf CLK_TCK)")
	flag.StringVar(&o.target, "target", "", "target name recorded in the result")
	flag.StringVar(&o.phase, "phase", "", "phase name recorded in the result (default: the mode)")
	flag.IntVar(&o.round, "round", 0, "round number recorded in the result")
	flag.IntVar(&o.n, "n", 1, "ports mode: how many ports")
	flag.Parse()
	if o.phase == "" {
		o.phase = o.mode
	}

	var res *result
	var err error
	switch o.mode {
	case "ports":
		err = printPorts(o.n)
		if err == nil {
			return
		}
	case "open":
		res, err = runOpen(o)
	case "sat":
		res, err = runSaturation(o)
	case "stream":
		res, err = runStreams(o)
	case "idle":
		res, err = runIdle(o)
	default:
		err = fmt.Errorf("unknown -mode %q", o.mode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
	json.NewEncoder(os.Stdout).Encode(res)
}

// result is one line of the benchmark record. Times are in milliseconds
// and CPU in microseconds unless the name says otherwise.
type result struct {
	Target   string  `json:"target"`
	Phase    string  `json:"phase"`
	Round    int     `json:"round"`
	Rate     float64 `json:"rate,omitempty"`
	Conns    int     `json:"conns,omitempty"`
	WindowS  float64 `json:"window_s"`
	Sent     int     `json:"sent"`
	OK       int     `json:"ok"`
	Errors   int     `json:"errors"`
	ErrorEx  string  `json:"error_example,omitempty"`
	Through  float64 `json:"throughput"`
	P50      float64 `json:"p50_ms,omitempty"`
	P90      float64 `json:"p90_ms,omitempty"`
	P99      float64 `json:"p99_ms,omitempty"`
	P999     float64 `json:"p999_ms,omitempty"`
	Max      float64 `json:"max_ms,omitempty"`
	TTFE50   float64 `json:"ttfe_p50_ms,omitempty"`
	TTFE99   float64 `json:"ttfe_p99_ms,omitempty"`
	Cut      int     `json:"cut"`
	CutEx    string  `json:"cut_example,omitempty"`
	CPUPerOp float64 `json:"cpu_us_per_op,omitempty"`
	// OtherCPU is the CPU per operation of the other -pid processes.
	OtherCPU map[string]float64 `json:"other_cpu_us_per_op,omitempty"`
	// RSS is the target's resident memory in KiB, before any stream
	// ("0") and at each idle stream count.
	RSS map[string]int64 `json:"rss_kib,omitempty"`
}

func newClient(o options, conns int) *http.Client {
	return &http.Client{
		Timeout: o.timeout,
		Transport: &http.Transport{
			Proxy:               nil,
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConns:        conns,
			MaxIdleConnsPerHost: conns,
			IdleConnTimeout:     90 * time.Second,
			DisableCompression:  true,
		},
	}
}

func printPorts(n int) error {
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		lns = append(lns, ln)
		fmt.Println(ln.Addr().(*net.TCPAddr).Port)
	}
	return nil
}

func newResult(o options) *result {
	return &result{Target: o.target, Phase: o.phase, Round: o.round}
}

// withDeadline bounds a whole run, whatever the target does.
func withDeadline(o options, extra time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), o.warmup+o.duration+o.timeout+extra)
}
