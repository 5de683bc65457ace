package provider

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// pySSE renders a chat stream as Python servers write it: ", " and ": "
// between members, with or without include_usage, framed by sep.
func pySSE(words []string, includeUsage bool, sep string) string {
	var b strings.Builder
	for _, w := range words {
		b.WriteString(`data: {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "` + w + `"}, "finish_reason": null}]`)
		if includeUsage {
			b.WriteString(`, "usage": null`)
		}
		b.WriteString("}" + sep + sep)
	}
	if includeUsage {
		b.WriteString(`data: {"id": "c1", "object": "chat.completion.chunk", "choices": [ ], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}` + sep + sep)
	}
	b.WriteString("data: [DONE]" + sep + sep)
	return b.String()
}

// Stripping what include_usage added does not depend on OpenAI's exact
// bytes: the client gets the stream it would have got without it, byte
// for byte, however the upstream spaces and frames its JSON.
func TestStreamTapStripsByStructure(t *testing.T) {
	for _, sep := range []string{"\n", "\r\n"} {
		words := []string{"a", "b", "c"}
		tap := newStreamTap(io.NopCloser(iotest.OneByteReader(strings.NewReader(pySSE(words, true, sep)))), true)
		got, err := io.ReadAll(tap)
		require.NoError(t, err)
		assert.Equal(t, pySSE(words, false, sep), string(got))
		u, ok := tap.Usage()
		require.True(t, ok)
		assert.Equal(t, Usage{Prompt: 7, Completion: 3, Total: 10}, u)
	}
}

func TestStreamTapStructuralCases(t *testing.T) {
	tests := []struct{ name, in, out string }{
		{"usage first", `data: {"usage": null, "choices": [{"delta": {}}]}` + "\n\n", `data: {"choices": [{"delta": {}}]}` + "\n\n"},
		{"usage on a content chunk", `data: {"choices": [{"delta": {"content": "x"}}], "usage" : {"prompt_tokens": 1, "completion_tokens": 1}}` + "\n\n",
			`data: {"choices": [{"delta": {"content": "x"}}]}` + "\n\n"},
		{"usage chunk without choices", `data: {"id": "x", "usage": {"prompt_tokens": 1}}` + "\n\n", ``},
		{"usage in a string", `data: {"choices": [{"delta": {"content": "\"usage\": null"}}]}` + "\n\n", `data: {"choices": [{"delta": {"content": "\"usage\": null"}}]}` + "\n\n"},
		{"not json", "data: usage\n\n", "data: usage\n\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := io.ReadAll(newStreamTap(io.NopCloser(strings.NewReader(tt.in)), true))
			require.NoError(t, err)
			assert.Equal(t, tt.out, string(got))
		})
	}
}

// What an upstream's headers and bodies say is bounded before it is used.
func TestUpstreamNumbersAreBounded(t *testing.T) {
	now := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	h := func(kv ...string) http.Header {
		out := http.Header{}
		for i := 0; i < len(kv); i += 2 {
			out.Set(kv[i], kv[i+1])
		}
		return out
	}
	for _, tt := range []struct {
		name string
		h    http.Header
		want time.Duration
		ok   bool
	}{
		{"huge seconds", h("Retry-After", "999999999"), MaxRetryAfter, true},
		{"far date", h("Retry-After", "Fri, 31 Dec 9999 23:59:59 GMT"), MaxRetryAfter, true},
		{"past date", h("Retry-After", "Mon, 01 Jan 2001 00:00:00 GMT"), 0, true},
		{"huge ms", h("Retry-After-Ms", "1e300"), MaxRetryAfter, true},
		{"NaN ms", h("Retry-After-Ms", "NaN"), 0, false},
		{"Inf", h("Retry-After", "+Inf"), 0, false},
		{"negative", h("Retry-After-Ms", "-5"), 0, false},
		{"huge reset", h("X-Ratelimit-Remaining-Tokens", "0", "X-Ratelimit-Reset-Tokens", "1e300"), MaxRetryAfter, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d, ok := RetryAfter(tt.h, now)
			assert.Equal(t, tt.ok, ok)
			assert.Equal(t, tt.want, d)
			assert.GreaterOrEqual(t, d, time.Duration(0))
		})
	}
	ri := ParseRateHeaders(h("X-Ratelimit-Remaining-Tokens", "99999999999999999999", "X-Ratelimit-Limit-Tokens", "-3",
		"X-Ratelimit-Reset-Requests", "1e300"))
	assert.False(t, ri.Tokens.HasRemaining, "not a number we can hold")
	assert.False(t, ri.Tokens.HasLimit)
	assert.Equal(t, MaxReset, ri.Requests.Reset)

	for body, want := range map[string]Usage{
		`{"usage":{"prompt_tokens":-5,"completion_tokens":-7,"total_tokens":-12}}`: {Prompt: 0, Completion: 0, Total: 0},
		`{"usage":{"prompt_tokens":1e300,"completion_tokens":2,"total_tokens":3}}`: {Prompt: MaxUsage, Completion: 2, Total: MaxUsage},
		`{"usage":{"prompt_tokens":"9","completion_tokens":2}}`:                    {Prompt: 0, Completion: 2, Total: 2},
		`{"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":1}}`:     {Prompt: 5, Completion: 2, Total: 7},
		`{"usage":{"input_tokens":4294967296,"output_tokens":4294967296}}`:         {Prompt: MaxUsage, Completion: MaxUsage, Total: MaxUsage},
	} {
		u, ok := FindUsage([]byte(body))
		assert.True(t, ok, body)
		assert.Equal(t, want, u, body)
	}
}
