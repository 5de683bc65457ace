package server

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/tokenizer"
)

// claudeUpstream behaves like Anthropic's Messages API as its documents
// say: three continuously refilled buckets (requests, input tokens, output
// tokens) checked at the start of a request, input charged as input plus
// cache writes (cache reads free), output reserved as max_tokens and
// adjusted at the end; 429 rate_limit_error with retry-after when a bucket
// cannot pay; anthropic-ratelimit-* headers (token remaining values
// rounded to thousands, resets RFC 3339); a request-id on every answer.
// Claude's tokenizer is simulated as o200k times ratio. A prompt whose
// system block carries cache_control is cached: the first request writes
// it, later ones read it.
type claudeUpstream struct {
	t      testing.TB
	key    string
	ratio  float64 // Claude tokens per o200k token
	output int     // tokens each answer writes (at most max_tokens)
	delay  time.Duration

	mu                sync.Mutex
	rpm, itpm, otpm   float64
	req, in, out      float64 // levels
	at                time.Time
	cached            map[string]bool
	refused, answered int
	overrun           bool // a request was admitted by the gateway that the buckets could not pay
	seen              []http.Header
	lastVersion       string
	streamError       bool // streams end with an overloaded error after their first delta
}

func newClaudeUpstream(t testing.TB, rpm, itpm, otpm int) *claudeUpstream {
	return &claudeUpstream{t: t, key: "sk-ant-route", ratio: 1.3, output: 20, rpm: float64(rpm), itpm: float64(itpm),
		otpm: float64(otpm), req: float64(rpm), in: float64(itpm), out: float64(otpm), cached: map[string]bool{}}
}

// refill brings the buckets to now. c.mu is held.
func (c *claudeUpstream) refill(now time.Time) {
	if !c.at.IsZero() {
		d := now.Sub(c.at).Minutes()
		c.req = math.Min(c.rpm, c.req+d*c.rpm)
		c.in = math.Min(c.itpm, c.in+d*c.itpm)
		c.out = math.Min(c.otpm, c.out+d*c.otpm)
	}
	c.at = now
}

// headers sets the rate-limit headers. c.mu is held.
func (c *claudeUpstream) headers(h http.Header, now time.Time) {
	reset := func(level, limit float64) string {
		d := time.Duration((limit - level) / limit * float64(time.Minute))
		return now.Add(d).UTC().Truncate(time.Second).Format(time.RFC3339)
	}
	round := func(v float64) string { return strconv.Itoa(int(math.Round(math.Max(0, v)/1000)) * 1000) }
	h.Set("Anthropic-Ratelimit-Requests-Limit", strconv.Itoa(int(c.rpm)))
	h.Set("Anthropic-Ratelimit-Requests-Remaining", strconv.Itoa(int(math.Max(0, math.Floor(c.req)))))
	h.Set("Anthropic-Ratelimit-Requests-Reset", reset(c.req, c.rpm))
	h.Set("Anthropic-Ratelimit-Input-Tokens-Limit", strconv.Itoa(int(c.itpm)))
	h.Set("Anthropic-Ratelimit-Input-Tokens-Remaining", round(c.in))
	h.Set("Anthropic-Ratelimit-Input-Tokens-Reset", reset(c.in, c.itpm))
	h.Set("Anthropic-Ratelimit-Output-Tokens-Limit", strconv.Itoa(int(c.otpm)))
	h.Set("Anthropic-Ratelimit-Output-Tokens-Remaining", round(c.out))
	h.Set("Anthropic-Ratelimit-Output-Tokens-Reset", reset(c.out, c.otpm))
}

