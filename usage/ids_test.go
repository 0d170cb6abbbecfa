package usage

import (
	"slices"
	"strings"
	"testing"
)

func TestTapContainers(t *testing.T) {
	cases := []struct {
		name        string
		provider    string
		contentType string
		body        string
		want        []string
	}{
		{"anthropic message", "anthropic", jsonType,
			`{"id":"msg_1","type":"message","content":[{"type":"text","text":"done"}],` +
				`"container":{"expires_at":"2026-12-05T06:00:00Z","id":"container_011A"},"usage":{"input_tokens":5,"output_tokens":2}}`,
			[]string{"container_011A"}},
		{"anthropic without container", "anthropic", jsonType,
			`{"id":"msg_1","type":"message","content":[],"container":null,"usage":{"input_tokens":5,"output_tokens":2}}`,
			nil},
		{"anthropic tool input is not a container", "anthropic", jsonType,
			`{"id":"msg_1","type":"message","content":[{"type":"tool_use","id":"toolu_1","name":"f",` +
				`"input":{"container":{"id":"container_FORGED"},"container_id":"cntr_FORGED"}}],"usage":{"input_tokens":5,"output_tokens":2}}`,
			nil},
		{"anthropic text is not a container", "anthropic", jsonType,
			`{"id":"msg_1","type":"message","content":[{"type":"text","text":"{\"container\":{\"id\":\"container_FORGED\"}}"}]}`,
			nil},
		{"anthropic stream delta", "anthropic", sseType,
			"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"container\":null,\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n" +
				"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"container\":{\"id\":\"container_011B\",\"expires_at\":\"2026-12-05T06:00:00Z\"}},\"usage\":{\"output_tokens\":9}}\n\n",
			[]string{"container_011B"}},
		{"anthropic stream message_start", "anthropic", sseType,
			"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"container\":{\"id\":\"container_011C\"}}}\n\n" +
				"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"container\":{\"id\":\"container_011C\"}}}\n\n",
			[]string{"container_011C"}},
		{"anthropic event cut before its end", "anthropic", sseType,
			"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"container\":{\"id\":\"container_011D\"}}",
			nil},
		{"openai response", "openai", jsonType,
			`{"id":"resp_1","object":"response","output":[{"type":"code_interpreter_call","id":"ci_1","container_id":"cntr_A1","code":"print(1)"},` +
				`{"type":"message","content":[{"type":"output_text","text":"{\"container_id\":\"cntr_FORGED\"}"}]}],` +
				`"tools":[{"type":"code_interpreter","container":"cntr_TOOLS"}]}`,
			[]string{"cntr_A1"}},
		{"openai function arguments", "openai", jsonType,
			`{"id":"resp_1","object":"response","output":[{"type":"function_call","arguments":"{\"container_id\":\"cntr_FORGED\"}"}]}`,
			nil},
		{"openai stream", "openai", sseType,
			"event: response.output_item.added\ndata: {\"type\":\"response.output_item.added\",\"item\":{\"type\":\"code_interpreter_call\",\"container_id\":\"cntr_B2\"}}\n\n" +
				"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_2\",\"output\":[{\"type\":\"code_interpreter_call\",\"container_id\":\"cntr_B2\"},{\"type\":\"code_interpreter_call\",\"container_id\":\"cntr_C3\"}]}}\n\n",
			[]string{"cntr_B2", "cntr_C3"}},
		{"openai output in any body", "openai", jsonType,
			`{"id":"chatcmpl-1","object":"chat.completion","choices":[],"output":[{"container_id":"cntr_D4"}]}`,
			[]string{"cntr_D4"}},
		{"google ignores container fields", "google", jsonType,
			`{"candidates":[],"container":{"id":"container_G"},"output":[{"container_id":"cntr_G"}]}`,
			nil},
		{"escaped id", "anthropic", jsonType,
			`{"container":{"id":"container_\u0041B"}}`,
			[]string{"container_AB"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tap := NewTap(c.provider, c.contentType)
			for i := range len(c.body) {
				tap.Write([]byte{c.body[i]})
			}
			got := tap.Containers(0)
			if !slices.Equal(got, c.want) {
				t.Errorf("Containers(0) = %q, want %q", got, c.want)
			}
			if tap.panicked != "" {
				t.Errorf("tap panicked: %s", tap.panicked)
			}
		})
	}
}

