// Package yamljson reads a YAML config as the JSON document it stands for,
// so that a YAML config gets the same fields, checks, defaults and error
// paths as a JSON one, and the routes' order as written. Anchors, aliases
// and merge keys are expanded within a bound: a few hundred bytes of
// nested aliases must not become gigabytes.
//
// It exists apart from package config so that the YAML reader, with its
// expansion bound, is one piece with its own tests.
package yamljson

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"

	"go.yaml.in/yaml/v3"
)

// MaxNodes bounds the nodes of a YAML config after its aliases are
// expanded: a config of thousands of models is far below it.
const MaxNodes = 100_000

// MaxBytes bounds the JSON a YAML config expands to: a long string
// aliased many times must not become gigabytes either.
const MaxBytes = 32 << 20

// errTooManyNodes is a YAML config whose aliases expand beyond MaxNodes or
// MaxBytes (an "alias bomb").
var errTooManyNodes = fmt.Errorf("invalid YAML: more than %d values or %d MiB once its aliases are expanded "+
	"(nested aliases that multiply, an \"alias bomb\"?)", MaxNodes, MaxBytes>>20)

// ToJSON converts a YAML document to JSON, keeping the order of mapping
// keys.
func ToJSON(data []byte) ([]byte, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("invalid YAML: %w", err)
	}
	if doc.Kind == 0 {
		return nil, errors.New("the config is empty")
	}
	w := yamlWriter{budget: MaxNodes}
	if err := w.write(&doc, 0); err != nil {
		return nil, err
	}
	return w.b.Bytes(), nil
}

// yamlWriter writes a YAML node tree as JSON, counting every node it
// writes (an alias's target each time it is used) against its budget.
type yamlWriter struct {
	b      bytes.Buffer
	budget int
}

func (w *yamlWriter) write(n *yaml.Node, depth int) error {
	if depth > 100 {
		return errors.New("invalid YAML: nested too deeply")
	}
	if w.budget--; w.budget < 0 || w.b.Len() > MaxBytes {
		return errTooManyNodes
	}
	b := &w.b
	switch n.Kind {
	case yaml.DocumentNode:
		if len(n.Content) == 0 {
			b.WriteString("null")
			return nil
		}
		return w.write(n.Content[0], depth+1)
	case yaml.AliasNode:
		return w.write(n.Alias, depth+1)
	case yaml.MappingNode:
		pairs, err := w.mergedPairs(n, depth)
		if err != nil {
			return err
		}
		b.WriteByte('{')
		for i, p := range pairs {
			if i > 0 {
				b.WriteByte(',')
			}
			k, _ := json.Marshal(p.key)
			b.Write(k)
			b.WriteByte(':')
			if err := w.write(p.val, depth+1); err != nil {
				return err
			}
		}
		b.WriteByte('}')
	case yaml.SequenceNode:
		b.WriteByte('[')
		for i, c := range n.Content {
			if i > 0 {
				b.WriteByte(',')
			}
			if err := w.write(c, depth+1); err != nil {
				return err
			}
		}
		b.WriteByte(']')
	case yaml.ScalarNode:
		writeScalar(b, n)
	default:
		return fmt.Errorf("invalid YAML at line %d", n.Line)
	}
	return nil
}

type yamlPair struct {
	key string
	val *yaml.Node
}

// mergedPairs is a mapping's keys and values in order, with the keys of
// its merge keys (<<: *a, or <<: [*a, *b]) after its own: a key the
// mapping sets wins over a merged one, and an earlier merged mapping over
// a later one, as YAML's merge key type says.
func (w *yamlWriter) mergedPairs(n *yaml.Node, depth int) ([]yamlPair, error) {
	var pairs []yamlPair
	var merges []*yaml.Node
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind == yaml.ScalarNode && k.ShortTag() == "!!merge" {
			merges = append(merges, v)
			continue
		}
		pairs = append(pairs, yamlPair{k.Value, v})
	}
	for _, m := range merges {
		if m.Kind == yaml.AliasNode {
			m = m.Alias
		}
		sources := []*yaml.Node{m}
		if m.Kind == yaml.SequenceNode {
			sources = m.Content
		}
		for _, src := range sources {
			if w.budget--; w.budget < 0 {
				return nil, errTooManyNodes
			}
			if src.Kind == yaml.AliasNode {
				src = src.Alias
			}
			if src.Kind != yaml.MappingNode {
				return nil, fmt.Errorf("invalid YAML at line %d: a merge key (<<) takes a mapping or a list of mappings", m.Line)
			}
			if depth > 100 {
				return nil, errors.New("invalid YAML: nested too deeply")
			}
			inner, err := w.mergedPairs(src, depth+1)
			if err != nil {
				return nil, err
			}
			for _, p := range inner {
				if !hasKey(pairs, p.key) {
					pairs = append(pairs, p)
				}
			}
		}
	}
	return pairs, nil
}

func hasKey(pairs []yamlPair, key string) bool {
	for _, p := range pairs {
		if p.key == key {
			return true
		}
	}
	return false
}

// writeScalar writes a scalar as YAML reads it: integers in every form
// YAML has (10, 1_000, 0x10, 0o17, 0b101; a leading 0 is octal, as in
// YAML 1.1), floats, booleans and null as JSON's, anything else as a
// string.
func writeScalar(b *bytes.Buffer, n *yaml.Node) {
	switch n.ShortTag() {
	case "!!int", "!!float":
		var v any
		if err := n.Decode(&v); err == nil {
			switch x := v.(type) {
			case int:
				b.WriteString(strconv.Itoa(x))
				return
			case uint64:
				b.WriteString(strconv.FormatUint(x, 10))
				return
			case float64:
				if !math.IsInf(x, 0) && !math.IsNaN(x) {
					b.WriteString(strconv.FormatFloat(x, 'f', -1, 64))
					return
				}
			}
		}
	case "!!bool":
		var v bool
		if err := n.Decode(&v); err == nil {
			b.WriteString(strconv.FormatBool(v))
			return
		}
	case "!!null":
		b.WriteString("null")
		return
	}
	s, _ := json.Marshal(n.Value)
	b.Write(s)
}
