package provider

import (
	"bytes"
	"io"
)

// StreamTap reads an OpenAI server-sent-event stream on its way to the
// client and finds its usage (the chunk that include_usage adds, or the
// Responses API's response.completed event). With strip set (the gateway
// asked for usage, the client did not) it also removes what include_usage
// added, so the client gets the bytes it would have got without it: the
// final chunk whose choices are empty, and the "usage":null member of every
// other chunk.
//
// Without strip, bytes pass through as they arrive. With strip, each event
// is released as soon as its blank line arrives; nothing waits for more
// than one event.
type StreamTap struct {
	src   io.ReadCloser
	strip bool
	ev    []byte // the current, incomplete event
	out   []byte // transformed bytes not yet returned (strip mode)
	usage Usage
	found bool
	eof   bool
	err   error
	rbuf  []byte
}

// NewStreamTap wraps an SSE response body.
func NewStreamTap(src io.ReadCloser, strip bool) *StreamTap {
	t := &StreamTap{}
	t.Reset(src, strip)
	return t
}

// Reset makes t tap src, forgetting what it saw before but keeping its
// buffers.
func (t *StreamTap) Reset(src io.ReadCloser, strip bool) {
	t.src, t.strip = src, strip
	t.ev, t.out = t.ev[:0], t.out[:0]
	t.usage, t.found, t.eof, t.err = Usage{}, false, false, nil
}

var (
	usageNull    = []byte(`"usage":null`)
	emptyChoices = []byte(`"choices":[]`)
)

func (t *StreamTap) Read(p []byte) (int, error) {
	if !t.strip {
		n, err := t.src.Read(p)
		t.scan(p[:n])
		if err == io.EOF {
			t.eof = true
		}
		return n, err
	}
	for len(t.out) == 0 {
		if t.err != nil {
			return 0, t.err
		}
		if cap(t.rbuf) == 0 {
			t.rbuf = make([]byte, 32<<10)
		}
		n, err := t.src.Read(t.rbuf)
		t.scan(t.rbuf[:n])
		if err != nil {
			if err == io.EOF {
				t.eof = true
			}
			t.out = append(t.out, t.ev...) // an unterminated last event goes as it is
			t.ev = t.ev[:0]
			t.err = err
		}
	}
	n := copy(p, t.out)
	t.out = t.out[:copy(t.out, t.out[n:])]
	return n, nil
}

// scan adds b to the current event and handles every event it completes.
func (t *StreamTap) scan(b []byte) {
	from := max(0, len(t.ev)-3) // a boundary may straddle two reads
	t.ev = append(t.ev, b...)
	start := 0
	for {
		end := eventBoundary(t.ev[from:])
		if end < 0 {
			break
		}
		end += from
		t.event(t.ev[start:end])
		start, from = end, end
	}
	t.ev = t.ev[:copy(t.ev, t.ev[start:])]
	if len(t.ev) > maxEvent {
		// Not an event stream we understand: stop holding bytes back.
		if t.strip {
			t.out = append(t.out, t.ev...)
		}
		t.ev = t.ev[:0]
	}
}

const maxEvent = 1 << 20

// eventBoundary returns the end of the first event in b (just past its
// blank line: "\n\n", "\r\n\r\n" or "\r\r"), or -1.
func eventBoundary(b []byte) int {
	for i := 0; i+1 < len(b); i++ {
		switch {
		case b[i] == '\n' && b[i+1] == '\n':
			return i + 2
		case b[i] == '\r' && b[i+1] == '\r':
			return i + 2
		case b[i] == '\r' && b[i+1] == '\n' && i+3 < len(b) && b[i+2] == '\r' && b[i+3] == '\n':
			return i + 4
		}
	}
	return -1
}

// event handles one complete event.
func (t *StreamTap) event(ev []byte) {
	if bytes.Contains(ev, usageKey) {
		if u, ok := FindUsage(ev); ok {
			t.usage, t.found = u, true
			if t.strip && bytes.Contains(ev, emptyChoices) {
				return // the chunk include_usage added
			}
		}
		if t.strip {
			ev = removeUsageNull(ev)
		}
	}
	if t.strip {
		t.out = append(t.out, ev...)
	}
}

// removeUsageNull deletes one `"usage":null` member and its comma, in place.
func removeUsageNull(ev []byte) []byte {
	i := bytes.Index(ev, usageNull)
	if i < 0 {
		return ev
	}
	start, end := i, i+len(usageNull)
	switch {
	case start > 0 && ev[start-1] == ',':
		start--
	case end < len(ev) && ev[end] == ',':
		end++
	}
	return append(ev[:start], ev[end:]...)
}

// Close closes the upstream body.
func (t *StreamTap) Close() error { return t.src.Close() }

// Usage returns the usage the stream reported, if it was read to the end
// and reported one. A stream cut short has none.
func (t *StreamTap) Usage() (Usage, bool) {
	if !t.eof {
		return Usage{}, false
	}
	return t.usage, t.found
}