func TestTapContainersFrom(t *testing.T) {
	tap := NewTap("openai", jsonType)
	tap.Write([]byte(`{"output":[{"container_id":"cntr_1"},{"container_id":"cntr_1"},{"container_id":"cntr_2"}]}`))
	if got := tap.Containers(1); !slices.Equal(got, []string{"cntr_2"}) {
		t.Errorf("Containers(1) = %q, want [cntr_2]", got)
	}
	if got := tap.Containers(2); got != nil {
		t.Errorf("Containers(2) = %q, want nil", got)
	}
}

func TestTapContainersBounded(t *testing.T) {
	tap := NewTap("openai", sseType)
	for i := range 2 * maxContainers {
		tap.Write([]byte("data: {\"item\":{\"container_id\":\"cntr_" + string(rune('a'+i)) + "\"}}\n\n"))
	}
	if got := len(tap.Containers(0)); got != maxContainers {
		t.Errorf("kept %d container ids, want %d", got, maxContainers)
	}
}

func TestTapResponseID(t *testing.T) {
	cases := []struct {
		name        string
		provider    string
		contentType string
		body        string
		want        string
	}{
		{"json body", "openai", jsonType,
			`{"metadata":{"id":"resp_FORGED"},"prompt":{"id":"resp_FORGED2"},"output":[{"id":"resp_FORGED3","type":"message"}],"id":"resp_OWN","object":"response"}`,
			"resp_OWN"},
		{"stream", "openai", sseType,
			"event: response.output_item.added\ndata: {\"type\":\"response.output_item.added\",\"item\":{\"id\":\"resp_FORGED\"}}\n\n" +
				"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"metadata\":{\"id\":\"resp_FORGED\"},\"id\":\"resp_OWN\"}}\n\n",
			"resp_OWN"},
		{"chat completion", "openai", jsonType, `{"id":"chatcmpl-1","object":"chat.completion"}`, ""},
		{"text", "openai", jsonType, `{"output_text":"{\"id\":\"resp_FORGED\"}","id":42}`, ""},
		{"anthropic", "anthropic", jsonType, `{"id":"resp_FORGED"}`, ""},
		{"body invalid after the id", "openai", jsonType, `{"id":"resp_OWN","tools":[` + strings.Repeat("[", 5000) + `]}`, "resp_OWN"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tap := NewTap(c.provider, c.contentType)
			for i := range len(c.body) {
				tap.Write([]byte{c.body[i]})
			}
			if got := tap.ResponseID(); got != c.want {
				t.Errorf("ResponseID() = %q, want %q", got, c.want)
			}
		})
	}
}

func TestTapReasoningItems(t *testing.T) {
	body := `{"id":"resp_1","output":[{"type":"reasoning","id":"rs_A","summary":[]},{"type":"message","id":"msg_B"},` +
		`{"type":"function_call","id":"fc_C","arguments":"{\"id\":\"rs_FORGED\"}"},{"type":"reasoning","id":"rs_D"}],` +
		`"metadata":{"id":"rs_FORGED2"}}`
	tap := NewTap("openai", jsonType)
	tap.Write([]byte(body))
	if got := tap.ReasoningItems(0); !slices.Equal(got, []string{"rs_A", "rs_D"}) {
		t.Errorf("ReasoningItems(0) = %q, want [rs_A rs_D]", got)
	}
	stream := NewTap("openai", sseType)
	stream.Write([]byte("data: {\"type\":\"response.output_item.done\",\"item\":{\"type\":\"reasoning\",\"id\":\"rs_E\"}}\n\n"))
	if got := stream.ReasoningItems(0); !slices.Equal(got, []string{"rs_E"}) {
		t.Errorf("stream ReasoningItems(0) = %q, want [rs_E]", got)
	}
}
