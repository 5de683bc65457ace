package provider

import (
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/valyala/fastjson"
)

func TestFindUsage(t *testing.T) {
	tests := []struct {
		name, body string
		want       Usage
		ok         bool
	}{
		{"chat", `{"choices":[{"message":{"content":"\"usage\":{\"prompt_tokens\":99}"}}],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":0}},"system_fingerprint":"x"}`, Usage{Prompt: 9, Completion: 3, Total: 12}, true},
		{"responses", `{"output":[],"usage":{"input_tokens":5,"output_tokens":7,"total_tokens":12}}`, Usage{Prompt: 5, Completion: 7, Total: 12}, true},
		{"embeddings", `{"data":[],"usage":{"prompt_tokens":4,"total_tokens":4}}`, Usage{Prompt: 4, Completion: 0, Total: 4}, true},
		{"spaced", "{\"usage\" :  {\"prompt_tokens\": 1, \"completion_tokens\": 2}}", Usage{Prompt: 1, Completion: 2, Total: 3}, true},
		{"null", `{"choices":[],"usage":null}`, Usage{}, false},
		{"cut off", `{"usage":{"prompt_tokens":1,`, Usage{}, false},
		{"none", `{"error":{}}`, Usage{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u, ok := FindUsage([]byte(tt.body))
			assert.Equal(t, tt.ok, ok)
			assert.Equal(t, tt.want, u)
		})
	}
}

func TestBodyTapKeepsOnlyTheTail(t *testing.T) {
	body := `{"data":"` + strings.Repeat("x", 100_000) + `","usage":{"prompt_tokens":4,"total_tokens":4}}`
	tap := newBodyTap(io.NopCloser(iotest.HalfReader(strings.NewReader(body))))
	_, ok := tap.Usage()
	assert.False(t, ok, "not before the end")
	got, err := io.ReadAll(tap)
	require.NoError(t, err)
	assert.Equal(t, body, string(got), "unchanged")
	assert.LessOrEqual(t, cap(tap.tail), 4*tapTail)
	u, ok := tap.Usage()
	assert.True(t, ok)
	assert.Equal(t, 4, u.Total)
}

// sse renders an OpenAI chat stream of words as the upstream sends it with
// or without include_usage.
func sse(words []string, includeUsage bool) string {
	var b strings.Builder
	for _, w := range words {
		b.WriteString(`data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"` + w + `"},"finish_reason":null}]`)
		if includeUsage {
			b.WriteString(`,"usage":null`)
		}
		b.WriteString("}\n\n")
	}
	if includeUsage {
		b.WriteString(`data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}` + "\n\n")
	}
	b.WriteString("data: [DONE]\n\n")
	return b.String()
}

func TestStreamTapStripsWhatIncludeUsageAdded(t *testing.T) {
	words := []string{"a", "b", "c"}
	withUsage, without := sse(words, true), sse(words, false)
	for name, r := range map[string]io.Reader{
		"whole":       strings.NewReader(withUsage),
		"byte a read": iotest.OneByteReader(strings.NewReader(withUsage)),
		"halves":      iotest.HalfReader(strings.NewReader(withUsage)),
	} {
		t.Run(name, func(t *testing.T) {
			tap := newStreamTap(io.NopCloser(r), true)
			got, err := io.ReadAll(tap)
			require.NoError(t, err)
			assert.Equal(t, without, string(got), "byte for byte what the client gets without include_usage")
			u, ok := tap.Usage()
			require.True(t, ok)
			assert.Equal(t, Usage{Prompt: 9, Completion: 3, Total: 12}, u)
		})
	}
}

func TestStreamTapPassesThroughWhenTheClientAskedForUsage(t *testing.T) {
	body := sse([]string{"x", "y"}, true)
	tap := newStreamTap(io.NopCloser(iotest.HalfReader(strings.NewReader(body))), false)
	got, err := io.ReadAll(tap)
	require.NoError(t, err)
	assert.Equal(t, body, string(got))
	u, ok := tap.Usage()
	require.True(t, ok)
	assert.Equal(t, 12, u.Total)
}

func TestStreamTapCutShortHasNoUsage(t *testing.T) {
	body := sse([]string{"x", "y"}, true)
	cut := body[:len(body)/2]
	tap := newStreamTap(io.NopCloser(io.MultiReader(strings.NewReader(cut), iotest.ErrReader(io.ErrUnexpectedEOF))), true)
	_, err := io.ReadAll(tap)
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
	_, ok := tap.Usage()
	assert.False(t, ok)
}

func TestStreamTapReleasesEachEventAtOnce(t *testing.T) {
	pr, pw := io.Pipe()
	tap := newStreamTap(pr, true)
	go pw.Write([]byte("data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\ndata: {\"cho"))
	buf := make([]byte, 1024)
	n, err := tap.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, "data: {\"choices\":[{\"delta\":{}}]}\n\n", string(buf[:n]), "the complete event, without waiting for the next")
	pw.Close()
}

