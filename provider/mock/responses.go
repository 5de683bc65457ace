package mock

import (
	"context"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// responses answers the Responses API (POST /v1/responses): one message of
// output text, or, streamed, response.created, one
// response.output_text.delta per word and response.completed with the
// usage, as OpenAI sends them.
func (m *Mock) responses(w http.ResponseWriter, ctx context.Context, req mockRequest) {
	id := "resp_mock-" + strconv.FormatUint(m.seq.Add(1), 10)
	var text strings.Builder
	for i := range req.words {
		text.WriteString(req.word(i))
	}
	if !req.stream {
		w.Header().Set("Content-Type", "application/json")
		w.Write(append(m.responseObject(nil, id, req, "completed", text.String()), '\n'))
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	seq := 0
	send := func(typ string, body []byte) bool {
		b := append([]byte("event: "), typ...)
		b = append(b, "\ndata: {\"type\":\""...)
		b = append(b, typ...)
		b = append(b, `","sequence_number":`...)
		b = strconv.AppendInt(b, int64(seq), 10)
		seq++
		b = append(b, ',')
		b = append(b, body...)
		b = append(b, "}\n\n"...)
		if _, err := w.Write(b); err != nil {
			return false
		}
		if flusher != nil {
			flusher.Flush()
		}
		return true
	}
	if !send("response.created", append([]byte(`"response":`), m.responseObject(nil, id, req, "in_progress", "")...)) {
		return
	}
	for i := range req.words {
		if i > 0 && !sleep(ctx, time.Duration(m.cfg.ChunkDelay)) {
			return
		}
		d := append([]byte(`"item_id":"msg_`), id...)
		d = append(d, `","output_index":0,"content_index":0,"delta":`...)
		d = appendJSONString(d, req.word(i))
		if !send("response.output_text.delta", d) {
			return
		}
	}
	send("response.completed", append([]byte(`"response":`), m.responseObject(nil, id, req, "completed", text.String())...))
}

// responseObject appends a Response object with status and, once
// completed, its output text and usage.
func (m *Mock) responseObject(b []byte, id string, req mockRequest, status, text string) []byte {
	b = append(b, `{"id":"`...)
	b = append(b, id...)
	b = append(b, `","object":"response","created_at":`...)
	b = strconv.AppendInt(b, time.Now().Unix(), 10)
	b = append(b, `,"status":"`...)
	b = append(b, status...)
	b = append(b, `","model":`...)
	b = appendJSONString(b, req.model)
	b = append(b, `,"output":[`...)
	if status == "completed" {
		b = append(b, `{"type":"message","id":"msg_`...)
		b = append(b, id...)
		b = append(b, `","status":"completed","role":"assistant","content":[{"type":"output_text","text":`...)
		b = appendJSONString(b, text)
		b = append(b, `,"annotations":[]}]}`...)
	}
	b = append(b, `],"usage":`...)
	if status != "completed" {
		return append(append(b, "null"...), '}')
	}
	out := m.completionTokens(req, text)
	b = append(b, `{"input_tokens":`...)
	b = strconv.AppendInt(b, int64(req.prompt), 10)
	b = append(b, `,"output_tokens":`...)
	b = strconv.AppendInt(b, int64(out), 10)
	b = append(b, `,"total_tokens":`...)
	b = strconv.AppendInt(b, int64(req.prompt+out), 10)
	return append(b, "}}"...)
}
