package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"

	"github.com/byokproxy/byokproxy/admin"
	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/provider"
)

// Prober runs the key test: the smallest real request each provider accepts
// (one output token), sent with the key under test to the configured
// upstream.
type Prober struct {
	cfg atomic.Pointer[config.Config]
}

// NewProber returns a prober for cfg.
func NewProber(cfg *config.Config) *Prober {
	p := &Prober{}
	p.cfg.Store(cfg)
	return p
}

// SetConfig replaces the configuration, for a reload.
func (p *Prober) SetConfig(cfg *config.Config) { p.cfg.Store(cfg) }

var _ admin.Prober = (*Prober)(nil)

// Probe sends the test request and reports the provider's status and its own
// error message, with any form of the key removed.
func (p *Prober) Probe(r *http.Request, prov string, key *keystore.Secret) admin.ProbeResult {
	cfg := p.cfg.Load()
	pc := cfg.Provider(prov)
	spec := provider.Lookup(prov)
	ctx, cancel := context.WithTimeout(r.Context(), pc.ProbeTimeout)
	defer cancel()

	req, err := probeRequest(ctx, spec, pc)
	if err != nil {
		return admin.ProbeResult{Error: "building the test request failed: " + err.Error()}
	}
	keyText := string(key.Bytes())
	spec.SetAuth(req.Header, keyText)
	transport, err := newTransport(pc.CAFile, pc.ProbeTimeout)
	if err != nil {
		return admin.ProbeResult{Error: "providers." + prov + ".ca_file: " + err.Error()}
	}
	defer transport.CloseIdleConnections()

	resp, err := transport.RoundTrip(req)
	if err != nil {
		if isTimeout(err) || errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return admin.ProbeResult{Error: fmt.Sprintf("timed out: %s did not respond within %s", spec.Title, pc.ProbeTimeout)}
		}
		return admin.ProbeResult{Error: fmt.Sprintf("could not connect to %s: %s", spec.Title, scrubText(err.Error(), keyText))}
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	result := admin.ProbeResult{OK: resp.StatusCode/100 == 2, Status: resp.StatusCode}
	if !result.OK {
		result.Error = scrubText(providerMessage(body, resp.Status), keyText)
	}
	return result
}

func probeRequest(ctx context.Context, spec *provider.Spec, pc *config.Provider) (*http.Request, error) {
	base := strings.TrimSuffix(pc.Upstream, "/")
	var url string
	var body any
	switch spec.Name {
	case provider.Anthropic:
		url = base + "/v1/messages"
		body = map[string]any{
			"model": pc.ProbeModel, "max_tokens": 1,
			"messages": []any{map[string]any{"role": "user", "content": "ping"}},
		}
	case provider.OpenAI:
		url = base + "/v1/chat/completions"
		body = map[string]any{
			"model": pc.ProbeModel, "max_completion_tokens": 1,
			"messages": []any{map[string]any{"role": "user", "content": "ping"}},
		}
	case provider.Google:
		url = base + "/v1beta/models/" + pc.ProbeModel + ":generateContent"
		body = map[string]any{
			"contents":         []any{map[string]any{"role": "user", "parts": []any{map[string]any{"text": "ping"}}}},
			"generationConfig": map[string]any{"maxOutputTokens": 1},
		}
	}
	data, err := json.Marshal(body)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	if spec.Name == provider.Anthropic {
		req.Header.Set("Anthropic-Version", "2023-06-01")
	}
	return req, nil
}

// providerMessage returns error.message from any of the three providers'
// error bodies, or the status line when the body has none.
func providerMessage(body []byte, status string) string {
	var shape struct {
		Error struct {
			Message string `json:"message"`
		} `json:"error"`
	}
	if json.Unmarshal(body, &shape) == nil && shape.Error.Message != "" {
		return shape.Error.Message
	}
	return status
}
