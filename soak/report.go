package main

import (
	"fmt"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"time"
)

// results is one run's measurements.
type results struct {
	opts          options
	started       time.Time
	loadEnded     time.Time
	finished      time.Time
	machine       string
	commit        string
	before        sample
	peak          sample
	after         sample
	settleSamples []sample
	load          *loadResult
	audit         auditCounts
	usageRequests map[string]int
	dropped       float64
}

// check is one pass or fail criterion of a run.
type check struct {
	name   string
	ok     bool
	detail string
}

// Tolerances of the resource checks, and why.
const (
	// goroutineSlack allows for goroutines that come and go on their own,
	// such as a metrics scrape still being served.
	goroutineSlack = 2
	// heapSlack allows for garbage not yet collected at the final sample;
	// a leak of one object per request would exceed it many times over.
	heapSlack = 16 << 20
)

// redisPoolSize is go-redis's default pool size, 10 connections per CPU.
// Its idle connections stay open after the load, up to this many.
func redisPoolSize() int { return 10 * runtime.GOMAXPROCS(0) }

func (r *results) checks() []check {
	l := r.load
	var out []check
	add := func(name string, ok bool, format string, args ...any) {
		out = append(out, check{name: name, ok: ok, detail: fmt.Sprintf(format, args...)})
	}

	add("every request got a response", l.transportErrors() == 0 && l.answered() == l.sent,
		"%d sent, %d responses, %d without a response", l.sent, l.answered(), l.transportErrors())
	add("no 5xx responses", l.serverErrors() == 0, "%d responses with status 500 or more", l.serverErrors())
	other := l.answered() - l.status(http.StatusOK) - l.status(http.StatusUnauthorized)
	add("every response is 200, or 401 for a revoked token", other == 0,
		"%d other responses; %d 401s after %d revocations", other, l.status(http.StatusUnauthorized), l.admin["token.revoked"])
	add("revoked tokens rejected", l.staleAccepted == 0,
		"%d requests sent with a revoked token, %d of them not rejected", l.staleSent, l.staleAccepted)
	add("no 401 for a current token", l.currentRejected == 0, "%d 401s for a token not revoked", l.currentRejected)
	cut := 0
	for _, k := range l.byKind {
		cut += k.cutStreams
	}
	add("every stream has its terminal event", cut == 0, "%d streams cut", cut)

	requests := r.audit.byKind["byok"] + r.audit.byKind["metered"]
	add("one audit event per proxied request", requests == l.requestEvents(),
		"%d request events in the stream, %d expected", requests, l.requestEvents())
	adminOK := true
	var adminDetail []string
	for _, kind := range sortedKeys(l.admin) {
		if r.audit.byKind[kind] != l.admin[kind] {
			adminOK = false
		}
		adminDetail = append(adminDetail, fmt.Sprintf("%s %d of %d", kind, r.audit.byKind[kind], l.admin[kind]))
	}
	add("one audit event per admin change", adminOK && len(l.adminErrors) == 0, "%s; %d admin calls failed",
		strings.Join(adminDetail, ", "), len(l.adminErrors))
	add("no audit events dropped", r.dropped == 0, "byokproxy_audit_events_dropped_total = %v", r.dropped)

	usageOK := true
	sumUsage, sumOK := 0, 0
	for _, m := range r.usageRequestsKeys() {
		if r.usageRequests[m] != l.okByMailbox[m] {
			usageOK = false
		}
		sumUsage += r.usageRequests[m]
		sumOK += l.okByMailbox[m]
	}
	add("usage counters match the successful requests of each mailbox", usageOK,
		"%d requests counted, %d successful responses", sumUsage, sumOK)

	add("goroutines back to baseline", r.after.goroutines <= r.before.goroutines+goroutineSlack,
		"%d before, %d at peak, %d after (slack %d)", r.before.goroutines, r.peak.goroutines, r.after.goroutines, goroutineSlack)
	fdOK := true
	for _, c := range fdClasses {
		if c != fdRedis && r.after.fds[c] != r.before.fds[c] {
			fdOK = false
		}
	}
	add("open files other than Redis connections back to baseline", fdOK,
		"%d before, %d at peak, %d after in total", r.before.fdTotal, r.peak.fdTotal, r.after.fdTotal)
	add("idle Redis connections within the client's pool size", r.after.fds[fdRedis] <= redisPoolSize(),
		"%d before, %d after, pool size %d", r.before.fds[fdRedis], r.after.fds[fdRedis], redisPoolSize())
	perRequest := 0
	if l.sent > 0 {
		perRequest = heapSlack / l.sent
	}
	add("heap in use back to baseline", r.after.heapInuse <= r.before.heapInuse+heapSlack,
		"%s MiB before, %s MiB at peak, %s MiB after; the slack of %s MiB would hide a leak of up to %d bytes per request",
		mib(r.before.heapInuse), mib(r.peak.heapInuse), mib(r.after.heapInuse), mib(heapSlack), perRequest)
	return out
}

