package mock

import (
	"context"
	"net/http"
	"strconv"
	"strings"
)

// Anthropic's Messages API, as the mock answers it: a message whose text
// is its words, with Anthropic's usage (no cache), or its stream
// (message_start, a content block of deltas, message_delta with the
// output, message_stop). The mock is what llbench drives to compare an
// Anthropic request through the gateway with an OpenAI one.

func (m *Mock) messages(w http.ResponseWriter, ctx context.Context, req mockRequest) {
	id := "msg_mock_" + strconv.FormatUint(m.seq.Add(1), 10)
	var sb strings.Builder
	for i := range req.words {
		sb.WriteString(req.word(i))
	}
	text := sb.String()
	out := m.completionTokens(req, text)
	stop := `"end_turn"`
	if req.finish == "length" {
		stop = `"max_tokens"`
	}
	if !req.stream {
		b := make([]byte, 0, 256+len(text))
		b = append(b, `{"id":"`...)
		b = append(b, id...)
		b = append(b, `","type":"message","role":"assistant","model":`...)
		b = appendJSONString(b, req.model)
		b = append(b, `,"content":[{"type":"text","text":`...)
		b = appendJSONString(b, text)
		b = append(b, `}],"stop_reason":`...)
		b = append(b, stop...)
		b = append(b, `,"stop_sequence":null,"usage":`...)
		b = appendMessagesUsage(b, req.prompt, out)
		b = append(b, "}\n"...)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		w.Write(b)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	flush := func(b []byte) bool {
		if _, err := w.Write(b); err != nil {
			return false
		}
		if flusher != nil {
			flusher.Flush()
		}
		return true
	}
	b := make([]byte, 0, 512)
	b = append(b, "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\""...)
	b = append(b, id...)
	b = append(b, `","type":"message","role":"assistant","model":`...)
	b = appendJSONString(b, req.model)
	b = append(b, `,"content":[],"stop_reason":null,"stop_sequence":null,"usage":`...)
	b = appendMessagesUsage(b, req.prompt, 1)
	b = append(b, "}}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n"...)
	if !flush(b) {
		return
	}
	for i := range req.words {
		if !sleep(ctx, m.cfg.ChunkDelay) {
			return
		}
		b = append(b[:0], "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":"...)
		b = appendJSONString(b, req.word(i))
		b = append(b, "}}\n\n"...)
		if !flush(b) {
			return
		}
	}
	b = append(b[:0], "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n"...)
	b = append(b, "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":"...)
	b = append(b, stop...)
	b = append(b, `,"stop_sequence":null},"usage":{"output_tokens":`...)
	b = strconv.AppendInt(b, int64(out), 10)
	b = append(b, "}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"...)
	flush(b)
}

func appendMessagesUsage(b []byte, input, output int) []byte {
	b = append(b, `{"input_tokens":`...)
	b = strconv.AppendInt(b, int64(input), 10)
	b = append(b, `,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":`...)
	b = strconv.AppendInt(b, int64(output), 10)
	return append(b, '}')
}
