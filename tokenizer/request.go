package tokenizer

import (
	"bytes"

	"github.com/valyala/fastjson"
)

// Endpoint names the OpenAI API a request body belongs to; it decides which
// fields hold the prompt.
type Endpoint uint8

// The endpoints the tokenizer knows. EndpointOther counts the usual prompt
// fields (messages, input, prompt) of any other JSON request.
const (
	EndpointOther Endpoint = iota
	EndpointChat
	EndpointCompletions
	EndpointEmbeddings
	EndpointResponses
	// EndpointMessages is Anthropic's Messages API (messages.go).
	EndpointMessages
)

// Overheads from the OpenAI cookbook ("How to count tokens with tiktoken").
const (
	tokensPerMessage = 3 // <|start|>{role/name}\n{content}<|end|>\n
	tokensPerName    = 1
	replyPriming     = 3 // every reply is primed with <|start|>assistant<|message|>
	funcInitModern   = 7
	funcInitLegacy   = 10
	propInit         = 3
	propKey          = 3
	enumInit         = -3
	enumItem         = 3
	funcEnd          = 12
)

// PromptTokens counts the prompt tokens of an OpenAI-shaped request body for
// model: chat messages (with names, content parts, images, tool calls) and
// tool definitions per the cookbook; completions prompts; embeddings inputs;
// Responses API instructions and input. Token-id arrays count one token per
// id. Audio and file payloads are not counted. It never fails: fields of an
// unexpected shape are counted by their strings. Uncached text beyond the
// tokenizer's MaxExactBytes is estimated, bounding the work per request.
func (t *Tokenizer) PromptTokens(ep Endpoint, model string, body *fastjson.Value) int {
	budget := t.maxExact
	c := counter{e: t.EncodingFor(model), model: model, budget: &budget}
	switch ep {
	case EndpointChat:
		return c.chat(body)
	case EndpointCompletions:
		return c.prompt(body.Get("prompt")) + c.prompt(body.Get("suffix"))
	case EndpointEmbeddings:
		return c.prompt(body.Get("input"))
	case EndpointResponses:
		return c.responses(body)
	case EndpointMessages:
		return c.messages(body)
	}
	n := c.prompt(body.Get("input")) + c.prompt(body.Get("prompt"))
	if body.Get("messages") != nil {
		n += c.chat(body)
	}
	return n
}

// counter walks one request.
type counter struct {
	e      *Encoding
	model  string
	budget *int // bytes of exact counting the request may still spend
}

func (c counter) text(b []byte) int { return c.e.countWithin(unsafeString(b), c.budget) }

// chat implements the cookbook's num_tokens_from_messages plus
// num_tokens_for_tools.
func (c counter) chat(body *fastjson.Value) int {
	n := 0
	for _, m := range body.GetArray("messages") {
		n += c.message(m)
	}
	n += replyPriming
	tools := body.GetArray("tools")
	if tools == nil {
		tools = body.GetArray("functions")
	}
	n += c.tools(tools)
	if rf := body.Get("response_format"); rf != nil {
		n += c.strings(rf.Get("json_schema"))
	}
	// Predicted Outputs: the prediction's tokens are processed and billed
	// (those not used as completion tokens), so they are part of the cost.
	if pc := body.Get("prediction", "content"); pc != nil {
		n += c.content(pc)
	}
	return n
}

func (c counter) message(m *fastjson.Value) int {
	o, err := m.Object()
	if err != nil {
		return c.strings(m)
	}
	n := tokensPerMessage
	o.Visit(func(key []byte, v *fastjson.Value) {
		switch string(key) {
		case "content":
			n += c.content(v)
		case "name":
			n += c.strings(v) + tokensPerName
		default:
			n += c.strings(v)
		}
	})
	return n
}

// content counts a message's content: a string, or an array of parts.
func (c counter) content(v *fastjson.Value) int {
	if v.Type() != fastjson.TypeArray {
		return c.strings(v)
	}
	n := 0
	for _, part := range v.GetArray() {
		switch string(part.GetStringBytes("type")) {
		case "text", "input_text", "output_text", "refusal":
			n += c.text(part.GetStringBytes("text")) + c.text(part.GetStringBytes("refusal"))
		case "image_url":
			img := part.Get("image_url")
			url := img.GetStringBytes("url")
			if url == nil {
				url = part.GetStringBytes("image_url") // a plain string
			}
			n += imageTokens(c.model, url, img.GetStringBytes("detail"))
		case "input_image":
			n += imageTokens(c.model, part.GetStringBytes("image_url"), part.GetStringBytes("detail"))
		case "input_audio", "input_file", "file":
			// Payloads are not text; only their small string fields count.
			n += c.stringsExcept(part, "data", "file_data")
		default:
			n += c.strings(part)
		}
	}
	return n
}

