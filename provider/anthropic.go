package provider

import (
	"bytes"
	"net/http"
	"strings"
	"time"

	"github.com/valyala/fastjson"
)

// Anthropic's Messages API, as llproxy reads it: its rate-limit headers
// (three buckets: requests, input tokens, output tokens; remaining token
// values rounded to thousands; resets as RFC 3339 times) and the usage of
// its answers (a JSON body's usage; in a stream, message_start's usage for
// the input and the last message_delta's for the output: cumulative
// values, never summed).

// anthropicRounding is the unit Anthropic rounds its remaining token
// values to.
const anthropicRounding = 1000

// anthropicRateHeaders are the limit, remaining and reset headers of
// requests, input tokens and output tokens. Its tokens-* headers (the most
// restrictive limit, or the sum: it has sent both) are not read: the
// buckets follow input and output apart.
var anthropicRateHeaders = [3][3]string{
	{"Anthropic-Ratelimit-Requests-Limit", "Anthropic-Ratelimit-Requests-Remaining", "Anthropic-Ratelimit-Requests-Reset"},
	{"Anthropic-Ratelimit-Input-Tokens-Limit", "Anthropic-Ratelimit-Input-Tokens-Remaining", "Anthropic-Ratelimit-Input-Tokens-Reset"},
	{"Anthropic-Ratelimit-Output-Tokens-Limit", "Anthropic-Ratelimit-Output-Tokens-Remaining", "Anthropic-Ratelimit-Output-Tokens-Reset"},
}

// ParseAnthropicRateHeaders reads the rate-limit headers of an Anthropic
// response; resets are times, read relative to now.
func ParseAnthropicRateHeaders(h http.Header, now time.Time) RateInfo {
	ri := RateInfo{Rounding: anthropicRounding}
	for i, b := range [...]*Bucket{&ri.Requests, &ri.InputTokens, &ri.OutputTokens} {
		names := &anthropicRateHeaders[i]
		b.Limit, b.HasLimit = headerInt(h, names[0])
		b.Remaining, b.HasRemaining = headerInt(h, names[1])
		b.Reset, b.HasReset = headerTime(h, names[2], now)
	}
	return ri
}

// headerTime reads an RFC 3339 time as how long from now (0 if it has
// passed), at most MaxReset.
func headerTime(h http.Header, key string, now time.Time) (time.Duration, bool) {
	v := h[key]
	if len(v) == 0 {
		return 0, false
	}
	t, err := time.Parse(time.RFC3339, strings.TrimSpace(v[0]))
	if err != nil {
		return 0, false
	}
	return max(0, min(t.Sub(now), MaxReset)), true
}

var (
	messageStart = []byte(`"message_start"`)
	messageDelta = []byte(`"message_delta"`)
)

// messagesUsage is the usage of an Anthropic stream from its first bytes
// (head, where message_start is) and its last (tail, where the last
// message_delta is): the input and cache counts of the latest that
// reports them, the output of the last message_delta. Without a
// message_delta the usage is Partial. ok is false when neither says.
func messagesUsage(head, tail []byte) (Usage, bool) {
	var u Usage
	found := false
	if i := bytes.Index(head, messageStart); i >= 0 {
		if start, ok := usageIn(head[i:]); ok {
			u, found = start, true
			u.Partial = true
		}
	}
	if i := bytes.LastIndex(tail, messageDelta); i >= 0 {
		v, obj, ok := usageValue(tail[i:])
		if ok {
			defer usageParsers.Put(obj)
			d := usageOf(v)
			if v.Get("input_tokens") != nil || !found {
				u.Prompt, u.CacheRead, u.CacheWrite = d.Prompt, d.CacheRead, d.CacheWrite
			}
			u.Completion, u.Partial, found = d.Completion, false, true
			u.Total = u.Prompt + u.Completion
		}
	}
	return u, found
}

// usageIn reads the first usage object in b.
func usageIn(b []byte) (Usage, bool) {
	v, p, ok := usageValue(b)
	if !ok {
		return Usage{}, false
	}
	defer usageParsers.Put(p)
	return usageOf(v), true
}

// usageValue parses the first complete usage object in b; the caller
// puts the parser back.
func usageValue(b []byte) (*fastjson.Value, *fastjson.Parser, bool) {
	i := bytes.Index(b, usageKey)
	for i >= 0 {
		rest := bytes.TrimLeft(b[i+len(usageKey):], " \t\r\n")
		if len(rest) > 0 && rest[0] == ':' {
			if obj := objectPrefix(bytes.TrimLeft(rest[1:], " \t\r\n")); obj != nil {
				p := usageParsers.Get()
				if v, err := p.ParseBytes(obj); err == nil {
					return v, p, true
				}
				usageParsers.Put(p)
			}
		}
		next := bytes.Index(b[i+1:], usageKey)
		if next < 0 {
			break
		}
		i += 1 + next
	}
	return nil, nil, false
}