func (r *results) usageRequestsKeys() []string {
	keys := map[string]bool{}
	for m := range r.usageRequests {
		keys[m] = true
	}
	for m := range r.load.okByMailbox {
		keys[m] = true
	}
	return sortedKeys(keys)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func (r *results) failedChecks() []string {
	var failed []string
	for _, c := range r.checks() {
		if !c.ok {
			failed = append(failed, c.name)
		}
	}
	return failed
}

// markdown renders the run as the soak page of the docs.
func (r *results) markdown() string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	l := r.load

	p("# Soak test")
	p("")
	p("`make soak` runs `go run ./soak -duration 3m -report docs/soak.md`, which")
	p("rewrites this page with the figures of its run. The soak builds the")
	p("`byokproxy` binary and runs it on loopback against a private `redis-server`")
	p("and the emulated Anthropic, OpenAI and Google AI upstreams of")
	p("`internal/upstreamtest`. Clients send a mix of streaming and non-streaming")
	p("requests to all three providers at a capped rate, for mailboxes on their")
	p("own keys and on the shared key. Every %v the admin API stores a new key", r.opts.rotateEvery)
	p("for one mailbox and provider and switches its key source, and every fifth")
	p("time it revokes one mailbox's tokens. Each client keeps the tokens it has")
	p("until it gets a 401, then takes the current one, as an application would.")
	p("")
	p("Resources are measured on the proxy process from `/proc/PID` (threads,")
	p("resident memory, open files by what is at the other end) and from its")
	p("`/metrics` page (goroutines, heap in use). The soak measures once before")
	p("the load, every 5 s during it (peak), and after a wait of %v. The wait is", r.opts.settle)
	p("longer than the proxy's 90 s idle timeout for upstream connections and")
	p("Go's 2 min forced GC period. Open files are compared class by class.")
	p("go-redis keeps up to 10 idle connections per CPU in its pool, so Redis")
	p("connections are checked against that bound rather than the baseline.")
	p("")
	p("## Last run")
	p("")
	p("| | |")
	p("|---|---|")
	p("| date (UTC) | %s to %s |", r.started.Format("2006-01-02 15:04:05"), r.finished.Format("15:04:05"))
	p("| machine | %s |", r.machine)
	p("| commit | `%s` |", r.commit)
	p("| load | %v, %d clients, at most %d requests/s, %d mailboxes |", r.opts.duration, r.opts.workers, r.opts.rate, r.opts.mailboxes)
	p("| requests | %d sent, %d responses, %.0f per second |", l.sent, l.answered(), float64(l.sent)/r.opts.duration.Seconds())
	p("| admin changes | %d key changes, %d source changes, %d token revocations |",
		l.admin["key.set"], l.admin["source.changed"], l.admin["token.revoked"])
	p("")
	p("### Checks")
	p("")
	for _, c := range r.checks() {
		mark := "pass"
		if !c.ok {
			mark = "**FAIL**"
		}
		p("- %s: %s (%s)", mark, c.name, c.detail)
	}
	p("")
	p("### Requests")
	p("")
	p("Latency is from sending the request to reading the last byte of the")
	p("response, on the same machine as the proxy and the upstreams.")
	p("")
	p("| kind | sent | 200 | 401 | other | cut streams | p50 | p99 |")
	p("|---|---:|---:|---:|---:|---:|---:|---:|")
	for _, k := range requestKinds {
		s := l.byKind[k.name]
		other := s.sent - s.statuses[http.StatusOK] - s.statuses[http.StatusUnauthorized]
		p("| %s | %d | %d | %d | %d | %d | %s | %s |", k.name, s.sent, s.statuses[http.StatusOK],
			s.statuses[http.StatusUnauthorized], other, s.cutStreams,
			roundDuration(percentile(s.latencies, 0.5)), roundDuration(percentile(s.latencies, 0.99)))
	}
	p("")
	p("### Audit stream")
	p("")
	p("| kind | events |")
	p("|---|---:|")
	for _, kind := range sortedKeys(r.audit.byKind) {
		p("| %s | %d |", kind, r.audit.byKind[kind])
	}
	p("| total | %d |", r.audit.total)
	p("")
	p("### Proxy process")
	p("")
	p("| figure | before | peak | after |")
	p("|---|---:|---:|---:|")
	p("| goroutines | %d | %d | %d |", r.before.goroutines, r.peak.goroutines, r.after.goroutines)
	p("| OS threads | %d | %d | %d |", r.before.threads, r.peak.threads, r.after.threads)
	p("| resident memory (MiB) | %s | %s | %s |", mib(r.before.rss), mib(r.peak.rss), mib(r.after.rss))
	p("| heap in use (MiB) | %s | %s | %s |", mib(r.before.heapInuse), mib(r.peak.heapInuse), mib(r.after.heapInuse))
	p("| open files | %d | %d | %d |", r.before.fdTotal, r.peak.fdTotal, r.after.fdTotal)
	for _, c := range fdClasses {
		p("| - %s | %d | %d | %d |", c, r.before.fds[c], r.peak.fds[c], r.after.fds[c])
	}
	p("")
	p("The peak of each figure is the highest of the samples taken every 5 s, so")
	p("short spikes between samples are missed. Resident memory is reported but")
	p("not checked: the Go runtime returns freed memory to the operating system")
	p("gradually, so it stays above the baseline for a while after the load.")
	if len(r.settleSamples) > 0 {
		p("")
		p("While settling:")
		p("")
		p("| seconds after the load | goroutines | open files | heap in use (MiB) | resident memory (MiB) |")
		p("|---:|---:|---:|---:|---:|")
		for _, s := range r.settleSamples {
			p("| %.0f | %d | %d | %s | %s |", s.at.Sub(r.loadEnded).Seconds(), s.goroutines, s.fdTotal, mib(s.heapInuse), mib(s.rss))
		}
	}
	return b.String()
}

func roundDuration(d time.Duration) string {
	switch {
	case d >= time.Second:
		return d.Round(10 * time.Millisecond).String()
	case d >= time.Millisecond:
		return d.Round(100 * time.Microsecond).String()
	}
	return d.Round(time.Microsecond).String()
}
