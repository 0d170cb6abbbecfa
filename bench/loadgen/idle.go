package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// runIdle opens streams that the upstream holds after their first event
// (the request should carry X-Bench-Hold), each on its own connection. At
// each level of -streams it waits until every stream has its first event,
// lets the target settle and reads its resident memory.
func runIdle(o options) (*result, error) {
	var levels []int
	for s := range strings.SplitSeq(o.streams, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("invalid -streams %q", o.streams)
		}
		levels = append(levels, n)
	}
	if len(o.pids) == 0 {
		return nil, errors.New("idle mode needs -pid")
	}
	pid := o.pids[0].pid
	top := levels[len(levels)-1]
	o.timeout = 0 // streams stay open until the run ends
	client := newClient(o, top)
	rq, err := newRequester(o, client)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	res := newResult(o)
	res.RSS = map[string]int64{}

	time.Sleep(o.settle)
	if res.RSS["0"], err = rssKiB(pid); err != nil {
		return nil, err
	}

	var ready, failed atomic.Int64
	var mu sync.Mutex
	var wg sync.WaitGroup
	opened := 0
	interval := time.Duration(float64(time.Second) / o.ramp)
	for _, level := range levels {
		start := time.Now()
		for i := 0; opened < level; i++ {
			time.Sleep(time.Until(start.Add(time.Duration(i) * interval)))
			opened++
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := holdStream(ctx, rq, &ready)
				if err != nil && ctx.Err() == nil {
					failed.Add(1)
					mu.Lock()
					res.ErrorEx = err.Error()
					mu.Unlock()
				}
			}()
		}
		waitUntil := time.Now().Add(60 * time.Second)
		for ready.Load()+failed.Load() < int64(level) && time.Now().Before(waitUntil) {
			time.Sleep(50 * time.Millisecond)
		}
		// Streams the target rejected are counted in the result, with the
		// memory of those it kept open. Fewer than half open is no
		// measurement at all.
		if ready.Load() < int64(level)/2 {
			cancel()
			return nil, fmt.Errorf("only %d of %d streams open (%d failed, last error: %s)", ready.Load(), level, failed.Load(), res.ErrorEx)
		}
		time.Sleep(o.settle)
		if res.RSS[strconv.Itoa(level)], err = rssKiB(pid); err != nil {
			return nil, err
		}
	}
	res.Sent = opened
	res.OK = int(ready.Load())
	res.Errors = int(failed.Load())
	cancel()
	client.CloseIdleConnections()
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(30 * time.Second):
		return nil, errors.New("streams still open 30s after cancel")
	}
	return res, nil
}

// holdStream opens one stream, counts it in ready once its first event
// arrived, and keeps reading until ctx ends or the stream does.
func holdStream(ctx context.Context, rq *requester, ready *atomic.Int64) error {
	resp, err := rq.send(ctx)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	buf := make([]byte, 4096)
	var seen []byte
	counted := false
	for {
		n, err := resp.Body.Read(buf)
		if !counted {
			seen = append(seen, buf[:n]...)
			if bytes.Contains(seen, []byte("\n\n")) {
				counted = true
				seen = nil
				ready.Add(1)
			}
		}
		if err != nil {
			if counted && ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
}
