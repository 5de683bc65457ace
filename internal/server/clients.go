package server

import (
	"encoding/json"
	"maps"
	"net/http"
	"slices"
	"sort"
	"time"

	"github.com/llproxy/llproxy/internal/clients"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/price"
	"github.com/llproxy/llproxy/scheduler"
)

// The clients' view for operators: GET /clients (an admin endpoint), the
// scrape-time client series, and keeping their usage across restarts.

// clientQueue is one client's state in one (route, model) queue.
type clientQueue struct {
	Route    string         `json:"route"`
	Model    string         `json:"model"`
	Depth    int            `json:"queueDepth"`
	ByClass  map[string]int `json:"waitingByClass"`
	Queued   int            `json:"queuedTokens"`
	InFlight int            `json:"inFlight"`
}

// clientView is one client in GET /clients.
type clientView struct {
	Name   string   `json:"name"`
	Weight int      `json:"weight"`
	Class  string   `json:"class"`
	Routes []string `json:"routes,omitempty"`
	// ByClass is its requests waiting, per class.
	ByClass map[string]int `json:"waitingByClass"`
	// Depth is its requests waiting, per model (every route together);
	// Waiting the sum.
	Depth    map[string]int `json:"queueDepth"`
	Waiting  int            `json:"waiting"`
	InFlight int            `json:"inFlight"`
	// Spend is its spend in money today (UTC) and this month, what
	// requests in flight hold, and what is left of each budget in money,
	// in USD.
	Spend clientSpend `json:"spend"`
	// UsedToday is tokens used today (UTC) over every model; BudgetLeft
	// what is left of each daily budget.
	UsedToday  int64              `json:"tokensUsedToday"`
	BudgetLeft map[string]int64   `json:"budgetLeft"`
	Queues     []clientQueue      `json:"queues"`
	Models     []clients.ModelUse `json:"models"`
}

// clientSpend is a client's spend in GET /clients.
type clientSpend struct {
	TodayUSD     json.Number  `json:"todayUsd"`
	MonthUSD     json.Number  `json:"monthUsd"`
	ReservedUSD  json.Number  `json:"reservedUsd"`
	PerDayUSD    *json.Number `json:"usdPerDay,omitempty"`
	PerMonthUSD  *json.Number `json:"usdPerMonth,omitempty"`
	LeftTodayUSD *json.Number `json:"leftTodayUsd,omitempty"`
	LeftMonthUSD *json.Number `json:"leftMonthUsd,omitempty"`
}

func spendOf(c *clients.Client, now time.Time) clientSpend {
	day, month, held := c.SpendNow(now)
	bd, bm := c.MoneyBudgets()
	num := func(m price.Micro) *json.Number { n := json.Number(m.Decimal()); return &n }
	sp := clientSpend{TodayUSD: *num(day), MonthUSD: *num(month), ReservedUSD: *num(held)}
	if bd > 0 {
		sp.PerDayUSD, sp.LeftTodayUSD = num(bd), num(max(0, bd-day))
	}
	if bm > 0 {
		sp.PerMonthUSD, sp.LeftMonthUSD = num(bm), num(max(0, bm-month))
	}
	return sp
}

