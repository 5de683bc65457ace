package provider

import (
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/valyala/fastjson"
)

// Credentials authenticate requests to an upstream with the route's key,
// in the header its API reads: OpenAI's Authorization: Bearer, Azure's
// api-key, Anthropic's x-api-key. The client's own credentials (in any of
// the three) never pass alongside it. Zero Credentials pass the client's
// own through.
type Credentials struct {
	cfg CredentialsConfig
}

// The headers a key is sent in.
const (
	KeyBearer    = "Authorization" // "Bearer <key>"
	KeyAPIKey    = "Api-Key"       // Azure
	KeyXAPIKey   = "X-Api-Key"     // Anthropic
	clientHeader = 3
)

// clientAuth are every header a client's key may come in.
var clientAuth = [clientHeader]string{KeyBearer, KeyAPIKey, KeyXAPIKey}

// CredentialsConfig is how an upstream is authenticated.
type CredentialsConfig struct {
	// APIKey replaces the client's credentials; empty lets them through
	// (unless DropClientAuth).
	APIKey string
	// Header is where the key goes: KeyBearer (the default), KeyAPIKey or
	// KeyXAPIKey.
	Header string
	// DropClientAuth removes the client's credentials: they hold the
	// gateway's own client keys, which never leave it.
	DropClientAuth bool
	// ForwardOrganization keeps OpenAI-Organization and OpenAI-Project
	// from clients when APIKey is injected; by default they are dropped,
	// since a client must not pick what the shared key bills.
	ForwardOrganization bool
}

// NewCredentials returns the credentials configured by cfg.
func NewCredentials(cfg CredentialsConfig) *Credentials {
	if cfg.Header == "" {
		cfg.Header = KeyBearer
	}
	return &Credentials{cfg: cfg}
}

// Authorize sets the upstream credentials on h, an outgoing request's
// header: with a key, every header a client's key may come in is replaced
// by the key in the API's own header (and the client's organization and
// project dropped), so neither a client key nor a team key reaches the
// upstream.
func (p *Credentials) Authorize(h http.Header) {
	if p.cfg.APIKey == "" && !p.cfg.DropClientAuth {
		return
	}
	for _, k := range clientAuth {
		delete(h, k)
	}
	if p.cfg.APIKey == "" {
		return
	}
	if p.cfg.Header == KeyBearer {
		h[KeyBearer] = []string{"Bearer " + p.cfg.APIKey}
	} else {
		h[p.cfg.Header] = []string{p.cfg.APIKey}
	}
	if !p.cfg.ForwardOrganization {
		delete(h, "Openai-Organization")
		delete(h, "Openai-Project")
	}
}

// RateInfo is what an upstream's response headers say about its limits,
// per bucket: requests, tokens (input and output together), and input and
// output tokens apart (Anthropic). OpenAI sends
// x-ratelimit-{limit,remaining,reset}-{requests,tokens}, with resets as Go
// durations ("6m0s", "1.234s"); Azure sends the remaining values,
// sometimes resets in whole seconds, and at times -1 for unknown;
// Anthropic sends anthropic-ratelimit-*, its token remaining values
// rounded to thousands (Rounding) and its resets as RFC 3339 times.
type RateInfo struct {
	Requests, Tokens, InputTokens, OutputTokens Bucket
	// Rounding is the unit the token buckets' remaining values are rounded
	// to (0: exact).
	Rounding int
}

// Bucket is one limit as an upstream reports it. A value that was absent
// or unusable has its Has field false.
type Bucket struct {
	Limit, Remaining                 int
	Reset                            time.Duration
	HasLimit, HasRemaining, HasReset bool
}

// Any reports whether the bucket says anything.
func (b Bucket) Any() bool { return b.HasLimit || b.HasRemaining || b.HasReset }

// Buckets are the four buckets in order: requests, tokens, input tokens,
// output tokens.
func (ri *RateInfo) Buckets() [4]*Bucket {
	return [4]*Bucket{&ri.Requests, &ri.Tokens, &ri.InputTokens, &ri.OutputTokens}
}

// Any reports whether any rate-limit header was present.
func (ri RateInfo) Any() bool {
	return ri.Requests.Any() || ri.Tokens.Any() || ri.InputTokens.Any() || ri.OutputTokens.Any()
}

// openAIRateHeaders are the limit, remaining and reset headers of
// requests and tokens.
var openAIRateHeaders = [2][3]string{
	{"X-Ratelimit-Limit-Requests", "X-Ratelimit-Remaining-Requests", "X-Ratelimit-Reset-Requests"},
	{"X-Ratelimit-Limit-Tokens", "X-Ratelimit-Remaining-Tokens", "X-Ratelimit-Reset-Tokens"},
}

// ParseRateHeaders reads the rate-limit headers of an OpenAI or Azure
// upstream's response.
func ParseRateHeaders(h http.Header) RateInfo {
	var ri RateInfo
	for i, b := range [...]*Bucket{&ri.Requests, &ri.Tokens} {
		names := &openAIRateHeaders[i]
		b.Limit, b.HasLimit = headerInt(h, names[0])
		b.Remaining, b.HasRemaining = headerInt(h, names[1])
		b.Reset, b.HasReset = headerDuration(h, names[2])
	}
	if !ri.Tokens.HasReset { // older Azure spelling
		ri.Tokens.Reset, ri.Tokens.HasReset = headerDuration(h, "X-Rate-Limit-Reset-Tokens")
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
	if h.Get("Anthropic-Ratelimit-Requests-Remaining") != "" {
		ri = ParseAnthropicRateHeaders(h, now)
	}
	var d time.Duration
	found := false
	for _, b := range ri.Buckets() {
		if b.HasReset && b.HasRemaining && b.Remaining == 0 {
			d, found = max(d, b.Reset), true
		}
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
			"billing_not_active", "access_terminated", "billing_error":
			return false
		}
	}
	return true
}
