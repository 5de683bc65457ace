package config

import (
	"fmt"
	"maps"
	"slices"

	"github.com/llproxy/llproxy/internal/duration"
	"github.com/llproxy/llproxy/scheduler"
)

// Client is one team of the gateway (the "clients" map): its keys, its
// weight in every queue it waits in, the routes it may use, and its own
// limits per model.
type Client struct {
	// Keys authenticate the client: "Authorization: Bearer <key>" or
	// "api-key: <key>". At least one.
	Keys []Secret `json:"keys"`
	// Weight is the client's share of a model against the other clients
	// waiting for it at the same time, in tokens: 1 to 1000. Default 1.
	Weight int `json:"weight"`
	// Routes, when set, are the only routes the client may use (403
	// otherwise).
	Routes []string `json:"routes"`
	// Limits are the client's own limits per model; "*" for every model
	// not listed.
	Limits map[string]*ClientLimits `json:"limits"`
	// Budget is the client's budget in money, across every route and
	// model.
	Budget *MoneyBudget `json:"budget"`
	// Class is "interactive" (default) or "batch": a batch client's
	// requests wait until no interactive request does, and leave the
	// model's batchHeadroom.
	Class string `json:"class"`
}

// MoneyBudget is a client's budget in money: USD per UTC day and per
// calendar month (0: none of that span).
type MoneyBudget struct {
	USDPerDay   float64 `json:"usdPerDay"`
	USDPerMonth float64 `json:"usdPerMonth"`
}

// maxBudgetUSD bounds a budget in money (a larger one is a typo).
const maxBudgetUSD = 1_000_000_000

// Classes of a client.
const (
	ClassInteractive = "interactive"
	ClassBatch       = "batch"
)

// ClientLimits are a client's own limits for one model, in addition to
// the model's. Zero means none of its own.
type ClientLimits struct {
	RPM           int `json:"rpm"`
	TPM           int `json:"tpm"`
	ITPM          int `json:"itpm"`
	OTPM          int `json:"otpm"`
	MaxConcurrent int `json:"maxConcurrent"`
	// MaxQueueSize and MaxQueueWait replace the model's for the client's
	// requests. Unset: the model's.
	MaxQueueSize *int               `json:"maxQueueSize"`
	MaxQueueWait *duration.Duration `json:"maxQueueWait"`
	// BatchMaxQueueSize and BatchMaxQueueWait replace the model's for the
	// client's batch requests.
	BatchMaxQueueSize *int               `json:"batchMaxQueueSize"`
	BatchMaxQueueWait *duration.Duration `json:"batchMaxQueueWait"`
	// TokensPerDay is a daily budget (UTC day) of tokens used: over it,
	// the client's requests for the model get 429 insufficient_quota.
	TokensPerDay int64 `json:"tokensPerDay"`
}

// KeyClientPrefix names the clients made of clientKeys: key-1, key-2, ...
const KeyClientPrefix = "key-"

// Queue returns the client's limits in a queue of model with limits
// model: its own where set, else the model's.
func (l *ClientLimits) Queue(name string, weight int, model scheduler.Config) scheduler.Client {
	c := model.Client(name, weight)
	if l == nil {
		return c
	}
	c.RPM, c.TPM, c.ITPM, c.OTPM, c.MaxConcurrent = l.RPM, l.TPM, l.ITPM, l.OTPM, l.MaxConcurrent
	if l.MaxQueueSize != nil {
		c.MaxQueueSize = *l.MaxQueueSize
	}
	if l.MaxQueueWait != nil {
		c.MaxQueueWait, c.OwnWait = l.MaxQueueWait.D(), true
	}
	if l.BatchMaxQueueSize != nil {
		c.BatchMaxQueueSize = *l.BatchMaxQueueSize
	}
	if l.BatchMaxQueueWait != nil {
		c.BatchMaxQueueWait, c.OwnBatchWait = l.BatchMaxQueueWait.D(), true
	}
	return c
}

// LimitsFor returns the client's limits for model: its own entry, else
// "*"'s; nil when neither is set.
func (c *Client) LimitsFor(model string) *ClientLimits {
	if l, ok := c.Limits[model]; ok {
		return l
	}
	return c.Limits[scheduler.Wildcard]
}

