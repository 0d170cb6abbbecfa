package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/tidwall/gjson"

	"github.com/byokproxy/byokproxy/internal/teststack"
	"github.com/byokproxy/byokproxy/provider"
)

// containerCase creates a code execution container on one provider and
// names it again in a later request.
type containerCase struct {
	provider string
	path     string
	// create requests a new container.
	create string
	// reuse returns request bodies that name container id.
	reuse func(id string) []string
	// idPath is where a JSON body or a stream event reports the container.
	idPath string
}

var containerCases = []containerCase{
	{
		provider: provider.Anthropic,
		path:     "/anthropic/v1/messages",
		create: `{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"run it"}],` +
			`"tools":[{"type":"code_execution_20250825","name":"code_execution"}]}`,
		reuse: func(id string) []string {
			base := `{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"again"}],` +
				`"tools":[{"type":"code_execution_20250825","name":"code_execution"}],`
			return []string{base + `"container":"` + id + `"}`, base + `"container":{"id":"` + id + `"}}`}
		},
		idPath: "container.id|delta.container.id",
	},
	{
		provider: provider.OpenAI,
		path:     "/openai/v1/responses",
		create:   `{"model":"gpt-4o-mini","input":"run it","tools":[{"type":"code_interpreter","container":{"type":"auto"}}]}`,
		reuse: func(id string) []string {
			return []string{
				`{"model":"gpt-4o-mini","input":"again","tools":[{"type":"code_interpreter","container":"` + id + `"}]}`,
				`{"model":"gpt-4o-mini","input":"again","tools":[{"type":"shell","environment":{"type":"container_reference","container_id":"` + id + `"}}]}`,
				`{"model":"gpt-4o-mini","tools":[{"type":"code_interpreter","container":{"type":"auto"}}],"input":[` +
					`{"type":"code_interpreter_call","id":"ci_1","status":"completed","code":"print(1)","outputs":null,"container_id":"` + id + `"},` +
					`{"role":"user","content":"again"}]}`,
			}
		},
		idPath: "output.#.container_id|item.container_id",
	},
}

// createdID returns the first id at idPath of a JSON body or of an event
// stream.
func createdID(t *testing.T, body []byte, idPath string) string {
	t.Helper()
	var docs [][]byte
	if bytes.HasPrefix(bytes.TrimSpace(body), []byte("{")) {
		docs = append(docs, body)
	} else {
		sc := bufio.NewScanner(bytes.NewReader(body))
		for sc.Scan() {
			if data, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
				docs = append(docs, []byte(data))
			}
		}
	}
	for _, doc := range docs {
		for _, path := range strings.Split(idPath, "|") {
			v := gjson.GetBytes(doc, path)
			if v.IsArray() {
				v = v.Get("0")
			}
			if id := v.String(); id != "" {
				return id
			}
		}
	}
	t.Fatalf("no container id at %s in %s", idPath, body)
	return ""
}

// TestContainerOwnership checks that a container created on the shared key
// can be named again by its mailbox, at once and on every replica, and by no
// other mailbox.
func TestContainerOwnership(t *testing.T) {
	st := teststack.Start(t)
	other := st.Replica(t)
	alice := st.Token(t, "alice@example.com")
	mallory := st.Token(t, "mallory@example.com")
	for _, c := range containerCases {
		for _, stream := range []bool{false, true} {
			name := c.provider + "/json"
			create := c.create
			if stream {
				name = c.provider + "/stream"
				create = strings.Replace(create, `{`, `{"stream":true,`, 1)
			}
			t.Run(name, func(t *testing.T) {
				up := st.Upstreams[c.provider]
				resp, body := st.Do(t, "POST", c.path, alice, create, sdkHeaders(c.provider)...)
				if resp.StatusCode != 200 {
					t.Fatalf("create: status %d: %s", resp.StatusCode, body)
				}
				id := createdID(t, body, c.idPath)

				// No wait for the audit writer: the id must be stored
				// before the response that carries it ends.
				for i, reuse := range c.reuse(id) {
					otherUp := other.Upstreams[c.provider]
					n := len(otherUp.Requests())
					resp, body = other.Do(t, "POST", c.path, alice, reuse, sdkHeaders(c.provider)...)
					if resp.StatusCode != 200 {
						t.Errorf("owner naming its container (form %d) on another replica: status %d: %s", i, resp.StatusCode, body)
					}
					if got := len(otherUp.Requests()); got != n+1 {
						t.Errorf("owner naming its container (form %d): %d requests forwarded, want 1", i, got-n)
					}

					n = len(up.Requests())
					resp, body = st.Do(t, "POST", c.path, mallory, reuse, sdkHeaders(c.provider)...)
					if resp.StatusCode != 403 {
						t.Errorf("another mailbox naming the container (form %d): status %d, want 403", i, resp.StatusCode)
					}
					if !inShape(c.provider, body, "permission_error", "forbidden", "PERMISSION_DENIED") {
						t.Errorf("another mailbox naming the container (form %d): not in the 403 shape: %s", i, body)
					}
					if got := len(up.Requests()); got != n {
						t.Errorf("another mailbox naming the container (form %d): %d requests forwarded", i, got-n)
					}
				}
			})
		}
	}
}

