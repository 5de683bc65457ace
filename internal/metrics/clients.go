package metrics

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Clients' series: who was admitted, refused and why, the tokens each
// used, each one's queue depth and in-flight requests, and its daily
// budgets. The client label is bounded by the configured clients (keys of
// clientKeys are key-1, key-2, ...; without keys, "anonymous").

// OutcomeRejectBudget is a request refused because its client's daily
// budget for the model is used up; OutcomeForbidden one whose client may
// not use the route.
const (
	OutcomeRejectBudget = "rejected_budget"
	OutcomeForbidden    = "forbidden"
	// OutcomeSharedDown is a request refused because the shared limits
	// cannot be reached (onRedisDown: deny).
	OutcomeSharedDown = "rejected_shared_down"
)

// clientOutcomes are the outcomes whose children are made up front.
var clientOutcomes = []string{OutcomeAdmitted, OutcomeRejectQueueFull, OutcomeRejectWait, OutcomeRejectTooLarge,
	OutcomeCancelled, OutcomeShuttingDown, OutcomeRejectUpstream, OutcomeRejectBudget, OutcomeForbidden, OutcomeSharedDown}

type clientVecs struct {
	requests *prometheus.CounterVec
	used     *prometheus.CounterVec
}

func newClientVecs() clientVecs {
	return clientVecs{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "client_requests_total",
			Help: "Scheduled requests by client and outcome (the outcomes of llproxy_requests_total, and rejected_budget, forbidden).",
		}, []string{"route", "client", "outcome"}),
		used: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "client_tokens_used_total",
			Help: "Tokens a client's requests used (prompt + completion, as the upstream reported), by route.",
		}, []string{"route", "client"}),
	}
}

// Client is the series of one (route, client), looked up once.
type Client struct {
	vecs          clientVecs
	route, client string
	outcomes      map[string]prometheus.Counter
	used          prometheus.Counter
	mu            sync.Mutex // guards others
	others        map[string]prometheus.Counter
}

// Client returns the series of client on route.
func (m *Metrics) Client(route, client string) *Client {
	c := &Client{vecs: m.clients, route: route, client: client, outcomes: map[string]prometheus.Counter{},
		used: m.clients.used.WithLabelValues(route, client)}
	for _, o := range clientOutcomes {
		c.outcomes[o] = m.clients.requests.WithLabelValues(route, client, o)
	}
	return c
}

// Outcome counts a request of the client by outcome.
func (c *Client) Outcome(outcome string) {
	if ctr, ok := c.outcomes[outcome]; ok {
		ctr.Inc()
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.others == nil {
		c.others = map[string]prometheus.Counter{}
	}
	ctr, ok := c.others[outcome]
	if !ok {
		ctr = c.vecs.requests.WithLabelValues(c.route, c.client, outcome)
		c.others[outcome] = ctr
	}
	ctr.Inc()
}

// Used counts tokens the client's request used.
func (c *Client) Used(tokens int) { c.used.Add(float64(max(0, tokens))) }

// ClientStats is one client's state in one queue at scrape time.
type ClientStats struct {
	Route, Model, Client string
	Depth, InFlight      int
}

// BudgetStats is a client's use today: of every model together (Model
// "", Budget 0), or of one budget ("*": the one budget of every model
// its "*" limits cover).
type BudgetStats struct {
	Client, Model string
	Used          int64
	Budget        int64
	// Period, when set ("day", "month"), makes it a budget in money
	// instead: BudgetUSD, and SpentUSD of it in the period.
	Period              string
	BudgetUSD, SpentUSD float64
}

// ClientSource lists the clients' state; the server implements it.
type ClientSource interface {
	ClientStats(yield func(ClientStats))
	BudgetStats(yield func(BudgetStats))
}

type clientCollector struct {
	src                                             ClientSource
	depth, inflight, used, budgetUsed, left, budget *prometheus.Desc
	budgetUSD, leftUSD                              *prometheus.Desc
}

func newClientCollector(src ClientSource) *clientCollector {
	return &clientCollector{
		src: src,
		depth: prometheus.NewDesc("llproxy_client_queue_depth",
			"Requests of the client waiting in the (route, model) queue.", []string{"route", "model", "client"}, nil),
		inflight: prometheus.NewDesc("llproxy_client_inflight_requests",
			"Requests of the client admitted to the (route, model) queue and not yet done.", []string{"route", "model", "client"}, nil),
		used: prometheus.NewDesc("llproxy_client_tokens_used_today",
			"Tokens the client used today (UTC), every model together, as settled.", []string{"client"}, nil),
		budgetUsed: prometheus.NewDesc("llproxy_client_budget_used_tokens",
			"What the client used today of its daily token budget for the model (model \"*\": every model it covers, together).",
			[]string{"client", "model"}, nil),
		budget: prometheus.NewDesc("llproxy_client_budget_tokens",
			"The client's daily token budget (tokensPerDay) for the model.", []string{"client", "model"}, nil),
		budgetUSD: prometheus.NewDesc("llproxy_client_budget_usd",
			"The client's budget in money for the period (day, month), in USD.", []string{"client", "period"}, nil),
		leftUSD: prometheus.NewDesc("llproxy_client_budget_left_usd",
			"What is left of the client's budget in money in the period now, in USD.", []string{"client", "period"}, nil),
		left: prometheus.NewDesc("llproxy_client_budget_left_tokens",
			"What is left of the client's daily token budget for the model today (model \"*\": the one budget of every model it covers).",
			[]string{"client", "model"}, nil),
	}
}

func (c *clientCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.depth, c.inflight, c.used, c.budgetUsed, c.budget, c.left, c.budgetUSD, c.leftUSD} {
		ch <- d
	}
}

func (c *clientCollector) Collect(ch chan<- prometheus.Metric) {
	c.src.ClientStats(func(s ClientStats) {
		ch <- prometheus.MustNewConstMetric(c.depth, prometheus.GaugeValue, float64(s.Depth), s.Route, s.Model, s.Client)
		ch <- prometheus.MustNewConstMetric(c.inflight, prometheus.GaugeValue, float64(s.InFlight), s.Route, s.Model, s.Client)
	})
	c.src.BudgetStats(func(s BudgetStats) {
		if s.Period != "" {
			ch <- prometheus.MustNewConstMetric(c.budgetUSD, prometheus.GaugeValue, s.BudgetUSD, s.Client, s.Period)
			ch <- prometheus.MustNewConstMetric(c.leftUSD, prometheus.GaugeValue, max(0, s.BudgetUSD-s.SpentUSD), s.Client, s.Period)
			return
		}
		if s.Model == "" {
			ch <- prometheus.MustNewConstMetric(c.used, prometheus.GaugeValue, float64(s.Used), s.Client)
			return
		}
		if s.Budget > 0 {
			ch <- prometheus.MustNewConstMetric(c.budgetUsed, prometheus.GaugeValue, float64(s.Used), s.Client, s.Model)
			ch <- prometheus.MustNewConstMetric(c.budget, prometheus.GaugeValue, float64(s.Budget), s.Client, s.Model)
			ch <- prometheus.MustNewConstMetric(c.left, prometheus.GaugeValue, float64(max(0, s.Budget-s.Used)), s.Client, s.Model)
		}
	})
}
