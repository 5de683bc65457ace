// Package anthropic is Anthropic's Messages API shapes as the gateway
// writes them: the error envelope {"type":"error","error":{type,message},
// "request_id"} with Anthropic's error types, the 429 of a rate limit with
// its retry-after, and the anthropic-ratelimit-* headers of the gateway's
// buckets (resets as RFC 3339 times), on every answer of an Anthropic
// route.
//
// It exists so that an Anthropic SDK or a coding agent pointed at the
// gateway parses every answer of the gateway's own as it parses
// Anthropic's, and retries (or not) as it would there.
package anthropic

import (
	"encoding/json"
	"net/http"
	"strconv"
	"time"

	"github.com/llproxy/llproxy/internal/openai"
	"github.com/llproxy/llproxy/scheduler"
)

// errorTypes are Anthropic's error types by status.
var errorTypes = map[int]string{
	http.StatusBadRequest:            "invalid_request_error",
	http.StatusUnauthorized:          "authentication_error",
	http.StatusPaymentRequired:       "billing_error",
	http.StatusForbidden:             "permission_error",
	http.StatusNotFound:              "not_found_error",
	http.StatusMethodNotAllowed:      "invalid_request_error",
	http.StatusRequestEntityTooLarge: "request_too_large",
	http.StatusTooManyRequests:       "rate_limit_error",
	http.StatusInternalServerError:   "api_error",
	http.StatusBadGateway:            "api_error",
	http.StatusServiceUnavailable:    "overloaded_error",
	http.StatusGatewayTimeout:        "timeout_error",
	529:                              "overloaded_error",
}

// ErrorType is Anthropic's error type of status.
func ErrorType(status int) string {
	if t, ok := errorTypes[status]; ok {
		return t
	}
	if status >= 500 {
		return "api_error"
	}
	return "invalid_request_error"
}

type apiError struct {
	Type    string `json:"type"`
	Message string `json:"message"`
}

type envelope struct {
	Type      string   `json:"type"`
	Error     apiError `json:"error"`
	RequestID string   `json:"request_id,omitempty"`
}

// Dialect writes the gateway's own answers on an Anthropic route.
type Dialect struct{}

// Error writes an error of status in Anthropic's envelope, its type
// Anthropic's for the status (typ and code, OpenAI's, are not used), with
// the request's id (request-id, and request_id in the body).
func (Dialect) Error(w http.ResponseWriter, status int, _, _, msg string) {
	h := w.Header()
	id := RequestID(h)
	body, _ := json.Marshal(envelope{Type: "error", Error: apiError{Type: ErrorType(status), Message: msg}, RequestID: id})
	h["Content-Type"] = []string{"application/json"}
	h["Content-Length"] = []string{strconv.Itoa(len(body) + 1)}
	w.WriteHeader(status)
	w.Write(append(body, '\n'))
}

// RequestID is the id of the answer being written: its request-id, else
// the gateway's X-Request-Id as Anthropic spells an id (req_...), which it
// sets as request-id too.
func RequestID(h http.Header) string {
	if v := h["Request-Id"]; len(v) > 0 {
		return v[0]
	}
	v := h["X-Request-Id"]
	if len(v) == 0 {
		return ""
	}
	id := "req_" + v[0]
	h["Request-Id"] = []string{id}
	return id
}

// ParamError writes a 400 naming param.
func (d Dialect) ParamError(w http.ResponseWriter, param, msg string) {
	d.Error(w, http.StatusBadRequest, "", "", param+": "+msg)
}

// Reject answers a scheduler rejection with Anthropic's 429: its message
// names the bucket that binds, retry-after says when (whole seconds,
// rounded up), and a request no bucket can ever hold gets x-should-retry:
// false, which the SDKs honour.
func (d Dialect) Reject(w http.ResponseWriter, route string, e *scheduler.RejectError) {
	h := w.Header()
	d.RateHeaders(h, &e.State)
	_, msg := openai.RejectMessage(h, route, e)
	d.Error(w, http.StatusTooManyRequests, "", "", msg)
}

// Quota answers a request over its client's budget: a 429 no wait of a
// few seconds helps.
func (d Dialect) Quota(w http.ResponseWriter, e openai.QuotaError) {
	openai.SetQuotaHeaders(w.Header(), e)
	d.Error(w, http.StatusTooManyRequests, "", "", e.Error())
}

// BudgetReserved answers a request that fits its budget once requests in
// flight settle.
func (d Dialect) BudgetReserved(w http.ResponseWriter, e openai.RetryError) {
	openai.SetRetrySoon(w.Header(), e)
	d.Error(w, http.StatusTooManyRequests, "", "", e.Error())
}

// rateHeaders are the limit, remaining and reset headers of each bucket,
// by resource.
var rateHeaders = [scheduler.NumBuckets][3]string{
	scheduler.Requests:     {"Anthropic-Ratelimit-Requests-Limit", "Anthropic-Ratelimit-Requests-Remaining", "Anthropic-Ratelimit-Requests-Reset"},
	scheduler.Tokens:       {"Anthropic-Ratelimit-Tokens-Limit", "Anthropic-Ratelimit-Tokens-Remaining", "Anthropic-Ratelimit-Tokens-Reset"},
	scheduler.InputTokens:  {"Anthropic-Ratelimit-Input-Tokens-Limit", "Anthropic-Ratelimit-Input-Tokens-Remaining", "Anthropic-Ratelimit-Input-Tokens-Reset"},
	scheduler.OutputTokens: {"Anthropic-Ratelimit-Output-Tokens-Limit", "Anthropic-Ratelimit-Output-Tokens-Remaining", "Anthropic-Ratelimit-Output-Tokens-Reset"},
}

// RateHeaders sets anthropic-ratelimit-*-{limit,remaining,reset} for each
// bucket the model has, from the gateway's buckets: exact integers, and
// the reset as the RFC 3339 UTC time (rounded up to the second) the
// bucket is full again. Any the upstream sent are replaced: the client is
// limited by the gateway's buckets.
func (Dialect) RateHeaders(h http.Header, st *scheduler.RateState) {
	now := time.Now()
	n := 0
	for r := range rateHeaders {
		if st.Limit[r] != 0 {
			n += 3
		}
	}
	vals := make([]string, 0, n) // one backing array for every value
	for r, names := range rateHeaders {
		if st.Limit[r] == 0 {
			for _, name := range names {
				delete(h, name) // the upstream's, of a bucket the gateway does not keep
			}
			continue
		}
		reset := now.Add(st.Reset[r] + time.Second - 1).Truncate(time.Second).UTC()
		i := len(vals)
		vals = append(vals, strconv.Itoa(st.Limit[r]), strconv.Itoa(st.Remaining[r]), reset.Format(time.RFC3339))
		for j, name := range names {
			h[name] = vals[i+j : i+j+1 : i+j+1]
		}
	}
}