func claudeError(w http.ResponseWriter, status int, typ, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"type":"error","error":{"type":%q,"message":%q},"request_id":"req_up"}`, typ, msg)
}

func (c *claudeUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	w.Header().Set("Request-Id", "req_upstream_1")
	c.mu.Lock()
	c.seen = append(c.seen, r.Header.Clone())
	c.lastVersion = r.Header.Get("Anthropic-Version")
	c.mu.Unlock()
	if r.Header.Get("X-Api-Key") != c.key || r.Header.Get("Authorization") != "" {
		claudeError(w, http.StatusUnauthorized, "authentication_error", "invalid x-api-key")
		return
	}
	switch {
	case r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/v1/models"):
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"data":[{"type":"model","id":"claude-sonnet-4-5","display_name":"Claude Sonnet 4.5","created_at":"2025-09-29T00:00:00Z"}],"has_more":false,"first_id":"claude-sonnet-4-5","last_id":"claude-sonnet-4-5"}`)
	case strings.HasSuffix(r.URL.Path, "/v1/messages/count_tokens"):
		v, err := fastjson.ParseBytes(body)
		if err != nil {
			claudeError(w, 400, "invalid_request_error", "bad json")
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"input_tokens":%d}`, c.count(v))
	case strings.HasSuffix(r.URL.Path, "/v1/messages"):
		c.messages(w, r, body)
	default:
		claudeError(w, 404, "not_found_error", "no such path")
	}
}

// count is the prompt as Claude counts it: o200k times the ratio.
func (c *claudeUpstream) count(v *fastjson.Value) int {
	return int(math.Round(float64(testTokenizer(c.t).PromptTokens(tokenizer.EndpointMessages, "claude", v)) * c.ratio))
}

func (c *claudeUpstream) messages(w http.ResponseWriter, r *http.Request, body []byte) {
	v, err := fastjson.ParseBytes(body)
	if err != nil {
		claudeError(w, 400, "invalid_request_error", "bad json")
		return
	}
	maxTokens := v.GetInt("max_tokens")
	if maxTokens <= 0 {
		claudeError(w, 400, "invalid_request_error", "max_tokens: Field required")
		return
	}
	prompt := c.count(v)
	// The cached part: system blocks with cache_control, as Claude counts them.
	cacheKey, cachedPart := "", 0
	for _, b := range v.GetArray("system") {
		if b.Get("cache_control") != nil {
			cacheKey = string(b.GetStringBytes("text"))
			cachedPart = int(math.Round(float64(testTokenizer(c.t).EncodingFor("claude").Count(cacheKey)) * c.ratio))
		}
	}
	now := time.Now()
	c.mu.Lock()
	c.refill(now)
	read, write := 0, 0
	if cacheKey != "" {
		if c.cached[cacheKey] {
			read = cachedPart
		} else {
			write = cachedPart
		}
	}
	charge := float64(prompt - read)
	out := min(c.output, maxTokens)
	if strings.HasSuffix(string(v.GetStringBytes("model")), "-tight") {
		out = maxTokens // this model's answers use all they may
	}
	if c.req < 1 || c.in < charge || c.out < float64(maxTokens) {
		c.refused++
		wait := math.Max((1-c.req)/c.rpm, math.Max((charge-c.in)/c.itpm, (float64(maxTokens)-c.out)/c.otpm)) * 60
		c.headers(w.Header(), now)
		c.mu.Unlock()
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(wait))))
		claudeError(w, http.StatusTooManyRequests, "rate_limit_error", "This request would exceed your organization's rate limit.")
		return
	}
	c.req--
	c.in -= charge
	c.out -= float64(maxTokens)
	if c.req < 0 || c.in < 0 || c.out < 0 {
		c.overrun = true
	}
	if cacheKey != "" {
		c.cached[cacheKey] = true
	}
	c.headers(w.Header(), now)
	c.answered++
	streamError := c.streamError
	c.mu.Unlock()
	if c.delay > 0 {
		time.Sleep(c.delay)
	}
	defer func() { // OTPM is adjusted at the end of the request
		c.mu.Lock()
		c.refill(time.Now())
		c.out = math.Min(c.otpm, c.out+float64(maxTokens-out))
		c.mu.Unlock()
	}()
	input := prompt - read - write
	usageStart := fmt.Sprintf(`{"input_tokens":%d,"cache_creation_input_tokens":%d,"cache_read_input_tokens":%d,"output_tokens":1}`, input, write, read)
	if !v.GetBool("stream") {
		w.Header().Set("Content-Type", "application/json")
		msg := map[string]any{"id": "msg_1", "type": "message", "role": "assistant", "model": string(v.GetStringBytes("model")),
			"content": []any{map[string]any{"type": "text", "text": strings.Repeat("tok ", out)}}, "stop_reason": "end_turn",
			"usage": map[string]int{"input_tokens": input, "cache_creation_input_tokens": write, "cache_read_input_tokens": read, "output_tokens": out}}
		json.NewEncoder(w).Encode(msg)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	fl := w.(http.Flusher)
	fmt.Fprintf(w, "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":%q,\"usage\":%s}}\n\n",
		string(v.GetStringBytes("model")), usageStart)
	io.WriteString(w, "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n")
	fl.Flush()
	for i := range out {
		fmt.Fprintf(w, "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"t%d \"}}\n\n", i)
		fl.Flush()
		if streamError {
			io.WriteString(w, "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n")
			return
		}
	}
	io.WriteString(w, "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n")
	fmt.Fprintf(w, "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":%d}}\n\n", out)
	io.WriteString(w, "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
}

// headersSeen are the headers of every request it got.
func (c *claudeUpstream) headersSeen() []http.Header {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]http.Header(nil), c.seen...)
}

func (c *claudeUpstream) stats() (refused, answered int, overrun bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.refused, c.answered, c.overrun
}

// claudeConfig is a gateway with one anthropic route over $UPSTREAM and
// two teams.
const claudeConfig = `{
  "clients": {"a": {"keys": ["key-a"]}, "b": {"keys": ["key-b"]}},
  "routes": {"claude": {"forward": "$UPSTREAM", "provider": "anthropic", "apiKey": "sk-ant-route",
    "models": {"claude-sonnet-4-5": {"rpm": %d, "itpm": %d, "otpm": %d, "maxQueueSize": 50, "maxQueueWait": %d, "countTokensRpm": 2},
               "*": {"rpm": 50, "itpm": 30000, "otpm": 8000}}}}
}`
