package ollama

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/provider"
)

// chat serves /api/chat (generate false) and /api/generate (generate true).
func (h *Handler) chat(w http.ResponseWriter, r *http.Request, generate bool) {
	start := h.now()
	var req request
	if err := json.NewDecoder(io.LimitReader(r.Body, 64<<20)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "invalid request: "+err.Error())
		return
	}
	if req.Model == "" {
		writeError(w, http.StatusBadRequest, "model is required")
		return
	}
	if !h.gw.Known(req.Model) {
		writeError(w, http.StatusNotFound, "model '"+req.Model+"' not found")
		return
	}
	out := &reply{h: h, w: w, model: req.Model, generate: generate, start: start}
	if req.isLoad(generate) {
		ka, err := req.keepAlive()
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		out.stream = req.stream()
		var refused *Refusal
		if ka != nil && *ka == 0 {
			if err := h.gw.Unload(r, req.Model); errors.As(err, &refused) {
				writeError(w, refused.Status, refused.Message)
				return
			}
			out.done("unload", usage{})
			return
		}
		if err := h.gw.Load(r, req.Model, ka); err != nil {
			status := http.StatusServiceUnavailable
			if errors.As(err, &refused) {
				status = refused.Status
			}
			writeError(w, status, err.Error())
			return
		}
		out.done("load", usage{})
		return
	}
	body, err := req.openAI(generate)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	out.stream = req.stream()
	rec := &capture{out: out}
	h.gw.ServeChat(rec, r, req.Model, body)
	rec.finish()
}

// reply writes the Ollama answer: NDJSON lines as the OpenAI stream
// arrives, or one object at the end.
type reply struct {
	h        *Handler
	w        http.ResponseWriter
	model    string
	generate bool
	stream   bool
	start    time.Time
	first    time.Time // first token
	started  bool      // NDJSON header sent
	text     strings.Builder
	calls    []map[string]any
}

type usage struct{ prompt, completion int }

func (o *reply) line(v map[string]any) {
	if !o.started {
		o.w.Header().Set("Content-Type", "application/x-ndjson")
		o.w.WriteHeader(http.StatusOK)
		o.started = true
	}
	b, _ := json.Marshal(v)
	o.w.Write(append(b, '\n'))
	if f, ok := o.w.(http.Flusher); ok {
		f.Flush()
	}
}

func (o *reply) base() map[string]any {
	return map[string]any{"model": o.model, "created_at": o.h.now().UTC().Format(time.RFC3339Nano)}
}

// delta reports streamed text.
func (o *reply) delta(content string) {
	if content == "" {
		return
	}
	if o.first.IsZero() {
		o.first = o.h.now()
	}
	if !o.stream {
		o.text.WriteString(content)
		return
	}
	v := o.base()
	o.put(v, content, nil)
	v["done"] = false
	o.line(v)
}

// put sets the text (and tool calls) of v the way each endpoint names it.
func (o *reply) put(v map[string]any, content string, calls []map[string]any) {
	if o.generate {
		v["response"] = content
		return
	}
	msg := map[string]any{"role": "assistant", "content": content}
	if len(calls) > 0 {
		msg["tool_calls"] = calls
	}
	v["message"] = msg
}

// done writes the last line (or the whole answer), with Ollama's counts
// and durations in nanoseconds.
func (o *reply) done(reason string, u usage) {
	now := o.h.now()
	total := now.Sub(o.start)
	promptEval := total
	if !o.first.IsZero() {
		promptEval = o.first.Sub(o.start)
	}
	v := o.base()
	content := ""
	if !o.stream {
		content = o.text.String()
	} else if len(o.calls) > 0 {
		// Tool calls go in a line of their own before the end, as
		// Ollama streams them.
		c := o.base()
		o.put(c, "", o.calls)
		c["done"] = false
		o.line(c)
	}
	calls := o.calls
	if o.stream {
		calls = nil
	}
	o.put(v, content, calls)
	v["done"] = true
	v["done_reason"] = reason
	if reason != "load" && reason != "unload" {
		v["total_duration"] = total.Nanoseconds()
		v["load_duration"] = 0
		v["prompt_eval_count"] = u.prompt
		v["prompt_eval_duration"] = promptEval.Nanoseconds()
		v["eval_count"] = u.completion
		v["eval_duration"] = (total - promptEval).Nanoseconds()
		if o.generate {
			v["context"] = []int{}
		}
	} else {
		v["total_duration"], v["load_duration"] = total.Nanoseconds(), 0
	}
	if o.stream {
		o.line(v)
		return
	}
	writeJSON(o.w, http.StatusOK, v)
}