// tools counts tool or function definitions: {"type":"function","function":
// {...}} (chat), the flat Responses shape, or legacy "functions".
func (c counter) tools(tools []*fastjson.Value) int {
	if len(tools) == 0 {
		return 0
	}
	funcInit := funcInitModern
	if c.e.legacy {
		funcInit = funcInitLegacy
	}
	var buf [256]byte
	n := 0
	for _, t := range tools {
		f := t.Get("function")
		if f == nil {
			f = t
		}
		n += funcInit
		line := append(buf[:0], f.GetStringBytes("name")...)
		line = append(line, ':')
		line = append(line, trimDot(f.GetStringBytes("description"))...)
		n += c.text(line)
		props := f.GetObject("parameters", "properties")
		if props == nil || props.Len() == 0 {
			continue
		}
		n += propInit
		props.Visit(func(key []byte, p *fastjson.Value) {
			n += propKey
			if enum := p.GetArray("enum"); enum != nil {
				n += enumInit
				for _, item := range enum {
					n += enumItem + c.scalar(item)
				}
			}
			line := append(buf[:0], key...)
			line = append(line, ':')
			line = append(line, p.GetStringBytes("type")...)
			line = append(line, ':')
			line = append(line, trimDot(p.GetStringBytes("description"))...)
			n += c.text(line)
			// Nested schemas are beyond the cookbook: charge their strings.
			n += c.strings(p.Get("properties")) + c.strings(p.Get("items"))
		})
	}
	return n + funcEnd
}

// responses counts a Responses API request: instructions, input (a string
// or a list of items) and tools.
func (c counter) responses(body *fastjson.Value) int {
	n := c.text(body.GetStringBytes("instructions"))
	in := body.Get("input")
	if in != nil && in.Type() == fastjson.TypeArray {
		for _, item := range in.GetArray() {
			if item.Get("role") != nil {
				n += c.message(item)
			} else {
				n += c.strings(item)
			}
		}
	} else {
		n += c.strings(in)
	}
	return n + replyPriming + c.tools(body.GetArray("tools"))
}

// prompt counts a completions prompt or an embeddings input: a string, an
// array of strings, an array of token ids, or an array of such arrays.
func (c counter) prompt(v *fastjson.Value) int {
	if v == nil {
		return 0
	}
	switch v.Type() {
	case fastjson.TypeString:
		return c.text(v.GetStringBytes())
	case fastjson.TypeNumber:
		return 1
	case fastjson.TypeArray:
		n := 0
		for _, x := range v.GetArray() {
			n += c.prompt(x)
		}
		return n
	}
	return c.strings(v)
}

// strings counts every string value below v (object keys excluded).
func (c counter) strings(v *fastjson.Value) int {
	return c.stringsExcept(v, "", "")
}

func (c counter) stringsExcept(v *fastjson.Value, skip1, skip2 string) int {
	if v == nil {
		return 0
	}
	switch v.Type() {
	case fastjson.TypeString:
		return c.text(v.GetStringBytes())
	case fastjson.TypeArray:
		n := 0
		for _, x := range v.GetArray() {
			n += c.strings(x)
		}
		return n
	case fastjson.TypeObject:
		n := 0
		v.GetObject().Visit(func(key []byte, x *fastjson.Value) {
			if len(key) > 0 && (string(key) == skip1 || string(key) == skip2) {
				return
			}
			n += c.strings(x)
		})
		return n
	}
	return 0
}

// scalar counts a string, or the JSON text of a number or boolean.
func (c counter) scalar(v *fastjson.Value) int {
	if v.Type() == fastjson.TypeString {
		return c.text(v.GetStringBytes())
	}
	var buf [32]byte
	return c.text(v.MarshalTo(buf[:0]))
}

func trimDot(b []byte) []byte {
	return bytes.TrimSuffix(b, []byte("."))
}
