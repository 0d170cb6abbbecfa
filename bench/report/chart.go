package main

import (
	"bytes"
	"fmt"
	"html"
	"math"
)

// latencyChart draws the open-loop latency percentiles of each target: a
// line through the medians over the rounds, and a bar from the minimum to
// the maximum at each percentile, on a logarithmic time axis.
func (r *run) latencyChart() []byte {
	const (
		width, height = 760, 440
		left, right   = 70, 150
		top, bottom   = 50, 60
	)
	percentiles := []struct {
		label string
		get   func(record) float64
	}{
		{"p50", p50},
		{"p90", func(r record) float64 { return r.P90 }},
		{"p99", p99},
		{"p99.9", p999},
	}
	colors := map[string]string{
		"direct": "#7f7f7f", "floor": "#1f77b4", "shared": "#2ca02c", "byok": "#d62728",
		"shared-candidate": "#98df8a", "byok-candidate": "#ff9896",
	}

	lo, hi := math.Inf(1), math.Inf(-1)
	for _, t := range r.targets() {
		for _, p := range percentiles {
			s := r.figure(t, "open", p.get)
			if s.n > 0 && s.min > 0 {
				lo = math.Min(lo, s.min)
				hi = math.Max(hi, s.max)
			}
		}
	}
	if math.IsInf(lo, 1) {
		lo, hi = 0.1, 10
	}
	logLo := math.Log10(niceStep(lo, false))
	logHi := math.Log10(niceStep(hi, true))
	if logHi-logLo < 1 {
		logHi = logLo + 1
	}
	plotW := float64(width - left - right)
	plotH := float64(height - top - bottom)
	y := func(ms float64) float64 {
		return float64(top) + plotH*(1-(math.Log10(ms)-logLo)/(logHi-logLo))
	}
	x := func(i int) float64 {
		return float64(left) + plotW*(float64(i)+0.5)/float64(len(percentiles))
	}

	var b bytes.Buffer
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", width, height)
	title := fmt.Sprintf("Latency at %s req/s, non-streaming (median of %s rounds, bars: min to max)", r.meta["rate"], r.meta["rounds"])
	fmt.Fprintf(&b, `<text x="%d" y="28" font-size="15">%s</text>`+"\n", left, html.EscapeString(title))

	// Horizontal grid at 1, 2 and 5 times each power of ten.
	for e := math.Floor(logLo); e <= logHi; e++ {
		for _, m := range []float64{1, 2, 5} {
			v := m * math.Pow(10, e)
			if math.Log10(v) < logLo-1e-9 || math.Log10(v) > logHi+1e-9 {
				continue
			}
			yy := y(v)
			stroke := "#e5e5e5"
			if m == 1 {
				stroke = "#c8c8c8"
			}
			fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="%s"/>`+"\n", left, yy, width-right, yy, stroke)
			fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end" dominant-baseline="middle">%s</text>`+"\n", left-8, yy, formatMS(v))
		}
	}
	fmt.Fprintf(&b, `<text x="18" y="%.1f" transform="rotate(-90 18 %.1f)" text-anchor="middle">latency (ms, log scale)</text>`+"\n", float64(top)+plotH/2, float64(top)+plotH/2)
	for i, p := range percentiles {
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle">%s</text>`+"\n", x(i), height-bottom+22, p.label)
	}
	fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%.0f" height="%.0f" fill="none" stroke="#888"/>`+"\n", left, top, plotW, plotH)

	// One line per target, offset sideways so the bars do not overlap.
	legendY := top + 10
	targets := r.targets()
	for ti, t := range targets {
		color := colors[t]
		offset := (float64(ti) - float64(len(targets)-1)/2) * 10
		var points bytes.Buffer
		drawn := false
		for i, p := range percentiles {
			s := r.figure(t, "open", p.get)
			if s.n == 0 || s.min <= 0 {
				continue
			}
			drawn = true
			px := x(i) + offset
			fmt.Fprintf(&points, "%.1f,%.1f ", px, y(s.med))
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="2" opacity="0.5"/>`+"\n", px, y(s.min), px, y(s.max), color)
			fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="3.5" fill="%s"><title>%s %s: %.2f ms (%.2f–%.2f)</title></circle>`+"\n", px, y(s.med), color, t, p.label, s.med, s.min, s.max)
		}
		if !drawn {
			continue
		}
		fmt.Fprintf(&b, `<polyline points="%s" fill="none" stroke="%s" stroke-width="2"/>`+"\n", bytes.TrimSpace(points.Bytes()), color)
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="3"/>`+"\n", width-right+16, legendY, width-right+36, legendY, color)
		fmt.Fprintf(&b, `<text x="%d" y="%d" dominant-baseline="middle">%s</text>`+"\n", width-right+42, legendY, t)
		legendY += 20
	}
	b.WriteString("</svg>\n")
	return b.Bytes()
}

// niceStep returns the nearest value of the 1, 2, 5 sequence at or above v
// (up) or at or below it.
func niceStep(v float64, up bool) float64 {
	e := math.Floor(math.Log10(v))
	steps := []float64{1, 2, 5, 10}
	if up {
		for _, m := range steps {
			if m*math.Pow(10, e) >= v*(1-1e-9) {
				return m * math.Pow(10, e)
			}
		}
	}
	for i := len(steps) - 1; i >= 0; i-- {
		if steps[i]*math.Pow(10, e) <= v*(1+1e-9) {
			return steps[i] * math.Pow(10, e)
		}
	}
	return math.Pow(10, e)
}

func formatMS(v float64) string {
	if v >= 1 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%g", v)
}