// fail ends the answer with Ollama's error shape: a status before anything
// was sent, an {"error"} line after.
func (o *reply) fail(status int, msg string) {
	if o.started {
		o.line(map[string]any{"error": msg})
		return
	}
	writeError(o.w, status, msg)
}

// capture is the ResponseWriter the gateway answers into: it turns the
// OpenAI answer (SSE events, a JSON object, or an OpenAI error) into the
// Ollama reply as it arrives.
type capture struct {
	out    *reply
	header http.Header
	status int
	buf    []byte // a JSON answer, or the incomplete SSE event
	sse    bool
	reason string
	usage  usage
	ended  bool
	acc    map[int]*callAcc // streamed tool calls by index
}

type callAcc struct {
	name string
	args strings.Builder
}

func (c *capture) Header() http.Header {
	if c.header == nil {
		c.header = http.Header{}
	}
	return c.header
}

func (c *capture) WriteHeader(code int) {
	if c.status != 0 {
		return
	}
	c.status = code
	c.sse = code == http.StatusOK && strings.HasPrefix(c.Header().Get("Content-Type"), "text/event-stream")
	if ra := c.Header().Get("Retry-After"); ra != "" {
		c.out.w.Header().Set("Retry-After", ra)
	}
}

// maxHeld bounds what the capture holds: one SSE event not complete yet,
// or an answer that is not a stream (an error, a JSON object).
const maxHeld = 8 << 20

// errTooLarge stops the gateway's copy of an answer the façade will not hold.
var errTooLarge = errors.New("ollama: the upstream's answer is too large to translate")

func (c *capture) Write(p []byte) (int, error) {
	if c.status == 0 {
		c.WriteHeader(http.StatusOK)
	}
	if c.ended {
		return len(p), nil // [DONE] or an error came: the rest is moot
	}
	c.buf = append(c.buf, p...)
	if c.sse {
		c.events()
	}
	if len(c.buf) > maxHeld {
		c.ended = true
		c.buf = nil
		c.out.fail(http.StatusBadGateway, "llproxy: "+errTooLarge.Error())
		return 0, errTooLarge
	}
	return len(p), nil
}

// Flush is called by the proxy after each upstream read; the events were
// already handled in Write.
func (c *capture) Flush() {}

func (c *capture) events() {
	for !c.ended {
		end := provider.EventEnd(c.buf)
		if end < 0 {
			return
		}
		c.event(c.buf[:end])
		c.buf = c.buf[:copy(c.buf, c.buf[end:])]
	}
}

func (c *capture) event(ev []byte) {
	data := bytes.TrimSpace(provider.EventData(ev))
	if len(data) == 0 {
		return
	}
	if string(data) == "[DONE]" {
		c.end()
		return
	}
	v, err := fastjson.ParseBytes(data)
	if err != nil {
		return
	}
	if msg := v.GetStringBytes("error", "message"); msg != nil {
		c.ended = true
		c.out.fail(http.StatusInternalServerError, string(msg))
		return
	}
	if u := v.Get("usage"); u != nil && u.Type() == fastjson.TypeObject {
		c.usage = usage{u.GetInt("prompt_tokens"), u.GetInt("completion_tokens")}
	}
	for _, ch := range v.GetArray("choices") {
		d := ch.Get("delta")
		if d == nil {
			d = ch // completions-style
		}
		c.out.delta(string(d.GetStringBytes("content")))
		for _, tc := range d.GetArray("tool_calls") {
			idx := tc.GetInt("index")
			if c.acc == nil {
				c.acc = map[int]*callAcc{}
			}
			a := c.acc[idx]
			if a == nil {
				a = &callAcc{}
				c.acc[idx] = a
			}
			if n := tc.GetStringBytes("function", "name"); len(n) > 0 {
				a.name = string(n)
			}
			a.args.Write(tc.GetStringBytes("function", "arguments"))
		}
		if fr := ch.GetStringBytes("finish_reason"); len(fr) > 0 {
			c.reason = string(fr)
		}
	}
}

