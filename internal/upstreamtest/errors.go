package upstreamtest

import (
	"net/http"
	"strings"
)

// MaskKey returns a key the way OpenAI's 401 message shows it: the first six
// and the last four characters kept, every character between replaced by
// "*". A key of ten characters or fewer is masked whole.
func MaskKey(key string) string {
	if len(key) <= 10 {
		return strings.Repeat("*", len(key))
	}
	return key[:6] + strings.Repeat("*", len(key)-10) + key[len(key)-4:]
}

// writeAuthError sends the provider's own error for a missing or rejected
// key.
func (s *Server) writeAuthError(c *call) {
	s.mu.Lock()
	echo := s.echoKey
	s.mu.Unlock()
	key := c.rec.Key

	switch s.Provider {
	case OpenAI:
		var msg string
		var code any
		if key == "" {
			msg = "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). You can obtain an API key from https://platform.openai.com/account/api-keys."
		} else {
			msg = "Incorrect API key provided: " + MaskKey(key) + ". You can find your API key at https://platform.openai.com/account/api-keys."
			code = "invalid_api_key"
			if echo {
				msg += " (received: " + key + ")"
			}
		}
		c.w.Header().Set("X-Request-Id", s.nextID("req_"))
		s.writeJSON(c, http.StatusUnauthorized, map[string]any{
			"error": map[string]any{"message": msg, "type": "invalid_request_error", "param": nil, "code": code},
		})
	case Anthropic:
		msg := "x-api-key header is required"
		if key != "" {
			msg = "invalid x-api-key"
			if echo {
				msg += ": " + key
			}
		}
		s.writeAnthropicError(c, http.StatusUnauthorized, "authentication_error", msg)
	default:
		if key == "" {
			s.writeGoogleError(c, http.StatusForbidden, "PERMISSION_DENIED",
				"Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.", nil)
			return
		}
		msg := "API key not valid. Please pass a valid API key."
		if echo {
			msg = "API key not valid: " + key + ". Please pass a valid API key."
		}
		s.writeGoogleError(c, http.StatusBadRequest, "INVALID_ARGUMENT", msg, []any{
			map[string]any{
				"@type":    "type.googleapis.com/google.rpc.ErrorInfo",
				"reason":   "API_KEY_INVALID",
				"domain":   "googleapis.com",
				"metadata": map[string]any{"service": "generativelanguage.googleapis.com"},
			},
		})
	}
}

// writeError sends the provider's error body for status to an authorized
// request. SetError uses it for every request.
func (s *Server) writeError(c *call, status int, msg string) {
	s.mu.Lock()
	echo := s.echoKey
	s.mu.Unlock()
	if msg == "" {
		msg = http.StatusText(status)
		if status == 529 {
			msg = "Overloaded"
		}
	}
	if echo {
		msg += " (key: " + c.rec.Key + ")"
	}
	if status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable || status == 529 {
		c.w.Header().Set("Retry-After", "1")
	}

	switch s.Provider {
	case OpenAI:
		typ, code := "invalid_request_error", any(nil)
		switch {
		case status == http.StatusTooManyRequests:
			typ, code = "requests", "rate_limit_exceeded"
		case status == http.StatusNotFound:
			code = "model_not_found"
		case status >= 500:
			typ = "server_error"
		}
		c.w.Header().Set("X-Request-Id", s.nextID("req_"))
		s.writeJSON(c, status, map[string]any{
			"error": map[string]any{"message": msg, "type": typ, "param": nil, "code": code},
		})
	case Anthropic:
		s.writeAnthropicError(c, status, anthropicErrorType(status), msg)
	default:
		s.writeGoogleError(c, status, googleStatus(status), msg, nil)
	}
}

func (s *Server) writeAnthropicError(c *call, status int, typ, msg string) {
	id := s.nextID("req_")
	c.w.Header().Set("Request-Id", id)
	s.writeJSON(c, status, map[string]any{
		"type":       "error",
		"error":      map[string]any{"type": typ, "message": msg},
		"request_id": id,
	})
}

func (s *Server) writeGoogleError(c *call, status int, rpcStatus, msg string, details []any) {
	e := map[string]any{"code": status, "message": msg, "status": rpcStatus}
	if details != nil {
		e["details"] = details
	}
	s.writeJSON(c, status, map[string]any{"error": e})
}

func anthropicErrorType(status int) string {
	switch status {
	case http.StatusBadRequest:
		return "invalid_request_error"
	case http.StatusUnauthorized:
		return "authentication_error"
	case http.StatusForbidden:
		return "permission_error"
	case http.StatusNotFound:
		return "not_found_error"
	case http.StatusRequestEntityTooLarge:
		return "request_too_large"
	case http.StatusTooManyRequests:
		return "rate_limit_error"
	case 529:
		return "overloaded_error"
	}
	return "api_error"
}

func googleStatus(status int) string {
	switch status {
	case http.StatusBadRequest:
		return "INVALID_ARGUMENT"
	case http.StatusUnauthorized:
		return "UNAUTHENTICATED"
	case http.StatusForbidden:
		return "PERMISSION_DENIED"
	case http.StatusNotFound:
		return "NOT_FOUND"
	case http.StatusTooManyRequests:
		return "RESOURCE_EXHAUSTED"
	case http.StatusServiceUnavailable:
		return "UNAVAILABLE"
	case http.StatusGatewayTimeout:
		return "DEADLINE_EXCEEDED"
	}
	return "INTERNAL"
}
