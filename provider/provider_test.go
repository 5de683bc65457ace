package provider

import (
	"net/http"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestOpenAIAuthorize(t *testing.T) {
	h := http.Header{"Authorization": {"Bearer team"}, "Api-Key": {"team"}}
	NewCredentials(CredentialsConfig{}).Authorize(h)
	assert.Equal(t, "Bearer team", h.Get("Authorization"), "no key: the client's passes")
	h.Set("OpenAI-Organization", "org-other")
	h.Set("OpenAI-Project", "proj-other")
	NewCredentials(CredentialsConfig{APIKey: "sk-x"}).Authorize(h)
	assert.Equal(t, "Bearer sk-x", h.Get("Authorization"))
	assert.Empty(t, h.Get("Api-Key"))
	assert.Empty(t, h.Get("OpenAI-Organization"), "a client does not choose what the shared key bills")
	assert.Empty(t, h.Get("OpenAI-Project"))

	h = http.Header{"Authorization": {"Bearer team"}, "Api-Key": {"team"}, "Openai-Organization": {"org-a"}}
	NewCredentials(CredentialsConfig{APIKey: "sk-x", ForwardOrganization: true}).Authorize(h)
	assert.Equal(t, "org-a", h.Get("OpenAI-Organization"))
	h = http.Header{"Authorization": {"Bearer team"}, "Api-Key": {"team"}}
	NewCredentials(CredentialsConfig{DropClientAuth: true}).Authorize(h)
	assert.Empty(t, h.Get("Authorization"), "a client key never leaves the gateway")
	assert.Empty(t, h.Get("Api-Key"))
}

// Each API's key goes in its own header, and a client key in any of the
// three never passes beside it.
func TestEachAPIsKeyHeader(t *testing.T) {
	client := func() http.Header {
		return http.Header{"Authorization": {"Bearer team"}, "Api-Key": {"team"}, "X-Api-Key": {"team"},
			"Anthropic-Version": {"2023-06-01"}}
	}
	h := client()
	NewCredentials(CredentialsConfig{APIKey: "sk-ant", Header: KeyXAPIKey}).Authorize(h)
	assert.Equal(t, http.Header{"X-Api-Key": {"sk-ant"}, "Anthropic-Version": {"2023-06-01"}}, h)
	h = client()
	NewCredentials(CredentialsConfig{APIKey: "az", Header: KeyAPIKey}).Authorize(h)
	assert.Equal(t, http.Header{"Api-Key": {"az"}, "Anthropic-Version": {"2023-06-01"}}, h)
	h = client()
	NewCredentials(CredentialsConfig{DropClientAuth: true, Header: KeyXAPIKey}).Authorize(h)
	assert.Equal(t, http.Header{"Anthropic-Version": {"2023-06-01"}}, h)
}
