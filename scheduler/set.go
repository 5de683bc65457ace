// Package scheduler admits requests to an upstream in strict FIFO order per
// (route, model), paying for each from two continuously refilling token
// buckets (requests per minute and tokens per minute, golang.org/x/time/rate).
//
// It exists apart from the HTTP server so that the behaviour that must be
// exactly right (order, prediction of the wait, honest retry times, a
// cancelled request paying nothing) is plain code over integers and times,
// tested in testing/synctest bubbles. It knows nothing of HTTP, tokenizers or
// providers: a request's cost arrives as an integer.
package scheduler

import (
	"errors"
	"fmt"
	"maps"
	"slices"
)

// Wildcard is the model key whose limits apply to every model not listed.
const Wildcard = "*"

// SetConfig configures the queues of one route.
type SetConfig struct {
	// Models maps model names, and optionally Wildcard, to their limits.
	Models map[string]Config
	// MaxWildcardModels bounds how many distinct unlisted models get their
	// own queue, so clients cannot grow memory without end. 0 means 1000.
	MaxWildcardModels int
}

// Validate checks every model's limits; errors name "models.<name>.<field>".
func (c SetConfig) Validate() error {
	var errs []error
	if len(c.Models) == 0 {
		errs = append(errs, errors.New("models: must list at least one model or \"*\""))
	}
	for _, name := range slices.Sorted(maps.Keys(c.Models)) {
		if name == "" {
			errs = append(errs, errors.New("models: a model name must not be empty"))
		}
		errs = append(errs, c.Models[name].validate("models."+name+".")...)
	}
	if c.MaxWildcardModels < 0 {
		errs = append(errs, fmt.Errorf("maxWildcardModels: must be >= 0, got %d", c.MaxWildcardModels))
	}
	return errors.Join(errs...)
}