// clients is GET /clients: each client's queue depth per model, in-flight
// requests, tokens used today and what is left of its budgets.
func (s *Server) clients(w http.ResponseWriter) {
	now := time.Now()
	all := s.dir.All()
	views := make([]clientView, len(all))
	for i, c := range all {
		views[i] = clientView{Name: c.Name, Weight: c.Weight, Class: c.Class.String(), Routes: c.Routes(), Depth: map[string]int{},
			ByClass: map[string]int{"interactive": 0, "batch": 0}, BudgetLeft: map[string]int64{}, Queues: []clientQueue{},
			Models: c.Today(now), Spend: spendOf(c, now)}
		for _, m := range views[i].Models {
			views[i].UsedToday += m.Used
			if m.Left != nil {
				views[i].BudgetLeft[m.Model] = *m.Left
			}
		}
	}
	s.eachClientQueue(func(route string, q *scheduler.Queue, label string, id int, st scheduler.ClientStats) {
		v := &views[id]
		v.Depth[q.Model()] += st.Depth
		v.Waiting += st.Depth
		v.InFlight += st.InFlight
		byClass := map[string]int{}
		for c, n := range st.DepthBy {
			v.ByClass[scheduler.Class(c).String()] += n
			byClass[scheduler.Class(c).String()] = n
		}
		if st.Depth > 0 || st.InFlight > 0 {
			v.Queues = append(v.Queues, clientQueue{Route: route, Model: q.Model(), Depth: st.Depth, ByClass: byClass,
				Queued: st.Queued[scheduler.Tokens], InFlight: st.InFlight})
		}
	})
	for i := range views {
		sort.Slice(views[i].Queues, func(a, b int) bool {
			qa, qb := views[i].Queues[a], views[i].Queues[b]
			return qa.Route < qb.Route || (qa.Route == qb.Route && qa.Model < qb.Model)
		})
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(struct {
		Clients []clientView `json:"clients"`
	}{views})
}

// eachClientQueue calls f for every client of every queue.
func (s *Server) eachClientQueue(f func(route string, q *scheduler.Queue, label string, id int, st scheduler.ClientStats)) {
	for _, name := range s.sortedRouteNames() {
		s.routes[name].Queues(func(q *scheduler.Queue, label string) {
			q.Clients(func(id int, st scheduler.ClientStats) { f(name, q, label, id, st) })
		})
	}
}

// ClientStats implements metrics.ClientSource: every client of every
// queue with a series of its own (the models past the label bound are
// summed as "other").
func (s *Server) ClientStats(yield func(metrics.ClientStats)) {
	type key struct{ route, model, client string }
	other := map[key]*metrics.ClientStats{}
	var order []key
	s.eachClientQueue(func(route string, q *scheduler.Queue, label string, id int, st scheduler.ClientStats) {
		name := s.dir.All()[id].Name
		if label != metrics.OtherModel {
			yield(metrics.ClientStats{Route: route, Model: label, Client: name, Depth: st.Depth, InFlight: st.InFlight})
			return
		}
		k := key{route, label, name}
		o, ok := other[k]
		if !ok {
			o = &metrics.ClientStats{Route: route, Model: label, Client: name}
			other[k] = o
			order = append(order, k)
		}
		o.Depth += st.Depth
		o.InFlight += st.InFlight
	})
	for _, k := range order {
		yield(*other[k])
	}
}

// BudgetStats implements metrics.ClientSource: each client's use today,
// and each of its budgets, with a model label only for the models its
// limits name (client-chosen names make no series).
func (s *Server) BudgetStats(yield func(metrics.BudgetStats)) {
	now := time.Now()
	for _, c := range s.dir.All() {
		total := int64(0)
		budgets := map[string]*metrics.BudgetStats{}
		for _, m := range c.Today(now) {
			total += m.Used
			if m.Budget == 0 {
				continue
			}
			key := m.Model
			if !c.Lists(m.Model) {
				key = scheduler.Wildcard
			}
			if b, ok := budgets[key]; !ok || m.Used > b.Used {
				budgets[key] = &metrics.BudgetStats{Client: c.Name, Model: key, Used: m.Used, Budget: m.Budget}
			}
		}
		yield(metrics.BudgetStats{Client: c.Name, Used: total})
		day, month, _ := c.SpendNow(now)
		bd, bm := c.MoneyBudgets()
		if bd > 0 {
			yield(metrics.BudgetStats{Client: c.Name, Period: "day", BudgetUSD: bd.USD(), SpentUSD: day.USD()})
		}
		if bm > 0 {
			yield(metrics.BudgetStats{Client: c.Name, Period: "month", BudgetUSD: bm.USD(), SpentUSD: month.USD()})
		}
		for _, key := range slices.Sorted(maps.Keys(budgets)) {
			yield(*budgets[key])
		}
	}
}

// SaveState writes the clients' usage to the state file, if budgets are
// kept; Shutdown calls it once the last request settled.
func (s *Server) SaveState() {
	if s.statePath == "" {
		return
	}
	if err := s.dir.Save(s.statePath, time.Now()); err != nil {
		s.log.Error("saving the clients' usage", "error", err)
	}
}

// sharedChanged follows the shared limits' mode: while Redis is down under
// onRedisDown split, every queue enforces this replica's share of its
// limits (1 / the replicas last seen alive); when it answers again, all.
func (s *Server) sharedChanged(degraded bool) {
	share := s.shared.LocalShare()
	now := time.Now()
	for _, rt := range s.routes {
		rt.Queues(func(q *scheduler.Queue, _ string) { q.Share(now, share) })
	}
}
