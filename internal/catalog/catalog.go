// Package catalog is the one answer to "which route serves model X", "every
// model, once" and "which models are loaded now", for every front that
// routes by model: the root base URL (/v1/...) and the Ollama façade.
//
// It exists so that the fronts stay thin and cannot disagree: a model the
// root serves on one route is the model Ollama's clients see on that same
// route, listed once.
package catalog

import (
	"slices"
	"time"

	"github.com/llproxy/llproxy/internal/lifecycle"
	"github.com/llproxy/llproxy/internal/route"
	"github.com/llproxy/llproxy/provider"
	"github.com/llproxy/llproxy/scheduler"
)

// Catalog is a gateway's routes, in the config's order, and the default
// route that breaks ties. It is read-only, and safe for concurrent use.
type Catalog struct {
	routes   []*route.Route
	fallback *route.Route
}

// New returns the catalog of routes (in the config's order), with
// fallback (may be nil) winning ties.
func New(routes []*route.Route, fallback *route.Route) *Catalog {
	return &Catalog{routes: routes, fallback: fallback}
}

// Resolve returns the route that serves model to a request in OpenAI's
// shapes (see ResolveFor).
func (c *Catalog) Resolve(model string) *route.Route { return c.ResolveFor(model, false) }

// ResolveFor returns the route that serves model: a route that lists it
// (or whose mock serves it) first, then a fleet that knows it (its
// name:tag names), then a route whose "*" accepts any model; each step in
// the config's order, the default route winning a tie. Routes that speak
// the request's API come first (messages: Anthropic's Messages API, on an
// anthropic route; else OpenAI's, on any other), then any route. Nil:
// none.
func (c *Catalog) ResolveFor(model string, messages bool) *route.Route {
	if rt := c.resolve(model, func(rt *route.Route) bool { return (rt.API() == provider.NameAnthropic) == messages }); rt != nil {
		return rt
	}
	return c.resolve(model, func(*route.Route) bool { return true })
}

func (c *Catalog) resolve(model string, speaks func(*route.Route) bool) *route.Route {
	steps := [...]func(rt *route.Route) bool{
		func(rt *route.Route) bool {
			if rt.Fleet() != nil {
				return rt.Config().Models[model] != nil
			}
			return slices.Contains(Of(rt), model)
		},
		func(rt *route.Route) bool { return rt.Fleet() != nil && rt.Fleet().Knows(model) },
		func(rt *route.Route) bool { return rt.Config().Models[scheduler.Wildcard] != nil },
	}
	for _, match := range steps {
		if c.fallback != nil && speaks(c.fallback) && match(c.fallback) {
			return c.fallback
		}
		for _, rt := range c.routes {
			if speaks(rt) && match(rt) {
				return rt
			}
		}
	}
	return nil
}

// Models is every model of every route, by the names clients use, each
// once, sorted.
func (c *Catalog) Models() []string {
	var out []string
	for _, rt := range c.routes {
		out = append(out, Of(rt)...)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// Loaded is a model loaded now, with when it will be unloaded (zero: not
// on a timer).
type Loaded struct {
	Name      string
	ExpiresAt time.Time
}

// Running lists the models loaded now, each once (the first route's): the
// models of the managed servers that are up, and every model of the routes
// whose servers llproxy does not run.
func (c *Catalog) Running() []Loaded {
	var out []Loaded
	seen := map[string]bool{}
	add := func(l Loaded) {
		if !seen[l.Name] {
			seen[l.Name] = true
			out = append(out, l)
		}
	}
	for _, rt := range c.routes {
		var servers []lifecycle.Status
		if rt.Fleet() != nil {
			servers = rt.Fleet().Servers()
		}
		managed := map[string]bool{}
		for _, st := range servers {
			for _, m := range st.Models {
				managed[m] = true
				if st.State == lifecycle.Ready {
					add(Loaded{Name: m, ExpiresAt: st.UnloadAt})
				}
			}
		}
		for _, m := range Of(rt) {
			if !managed[m] {
				add(Loaded{Name: m})
			}
		}
	}
	return out
}

// Of is the models route rt serves, by the names clients use: those
// listed in its config (not "*"), and those its fleet or its mock serves;
// sorted, each once.
func Of(rt *route.Route) []string {
	var out []string
	for m := range rt.Config().Models {
		if m != scheduler.Wildcard {
			out = append(out, m)
		}
	}
	switch {
	case rt.Fleet() != nil:
		out = append(out, rt.Fleet().Models()...)
	case rt.Config().Provider == provider.NameMock:
		if len(rt.Config().Mock.Models) == 0 {
			out = append(out, "mock")
		}
		out = append(out, rt.Config().Mock.Models...)
	}
	slices.Sort(out)
	return slices.Compact(out)
}
