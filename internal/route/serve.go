package route

import (
	"context"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/clients"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/request"
	"github.com/llproxy/llproxy/provider"
	"github.com/llproxy/llproxy/tokenizer"
)

// serve is the request path: read and parse the body, count, admit,
// forward (again, if the upstream asks for it and the budget allows), and
// settle. Each step that fails answers in OpenAI's error shape and sends
// nothing upstream.
func (rt *Route) serve(w http.ResponseWriter, r *http.Request, who *clients.Client, in *Read) {
	start := time.Now()
	ex := getExchange(w)
	ex.say, ex.reqID = rt.say, rt.api == provider.NameAnthropic
	rec := requestLog{route: rt.name, client: who.Name, method: r.Method, path: r.URL.Path, start: start,
		id: r.Header.Get("X-Request-Id"), remote: r.RemoteAddr, class: who.Class.String()}
	if in != nil && in.Body != nil {
		defer in.Body.Release() // the route took it over, whatever happens
	}
	defer func() {
		p := recover()
		if p == http.ErrAbortHandler || (rec.outcome == metrics.OutcomeAdmitted && r.Context().Err() != nil) {
			rec.outcome = outcomeAborted // the upstream or the client broke off mid-stream
		}
		rec.backend = ex.backend
		rec.tries = ex.tries
		rt.countOutcome(&rec, who)
		rt.logRequest(r.Context(), ex, &rec)
		putExchange(ex)
		if p != nil {
			panic(p)
		}
	}()

	if !who.Allowed(rt.name) {
		request.DropBody(ex, r)
		rec.outcome = metrics.OutcomeForbidden
		rt.say.Error(ex, http.StatusForbidden, "invalid_request_error", "route_not_allowed",
			"Client "+who.Name+" may not use llproxy route "+rt.name+"; it may use: "+strings.Join(who.Routes(), ", ")+".")
		return
	}

	var body *request.Body
	var parsed *fastjson.Value
	switch {
	case in != nil && in.Body != nil:
		// The front read (and parsed) it already: not again. It is
		// released by the deferred step below serve's start.
		body, parsed = in.Body, in.Value
	case r.Body != nil && r.Body != http.NoBody && r.Method != http.MethodGet && r.Method != http.MethodHead:
		var err error
		body, err = request.ReadBody(ex, r, rt.opts.Limits, rt.opts.Closing)
		if err != nil {
			request.DropBody(ex, r)
			rec.outcome = rt.writeBodyError(ex, err, rt.opts.Limits)
			return
		}
		defer body.Release()
	}

	// Every inference call is scheduled, whatever its content type claims:
	// its body must be a JSON object naming a model. Other bodies that
	// look like JSON and name a model are scheduled too.
	var c call
	ep, _ := endpoint(r.URL.Path)
	inference := r.Method == http.MethodPost && ep != tokenizer.EndpointOther
	if inference || (body != nil && request.LooksJSON(r.Header.Get("Content-Type"), body.Buf)) {
		var raw []byte
		if body != nil {
			raw = body.Buf
		}
		var ok bool
		if c, ok = rt.inspect(ex, r.URL.Path, raw, parsed, &rec); !ok {
			return
		}
		if c.inject != nil {
			defer c.inject.Release()
		}
	}

	if c.ms == nil {
		rec.outcome = outcomePassthrough
		rt.noModel.Inc()
		if rt.fleet != nil && r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/v1/models") {
			// A fleet's list is its backends' together.
			ex.Header().Set("Content-Type", "application/json")
			ex.Write(rt.fleet.ModelsJSON(r.Context()))
			return
		}
		rt.relay(ex, r, body)
		return
	}
	if c.countTokens {
		rt.countTokens(ex, r, body, &c, &rec)
		return
	}
	rt.schedule(ex, r, body, &c, who, &rec)
}

// debugging reports whether debug logging is on; call debug behind it, so
// that the request path builds no attributes when it is off.
func (rt *Route) debugging(ctx context.Context) bool { return rt.log.Enabled(ctx, slog.LevelDebug) }

// debug logs a step of a request at debug level.
func (rt *Route) debug(ctx context.Context, msg string, attrs ...slog.Attr) {
	rt.log.LogAttrs(ctx, slog.LevelDebug, msg, append(attrs, slog.String("route", rt.name))...)
}
