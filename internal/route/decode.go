package route

import (
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/fleet"
	"github.com/llproxy/llproxy/internal/models"
	"github.com/llproxy/llproxy/internal/openai"
	"github.com/llproxy/llproxy/internal/request"
	"github.com/llproxy/llproxy/provider"
	"github.com/llproxy/llproxy/scheduler"
	"github.com/llproxy/llproxy/tokenizer"
)

// This file is the decode stage's rules: the gateway must read a request the
// way the upstream will, or a client could be charged for one request and
// served another. What the gateway cannot read that way is a 400, before
// anything is counted or queued.

// applyDefaults gives a chat request the model's default parameters it does
// not set, and its default system prompt if it has no system message. It
// reports whether it changed v. dp parses the defaults and must live as
// long as v.
func applyDefaults(v *fastjson.Value, ms *models.Model, dp *fastjson.Parser, a *fastjson.Arena) bool {
	changed := false
	if ms.Defaults != nil {
		if d, err := dp.ParseBytes(ms.Defaults); err == nil {
			d.GetObject().Visit(func(k []byte, val *fastjson.Value) {
				if v.Get(string(k)) == nil {
					v.Set(string(k), val)
					changed = true
				}
			})
		}
	}
	if ms.System == "" {
		return changed
	}
	msgs := v.GetArray("messages")
	for _, m := range msgs {
		if r := string(m.GetStringBytes("role")); r == "system" || r == "developer" {
			return changed // the request's own system message wins
		}
	}
	sys := a.NewObject()
	sys.Set("role", a.NewString("system"))
	sys.Set("content", a.NewString(strings.ReplaceAll(ms.System, "{{now}}", time.Now().Format(time.RFC1123))))
	arr := a.NewArray()
	arr.SetArrayItem(0, sys)
	for i, m := range msgs {
		arr.SetArrayItem(i+1, m)
	}
	v.Set("messages", arr)
	return true
}

// call is what inspect learns of a request body.
type call struct {
	ms  *models.Model // nil: the body names no model
	est estimate
	// inject is the body to send instead of the request's own, or nil:
	// rewritten to ask for a stream's usage, to drop keep_alive, or to add
	// the model's defaults.
	inject *request.Body
	// keepAlive is the request's keep_alive, if it had one.
	keepAlive *time.Duration
}

// inspect parses a JSON body once (or takes it as the front parsed it:
// parsed, if not nil), finds its model's queue and counts its
// cost; for a stream whose client did not ask for usage it also prepares the
// body that asks for it. On bad input it answers the client and returns ok
// false.
func (rt *Route) inspect(w http.ResponseWriter, path string, body []byte, parsed *fastjson.Value, rec *requestLog) (c call, ok bool) {
	v, err := parsed, error(nil)
	if v == nil {
		p := parsers.Get()
		defer parsers.Put(p)
		v, err = p.ParseBytes(body)
	}
	if err != nil || v.Type() != fastjson.TypeObject {
		rec.outcome = OutcomeBadRequest
		rt.say.Error(w, http.StatusBadRequest, "invalid_request_error", "",
			"We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)")
		return c, false
	}
	if err := request.CheckDuplicateKeys(v); err != nil {
		rec.outcome = OutcomeBadRequest
		rt.say.Error(w, http.StatusBadRequest, "invalid_request_error", "", "Invalid request: "+err.Error())
		return c, false
	}
	mv := v.Get("model")
	if mv == nil || mv.Type() == fastjson.TypeNull {
		if openai.Endpoint(path) != tokenizer.EndpointOther {
			rec.outcome = OutcomeBadRequest
			rt.say.ParamError(w, "model", "you must provide a model parameter")
			return c, false
		}
		return c, true
	}
	if mv.Type() != fastjson.TypeString {
		rec.outcome = OutcomeBadRequest
		rt.say.ParamError(w, "model", "'model' must be a string.")
		return c, false
	}
	if err := request.CheckModelName(mv.GetStringBytes()); err != nil {
		rec.outcome = OutcomeBadRequest
		rt.say.ParamError(w, "model", err.Error())
		return c, false
	}
	rec.model = string(mv.GetStringBytes())
	if !rt.lessor.Knows(rec.model) {
		rec.outcome = OutcomeNotFound
		rt.writeLeaseError(w, rec.model, fleet.ErrUnknownModel)
		return call{}, false
	}
	if c.ms, err = rt.models.For(rec.model); err != nil {
		rec.outcome = OutcomeNotFound
		if errors.Is(err, scheduler.ErrTooManyModels) {
			rec.outcome = "too_many_models"
		}
		rt.writeModelError(w, rec.model, err)
		return call{}, false
	}
	// keep_alive is for llproxy's model lifecycle, never for the upstream;
	// model defaults go in before counting, so they are paid for.
	var dp fastjson.Parser
	var a fastjson.Arena
	rewrite := false
	if ka := v.Get("keep_alive"); ka != nil {
		d, err := request.ParseKeepAlive(ka.MarshalTo(nil))
		if err != nil {
			rec.outcome = OutcomeBadRequest
			rt.say.ParamError(w, "keep_alive", err.Error())
			return call{}, false
		}
		c.keepAlive = &d
		v.Del("keep_alive")
		rewrite = true
	}
	ep := openai.Endpoint(path)
	if ep == tokenizer.EndpointChat && (c.ms.Defaults != nil || c.ms.System != "") {
		rewrite = applyDefaults(v, c.ms, &dp, &a) || rewrite
	}
	if c.est, err = rt.estimateCost(ep, rec.model, v, c.ms); err != nil {
		rec.outcome = OutcomeBadRequest
		rt.say.Error(w, http.StatusBadRequest, "invalid_request_error", "", err.Error())
		return call{}, false
	}
	stream := v.GetBool("stream")
	wantUsage := *rt.cfg.InjectStreamUsage && stream && !provider.WantsStreamUsage(v) &&
		(ep == tokenizer.EndpointChat || ep == tokenizer.EndpointCompletions)
	switch {
	case rewrite:
		c.inject = request.NewBodySize(len(body) + 64)
		if wantUsage {
			c.inject.Buf = provider.WithStreamUsage(c.inject.Buf, nil, v)
		} else {
			c.inject.Buf = v.MarshalTo(c.inject.Buf)
		}
	case wantUsage:
		c.inject = request.NewBodySize(len(body) + 64)
		c.inject.Buf = provider.WithStreamUsage(c.inject.Buf, body, v)
	}
	return c, true
}
