package provider

import (
	"net/http"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestOpenAIAuthorize(t *testing.T) {
	h := http.Header{"Authorization": {"Bearer team"}, "Api-Key": {"team"}}
	NewOpenAI(OpenAIConfig{}).Authorize(h)
	assert.Equal(t, "Bearer team", h.Get("Authorization"), "no key: the client's passes")
	h.Set("OpenAI-Organization", "org-other")
	h.Set("OpenAI-Project", "proj-other")
	NewOpenAI(OpenAIConfig{APIKey: "sk-x"}).Authorize(h)
	assert.Equal(t, "Bearer sk-x", h.Get("Authorization"))
	assert.Empty(t, h.Get("Api-Key"))
	assert.Empty(t, h.Get("OpenAI-Organization"), "a client does not choose what the shared key bills")
	assert.Empty(t, h.Get("OpenAI-Project"))

	h = http.Header{"Authorization": {"Bearer team"}, "Api-Key": {"team"}, "Openai-Organization": {"org-a"}}
	NewOpenAI(OpenAIConfig{APIKey: "sk-x", ForwardOrganization: true}).Authorize(h)
	assert.Equal(t, "org-a", h.Get("OpenAI-Organization"))
	h = http.Header{"Authorization": {"Bearer team"}, "Api-Key": {"team"}}
	NewOpenAI(OpenAIConfig{DropClientAuth: true}).Authorize(h)
	assert.Empty(t, h.Get("Authorization"), "a client key never leaves the gateway")
	assert.Empty(t, h.Get("Api-Key"))
}
