package route

import (
	"bytes"
	"errors"
	"net/http"
	"strconv"
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
	// countTokens: an Anthropic count_tokens call (free, its own limit),
	// not an inference.
	countTokens bool
}

// endpoint is which API a request path is: an inference endpoint of
// OpenAI's or Anthropic's API, or Anthropic's count_tokens.
func endpoint(path string) (ep tokenizer.Endpoint, countTokens bool) {
	if strings.HasSuffix(path, "/v1/messages/count_tokens") {
		return tokenizer.EndpointMessages, true
	}
	return openai.Endpoint(path), false
}

// azureDeployment is the deployment an Azure path names
// (/openai/deployments/{deployment}/...), if it names one.
func azureDeployment(path string) (string, bool) {
	const marker = "/openai/deployments/"
	i := strings.Index(path, marker)
	if i < 0 {
		return "", false
	}
	d, _, _ := strings.Cut(path[i+len(marker):], "/")
	return d, true
}

var cacheControl = []byte(`"cache_control"`)

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
	ep, countTokens := endpoint(path)
	mv := v.Get("model")
	if dep, ok := azureDeployment(path); ok && rt.api == provider.NameAzure {
		// Azure names the deployment in the path; the body names no model.
		model, known := rt.cfg.Deployments[dep]
		if !known {
			rec.outcome = OutcomeNotFound
			rt.say.Error(w, http.StatusNotFound, "invalid_request_error", "DeploymentNotFound",
				"The API deployment for this resource does not exist: llproxy route "+rt.name+" has no deployment named "+
					strconv.Quote(dep)+".")
			return c, false
		}
		rec.model = model
	} else {
		if mv == nil || mv.Type() == fastjson.TypeNull {
			if ep != tokenizer.EndpointOther {
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
		if m, ok := rt.cfg.Deployments[rec.model]; ok {
			rec.model = m // Azure's v1 API: the body names the deployment
		}
	}
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
	if countTokens {
		// Free and limited apart: counted only to learn from its answer.
		c.countTokens = true
		c.est.raw = rt.opts.Tokenizer.PromptTokens(ep, rec.model, v)
		return c, true
	}
	if ep == tokenizer.EndpointChat && (c.ms.Defaults != nil || c.ms.System != "") {
		rewrite = applyDefaults(v, c.ms, &dp, &a) || rewrite
	}
	if c.est, err = rt.estimateCost(ep, rec.model, v, c.ms, bytes.Contains(body, cacheControl)); err != nil {
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
