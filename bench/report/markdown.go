package main

import (
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
)

func p50(r record) float64        { return r.P50 }
func p99(r record) float64        { return r.P99 }
func p999(r record) float64       { return r.P999 }
func throughput(r record) float64 { return r.Through }
func cpu(r record) float64        { return r.CPU }
func ttfe50(r record) float64     { return r.TTFE50 }
func ttfe99(r record) float64     { return r.TTFE99 }
func redisCPU(r record) float64   { return r.Other["redis"] }

func (r *run) writeMarkdown(w io.Writer) {
	if len(r.meta) > 0 {
		keys := make([]string, 0, len(r.meta))
		for k := range r.meta {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		fmt.Fprintln(w, "| run | |")
		fmt.Fprintln(w, "|---|---|")
		for _, k := range keys {
			fmt.Fprintf(w, "| %s | %s |\n", k, r.meta[k])
		}
		fmt.Fprintln(w)
	}
	r.writeOpen(w)
	r.writeSaturation(w)
	r.writeStreams(w)
	r.writeCuts(w)
	r.writeMemory(w)
	r.writeChecks(w)
}

func (r *run) writeOpen(w io.Writer) {
	if !r.measured("open") {
		return
	}
	fmt.Fprintf(w, "Non-streaming, open loop at %s req/s (latency in ms from the scheduled send time; CPU in µs per request):\n\n", r.meta["rate"])
	fmt.Fprintln(w, "| target | p50 | p99 | p99.9 | p99 − floor | proxy CPU | CPU − floor | redis CPU | errors |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|---|")
	for _, t := range r.targets() {
		if len(r.find(t, "open")) == 0 {
			continue
		}
		diff, cpuDiff, proxyCPU, redis := "–", "–", "–", "–"
		if t != "direct" {
			proxyCPU = r.figure(t, "open", cpu).format("", 0)
		}
		if t != "direct" && t != "floor" {
			diff = signed(r.difference(t, "open", p99), 2, " ms")
			cpuDiff = signed(r.difference(t, "open", cpu), 0, "")
		}
		if t == "shared" || t == "byok" {
			redis = r.figure(t, "open", redisCPU).format("", 0)
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s | %s | %d |\n", t,
			r.figure(t, "open", p50).format("", 2), r.figure(t, "open", p99).format("", 2),
			r.figure(t, "open", p999).format("", 2), diff, proxyCPU, cpuDiff, redis, r.errors(t, "open"))
	}
	fmt.Fprintln(w)
}

func (r *run) writeSaturation(w io.Writer) {
	if !r.measured("sat") {
		return
	}
	fmt.Fprintf(w, "Saturation, closed loop with %s connections (CPU in µs per request):\n\n", r.meta["sat_conns"])
	fmt.Fprintln(w, "| target | req/s | vs floor | p99 ms | proxy CPU | CPU − floor | redis CPU | errors |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|")
	for _, t := range r.targets() {
		if len(r.find(t, "sat")) == 0 {
			continue
		}
		proxyCPU, cpuDiff, redis := "–", "–", "–"
		if t != "direct" {
			proxyCPU = r.figure(t, "sat", cpu).format("", 0)
		}
		if t != "direct" && t != "floor" {
			cpuDiff = signed(r.difference(t, "sat", cpu), 0, "")
			redis = r.figure(t, "sat", redisCPU).format("", 0)
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s | %d |\n", t,
			r.figure(t, "sat", throughput).format("", 0), r.ratio(t, "sat", throughput).ratioText(),
			r.figure(t, "sat", p99).format("", 1), proxyCPU, cpuDiff, redis, r.errors(t, "sat"))
	}
	fmt.Fprintln(w)
}

func (r *run) writeStreams(w io.Writer) {
	if !r.measured("stream") {
		return
	}
	fmt.Fprintf(w, "Streaming, open loop at %s streams/s of %s events (times in ms; CPU in µs per stream):\n\n", r.meta["stream_rate"], r.meta["stream_events"])
	fmt.Fprintln(w, "| target | TTFE p50 | TTFE p99 | TTFE p99 vs floor | proxy CPU | CPU vs floor | cut | errors |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|")
	for _, t := range r.targets() {
		if len(r.find(t, "stream")) == 0 {
			continue
		}
		ttfeRatio, proxyCPU, cpuRatio := "–", "–", "–"
		if t != "direct" {
			proxyCPU = r.figure(t, "stream", cpu).format("", 0)
		}
		if t != "direct" && t != "floor" {
			ttfeRatio = r.ratio(t, "stream", ttfe99).ratioText()
			cpuRatio = r.ratio(t, "stream", cpu).ratioText()
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %d | %d |\n", t,
			r.figure(t, "stream", ttfe50).format("", 2), r.figure(t, "stream", ttfe99).format("", 2),
			ttfeRatio, proxyCPU, cpuRatio, r.cuts(t, "stream"), r.errors(t, "stream"))
	}
	fmt.Fprintln(w)
}

func (r *run) writeCuts(w io.Writer) {
	var names []string
	for _, rec := range r.records {
		if rec.Phase == "cut" && !slices.Contains(names, rec.Target) {
			names = append(names, rec.Target)
		}
	}
	if len(names) == 0 {
		return
	}
	fmt.Fprintf(w, "Streams cut under load (%s streams/s, %s byte request bodies):\n\n", r.meta["cut_rate"], r.meta["cut_body_bytes"])
	fmt.Fprintln(w, "| target | streams | cut | share | example |")
	fmt.Fprintln(w, "|---|---|---|---|---|")
	for _, t := range names {
		var sent, cut int
		example := ""
		for _, rec := range r.find(t, "cut") {
			sent += rec.Sent
			cut += rec.Cut
			if rec.CutEx != "" {
				example = rec.CutEx
			}
		}
		share := 0.0
		if sent > 0 {
			share = 100 * float64(cut) / float64(sent)
		}
		fmt.Fprintf(w, "| %s | %d | %d | %.2f %% | %s |\n", t, sent, cut, share, example)
	}
	fmt.Fprintln(w)
}

func (r *run) writeMemory(w io.Writer) {
	var names []string
	var levels []string
	for _, rec := range r.records {
		if rec.Phase != "idle" {
			continue
		}
		if !slices.Contains(names, rec.Target) {
			names = append(names, rec.Target)
		}
		for level := range rec.RSS {
			if level != "0" && !slices.Contains(levels, level) {
				levels = append(levels, level)
			}
		}
	}
	if len(names) == 0 {
		return
	}
	slices.SortFunc(levels, func(a, b string) int { return atoi(a) - atoi(b) })
	fmt.Fprintln(w, "Resident memory of the proxy with concurrent idle streams (MB = 10^6 bytes):")
	fmt.Fprintln(w)
	header := "| target | before"
	sep := "|---|---"
	for _, l := range levels {
		header += " | " + thousands(atoi(l)) + " streams"
		sep += "|---"
	}
	fmt.Fprintln(w, header+" | KiB per stream | streams rejected |")
	fmt.Fprintln(w, sep+"|---|---|")
	for _, t := range names {
		for _, rec := range r.find(t, "idle") {
			line := fmt.Sprintf("| %s | %s", t, mb(rec.RSS["0"]))
			for _, l := range levels {
				line += " | " + mb(rec.RSS[l])
			}
			top := levels[len(levels)-1]
			perStream := float64(rec.RSS[top]-rec.RSS["0"]) / float64(atoi(top))
			fmt.Fprintf(w, "%s | %.1f | %d |\n", line, perStream, rec.Errors)
		}
	}
	fmt.Fprintln(w)
}

// errors counts the failed requests of target in phase over all rounds.
func (r *run) errors(target, phase string) int {
	n := 0
	for _, rec := range r.find(target, phase) {
		n += rec.Errors
	}
	return n
}

// cuts counts the cut streams of target in phase over all rounds.
func (r *run) cuts(target, phase string) int {
	n := 0
	for _, rec := range r.find(target, phase) {
		n += rec.Cut
	}
	return n
}

func signed(s stat, decimals int, unit string) string {
	if s.n == 0 {
		return "–"
	}
	text := fmt.Sprintf("%+.*f%s", decimals, s.med, unit)
	if s.n > 1 && s.min != s.max {
		text += fmt.Sprintf(" (%+.*f…%+.*f)", decimals, s.min, decimals, s.max)
	}
	return text
}

func mb(kib int64) string {
	return fmt.Sprintf("%.0f MB", float64(kib)*1024/1e6)
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

func thousands(n int) string {
	s := strconv.Itoa(n)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}
