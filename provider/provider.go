// Package provider knows how llproxy reads the upstreams it speaks to
// ("openai": any OpenAI-compatible server; "azure": Azure OpenAI;
// "anthropic": Anthropic's Messages API): their credentials, their
// rate-limit headers and retry advice, their usage in JSON bodies and SSE
// streams. The "mock" upstream, answering locally, is package
// provider/mock.
//
// It exists so that what differs between upstreams (authentication, what
// they report and how) stays out of the HTTP server and the scheduler. It
// imports neither.
package provider

// Names of the providers a route may use.
const (
	NameOpenAI    = "openai"
	NameAzure     = "azure"
	NameAnthropic = "anthropic"
	NameMock      = "mock"
)

// Names returns the known provider names.
func Names() []string { return []string{NameOpenAI, NameAzure, NameAnthropic, NameMock} }
