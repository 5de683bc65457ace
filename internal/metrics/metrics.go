// Package metrics defines llproxy's Prometheus metrics. Collectors are built
// against a Registerer passed in (no package globals), and each model's
// children are looked up once and kept, so the hot path never hashes label
// values.
//
// Queue depth and bucket levels are not counted up and down by the request
// path: a collector reads them from the scheduler at scrape time, so they
// are exact and cost the hot path nothing.
package metrics

import (
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

const namespace = "llproxy"

// Outcomes of a request, the values of the "outcome" label.
const (
	OutcomeAdmitted        = "admitted"
	OutcomeRejectQueueFull = "rejected_queue_full"
	OutcomeRejectWait      = "rejected_wait"
	OutcomeRejectTooLarge  = "rejected_too_large"
	OutcomeCancelled       = "cancelled"
	OutcomeShuttingDown    = "rejected_shutdown"
	// OutcomeRejectUpstream is an admitted request whose upstream 429
	// outlasted its maxQueueWait: it was answered with a 429 after all.
	OutcomeRejectUpstream = "rejected_upstream"
)

// OtherModel is the model label of every model past a route's label
// bound: clients choose model names, and each name must not add series
// without end.
const OtherModel = "other"

// Metrics holds the collectors of one gateway.
type Metrics struct {
	requests        *prometheus.CounterVec
	queueWait       *prometheus.HistogramVec
	tokensReserved  *prometheus.CounterVec
	promptTokens    *prometheus.CounterVec
	upstreamStatus  *prometheus.CounterVec
	upstreamLatency *prometheus.HistogramVec
	inflight        *prometheus.GaugeVec
	passthrough     *prometheus.CounterVec
	tokensUsed      *prometheus.CounterVec
	tokensSettled   *prometheus.CounterVec
	estimateError   *prometheus.HistogramVec
	factor          *prometheus.GaugeVec
	classAdmitted   *prometheus.CounterVec
	spend, unpriced *prometheus.CounterVec
	factorError     *prometheus.HistogramVec
	retries         *prometheus.CounterVec
	upstreamRate    *prometheus.GaugeVec
	bucketLowered   *prometheus.CounterVec
	clients         clientVecs
	responses       *prometheus.CounterVec
}

// Source is what the scrape-time collectors read: queues and fleet
// backends.
type Source interface {
	QueueSource
	BackendSource
	ClientSource
}

// New builds the collectors and registers them, with the collectors that
// read queues and backends through src at scrape time, on reg.
func New(reg prometheus.Registerer, src Source) (*Metrics, error) {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "requests_total",
			Help: "Scheduled requests by outcome: admitted, rejected_queue_full, rejected_wait, rejected_too_large, cancelled (client left while queued), rejected_shutdown; rejected_upstream counts admitted requests whose upstream 429 outlasted their maxQueueWait.",
		}, []string{"route", "model", "outcome"}),
		queueWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "queue_wait_seconds",
			Help:    "Time admitted requests spent queued (0 for immediate admission).",
			Buckets: []float64{0, .005, .025, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120},
		}, []string{"route", "model"}),
		tokensReserved: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "tokens_reserved_total",
			Help: "Tokens charged to the token bucket at admission (prompt + n x max output).",
		}, []string{"route", "model"}),
		promptTokens: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "prompt_tokens_counted_total",
			Help: "Prompt tokens counted by the gateway's tokenizer for admitted requests.",
		}, []string{"route", "model"}),
		upstreamStatus: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "upstream_responses_total",
			Help: "Upstream responses by HTTP status code; code \"error\" when no response came (connection failure, timeout).",
		}, []string{"route", "model", "code"}),
		upstreamLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "upstream_latency_seconds",
			Help:    "Time from admission to the upstream's response headers (time to first byte).",
			Buckets: prometheus.ExponentialBuckets(0.005, 2.5, 12),
		}, []string{"route", "model"}),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "inflight_requests",
			Help: "Admitted requests whose response is still being sent.",
		}, []string{"route", "model"}),
	}
	m.passthrough = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "passthrough_requests_total",
		Help: "Requests forwarded without scheduling because their body names no model (GET /v1/models, files, ...).",
	}, []string{"route"})
	m.tokensUsed = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "tokens_used_total",
		Help: "Tokens the upstream reported as used, by kind (prompt, completion); compare with tokens_reserved_total.",
	}, []string{"route", "model", "kind"})
	m.tokensSettled = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "tokens_settled_total",
		Help: "Tokens settled after a response (settle \"actual\"): refund (reserved but unused, returned to the bucket) or charge (used beyond the reservation); unsent for admissions returned whole.",
	}, []string{"route", "model", "direction"})
	m.estimateError = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: namespace, Name: "prompt_estimate_error_ratio",
		Help:    "(counted - upstream-reported) / upstream-reported prompt tokens: how well the gateway's tokenizer agrees with the upstream.",
		Buckets: []float64{-0.5, -0.2, -0.1, -0.05, -0.02, -0.005, 0.005, 0.02, 0.05, 0.1, 0.2, 0.5, 1},
	}, []string{"route", "model"})
	m.factor = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: namespace, Name: "estimate_factor",
		Help: "The calibrated estimate's factor of a model without a public tokenizer: the upstream's prompt count over the gateway's o200k count, learned from answers.",
	}, []string{"route", "model"})
	m.factorError = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: namespace, Name: "estimate_error_ratio",
		Help:    "Calibrated estimate of a prompt (as reserved at admission) divided by the upstream's count at settlement.",
		Buckets: []float64{0.5, 0.8, 0.9, 0.95, 0.98, 1, 1.02, 1.05, 1.1, 1.2, 1.5, 2, 3},
	}, []string{"route", "model"})
	m.spend = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "client_spend_usd_total",
		Help: "What the client's requests cost at the configured prices, in USD.",
	}, []string{"client", "route", "model"})
	m.unpriced = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "unpriced_requests_total",
		Help: "Requests settled for a model with no price (not even \"*\"): they cost 0.",
	}, []string{"route", "model"})
	m.classAdmitted = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "class_admitted_total",
		Help: "Requests admitted, by class (interactive, batch); a batch request admitted for its age counts as interactive.",
	}, []string{"route", "model", "class"})
	m.retries = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "upstream_retries_total",
		Help: "Requests sent again by the gateway, by reason: rate_limited (upstream 429), server_error (5xx), connect_error.",
	}, []string{"route", "model", "reason"})
	m.upstreamRate = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: namespace, Name: "upstream_ratelimit",
		Help: "The upstream's own rate-limit view from its last response headers, by resource (requests, tokens) and field (limit, remaining, reset_seconds).",
	}, []string{"route", "model", "resource", "field"})
	m.bucketLowered = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "bucket_lowered_total",
		Help: "Times the gateway lowered a bucket because the upstream reported less remaining (another user of the key).",
	}, []string{"route", "model"})
	m.clients = newClientVecs()
	m.responses = newResponsesVec()
	for _, c := range []prometheus.Collector{m.responses, m.clients.requests, m.clients.used, newClientCollector(src), m.tokensUsed, m.tokensSettled, m.estimateError, m.retries,
		m.factor, m.factorError, m.classAdmitted, m.spend, m.unpriced,
		m.upstreamRate, m.bucketLowered, m.passthrough, m.requests, m.queueWait, m.tokensReserved, m.promptTokens,
		m.upstreamStatus, m.upstreamLatency, m.inflight, newQueueCollector(src), newBackendCollector(src)} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Model is the children of one (route, model), looked up once.
