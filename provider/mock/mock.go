// Package mock is an OpenAI-compatible upstream that answers locally, with
// deterministic text and an exact usage: the gateway's demo route, its
// load tests and its own tests run on it with no key and no network. It
// serves in process (HandlerTransport) or as `llproxy mock-server`.
package mock

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fastjson"
)

// Config shapes the mock upstream's answers. The zero value answers at
// once with 16 words.
type Config struct {
	// Latency is waited before the response headers (time to first token).
	Latency time.Duration
	// Chunks is how many words a completion has, one SSE chunk each when
	// streamed, capped by the request's max tokens. 0 means 16.
	Chunks int
	// ChunkDelay is waited between two streamed chunks.
	ChunkDelay time.Duration
	// Models are listed by /v1/models. Empty means ["mock"].
	Models []string
	// RPM, if above 0, is a requests-per-minute limit the mock enforces
	// as OpenAI does (x-ratelimit-*-requests headers, 429s), its bucket
	// holding RPMSlack requests more than a minute's worth.
	RPM      int
	RPMSlack int
}

// Validate reports fields out of range by JSON name.
func (c Config) Validate() error {
	var errs []error
	if c.Latency < 0 {
		errs = append(errs, fmt.Errorf("latency: must be >= 0"))
	}
	if c.ChunkDelay < 0 {
		errs = append(errs, fmt.Errorf("chunkDelay: must be >= 0"))
	}
	if c.RPM < 0 || c.RPM > 1e9 {
		errs = append(errs, fmt.Errorf("rpm: must be between 0 and 1000000000, got %d", c.RPM))
	}
	if c.RPMSlack < 0 || c.RPMSlack > 1e9 {
		errs = append(errs, fmt.Errorf("rpmSlack: must be between 0 and 1000000000, got %d", c.RPMSlack))
	}
	if c.Chunks < 0 || c.Chunks > 100000 {
		errs = append(errs, fmt.Errorf("chunks: must be between 0 and 100000, got %d", c.Chunks))
	}
	return errors.Join(errs...)
}

// TokenCounter lets the mock report the same usage the gateway counts. The
// gateway passes its tokenizer; without one the mock estimates.
type TokenCounter interface {
	// PromptTokens counts the prompt of a request body sent to path.
	PromptTokens(path, model string, body *fastjson.Value) int
	// TextTokens counts a generated text.
	TextTokens(model, text string) int
}

// Mock is an OpenAI-compatible upstream that answers chat completions,
// completions, embeddings and the model list locally with deterministic text
// and a correct usage, streamed as SSE when asked. It is safe for concurrent
// use.
type Mock struct {
	cfg     Config
	counter TokenCounter
	parsers fastjson.ParserPool
	seq     atomic.Uint64
	models  []byte   // the /v1/models answer, built once
	limit   *limiter // nil: no limit
}

// mockWords are each one token (with their leading space) in both o200k and
// cl100k, so a completion of n words is n tokens.
var mockWords = []string{" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy",
	" dog", " and", " runs", " far", " away", " from", " home", " today"}

