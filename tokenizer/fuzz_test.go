package tokenizer

import (
	"testing"

	"github.com/valyala/fastjson"
)

// FuzzPromptTokens feeds arbitrary JSON to every endpoint's counter for
// models of each family: it must never panic or return a negative count.
func FuzzPromptTokens(f *testing.F) {
	for _, s := range []string{
		`{"messages":` + cookbookMessages + `,"tools":` + weatherTools + `}`,
		`{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo=","detail":"high"}}]}]}`,
		`{"prompt":[[1,2],[3]],"input":["a",["b"]]}`,
		`{"input":[{"role":"user","content":[{"type":"input_image","image_url":"data:,"}]},{"type":"function_call_output","output":"x"}]}`,
		`{"messages":[null,1,"x",{"content":{"a":[true]}}],"tools":[{"function":{"parameters":{"properties":{"a":{"enum":[1,null,"x"]}}}}}]}`,
		`{"messages":[{"role":"user","content":"<|endoftext|> aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}]}`,
	} {
		f.Add(s)
	}
	tok := testTokenizer(f)
	f.Fuzz(func(t *testing.T, body string) {
		v, err := fastjson.Parse(body)
		if err != nil {
			return
		}
		for ep := EndpointOther; ep <= EndpointResponses; ep++ {
			for _, model := range []string{"gpt-4o", "gpt-4", "gpt-4.1-mini", "x"} {
				if n := tok.PromptTokens(ep, model, v); n < 0 {
					t.Fatalf("negative count %d", n)
				}
			}
		}
	})
}
