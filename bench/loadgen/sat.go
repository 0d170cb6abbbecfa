package main

import (
	"sync"
	"time"
)

// runSaturation runs -conns workers that each send the next request as soon
// as the last one finished, and reports the throughput of the measured
// window.
func runSaturation(o options) (*result, error) {
	client := newClient(o, o.conns)
	rq, err := newRequester(o, client)
	if err != nil {
		return nil, err
	}
	ctx, cancel := withDeadline(o, 5*time.Second)
	defer cancel()
	res := newResult(o)
	res.Conns = o.conns
	res.WindowS = o.duration.Seconds()

	start := time.Now()
	measureStart := start.Add(o.warmup)
	end := measureStart.Add(o.duration)
	var mu sync.Mutex
	var latencies []time.Duration
	var cpu *cpuWindow
	var cpuErr error
	var cpuDone sync.WaitGroup
	cpuDone.Add(1)
	go func() {
		defer cpuDone.Done()
		time.Sleep(time.Until(measureStart))
		cpu, cpuErr = startCPU(o)
	}()

	var wg sync.WaitGroup
	for range o.conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				sent := time.Now()
				if !sent.Before(end) {
					return
				}
				err := rq.do(ctx)
				done := time.Now()
				if sent.Before(measureStart) || done.After(end) {
					continue
				}
				mu.Lock()
				res.Sent++
				if err != nil {
					res.Errors++
					res.ErrorEx = err.Error()
				} else {
					res.OK++
					latencies = append(latencies, done.Sub(sent))
				}
				mu.Unlock()
			}
		}()
	}
	time.Sleep(time.Until(end))
	cpuDone.Wait()
	if cpuErr != nil {
		return nil, cpuErr
	}
	mu.Lock()
	ops := res.OK
	mu.Unlock()
	if err := cpu.stop(res, ops); err != nil {
		return nil, err
	}
	wg.Wait()
	res.Through = float64(res.OK) / o.duration.Seconds()
	res.P50, res.P90, res.P99, res.P999, res.Max = percentiles(latencies)
	return res, nil
}
