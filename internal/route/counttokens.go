package route

import (
	"bytes"
	"io"
	"net/http"
	"time"

	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/relay"
	"github.com/llproxy/llproxy/internal/request"
	"github.com/llproxy/llproxy/scheduler"
)

// Anthropic's count_tokens: free, with a limit of its own (countTokensRpm,
// a queue of its own per model: it never waits behind or takes from the
// model's inference buckets). It passes to the upstream as it is; its
// answer ({"input_tokens": N}) is the upstream's count of a prompt the
// gateway counted too, so it teaches the model's calibrated factor.

// outcomeCountTokens logs a count_tokens call that was forwarded.
const outcomeCountTokens = "count_tokens"

// maxCountAnswer bounds the count_tokens answer read to learn from.
const maxCountAnswer = 64 << 10

// countTokens forwards a count_tokens call within the model's own limit
// for them and learns from its answer.
func (rt *Route) countTokens(ex *exchange, r *http.Request, body *request.Body, c *call, rec *requestLog) {
	ctx := r.Context()
	if q := c.ms.CountTokens; q != nil {
		adm, err := q.Acquire(ctx, scheduler.Cost{Amount: scheduler.Vector{scheduler.Requests: 1}})
		if err != nil {
			rec.outcome = rt.writeAcquireError(ex, ctx, err)
			return
		}
		defer func() { adm.Release(time.Now()) }()
	}
	l, ok := rt.lessor.Any()
	if !ok {
		rt.writeLeaseError(ex, rec.model, nil)
		rec.outcome = "no_backend"
		return
	}
	defer l.Release()
	out := rt.up.outgoing(r, l, body)
	if out.Body != nil {
		defer out.Body.Close()
	}
	res, err := rt.up.transport.RoundTrip(out)
	if err != nil {
		if ctx.Err() == nil {
			rt.writeUpstreamError(ex, err)
		}
		rec.outcome = "upstream_error"
		return
	}
	rec.outcome = outcomeCountTokens
	if res.StatusCode == http.StatusOK {
		answer, err := io.ReadAll(io.LimitReader(res.Body, maxCountAnswer))
		res.Body.Close()
		if err != nil {
			rt.writeUpstreamError(ex, err)
			return
		}
		res.Body = io.NopCloser(bytes.NewReader(answer))
		if n := fastjson.GetInt(answer, "input_tokens"); n > 0 && c.ms.Factor != nil {
			rec.prompt, rec.used = c.est.raw, n
			if _, ok := c.ms.Factor.Learn(c.est.raw, n); ok {
				c.ms.Metrics.Calibrated(c.ms.Factor.Value(), 0)
			}
		}
	}
	relay.RedactErrors(res, rt.opts.Secrets)
	relay.Respond(ex, r, res)
}
