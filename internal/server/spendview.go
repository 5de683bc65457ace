package server

import (
	"context"
	"encoding/json"
	"net/http"
	"sort"
	"time"

	"github.com/llproxy/llproxy/internal/ledger"
)

// The status page's spend view: each client's spend today and this month
// against its budgets in money (live, from the clients' ledger of cash),
// and this month's spend per day and client (from the usage ledger).

// spendClient is one client in the spend view.
type spendClient struct {
	Name string `json:"name"`
	clientSpend
}

// spendDay is one client's spend on one day of this month.
type spendDay struct {
	Day     string      `json:"day"`
	Client  string      `json:"client"`
	CostUSD json.Number `json:"costUsd"`
}

// spendView is GET /ui/spend.
type spendView struct {
	Month   string        `json:"month"`
	Clients []spendClient `json:"clients"`
	// Days is this month's spend per day and client; null when there is
	// no usage ledger (or it could not be read: Error says why).
	Days  []spendDay `json:"days"`
	Error string     `json:"error,omitempty"`
}

// spend serves the status page's spend view.
func (s *Server) spend(w http.ResponseWriter, r *http.Request) {
	now := time.Now().UTC()
	out := spendView{Month: now.Format("2006-01"), Clients: []spendClient{}}
	for _, c := range s.dir.All() {
		out.Clients = append(out.Clients, spendClient{Name: c.Name, clientSpend: spendOf(c, now)})
	}
	sort.Slice(out.Clients, func(i, j int) bool { return out.Clients[i].Name < out.Clients[j].Name })
	if s.ledger != nil {
		days, err := s.spendByDay(r.Context(), now)
		out.Days = days
		if err != nil {
			out.Error = "the usage ledger could not be read: " + err.Error()
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	json.NewEncoder(w).Encode(out)
}

// spendByDay is this month's spend per (day, client), days in order.
func (s *Server) spendByDay(ctx context.Context, now time.Time) ([]spendDay, error) {
	q, err := ledger.ParseQuery("", "", "day,client", now)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	groups, err := s.ledger.Store().Sum(ctx, q)
	if err != nil {
		return nil, err
	}
	days := make([]spendDay, 0, len(groups))
	for _, g := range groups {
		if g.Cost == 0 && g.Keys["client"] == "" {
			continue // the gateway's own refusals of unknown callers
		}
		days = append(days, spendDay{Day: g.Keys["day"], Client: g.Keys["client"], CostUSD: json.Number(g.Cost.Decimal())})
	}
	sort.SliceStable(days, func(i, j int) bool { return days[i].Day < days[j].Day })
	return days, nil
}
