package main

import (
	"math"
	"slices"
	"time"
)

// percentiles sets the latency fields of res from samples. It sorts the
// samples and takes the nearest rank, which is exact for the sample set.
func percentiles(samples []time.Duration) (p50, p90, p99, p999, maximum float64) {
	if len(samples) == 0 {
		return
	}
	slices.Sort(samples)
	rank := func(q float64) float64 {
		i := int(math.Ceil(q*float64(len(samples)))) - 1
		return ms(samples[max(i, 0)])
	}
	return rank(0.50), rank(0.90), rank(0.99), rank(0.999), ms(samples[len(samples)-1])
}

func ms(d time.Duration) float64 {
	return math.Round(float64(d)/float64(time.Millisecond)*1000) / 1000
}
