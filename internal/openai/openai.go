// Package openai is the OpenAI API's shapes as the gateway writes them:
// the error envelope {"error":{message,type,param,code}}, the 429 of a rate
// limit with its retry-after and x-ratelimit-* headers, and which API a
// path is. (Package ollama is the same for Ollama's API.)
//
// It exists so that every answer of the gateway's own, on every endpoint,
// has the one shape clients and SDKs parse.
package openai

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/llproxy/llproxy/scheduler"
	"github.com/llproxy/llproxy/tokenizer"
)

// apiError is OpenAI's error envelope: {"error":{"message","type","param","code"}}.
type apiError struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    *string `json:"code"`
}

// WriteError writes an OpenAI-shaped error. Messages never contain keys or
// prompt text.
func WriteError(w http.ResponseWriter, status int, typ, code, msg string) {
	e := apiError{Message: msg, Type: typ}
	if code != "" {
		e.Code = &code
	}
	writeError(w, status, e)
}

// WriteParamError writes a 400 invalid_request_error naming param.
func WriteParamError(w http.ResponseWriter, param, msg string) {
	writeError(w, http.StatusBadRequest, apiError{Message: msg, Type: "invalid_request_error", Param: &param})
}

func writeError(w http.ResponseWriter, status int, e apiError) {
	body, _ := json.Marshal(struct {
		Error apiError `json:"error"`
	}{e})
	writeBody(w, status, body)
}

// writeBody writes a JSON error body (a newline is added).
func writeBody(w http.ResponseWriter, status int, body []byte) {
	h := w.Header()
	h["Content-Type"] = []string{"application/json"}
	h["Content-Length"] = []string{strconv.Itoa(len(body) + 1)}
	w.WriteHeader(status)
	w.Write(append(body, '\n'))
}

// rateHeaders are OpenAI's x-ratelimit-* header names of each bucket it
// reports (limit, remaining, reset), by resource: requests and tokens.
var rateHeaders = [scheduler.NumBuckets][3]string{
	scheduler.Requests: {"X-Ratelimit-Limit-Requests", "X-Ratelimit-Remaining-Requests", "X-Ratelimit-Reset-Requests"},
	scheduler.Tokens:   {"X-Ratelimit-Limit-Tokens", "X-Ratelimit-Remaining-Tokens", "X-Ratelimit-Reset-Tokens"},
}

// SetRateHeaders sets the x-ratelimit-* headers from the gateway's
// buckets, three for each bucket OpenAI names that the model has (the six
// of requests and tokens), replacing any the upstream sent. The values
// share one backing array: one allocation for the slices.
func SetRateHeaders(h http.Header, st *scheduler.RateState) {
	n := 0
	for r, names := range rateHeaders {
		if names[0] != "" && st.Limit[r] != 0 {
			n += 3
		}
	}
	vals := make([]string, 0, n)
	for r, names := range rateHeaders {
		switch {
		case names[0] == "":
		case st.Limit[r] != 0:
			vals = append(vals, strconv.Itoa(st.Limit[r]), strconv.Itoa(st.Remaining[r]), st.Reset[r].String())
		default:
			for _, name := range names {
				delete(h, name) // the upstream's, of a bucket the gateway does not keep
			}
		}
	}
	n = 0
	for r, names := range rateHeaders {
		if names[0] == "" || st.Limit[r] == 0 {
			continue
		}
		for i, name := range names {
			h[name] = vals[n+i : n+i+1 : n+i+1]
		}
		n += 3
	}
}

// units name each resource's limit in a rejection's message, as OpenAI's
// own do.
var units = [...]string{
	scheduler.Requests:     "requests per min (RPM)",
	scheduler.Tokens:       "tokens per min (TPM)",
	scheduler.InputTokens:  "input tokens per min (ITPM)",
	scheduler.OutputTokens: "output tokens per min (OTPM)",
	scheduler.Slots:        "concurrent requests (slots)",
}

// ceilMillis rounds d up to the millisecond, so a client that waits it is
// never early.
func ceilMillis(d time.Duration) time.Duration {
	return (d + time.Millisecond - 1).Truncate(time.Millisecond)
}

// WriteReject answers a scheduler rejection with OpenAI's 429: the message,
// type and code of a real rate-limit error, retry-after (whole seconds,
// rounded up) and retry-after-ms that are true, and the x-ratelimit-*
// headers. A request too large for the bucket also gets x-should-retry:
// false, since no wait helps it.
func WriteReject(w http.ResponseWriter, route string, e *scheduler.RejectError) {
	Dialect{}.Reject(w, route, e)
}

