package proxy

import (
	"context"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"slices"
	"testing"
)

// roundTripFunc lets a function serve as the next transport.
type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// tracedTransport sets the exchange's hooks on the reverse proxy's own
// trace where that has none of them, and otherwise adds a trace of its own,
// so that both sets of hooks run.
func TestTracedTransport(t *testing.T) {
	for _, c := range []struct {
		name    string
		trace   *httptrace.ClientTrace
		inPlace bool
	}{
		{"reverse proxy trace", &httptrace.ClientTrace{Got1xxResponse: func(int, textproto.MIMEHeader) error { return nil }}, true},
		{"trace with the same hooks", &httptrace.ClientTrace{WroteRequest: func(httptrace.WroteRequestInfo) {}}, false},
		{"no trace", nil, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			x := &exchange{wrote: make(chan struct{})}
			ctx := context.WithValue(context.Background(), exchangeKey{}, x)
			earlierWrote := false
			hadWrote := c.trace != nil && c.trace.WroteRequest != nil
			if c.trace != nil {
				if hadWrote {
					c.trace.WroteRequest = func(httptrace.WroteRequestInfo) { earlierWrote = true }
				}
				ctx = httptrace.WithClientTrace(ctx, c.trace)
			}
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://upstream.test/", nil)
			tr := &tracedTransport{next: roundTripFunc(func(r *http.Request) (*http.Response, error) {
				got := httptrace.ContextClientTrace(r.Context())
				if got == nil {
					t.Fatal("the upstream request has no trace")
				}
				if (got == c.trace) != c.inPlace {
					t.Errorf("trace set in place %v, want %v", got == c.trace, c.inPlace)
				}
				got.GotFirstResponseByte()
				got.WroteRequest(httptrace.WroteRequestInfo{})
				return &http.Response{StatusCode: http.StatusOK, Body: http.NoBody, Request: r}, nil
			})}
			if _, err := tr.RoundTrip(req); err != nil {
				t.Fatal(err)
			}
			if x.ttfb.IsZero() {
				t.Error("the first response byte was not recorded")
			}
			if !x.sent.Load() {
				t.Error("the written request was not recorded")
			}
			select {
			case <-x.wrote:
			default:
				t.Error("wrote was not closed")
			}
			if hadWrote && !earlierWrote {
				t.Error("the earlier trace's hook did not run")
			}
		})
	}
}

func TestKeepContentHeaders(t *testing.T) {
	for _, c := range []struct {
		in   []string
		want []string
	}{
		{[]string{"close"}, []string{"close"}},
		{[]string{"close, Content-Encoding"}, []string{"close"}},
		{[]string{"content-type", "Upgrade,CONTENT-LENGTH"}, []string{"Upgrade"}},
		{[]string{"Content-Encoding, Content-Type"}, nil},
		{nil, nil},
	} {
		h := http.Header{}
		if c.in != nil {
			h["Connection"] = c.in
		}
		keepContentHeaders(h)
		if got := h["Connection"]; !slices.Equal(got, c.want) {
			t.Errorf("Connection %q: kept %q, want %q", c.in, got, c.want)
		}
	}
}
