package main

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// schedule runs fn at a fixed rate for warmup+duration, each call in its
// own goroutine and given its scheduled send time. Calls beyond
// maxInFlight are not made, and schedule counts them as dropped. It measures
// the -pid processes' CPU over the measured window and returns after the
// last call finished or ctx ended.
func schedule(ctx context.Context, o options, res *result, fn func(ctx context.Context, sched time.Time, measured bool)) (dropped int, err error) {
	interval := time.Duration(float64(time.Second) / o.rate)
	start := time.Now().Add(20 * time.Millisecond)
	measureStart := start.Add(o.warmup)
	end := measureStart.Add(o.duration)

	var cpu *cpuWindow
	var cpuErr error
	var cpuDone sync.WaitGroup
	cpuDone.Add(1)
	go func() {
		defer cpuDone.Done()
		time.Sleep(time.Until(measureStart))
		cpu, cpuErr = startCPU(o)
	}()

	var inFlight atomic.Int64
	var wg sync.WaitGroup
	for i := 0; ; i++ {
		sched := start.Add(time.Duration(i) * interval)
		if !sched.Before(end) || ctx.Err() != nil {
			break
		}
		if d := time.Until(sched); d > 0 {
			time.Sleep(d)
		}
		if inFlight.Load() >= int64(o.maxInFlight) {
			dropped++
			continue
		}
		inFlight.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer inFlight.Add(-1)
			fn(ctx, sched, !sched.Before(measureStart))
		}()
	}
	time.Sleep(time.Until(end))
	cpuDone.Wait()
	if cpuErr != nil {
		return dropped, cpuErr
	}
	measuredOps := int(o.rate * o.duration.Seconds())
	if err := cpu.stop(res, measuredOps); err != nil {
		return dropped, err
	}

	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-ctx.Done():
		return dropped, errors.New("requests still running at the deadline")
	}
	return dropped, nil
}

// runOpen measures latency at a fixed arrival rate.
func runOpen(o options) (*result, error) {
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

	var mu sync.Mutex
	var latencies []time.Duration
	dropped, err := schedule(ctx, o, res, func(ctx context.Context, sched time.Time, measured bool) {
		err := rq.do(ctx)
		latency := time.Since(sched)
		if !measured {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		res.Sent++
		if err != nil {
			res.Errors++
			res.ErrorEx = err.Error()
			return
		}
		res.OK++
		latencies = append(latencies, latency)
	})
	if err != nil {
		return nil, err
	}
	res.Errors += dropped
	res.Sent += dropped
	res.Through = float64(res.OK) / o.duration.Seconds()
	res.P50, res.P90, res.P99, res.P999, res.Max = percentiles(latencies)
	return res, nil
}
