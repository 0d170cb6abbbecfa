package upstreamtest

import (
	"encoding/json"
	"strings"
)

// Usage is the token usage an emulator reported for one request.
type Usage struct {
	InputTokens  int `json:"input_tokens"`
	OutputTokens int `json:"output_tokens"`
}

// BaseInputTokens is added to the prompt's word count to give the input
// tokens of every request, so even an empty prompt costs something.
const BaseInputTokens = 7

// ReplyDeltas are the text deltas of every generated reply, in order. A
// non-streamed reply is their concatenation, ReplyText.
var ReplyDeltas = []string{"Hello", " from", " the", " upstream", " emulator", "."}

// ReplyText returns the reply of a request whose output is n tokens: the
// first n of ReplyDeltas joined.
func ReplyText(n int) string {
	return strings.Join(ReplyDeltas[:n], "")
}

// promptFields are the top-level request fields whose text counts as prompt,
// across the three providers' request formats.
var promptFields = []string{
	"messages", "input", "contents", "system", "instructions",
	"systemInstruction", "system_instruction", "prompt", "requests", "content",
}

// skippedFields name fields inside the prompt whose strings are not text.
var skippedFields = map[string]bool{"role": true, "type": true, "model": true}

// InputTokens returns the input tokens the emulators report for a request
// body: BaseInputTokens plus the number of whitespace-separated words in every
// string under the body's prompt fields (messages, input, contents, system,
// instructions, systemInstruction, prompt, requests, content), except the
// strings of "role", "type" and "model" fields. A body that is not a JSON
// object counts as an empty prompt.
func InputTokens(body []byte) int {
	var m map[string]any
	if json.Unmarshal(body, &m) != nil {
		return BaseInputTokens
	}
	return inputTokens(m)
}

func inputTokens(m map[string]any) int {
	words := 0
	for _, f := range promptFields {
		if v, ok := m[f]; ok {
			words += countWords(v)
		}
	}
	return BaseInputTokens + words
}

func countWords(v any) int {
	switch v := v.(type) {
	case string:
		return len(strings.Fields(v))
	case []any:
		n := 0
		for _, e := range v {
			n += countWords(e)
		}
		return n
	case map[string]any:
		n := 0
		for k, e := range v {
			if !skippedFields[k] {
				n += countWords(e)
			}
		}
		return n
	}
	return 0
}

// OutputTokens returns the output tokens of a generated reply to body: one per
// text delta, len(ReplyDeltas), or fewer when the request's output limit
// (max_tokens, max_completion_tokens, max_output_tokens or
// generationConfig.maxOutputTokens) is smaller. A limit of zero or less is
// ignored.
func OutputTokens(body []byte) int {
	var m map[string]any
	json.Unmarshal(body, &m)
	n, _ := outputTokens(m)
	return n
}

// outputTokens also reports whether the output limit cut the reply short.
func outputTokens(m map[string]any) (int, bool) {
	limit := 0
	for _, f := range []string{"max_tokens", "max_completion_tokens", "max_output_tokens"} {
		if v, ok := m[f].(float64); ok && v > 0 {
			limit = int(v)
		}
	}
	for _, f := range []string{"generationConfig", "generation_config"} {
		cfg, _ := m[f].(map[string]any)
		for _, g := range []string{"maxOutputTokens", "max_output_tokens"} {
			if v, ok := cfg[g].(float64); ok && v > 0 {
				limit = int(v)
			}
		}
	}
	if limit > 0 && limit < len(ReplyDeltas) {
		return limit, true
	}
	return len(ReplyDeltas), false
}