// HasBudgets reports whether any client has a daily budget: only then is
// there usage to keep across restarts.
func (c *Config) HasBudgets() bool {
	for _, cl := range c.Clients {
		if cl != nil && cl.Budget != nil {
			return true
		}
		for _, l := range cl.Limits {
			if l != nil && l.TokensPerDay > 0 {
				return true
			}
		}
	}
	return false
}

// validateClients reports every error of the clients map.
func (c *Config) validateClients() []error {
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(c.Clients)) {
		path := "clients." + name
		cl := c.Clients[name]
		if !routeName.MatchString(name) {
			errs = append(errs, fmt.Errorf("%s: client name must be letters, digits, '.', '_' or '-'", path))
		}
		if cl == nil {
			errs = append(errs, fmt.Errorf("%s: must be an object", path))
			continue
		}
		if len(cl.Keys) == 0 {
			errs = append(errs, fmt.Errorf("%s.keys: a client needs at least one key", path))
		}
		for i, k := range cl.Keys {
			if k == "" {
				errs = append(errs, fmt.Errorf("%s.keys[%d]: must not be empty", path, i))
			}
		}
		if b := cl.Budget; b != nil {
			for _, f := range [...]struct {
				name string
				v    float64
			}{{"usdPerDay", b.USDPerDay}, {"usdPerMonth", b.USDPerMonth}} {
				if !(f.v >= 0 && f.v <= maxBudgetUSD) {
					errs = append(errs, fmt.Errorf("%s.budget.%s: must be a number of USD between 0 and %d, got %v", path, f.name, maxBudgetUSD, f.v))
				}
			}
			if b.USDPerDay <= 0 && b.USDPerMonth <= 0 {
				errs = append(errs, fmt.Errorf("%s.budget: set usdPerDay or usdPerMonth (> 0), or remove the budget", path))
			}
		}
		if cl.Class != "" && cl.Class != ClassInteractive && cl.Class != ClassBatch {
			errs = append(errs, fmt.Errorf("%s.class: must be %q or %q, got %q", path, ClassInteractive, ClassBatch, cl.Class))
		}
		if cl.Weight < 1 || cl.Weight > scheduler.MaxWeight {
			errs = append(errs, fmt.Errorf("%s.weight: must be 1 to %d, got %d", path, scheduler.MaxWeight, cl.Weight))
		}
		for i, r := range cl.Routes {
			if c.Routes[r] == nil {
				errs = append(errs, fmt.Errorf("%s.routes[%d]: no route named %q", path, i, r))
			}
		}
		for _, model := range slices.Sorted(maps.Keys(cl.Limits)) {
			lp := path + ".limits." + model
			l := cl.Limits[model]
			if l == nil {
				errs = append(errs, fmt.Errorf("%s: must be an object", lp))
				continue
			}
			q := l.Queue(name, cl.Weight, scheduler.Config{})
			if err := q.Validate(); err != nil {
				errs = append(errs, prefix(lp+".", err)...)
			}
			if l.TokensPerDay < 0 {
				errs = append(errs, fmt.Errorf("%s.tokensPerDay: must be >= 0, got %d", lp, l.TokensPerDay))
			}
		}
	}
	for i := range c.ClientKeys {
		if name := fmt.Sprintf("%s%d", KeyClientPrefix, i+1); c.Clients[name] != nil {
			errs = append(errs, fmt.Errorf("clients.%s: the name of clientKeys[%d]'s client; choose another", name, i))
		}
	}
	return errs
}

// keyPaths lists every key the config holds with its JSON path, in a
// stable order, for the duplicate check.
func (c *Config) keyPaths() []struct {
	path string
	key  Secret
} {
	var out []struct {
		path string
		key  Secret
	}
	add := func(path string, k Secret) {
		out = append(out, struct {
			path string
			key  Secret
		}{path, k})
	}
	for _, name := range slices.Sorted(maps.Keys(c.Clients)) {
		if cl := c.Clients[name]; cl != nil {
			for i, k := range cl.Keys {
				add(fmt.Sprintf("clients.%s.keys[%d]", name, i), k)
			}
		}
	}
	for i, k := range c.ClientKeys {
		add(fmt.Sprintf("clientKeys[%d]", i), k)
	}
	for i, k := range c.AdminKeys {
		add(fmt.Sprintf("adminKeys[%d]", i), k)
	}
	return out
}
