package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/byokproxy/byokproxy/provider"
)

// requestKind is one kind of request the load sends.
type requestKind struct {
	name     string
	provider string
	path     string
	body     string
	// terminal is the marker that a complete stream contains, empty for a
	// JSON body.
	terminal string
}

var requestKinds = []requestKind{
	{"openai chat", provider.OpenAI, "/openai/v1/chat/completions",
		`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"say hello to the soak test"}]}`, ""},
	{"openai chat stream", provider.OpenAI, "/openai/v1/chat/completions",
		`{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"say hello to the soak test"}]}`, "data: [DONE]"},
	{"openai responses", provider.OpenAI, "/openai/v1/responses",
		`{"model":"gpt-4o-mini","input":"say hello to the soak test"}`, ""},
	{"openai embeddings", provider.OpenAI, "/openai/v1/embeddings",
		`{"model":"text-embedding-3-small","input":"soak test"}`, ""},
	{"anthropic messages", provider.Anthropic, "/anthropic/v1/messages",
		`{"model":"claude-haiku-4-5","max_tokens":16,"messages":[{"role":"user","content":"say hello to the soak test"}]}`, ""},
	{"anthropic messages stream", provider.Anthropic, "/anthropic/v1/messages",
		`{"model":"claude-haiku-4-5","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"say hello to the soak test"}]}`, "message_stop"},
	{"google generate", provider.Google, "/google/v1beta/models/gemini-2.5-flash:generateContent",
		`{"contents":[{"role":"user","parts":[{"text":"say hello to the soak test"}]}]}`, ""},
	{"google stream", provider.Google, "/google/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
		`{"contents":[{"role":"user","parts":[{"text":"say hello to the soak test"}]}]}`, `"finishReason"`},
}

// kindStats are the outcomes of one request kind.
type kindStats struct {
	sent        int
	statuses    map[int]int
	transport   int // no HTTP response at all
	cutStreams  int // 200 streams without their terminal event
	latencies   []time.Duration
	firstErrors []string
}

// loadResult is everything the load phase observed.
type loadResult struct {
	sent        int
	byKind      map[string]*kindStats
	okByMailbox map[string]int // 2xx responses per mailbox
	admin       map[string]int // audit kinds of successful admin changes
	adminErrors []string
	peak        sample

	// staleSent counts requests sent with a token already revoked, and
	// staleAccepted those of them that did not get 401. currentRejected
	// counts 401s for a token that was still current.
	staleSent       int
	staleAccepted   int
	currentRejected int
}

func (l *loadResult) answered() int {
	n := 0
	for _, k := range l.byKind {
		for _, c := range k.statuses {
			n += c
		}
	}
	return n
}

func (l *loadResult) status(code int) int {
	n := 0
	for _, k := range l.byKind {
		n += k.statuses[code]
	}
	return n
}

func (l *loadResult) transportErrors() int {
	n := 0
	for _, k := range l.byKind {
		n += k.transport
	}
	return n
}

func (l *loadResult) serverErrors() int {
	n := 0
	for _, k := range l.byKind {
		for code, c := range k.statuses {
			if code >= 500 {
				n += c
			}
		}
	}
	return n
}

// requestEvents is the number of request audit events the proxy should
// write: one per response, except 401s for revoked tokens, which the proxy
// rejects before it has identified a mailbox to record.
func (l *loadResult) requestEvents() int { return l.answered() - l.status(http.StatusUnauthorized) }

func (l *loadResult) adminEvents() int {
	n := 0
	for _, c := range l.admin {
		n += c
	}
	return n
}

// expectedEvents counts the audit events of the load phase and of setup.
func (l *loadResult) expectedEvents() int { return l.requestEvents() + l.adminEvents() }

// outcome is one finished request.
type outcome struct {
	kind     string
	mailbox  string
	status   int
	err      string
	cut      bool
	duration time.Duration
	// staleAtSend reports a token revoked before the request was sent, and
	// currentAtEnd a token not revoked when the response arrived.
	staleAtSend  bool
	currentAtEnd bool
}

