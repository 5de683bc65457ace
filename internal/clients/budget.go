package clients

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/llproxy/llproxy/internal/price"
	"github.com/llproxy/llproxy/scheduler"
)

// Daily budgets: a client's tokens used per model and UTC day, settled
// from what the upstream reports, so refunds count. A request holds its
// estimated cost against the budget from admission to settlement (a Spend),
// so that concurrent requests cannot all slip under it; it is refused once
// what is used and held reaches the budget.

// maxModels bounds the models a client's usage is kept for (model names
// come from clients); past it, new models share one entry.
const maxModels = 1000

// otherModels is the entry of the models past maxModels.
const otherModels = "*other*"

// usage is a client's use of one model on one day.
type usage struct {
	day    int64 // UTC days since the epoch
	used   int64 // tokens settled
	held   int64 // tokens of admitted requests not yet settled
	synced time.Time
}

// dayOf is the UTC day of t, counted from the epoch.
func dayOf(t time.Time) int64 {
	s := t.Unix()
	if s < 0 {
		return (s+1)/86400 - 1
	}
	return s / 86400
}

// nextDay is when the UTC day of t ends.
func nextDay(t time.Time) time.Time {
	return time.Unix((dayOf(t)+1)*86400, 0).UTC()
}

// entry returns c's usage of model today. c.mu is held.
func (c *Client) entry(model string, now time.Time) *usage {
	today := dayOf(now)
	u, ok := c.led.usage[model]
	if !ok {
		if len(c.led.usage) >= maxModels {
			for m, old := range c.led.usage {
				if old.day != today && old.held == 0 {
					delete(c.led.usage, m) // yesterday's, done with
				}
			}
		}
		if len(c.led.usage) >= maxModels {
			model = otherModels
			if u, ok = c.led.usage[model]; ok {
				return c.roll(u, today)
			}
		}
		u = &usage{day: today}
		c.led.usage[model] = u
	}
	return c.roll(u, today)
}

// roll starts u over on a new day.
func (c *Client) roll(u *usage, today int64) *usage {
	if u.day != today {
		u.day, u.used, u.held = today, 0, 0
	}
	return u
}

// Exhausted is a request refused because its client's daily budget cannot
// pay for it: what is used today plus the request's reservation is over it.
type Exhausted struct {
	Client, Model string // Model is the budget's: a model, or "*" for every model it covers
	Budget, Used  int64
	Requested     int64
	Reset         time.Time // when the budget starts over
}

// ResetAt is when the budget starts over.
func (e *Exhausted) ResetAt() time.Time { return e.Reset }

func (e *Exhausted) Error() string {
	return fmt.Sprintf("You exceeded your current quota: client %s has used %d of its %d tokens per day for %s; "+
		"this request reserves %d. The budget resets at %s (UTC midnight).",
		e.Client, e.Used, e.Budget, budgetName(e.Model), e.Requested, e.Reset.Format(time.RFC3339))
}

// Reserved is a request refused only because requests in flight hold the
// rest of the budget: it may fit once they settle, so it is worth a retry
// soon.
type Reserved struct {
	Client, Model                 string
	Budget, Used, Held, Requested int64
}

// RetryAfter is how soon a retry may fit: requests in flight settle
// within seconds, usually for less than they hold.
func (e *Reserved) RetryAfter() time.Duration { return time.Second }

func (e *Reserved) Error() string {
	return fmt.Sprintf("Budget reserved: client %s has used %d of its %d tokens per day for %s and requests in flight "+
		"hold %d more; this request reserves %d. Retry when they finish.",
		e.Client, e.Used, e.Budget, budgetName(e.Model), e.Held, e.Requested)
}

func budgetName(model string) string {
	if model == "*" {
		return "every model its * limits cover"
	}
	return model
}

