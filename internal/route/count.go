package route

import (
	"errors"
	"hash/maphash"
	"math"
	"time"

	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/models"
	"github.com/llproxy/llproxy/internal/price"
	"github.com/llproxy/llproxy/internal/request"
	"github.com/llproxy/llproxy/provider"
	"github.com/llproxy/llproxy/scheduler"
	"github.com/llproxy/llproxy/tokenizer"
)

// The count stage: what a request will cost, per bucket, before it is
// admitted.

// estimate is a request's counted cost.
type estimate struct {
	prompt, maxOutput, n, cost int
	// raw is the prompt as the tokenizer counted it; prompt is raw as the
	// upstream is expected to count it (a calibrated model's factor and
	// margin applied).
	raw int
	// cached is the part of prompt the provider's prompt cache is
	// expected to read (free of the input bucket), under the prompt's
	// cache prefix (0: none) for ttl.
	cached int
	prefix uint64
	ttl    time.Duration
	// money is the most the request can cost at its model's prices.
	money price.Micro
}

// vector is the estimate as a cost over the buckets: one request, its
// prompt in (less what the cache will read), its most output out.
func (e estimate) vector() scheduler.Vector {
	return scheduler.Request(e.prompt-e.cached, e.cost-e.prompt)
}

// errMaxTokens is a Messages request without max_tokens (Anthropic
// requires it, and it is what the output bucket reserves).
var errMaxTokens = errors.New("max_tokens: Field required")

// estimateCost is prompt tokens + n x max output tokens. Max output is the
// first of max_completion_tokens, max_tokens and max_output_tokens that is
// set (each at least 1: -1 and 0 are a 400, as OpenAI answers them), else
// the model's defaultMaxTokens; embeddings have none; Anthropic's Messages
// API requires max_tokens. n is max(n, best_of), at least 1. Each number
// is bounded (an error names the one that is not) and the sum saturates,
// so no cost is ever negative or wraps. A calibrated model's prompt is its
// count times its learned factor, with a margin.
//
// mayCache says the body holds a cache_control breakpoint: only then is
// its cache prefix looked for.
func (rt *Route) estimateCost(ep tokenizer.Endpoint, model string, v *fastjson.Value, ms *models.Model, mayCache bool) (estimate, error) {
	e := estimate{raw: rt.opts.Tokenizer.PromptTokens(ep, model, v), n: 1}
	e.prompt = e.raw
	if ms.Factor != nil {
		e.prompt = ms.Factor.Reserve(e.raw)
	}
	switch ep {
	case tokenizer.EndpointEmbeddings:
	case tokenizer.EndpointMessages:
		n, ok, err := request.IntParam(v, "max_tokens", 1, request.MaxOutputTokens)
		if err != nil {
			return e, err
		}
		if !ok {
			return e, errMaxTokens
		}
		e.maxOutput = int(n)
		if rt.api == provider.NameAnthropic && ms.Cache != nil && mayCache {
			if e.prefix, e.ttl = cachePrefix(v); e.prefix != 0 {
				e.cached = min(e.prompt, ms.Cache.Cached(e.prefix, time.Now()))
			}
		}
	default:
		e.maxOutput = ms.DefaultMaxTokens
		found := false
		for _, k := range [...]string{"max_completion_tokens", "max_tokens", "max_output_tokens"} {
			n, ok, err := request.IntParam(v, k, 1, request.MaxOutputTokens)
			if err != nil {
				return e, err
			}
			if ok && !found {
				e.maxOutput, found = int(n), true
			}
		}
	}
	for _, k := range [...]string{"n", "best_of"} {
		n, ok, err := request.IntParam(v, k, 1, request.MaxN)
		if err != nil {
			return e, err
		}
		if ok {
			e.n = max(e.n, int(n))
		}
	}
	cost := int64(max(0, e.prompt)) + int64(e.n)*int64(e.maxOutput)
	e.cost = int(min(cost, math.MaxInt32))
	if rate, ok := rt.opts.Prices.For(model); ok {
		e.money = rate.Most(int64(e.prompt), int64(e.cost-e.prompt))
	}
	return e, nil
}

// prefixSeed hashes cache prefixes, the same way for the process's life.
var prefixSeed = maphash.MakeSeed()

// cachePrefix is the key of a Messages request's cached prefix: a hash of
// its prompt in the order the model reads it (tools, system, messages),
// up to its last cache_control breakpoint, and how long the provider
// keeps it ("ttl": "1h", else 5 minutes). 0: it asks for no caching.
func cachePrefix(v *fastjson.Value) (key uint64, ttl time.Duration) {
	var h maphash.Hash
	h.SetSeed(prefixSeed)
	var buf []byte
	mark := func(x *fastjson.Value) {
		buf = x.MarshalTo(buf[:0])
		h.Write(buf)
		if cc := x.Get("cache_control"); cc != nil {
			key, ttl = h.Sum64()|1, 5*time.Minute
			if string(cc.GetStringBytes("ttl")) == "1h" {
				ttl = time.Hour
			}
		}
	}
	h.Write(v.GetStringBytes("model"))
	for _, t := range v.GetArray("tools") {
		mark(t)
	}
	if sys := v.Get("system"); sys != nil {
		if sys.Type() == fastjson.TypeArray {
			for _, b := range sys.GetArray() {
				mark(b)
			}
		} else {
			h.Write(sys.MarshalTo(buf[:0]))
		}
	}
	for _, m := range v.GetArray("messages") {
		h.Write(m.GetStringBytes("role"))
		content := m.Get("content")
		if content == nil || content.Type() != fastjson.TypeArray {
			if content != nil {
				h.Write(content.MarshalTo(buf[:0]))
			}
			continue
		}
		for _, b := range content.GetArray() {
			mark(b)
		}
	}
	return key, ttl
}
