package provider

import (
	"encoding/json"
	"net/http"
	"strconv"
	"time"
)

// ErrorKind classifies an error that the proxy itself produces. Each kind maps
// to one HTTP status and to each provider's own error type.
type ErrorKind int

// Error kinds, one per row of the error table.
const (
	BadRequest ErrorKind = iota
	Unauthenticated
	Forbidden
	NotFound
	TooLarge
	HeadersTooLarge
	QuotaExceeded
	BadGateway
	GatewayTimeout
	Unavailable
)

type errorShape struct {
	status    int
	anthropic string // Anthropic error.type
	openai    string // OpenAI error.type
	code      string // OpenAI error.code
	google    string // Google error.status
}

var shapes = map[ErrorKind]errorShape{
	BadRequest:      {400, "invalid_request_error", "invalid_request_error", "invalid_request", "INVALID_ARGUMENT"},
	Unauthenticated: {401, "authentication_error", "invalid_request_error", "invalid_api_key", "UNAUTHENTICATED"},
	Forbidden:       {403, "permission_error", "invalid_request_error", "forbidden", "PERMISSION_DENIED"},
	NotFound:        {404, "not_found_error", "invalid_request_error", "not_found", "NOT_FOUND"},
	TooLarge:        {413, "request_too_large", "invalid_request_error", "request_too_large", "INVALID_ARGUMENT"},
	HeadersTooLarge: {431, "request_too_large", "invalid_request_error", "request_too_large", "INVALID_ARGUMENT"},
	QuotaExceeded:   {429, "rate_limit_error", "insufficient_quota", "insufficient_quota", "RESOURCE_EXHAUSTED"},
	BadGateway:      {502, "api_error", "server_error", "bad_gateway", "UNAVAILABLE"},
	GatewayTimeout:  {504, "api_error", "server_error", "gateway_timeout", "DEADLINE_EXCEEDED"},
	Unavailable:     {503, "api_error", "server_error", "service_unavailable", "UNAVAILABLE"},
}

// Status returns the HTTP status of an error kind.
func (k ErrorKind) Status() int {
	return shapes[k].status
}

// ErrorBody returns the JSON body of an error of kind k in this provider's
// shape.
func (s *Spec) ErrorBody(k ErrorKind, message string) []byte {
	shape := shapes[k]
	var v any
	switch s.Name {
	case Anthropic:
		v = map[string]any{
			"type":  "error",
			"error": map[string]string{"type": shape.anthropic, "message": message},
		}
	case Google:
		v = map[string]any{
			"error": map[string]any{"code": shape.status, "message": message, "status": shape.google},
		}
	default:
		v = map[string]any{
			"error": map[string]any{"message": message, "type": shape.openai, "param": nil, "code": shape.code},
		}
	}
	body, _ := json.Marshal(v)
	return body
}

// WriteError writes an error of kind k in this provider's shape. A positive
// retryAfter sets the Retry-After header in whole seconds, rounded up.
func (s *Spec) WriteError(w http.ResponseWriter, k ErrorKind, message string, retryAfter time.Duration) {
	body := s.ErrorBody(k, message)
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("X-Content-Type-Options", "nosniff")
	if retryAfter > 0 {
		secs := int64((retryAfter + time.Second - 1) / time.Second)
		h.Set("Retry-After", strconv.FormatInt(secs, 10))
	}
	if k != BadGateway && k != GatewayTimeout && k != Unavailable {
		// The official SDKs retry a 429 after Retry-After, which for a
		// monthly allowance can be weeks; x-should-retry: false makes them
		// raise at once. Errors of the request itself are final too.
		h.Set("X-Should-Retry", "false")
	}
	w.WriteHeader(shapes[k].status)
	w.Write(body)
}
