package main

import (
	"fmt"
	"io"
	"strings"
)

// check is one speed target and its outcome in this run.
type check struct {
	name     string
	measured string
	pass     bool
	known    bool
}

func (r *run) checks() []check {
	var out []check
	add := func(name, measured string, pass, known bool) {
		out = append(out, check{name, measured, pass, known})
	}

	x := r.figure("x25519", "scalarmult", cpu)
	for _, t := range r.targets() {
		switch {
		case strings.HasPrefix(t, "shared"):
			sat := r.ratio(t, "sat", throughput)
			add(t+": saturation ≥ 0.95x floor", sat.ratioText(), sat.med >= 0.95, sat.n > 0)
			p99diff := r.difference(t, "open", p99)
			add(t+": p99 ≤ floor + 0.3 ms", signed(p99diff, 2, " ms"), p99diff.med <= 0.3, p99diff.n > 0)
			cpuRatio := r.ratio(t, "sat", cpu)
			add(t+": CPU at saturation ≤ 0.8x floor (stretch)", cpuRatio.ratioText(), cpuRatio.med <= 0.8, cpuRatio.n > 0)
		case strings.HasPrefix(t, "byok"):
			// CPU per request is taken at saturation, where the runtime's
			// idle spinning between requests adds least to it.
			cpuDiff := r.difference(t, "sat", cpu)
			add(fmt.Sprintf("%s: CPU at saturation ≤ floor + 1.2 × X25519 (%.0f µs)", t, 1.2*x.med),
				signed(cpuDiff, 0, " µs"), cpuDiff.med <= 1.2*x.med, cpuDiff.n > 0 && x.n > 0)
			sat := r.ratio(t, "sat", throughput)
			add(t+": saturation ≥ 0.65x floor", sat.ratioText(), sat.med >= 0.65, sat.n > 0)
		default:
			continue
		}
		c := r.ratio(t, "stream", cpu)
		add(t+": CPU per stream ≤ 1.1x floor", c.ratioText(), c.med <= 1.1, c.n > 0)
		tt := r.ratio(t, "stream", ttfe99)
		add(t+": TTFE p99 ≤ 1.2x floor", tt.ratioText(), tt.med <= 1.2, tt.n > 0)
	}

	cut, streams := 0, 0
	for _, rec := range r.records {
		if (rec.Phase == "stream" || rec.Phase == "cut") && isByokproxy(rec.Target) {
			cut += rec.Cut
			streams += rec.Sent
		}
	}
	add("byokproxy: 0 streams cut", fmt.Sprintf("%d of %d", cut, streams), cut == 0, streams > 0)

	for _, rec := range r.records {
		if rec.Phase == "idle" && isByokproxy(rec.Target) {
			kib, ok := rec.RSS["10000"]
			add(rec.Target+": 10,000 idle streams ≤ 400 MB RSS", mb(kib), float64(kib)*1024 <= 400e6, ok)
		}
	}
	return out
}

// isByokproxy reports whether a target name is a byokproxy configuration,
// such as shared, byok or byok-google.
func isByokproxy(target string) bool {
	return strings.HasPrefix(target, "shared") || strings.HasPrefix(target, "byok")
}

func (r *run) writeChecks(w io.Writer) {
	fmt.Fprintln(w, "Targets:")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| target | measured | met |")
	fmt.Fprintln(w, "|---|---|---|")
	for _, c := range r.checks() {
		met := "no"
		switch {
		case !c.known:
			met = "not measured"
		case c.pass:
			met = "yes"
		}
		fmt.Fprintf(w, "| %s | %s | %s |\n", c.name, c.measured, met)
	}
	fmt.Fprintln(w)
}
