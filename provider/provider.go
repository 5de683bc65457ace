// Package provider knows the upstreams llproxy speaks to: "openai" (any
// OpenAI-compatible server: its credentials, its rate-limit headers and
// retry advice, its usage in JSON bodies and SSE streams) and "mock", an
// OpenAI-compatible upstream answering locally (with its in-process
// transport), so the gateway runs and can be load-tested with no key and no
// network.
//
// It exists so that what differs between upstreams (authentication, what
// they report and how) stays out of the HTTP server and the scheduler. It
// imports neither.
package provider

// Names of the providers a route may use.
const (
	NameOpenAI = "openai"
	NameMock   = "mock"
)

// Names returns the known provider names.
func Names() []string { return []string{NameOpenAI, NameMock} }