// New returns a mock upstream. counter may be nil.
func New(cfg Config, counter TokenCounter) *Mock {
	if cfg.Chunks == 0 {
		cfg.Chunks = 16
	}
	if len(cfg.Models) == 0 {
		cfg.Models = []string{"mock"}
	}
	m := &Mock{cfg: cfg, counter: counter}
	if cfg.RPM > 0 {
		m.limit = newLimiter(cfg.RPM, cfg.RPMSlack, time.Now())
	}
	b := []byte(`{"object":"list","data":[`)
	for i, id := range cfg.Models {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"id":`...)
		b = appendJSONString(b, id)
		b = append(b, `,"object":"model","created":0,"owned_by":"llproxy-mock"}`...)
	}
	m.models = append(b, "]}"...)
	return m
}

// Limited is what the mock's RPM limit answered and refused so far (0, 0
// without one).
func (m *Mock) Limited() (answered, refused int64) {
	if m.limit == nil {
		return 0, 0
	}
	return m.limit.counts()
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}

// ServeHTTP answers by the path's suffix, so "/v1/chat/completions" and
// "/chat/completions" both work.
func (m *Mock) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path := r.URL.Path
	switch {
	case strings.HasSuffix(path, "/models") && r.Method == http.MethodGet:
		w.Header().Set("Content-Type", "application/json")
		w.Write(m.models)
		return
	case strings.HasSuffix(path, "/chat/completions"), strings.HasSuffix(path, "/completions"),
		strings.HasSuffix(path, "/embeddings"), strings.HasSuffix(path, "/responses"), strings.HasSuffix(path, "/v1/messages"):
	default:
		mockError(w, http.StatusNotFound, "invalid_request_error", "unknown_url", "Unknown request URL: "+r.Method+" "+path)
		return
	}
	if r.Method != http.MethodPost {
		mockError(w, http.StatusMethodNotAllowed, "invalid_request_error", "method_not_allowed", "use POST")
		return
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	body, err := readAll(r, (*bp)[:0])
	*bp = body
	if err != nil {
		mockError(w, http.StatusBadRequest, "invalid_request_error", "", "reading body: "+err.Error())
		return
	}
	p := m.parsers.Get()
	defer m.parsers.Put(p)
	v, err := p.ParseBytes(body)
	if err != nil || v.Type() != fastjson.TypeObject {
		mockError(w, http.StatusBadRequest, "invalid_request_error", "", "We could not parse the JSON body of your request.")
		return
	}
	if m.limit != nil && !m.limit.admit(w, time.Now()) {
		return
	}
	if !sleep(r.Context(), m.cfg.Latency) {
		return
	}
	req := m.parse(path, v)
	if strings.HasSuffix(path, "/embeddings") {
		m.embeddings(w, req, v)
		return
	}
	if strings.HasSuffix(path, "/responses") {
		m.responses(w, r.Context(), req)
		return
	}
	if strings.HasSuffix(path, "/v1/messages") {
		m.messages(w, r.Context(), req)
		return
	}
	if req.stream {
		m.stream(w, r.Context(), req)
		return
	}
	m.complete(w, req)
}

// mockRequest is what the mock reads from a request.
type mockRequest struct {
	chat         bool
	model        string
	stream       bool
	includeUsage bool
	words        int
	finish       string
	prompt       int
	seed         uint32
}

func (m *Mock) parse(path string, v *fastjson.Value) mockRequest {
	req := mockRequest{
		chat:         strings.HasSuffix(path, "/chat/completions"),
		model:        string(v.GetStringBytes("model")),
		stream:       v.GetBool("stream"),
		includeUsage: v.GetBool("stream_options", "include_usage"),
		words:        m.cfg.Chunks,
		finish:       "stop",
	}
	for _, k := range []string{"max_completion_tokens", "max_tokens", "max_output_tokens"} {
		if max := v.GetInt(k); max > 0 {
			if max < req.words {
				req.words, req.finish = max, "length"
			}
			break
		}
	}
	if m.counter != nil {
		req.prompt = m.counter.PromptTokens(path, req.model, v)
	} else {
		req.prompt = len(v.MarshalTo(nil)) / 4
	}
	h := fnv.New32a()
	h.Write(v.GetStringBytes("prompt"))
	if msgs := v.GetArray("messages"); len(msgs) > 0 {
		h.Write(msgs[len(msgs)-1].GetStringBytes("content"))
	}
	req.seed = h.Sum32()
	return req
}

func (req mockRequest) word(i int) string { return mockWords[(int(req.seed)+i)%len(mockWords)] }

func (m *Mock) completionTokens(req mockRequest, text string) int {
	if m.counter != nil {
		return m.counter.TextTokens(req.model, text)
	}
	return req.words
}

func (m *Mock) id(req mockRequest) string {
	prefix := "cmpl-mock-"
	if req.chat {
		prefix = "chatcmpl-mock-"
	}
	return prefix + strconv.FormatUint(m.seq.Add(1), 10)
}

func (m *Mock) complete(w http.ResponseWriter, req mockRequest) {
	var sb strings.Builder
	for i := range req.words {
		sb.WriteString(req.word(i))
	}
	text := sb.String()
	b := m.head(nil, req, false)
	if req.chat {
		b = append(b, `"choices":[{"index":0,"message":{"role":"assistant","content":`...)
		b = appendJSONString(b, text)
		b = append(b, `,"refusal":null},"logprobs":null,"finish_reason":"`...)
	} else {
		b = append(b, `"choices":[{"index":0,"text":`...)
		b = appendJSONString(b, text)
		b = append(b, `,"logprobs":null,"finish_reason":"`...)
	}
	b = append(b, req.finish...)
	b = append(b, `"}],`...)
	b = appendUsage(b, req.prompt, m.completionTokens(req, text))
	b = append(b, "}\n"...)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.Write(b)
}

// head writes the fields every completion object starts with.
func (m *Mock) head(b []byte, req mockRequest, chunk bool) []byte {
	b = append(b, `{"id":"`...)
	b = append(b, m.id(req)...)
	obj := "text_completion"
	if req.chat {
		obj = "chat.completion"
		if chunk {
			obj = "chat.completion.chunk"
		}
	}
	b = append(b, `","object":"`...)
	b = append(b, obj...)
	b = append(b, `","created":`...)
	b = strconv.AppendInt(b, time.Now().Unix(), 10)
	b = append(b, `,"model":`...)
	b = appendJSONString(b, req.model)
	return append(b, ',')
}

func (m *Mock) stream(w http.ResponseWriter, ctx context.Context, req mockRequest) {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	id := m.id(req)
	var text strings.Builder
	b := make([]byte, 0, 512)
	for i := 0; i <= req.words; i++ {
		if i > 0 && !sleep(ctx, m.cfg.ChunkDelay) {
			return
		}
		b = m.chunkStart(b[:0], req, id)
		last := i == req.words
		content := ""
		if !last {
			content = req.word(i)
			text.WriteString(content)
		}
		if req.chat {
			b = append(b, `"choices":[{"index":0,"delta":{`...)
			if i == 0 {
				b = append(b, `"role":"assistant",`...)
			}
			b = append(b, `"content":`...)
			b = appendJSONString(b, content)
			b = append(b, `},"logprobs":null,"finish_reason":`...)
		} else {
			b = append(b, `"choices":[{"index":0,"text":`...)
			b = appendJSONString(b, content)
			b = append(b, `,"logprobs":null,"finish_reason":`...)
		}
		if last {
			b = append(b, '"')
			b = append(b, req.finish...)
			b = append(b, '"')
		} else {
			b = append(b, "null"...)
		}
		b = append(b, '}', ']')
		if req.includeUsage {
			b = append(b, `,"usage":null`...)
		}
		b = append(b, "}\n\n"...)
		if _, err := w.Write(b); err != nil {
			return
		}
		if flusher != nil {
			flusher.Flush()
		}
	}
	if req.includeUsage {
		b = m.chunkStart(b[:0], req, id)
		b = append(b, `"choices":[],`...)
		b = appendUsage(b, req.prompt, m.completionTokens(req, text.String()))
		b = append(b, "}\n\n"...)
		w.Write(b)
	}
	w.Write([]byte("data: [DONE]\n\n"))
	if flusher != nil {
		flusher.Flush()
	}
}

func (m *Mock) chunkStart(b []byte, req mockRequest, id string) []byte {
	b = append(b, `data: {"id":"`...)
	b = append(b, id...)
	if req.chat {
		b = append(b, `","object":"chat.completion.chunk","created":`...)
	} else {
		b = append(b, `","object":"text_completion","created":`...)
	}
	b = strconv.AppendInt(b, time.Now().Unix(), 10)
	b = append(b, `,"model":`...)
	b = appendJSONString(b, req.model)
	return append(b, ',')
}

func (m *Mock) embeddings(w http.ResponseWriter, req mockRequest, v *fastjson.Value) {
	n := 1
	if in := v.Get("input"); in != nil && in.Type() == fastjson.TypeArray {
		if arr := in.GetArray(); len(arr) > 0 && arr[0].Type() != fastjson.TypeNumber {
			n = len(arr)
		}
	}
	b := append([]byte(nil), `{"object":"list","data":[`...)
	for i := range n {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"object":"embedding","index":`...)
		b = strconv.AppendInt(b, int64(i), 10)
		vec := [8]float32{}
		for j := range vec {
			vec[j] = float32((int(req.seed)+i*8+j)%97) / 97
		}
		if string(v.GetStringBytes("encoding_format")) == "base64" {
			// Little-endian float32s, base64: what the SDKs ask for by
			// default and decode.
			var raw [len(vec) * 4]byte
			for j, f := range vec {
				binary.LittleEndian.PutUint32(raw[4*j:], math.Float32bits(f))
			}
			b = append(b, `,"embedding":"`...)
			b = base64.StdEncoding.AppendEncode(b, raw[:])
			b = append(b, `"}`...)
			continue
		}
		b = append(b, `,"embedding":[`...)
		for j, f := range vec {
			if j > 0 {
				b = append(b, ',')
			}
			b = strconv.AppendFloat(b, float64(f), 'f', 6, 32)
		}
		b = append(b, "]}"...)
	}
	b = append(b, `],"model":`...)
	b = appendJSONString(b, req.model)
	b = append(b, `,"usage":{"prompt_tokens":`...)
	b = strconv.AppendInt(b, int64(req.prompt), 10)
	b = append(b, `,"total_tokens":`...)
	b = strconv.AppendInt(b, int64(req.prompt), 10)
	b = append(b, "}}\n"...)
	w.Header().Set("Content-Type", "application/json")
	w.Write(b)
}