type Model struct {
	m                                           *Metrics
	route, model                                string
	admitted, queueFull, wait, tooLarge, cancel prometheus.Counter
	shutdown, upstreamReject                    prometheus.Counter
	queueWait, latency                          prometheus.Observer
	reserved, prompt                            prometheus.Counter
	inflight                                    prometheus.Gauge
	ok200                                       prometheus.Counter
	usedPrompt, usedCompletion                  prometheus.Counter
	refund, charge, unsent                      prometheus.Counter
	estimateError                               prometheus.Observer
	lowered                                     prometheus.Counter
	upOnce, calOnce, classOnce                  sync.Once
	classes                                     [2]prometheus.Counter // made on first admission
	nClass                                      [2]atomic.Int64
	factor                                      prometheus.Gauge       // made on first calibration
	factorError                                 prometheus.Observer    // ditto
	upRate                                      [4][3]prometheus.Gauge // resource x field, made on first report
	// For the status page: admitted and refused so far, and the upstream's
	// latency (EWMA, µs).
	nAdmitted, nRejected, latencyUS atomic.Int64
}

// Totals returns how many requests were admitted and refused (a 429 of
// any reason) so far.
func (mm *Model) Totals() (admitted, rejected int64) { return mm.nAdmitted.Load(), mm.nRejected.Load() }