// RejectMessage words a rejection as OpenAI does its own (the bucket that
// binds, its limit, what is used and requested, when to try again), and
// sets the headers that tell a client when (retry-after, whole seconds
// rounded up, and retry-after-ms) or that no wait helps (x-should-retry:
// false, for a request too large). typ is "requests" or "tokens".
func RejectMessage(h http.Header, route string, e *scheduler.RejectError) (typ, msg string) {
	unit := units[min(int(e.Resource), len(units)-1)]
	typ = "requests"
	if e.Resource != scheduler.Requests && e.Resource != scheduler.Slots {
		typ = "tokens"
	}
	// Whose limit: the model's, or the client's own.
	where, whose := "in llproxy route "+route, "the model's"
	if e.Client != "" {
		where, whose = "in llproxy route "+route+" for client "+e.Client, "its client's"
	}
	if errors.Is(e, scheduler.ErrTooLarge) {
		h["X-Should-Retry"] = []string{"false"}
		return typ, fmt.Sprintf("Request too large for %s %s on %s: Limit %d, Requested %d. "+
			"The input or output tokens must be reduced in order to run successfully.",
			e.Model, where, unit, e.Limit, e.Requested)
	}
	retry := ceilMillis(e.RetryAfter)
	SetRetryAfter(h, retry)
	why := "Its queue is full (" + strconv.Itoa(e.QueueLen) + " requests of its client waiting)."
	if errors.Is(e, scheduler.ErrWaitTooLong) {
		why = "It would wait in the queue longer than " + deadline(e, whose) + "."
	}
	return typ, fmt.Sprintf("Rate limit reached for %s %s on %s: Limit %d, Used %d, Requested %d. "+
		"Please try again in %s. %s", e.Model, where, unit, e.Limit, e.Used, e.Requested, retry, why)
}

// deadline names the limit on a rejected request's wait: the request's
// own (x-llproxy-max-wait), its client's or the model's maxQueueWait (for
// a batch request, batchMaxQueueWait), with its value.
func deadline(e *scheduler.RejectError, whose string) string {
	name := "maxQueueWait"
	if e.Class == scheduler.Batch {
		name = "batchMaxQueueWait"
	}
	switch e.WaitLimit {
	case scheduler.WaitRequest:
		return "the request's x-llproxy-max-wait (" + e.MaxWait.String() + ")"
	case scheduler.WaitClient:
		whose = "its client's"
	default:
		whose = "the model's"
	}
	return whose + " " + name + " (" + e.MaxWait.String() + ")"
}

// SetRetryAfter sets retry-after (whole seconds, rounded up) and
// retry-after-ms to d.
func SetRetryAfter(h http.Header, d time.Duration) {
	d = ceilMillis(d)
	h["Retry-After"] = []string{strconv.FormatInt(int64(math.Ceil(d.Seconds())), 10)}
	h["Retry-After-Ms"] = []string{strconv.FormatInt(d.Milliseconds(), 10)}
}

// WriteQuota answers a request whose client's daily budget is used up:
// OpenAI's 429 insufficient_quota, which no wait of a few seconds helps
// (x-should-retry: false), with retry-after until the budget starts over.
func WriteQuota(w http.ResponseWriter, e QuotaError) { Dialect{}.Quota(w, e) }

// SetQuotaHeaders says that no wait of a few seconds helps (x-should-retry:
// false) and when the budget starts over (retry-after).
func SetQuotaHeaders(h http.Header, e QuotaError) {
	h["X-Should-Retry"] = []string{"false"}
	secs := int64(math.Ceil(time.Until(e.ResetAt()).Seconds()))
	h["Retry-After"] = []string{strconv.FormatInt(max(1, secs), 10)}
}

// WriteBudgetReserved answers a request that does not fit its client's
// budget only because requests in flight hold the rest: a retryable 429
// (code budget_reserved) with a short Retry-After.
func WriteBudgetReserved(w http.ResponseWriter, e RetryError) { Dialect{}.BudgetReserved(w, e) }

// RetryError is a refusal that a retry soon may not meet.
type RetryError interface {
	error
	RetryAfter() time.Duration
}

// SetRetrySoon says when to try again (retry-after, retry-after-ms) and
// that it may work then (x-should-retry: true).
func SetRetrySoon(h http.Header, e RetryError) {
	SetRetryAfter(h, e.RetryAfter())
	h["X-Should-Retry"] = []string{"true"}
}

// QuotaError is a budget used up: its message and when it starts over.
type QuotaError interface {
	error
	ResetAt() time.Time
}

// Endpoint maps a request path to the API whose body it carries.
func Endpoint(path string) tokenizer.Endpoint {
	switch {
	case strings.HasSuffix(path, "/chat/completions"):
		return tokenizer.EndpointChat
	case strings.HasSuffix(path, "/completions"):
		return tokenizer.EndpointCompletions
	case strings.HasSuffix(path, "/embeddings"):
		return tokenizer.EndpointEmbeddings
	case strings.HasSuffix(path, "/responses"):
		return tokenizer.EndpointResponses
	case strings.HasSuffix(path, "/v1/messages"):
		return tokenizer.EndpointMessages // Anthropic's Messages API
	}
	return tokenizer.EndpointOther
}
