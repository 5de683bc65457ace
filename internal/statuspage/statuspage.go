// Package statuspage is llproxy's live status page: one self-contained
// page (embedded, no CDN) and the JSON it polls every second, read from
// the routes' queues, metrics and fleets, with a few minutes of admitted
// and refused counts kept to draw.
//
// It exists apart from the HTTP front so that the page, its state and its
// history, which live across config reloads, are one piece.
package statuspage

import (
	_ "embed"
	"encoding/json"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/llproxy/llproxy/internal/models"
	"github.com/llproxy/llproxy/internal/route"
	"github.com/llproxy/llproxy/scheduler"
)

//go:embed index.html
var page []byte

//go:embed app.js
var script []byte

// Page serves the status page of the routes that routes returns (the
// current ones: a reload changes them, the page and its history stay).
type Page struct {
	routes  func() []*route.Route
	history uiHistory
}

// New returns the page of the routes routes returns, in order.
func New(routes func() []*route.Route) *Page { return &Page{routes: routes} }

// historyLen is how many seconds of admitted/refused counts the page shows.
const historyLen = 300

// uiHistory keeps, per (route, model), the requests admitted and refused
// in each of the last historyLen seconds, sampled from the cumulative
// counts whenever the state is asked for (and every second while Run runs).
type uiHistory struct {
	mu     sync.Mutex
	last   time.Time
	series map[string]*uiSeries
}

type uiSeries struct {
	admitted, rejected []int64 // per second, oldest first
	lastA, lastR       int64
	at                 time.Time
}

// prune forgets the series not sampled for historyLen seconds: a model
// whose queue is gone (retired, reloaded away) shows nothing anyway.
func (h *uiHistory) prune(now time.Time) {
	for k, s := range h.series {
		if now.Sub(s.at) > historyLen*time.Second {
			delete(h.series, k)
		}
	}
}

func (h *uiHistory) sample(now time.Time, key string, admitted, rejected int64) *uiSeries {
	if h.series == nil {
		h.series = map[string]*uiSeries{}
	}
	s := h.series[key]
	if s == nil {
		s = &uiSeries{lastA: admitted, lastR: rejected, at: now}
		h.series[key] = s
		return s
	}
	secs := int(now.Sub(s.at) / time.Second)
	if secs < 1 {
		return s
	}
	// What happened since the last sample, in its last second; idle
	// seconds before it are zeros.
	for range min(secs-1, historyLen) {
		s.admitted, s.rejected = append(s.admitted, 0), append(s.rejected, 0)
	}
	s.admitted, s.rejected = append(s.admitted, admitted-s.lastA), append(s.rejected, rejected-s.lastR)
	if n := len(s.admitted); n > historyLen {
		s.admitted, s.rejected = s.admitted[n-historyLen:], s.rejected[n-historyLen:]
	}
	s.lastA, s.lastR, s.at = admitted, rejected, s.at.Add(time.Duration(secs)*time.Second)
	return s
}

type uiBucket struct {
	Remaining float64 `json:"remaining"`
	Limit     int     `json:"limit"`
}

type uiClass struct {
	Class         string  `json:"class"`
	Waiting       int     `json:"waiting"`
	AdmittedPerS  float64 `json:"admittedPerSecond"`
	Oldest        float64 `json:"oldestWait"`
	PredictedWait float64 `json:"predictedWait"`
}

type uiNamedBucket struct {
	Name      string  `json:"name"`
	Remaining float64 `json:"remaining"`
	Limit     int     `json:"limit"`
}

type uiModel struct {
	Model         string         `json:"model"`
	Depth         int            `json:"depth"`
	ByClient      map[string]int `json:"byClient"`
	InFlight      int            `json:"inFlight"`
	PredictedWait float64        `json:"predictedWait"`
	MaxQueueWait  float64        `json:"maxQueueWait"`
	Requests      uiBucket       `json:"requests"`
	Tokens        uiBucket       `json:"tokens"`
	// Buckets are the model's token buckets: tokens, or input and
	// output apart.
	Buckets []uiNamedBucket `json:"buckets"`
	// Classes are its classes: waiting, the oldest wait and a newcomer's
	// predicted wait, in seconds; Headroom the fraction of each bucket
	// batch leaves.
	Classes   []uiClass `json:"classes"`
	Headroom  float64   `json:"batchHeadroom"`
	LatencyMs float64   `json:"latencyMs"`
	Admitted  []int64   `json:"admitted"`
	Rejected  []int64   `json:"rejected"`
}

type uiBackend struct {
	Name     string   `json:"name"`
	URL      string   `json:"url"`
	Healthy  bool     `json:"healthy"`
	InFlight int64    `json:"inFlight"`
	Models   []string `json:"models"`
	Managed  bool     `json:"managed"`
	State    string   `json:"state,omitempty"`
	IdleFor  string   `json:"idleFor,omitempty"`
}