func TestWithStreamUsage(t *testing.T) {
	for in, want := range map[string]string{
		`{"model":"m","stream":true}`:                              `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`,
		"{\"model\":\"m\",\"stream\":true}\n":                      "{\"model\":\"m\",\"stream\":true,\"stream_options\":{\"include_usage\":true}}\n",
		`{"stream":true,"stream_options":{"include_usage":false}}`: `{"stream":true,"stream_options":{"include_usage":true}}`,
		`{"stream":true,"stream_options":null}`:                    `{"stream":true,"stream_options":{"include_usage":true}}`,
	} {
		v, err := fastjson.Parse(in)
		require.NoError(t, err)
		assert.Equal(t, want, string(WithStreamUsage(nil, []byte(in), v)), in)
	}
}

func TestParseRateHeaders(t *testing.T) {
	ri := ParseRateHeaders(http.Header{
		"X-Ratelimit-Limit-Requests": {"60"}, "X-Ratelimit-Remaining-Requests": {"59"},
		"X-Ratelimit-Reset-Requests": {"1s"}, "X-Ratelimit-Limit-Tokens": {"150000"},
		"X-Ratelimit-Remaining-Tokens": {"149984"}, "X-Ratelimit-Reset-Tokens": {"6m0s"},
	})
	assert.Equal(t, RateInfo{
		Requests: Bucket{Limit: 60, Remaining: 59, Reset: time.Second, HasLimit: true, HasRemaining: true, HasReset: true},
		Tokens:   Bucket{Limit: 150000, Remaining: 149984, Reset: 6 * time.Minute, HasLimit: true, HasRemaining: true, HasReset: true},
	}, ri)
	azure := ParseRateHeaders(http.Header{"X-Ratelimit-Remaining-Tokens": {"-1"}, "X-Ratelimit-Remaining-Requests": {"7"},
		"X-Rate-Limit-Reset-Tokens": {"55"}})
	assert.False(t, azure.Tokens.HasRemaining, "-1 means unknown")
	assert.Equal(t, 7, azure.Requests.Remaining)
	assert.Equal(t, 55*time.Second, azure.Tokens.Reset)
	assert.False(t, ParseRateHeaders(http.Header{}).Any())
}

func TestRetryAfter(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tt := range []struct {
		h    http.Header
		want time.Duration
		ok   bool
	}{
		{http.Header{"Retry-After-Ms": {"1500"}, "Retry-After": {"9"}}, 1500 * time.Millisecond, true},
		{http.Header{"Retry-After": {"2"}}, 2 * time.Second, true},
		{http.Header{"Retry-After": {now.Add(3 * time.Second).Format(http.TimeFormat)}}, 3 * time.Second, true},
		{http.Header{"X-Ratelimit-Remaining-Tokens": {"0"}, "X-Ratelimit-Reset-Tokens": {"644ms"},
			"X-Ratelimit-Remaining-Requests": {"3"}, "X-Ratelimit-Reset-Requests": {"9s"}}, 644 * time.Millisecond, true},
		{http.Header{}, 0, false},
	} {
		d, ok := RetryAfter(tt.h, now)
		assert.Equal(t, tt.ok, ok)
		assert.Equal(t, tt.want, d)
	}
}

func TestRetryable429(t *testing.T) {
	rl := `{"error":{"message":"Rate limit reached","type":"tokens","param":null,"code":"rate_limit_exceeded"}}`
	quota := `{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}`
	azure := `{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation ... Please retry after 6 seconds."}}`
	assert.True(t, Retryable429(http.Header{}, []byte(rl)))
	assert.False(t, Retryable429(http.Header{}, []byte(quota)))
	assert.False(t, Retryable429(http.Header{}, []byte(`{"error":{"code":"credit_balance_exhausted"}}`)))
	assert.True(t, Retryable429(http.Header{}, []byte(azure)))
	assert.True(t, Retryable429(http.Header{}, []byte("busy")))
	assert.False(t, Retryable429(http.Header{"X-Should-Retry": {"false"}}, []byte(rl)))
}

// BenchmarkStreamTap is the cost of reading a 100-chunk stream's usage and
// stripping what include_usage added, one chunk per read as streams arrive.
func BenchmarkStreamTap(b *testing.B) {
	words := make([]string, 100)
	for i := range words {
		words[i] = "word"
	}
	events := strings.SplitAfter(sse(words, true), "\n\n")
	var tap StreamTap
	buf := make([]byte, 32<<10)
	b.ReportAllocs()
	for b.Loop() {
		tap.Reset(io.NopCloser(&chunkReader{events: slices.Clone(events)}), true)
		for {
			if _, err := tap.Read(buf); err != nil {
				break
			}
		}
		if _, ok := tap.Usage(); !ok {
			b.Fatal("no usage")
		}
	}
}

// chunkReader returns one event per Read, as a stream arrives.
type chunkReader struct{ events []string }

func (c *chunkReader) Read(p []byte) (int, error) {
	for len(c.events) > 0 && c.events[0] == "" {
		c.events = c.events[1:]
	}
	if len(c.events) == 0 {
		return 0, io.EOF
	}
	n := copy(p, c.events[0])
	c.events[0] = c.events[0][n:]
	return n, nil
}

func TestWithStreamUsageOnAChangedValue(t *testing.T) {
	v, err := fastjson.Parse(`{"model":"m","stream":true}`)
	require.NoError(t, err)
	v.Set("temperature", fastjson.MustParse(`0.5`))
	assert.Equal(t, `{"model":"m","stream":true,"temperature":0.5,"stream_options":{"include_usage":true}}`,
		string(WithStreamUsage(nil, nil, v)), "a nil body means v is the body")
}
