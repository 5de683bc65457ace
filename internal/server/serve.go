package server

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/scheduler"
	"github.com/llproxy/llproxy/tokenizer"
)

// serve is the request path: read and parse the body, count, admit,
// forward (again, if the upstream asks for it and the budget allows), and
// settle. Each step that fails answers in OpenAI's error shape and sends
// nothing upstream.
func (rt *route) serve(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	ex := getExchange(w)
	rec := requestLog{route: rt.name, method: r.Method, path: r.URL.Path, start: start}
	defer func() {
		p := recover()
		if p == http.ErrAbortHandler {
			rec.outcome = "aborted" // the upstream or the client broke off mid-stream
		}
		rec.tries = ex.tries
		rt.srv.logRequest(r.Context(), ex, &rec)
		putExchange(ex)
		if p != nil {
			panic(p)
		}
	}()

	var body *bodyBuf
	if r.Body != nil && r.Body != http.NoBody && r.Method != http.MethodGet && r.Method != http.MethodHead {
		var err error
		body, err = rt.srv.readBody(ex, r)
		if err != nil {
			dropBody(ex, r)
			rec.outcome = writeBodyError(ex, err, rt.srv.cfg.MaxBodyBytes)
			return
		}
		defer body.release()
	}

	// Every inference call is scheduled, whatever its content type claims:
	// its body must be a JSON object naming a model. Other bodies that
	// look like JSON and name a model are scheduled too.
	var c call
	inference := r.Method == http.MethodPost && endpointOf(r.URL.Path) != tokenizer.EndpointOther
	if inference || (body != nil && looksJSON(r.Header.Get("Content-Type"), body.buf)) {
		var raw []byte
		if body != nil {
			raw = body.buf
		}
		var ok bool
		if c, ok = rt.inspect(ex, r.URL.Path, raw, &rec); !ok {
			return
		}
		if c.inject != nil {
			defer c.inject.release()
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
	rt.schedule(ex, r, body, &c, &rec)
}

// schedule admits a request through its model's queue and forwards it,
// sending it again when the upstream answers with a retryable 429 (back to
// the head of the queue, which is held as long as the upstream asked), a
// 5xx or a connection failure (after a backoff), as long as nothing has
// reached the client and the request's maxQueueWait budget lasts.
func (rt *route) schedule(ex *exchange, r *http.Request, body *bodyBuf, c *call, rec *requestLog) {
	ms := c.ms
	rec.prompt, rec.cost = c.est.prompt, c.est.cost
	arrived := time.Now()
	adm, err := ms.q.Acquire(r.Context(), scheduler.Cost{Tokens: c.est.cost})
	if errors.Is(err, scheduler.ErrRetired) {
		// Its queue was retired for being idle between lookup and
		// admission: look again (a new queue with full buckets, exactly
		// what the idle one held).
		if ms, err = rt.modelFor(rec.model); err == nil {
			c.ms = ms
			adm, err = ms.q.Acquire(r.Context(), scheduler.Cost{Tokens: c.est.cost})
		}
	}
	if err != nil {
		rec.outcome = rt.writeAcquireError(ex, r.Context(), err)
		ms.m.Outcome(rec.outcome)
		if rt.debugging(r.Context()) {
			rt.debug(r.Context(), "not admitted", slog.String("model", rec.model), slog.Int("cost", c.est.cost),
				slog.String("reason", err.Error()))
		}
		return
	}
	if rt.debugging(r.Context()) {
		rt.debug(r.Context(), "admitted", slog.String("model", rec.model), slog.Int("cost", c.est.cost),
			slog.Duration("wait", adm.Wait), slog.Int("remaining_requests", adm.State.RemainingRequests),
			slog.Int("remaining_tokens", adm.State.RemainingTokens))
	}
	// Whatever happens from here (a retry's new admission, a response cut
	// short by a panic with http.ErrAbortHandler), the admission in force
	// when the request ends gives back its concurrency slot.
	ex.adm = adm
	defer func() { ex.adm.Release(time.Now()) }()
	ms.m.Inflight(1)
	defer ms.m.Inflight(-1)
	rec.outcome, rec.wait = metrics.OutcomeAdmitted, adm.Wait
	ms.m.Admitted(adm.Wait, c.est.prompt, c.est.cost)

	ex.rate, ex.hasRate = adm.State, true
	ex.ms, ex.deadline, ex.strip = ms, arrived.Add(ms.maxQueueWait), c.inject != nil
	ex.maxRetries, ex.backoff = *rt.cfg.Retries, time.Duration(rt.cfg.RetryBackoff)
	ex.lease.Reset(rec.model, c.keepAlive, ex.deadline)
	send := body
	if c.inject != nil {
		send = c.inject
	}
	// The loop owns each round trip (forward.go): it sends, and sends
	// again while the outcome allows, then settles.
	for {
		ex.tries++
		a := rt.try(ex, r, rec.model, c, send)
		switch a.verdict {
		case deliver, failed:
			if a.noBackend {
				ex.adm.Unsend(time.Now()) // never sent
				ms.m.Unsent(c.est.cost)
				rec.outcome = "no_backend"
				if r.Context().Err() != nil {
					rec.outcome = metrics.OutcomeCancelled
				}
				return
			}
			rt.settle(ex, c, a, rec)
			return
		}
		if !rt.sendAgain(r.Context(), ex, a, c.est.cost, rec) {
			return
		}
	}
}

// debugging reports whether debug logging is on; call debug behind it, so
// that the request path builds no attributes when it is off.
func (rt *route) debugging(ctx context.Context) bool { return rt.srv.log.Enabled(ctx, slog.LevelDebug) }

// debug logs a step of a request at debug level.
func (rt *route) debug(ctx context.Context, msg string, attrs ...slog.Attr) {
	rt.srv.log.LogAttrs(ctx, slog.LevelDebug, msg, append(attrs, slog.String("route", rt.name))...)
}

// writeBodyError answers a body that could not be read and returns the
// log outcome.
func writeBodyError(w http.ResponseWriter, err error, limit int64) string {
	switch {
	case errors.Is(err, errBodyTooLarge):
		writeError(w, http.StatusRequestEntityTooLarge, "invalid_request_error", "request_too_large",
			"Request body too large: the limit is "+itoa(limit)+" bytes.")
		return outcomeTooLarge
	case errors.Is(err, errShuttingDown):
		w.Header()["Retry-After"] = []string{"1"}
		writeError(w, http.StatusServiceUnavailable, "server_error", "service_unavailable", "llproxy is shutting down; retry on another instance.")
		return metrics.OutcomeShuttingDown
	case isTimeout(err):
		w.Header()["Connection"] = []string{"close"}
		writeError(w, http.StatusRequestTimeout, "invalid_request_error", "request_timeout",
			"The request body did not arrive in time.")
		return outcomeBodyTimeout
	}
	writeError(w, http.StatusBadRequest, "invalid_request_error", "", "Could not read the request body.")
	return outcomeBodyError
}
