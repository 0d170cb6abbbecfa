package metrics

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
)

// TestSeriesUpdatesVectors drives a Series and reads the vectors back: each
// update lands in the series its labels name, and no series shows before a
// request has used it.
func TestSeriesUpdatesVectors(t *testing.T) {
	m := New(prometheus.NewRegistry())
	s := m.Series("openai")
	if n := testutil.CollectAndCount(m.Requests) + testutil.CollectAndCount(m.Duration) +
		testutil.CollectAndCount(m.Tokens) + testutil.CollectAndCount(m.UpstreamTTFB); n != 0 {
		t.Fatalf("%d series before any request, want 0", n)
	}

	s.InFlight().Inc()
	s.InFlight().Inc()
	s.InFlight().Dec()
	s.TTFB().Observe(0.2)
	s.Request("metered", 200, 0.5)
	s.Request("metered", 200, 1.5)
	s.Request("metered", 429, 0.1)
	s.Request("byok", 200, 0.3)
	s.Request("other", 502, 0.1)
	s.Tokens("metered", 10, 0)
	s.Tokens("metered", 5, 7)
	s.Tokens("byok", 0, 3)
	s.Tokens("other", 1, 1)

	counters := []struct {
		c    prometheus.Collector
		want float64
	}{
		{m.InFlight.WithLabelValues("openai"), 1},
		{m.Requests.WithLabelValues("openai", "metered", "200"), 2},
		{m.Requests.WithLabelValues("openai", "metered", "429"), 1},
		{m.Requests.WithLabelValues("openai", "byok", "200"), 1},
		{m.Requests.WithLabelValues("openai", "other", "502"), 1},
		{m.Tokens.WithLabelValues("openai", "metered", "input"), 15},
		{m.Tokens.WithLabelValues("openai", "metered", "output"), 7},
		{m.Tokens.WithLabelValues("openai", "byok", "output"), 3},
		{m.Tokens.WithLabelValues("openai", "other", "input"), 1},
		{m.Tokens.WithLabelValues("openai", "other", "output"), 1},
	}
	for i, c := range counters {
		if got := testutil.ToFloat64(c.c); got != c.want {
			t.Errorf("counter %d = %v, want %v", i, got, c.want)
		}
	}
	// No byok input tokens were reported, so that series must not exist.
	if n := testutil.CollectAndCount(m.Tokens); n != 5 {
		t.Errorf("%d token series, want 5", n)
	}
	for _, tc := range []struct {
		source string
		count  uint64
		sum    float64
	}{{"metered", 3, 2.1}, {"byok", 1, 0.3}, {"other", 1, 0.1}} {
		h := m.Duration.WithLabelValues("openai", tc.source).(prometheus.Histogram)
		got := readHistogram(t, h)
		if got.count != tc.count || got.sum < tc.sum-1e-9 || got.sum > tc.sum+1e-9 {
			t.Errorf("duration of %s: count %d sum %v, want %d and %v", tc.source, got.count, got.sum, tc.count, tc.sum)
		}
	}
	if got := readHistogram(t, m.UpstreamTTFB.WithLabelValues("openai").(prometheus.Histogram)); got.count != 1 {
		t.Errorf("TTFB count %d, want 1", got.count)
	}
}

type histogramReading struct {
	count uint64
	sum   float64
}

func readHistogram(t *testing.T, h prometheus.Histogram) histogramReading {
	t.Helper()
	var out dto.Metric
	if err := h.(prometheus.Metric).Write(&out); err != nil {
		t.Fatal(err)
	}
	return histogramReading{count: out.GetHistogram().GetSampleCount(), sum: out.GetHistogram().GetSampleSum()}
}

// TestHandlerServesOnlyGetMetrics checks that the metrics listener serves
// a scrape and rejects other methods and paths.
func TestHandlerServesOnlyGetMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.AuditDropped.Add(3)
	srv := httptest.NewServer(Handler(reg))
	defer srv.Close()

	cases := []struct {
		method, path string
		want         int
	}{
		{http.MethodGet, "/metrics", http.StatusOK},
		{http.MethodHead, "/metrics", http.StatusOK},
		{http.MethodPost, "/metrics", http.StatusMethodNotAllowed},
		{http.MethodDelete, "/metrics", http.StatusMethodNotAllowed},
		{http.MethodGet, "/", http.StatusNotFound},
		{http.MethodGet, "/healthz", http.StatusNotFound},
	}
	for _, c := range cases {
		req, _ := http.NewRequest(c.method, srv.URL+c.path, nil)
		resp, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("%s %s: status %d, want %d", c.method, c.path, resp.StatusCode, c.want)
		}
		if c.method == http.MethodGet && c.want == http.StatusOK && !strings.Contains(string(body), "byokproxy_audit_events_dropped_total 3") {
			t.Errorf("GET /metrics does not show the dropped counter:\n%s", body)
		}
		if c.want == http.StatusMethodNotAllowed && resp.Header.Get("Allow") == "" {
			t.Errorf("%s %s: 405 without Allow", c.method, c.path)
		}
	}
}
