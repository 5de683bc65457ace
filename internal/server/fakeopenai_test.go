package server

import (
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/tokenizer"
)

// fakeOpenAI is an upstream that enforces its own rpm and tpm the way
// OpenAI does: continuously refilled buckets, each request charged its
// prompt estimate plus max_tokens at admission (no refund), a 429 with
// OpenAI's headers and body when over, and x-ratelimit-* headers on every
// answer. It reads time from the time package, so inside a synctest bubble
// it runs on the bubble's clock.
type fakeOpenAI struct {
	mu                 sync.Mutex
	rpm, tpm           float64
	reqLevel, tokLevel float64
	last               time.Time
	latency            time.Duration
	jitter             time.Duration // up to this long on the way in, at random: requests overtake each other
	// slack is how many requests the fake lets through beyond its bucket:
	// the tolerance any upstream needs when requests that left in order,
	// paced exactly, reach it with a varying network delay.
	slack           float64
	served, limited int
	limitedAt       []time.Time
}

func newFakeOpenAI(rpm, tpm int, latency time.Duration) *fakeOpenAI {
	return &fakeOpenAI{rpm: float64(rpm), tpm: float64(tpm), reqLevel: float64(rpm), tokLevel: float64(tpm),
		last: time.Now(), latency: latency}
}

func (f *fakeOpenAI) refill(now time.Time) {
	d := now.Sub(f.last).Minutes()
	f.last = now
	f.reqLevel = math.Min(f.rpm, f.reqLevel+d*f.rpm)
	f.tokLevel = math.Min(f.tpm, f.tokLevel+d*f.tpm)
}

// estimate is how the fake counts a request: its prompt tokens (with the
// same tiktoken encodings OpenAI uses), plus max_tokens.
func (f *fakeOpenAI) estimate(body []byte) (prompt, maxTokens int) {
	v, err := fastjson.ParseBytes(body)
	if err != nil {
		return 0, 0
	}
	return tok.PromptTokens(tokenizer.EndpointChat, string(v.GetStringBytes("model")), v), v.GetInt("max_tokens")
}

func (f *fakeOpenAI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	if f.jitter > 0 {
		time.Sleep(rand.N(f.jitter))
	}
	prompt, maxTokens := f.estimate(body)
	cost := float64(prompt + maxTokens)
	now := time.Now()
	f.mu.Lock()
	f.refill(now)
	h := w.Header()
	if f.reqLevel+f.slack < 1 || f.tokLevel < cost {
		f.limited++
		f.limitedAt = append(f.limitedAt, now)
		wait := math.Max((1-f.reqLevel)/f.rpm, (cost-f.tokLevel)/f.tpm) // minutes
		used := int(f.tpm - f.tokLevel)
		f.headers(h)
		f.mu.Unlock()
		ms := int(math.Ceil(wait * 60000))
		h.Set("Retry-After-Ms", strconv.Itoa(ms))
		h.Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusTooManyRequests)
		fmt.Fprintf(w, `{"error":{"message":"Rate limit reached for gpt-4o in organization org-fake on tokens per min (TPM): Limit %d, Used %d, Requested %d. Please try again in %dms.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}`,
			int(f.tpm), used, int(cost), ms)
		return
	}
	f.reqLevel--
	f.tokLevel -= cost
	f.served++
	f.headers(h)
	f.mu.Unlock()
	if f.latency > 0 {
		time.Sleep(f.latency)
	}
	h.Set("Content-Type", "application/json")
	fmt.Fprintf(w, `{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}`,
		prompt, maxTokens/2, prompt+maxTokens/2)
}

// headers sets OpenAI's x-ratelimit-* from the buckets. f.mu is held.
func (f *fakeOpenAI) headers(h http.Header) {
	reset := func(level, limit float64) string {
		return (time.Duration((limit - level) / limit * float64(time.Minute))).Truncate(time.Millisecond).String()
	}
	h.Set("X-Ratelimit-Limit-Requests", strconv.Itoa(int(f.rpm)))
	h.Set("X-Ratelimit-Limit-Tokens", strconv.Itoa(int(f.tpm)))
	h.Set("X-Ratelimit-Remaining-Requests", strconv.Itoa(int(math.Max(0, f.reqLevel))))
	h.Set("X-Ratelimit-Remaining-Tokens", strconv.Itoa(int(math.Max(0, f.tokLevel))))
	h.Set("X-Ratelimit-Reset-Requests", reset(f.reqLevel, f.rpm))
	h.Set("X-Ratelimit-Reset-Tokens", reset(f.tokLevel, f.tpm))
}

// spend takes tokens from the key as another user of it would, without
// asking (the bucket may go into debt).
func (f *fakeOpenAI) spend(tokens float64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.refill(time.Now())
	f.tokLevel -= tokens
}

// limitedSince counts the 429s the fake answered at or after t.
func (f *fakeOpenAI) limitedSince(t time.Time) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, at := range f.limitedAt {
		if !at.Before(t) {
			n++
		}
	}
	return n
}

func (f *fakeOpenAI) counts() (served, limited int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.served, f.limited
}
