// Package metrics defines byokproxy's Prometheus metrics. No metric has a
// mailbox label: mailboxes are unbounded, so per-mailbox usage lives in Redis
// and is read through the admin API.
package metrics

import (
	"net/http"
	"strconv"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Key error reasons, the values of the reason label of KeyErrors.
const (
	ReasonNoKey            = "no_key"
	ReasonDecryptFailed    = "decrypt_failed"
	ReasonWrongBinding     = "wrong_binding"
	ReasonStoreUnavailable = "store_unavailable"
)

// Metrics holds every collector of one proxy process.
type Metrics struct {
	Requests          *prometheus.CounterVec
	Tokens            *prometheus.CounterVec
	Duration          *prometheus.HistogramVec
	UpstreamTTFB      *prometheus.HistogramVec
	InFlight          *prometheus.GaugeVec
	KeyErrors         *prometheus.CounterVec
	MeteredRejections *prometheus.CounterVec
	AuditDropped      prometheus.Counter
}

// Buckets span 5 ms to 10 minutes, because a token count returns in a few
// milliseconds while a long generation can stream for minutes.
var Buckets = []float64{
	0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
}

// Handler serves reg's metrics at GET and HEAD /metrics. Other methods get
// 405 and other paths 404, because a 200 would hide a scraper or probe
// configured with the wrong address.
func Handler(reg *prometheus.Registry) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	return mux
}

// New creates the collectors and registers them, with the Go and process
// collectors, on reg.
func New(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "byokproxy_requests_total",
			Help: "Proxied requests by provider, key source and HTTP status sent to the client.",
		}, []string{"provider", "source", "code"}),
		Tokens: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "byokproxy_tokens_total",
			Help: "Tokens reported by providers, or estimated for shared requests that ended without their usage, by key source and direction (input or output).",
		}, []string{"provider", "source", "direction"}),
		Duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "byokproxy_request_duration_seconds",
			Help:    "Time from receiving a request to the end of its response.",
			Buckets: Buckets,
		}, []string{"provider", "source"}),
		UpstreamTTFB: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "byokproxy_upstream_ttfb_seconds",
			Help:    "Time from sending a request upstream to the provider's first response byte.",
			Buckets: Buckets,
		}, []string{"provider"}),
		InFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "byokproxy_in_flight_requests",
			Help: "Requests being proxied now.",
		}, []string{"provider"}),
		KeyErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "byokproxy_key_errors_total",
			Help: "Requests that could not get a key, by reason (no_key, decrypt_failed, wrong_binding, store_unavailable).",
		}, []string{"provider", "reason"}),
		MeteredRejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "byokproxy_metered_rejections_total",
			Help: "Shared-key requests rejected because the mailbox's monthly allowance was used up.",
		}, []string{"provider"}),
		AuditDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "byokproxy_audit_events_dropped_total",
			Help: "Audit events dropped because the delivery queue was full.",
		}),
	}
	reg.MustRegister(m.Requests, m.Tokens, m.Duration, m.UpstreamTTFB, m.InFlight,
		m.KeyErrors, m.MeteredRejections, m.AuditDropped,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// AddProvider creates the provider's series of the counters and gauges that
// only change on rare events, at zero, so that a rate or an alert on them
// has a series from the start rather than from the first event.
func (m *Metrics) AddProvider(name string) {
	for _, reason := range []string{ReasonNoKey, ReasonDecryptFailed, ReasonWrongBinding, ReasonStoreUnavailable} {
		m.KeyErrors.WithLabelValues(name, reason)
	}
	m.MeteredRejections.WithLabelValues(name)
	m.InFlight.WithLabelValues(name)
}

// SourceLabel maps a key source to its metric and audit name: requests on the
// shared source are "metered".
func SourceLabel(source string) string {
	if source == "byok" {
		return "byok"
	}
	return "metered"
}

// Series holds the series of one provider that every request updates, each
// resolved from its vector on first use rather than by label values on
// every call. A series still appears only once a request has used it.
type Series struct {
	m        *Metrics
	provider string
	inFlight func() prometheus.Gauge
	ttfb     func() prometheus.Observer
	metered  sourceSeries
	byok     sourceSeries
}

type sourceSeries struct {
	ok       func() prometheus.Counter // requests whose response had status 200
	duration func() prometheus.Observer
	input    func() prometheus.Counter
	output   func() prometheus.Counter
}

// Series returns the series of provider.
func (m *Metrics) Series(provider string) *Series {
	return &Series{m: m, provider: provider,
		inFlight: sync.OnceValue(func() prometheus.Gauge { return m.InFlight.WithLabelValues(provider) }),
		ttfb:     sync.OnceValue(func() prometheus.Observer { return m.UpstreamTTFB.WithLabelValues(provider) }),
		metered:  m.sourceSeries(provider, "metered"),
		byok:     m.sourceSeries(provider, "byok"),
	}
}

func (m *Metrics) sourceSeries(provider, label string) sourceSeries {
	return sourceSeries{
		ok:       sync.OnceValue(func() prometheus.Counter { return m.Requests.WithLabelValues(provider, label, "200") }),
		duration: sync.OnceValue(func() prometheus.Observer { return m.Duration.WithLabelValues(provider, label) }),
		input:    sync.OnceValue(func() prometheus.Counter { return m.Tokens.WithLabelValues(provider, label, "input") }),
		output:   sync.OnceValue(func() prometheus.Counter { return m.Tokens.WithLabelValues(provider, label, "output") }),
	}
}

// source returns the series of a source label. SourceLabel gives only
// "metered" and "byok", and any other label gets series resolved anew.
func (s *Series) source(label string) *sourceSeries {
	switch label {
	case "metered":
		return &s.metered
	case "byok":
		return &s.byok
	}
	ss := s.m.sourceSeries(s.provider, label)
	return &ss
}

// InFlight is the provider's series of InFlight.
func (s *Series) InFlight() prometheus.Gauge { return s.inFlight() }

// TTFB is the provider's series of UpstreamTTFB.
func (s *Series) TTFB() prometheus.Observer { return s.ttfb() }

// Request counts a request on source (a SourceLabel) whose response to the
// client had status code, and observes its duration in seconds.
func (s *Series) Request(source string, code int, seconds float64) {
	ss := s.source(source)
	if code == 200 {
		ss.ok().Inc()
	} else {
		s.m.Requests.WithLabelValues(s.provider, source, strconv.Itoa(code)).Inc()
	}
	ss.duration().Observe(seconds)
}

// Tokens adds a request's input and output tokens on source.
func (s *Series) Tokens(source string, input, output int64) {
	ss := s.source(source)
	if input > 0 {
		ss.input().Add(float64(input))
	}
	if output > 0 {
		ss.output().Add(float64(output))
	}
}
