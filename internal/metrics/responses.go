package metrics

import (
	"strconv"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// Responses counts a route's answers by HTTP status (the gateway's own and
// the upstream's as they reached the client). Each (route, status) child
// is looked up once.
type Responses struct {
	vec   *prometheus.CounterVec
	route string
	codes [600]atomic.Pointer[prometheus.Counter]
}

func newResponsesVec() *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "http_responses_total",
		Help: "Responses to clients by route and HTTP status (route \"\" for those answered before a route: 401, 404).",
	}, []string{"route", "code"})
}

// Responses returns the response counters of route.
func (m *Metrics) Responses(route string) *Responses {
	return &Responses{vec: m.responses, route: route}
}

// Count counts one response with status code.
func (r *Responses) Count(code int) {
	if code < 100 || code >= len(r.codes) {
		r.vec.WithLabelValues(r.route, strconv.Itoa(code)).Inc()
		return
	}
	c := r.codes[code].Load()
	if c == nil {
		ctr := r.vec.WithLabelValues(r.route, strconv.Itoa(code))
		r.codes[code].CompareAndSwap(nil, &ctr)
		c = r.codes[code].Load()
	}
	(*c).Inc()
}

// BuildInfo registers llproxy_build_info{version,goversion} 1 on reg.
func BuildInfo(reg prometheus.Registerer, version, goVersion string) error {
	g := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: "build_info",
		Help:        "1, labelled with the version llproxy was built from and the Go it was built with.",
		ConstLabels: prometheus.Labels{"version": version, "goversion": goVersion}})
	g.Set(1)
	return reg.Register(g)
}
