package server

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/scheduler"
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
		body, err = readBody(r, rt.srv.cfg.MaxBodyBytes)
		switch {
		case errors.Is(err, errBodyTooLarge):
			writeError(ex, http.StatusRequestEntityTooLarge, "invalid_request_error", "request_too_large",
				"Request body too large: the limit is "+itoa(rt.srv.cfg.MaxBodyBytes)+" bytes.")
			return
		case err != nil:
			rec.outcome = "body_error"
			writeError(ex, http.StatusBadRequest, "invalid_request_error", "", "Could not read the request body.")
			return
		}
		defer body.release()
	}

	var c call
	if body != nil && looksJSON(r.Header.Get("Content-Type"), body.buf) {
		var ok bool
		if c, ok = rt.inspect(ex, r.URL.Path, body.buf, &rec); !ok {
			return
		}
		if c.inject != nil {
			defer c.inject.release()
		}
	}

	if c.ms == nil {
		rec.outcome = outcomePassthrough
		rt.noModel.Inc()
		if rt.pool != nil {
			rt.serveFleetUnscheduled(ex, r, body)
			return
		}
		if body != nil {
			body.attach(r)
			defer r.Body.Close()
		}
		rt.forward.ServeHTTP(ex, r)
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
	if err != nil {
		rec.outcome = rt.writeAcquireError(ex, r.Context(), err)
		ms.m.Outcome(rec.outcome)
		return
	}
	rec.outcome, rec.wait = metrics.OutcomeAdmitted, adm.Wait
	ms.m.Admitted(adm.Wait, c.est.prompt, c.est.cost)
	ms.m.Inflight(1)
	defer ms.m.Inflight(-1)
	// The response is complete (streams included) when this returns: free
	// the concurrency slot (a no-op if Unsend already gave it back).
	defer func() { ms.q.Release(time.Now(), ex.adm) }()

	ex.rate, ex.hasRate, ex.adm = adm.State, true, adm
	ex.ms, ex.deadline, ex.strip = ms, arrived.Add(ms.maxQueueWait), c.inject != nil
	ex.maxRetries, ex.backoff = *rt.cfg.Retries, time.Duration(rt.cfg.RetryBackoff)
	send := body
	if c.inject != nil {
		send = c.inject
	}
	out := r.WithContext(context.WithValue(r.Context(), exchangeKey{}, ex))
	if rt.pool != nil {
		defer func() {
			if ex.renamed != nil {
				ex.renamed.release()
			}
		}()
	}
	for {
		ex.retry, ex.tap, ex.neverSent = retryNone, nil, false
		ex.tries++
		body := send
		if rt.pool != nil {
			if body = rt.pickBackend(out.Context(), ex, rec.model, c, send); body == nil {
				ms.q.Unsend(time.Now(), ex.adm, c.est.cost) // never sent
				rec.outcome = "no_backend"
				if r.Context().Err() != nil {
					rec.outcome = metrics.OutcomeCancelled
				}
				return
			}
		}
		body.attach(out)
		sent := time.Now()
		rt.forward.ServeHTTP(ex, out)
		out.Body.Close()
		if rt.pool != nil {
			rt.pool.Done(ex.backend)
			if ex.release != nil {
				ex.release() // the response is complete: it may be unloaded now
				ex.release = nil
			}
		}
		if ex.retry == retryNone {
			status := ex.status
			if ex.upstreamErr != nil {
				status = 0
			}
			if r.Context().Err() == nil || status != 0 {
				ms.m.Upstream(status, ex.headerAt.Sub(sent))
			}
			break
		}
		if !rt.sendAgain(out.Context(), ex, c.est.cost, rec) {
			return
		}
	}
	rt.settle(ex, c, rec)
}
