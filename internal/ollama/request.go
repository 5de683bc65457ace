package ollama

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	gwrequest "github.com/llproxy/llproxy/internal/request"
)

// request is an /api/chat or /api/generate body.
type request struct {
	Model    string          `json:"model"`
	Messages []message       `json:"messages"` // chat
	Prompt   string          `json:"prompt"`   // generate
	System   string          `json:"system"`   // generate
	Suffix   string          `json:"suffix"`   // generate
	Images   []string        `json:"images"`   // generate
	Tools    json.RawMessage `json:"tools"`
	Format   json.RawMessage `json:"format"`
	Options  map[string]any  `json:"options"`
	Stream   *bool           `json:"stream"`
	// KeepAlive is read by the model lifecycle, never forwarded.
	KeepAlive json.RawMessage `json:"keep_alive"`
}

type message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	Images    []string   `json:"images,omitempty"`
	ToolCalls []toolCall `json:"tool_calls,omitempty"`
	ToolName  string     `json:"tool_name,omitempty"`
}

type toolCall struct {
	Function struct {
		Name      string          `json:"name"`
		Arguments json.RawMessage `json:"arguments"`
	} `json:"function"`
}

// stream reports whether the client wants NDJSON: Ollama's server streams
// unless told not to.
func (r *request) stream() bool { return r.Stream == nil || *r.Stream }

// isLoad reports a load or unload request: a model and no prompt.
func (r *request) isLoad(generate bool) bool {
	if generate {
		return r.Prompt == "" && len(r.Images) == 0
	}
	return len(r.Messages) == 0
}

// keepAlive is the request's keep_alive (top level, else in options):
// a number of seconds or a duration string; negative means forever.
func (r *request) keepAlive() (*time.Duration, error) {
	raw := r.KeepAlive
	if len(raw) == 0 || string(raw) == "null" {
		if o, ok := r.Options["keep_alive"]; ok {
			raw, _ = json.Marshal(o)
		}
	}
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	d, err := gwrequest.ParseKeepAlive(raw)
	if err != nil {
		return nil, err
	}
	return &d, nil
}

// openAI translates r into an OpenAI chat completions body: messages (with
// images as data: URLs, tool calls and tool results), tools, format as a
// response_format, and the options that mean something to an
// OpenAI-compatible server. Streams ask for the final usage chunk, which
// the done line reports.
func (r *request) openAI(generate bool) ([]byte, error) {
	out := map[string]any{"model": r.Model}
	ka, err := r.keepAlive()
	if err != nil {
		return nil, err
	}
	if ka != nil {
		// For llproxy's model lifecycle; the gateway removes it before
		// forwarding.
		out["keep_alive"] = ka.Seconds()
	}
	var msgs []map[string]any
	if generate {
		if r.System != "" {
			msgs = append(msgs, map[string]any{"role": "system", "content": r.System})
		}
		msgs = append(msgs, userMessage(r.Prompt+r.Suffix, r.Images))
	} else {
		ids := map[string][]string{} // tool name -> call ids not yet answered
		n := 0
		for _, m := range r.Messages {
			switch {
			case m.Role == "assistant" && len(m.ToolCalls) > 0:
				calls := make([]map[string]any, len(m.ToolCalls))
				for i, tc := range m.ToolCalls {
					n++
					id := "call_" + strconv.Itoa(n)
					ids[tc.Function.Name] = append(ids[tc.Function.Name], id)
					args := string(tc.Function.Arguments)
					if args == "" {
						args = "{}"
					}
					calls[i] = map[string]any{"id": id, "type": "function",
						"function": map[string]any{"name": tc.Function.Name, "arguments": args}}
				}
				msgs = append(msgs, map[string]any{"role": "assistant", "content": m.Content, "tool_calls": calls})
			case m.Role == "tool":
				tm := map[string]any{"role": "tool", "content": m.Content}
				if q := ids[m.ToolName]; len(q) > 0 {
					tm["tool_call_id"], ids[m.ToolName] = q[0], q[1:]
				} else {
					tm["tool_call_id"] = "call_" + m.ToolName
				}
				msgs = append(msgs, tm)
			case m.Role == "user" && len(m.Images) > 0:
				msgs = append(msgs, userMessage(m.Content, m.Images))
			default:
				msgs = append(msgs, map[string]any{"role": m.Role, "content": m.Content})
			}
		}
	}
	out["messages"] = msgs
	if len(r.Tools) > 0 && string(r.Tools) != "null" {
		out["tools"] = r.Tools
	}
	switch f := strings.TrimSpace(string(r.Format)); {
	case f == "" || f == "null" || f == `""`:
	case f == `"json"`:
		out["response_format"] = map[string]any{"type": "json_object"}
	case strings.HasPrefix(f, "{"):
		out["response_format"] = map[string]any{"type": "json_schema",
			"json_schema": map[string]any{"name": "response", "schema": r.Format}}
	default:
		return nil, fmt.Errorf("invalid format %s: want \"json\" or a JSON schema", f)
	}
	for k, v := range r.Options {
		switch k {
		case "num_predict":
			if n, ok := v.(float64); ok && n > 0 {
				out["max_tokens"] = int(min(n, maxNumPredict)) // the gateway bounds it again
			}
		case "temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty",
			"frequency_penalty", "repeat_penalty", "typical_p":
			out[k] = v
		}
		// num_ctx, num_gpu, num_thread...: the server's own settings,
		// meaningless per request over the OpenAI API.
	}
	// Always streamed from the upstream, even when the client wants one
	// object: the answer is translated as it arrives, and only its text
	// is held, never the upstream's whole body.
	out["stream"] = true
	out["stream_options"] = map[string]any{"include_usage": true}
	return json.Marshal(out)
}

// maxNumPredict bounds num_predict before it becomes an integer.
const maxNumPredict = 1 << 24

// userMessage is a user message with Ollama's base64 images as content
// parts.
func userMessage(text string, images []string) map[string]any {
	if len(images) == 0 {
		return map[string]any{"role": "user", "content": text}
	}
	parts := []map[string]any{{"type": "text", "text": text}}
	for _, img := range images {
		parts = append(parts, map[string]any{"type": "image_url",
			"image_url": map[string]any{"url": "data:" + imageType(img) + ";base64," + img}})
	}
	return map[string]any{"role": "user", "content": parts}
}

// imageType sniffs the media type of a base64 image.
func imageType(b64 string) string {
	head, _ := base64.StdEncoding.DecodeString(b64[:min(len(b64), 64)/4*4])
	if t := http.DetectContentType(head); strings.HasPrefix(t, "image/") {
		return t
	}
	return "image/png"
}
