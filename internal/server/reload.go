package server

import (
	"time"

	"github.com/llproxy/llproxy/internal/models"
	"github.com/llproxy/llproxy/internal/safe"
)

// Reloads (SIGHUP): the caller validates the new config, builds the new
// gateway with Options.Previous, and hands the listener to it; Takeover
// then retires what the old one held and the new one does not: fleets
// whose backends changed (their model servers stop once requests sent to
// them have had grace to finish) and shared buckets no longer used.
// Requests the old gateway had already taken (waiting or admitted) finish
// there: the queues they wait in are the new gateway's too.

// Takeover makes s the current gateway in place of prev and retires, after
// grace, what only prev used.
func (s *Server) Takeover(prev *Server, grace time.Duration) {
	s.src.cur.Store(s)
	var retire []func()
	for name, old := range prev.routes {
		if f := old.Fleet(); f != nil {
			if nu := s.routes[name]; nu == nil || nu.Fleet() != f {
				retire = append(retire, f.Shutdown)
			}
		}
		old.Models(func(ms *models.Model) {
			if ms.Shared != nil {
				retire = append(retire, ms.Shared.Close)
			}
		})
	}
	if len(retire) == 0 {
		return
	}
	safe.Go(s.log, "retiring the old config", func() {
		time.Sleep(grace)
		for _, f := range retire {
			f()
		}
	})
}