func TestContainerOnBYOKNotChecked(t *testing.T) {
	st := teststack.Start(t)
	for _, c := range containerCases {
		st.UseBYOK(t, "own@example.com", c.provider)
	}
	own := st.Token(t, "own@example.com")
	for _, c := range containerCases {
		for _, reuse := range c.reuse("container_notcreatedhere") {
			resp, body := st.Do(t, "POST", c.path, own, reuse, sdkHeaders(c.provider)...)
			if resp.StatusCode != 200 {
				t.Errorf("%s: own key naming any container: status %d: %s", c.provider, resp.StatusCode, body)
			}
		}
	}
}

func TestContainerFieldRejected(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "fields@example.com")
	cases := []struct {
		provider, path, body string
	}{
		{provider.Anthropic, "/anthropic/v1/messages",
			`{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[],"container":{"id":"container_mine","id":"container_theirs"}}`},
		{provider.Anthropic, "/anthropic/v1/messages",
			`{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[],"container":{"id":42}}`},
		{provider.Anthropic, "/anthropic/v1/messages",
			`{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[],"container":"a","container":"b"}`},
		{provider.OpenAI, "/openai/v1/responses",
			`{"model":"gpt-4o-mini","input":"x","tools":[{"type":"code_interpreter","container":"cntr_a","container":"cntr_b"}]}`},
		{provider.OpenAI, "/openai/v1/responses",
			`{"model":"gpt-4o-mini","input":"x","tools":[{"type":"shell","environment":{"type":"container_reference","container_id":"cntr_a","container_id":"cntr_b"}}]}`},
		{provider.OpenAI, "/openai/v1/responses",
			`{"model":"gpt-4o-mini","input":"x","tools":[],"tools":[{"type":"code_interpreter","container":"cntr_b"}]}`},
	}
	for _, c := range cases {
		up := st.Upstreams[c.provider]
		n := len(up.Requests())
		resp, body := st.Do(t, "POST", c.path, token, c.body, sdkHeaders(c.provider)...)
		if resp.StatusCode != 400 {
			t.Errorf("%s: status %d, want 400: %s", c.body, resp.StatusCode, body)
		}
		var e struct{ Error struct{ Message string } }
		if json.Unmarshal(body, &e) != nil || e.Error.Message == "" {
			t.Errorf("%s: no error message in %s", c.body, body)
		}
		if got := len(up.Requests()); got != n {
			t.Errorf("%s: forwarded", c.body)
		}
	}
}

// TestPreviousResponseAtOnce checks that a response can be continued as soon
// as it has arrived, before the audit writer's next batch, on another
// replica, streamed or not.
func TestPreviousResponseAtOnce(t *testing.T) {
	st := teststack.Start(t)
	other := st.Replica(t)
	token := st.Token(t, "atonce@example.com")
	for _, body := range []string{`{"model":"gpt-4o-mini","input":"hello"}`, `{"model":"gpt-4o-mini","input":"hello","stream":true}`} {
		for i := range 5 {
			resp, created := st.Do(t, "POST", "/openai/v1/responses", token, body)
			if resp.StatusCode != 200 {
				t.Fatalf("create: status %d: %s", resp.StatusCode, created)
			}
			id := gjson.GetBytes(created, "id").String()
			if id == "" {
				// The stream's first event carries it.
				_, after, _ := bytes.Cut(created, []byte("data: "))
				id = gjson.GetBytes(after, "response.id").String()
			}
			follow := `{"model":"gpt-4o-mini","input":"more","previous_response_id":"` + id + `"}`
			resp, out := other.Do(t, "POST", "/openai/v1/responses", token, follow)
			if resp.StatusCode != 200 {
				t.Errorf("continuing %s at once (round %d): status %d: %s", id, i, resp.StatusCode, out)
			}
		}
	}
}