// Spend is a request's hold on its client's daily budget: taken by
// Reserve, ended once by Settle (what the upstream reports it used) or
// Release (it used nothing that counts). Release after Settle does
// nothing, so a caller defers Release where it reserves. The zero Spend
// does nothing.
type Spend struct {
	c    *Client
	u    *usage
	day  int64
	held int64
	key  string   // the budget's ledger entry: the model, or "*"
	cash cashHold // its hold on the budgets in money
}

// budgetKey is the ledger entry a request for model counts in, and its
// daily budget (0: none): a model the client's limits list is a budget of
// its own; every other model that a "*" budget covers shares that one
// budget, entry "*", so a new model name is not a fresh budget.
func (c *Client) budgetKey(model string) (string, int64) {
	if c.cfg == nil {
		return model, 0
	}
	if l, ok := c.cfg.Limits[model]; ok && model != scheduler.Wildcard {
		if l == nil {
			return model, 0
		}
		return model, l.TokensPerDay
	}
	if l := c.cfg.Limits[scheduler.Wildcard]; l != nil && l.TokensPerDay > 0 {
		return scheduler.Wildcard, l.TokensPerDay
	}
	return model, 0
}

// Reserve holds cost tokens of c's budget for model at now, and money
// (the request's most expensive outcome) of its budgets in money. It
// admits only if what is used, what requests in flight hold and this
// request together fit every budget: over one by what is used alone, an
// *Exhausted (tokens) or *Overspent (money); only because of what is
// held, a *Reserved or *CashReserved. A refusal holds nothing. A client
// without budgets is only counted.
func (c *Client) Reserve(now time.Time, model string, cost int, money price.Micro) (Spend, error) {
	key, budget := c.budgetKey(model)
	if budget > 0 && c.store != nil {
		c.sync(now, key)
	}
	if c.store != nil && c.HasMoneyBudget() {
		c.syncCash(now)
	}
	c.led.mu.Lock()
	defer c.led.mu.Unlock()
	u := c.entry(key, now)
	need := int64(max(0, cost))
	if budget > 0 && u.used+need > budget {
		return Spend{}, &Exhausted{Client: c.Name, Model: key, Budget: budget, Used: u.used, Requested: need, Reset: nextDay(now)}
	}
	if budget > 0 && u.used+u.held+need > budget {
		return Spend{}, &Reserved{Client: c.Name, Model: key, Budget: budget, Used: u.used, Held: u.held, Requested: need}
	}
	hold, err := c.reserveCash(now, money)
	if err != nil {
		return Spend{}, err
	}
	u.held += need
	return Spend{c: c, u: u, day: u.day, held: need, key: key, cash: hold}, nil
}

// Settle ends the hold and counts used tokens, and cost in money, as
// spent now.
func (s *Spend) Settle(now time.Time, used int, cost price.Micro) {
	if s.c == nil {
		return
	}
	c := s.c
	s.c = nil
	c.led.mu.Lock()
	s.end(c)
	u := c.roll(s.u, dayOf(now))
	u.used += int64(max(0, used))
	c.spend(now, cost)
	c.led.mu.Unlock()
	if c.dirty != nil {
		c.dirty.Store(true)
	}
	if c.store != nil && used > 0 && c.Budget(s.key) > 0 {
		c.record(now, s.key, int64(used), u) // written with the next pipeline
	}
	if c.store != nil && cost > 0 && c.HasMoneyBudget() {
		c.recordCash(now, cost)
	}
}

// Release ends the hold, counting nothing.
func (s *Spend) Release() {
	if s.c == nil {
		return
	}
	s.c.led.mu.Lock()
	s.end(s.c)
	s.c.led.mu.Unlock()
	s.c = nil
}

// end gives the holds back, if their periods are still the entries'.
// c.mu is held.
func (s *Spend) end(c *Client) {
	if s.u.day == s.day {
		s.u.held = max(0, s.u.held-s.held)
	}
	s.cash.end(c)
}

