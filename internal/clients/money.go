package clients

import (
	"context"
	"fmt"
	"time"

	"github.com/llproxy/llproxy/internal/price"
)

// Budgets in money: a client's spend in micro-dollars, across every route
// and model, per UTC day and calendar month. A request holds its most
// expensive outcome from admission to settlement, and is admitted only if
// what is spent, what requests in flight hold and its own hold fit every
// budget; settlement replaces the hold with the actual cost. So
// concurrent requests can never overrun a budget.

// period is a budget's span.
type period uint8

const (
	perDay period = iota
	perMonth
	periods
)

func (p period) String() string {
	if p == perMonth {
		return "month"
	}
	return "day"
}

// index numbers the period t falls in: UTC days, or months, since the
// epoch.
func (p period) index(t time.Time) int64 {
	if p == perMonth {
		u := t.UTC()
		return int64(u.Year())*12 + int64(u.Month()) - 1
	}
	return dayOf(t)
}

// end is when the period t falls in ends (the budget starts over).
func (p period) end(t time.Time) time.Time {
	u := t.UTC()
	if p == perMonth {
		return time.Date(u.Year(), u.Month()+1, 1, 0, 0, 0, 0, time.UTC)
	}
	return nextDay(t)
}

// label is the period t falls in as the store keys it: "2026-12-07", or
// "2026-12".
func (p period) label(t time.Time) string {
	if p == perMonth {
		return t.UTC().Format("2006-01")
	}
	return dayString(t)
}

// storeKey is the entry a period's spend has in the shared store.
func (p period) storeKey() string { return "$usd/" + p.String() }

// cash is a client's spend in one period.
type cash struct {
	index      int64 // the period's
	used, held int64 // micro-dollars settled, and held by requests in flight
	synced     time.Time
}

// cashEntry is c's spend in period p at now, started over when the
// period changed. c.led.mu is held.
func (c *Client) cashEntry(p period, now time.Time) *cash {
	e := &c.led.cash[p]
	if i := p.index(now); e.index != i {
		*e = cash{index: i}
	}
	return e
}

// cashBudget is c's budget in period p (0: none).
func (c *Client) cashBudget(p period) price.Micro {
	if c.cfg == nil || c.cfg.Budget == nil {
		return 0
	}
	if p == perMonth {
		return price.FromUSD(c.cfg.Budget.USDPerMonth)
	}
	return price.FromUSD(c.cfg.Budget.USDPerDay)
}

// HasMoneyBudget reports whether c has a budget in money.
func (c *Client) HasMoneyBudget() bool { return c.cashBudget(perDay) > 0 || c.cashBudget(perMonth) > 0 }

// Overspent is a request refused because its client's budget in money
// cannot pay for it: what is spent in the period plus the request's most
// expensive outcome is over it.
type Overspent struct {
	Client    string
	Period    string // "day" or "month"
	Budget    price.Micro
	Spent     price.Micro
	Requested price.Micro
	Reset     time.Time // when the budget that binds starts over and lets it fit
}

// ResetAt is when the budget starts over.
func (e *Overspent) ResetAt() time.Time { return e.Reset }

func (e *Overspent) Error() string {
	return fmt.Sprintf("You exceeded your current quota: client %s has spent %s of its %s per %s; "+
		"this request may cost up to %s. The budget resets at %s.",
		e.Client, e.Spent, e.Budget, e.Period, e.Requested, e.Reset.Format(time.RFC3339))
}

// CashReserved is a request refused only because requests in flight hold
// the rest of a budget in money: it may fit once they settle.
type CashReserved struct {
	Client                         string
	Period                         string
	Budget, Spent, Held, Requested price.Micro
}

// RetryAfter is how soon a retry may fit: requests in flight settle
// within seconds, usually for less than they hold.
func (e *CashReserved) RetryAfter() time.Duration { return time.Second }

func (e *CashReserved) Error() string {
	return fmt.Sprintf("Budget reserved: client %s has spent %s of its %s per %s and requests in flight hold %s more; "+
		"this request may cost up to %s. Retry when they finish.",
		e.Client, e.Spent, e.Budget, e.Period, e.Held, e.Requested)
}

