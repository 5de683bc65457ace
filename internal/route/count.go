package route

import (
	"math"

	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/models"
	"github.com/llproxy/llproxy/internal/request"
	"github.com/llproxy/llproxy/tokenizer"
)

// The count stage: what a request will cost, in requests and tokens,
// before it is admitted.

// estimate is a request's counted cost.
type estimate struct {
	prompt, maxOutput, n, cost int
}

// estimateCost is prompt tokens + n x max output tokens. Max output is the
// first of max_completion_tokens, max_tokens and max_output_tokens that is
// set (each at least 1: -1 and 0 are a 400, as OpenAI answers them), else
// the model's defaultMaxTokens; embeddings have none. n is
// max(n, best_of), at least 1. Each number is bounded (an error names the
// one that is not) and the sum saturates, so no cost is ever negative or
// wraps.
func (rt *Route) estimateCost(ep tokenizer.Endpoint, model string, v *fastjson.Value, ms *models.Model) (estimate, error) {
	e := estimate{prompt: rt.opts.Tokenizer.PromptTokens(ep, model, v), n: 1}
	if ep != tokenizer.EndpointEmbeddings {
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
	return e, nil
}
