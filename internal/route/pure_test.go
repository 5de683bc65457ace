package route

import (
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/models"
	"github.com/llproxy/llproxy/internal/request"
	"github.com/llproxy/llproxy/provider"
	"github.com/llproxy/llproxy/tokenizer"
)

// Table tests of the request path's pure functions: what a request costs,
// the model defaults a chat gets, the backoff between sends, and what a
// cut answer is charged.

func TestEstimateCost(t *testing.T) {
	tok, err := tokenizer.New(tokenizer.Config{})
	require.NoError(t, err)
	rt := &Route{opts: Options{Tokenizer: tok}}
	ms := &models.Model{DefaultMaxTokens: 1024}
	const msgs = `"messages":[{"role":"user","content":"hi"}]`
	prompt := tok.PromptTokens(tokenizer.EndpointChat, "gpt-4o", fastjson.MustParse(`{`+msgs+`}`))
	for _, tc := range []struct {
		name, body string
		ep         tokenizer.Endpoint
		cost       int
		err        bool
	}{
		{"default max tokens", `{` + msgs + `}`, tokenizer.EndpointChat, prompt + 1024, false},
		{"max_tokens", `{"max_tokens":10,` + msgs + `}`, tokenizer.EndpointChat, prompt + 10, false},
		{"max_completion_tokens wins", `{"max_completion_tokens":7,"max_tokens":10,` + msgs + `}`, tokenizer.EndpointChat, prompt + 7, false},
		{"n multiplies", `{"max_tokens":10,"n":3,` + msgs + `}`, tokenizer.EndpointChat, prompt + 30, false},
		{"best_of is the larger", `{"max_tokens":10,"n":2,"best_of":4,` + msgs + `}`, tokenizer.EndpointChat, prompt + 40, false},
		{"1e2 is 100", `{"max_tokens":1e2,` + msgs + `}`, tokenizer.EndpointChat, prompt + 100, false},
		{"zero", `{"max_tokens":0,` + msgs + `}`, tokenizer.EndpointChat, 0, true},
		{"negative", `{"max_output_tokens":-1,` + msgs + `}`, tokenizer.EndpointChat, 0, true},
		{"fraction", `{"max_tokens":1.5,` + msgs + `}`, tokenizer.EndpointChat, 0, true},
		{"n too large", `{"n":129,` + msgs + `}`, tokenizer.EndpointChat, 0, true},
		{"embeddings have no output", `{"input":"hi","max_tokens":10}`, tokenizer.EndpointEmbeddings, 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, err := rt.estimateCost(tc.ep, "gpt-4o", fastjson.MustParse(tc.body), ms, false)
			if tc.err {
				assert.Error(t, err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.cost, e.cost)
		})
	}
	// The largest numbers accepted add up without wrapping.
	e, err := rt.estimateCost(tokenizer.EndpointChat, "gpt-4o", fastjson.MustParse(fmt.Sprintf(`{"max_tokens":%d,"n":%d,`+msgs+`}`,
		request.MaxOutputTokens, request.MaxN)), ms, false)
	require.NoError(t, err)
	assert.Equal(t, min(math.MaxInt32, prompt+request.MaxOutputTokens*request.MaxN), e.cost)
}

func TestApplyDefaults(t *testing.T) {
	for _, tc := range []struct {
		name, body, defaults, system, want string
		changed                            bool
	}{
		{"none", `{"messages":[]}`, "", "", `{"messages":[]}`, false},
		{"a default fills what is unset", `{"messages":[]}`, `{"temperature":0.2}`, "", `{"messages":[],"temperature":0.2}`, true},
		{"the request's own wins", `{"temperature":1,"messages":[]}`, `{"temperature":0.2}`, "", `{"temperature":1,"messages":[]}`, false},
		{"a system prompt goes first", `{"messages":[{"role":"user","content":"hi"}]}`, "", "be brief",
			`{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}`, true},
		{"the request's system message wins", `{"messages":[{"role":"developer","content":"x"}]}`, "", "be brief",
			`{"messages":[{"role":"developer","content":"x"}]}`, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ms := &models.Model{System: tc.system}
			if tc.defaults != "" {
				ms.Defaults = []byte(tc.defaults)
			}
			var p, dp fastjson.Parser
			var a fastjson.Arena
			v, err := p.Parse(tc.body)
			require.NoError(t, err)
			assert.Equal(t, tc.changed, applyDefaults(v, ms, &dp, &a))
			assert.JSONEq(t, tc.want, string(v.MarshalTo(nil)))
		})
	}
}

func TestBackoff(t *testing.T) {
	ex := &exchange{backoff: 100 * time.Millisecond, maxRetries: 2}
	for try, base := range map[int]time.Duration{1: 100 * time.Millisecond, 2: 200 * time.Millisecond, 3: 400 * time.Millisecond,
		20: 100 * time.Millisecond << 10} {
		ex.tries = try
		for range 50 {
			d := ex.nextBackoff()
			assert.LessOrEqual(t, d, base, "try %d", try)
			assert.GreaterOrEqual(t, d, base*3/4, "try %d: at most a quarter of jitter", try)
		}
	}
	// canRetry: retries left, nothing written, and the backoff ends by the deadline.
	now := time.Now()
	deadline := now.Add(time.Second)
	ex = &exchange{backoff: 100 * time.Millisecond, maxRetries: 2, tries: 1}
	assert.True(t, ex.retryable(now, deadline))
	assert.False(t, ex.canRetry(now), "not admitted: no ticket")
	ex.tries = 3
	assert.False(t, ex.retryable(now, deadline), "out of retries")
	ex.tries, ex.status = 1, 200
	assert.False(t, ex.retryable(now, deadline), "something reached the client")
	ex.status = 0
	assert.False(t, ex.retryable(now.Add(950*time.Millisecond), deadline), "the backoff would end past the deadline")
}

type relayed struct {
	chunks int
	bytes  int64
}

func (r relayed) Usage() (u provider.Usage, ok bool) { return u, false }
func (r relayed) Relayed() (int, int64)              { return r.chunks, r.bytes }

func TestRelayedOutput(t *testing.T) {
	for _, tc := range []struct {
		name, ctype string
		tap         relayed
		reserved    int
		want        int
	}{
		{"an SSE stream: a chunk a token", "text/event-stream", relayed{9, 900}, 1000, 9},
		{"NDJSON: a line a token", "application/x-ndjson", relayed{5, 700}, 1000, 5},
		{"JSON: 4 bytes a token", "application/json", relayed{1, 400}, 1000, 100},
		{"never more than reserved", "application/json", relayed{1, 400000}, 50, 50},
		{"nothing relayed", "text/event-stream", relayed{}, 50, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, relayedOutput(tc.tap, tc.ctype, tc.reserved))
		})
	}
}