// ModelUse is a client's use of one model today.
type ModelUse struct {
	Model string `json:"model"`
	// Used is tokens used today; Held is what admitted requests hold.
	Used int64 `json:"tokensUsedToday"`
	Held int64 `json:"tokensHeld"`
	// Budget is the daily budget (0: none); Left what remains of it.
	Budget int64  `json:"tokensPerDay,omitempty"`
	Left   *int64 `json:"budgetLeft,omitempty"`
}

// Today returns c's use of every model today, by model name, including
// the models it has a budget for and has not used.
func (c *Client) Today(now time.Time) []ModelUse {
	today := dayOf(now)
	c.led.mu.Lock()
	byModel := map[string]ModelUse{}
	for m, u := range c.led.usage {
		if u.day == today {
			byModel[m] = ModelUse{Model: m, Used: u.used, Held: u.held}
		}
	}
	c.led.mu.Unlock()
	if c.cfg != nil {
		for m, l := range c.cfg.Limits {
			if _, ok := byModel[m]; !ok && l != nil && l.TokensPerDay > 0 {
				byModel[m] = ModelUse{Model: m}
			}
		}
	}
	out := make([]ModelUse, 0, len(byModel))
	for _, m := range slices.Sorted(maps.Keys(byModel)) {
		mu := byModel[m]
		if mu.Budget = c.Budget(m); mu.Budget > 0 {
			left := max(0, mu.Budget-mu.Used)
			mu.Left = &left
		}
		out = append(out, mu)
	}
	return out
}

// Store is a record of the clients' daily use shared by replicas (Redis):
// each one's spend adds up there, and each replica reads the total.
type Store interface {
	AddBudget(ctx context.Context, client, model, day string, tokens int64) (int64, error)
	// AddBudgetLater is AddBudget written with other requests' in one
	// round trip; done gets the total, or the error.
	AddBudgetLater(client, model, day string, tokens int64, done func(total int64, err error))
	Budget(ctx context.Context, client, model, day string) (int64, error)
	// Defer retries a write that failed when the store answers again.
	Defer(func(ctx context.Context) error)
}

// syncEvery is how stale a replica's view of a shared budget may be
// before a request reads it again.
const syncEvery = time.Second

// Share makes every client's budgets shared through st.
func (d *Directory) Share(st Store) {
	for _, c := range d.clients {
		c.store = st
	}
}

func dayString(t time.Time) string { return t.UTC().Format(dayLayout) }

// sync reads c's use of model today from the store, at most every
// syncEvery. A store that has less than this replica knows of (it
// restarted without its data) is seeded again with the difference.
func (c *Client) sync(now time.Time, model string) {
	c.led.mu.Lock()
	u := c.entry(model, now)
	fresh := now.Sub(u.synced) < syncEvery
	known := u.used
	c.led.mu.Unlock()
	if fresh {
		return
	}
	day := dayString(now)
	n, err := c.store.Budget(context.Background(), c.Name, model, day)
	if err != nil {
		return // the local view stands in
	}
	if n < known {
		n, err = c.store.AddBudget(context.Background(), c.Name, model, day, known-n)
		if err != nil {
			return
		}
	}
	c.led.mu.Lock()
	if u = c.entry(model, now); n > u.used {
		u.used = n
	}
	u.synced = now
	c.led.mu.Unlock()
}

// record adds used tokens to the store; the total there (every replica's)
// becomes c's view. A write that fails is retried when the store answers
// again: no use is lost.
func (c *Client) record(now time.Time, model string, used int64, u *usage) {
	day, name := dayString(now), c.Name
	c.store.AddBudgetLater(name, model, day, used, func(n int64, err error) {
		if err != nil {
			c.store.Defer(func(ctx context.Context) error {
				_, err := c.store.AddBudget(ctx, name, model, day, used)
				return err
			})
			return
		}
		c.led.mu.Lock()
		if u.day == dayOf(now) && n > u.used {
			u.used = n
		}
		u.synced = now
		c.led.mu.Unlock()
	})
}
