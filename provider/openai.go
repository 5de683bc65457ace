package provider

import (
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/valyala/fastjson"
)

// OpenAI authenticates requests to an OpenAI-compatible upstream with the
// route's key. A zero OpenAI passes the client's own credentials through.
type OpenAI struct {
	cfg OpenAIConfig
}

// OpenAIConfig is how an OpenAI upstream is authenticated.
type OpenAIConfig struct {
	// APIKey replaces the client's credentials; empty lets them through
	// (unless DropClientAuth).
	APIKey string
	// DropClientAuth removes the client's Authorization and api-key: they
	// hold the gateway's own client keys, which never leave it.
	DropClientAuth bool
	// ForwardOrganization keeps OpenAI-Organization and OpenAI-Project
	// from clients when APIKey is injected; by default they are dropped,
	// since a client must not pick what the shared key bills.
	ForwardOrganization bool
}

// NewOpenAI returns the provider configured by cfg.
func NewOpenAI(cfg OpenAIConfig) *OpenAI { return &OpenAI{cfg: cfg} }

// Authorize sets the upstream credentials on h, an outgoing request's
// header: with a key, the client's Authorization and api-key headers are
// replaced by "Bearer <key>" (and the client's organization and project
// dropped), so neither a client key nor a team key reaches the upstream.
func (p *OpenAI) Authorize(h http.Header) {
	if p.cfg.APIKey == "" {
		if p.cfg.DropClientAuth {
			h.Del("Authorization")
			h.Del("Api-Key")
		}
		return
	}
	h.Del("Api-Key")
	h.Set("Authorization", "Bearer "+p.cfg.APIKey)
	if !p.cfg.ForwardOrganization {
		h.Del("Openai-Organization")
		h.Del("Openai-Project")
	}
}

// RateInfo is what an upstream's response headers say about its limits.
// OpenAI sends x-ratelimit-{limit,remaining,reset}-{requests,tokens}, with
// resets as Go durations ("6m0s", "1.234s"); Azure sends the remaining
// values, sometimes resets in whole seconds, and at times -1 for unknown.
// A value that was absent or unusable has its Has field false.
type RateInfo struct {
	LimitRequests, LimitTokens               int
	RemainingRequests, RemainingTokens       int
	ResetRequests, ResetTokens               time.Duration
	HasLimitRequests, HasLimitTokens         bool
	HasRemainingRequests, HasRemainingTokens bool
	HasResetRequests, HasResetTokens         bool
}

// Any reports whether any value was read.
func (ri RateInfo) Any() bool {
	return ri.HasLimitRequests || ri.HasLimitTokens || ri.HasRemainingRequests || ri.HasRemainingTokens ||
		ri.HasResetRequests || ri.HasResetTokens
}

// ParseRateHeaders reads the rate-limit headers of an upstream response.
func ParseRateHeaders(h http.Header) RateInfo {
	var ri RateInfo
	ri.LimitRequests, ri.HasLimitRequests = headerInt(h, "X-Ratelimit-Limit-Requests")
	ri.LimitTokens, ri.HasLimitTokens = headerInt(h, "X-Ratelimit-Limit-Tokens")
	ri.RemainingRequests, ri.HasRemainingRequests = headerInt(h, "X-Ratelimit-Remaining-Requests")
	ri.RemainingTokens, ri.HasRemainingTokens = headerInt(h, "X-Ratelimit-Remaining-Tokens")
	ri.ResetRequests, ri.HasResetRequests = headerDuration(h, "X-Ratelimit-Reset-Requests")
	ri.ResetTokens, ri.HasResetTokens = headerDuration(h, "X-Ratelimit-Reset-Tokens")
	if !ri.HasResetTokens { // older Azure spelling
		ri.ResetTokens, ri.HasResetTokens = headerDuration(h, "X-Rate-Limit-Reset-Tokens")
	}
	return ri
}

