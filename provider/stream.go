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
// Without strip, bytes pass through as they arrive and only the stream's
// last few KiB are kept, where the usage is. With strip, each event is
// released as soon as its blank line arrives, transformed in place; nothing
// waits for more than one event. A StreamTap may be reused with Reset.
type StreamTap struct {
	src   io.ReadCloser
	strip bool
	tail  BodyTap // pass-through mode
	// strip mode: buf[:ready] is transformed and ready for the client,
	// buf[ready:] the start of an event not complete yet.
	buf   []byte
	ready int
	// messages: an Anthropic Messages stream, whose first head bytes are
	// kept too (message_start's usage is there).
	messages bool
	head     []byte
	usage    Usage
	found    bool
	eof      bool
	err      error
	sent     int   // events passed to the client (strip mode)
	out      int64 // bytes passed to the client (strip mode)
}

// newStreamTap wraps an SSE response body.
func newStreamTap(src io.ReadCloser, strip bool) *StreamTap {
	t := &StreamTap{}
	t.Reset(src, strip)
	return t
}

// Reset makes t tap src, forgetting what it saw before but keeping its
// buffers.
func (t *StreamTap) Reset(src io.ReadCloser, strip bool) {
	t.src, t.strip, t.messages, t.head = src, strip, false, t.head[:0]
	t.tail.Reset(src)
	t.buf, t.ready = t.buf[:0], 0
	t.usage, t.found, t.eof, t.err, t.sent, t.out = Usage{}, false, false, nil, 0, 0
}

var (
	usageNull    = []byte(`"usage":null`)
	emptyChoices = []byte(`"choices":[]`)
	lflf         = []byte("\n\n")
)

// maxEvent bounds how much of one event strip mode holds back; a longer
// "event" is not a stream it understands and goes through as it is.
const maxEvent = 1 << 20

// ResetMessages makes t tap src, an Anthropic Messages stream: its bytes
// pass as they are, and its usage is read from its start and its end.
func (t *StreamTap) ResetMessages(src io.ReadCloser) {
	t.Reset(src, false)
	t.messages = true
}

// headSize is how much of a Messages stream's start is kept.
const headSize = 16 << 10

func (t *StreamTap) Read(p []byte) (int, error) {
	if !t.strip {
		n, err := t.tail.Read(p)
		if t.messages && len(t.head) < headSize && n > 0 {
			t.head = append(t.head, p[:min(n, headSize-len(t.head))]...)
		}
		return n, err
	}
	for t.ready == 0 {
		if t.err != nil {
			return 0, t.err
		}
		if cap(t.buf)-len(t.buf) < 1<<10 {
			// Events are small: an open stream holds 8 KiB, more only
			// while one event is longer.
			t.buf = append(t.buf, make([]byte, 8<<10)...)[:len(t.buf)]
		}
		from := len(t.buf)
		n, err := t.src.Read(t.buf[from:cap(t.buf)])
		t.buf = t.buf[:from+n]
		t.events(from)
		if err != nil || len(t.buf)-t.ready > maxEvent {
			if err == io.EOF {
				t.eof = true
			}
			t.ready = len(t.buf) // an unterminated last event goes as it is
			t.err = err
		}
	}
	n := copy(p, t.buf[:t.ready])
	rest := copy(t.buf, t.buf[n:])
	t.buf, t.ready = t.buf[:rest], t.ready-n
	t.out += int64(n)
	return n, nil
}

// events transforms every event completed in t.buf[t.ready:] (new bytes
// start at from), compacting the buffer as it goes: each kept event is
// moved down to t.ready, then t.ready moves past it.
func (t *StreamTap) events(from int) {
	r := max(t.ready, from-3) // where to look for a blank line: it may straddle reads
	start := t.ready          // the current event starts here
	for {
		end := eventEnd(t.buf, r)
		if end < 0 {
			break
		}
		ev := t.event(t.buf[start:end])
		if len(ev) > 0 {
			t.sent++
		}
		t.ready += copy(t.buf[t.ready:], ev)
		start, r = end, end
	}
	// Move the incomplete event down behind what is ready.
	t.buf = t.buf[:t.ready+copy(t.buf[t.ready:], t.buf[start:])]
}

// eventEnd returns the end of the first event whose blank line ("\n\n",
// "\r\n\r\n" or "\r\r") is at or after from, or -1.
func eventEnd(b []byte, from int) int {
	i := bytes.Index(b[from:], lflf)
	window := b[from:]
	if i >= 0 {
		window = window[:i]
	}
	if j := bytes.IndexByte(window, '\r'); j >= 0 {
		// Rare: carriage returns. Look byte by byte up to the "\n\n".
		stop := from + len(window)
		for k := from + j; k+1 < len(b) && k < stop+1; k++ {
			switch {
			case b[k] == '\r' && b[k+1] == '\r':
				return k + 2
			case b[k] == '\r' && b[k+1] == '\n' && k+3 < len(b) && b[k+2] == '\r' && b[k+3] == '\n':
				return k + 4
			}
		}
	}
	if i < 0 {
		return -1
	}
	return from + i + 2
}

