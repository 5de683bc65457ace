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
	OutcomePassthrough     = "passthrough"
)

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
}

// New builds the collectors and registers them, with the queue collector
// that reads queues through src, on reg.
func New(reg prometheus.Registerer, src QueueSource) (*Metrics, error) {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "requests_total",
			Help: "Scheduled requests by outcome: admitted, rejected_queue_full, rejected_wait, rejected_too_large, cancelled (client left while queued), rejected_shutdown.",
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
	for _, c := range []prometheus.Collector{m.passthrough, m.requests, m.queueWait, m.tokensReserved, m.promptTokens,
		m.upstreamStatus, m.upstreamLatency, m.inflight, newQueueCollector(src)} {
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
	shutdown                                    prometheus.Counter
	queueWait, latency                          prometheus.Observer
	reserved, prompt                            prometheus.Counter
	inflight                                    prometheus.Gauge
	ok200                                       prometheus.Counter
}

// Model returns the children for (route, model).
func (m *Metrics) Model(route, model string) *Model {
	c := func(outcome string) prometheus.Counter { return m.requests.WithLabelValues(route, model, outcome) }
	return &Model{
		m: m, route: route, model: model,
		admitted: c(OutcomeAdmitted), queueFull: c(OutcomeRejectQueueFull), wait: c(OutcomeRejectWait),
		tooLarge: c(OutcomeRejectTooLarge), cancel: c(OutcomeCancelled), shutdown: c(OutcomeShuttingDown),
		queueWait: m.queueWait.WithLabelValues(route, model),
		latency:   m.upstreamLatency.WithLabelValues(route, model),
		reserved:  m.tokensReserved.WithLabelValues(route, model),
		prompt:    m.promptTokens.WithLabelValues(route, model),
		inflight:  m.inflight.WithLabelValues(route, model),
		ok200:     m.upstreamStatus.WithLabelValues(route, model, "200"),
	}
}

// Admitted records an admitted request: its wait and what it reserved.
func (mm *Model) Admitted(wait time.Duration, promptTokens, reservedTokens int) {
	mm.admitted.Inc()
	mm.queueWait.Observe(wait.Seconds())
	mm.prompt.Add(float64(promptTokens))
	mm.reserved.Add(float64(reservedTokens))
}

// Outcome counts a request that was not admitted.
func (mm *Model) Outcome(outcome string) {
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
	}
}

// Inflight tracks a request being forwarded: +1 at start, -1 at the end.
func (mm *Model) Inflight(delta float64) { mm.inflight.Add(delta) }