// Bounds on what an upstream's headers may say: anything larger is not
// believed as it is.
const (
	// MaxRateValue bounds a limit or remaining count.
	MaxRateValue = 1 << 40
	// MaxReset bounds a reset time: limits are per minute or per day.
	MaxReset = 24 * time.Hour
	// MaxRetryAfter bounds how long one upstream 429 may hold a queue: a
	// longer wait is re-asked of the upstream after this long.
	MaxRetryAfter = 5 * time.Minute
)

func headerInt(h http.Header, key string) (int, bool) {
	v := h[key]
	if len(v) == 0 {
		return 0, false
	}
	n, err := strconv.ParseInt(strings.TrimSpace(v[0]), 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	return int(min(n, MaxRateValue)), true
}

// headerDuration reads a Go duration ("1m12s") or a number of seconds
// ("55"), at most MaxReset.
func headerDuration(h http.Header, key string) (time.Duration, bool) {
	v := h[key]
	if len(v) == 0 {
		return 0, false
	}
	s := strings.TrimSpace(v[0])
	if d, err := time.ParseDuration(s); err == nil && d >= 0 {
		return min(d, MaxReset), true
	}
	if d, ok := seconds(s, float64(time.Second), MaxReset); ok {
		return d, true
	}
	return 0, false
}

// seconds reads a non-negative finite number of units (unit in
// nanoseconds) as a duration of at most limit.
func seconds(s string, unit float64, limit time.Duration) (time.Duration, bool) {
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsNaN(f) || math.IsInf(f, 0) || f < 0 {
		return 0, false
	}
	if f*unit >= float64(limit) {
		return limit, true
	}
	return time.Duration(f * unit), true
}

// RetryAfter is how long an upstream asked to wait: retry-after-ms, then
// retry-after (seconds or an HTTP date, relative to now), then the reset of
// whichever limit it reports exhausted, never more than MaxRetryAfter. ok
// is false when it said nothing usable.
func RetryAfter(h http.Header, now time.Time) (time.Duration, bool) {
	if v := h.Get("Retry-After-Ms"); v != "" {
		if d, ok := seconds(strings.TrimSpace(v), float64(time.Millisecond), MaxRetryAfter); ok {
			return d, true
		}
	}
	if v := h.Get("Retry-After"); v != "" {
		if d, ok := seconds(strings.TrimSpace(v), float64(time.Second), MaxRetryAfter); ok {
			return d, true
		}
		if t, err := http.ParseTime(v); err == nil {
			if t.After(now.Add(MaxRetryAfter)) {
				return MaxRetryAfter, true
			}
			return max(0, t.Sub(now)), true
		}
	}
	ri := ParseRateHeaders(h)
	var d time.Duration
	found := false
	if ri.HasResetRequests && ri.HasRemainingRequests && ri.RemainingRequests == 0 {
		d, found = max(d, ri.ResetRequests), true
	}
	if ri.HasResetTokens && ri.HasRemainingTokens && ri.RemainingTokens == 0 {
		d, found = max(d, ri.ResetTokens), true
	}
	return min(d, MaxRetryAfter), found
}

// Retryable429 reports whether an upstream 429 is a rate limit that clears
// by waiting (OpenAI's rate_limit_exceeded, Azure's "429"), as opposed to an
// exhausted quota or balance, which only a person can fix, or a response
// that says x-should-retry: false.
func Retryable429(h http.Header, body []byte) bool {
	if strings.EqualFold(h.Get("X-Should-Retry"), "false") {
		return false
	}
	v, err := fastjson.ParseBytes(body)
	if err != nil {
		return true // no OpenAI error body: trust the status
	}
	for _, field := range []string{"code", "type"} {
		switch string(v.GetStringBytes("error", field)) {
		case "insufficient_quota", "credit_balance_exhausted", "billing_hard_limit_reached",
			"billing_not_active", "access_terminated":
			return false
		}
	}
	return true
}
