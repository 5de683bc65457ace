package openai

import (
	"encoding/json"
	"net/http"
	"strconv"

	"github.com/llproxy/llproxy/scheduler"
)

// Dialect writes the gateway's own answers on an OpenAI-compatible route:
// OpenAI's error envelope, or Azure's (Azure true), whose code is a string
// (the status, "429" for a rate limit) and which has no type.
type Dialect struct {
	Azure bool
}

// azureError is Azure OpenAI's error: {"error":{"code":"429","message":...}}.
type azureError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Error writes an error of status; typ and code are OpenAI's.
func (d Dialect) Error(w http.ResponseWriter, status int, typ, code, msg string) {
	if d.Azure {
		if code == "" || status == http.StatusTooManyRequests {
			code = strconv.Itoa(status)
		}
		body, _ := json.Marshal(struct {
			Error azureError `json:"error"`
		}{azureError{Code: code, Message: msg}})
		writeBody(w, status, body)
		return
	}
	WriteError(w, status, typ, code, msg)
}

// ParamError writes a 400 naming param.
func (d Dialect) ParamError(w http.ResponseWriter, param, msg string) {
	if d.Azure {
		d.Error(w, http.StatusBadRequest, "invalid_request_error", "", msg)
		return
	}
	WriteParamError(w, param, msg)
}

// Reject answers a scheduler rejection with the 429 of a rate limit.
func (d Dialect) Reject(w http.ResponseWriter, route string, e *scheduler.RejectError) {
	h := w.Header()
	d.RateHeaders(h, &e.State)
	typ, msg := RejectMessage(h, route, e)
	d.Error(w, http.StatusTooManyRequests, typ, "rate_limit_exceeded", msg)
}

// Quota answers a request over its client's budget.
func (d Dialect) Quota(w http.ResponseWriter, e QuotaError) {
	SetQuotaHeaders(w.Header(), e)
	d.Error(w, http.StatusTooManyRequests, "insufficient_quota", "insufficient_quota", e.Error())
}

// BudgetReserved answers a request that fits its budget only once requests
// in flight settle.
func (d Dialect) BudgetReserved(w http.ResponseWriter, e RetryError) {
	SetRetrySoon(w.Header(), e)
	d.Error(w, http.StatusTooManyRequests, "rate_limit_exceeded", "budget_reserved", e.Error())
}

// RateHeaders sets the x-ratelimit-* headers.
func (Dialect) RateHeaders(h http.Header, st *scheduler.RateState) { SetRateHeaders(h, st) }
