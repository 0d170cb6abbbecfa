package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestMarkdownSkipsPhasesNotRun renders a run that measured only streams:
// its table is there, and the open-loop and saturation tables, which would
// have no rows, are left out.
func TestMarkdownSkipsPhasesNotRun(t *testing.T) {
	const results = `{"phase":"meta","meta":{"stream_rate":"100","stream_events":"20"}}
{"target":"floor","phase":"stream","round":1,"sent":500,"ok":500,"ttfe_p50_ms":1.1,"ttfe_p99_ms":2.0,"cpu_us_per_op":1100}
{"target":"shared","phase":"stream","round":1,"sent":500,"ok":500,"ttfe_p50_ms":1.2,"ttfe_p99_ms":2.1,"cpu_us_per_op":1210}
`
	r, err := load(strings.NewReader(results))
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	r.writeMarkdown(&out)
	text := out.String()
	if !strings.Contains(text, "Streaming, open loop at 100 streams/s") {
		t.Errorf("no streams table:\n%s", text)
	}
	if !strings.Contains(text, "| shared |") {
		t.Errorf("no row for shared:\n%s", text)
	}
	for _, header := range []string{"Non-streaming, open loop", "Saturation, closed loop"} {
		if strings.Contains(text, header) {
			t.Errorf("table %q printed for a phase that did not run:\n%s", header, text)
		}
	}
}