// Latency returns the upstream's recent time to headers (an EWMA).
func (mm *Model) Latency() time.Duration {
	return time.Duration(mm.latencyUS.Load()) * time.Microsecond
}

// Model returns the children for (route, model).
func (m *Metrics) Model(route, model string) *Model {
	c := func(outcome string) prometheus.Counter { return m.requests.WithLabelValues(route, model, outcome) }
	return &Model{
		m: m, route: route, model: model,
		admitted: c(OutcomeAdmitted), queueFull: c(OutcomeRejectQueueFull), wait: c(OutcomeRejectWait),
		tooLarge: c(OutcomeRejectTooLarge), cancel: c(OutcomeCancelled), shutdown: c(OutcomeShuttingDown),
		upstreamReject: c(OutcomeRejectUpstream),
		queueWait:      m.queueWait.WithLabelValues(route, model),
		latency:        m.upstreamLatency.WithLabelValues(route, model),
		reserved:       m.tokensReserved.WithLabelValues(route, model),
		prompt:         m.promptTokens.WithLabelValues(route, model),
		inflight:       m.inflight.WithLabelValues(route, model),
		ok200:          m.upstreamStatus.WithLabelValues(route, model, "200"),
		usedPrompt:     m.tokensUsed.WithLabelValues(route, model, "prompt"),
		usedCompletion: m.tokensUsed.WithLabelValues(route, model, "completion"),
		refund:         m.tokensSettled.WithLabelValues(route, model, "refund"),
		charge:         m.tokensSettled.WithLabelValues(route, model, "charge"),
		unsent:         m.tokensSettled.WithLabelValues(route, model, "unsent"),
		estimateError:  m.estimateError.WithLabelValues(route, model),
		lowered:        m.bucketLowered.WithLabelValues(route, model),
	}
}

// DeleteModel removes every series of (route, model): its queue is gone.
func (m *Metrics) DeleteModel(route, model string) {
	l := prometheus.Labels{"route": route, "model": model}
	for _, v := range []interface{ DeletePartialMatch(prometheus.Labels) int }{
		m.requests, m.tokensReserved, m.promptTokens, m.upstreamStatus, m.inflight, m.tokensUsed,
		m.tokensSettled, m.retries, m.upstreamRate, m.bucketLowered, m.factor, m.classAdmitted, m.spend, m.unpriced,
	} {
		v.DeletePartialMatch(l)
	}
	for _, v := range []*prometheus.HistogramVec{m.queueWait, m.upstreamLatency, m.estimateError, m.factorError} {
		v.DeletePartialMatch(l)
	}
}

// Used records the usage the upstream reported and how far the gateway's
// prompt count was from it.
func (mm *Model) Used(countedPrompt, prompt, completion int) {
	mm.usedPrompt.Add(float64(prompt))
	mm.usedCompletion.Add(float64(completion))
	if prompt > 0 {
		mm.estimateError.Observe(float64(countedPrompt-prompt) / float64(prompt))
	}
}

// ClassAdmitted counts an admission of class (0 interactive, 1 batch).
func (mm *Model) ClassAdmitted(class int) {
	mm.classOnce.Do(func() {
		for i, name := range [...]string{"interactive", "batch"} {
			mm.classes[i] = mm.m.classAdmitted.WithLabelValues(mm.route, mm.model, name)
		}
	})
	if class >= 0 && class < len(mm.classes) {
		mm.classes[class].Inc()
		mm.nClass[class].Add(1)
	}
}

// ClassTotals are the admissions of each class so far (0 interactive, 1
// batch), for the status page.
func (mm *Model) ClassTotals() [2]int64 { return [2]int64{mm.nClass[0].Load(), mm.nClass[1].Load()} }

// Spent counts what a client's request to the model cost, in USD.
func (mm *Model) Spent(client string, usd float64) {
	if usd > 0 {
		mm.m.spend.WithLabelValues(client, mm.route, mm.model).Add(usd)
	}
}

// Unpriced counts a request settled for the model without a price.
func (mm *Model) Unpriced() { mm.m.unpriced.WithLabelValues(mm.route, mm.model).Inc() }

