// Package price is what a request costs in money: the configured prices of
// each model (USD per million tokens, by kind: input, cached input, cache
// writes, output), and a request's cost from the usage its upstream
// reported, computed exactly in integers.
//
// It exists so that budgets in money, the usage ledger and the spend
// metrics all price a request one way, and so that no float drifts over
// millions of requests: a price is held in pico-dollars per token (a
// configured price of $2.50 per million tokens is 2,500,000 p$ a token),
// a request's cost is the exact sum in pico-dollars, rounded once, half
// up, to micro-dollars.
package price

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Micro is an amount of money in micro-dollars (millionths of a USD).
type Micro int64

// FromUSD is dollars as micro-dollars, rounded half away from zero.
func FromUSD(usd float64) Micro { return Micro(math.Round(usd * 1e6)) }

// USD is m in dollars.
func (m Micro) USD() float64 { return float64(m) / 1e6 }

// String writes m as dollars, exactly, with at least cents ("$12.3456",
// "$20.00", "$0.000431").
func (m Micro) String() string {
	sign := ""
	if m < 0 {
		sign, m = "-", -m
	}
	d := m.Decimal()
	switch i := strings.IndexByte(d, '.'); {
	case i < 0:
		d += ".00"
	case len(d)-i == 2:
		d += "0"
	}
	return sign + "$" + d
}

// Decimal writes m as a decimal number of dollars, exactly, as JSON and
// CSV carry it ("12.3456", "20", "-0.000001").
func (m Micro) Decimal() string {
	sign := ""
	if m < 0 {
		sign, m = "-", -m
	}
	s := strconv.FormatInt(int64(m)/1e6, 10)
	if frac := int64(m) % 1e6; frac != 0 {
		s += "." + strings.TrimRight(strconv.FormatInt(frac+1e6, 10)[1:], "0")
	}
	return sign + s
}

// Price is one model's prices as the config writes them: USD per million
// tokens. A nil field takes its default: CachedInput is Input; CacheRead is
// CachedInput; CacheWrite is Input; Output is 0 only if unset.
type Price struct {
	Input       *float64 `json:"input"`
	CachedInput *float64 `json:"cachedInput"`
	CacheWrite  *float64 `json:"cacheWrite"`
	CacheRead   *float64 `json:"cacheRead"`
	Output      *float64 `json:"output"`
}

// MaxPerMillion bounds a price: no model costs more than $100,000 per
// million tokens, and a larger number is a mistake (or an overflow).
const MaxPerMillion = 100_000

// Validate reports every field that is negative, not a number or beyond
// MaxPerMillion, each by its JSON name.
func (p *Price) Validate() error {
	var errs []error
	for _, f := range [...]struct {
		name string
		v    *float64
	}{{"input", p.Input}, {"cachedInput", p.CachedInput}, {"cacheWrite", p.CacheWrite}, {"cacheRead", p.CacheRead}, {"output", p.Output}} {
		if f.v != nil && !(*f.v >= 0 && *f.v <= MaxPerMillion) {
			errs = append(errs, fmt.Errorf("%s: must be a price in USD per million tokens between 0 and %d, got %v", f.name, MaxPerMillion, *f.v))
		}
	}
	return errors.Join(errs...)
}

// Rate is a model's prices in pico-dollars per token, by kind.
type Rate struct {
	Input, CacheRead, CacheWrite, Output int64
}

// perToken is a price per million tokens in pico-dollars per token.
func perToken(usdPerMillion float64) int64 { return int64(math.Round(usdPerMillion * 1e6)) }

// Rate is p's prices per token, with its defaults.
func (p *Price) Rate() Rate {
	get := func(v *float64, def int64) int64 {
		if v == nil {
			return def
		}
		return perToken(*v)
	}
	r := Rate{Input: get(p.Input, 0), Output: get(p.Output, 0)}
	cached := get(p.CachedInput, r.Input)
	r.CacheRead = get(p.CacheRead, cached)
	r.CacheWrite = get(p.CacheWrite, r.Input)
	return r
}

// Usage is what a request used, as its upstream reported it: the whole
// prompt, the parts of it its cache read and wrote, and the output
// (reasoning included, counted once).
type Usage struct {
	Prompt, CacheRead, CacheWrite, Output int64
}

// Cost is what usage costs at r, exactly: the uncached prompt at the input
// price, cache reads and writes at theirs, the output at its, summed in
// pico-dollars and rounded once to micro-dollars. Negative counts are 0;
// cache counts beyond the prompt are the prompt.
func (r Rate) Cost(u Usage) Micro {
	prompt := max(0, u.Prompt)
	read := min(max(0, u.CacheRead), prompt)
	write := min(max(0, u.CacheWrite), prompt-read)
	p := (prompt-read-write)*r.Input + read*r.CacheRead + write*r.CacheWrite + max(0, u.Output)*r.Output
	return Micro((p + 500_000) / 1_000_000)
}

// Most is the most a request of prompt tokens and at most output tokens
// out can cost at r: its prompt at the dearest input price (the cache may
// write all of it), its whole output; rounded up.
func (r Rate) Most(prompt, output int64) Micro {
	in := max(r.Input, r.CacheRead, r.CacheWrite)
	p := max(0, prompt)*in + max(0, output)*r.Output
	return Micro((p + 999_999) / 1_000_000)
}

// Table is every model's rate: exact names first, then "*"; a model with
// neither is unpriced (costs 0).
type Table struct {
	exact    map[string]Rate
	wildcard *Rate
}

// NewTable builds the table of the config's prices (validated).
func NewTable(prices map[string]*Price) *Table {
	t := &Table{exact: map[string]Rate{}}
	for name, p := range prices {
		if p == nil {
			continue
		}
		r := p.Rate()
		if name == "*" {
			t.wildcard = &r
			continue
		}
		t.exact[name] = r
	}
	return t
}

// For is model's rate, and whether it has one.
func (t *Table) For(model string) (Rate, bool) {
	if t == nil {
		return Rate{}, false
	}
	if r, ok := t.exact[model]; ok {
		return r, true
	}
	if t.wildcard != nil {
		return *t.wildcard, true
	}
	return Rate{}, false
}
