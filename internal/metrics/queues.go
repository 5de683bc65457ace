package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
)

// QueueStats is one queue's state at scrape time.
type QueueStats struct {
	Route, Model string
	// Depth is how many wait, in all; Classes by class.
	Depth        int
	Classes      []ClassStats
	QueuedTokens int
	// Promoted counts the batch requests admitted as interactive for
	// their age.
	Promoted float64
	// Buckets are the model's buckets, one per resource it is limited in.
	Buckets []BucketStats
	// PredictedWait is a newcomer's predicted wait, MaxWait the model's
	// maxQueueWait, in seconds.
	PredictedWait, MaxWait float64
	// Folded is the sum of the queues of models past the label bound,
	// reported as model "other": depth and queued tokens only.
	Folded bool
}

// ClassStats is one class of a queue: how many of it wait, how long the
// oldest has waited, and a newcomer of it would wait, in seconds.
type ClassStats struct {
	Class                 string
	Depth                 int
	Oldest, PredictedWait float64
}

// BucketStats is one bucket of a queue: its resource ("requests",
// "tokens", ...), what it holds now, its per-minute limit and its refill
// rate per minute now.
type BucketStats struct {
	Resource                 string
	Remaining, Limit, Refill float64
}

// QueueSource lists every queue's state; the server implements it over the
// scheduler.
type QueueSource interface {
	QueueStats(yield func(QueueStats))
}

// queueCollector reads the queues at scrape time.
type queueCollector struct {
	src                                             QueueSource
	depth, queuedTokens, remaining, limitDs, refill *prometheus.Desc
	predicted, maxWait, oldest, promoted            *prometheus.Desc
}

func newQueueCollector(src QueueSource) *queueCollector {
	labels := []string{"route", "model"}
	return &queueCollector{
		src: src,
		depth: prometheus.NewDesc("llproxy_queue_depth",
			"Requests waiting in the (route, model) queue, by class (interactive, batch).", append(labels, "class"), nil),
		oldest: prometheus.NewDesc("llproxy_queue_oldest_wait_seconds",
			"How long the longest-waiting request of the class has waited.", append(labels, "class"), nil),
		promoted: prometheus.NewDesc("llproxy_batch_promoted_total",
			"Batch requests admitted as interactive for having waited the model's batchMaxAge (the starvation bound), since the queue was made.",
			labels, nil),
		queuedTokens: prometheus.NewDesc("llproxy_queue_tokens",
			"Tokens the waiting requests of the queue will take when admitted.", labels, nil),
		remaining: prometheus.NewDesc("llproxy_bucket_remaining",
			"What the gateway's bucket holds now, by resource (requests, tokens, input_tokens, output_tokens).", append(labels, "resource"), nil),
		limitDs: prometheus.NewDesc("llproxy_bucket_limit",
			"The bucket's per-minute limit (its capacity), by resource.", append(labels, "resource"), nil),
		predicted: prometheus.NewDesc("llproxy_queue_predicted_wait_seconds",
			"How long a newcomer to the queue would wait now, as predicted.", labels, nil),
		maxWait: prometheus.NewDesc("llproxy_queue_max_wait_seconds",
			"The model's maxQueueWait: a request predicted to wait longer gets a 429.", labels, nil),
		refill: prometheus.NewDesc("llproxy_bucket_refill_per_minute",
			"The bucket's refill rate now: the limit less what others are estimated to spend of the upstream's, by resource.",
			append(labels, "resource"), nil),
	}
}

func (c *queueCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.depth
	ch <- c.oldest
	ch <- c.promoted
	ch <- c.queuedTokens
	ch <- c.remaining
	ch <- c.limitDs
	ch <- c.refill
	ch <- c.predicted
	ch <- c.maxWait
}

func (c *queueCollector) Collect(ch chan<- prometheus.Metric) {
	if c.src == nil {
		return
	}
	c.src.QueueStats(func(s QueueStats) {
		for _, cl := range s.Classes {
			ch <- prometheus.MustNewConstMetric(c.depth, prometheus.GaugeValue, float64(cl.Depth), s.Route, s.Model, cl.Class)
		}
		ch <- prometheus.MustNewConstMetric(c.queuedTokens, prometheus.GaugeValue, float64(s.QueuedTokens), s.Route, s.Model)
		if s.Folded {
			return
		}
		for _, cl := range s.Classes {
			ch <- prometheus.MustNewConstMetric(c.oldest, prometheus.GaugeValue, cl.Oldest, s.Route, s.Model, cl.Class)
		}
		ch <- prometheus.MustNewConstMetric(c.promoted, prometheus.CounterValue, s.Promoted, s.Route, s.Model)
		for _, b := range s.Buckets {
			ch <- prometheus.MustNewConstMetric(c.remaining, prometheus.GaugeValue, b.Remaining, s.Route, s.Model, b.Resource)
			ch <- prometheus.MustNewConstMetric(c.limitDs, prometheus.GaugeValue, b.Limit, s.Route, s.Model, b.Resource)
			ch <- prometheus.MustNewConstMetric(c.refill, prometheus.GaugeValue, b.Refill, s.Route, s.Model, b.Resource)
		}
		ch <- prometheus.MustNewConstMetric(c.predicted, prometheus.GaugeValue, s.PredictedWait, s.Route, s.Model)
		ch <- prometheus.MustNewConstMetric(c.maxWait, prometheus.GaugeValue, s.MaxWait, s.Route, s.Model)
	})
}

// BackendStats is one fleet backend's state at scrape time.
type BackendStats struct {
	Route, Backend string
	Healthy        bool
	InFlight       int64
	Errors         int
}

// BackendSource lists every fleet backend; the server implements it.
type BackendSource interface {
	BackendStats(yield func(BackendStats))
}

type backendCollector struct {
	src                       BackendSource
	healthy, inflight, errors *prometheus.Desc
}

func newBackendCollector(src BackendSource) *backendCollector {
	labels := []string{"route", "backend"}
	return &backendCollector{
		src:      src,
		healthy:  prometheus.NewDesc("llproxy_backend_healthy", "1 if the fleet backend is healthy (gets traffic and is listed), else 0.", labels, nil),
		inflight: prometheus.NewDesc("llproxy_backend_inflight", "Requests sent to the backend and not yet finished.", labels, nil),
		errors:   prometheus.NewDesc("llproxy_backend_errors_total", "Failed health checks and connection failures of the backend.", labels, nil),
	}
}

func (c *backendCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.healthy
	ch <- c.inflight
	ch <- c.errors
}

func (c *backendCollector) Collect(ch chan<- prometheus.Metric) {
	if c.src == nil {
		return
	}
	c.src.BackendStats(func(s BackendStats) {
		h := 0.0
		if s.Healthy {
			h = 1
		}
		ch <- prometheus.MustNewConstMetric(c.healthy, prometheus.GaugeValue, h, s.Route, s.Backend)
		ch <- prometheus.MustNewConstMetric(c.inflight, prometheus.GaugeValue, float64(s.InFlight), s.Route, s.Backend)
		ch <- prometheus.MustNewConstMetric(c.errors, prometheus.CounterValue, float64(s.Errors), s.Route, s.Backend)
	})
}
