package provider

import "bytes"

// This file reads server-sent events and the JSON of their data by
// structure, where the stream taps cannot rely on an upstream's exact bytes
// (Python servers write `"usage": null`, with a space).

// EventEnd returns the end of the first complete event in b (the index
// after its blank line: "\n\n", "\r\n\r\n" or "\r\r"), or -1 if b holds no
// complete event yet.
func EventEnd(b []byte) int { return eventEnd(b, 0) }

// EventData returns the payload of an event's data lines, joined by "\n"
// as the SSE spec says, without the "data:" prefixes. It returns b's own
// bytes when the event has a single data line (the common case), nil when
// it has none.
func EventData(ev []byte) []byte {
	var out []byte
	lines := 0
	for len(ev) > 0 {
		i := bytes.IndexAny(ev, "\r\n")
		line := ev
		if i >= 0 {
			line, ev = ev[:i], ev[i+1:]
		} else {
			ev = nil
		}
		d, ok := bytes.CutPrefix(line, []byte("data:"))
		if !ok {
			continue
		}
		if len(d) > 0 && d[0] == ' ' {
			d = d[1:]
		}
		lines++
		switch lines {
		case 1:
			out = d
		case 2:
			out = append(append(append([]byte(nil), out...), '\n'), d...)
		default:
			out = append(append(out, '\n'), d...)
		}
	}
	return out
}

// member is one member of a JSON object, by byte offsets into the object's
// text: the key's opening quote, and the value.
type member struct {
	keyStart, valStart, valEnd int
}

// topMember finds the member key of the JSON object that obj starts with
// (after whitespace), reading by structure. ok is false when obj is not an
// object, has no such member, or is cut short.
func topMember(obj []byte, key string) (m member, ok bool) {
	i := skipWS(obj, 0)
	if i >= len(obj) || obj[i] != '{' {
		return m, false
	}
	i++
	for {
		i = skipWS(obj, i)
		if i >= len(obj) || obj[i] != '"' {
			return m, false // '}' or garbage: not found
		}
		ks := i
		ke := skipString(obj, i)
		if ke < 0 {
			return m, false
		}
		i = skipWS(obj, ke)
		if i >= len(obj) || obj[i] != ':' {
			return m, false
		}
		vs := skipWS(obj, i+1)
		ve := skipValue(obj, vs)
		if ve < 0 {
			return m, false
		}
		if string(obj[ks+1:ke-1]) == key {
			return member{keyStart: ks, valStart: vs, valEnd: ve}, true
		}
		i = skipWS(obj, ve)
		if i >= len(obj) || obj[i] != ',' {
			return m, false
		}
		i++
	}
}

// removeMember deletes m from obj in place, with the comma (and the
// whitespace) that separates it from its neighbour, and returns obj.
func removeMember(obj []byte, m member) []byte {
	start, end := m.keyStart, m.valEnd
	// A comma before it (it is not the first member): remove from there.
	j := start - 1
	for j >= 0 && isWS(obj[j]) {
		j--
	}
	if j >= 0 && obj[j] == ',' {
		start = j
	} else {
		// The first member: remove the comma after it and the space up to
		// the next key.
		k := skipWS(obj, end)
		if k < len(obj) && obj[k] == ',' {
			end = skipWS(obj, k+1)
		}
	}
	return append(obj[:start], obj[end:]...)
}

func isWS(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

func skipWS(b []byte, i int) int {
	for i < len(b) && isWS(b[i]) {
		i++
	}
	return i
}

// skipString returns the index after the JSON string starting at b[i]
// ('"'), or -1 if it is cut short.
func skipString(b []byte, i int) int {
	for j := i + 1; j < len(b); j++ {
		switch b[j] {
		case '\\':
			j++
		case '"':
			return j + 1
		}
	}
	return -1
}

// skipValue returns the index after the JSON value starting at b[i], or
// -1 if it is cut short.
func skipValue(b []byte, i int) int {
	if i >= len(b) {
		return -1
	}
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for j := i; j < len(b); j++ {
			switch b[j] {
			case '"':
				e := skipString(b, j)
				if e < 0 {
					return -1
				}
				j = e - 1
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return j + 1
				}
			}
		}
		return -1
	}
	j := i
	for j < len(b) && !isWS(b[j]) && b[j] != ',' && b[j] != '}' && b[j] != ']' {
		j++
	}
	if j == i {
		return -1
	}
	return j
}
