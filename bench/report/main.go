// Command report turns the JSON lines of a benchmark run (bench/run.sh)
// into Markdown tables, the pass or fail of each target, and an SVG chart
// of latency percentiles per target.
//
// Every figure is the median over the run's rounds with the minimum and
// maximum beside it. Ratios to the floor are taken round by round, each
// target against the floor measured minutes apart in the same round, and
// the median of those ratios is shown.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
)

// record is one line of the run: a loadgen or scalarmult result, or the
// run's metadata.
type record struct {
	Target  string             `json:"target"`
	Phase   string             `json:"phase"`
	Round   int                `json:"round"`
	Sent    int                `json:"sent"`
	OK      int                `json:"ok"`
	Errors  int                `json:"errors"`
	ErrorEx string             `json:"error_example"`
	Through float64            `json:"throughput"`
	P50     float64            `json:"p50_ms"`
	P90     float64            `json:"p90_ms"`
	P99     float64            `json:"p99_ms"`
	P999    float64            `json:"p999_ms"`
	TTFE50  float64            `json:"ttfe_p50_ms"`
	TTFE99  float64            `json:"ttfe_p99_ms"`
	Cut     int                `json:"cut"`
	CutEx   string             `json:"cut_example"`
	CPU     float64            `json:"cpu_us_per_op"`
	Other   map[string]float64 `json:"other_cpu_us_per_op"`
	RSS     map[string]int64   `json:"rss_kib"`
	Meta    map[string]string  `json:"meta"`
}

// knownTargets come first in every table and chart, in this order. Other
// targets (such as shared-candidate) follow in the order the run met them.
var knownTargets = []string{"direct", "floor", "shared", "byok"}

func main() {
	in := flag.String("in", "", "JSON lines `file` of the run")
	svgOut := flag.String("svg", "", "write the latency chart to this `file`")
	flag.Parse()

	f, err := os.Open(*in)
	if err != nil {
		fail(err)
	}
	defer f.Close()
	run, err := load(f)
	if err != nil {
		fail(err)
	}
	run.writeMarkdown(os.Stdout)
	if *svgOut != "" {
		if err := os.WriteFile(*svgOut, run.latencyChart(), 0o644); err != nil {
			fail(err)
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "report:", err)
	os.Exit(1)
}

// run is every record of one benchmark run.
type run struct {
	meta    map[string]string
	records []record
}

func load(r io.Reader) (*run, error) {
	out := &run{meta: map[string]string{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" {
			continue
		}
		var rec record
		if err := json.Unmarshal([]byte(text), &rec); err != nil {
			return nil, fmt.Errorf("line %d: %v", line, err)
		}
		if rec.Phase == "meta" {
			for k, v := range rec.Meta {
				out.meta[k] = v
			}
			continue
		}
		out.records = append(out.records, rec)
	}
	return out, sc.Err()
}

// targets returns the targets of the open, sat and stream phases.
func (r *run) targets() []string {
	var out []string
	for _, t := range knownTargets {
		if len(r.find(t, "open"))+len(r.find(t, "sat"))+len(r.find(t, "stream")) > 0 {
			out = append(out, t)
		}
	}
	for _, rec := range r.records {
		switch rec.Phase {
		case "open", "sat", "stream":
			if !slices.Contains(out, rec.Target) {
				out = append(out, rec.Target)
			}
		}
	}
	return out
}

// find returns the records of target in phase, by round.
func (r *run) find(target, phase string) map[int]record {
	out := map[int]record{}
	for _, rec := range r.records {
		if rec.Target == target && rec.Phase == phase {
			out[rec.Round] = rec
		}
	}
	return out
}

// measured reports whether any target has a record of phase.
func (r *run) measured(phase string) bool {
	return slices.ContainsFunc(r.records, func(rec record) bool { return rec.Phase == phase })
}

// stat is the median, minimum and maximum of one figure over the rounds.
type stat struct {
	med, min, max float64
	n             int
}

func summarize(values []float64) stat {
	if len(values) == 0 {
		return stat{}
	}
	s := slices.Clone(values)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return stat{med: med, min: s[0], max: s[len(s)-1], n: len(s)}
}

// figure summarizes get over the rounds of target in phase.
func (r *run) figure(target, phase string, get func(record) float64) stat {
	var values []float64
	for _, rec := range r.find(target, phase) {
		values = append(values, get(rec))
	}
	return summarize(values)
}

// ratio summarizes target/floor of get, paired round by round.
func (r *run) ratio(target, phase string, get func(record) float64) stat {
	floor := r.find("floor", phase)
	var values []float64
	for round, rec := range r.find(target, phase) {
		f, ok := floor[round]
		if ok && get(f) != 0 {
			values = append(values, get(rec)/get(f))
		}
	}
	return summarize(values)
}

// difference summarizes target-floor of get, paired round by round.
func (r *run) difference(target, phase string, get func(record) float64) stat {
	floor := r.find("floor", phase)
	var values []float64
	for round, rec := range r.find(target, phase) {
		if f, ok := floor[round]; ok {
			values = append(values, get(rec)-get(f))
		}
	}
	return summarize(values)
}

func (s stat) format(unit string, decimals int) string {
	if s.n == 0 {
		return "–"
	}
	if s.n == 1 || s.min == s.max {
		return fmt.Sprintf("%.*f%s", decimals, s.med, unit)
	}
	return fmt.Sprintf("%.*f%s (%.*f–%.*f)", decimals, s.med, unit, decimals, s.min, decimals, s.max)
}

func (s stat) ratioText() string {
	if s.n == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2fx", s.med)
}