type uiRoute struct {
	Name     string      `json:"name"`
	Models   []uiModel   `json:"models"`
	Backends []uiBackend `json:"backends,omitempty"`
}

// ServeState answers the page's poll: every route and model, now.
func (p *Page) ServeState(w http.ResponseWriter, r *http.Request) {
	now := time.Now()
	p.history.mu.Lock()
	out := struct {
		Time   time.Time `json:"time"`
		Routes []uiRoute `json:"routes"`
	}{Time: now, Routes: []uiRoute{}}
	for _, rt := range p.routes() {
		ur := uiRoute{Name: rt.Name(), Models: []uiModel{}}
		rt.Models(func(ms *models.Model) {
			q := ms.Queue
			st := q.Stats(now)
			c := q.Config()
			m := uiModel{Model: q.Model(), Depth: st.Depth, ByClient: map[string]int{}, InFlight: st.InFlight,
				PredictedWait: st.PredictedWait.Seconds(), MaxQueueWait: time.Duration(c.MaxQueueWait).Seconds(),
				Requests: uiBucket{st.Remaining[scheduler.Requests], c.RPM}, Tokens: uiBucket{st.Remaining[scheduler.Tokens], c.TPM},
				Buckets: tokenBuckets(&st), Headroom: c.BatchHeadroom,
				LatencyMs: float64(ms.Metrics.Latency().Microseconds()) / 1000}
			totals := ms.Metrics.ClassTotals()
			for cl := range scheduler.NumClasses {
				name := scheduler.Class(cl).String()
				series := p.history.sample(now, rt.Name()+"\x00"+q.Model()+"\x00"+name, totals[cl], 0)
				m.Classes = append(m.Classes, uiClass{Class: name, Waiting: st.DepthBy[cl], AdmittedPerS: recentRate(series.admitted),
					Oldest: st.Oldest[cl].Seconds(), PredictedWait: st.PredictedWaitBy[cl].Seconds()})
			}
			q.Clients(func(_ int, cs scheduler.ClientStats) {
				if cs.Depth > 0 {
					m.ByClient[cs.Name] = cs.Depth
				}
			})
			a, rej := ms.Metrics.Totals()
			series := p.history.sample(now, rt.Name()+"\x00"+q.Model(), a, rej)
			m.Admitted, m.Rejected = append([]int64{}, series.admitted...), append([]int64{}, series.rejected...)
			ur.Models = append(ur.Models, m)
		})
		sort.Slice(ur.Models, func(i, j int) bool { return ur.Models[i].Model < ur.Models[j].Model })
		if f := rt.Fleet(); f != nil {
			managed := map[string]uiBackend{}
			for _, sv := range f.Servers() {
				managed[sv.Name] = uiBackend{Managed: true, State: string(sv.State), IdleFor: sv.IdleFor}
			}
			for _, b := range f.Health(r.Context(), false) {
				ub := uiBackend{Name: b.Name, URL: b.URL, Healthy: b.Healthy, InFlight: b.InFlight, Models: b.Models}
				if m, ok := managed[b.Name]; ok {
					ub.Managed, ub.State, ub.IdleFor = true, m.State, m.IdleFor
				}
				ur.Backends = append(ur.Backends, ub)
			}
		}
		out.Routes = append(out.Routes, ur)
	}
	p.history.prune(now)
	p.history.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	json.NewEncoder(w).Encode(out)
}

// csp lets the page run only its own script (no inline one) and never be
// framed by another site.
const csp = "default-src 'self'; script-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'none'"

// ServeHTML serves the page.
func (p *Page) ServeHTML(w http.ResponseWriter, _ *http.Request) {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("Content-Security-Policy", csp)
	h.Set("X-Frame-Options", "DENY")
	w.Write(page)
}

// ServeScript serves the page's script.
func (p *Page) ServeScript(w http.ResponseWriter, _ *http.Request) {
	h := w.Header()
	h.Set("Content-Type", "text/javascript; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	w.Write(script)
}

// tokenBuckets are a queue's token buckets, as the page names them.
func tokenBuckets(st *scheduler.Stats) []uiNamedBucket {
	out := []uiNamedBucket{}
	for _, b := range [...]struct {
		r    scheduler.Resource
		name string
	}{{scheduler.Tokens, "tokens"}, {scheduler.InputTokens, "input"}, {scheduler.OutputTokens, "output"}} {
		if st.Limit[b.r] > 0 {
			out = append(out, uiNamedBucket{Name: b.name, Remaining: st.Remaining[b.r], Limit: st.Limit[b.r]})
		}
	}
	return out
}

// recentRate is the mean per second over the last ten seconds of a
// series (fewer while it is young).
func recentRate(perSecond []int64) float64 {
	n := min(10, len(perSecond))
	if n == 0 {
		return 0
	}
	sum := int64(0)
	for _, v := range perSecond[len(perSecond)-n:] {
		sum += v
	}
	return float64(sum) / float64(n)
}