// reserveCash checks that need fits every budget of c at now and holds
// it; c.led.mu is held. A refusal holds nothing.
func (c *Client) reserveCash(now time.Time, need price.Micro) (cashHold, error) {
	if need < 0 {
		need = 0
	}
	var refused *Overspent
	for p := range periods {
		b := c.cashBudget(p)
		if b <= 0 {
			continue
		}
		e := c.cashEntry(p, now)
		if int64(b) < e.used+int64(need) {
			// The reset that lets it fit: the month's when the month
			// cannot pay either.
			if refused == nil || p == perMonth {
				refused = &Overspent{Client: c.Name, Period: p.String(), Budget: b, Spent: price.Micro(e.used),
					Requested: need, Reset: p.end(now)}
			}
		}
	}
	if refused != nil {
		return cashHold{}, refused
	}
	for p := range periods {
		b := c.cashBudget(p)
		if e := c.cashEntry(p, now); b > 0 && int64(b) < e.used+e.held+int64(need) {
			return cashHold{}, &CashReserved{Client: c.Name, Period: p.String(), Budget: b, Spent: price.Micro(e.used),
				Held: price.Micro(e.held), Requested: need}
		}
	}
	h := cashHold{held: int64(need)}
	for p := range periods {
		e := c.cashEntry(p, now)
		e.held += h.held
		h.index[p] = e.index
	}
	return h, nil
}

// cashHold is a request's hold on its client's budgets in money.
type cashHold struct {
	held  int64
	index [periods]int64
}

// end gives the hold back from the periods it was taken in (a period
// that ended has started over without it). c.led.mu is held.
func (h *cashHold) end(c *Client) {
	for p := range periods {
		if e := &c.led.cash[p]; e.index == h.index[p] {
			e.held = max(0, e.held-h.held)
		}
	}
	h.held = 0
}

// spend counts used as spent in the periods of now. c.led.mu is held.
func (c *Client) spend(now time.Time, used price.Micro) {
	for p := range periods {
		c.cashEntry(p, now).used += int64(max(0, used))
	}
}

// SpendToday and SpendMonth are c's spend and what requests in flight
// hold, in micro-dollars, at now.
func (c *Client) SpendNow(now time.Time) (day, month, held price.Micro) {
	c.led.mu.Lock()
	defer c.led.mu.Unlock()
	d, m := c.cashEntry(perDay, now), c.cashEntry(perMonth, now)
	return price.Micro(d.used), price.Micro(m.used), price.Micro(d.held)
}

// MoneyBudgets are c's budgets in money (0: none), per day and month.
func (c *Client) MoneyBudgets() (day, month price.Micro) {
	return c.cashBudget(perDay), c.cashBudget(perMonth)
}

// syncCash reads c's spend in each period from the shared store, at most
// every syncEvery; a store that has less than this replica knows of is
// seeded with the difference.
func (c *Client) syncCash(now time.Time) {
	for p := range periods {
		c.led.mu.Lock()
		e := c.cashEntry(p, now)
		fresh, known := now.Sub(e.synced) < syncEvery, e.used
		c.led.mu.Unlock()
		if fresh {
			continue
		}
		label := p.label(now)
		n, err := c.store.Budget(context.Background(), c.Name, p.storeKey(), label)
		if err != nil {
			return
		}
		if n < known {
			if n, err = c.store.AddBudget(context.Background(), c.Name, p.storeKey(), label, known-n); err != nil {
				return
			}
		}
		c.led.mu.Lock()
		if e = c.cashEntry(p, now); n > e.used {
			e.used = n
		}
		e.synced = now
		c.led.mu.Unlock()
	}
}

// recordCash adds used to the shared store's spend of each period; a
// write that fails is retried when the store answers again.
func (c *Client) recordCash(now time.Time, used price.Micro) {
	for p := range periods {
		key, label, name := p.storeKey(), p.label(now), c.Name
		c.store.AddBudgetLater(name, key, label, int64(used), func(n int64, err error) {
			if err != nil {
				c.store.Defer(func(ctx context.Context) error {
					_, err := c.store.AddBudget(ctx, name, key, label, int64(used))
					return err
				})
				return
			}
			c.led.mu.Lock()
			if e := c.cashEntry(p, now); n > e.used {
				e.used = n
			}
			c.led.mu.Unlock()
		})
	}
}
