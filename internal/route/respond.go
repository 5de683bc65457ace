package route

import (
	"context"
	"errors"
	"net/http"
	"strings"

	"github.com/llproxy/llproxy/internal/anthropic"
	"github.com/llproxy/llproxy/internal/fleet"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/openai"
	"github.com/llproxy/llproxy/internal/relay"
	"github.com/llproxy/llproxy/internal/request"
	"github.com/llproxy/llproxy/scheduler"
)

// The respond stage: every answer of the route's own, each failure in
// OpenAI's shape (package openai). The upstream's answers are handed on as
// they arrive (relay.Respond).

// writeAcquireError answers a request the scheduler did not admit and
// returns its outcome.
func (rt *Route) writeAcquireError(w http.ResponseWriter, ctx context.Context, err error) string {
	var re *scheduler.RejectError
	switch {
	case errors.As(err, &re):
		rt.say.Reject(w, rt.name, re)
		switch {
		case errors.Is(err, scheduler.ErrTooLarge):
			return metrics.OutcomeRejectTooLarge
		case errors.Is(err, scheduler.ErrQueueFull):
			return metrics.OutcomeRejectQueueFull
		}
		return metrics.OutcomeRejectWait
	case errors.Is(err, scheduler.ErrClosed):
		w.Header()["Retry-After"] = []string{"1"}
		rt.say.Error(w, http.StatusServiceUnavailable, "server_error", "service_unavailable", "llproxy is shutting down; retry on another instance.")
		return metrics.OutcomeShuttingDown
	case ctx.Err() != nil:
		// The client left while queued: nothing was sent upstream and
		// nobody is left to answer.
		return metrics.OutcomeCancelled
	}
	rt.say.Error(w, http.StatusInternalServerError, "server_error", "", "llproxy: "+err.Error())
	return "error"
}

func (rt *Route) writeModelError(w http.ResponseWriter, model string, err error) {
	if errors.Is(err, scheduler.ErrTooManyModels) {
		rt.say.Error(w, http.StatusServiceUnavailable, "server_error", "too_many_models",
			"llproxy route "+rt.name+" already queues its limit of distinct models; the model `"+model+"` cannot get a queue.")
		return
	}
	rt.say.Error(w, http.StatusNotFound, "invalid_request_error", "model_not_found",
		"The model `"+model+"` does not exist or you do not have access to it. llproxy route "+rt.name+
			" serves: "+strings.Join(rt.models.Set().Models(), ", ")+".")
}

// writeUpstreamError answers a send that got no answer: 504 for a
// timeout, else 502.
func (rt *Route) writeUpstreamError(w http.ResponseWriter, err error) {
	status, msg := http.StatusBadGateway, "llproxy could not reach the upstream: "+relay.Describe(err)
	if relay.IsTimeout(err) {
		status, msg = http.StatusGatewayTimeout, "The upstream did not answer in time: "+relay.Describe(err)
	}
	rt.say.Error(w, status, "upstream_error", "upstream_unavailable", msg)
}

// writeLeaseError answers a request no send could be leased for.
func (rt *Route) writeLeaseError(w http.ResponseWriter, model string, err error) {
	if errors.Is(err, fleet.ErrUnknownModel) {
		models := ""
		if rt.fleet != nil {
			models = " Models: " + strings.Join(rt.fleet.Models(), ", ") + "."
		}
		rt.say.Error(w, http.StatusNotFound, "invalid_request_error", "model_not_found",
			"The model `"+model+"` does not exist on llproxy route "+rt.name+"."+models)
		return
	}
	w.Header()["Retry-After"] = []string{"5"}
	switch {
	case errors.Is(err, fleet.ErrNotStarted):
		rt.say.Error(w, http.StatusServiceUnavailable, "server_error", "backend_unavailable",
			"llproxy could not start the backend for `"+model+"`: "+err.Error())
	case errors.Is(err, fleet.ErrBusy):
		rt.say.Error(w, http.StatusServiceUnavailable, "server_error", "backend_busy",
			"Every backend of llproxy route "+rt.name+" serving `"+model+"` stayed at its maxConcurrent for the request's maxQueueWait.")
	default:
		rt.say.Error(w, http.StatusServiceUnavailable, "server_error", "backend_unavailable",
			"No healthy backend of llproxy route "+rt.name+" serves the model `"+model+"` right now.")
	}
}

// writeBodyError answers a body that could not be read and returns the
// log outcome.
func (rt *Route) writeBodyError(w http.ResponseWriter, err error, lim request.Limits) string {
	f := request.FailureOf(err, lim)
	typ := "invalid_request_error"
	if f.Status == http.StatusServiceUnavailable {
		typ = "server_error"
		w.Header()["Retry-After"] = []string{"1"}
	}
	rt.say.Error(w, f.Status, typ, f.Code, f.Message)
	return f.Outcome
}

// dialect writes the route's own answers in the shape of the API it
// speaks: OpenAI's, Azure's or Anthropic's (packages openai and
// anthropic).
type dialect interface {
	Error(w http.ResponseWriter, status int, typ, code, msg string)
	ParamError(w http.ResponseWriter, param, msg string)
	Reject(w http.ResponseWriter, route string, e *scheduler.RejectError)
	Quota(w http.ResponseWriter, e openai.QuotaError)
	BudgetReserved(w http.ResponseWriter, e openai.RetryError)
	RateHeaders(h http.Header, st *scheduler.RateState)
}

var (
	_ dialect = openai.Dialect{}
	_ dialect = anthropic.Dialect{}
)
