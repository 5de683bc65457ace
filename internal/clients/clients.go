// Package clients is who sent a request. The gateway's clients (teams)
// are named in the config, each with its keys, weight, routes and limits
// per model; the keys of clientKeys are clients of their own (key-1,
// key-2, ...); with no keys at all everyone is one anonymous client. A
// request's key finds its client in constant time, and the client's daily
// token budgets are kept here, in a state file that survives restarts.
//
// It exists so that the rest of the gateway sees a client as a small
// number (its index, which is also its place in every queue) and a name
// for logs and metrics, and never a key.
package clients

import (
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/scheduler"
)

// Anonymous is the name of the one client of a gateway without keys.
const Anonymous = "anonymous"

// Client is one client of the gateway.
type Client struct {
	// ID is its index in the directory, and in every queue.
	ID     int
	Name   string
	Weight int
	// Class is the class of its requests (a request may lower its own).
	Class  scheduler.Class
	routes []string // nil: every route
	cfg    *config.Client
	hashes [][sha256.Size]byte

	led   *ledger      // its use of each model today (budget.go); kept across reloads
	dirty *atomic.Bool // the directory's: usage changed since the last save
	store Store        // shared daily use (replicas); nil alone
}

// Allowed reports whether the client may use route.
func (c *Client) Allowed(route string) bool {
	return c.routes == nil || slices.Contains(c.routes, route)
}

// Routes are the routes the client may use; nil means all.
func (c *Client) Routes() []string { return c.routes }

// Lists reports whether the client's limits name model itself.
func (c *Client) Lists(model string) bool {
	if c.cfg == nil {
		return false
	}
	_, ok := c.cfg.Limits[model]
	return ok && model != scheduler.Wildcard
}

// Budget is the client's daily token budget for model (or for "*": the
// one budget of every model its "*" limits cover); 0 means none.
func (c *Client) Budget(model string) int64 {
	_, budget := c.budgetKey(model)
	return budget
}

// Directory is every client of the gateway. It is read-only after New,
// but for the budgets each client guards itself.
type Directory struct {
	clients []*Client
	keyed   bool
	hashes  [][sha256.Size]byte // every client key, for the admin fallback
	dirty   *atomic.Bool        // usage changed since the last save (state.go)
	persist *persistence        // the state file's lock and health (state.go); kept across reloads
}

// New builds the directory of a validated config: the clients map in name
// order, then one client per key of clientKeys. With neither, one
// anonymous client.
func New(cfg *config.Config) *Directory {
	d := &Directory{dirty: new(atomic.Bool), persist: &persistence{}}
	for _, name := range slices.Sorted(maps.Keys(cfg.Clients)) {
		cc := cfg.Clients[name]
		c := &Client{Name: name, Weight: max(1, cc.Weight), routes: cc.Routes, cfg: cc}
		if cc.Class == config.ClassBatch {
			c.Class = scheduler.Batch
		}
		for _, k := range cc.Keys {
			c.hashes = append(c.hashes, sha256.Sum256([]byte(k.Value())))
		}
		d.add(c)
	}
	for i, k := range cfg.ClientKeys {
		d.add(&Client{Name: fmt.Sprintf("%s%d", config.KeyClientPrefix, i+1), Weight: 1,
			hashes: [][sha256.Size]byte{sha256.Sum256([]byte(k.Value()))}})
	}
	if len(d.clients) == 0 {
		d.add(&Client{Name: Anonymous, Weight: 1})
		return d
	}
	d.keyed = true
	return d
}

func (d *Directory) add(c *Client) {
	c.ID = len(d.clients)
	c.led = &ledger{usage: map[string]*usage{}}
	c.dirty = d.dirty
	d.clients = append(d.clients, c)
	d.hashes = append(d.hashes, c.hashes...)
}

// Keyed reports whether clients need a key (any client or clientKeys is
// configured); without, everyone is the anonymous client.
func (d *Directory) Keyed() bool { return d.keyed }

// Hashes are the SHA-256 of every client key.
func (d *Directory) Hashes() [][sha256.Size]byte { return d.hashes }

// All returns every client, by ID.
func (d *Directory) All() []*Client { return d.clients }

// Identify returns the client whose key is key, comparing with every key
// of every client in constant time; without keys, the anonymous client.
func (d *Directory) Identify(key string) (*Client, bool) {
	if !d.keyed {
		return d.clients[0], true
	}
	if key == "" {
		return nil, false
	}
	h := sha256.Sum256([]byte(key))
	found := -1
	for _, c := range d.clients {
		for i := range c.hashes {
			eq := subtle.ConstantTimeCompare(h[:], c.hashes[i][:])
			found = subtle.ConstantTimeSelect(eq, c.ID, found)
		}
	}
	if found < 0 {
		return nil, false
	}
	return d.clients[found], true
}

// Queue returns the clients of a queue of model with limits cfg, by ID:
// each with its weight and its own limits for model.
func (d *Directory) Queue(model string, cfg scheduler.Config) []scheduler.Client {
	out := make([]scheduler.Client, len(d.clients))
	for i, c := range d.clients {
		var l *config.ClientLimits
		if c.cfg != nil {
			l = c.cfg.LimitsFor(model)
		}
		out[i] = l.Queue(c.Name, c.Weight, cfg)
	}
	return out
}

// ledger is a client's use of each model today, guarded by its mutex.
type ledger struct {
	mu    sync.Mutex
	usage map[string]*usage // model -> today's use
	cash  [periods]cash     // spend in money today and this month (money.go)
}

// Adopt takes over what old knew (a reloaded config): each client that
// keeps its name keeps its use today, and what requests admitted under old
// still settle counts here.
func (d *Directory) Adopt(old *Directory) {
	byName := map[string]*Client{}
	for _, c := range old.clients {
		byName[c.Name] = c
	}
	d.dirty, d.persist = old.dirty, old.persist
	for _, c := range d.clients {
		c.dirty = d.dirty
		if o := byName[c.Name]; o != nil {
			c.led = o.led
		}
	}
}
