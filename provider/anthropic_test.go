package provider

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseAnthropicRateHeaders(t *testing.T) {
	now := time.Date(2025, 8, 21, 12, 40, 30, 0, time.UTC)
	ri := ParseAnthropicRateHeaders(http.Header{
		"Anthropic-Ratelimit-Requests-Limit": {"50"}, "Anthropic-Ratelimit-Requests-Remaining": {"49"},
		"Anthropic-Ratelimit-Requests-Reset":          {"2025-08-21T12:40:31Z"},
		"Anthropic-Ratelimit-Input-Tokens-Limit":      {"80000"},
		"Anthropic-Ratelimit-Input-Tokens-Remaining":  {"79000"},
		"Anthropic-Ratelimit-Input-Tokens-Reset":      {"2025-08-21T12:40:59Z"},
		"Anthropic-Ratelimit-Output-Tokens-Limit":     {"16000"},
		"Anthropic-Ratelimit-Output-Tokens-Remaining": {"16000"},
		"Anthropic-Ratelimit-Output-Tokens-Reset":     {"2025-08-21T12:40:00Z"}, // past: full now
		"Anthropic-Ratelimit-Tokens-Limit":            {"96000"},
		"Anthropic-Ratelimit-Tokens-Remaining":        {"95000"},
	}, now)
	assert.Equal(t, Bucket{Limit: 50, Remaining: 49, Reset: time.Second, HasLimit: true, HasRemaining: true, HasReset: true}, ri.Requests)
	assert.Equal(t, Bucket{Limit: 80000, Remaining: 79000, Reset: 29 * time.Second, HasLimit: true, HasRemaining: true, HasReset: true}, ri.InputTokens)
	assert.Equal(t, Bucket{Limit: 16000, Remaining: 16000, HasLimit: true, HasRemaining: true, HasReset: true}, ri.OutputTokens)
	assert.False(t, ri.Tokens.Any(), "the combined headers are not followed: input and output apart are")
	assert.Equal(t, 1000, ri.Rounding)

	bad := ParseAnthropicRateHeaders(http.Header{"Anthropic-Ratelimit-Requests-Reset": {"tomorrow"},
		"Anthropic-Ratelimit-Input-Tokens-Reset": {"2999-01-01T00:00:00Z"}}, now)
	assert.False(t, bad.Requests.HasReset)
	assert.Equal(t, MaxReset, bad.InputTokens.Reset, "bounded")

	wait, ok := RetryAfter(http.Header{"Retry-After": {"7"}}, now)
	assert.True(t, ok)
	assert.Equal(t, 7*time.Second, wait)
	assert.False(t, Retryable429(http.Header{}, []byte(`{"type":"error","error":{"type":"billing_error","message":"x"}}`)))
	assert.True(t, Retryable429(http.Header{}, []byte(`{"type":"error","error":{"type":"rate_limit_error","message":"x"}}`)))
}

func TestAnthropicUsage(t *testing.T) {
	u, ok := FindUsage([]byte(`{"id":"msg_1","type":"message","content":[{"type":"text","text":"hi"}],` +
		`"usage":{"input_tokens":20,"cache_creation_input_tokens":100,"cache_read_input_tokens":3000,"output_tokens":7}}`))
	require.True(t, ok)
	assert.Equal(t, Usage{Prompt: 3120, Completion: 7, Total: 3127, CacheRead: 3000, CacheWrite: 100}, u,
		"the prompt is the three input counts together, each cache count apart")
}

// anthropicStream is a Messages stream: message_start with the input,
// text deltas, message_delta with the cumulative output.
func anthropicStream(deltas int, end string) string {
	var b strings.Builder
	b.WriteString("event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\"," +
		"\"role\":\"assistant\",\"content\":[],\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":0," +
		"\"cache_read_input_tokens\":400,\"output_tokens\":1}}}\n\n")
	b.WriteString("event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n")
	for range deltas {
		b.WriteString("event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"token \"}}\n\n")
		b.WriteString("event: ping\ndata: {\"type\": \"ping\"}\n\n")
	}
	b.WriteString(end)
	return b.String()
}

const messageEnd = "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n" +
	"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":9}}\n\n" +
	"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":12}}\n\n" +
	"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"

func readMessages(t *testing.T, stream string) (string, Usage, bool) {
	var tap StreamTap
	tap.ResetMessages(io.NopCloser(strings.NewReader(stream)))
	out, err := io.ReadAll(&tap)
	require.NoError(t, err)
	u, ok := tap.Usage()
	return string(out), u, ok
}

// The input comes from message_start, the output from the last
// message_delta: cumulative values, never summed; the stream passes byte
// for byte, however long it is.
func TestAnthropicStreamUsage(t *testing.T) {
	for _, deltas := range []int{3, 2000} { // short, and longer than head and tail together
		stream := anthropicStream(deltas, messageEnd)
		out, u, ok := readMessages(t, stream)
		assert.Equal(t, stream, out, "byte for byte")
		require.True(t, ok, deltas)
		assert.Equal(t, Usage{Prompt: 425, Completion: 12, Total: 437, CacheRead: 400}, u, deltas)
	}
	// A message_delta that repeats the input fields: its values count.
	repeat := strings.Replace(messageEnd, `"usage":{"output_tokens":12}`,
		`"usage":{"input_tokens":30,"cache_creation_input_tokens":0,"cache_read_input_tokens":400,"output_tokens":12}`, 1)
	_, u, _ := readMessages(t, anthropicStream(3, repeat))
	assert.Equal(t, 430, u.Prompt)

	// An overloaded error after the 200: the input is known, the output
	// is what was relayed.
	_, u, ok := readMessages(t, anthropicStream(5, "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n"))
	require.True(t, ok)
	assert.True(t, u.Partial)
	assert.Equal(t, 425, u.Prompt)

	_, _, ok = readMessages(t, "event: ping\ndata: {}\n\n")
	assert.False(t, ok, "nothing reported")
}