// Calibrated records a calibrated estimate's settlement: the factor now,
// and the estimate reserved at admission over the upstream's count.
func (mm *Model) Calibrated(factor, estimateOverActual float64) {
	mm.calOnce.Do(func() {
		mm.factor = mm.m.factor.WithLabelValues(mm.route, mm.model)
		mm.factorError = mm.m.factorError.WithLabelValues(mm.route, mm.model)
	})
	mm.factor.Set(factor)
	if estimateOverActual > 0 {
		mm.factorError.Observe(estimateOverActual)
	}
}

// Settled records a settlement: reserved minus actual tokens went back to
// the bucket (refund, positive) or were charged (negative).
func (mm *Model) Settled(refund int) {
	switch {
	case refund > 0:
		mm.refund.Add(float64(refund))
	case refund < 0:
		mm.charge.Add(float64(-refund))
	}
}

// Unsent records an admission returned whole: its request never ran.
func (mm *Model) Unsent(tokens int) { mm.unsent.Add(float64(tokens)) }

// Retry counts a request sent again, by reason.
func (mm *Model) Retry(reason string) {
	mm.m.retries.WithLabelValues(mm.route, mm.model, reason).Inc()
}

// Lowered counts a bucket lowered to the upstream's view.
func (mm *Model) Lowered() { mm.lowered.Inc() }

// UpstreamRate records the upstream's view of one resource (0 requests, 1
// tokens, 2 input tokens, 3 output tokens); a negative limit or remaining
// was not reported.
func (mm *Model) UpstreamRate(resource int, limit, remaining int, reset time.Duration, hasReset bool) {
	if resource < 0 || resource >= len(mm.upRate) || (limit < 0 && remaining < 0 && !hasReset) {
		return
	}
	mm.upOnce.Do(func() {
		for r, res := range []string{"requests", "tokens", "input_tokens", "output_tokens"} {
			for f, field := range []string{"limit", "remaining", "reset_seconds"} {
				mm.upRate[r][f] = mm.m.upstreamRate.WithLabelValues(mm.route, mm.model, res, field)
			}
		}
	})
	g := mm.upRate[resource]
	if limit >= 0 {
		g[0].Set(float64(limit))
	}
	if remaining >= 0 {
		g[1].Set(float64(remaining))
	}
	if hasReset {
		g[2].Set(reset.Seconds())
	}
}

// Admitted records an admitted request: its wait and what it reserved.
func (mm *Model) Admitted(wait time.Duration, promptTokens, reservedTokens int) {
	mm.admitted.Inc()
	mm.nAdmitted.Add(1)
	mm.queueWait.Observe(wait.Seconds())
	mm.prompt.Add(float64(promptTokens))
	mm.reserved.Add(float64(reservedTokens))
}

// Outcome counts a request that was not admitted.
func (mm *Model) Outcome(outcome string) {
	if strings.HasPrefix(outcome, "rejected_") {
		mm.nRejected.Add(1)
	}
	switch outcome {
	case OutcomeRejectQueueFull:
		mm.queueFull.Inc()
	case OutcomeRejectWait:
		mm.wait.Inc()
	case OutcomeRejectTooLarge:
		mm.tooLarge.Inc()
	case OutcomeCancelled:
		mm.cancel.Inc()
	case OutcomeShuttingDown:
		mm.shutdown.Inc()
	case OutcomeRejectUpstream:
		mm.upstreamReject.Inc()
	}
}

// Passthrough returns the counter of a route's unscheduled requests.
func (m *Metrics) Passthrough(route string) prometheus.Counter {
	return m.passthrough.WithLabelValues(route)
}

// Upstream records the upstream's answer: status (0 for no response) and
// the time to its headers.
func (mm *Model) Upstream(status int, latency time.Duration) {
	switch status {
	case 200:
		mm.ok200.Inc()
	case 0:
		mm.m.upstreamStatus.WithLabelValues(mm.route, mm.model, "error").Inc()
	default:
		mm.m.upstreamStatus.WithLabelValues(mm.route, mm.model, strconv.Itoa(status)).Inc()
	}
	if status != 0 {
		mm.latency.Observe(latency.Seconds())
		us := latency.Microseconds()
		if old := mm.latencyUS.Load(); old != 0 {
			us = (7*old + us) / 8
		}
		mm.latencyUS.Store(us)
	}
}

// Inflight tracks a request being forwarded: +1 at start, -1 at the end.
func (mm *Model) Inflight(delta float64) { mm.inflight.Add(delta) }