// zmscoreCalls returns how many ZMSCORE commands the stack's Redis has run.
func zmscoreCalls(t *testing.T, st *teststack.Stack) int64 {
	t.Helper()
	info, err := st.RDB.Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	_, rest, found := strings.Cut(info, "cmdstat_zmscore:calls=")
	if !found {
		return 0
	}
	n, _ := strconv.ParseInt(rest[:strings.IndexByte(rest, ',')], 10, 64)
	return n
}

// TestNamedContainersBounded checks that one request naming the same
// container in many input items costs one ownership check, and that a
// request may name only a few distinct containers.
func TestNamedContainersBounded(t *testing.T) {
	st := teststack.Start(t)
	token := st.Token(t, "many-items@example.com")
	c := containerCases[1] // OpenAI
	resp, body := st.Do(t, "POST", c.path, token, c.create)
	if resp.StatusCode != 200 {
		t.Fatalf("create: status %d: %s", resp.StatusCode, body)
	}
	id := createdID(t, body, c.idPath)

	item := `{"type":"code_interpreter_call","id":"ci_1","status":"completed","code":"print(1)","outputs":null,"container_id":"` + id + `"},`
	many := `{"model":"gpt-4o-mini","input":[` + strings.Repeat(item, 5000) + `{"role":"user","content":"again"}]}`
	before := zmscoreCalls(t, st)
	if resp, body := st.Do(t, "POST", c.path, token, many); resp.StatusCode != 200 {
		t.Fatalf("5,000 items naming the mailbox's own container: status %d: %s", resp.StatusCode, body)
	}
	if calls := zmscoreCalls(t, st) - before; calls != 1 {
		t.Errorf("5,000 items naming one container cost %d ownership checks, want 1", calls)
	}

	var items strings.Builder
	for i := range maxNamedIDs + 1 {
		fmt.Fprintf(&items, `{"type":"code_interpreter_call","id":"ci_%d","container_id":"cntr_%d"},`, i, i)
	}
	distinct := `{"model":"gpt-4o-mini","input":[` + items.String() + `{"role":"user","content":"again"}]}`
	if resp, body := st.Do(t, "POST", c.path, token, distinct); resp.StatusCode != 400 {
		t.Errorf("%d distinct containers: status %d, want 400: %s", maxNamedIDs+1, resp.StatusCode, body)
	}
}

// maxNamedIDs is the proxy's bound on the distinct containers one
// request may name.
const maxNamedIDs = 256

// TestReasoningItemOwnership checks that a reasoning item passed back by id,
// which the Responses API looks up in its storage, must be one the mailbox
// created on the shared key, streamed or not.
func TestReasoningItemOwnership(t *testing.T) {
	st := teststack.Start(t)
	alice := st.Token(t, "alice-reasoning@example.com")
	mallory := st.Token(t, "mallory-reasoning@example.com")
	up := st.Upstreams[provider.OpenAI]
	for _, create := range []string{
		`{"model":"o4-mini","input":"think","reasoning":{"effort":"low"}}`,
		`{"model":"o4-mini","input":"think","reasoning":{"effort":"low"},"stream":true}`,
	} {
		resp, body := st.Do(t, "POST", "/openai/v1/responses", alice, create)
		if resp.StatusCode != 200 {
			t.Fatalf("create: status %d: %s", resp.StatusCode, body)
		}
		id := createdID(t, body, "output.#.id|item.id")
		if !strings.HasPrefix(id, "rs_") {
			t.Fatalf("first output item id %q is not a reasoning item's", id)
		}
		passBack := `{"model":"o4-mini","input":[{"type":"reasoning","id":"` + id + `","summary":[]},{"role":"user","content":"more"}]}`
		if resp, body := st.Do(t, "POST", "/openai/v1/responses", alice, passBack); resp.StatusCode != 200 {
			t.Errorf("owner passing its reasoning item back at once: status %d: %s", resp.StatusCode, body)
		}
		n := len(up.Requests())
		resp, body = st.Do(t, "POST", "/openai/v1/responses", mallory, passBack)
		if resp.StatusCode != 403 || !strings.Contains(string(body), "reasoning item") {
			t.Errorf("another mailbox passing the reasoning item: status %d, want 403: %s", resp.StatusCode, body)
		}
		if len(up.Requests()) != n {
			t.Error("another mailbox's reasoning item was forwarded")
		}
	}
}
