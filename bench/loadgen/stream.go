package main

import (
	"context"
	"sync"
	"time"
)

// runStreams opens SSE streams at a fixed rate and checks that each one
// arrives whole: -events data events and, for chat streams, [DONE], then
// a clean end. A stream that breaks off or misses any of them is cut.
func runStreams(o options) (*result, error) {
	client := newClient(o, o.maxInFlight)
	rq, err := newRequester(o, client)
	if err != nil {
		return nil, err
	}
	ctx, cancel := withDeadline(o, 5*time.Second)
	defer cancel()
	res := newResult(o)
	res.Rate = o.rate
	res.WindowS = o.duration.Seconds()
	wantDone := o.kind != "gemini-stream"

	var mu sync.Mutex
	var latencies, ttfes []time.Duration
	dropped, err := schedule(ctx, o, res, func(ctx context.Context, sched time.Time, measured bool) {
		resp, err := rq.send(ctx)
		if err != nil {
			if measured {
				mu.Lock()
				res.Sent++
				res.Errors++
				res.ErrorEx = err.Error()
				mu.Unlock()
			}
			return
		}
		out := readStream(resp.Body, sched)
		resp.Body.Close()
		total := time.Since(sched)
		mu.Lock()
		defer mu.Unlock()
		// Cuts count in the warm-up too: every stream must arrive whole.
		cut := ""
		switch {
		case out.err != nil:
			cut = out.err.Error()
		case wantDone && !out.done:
			cut = "ended without [DONE]"
		case out.events != o.events:
			cut = "wrong number of events"
		}
		if cut != "" {
			res.Cut++
			res.CutEx = cut
		}
		if !measured {
			return
		}
		res.Sent++
		if cut == "" {
			res.OK++
			latencies = append(latencies, total)
			ttfes = append(ttfes, out.ttfe)
		}
	})
	if err != nil {
		return nil, err
	}
	res.Errors += dropped
	res.Sent += dropped
	res.Through = float64(res.OK) / o.duration.Seconds()
	res.P50, res.P90, res.P99, res.P999, res.Max = percentiles(latencies)
	res.TTFE50, _, res.TTFE99, _, _ = percentiles(ttfes)
	return res, nil
}