// drive sends the load until ctx ends, changing keys, sources and tokens
// every o.rotateEvery, and sampling the proxy every 5 s for peak values.
func (env *environment) drive(ctx context.Context, o options, log *slog.Logger) *loadResult {
	res := &loadResult{byKind: map[string]*kindStats{}, okByMailbox: map[string]int{}, admin: map[string]int{}}
	for _, k := range requestKinds {
		res.byKind[k.name] = &kindStats{statuses: map[int]int{}}
	}
	// Setup stored a key and selected byok for each provider of each BYOK
	// mailbox.
	for _, m := range env.mailboxes {
		if m.byok {
			res.admin["key.set"] += len(provider.Names)
			res.admin["source.changed"] += len(provider.Names)
		}
	}

	outcomes := make(chan outcome, 1024)
	var collect sync.WaitGroup
	collect.Add(1)
	go func() {
		defer collect.Done()
		for out := range outcomes {
			res.record(out)
		}
	}()

	tick := time.NewTicker(time.Second / time.Duration(o.rate))
	defer tick.Stop()
	var workers sync.WaitGroup
	for w := range o.workers {
		workers.Add(1)
		go func() {
			defer workers.Done()
			rng := rand.New(rand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
			// Each client keeps the tokens it has and takes a new one only
			// after a 401, as an application would, so revocations show.
			tokens := make([]string, len(env.mailboxes))
			for {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
				kind := requestKinds[rng.IntN(len(requestKinds))]
				i := rng.IntN(len(env.mailboxes))
				if tokens[i] == "" {
					tokens[i] = env.token(i)
				}
				out := env.send(kind, i, tokens[i])
				if out.status == http.StatusUnauthorized {
					tokens[i] = env.token(i)
				}
				outcomes <- out
			}
		}()
	}

	var background sync.WaitGroup
	background.Add(2)
	go func() {
		defer background.Done()
		env.rotate(ctx, o.rotateEvery, res, log)
	}()
	go func() {
		defer background.Done()
		res.peak = env.samplePeak(ctx, 5*time.Second)
	}()

	workers.Wait()
	close(outcomes)
	collect.Wait()
	background.Wait()
	return res
}

func (res *loadResult) record(out outcome) {
	k := res.byKind[out.kind]
	res.sent++
	k.sent++
	if out.err != "" {
		k.transport++
		if len(k.firstErrors) < 5 {
			k.firstErrors = append(k.firstErrors, out.err)
		}
		return
	}
	k.statuses[out.status]++
	k.latencies = append(k.latencies, out.duration)
	if out.staleAtSend {
		res.staleSent++
		if out.status != http.StatusUnauthorized {
			res.staleAccepted++
		}
	}
	if out.status == http.StatusUnauthorized && out.currentAtEnd {
		res.currentRejected++
	}
	if out.cut {
		k.cutStreams++
	}
	if out.status/100 == 2 {
		res.okByMailbox[out.mailbox]++
	}
}

// send makes one request for mailbox i with token, and notes whether the
// token was revoked before the request or still current after it.
func (env *environment) send(kind requestKind, i int, token string) outcome {
	stale := token != env.token(i)
	out := env.request(kind, i, token)
	out.staleAtSend = stale
	out.currentAtEnd = token == env.token(i)
	return out
}

// request makes one request for mailbox i with token and reads the whole
// response.
func (env *environment) request(kind requestKind, i int, token string) outcome {
	out := outcome{kind: kind.name, mailbox: env.mailboxes[i].id}
	req, err := http.NewRequest(http.MethodPost, env.proxyURL+kind.path, strings.NewReader(kind.body))
	if err != nil {
		out.err = err.Error()
		return out
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+token)
	if kind.provider == provider.Anthropic {
		req.Header.Set("Anthropic-Version", "2023-06-01")
	}
	// Requests run to completion after the load's deadline, so each one
	// that was sent gets its response.

	start := time.Now()
	resp, err := env.client.Do(req)
	if err != nil {
		out.err = err.Error()
		return out
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	out.duration = time.Since(start)
	out.status = resp.StatusCode

	if err != nil {
		out.err = "reading the body: " + err.Error()
		return out
	}
	if kind.terminal != "" && resp.StatusCode == http.StatusOK && !bytes.Contains(body, []byte(kind.terminal)) {
		out.cut = true
	}
	return out
}

// rotate changes one BYOK mailbox's key and key source every interval, and
// every fifth time revokes one mailbox's tokens, until ctx ends. It also
// clears the emulators' request records, which would otherwise grow for
// the whole run.
func (env *environment) rotate(ctx context.Context, every time.Duration, res *loadResult, log *slog.Logger) {
	var byok []*mailboxState
	for _, m := range env.mailboxes {
		if m.byok {
			byok = append(byok, m)
		}
	}
	t := time.NewTicker(every)
	defer t.Stop()
	// Admin calls use their own context, so a change started just before
	// the load ends still completes and is counted.
	call := func(method, path string, body, out any) bool {
		callCtx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := env.adminCall(callCtx, method, path, body, out); err != nil {
			res.adminErrors = append(res.adminErrors, err.Error())
			log.Warn("admin change failed", "error", err)
			return false
		}
		return true
	}
	for n := 0; ; n++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, e := range env.emulators {
			e.Reset()
		}
		m := byok[n%len(byok)]
		p := provider.Names[n%len(provider.Names)]
		base := "/admin/v1/mailboxes/" + m.id + "/providers/" + p

		next := 1 - m.keyAt[p]
		if call(http.MethodPut, base+"/key", map[string]string{"key": env.byokKeys[p][next]}, nil) {
			m.keyAt[p] = next
			res.admin["key.set"]++
		}
		source := "shared"
		if !m.onKey[p] {
			source = "byok"
		}
		if call(http.MethodPut, base+"/source", map[string]string{"source": source}, nil) {
			m.onKey[p] = source == "byok"
			res.admin["source.changed"]++
		}
		if n%5 == 4 {
			target := env.mailboxes[(n/5)%len(env.mailboxes)]
			var tok struct{ Token string }
			if call(http.MethodPost, "/admin/v1/mailboxes/"+target.id+"/token/revoke", nil, &tok) {
				env.mu.Lock()
				target.token = tok.Token
				env.mu.Unlock()
				res.admin["token.revoked"]++
			}
		}
	}
}

// samplePeak samples the proxy every interval until ctx ends and returns
// the highest value of each figure.
func (env *environment) samplePeak(ctx context.Context, every time.Duration) sample {
	peak := sample{fds: map[string]int{}}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return peak
		case <-t.C:
		}
		s, err := env.sample()
		if err != nil {
			continue
		}
		peak.goroutines = max(peak.goroutines, s.goroutines)
		peak.threads = max(peak.threads, s.threads)
		peak.rss = max(peak.rss, s.rss)
		peak.heapInuse = max(peak.heapInuse, s.heapInuse)
		peak.fdTotal = max(peak.fdTotal, s.fdTotal)
		for _, c := range fdClasses {
			peak.fds[c] = max(peak.fds[c], s.fds[c])
		}
	}
}

// percentile returns the q-th quantile of d, which it sorts.
func percentile(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	return d[min(int(q*float64(len(d))), len(d)-1)]
}