// event reads the usage from one complete event and returns what the client
// gets of it: nothing for the chunk include_usage added, the event without
// its "usage":null member otherwise.
func (t *StreamTap) event(ev []byte) []byte {
	if out, ok := removeUsageNull(ev); ok {
		return out // every chunk but the last: no usage to read
	}
	if !bytes.Contains(ev, usageKey) {
		return ev
	}
	if u, ok := FindUsage(ev); ok && bytes.Contains(ev, emptyChoices) {
		t.usage, t.found = u, true
		return nil // the chunk include_usage added, as OpenAI writes it
	}
	return t.structural(ev)
}

// structural strips what include_usage added from an event whose bytes
// the fast path did not recognise (other spacing, other member order), by
// reading its JSON: a top-level "usage" member that is null is removed; one
// that holds the usage is read, and its event dropped when it carries no
// choices (the chunk include_usage added) or the member removed when it
// rides on a chunk with content. An event that is not one JSON object on a
// single data line passes as it is.
func (t *StreamTap) structural(ev []byte) []byte {
	di := bytes.Index(ev, []byte("data:"))
	if di < 0 || bytes.Count(ev, []byte("data:")) != 1 {
		return ev
	}
	ds := di + len("data:")
	de := ds + bytes.IndexAny(ev[ds:], "\r\n")
	if de < ds {
		de = len(ev)
	}
	data := ev[ds:de]
	m, ok := topMember(data, "usage")
	if !ok {
		return ev
	}
	val := data[m.valStart:m.valEnd]
	if string(val) != "null" {
		if val[0] != '{' {
			return ev
		}
		if u, ok := parseUsage(val); ok {
			t.usage, t.found = u, true
		}
		if c, ok := topMember(data, "choices"); !ok || isEmptyArray(data[c.valStart:c.valEnd]) {
			return nil
		}
	}
	// Remove the member from the data line, in place, and close the gap.
	rest := len(ev) - de
	newData := removeMember(data, m)
	n := ds + len(newData)
	copy(ev[n:], ev[de:])
	return ev[:n+rest]
}

// isEmptyArray reports whether v is "[]", with any whitespace inside.
func isEmptyArray(v []byte) bool {
	return len(v) >= 2 && v[0] == '[' && skipWS(v, 1) == len(v)-1
}

// removeUsageNull deletes one `"usage":null` member and its comma, in
// place, and reports whether it found one. OpenAI puts the member at the end
// of each chunk, so the event's last bytes are searched first: scanning the
// whole of a JSON event for a pattern that starts with '"' is slow.
func removeUsageNull(ev []byte) ([]byte, bool) {
	const near = 160
	i := -1
	if tail := len(ev) - near; tail > 0 {
		if j := bytes.Index(ev[tail:], usageNull); j >= 0 {
			i = tail + j
		}
	}
	if i < 0 {
		i = bytes.Index(ev, usageNull)
	}
	if i < 0 {
		return ev, false
	}
	start, end := i, i+len(usageNull)
	switch {
	case start > 0 && ev[start-1] == ',':
		start--
	case end < len(ev) && ev[end] == ',':
		end++
	}
	return append(ev[:start], ev[end:]...), true
}

// Close closes the upstream body.
func (t *StreamTap) Close() error { return t.src.Close() }

// Relayed is what has passed so far: chunks (events; each event of a
// chat or Responses stream carries about one token) and bytes. It is how
// much of a stream cut short the client got.
func (t *StreamTap) Relayed() (chunks int, bytes int64) {
	if !t.strip {
		lines, n := t.tail.Relayed()
		return lines / 2, n // an event is a data line and a blank one
	}
	return t.sent, t.out
}

// Usage returns the usage the stream reported, if it was read to the end
// and reported one. A stream cut short has none.
//
// A Messages stream reports its usage at its start and its end: one that
// ended, or was cut, after message_start and before its message_delta has
// Partial usage (the input; the output is what was relayed).
func (t *StreamTap) Usage() (Usage, bool) {
	if t.messages {
		return messagesUsage(t.head, t.tail.tail)
	}
	if !t.strip {
		return t.tail.Usage()
	}
	if !t.eof {
		return Usage{}, false
	}
	return t.usage, t.found
}
