package provider

import "net/http"

// OpenAI authenticates requests to an OpenAI-compatible upstream with the
// route's key. A zero OpenAI passes the client's own credentials through.
type OpenAI struct {
	apiKey string
}

// NewOpenAI returns the provider for a route whose upstream key is apiKey;
// an empty key lets each client's Authorization header through.
func NewOpenAI(apiKey string) *OpenAI { return &OpenAI{apiKey: apiKey} }

// Authorize sets the upstream credentials on h, an outgoing request's
// header: with a key, the client's Authorization and api-key headers are
// replaced by "Bearer <key>", so neither a client key nor a team key reaches
// the upstream.
func (p *OpenAI) Authorize(h http.Header) {
	if p.apiKey == "" {
		return
	}
	h.Del("Api-Key")
	h.Set("Authorization", "Bearer "+p.apiKey)
}