func appendUsage(b []byte, prompt, completion int) []byte {
	b = append(b, `"usage":{"prompt_tokens":`...)
	b = strconv.AppendInt(b, int64(prompt), 10)
	b = append(b, `,"completion_tokens":`...)
	b = strconv.AppendInt(b, int64(completion), 10)
	b = append(b, `,"total_tokens":`...)
	b = strconv.AppendInt(b, int64(prompt+completion), 10)
	return append(b, '}')
}

// appendJSONString appends s as a JSON string literal.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == '"' || c == '\\' || c >= 0x7f {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

func mockError(w http.ResponseWriter, status int, typ, code, msg string) {
	b := append([]byte(nil), `{"error":{"message":`...)
	b = appendJSONString(b, msg)
	b = append(b, `,"type":`...)
	b = appendJSONString(b, typ)
	b = append(b, `,"param":null,"code":`...)
	if code == "" {
		b = append(b, "null"...)
	} else {
		b = appendJSONString(b, code)
	}
	b = append(b, "}}\n"...)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(b)
}

// readAll reads r's body into buf, growing it as needed. A request with
// no body (nil, as a client's request may have) reads as empty.
func readAll(r *http.Request, buf []byte) ([]byte, error) {
	if r.Body == nil {
		return buf, nil
	}
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := r.Body.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err != nil {
			if errors.Is(err, io.EOF) {
				return buf, nil
			}
			return buf, err
		}
	}
}

// sleep waits d unless ctx ends first; it reports whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
