// Command soak runs a bounded load test of the byokproxy binary on
// loopback: a private redis-server, the three emulated providers and the
// proxy, all started here, then mixed streaming and non-streaming traffic
// on all three providers while keys, key sources and tokens change through
// the admin API. Afterwards it checks that every request got a response,
// that every audit event and usage count arrived, and that goroutines, open
// files and memory went back to where they were before the load.
//
//	go run ./soak -duration 3m -report docs/soak.md
//
// It exits with status 1 when a check fails. Nothing listens on anything
// but 127.0.0.1, and every process it starts is stopped before it exits.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"
)

// options are the command-line settings of one run.
type options struct {
	duration    time.Duration
	settle      time.Duration
	workers     int
	rate        int
	mailboxes   int
	rotateEvery time.Duration
	binary      string
	report      string
	keepDir     bool
}

func main() {
	var o options
	flag.DurationVar(&o.duration, "duration", 3*time.Minute, "how long to send load")
	flag.DurationVar(&o.settle, "settle", 125*time.Second,
		"how long to wait after the load before the final measurement; longer than the proxy's 90 s upstream idle-connection timeout and Go's 2 min forced GC period")
	flag.IntVar(&o.workers, "workers", 16, "number of concurrent clients")
	flag.IntVar(&o.rate, "rate", 300, "maximum requests per second across all clients")
	flag.IntVar(&o.mailboxes, "mailboxes", 12, "number of mailboxes; two in three use their own keys")
	flag.DurationVar(&o.rotateEvery, "rotate-every", 3*time.Second, "interval between key, source and token changes through the admin API")
	flag.StringVar(&o.binary, "binary", "", "byokproxy binary to test (default: build ./cmd/byokproxy)")
	flag.StringVar(&o.report, "report", "", "write the results as Markdown to this file, such as docs/soak.md")
	flag.BoolVar(&o.keepDir, "keep", false, "keep the working directory with the proxy and Redis logs")
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := validate(o); err != nil {
		log.Error("invalid flags", "error", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	res, err := run(ctx, o, log)
	if err != nil {
		log.Error("soak run failed", "error", err)
		os.Exit(1)
	}
	summary := res.markdown()
	fmt.Println(summary)
	if o.report != "" {
		if err := os.WriteFile(o.report, []byte(summary), 0o644); err != nil {
			log.Error("writing the report failed", "file", o.report, "error", err)
			os.Exit(1)
		}
		log.Info("report written", "file", o.report)
	}
	if failed := res.failedChecks(); len(failed) > 0 {
		log.Error("soak checks failed", "checks", failed)
		os.Exit(1)
	}
}

func validate(o options) error {
	switch {
	case o.duration <= 0 || o.duration > time.Hour:
		return fmt.Errorf("-duration %v: use a value above 0 and at most 1h", o.duration)
	case o.settle < 0 || o.settle > 10*time.Minute:
		return fmt.Errorf("-settle %v: use a value from 0 to 10m", o.settle)
	case o.workers < 1 || o.workers > 256:
		return fmt.Errorf("-workers %d: use 1 to 256", o.workers)
	case o.rate < 1 || o.rate > 10000:
		return fmt.Errorf("-rate %d: use 1 to 10000", o.rate)
	case o.mailboxes < 3 || o.mailboxes > 1000:
		return fmt.Errorf("-mailboxes %d: use 3 to 1000", o.mailboxes)
	case o.rotateEvery < 100*time.Millisecond:
		return fmt.Errorf("-rotate-every %v: use 100ms or more", o.rotateEvery)
	}
	return nil
}

// run starts everything, drives the load and returns the measurements.
func run(ctx context.Context, o options, log *slog.Logger) (*results, error) {
	dir, err := os.MkdirTemp("", "byokproxy-soak-")
	if err != nil {
		return nil, err
	}
	if o.keepDir {
		log.Info("working directory kept", "dir", dir)
	} else {
		defer os.RemoveAll(dir)
	}

	bin := o.binary
	if bin == "" {
		bin = filepath.Join(dir, "byokproxy")
		log.Info("building the proxy", "output", bin)
		if err := buildProxy(ctx, bin); err != nil {
			return nil, err
		}
	}

	env, err := startEnvironment(ctx, dir, bin, log)
	if err != nil {
		return nil, err
	}
	defer env.stop(log)

	res := &results{opts: o, started: time.Now().UTC()}
	res.machine = describeMachine()
	res.commit = commitHash()

	if err := env.setup(ctx, o.mailboxes); err != nil {
		return nil, fmt.Errorf("set up mailboxes: %w", err)
	}
	env.client.CloseIdleConnections()
	env.admin.CloseIdleConnections()
	time.Sleep(2 * time.Second)
	if res.before, err = env.sample(); err != nil {
		return nil, fmt.Errorf("baseline measurement: %w", err)
	}
	log.Info("baseline", "goroutines", res.before.goroutines, "fds", res.before.fdTotal, "rss_mib", mib(res.before.rss))

	log.Info("load started", "duration", o.duration, "workers", o.workers, "rate", o.rate)
	loadCtx, cancel := context.WithTimeout(ctx, o.duration)
	res.load = env.drive(loadCtx, o, log)
	res.loadEnded = time.Now()
	cancel()
	if ctx.Err() != nil {
		return nil, errors.New("interrupted")
	}
	res.peak = res.load.peak
	env.client.CloseIdleConnections()
	env.admin.CloseIdleConnections()
	log.Info("load finished", "sent", res.load.sent, "answered", res.load.answered())

	if err := env.waitAudit(ctx, res.load.expectedEvents(), 60*time.Second); err != nil {
		log.Warn("audit stream incomplete after the wait", "error", err)
	}
	if res.audit, err = env.countAudit(ctx); err != nil {
		return nil, fmt.Errorf("read the audit stream: %w", err)
	}
	if res.usageRequests, err = env.usageRequests(ctx); err != nil {
		return nil, fmt.Errorf("read usage: %w", err)
	}
	if res.dropped, err = env.droppedEvents(); err != nil {
		return nil, fmt.Errorf("read the dropped-events counter: %w", err)
	}

	log.Info("settling before the final measurement", "settle", o.settle)
	res.settleSamples = env.settle(ctx, o.settle, 15*time.Second)
	if ctx.Err() != nil {
		return nil, errors.New("interrupted")
	}
	env.client.CloseIdleConnections()
	env.admin.CloseIdleConnections()
	if res.after, err = env.sample(); err != nil {
		return nil, fmt.Errorf("final measurement: %w", err)
	}
	res.finished = time.Now().UTC()
	return res, nil
}