// end finishes a streamed answer at [DONE].
func (c *capture) end() {
	if c.ended {
		return
	}
	c.ended = true
	for i := 0; i < len(c.acc); i++ {
		if a := c.acc[i]; a != nil {
			c.out.calls = append(c.out.calls, ollamaCall(a.name, a.args.String()))
		}
	}
	c.out.done(doneReason(c.reason), c.usage)
}

// finish is called when the gateway has answered: a JSON answer or error is
// translated now; a stream that ended without [DONE] ends with an error
// line, which Ollama's clients report.
func (c *capture) finish() {
	switch {
	case c.ended:
	case c.status == 0:
		c.out.fail(http.StatusInternalServerError, "llproxy: no answer")
	case c.status != http.StatusOK:
		c.out.fail(ollamaStatus(c.status), errorMessage(c.buf))
	case c.sse:
		c.out.fail(http.StatusInternalServerError, "llproxy: the upstream stream ended early")
	default:
		c.json()
	}
}

// json translates a non-streamed OpenAI chat completion.
func (c *capture) json() {
	v, err := fastjson.ParseBytes(c.buf)
	if err != nil {
		c.out.fail(http.StatusBadGateway, "llproxy: the upstream answer is not JSON")
		return
	}
	ch := v.Get("choices", "0")
	msg := ch.Get("message")
	c.out.delta(string(msg.GetStringBytes("content")))
	for _, tc := range msg.GetArray("tool_calls") {
		c.out.calls = append(c.out.calls, ollamaCall(string(tc.GetStringBytes("function", "name")),
			string(tc.GetStringBytes("function", "arguments"))))
	}
	u := v.Get("usage")
	c.out.done(doneReason(string(ch.GetStringBytes("finish_reason"))), usage{u.GetInt("prompt_tokens"), u.GetInt("completion_tokens")})
}

// ollamaCall turns an OpenAI tool call (arguments as a JSON string) into
// Ollama's (arguments as an object).
func ollamaCall(name, args string) map[string]any {
	var obj any = map[string]any{}
	if strings.TrimSpace(args) != "" {
		if err := json.Unmarshal([]byte(args), &obj); err != nil {
			obj = map[string]any{}
		}
	}
	return map[string]any{"function": map[string]any{"name": name, "arguments": obj}}
}

func doneReason(finish string) string {
	if finish == "length" {
		return "length"
	}
	return "stop"
}

// ollamaStatus maps the gateway's status to Ollama's: a full queue or a
// rate limit is Ollama's 503 (it has no 429); upstream failures are 500s.
func ollamaStatus(status int) int {
	switch {
	case status == http.StatusTooManyRequests:
		return http.StatusServiceUnavailable
	case status >= 500:
		return http.StatusInternalServerError
	}
	return status
}

// errorMessage reads an OpenAI error body's message.
func errorMessage(body []byte) string {
	if v, err := fastjson.ParseBytes(body); err == nil {
		if m := v.GetStringBytes("error", "message"); m != nil {
			return string(m)
		}
		if m := v.GetStringBytes("error"); m != nil {
			return string(m)
		}
	}
	if s := strings.TrimSpace(string(body)); s != "" {
		return s
	}
	return "llproxy: the request failed"
}
