package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"github.com/llproxy/llproxy/internal/config/yamljson"
)

// LookupEnv finds an environment variable; os.LookupEnv in production.
type LookupEnv func(name string) (string, bool)

// MaxConfigBytes bounds a config file: a config of thousands of models is
// far below it, and nothing larger is read.
const MaxConfigBytes = 4 << 20

// readBounded reads the file at path, or fails if it is larger than
// MaxConfigBytes.
func readBounded(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxConfigBytes+1))
	if err != nil {
		return nil, err
	}
	if len(data) > MaxConfigBytes {
		return nil, fmt.Errorf("%s is larger than %d bytes (4 MiB): not read", path, MaxConfigBytes)
	}
	return data, nil
}

// Load reads and validates the config file at path.
func Load(path string, env LookupEnv) (*Config, error) {
	if env == nil {
		env = os.LookupEnv
	}
	data, err := readBounded(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if ext := strings.ToLower(filepath.Ext(path)); ext == ".yaml" || ext == ".yml" {
		if data, err = yamljson.ToJSON(data); err != nil {
			return nil, fmt.Errorf("config %s: %w", path, err)
		}
	}
	cfg, err := Parse(data, env)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if cfg.StateFile == "" {
		// LLPROXY_STATE_FILE, for deployments whose config directory is
		// read-only (the container image, the systemd unit); else next to
		// the config.
		if v, ok := env("LLPROXY_STATE_FILE"); ok && v != "" {
			cfg.StateFile = v
		} else {
			cfg.StateFile = filepath.Join(filepath.Dir(path), DefaultStateFile)
		}
	}
	return cfg, nil
}

// Parse reads a config from JSON: expand the environment in every string,
// check field names and types against Config, decode, apply defaults,
// validate. The error lists every problem found, one per line, each with its
// JSON path.
func Parse(data []byte, env LookupEnv) (*Config, error) {
	if env == nil {
		env = os.LookupEnv
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var raw any
	if err := dec.Decode(&raw); err != nil {
		return nil, syntaxError(data, err)
	}
	if _, ok := raw.(map[string]any); !ok {
		return nil, errors.New("the config must be a JSON object")
	}
	var errs []error
	raw = expand(raw, "", env, &errs)
	raw = numbers(raw, reflect.TypeFor[Config]())
	errs = append(errs, check(raw, reflect.TypeFor[Config](), "")...)
	clean, err := json.Marshal(raw)
	if err != nil {
		return nil, err
	}
	var cfg Config
	if err := json.Unmarshal(clean, &cfg); err != nil && len(errs) == 0 {
		return nil, err
	}
	// Everything in one pass: the values that decoded are validated even
	// when others had the wrong type (their own range errors aside: their
	// type error says it).
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		for _, e := range unwrapJoined(err) {
			if !coveredBy(e, errs) {
				errs = append(errs, e)
			}
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	cfg.RouteOrder = keyOrder(data, "routes")
	return &cfg, nil
}

// keyOrder returns the keys of the top-level object member name of the
// JSON document data, in the order they are written (a Go map forgets
// it).
func keyOrder(data []byte, name string) []string {
	dec := json.NewDecoder(bytes.NewReader(data))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil
	}
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return nil
		}
		if k, _ := t.(string); k != name {
			var skip json.RawMessage
			if dec.Decode(&skip) != nil {
				return nil
			}
			continue
		}
		if t, err := dec.Token(); err != nil || t != json.Delim('{') {
			return nil
		}
		var keys []string
		for dec.More() {
			t, err := dec.Token()
			if err != nil {
				return nil
			}
			keys = append(keys, t.(string))
			var skip json.RawMessage
			if dec.Decode(&skip) != nil {
				return nil
			}
		}
		return keys
	}
	return nil
}

func syntaxError(data []byte, err error) error {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		line := 1 + bytes.Count(data[:se.Offset], []byte("\n"))
		return fmt.Errorf("line %d: invalid JSON: %v", line, err)
	}
	return fmt.Errorf("invalid JSON: %v", err)
}

// expand replaces ${VAR} and ${VAR:-default} in every string below v. A
// variable that is not set and has no default is an error naming it and
// where it was used; its value is never put in an error.
func expand(v any, path string, env LookupEnv, errs *[]error) any {
	switch x := v.(type) {
	case string:
		s, err := expandString(x, env)
		if err != nil {
			*errs = append(*errs, fmt.Errorf("%s: %w", path, err))
		}
		return s
	case map[string]any:
		for k, e := range x {
			x[k] = expand(e, join(path, k), env, errs)
		}
	case []any:
		for i, e := range x {
			x[i] = expand(e, path+"["+strconv.Itoa(i)+"]", env, errs)
		}
	}
	return v
}

func expandString(s string, env LookupEnv) (string, error) {
	if !strings.Contains(s, "${") {
		return s, nil
	}
	var b strings.Builder
	at := 0 // where s starts in the original value
	for {
		i := strings.Index(s, "${")
		if i < 0 {
			b.WriteString(s)
			return b.String(), nil
		}
		end := strings.IndexByte(s[i:], '}')
		if end < 0 {
			// The value is not quoted: it may be a secret.
			return "", fmt.Errorf("unterminated ${ at byte %d of the value (not shown: it may be a secret)", at+i)
		}
		b.WriteString(s[:i])
		expr := s[i+2 : i+end]
		name, def, hasDef := strings.Cut(expr, ":-")
		if name == "" {
			return "", errors.New("empty variable name in ${}")
		}
		val, ok := env(name)
		switch {
		case ok:
			b.WriteString(val)
		case hasDef:
			b.WriteString(def)
		default:
			return "", fmt.Errorf("environment variable %s is not set (use ${%s:-default} for a default)", name, name)
		}
		at += i + end + 1
		s = s[i+end+1:]
	}
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

var unmarshalerType = reflect.TypeFor[json.Unmarshaler]()

// check walks the decoded JSON beside the Go type it will fill and reports
// unknown fields and values of the wrong type, each with its path.
func check(v any, t reflect.Type, path string) []error {
	if v == nil {
		return nil // null leaves the zero value
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if reflect.PointerTo(t).Implements(unmarshalerType) {
		b, _ := json.Marshal(v)
		if err := reflect.New(t).Interface().(json.Unmarshaler).UnmarshalJSON(b); err != nil {
			return []error{fmt.Errorf("%s: %w", path, err)}
		}
		return nil
	}
	wrong := func(want string) []error {
		return []error{fmt.Errorf("%s: must be %s, got %s", path, want, describe(v))}
	}
	switch t.Kind() {
	case reflect.Struct:
		obj, ok := v.(map[string]any)
		if !ok {
			return wrong("an object")
		}
		fields := jsonFields(t)
		var errs []error
		for _, k := range slices.Sorted(maps.Keys(obj)) {
			ft, ok := fields[k]
			if !ok {
				errs = append(errs, fmt.Errorf("%s: unknown field (known: %s)", join(path, k), strings.Join(slices.Sorted(maps.Keys(fields)), ", ")))
				continue
			}
			errs = append(errs, check(obj[k], ft, join(path, k))...)
		}
		return errs
	case reflect.Map:
		obj, ok := v.(map[string]any)
		if !ok {
			return wrong("an object")
		}
		var errs []error
		for _, k := range slices.Sorted(maps.Keys(obj)) {
			errs = append(errs, check(obj[k], t.Elem(), join(path, k))...)
		}
		return errs
	case reflect.Slice:
		arr, ok := v.([]any)
		if !ok {
			return wrong("an array")
		}
		var errs []error
		for i, e := range arr {
			errs = append(errs, check(e, t.Elem(), path+"["+strconv.Itoa(i)+"]")...)
		}
		return errs
	case reflect.String:
		if _, ok := v.(string); !ok {
			return wrong("a string")
		}
	case reflect.Bool:
		if _, ok := v.(bool); !ok {
			return wrong("true or false")
		}
	case reflect.Int, reflect.Int64, reflect.Int32:
		n, ok := v.(json.Number)
		if !ok {
			return wrong("an integer")
		}
		if _, err := strconv.ParseInt(n.String(), 10, 64); err != nil {
			return wrong("an integer")
		}
	case reflect.Float64:
		if _, ok := v.(json.Number); !ok {
			return wrong("a number")
		}
	}
	return nil
}

// jsonFields maps a struct's JSON names to field types, following embedded
// structs as encoding/json does.
func jsonFields(t reflect.Type) map[string]reflect.Type {
	out := map[string]reflect.Type{}
	for i := range t.NumField() {
		f := t.Field(i)
		tag := f.Tag.Get("json")
		name, _, _ := strings.Cut(tag, ",")
		if name == "-" || !f.IsExported() {
			continue
		}
		if f.Anonymous && name == "" && f.Type.Kind() == reflect.Struct {
			maps.Copy(out, jsonFields(f.Type))
			continue
		}
		if name == "" {
			name = f.Name
		}
		out[name] = f.Type
	}
	return out
}

func describe(v any) string {
	switch x := v.(type) {
	case string:
		return "a string"
	case json.Number:
		return "the number " + x.String()
	case bool:
		return "a boolean"
	case []any:
		return "an array"
	case map[string]any:
		return "an object"
	}
	return fmt.Sprintf("%T", v)
}

// unwrapJoined lists the errors errors.Join put together.
func unwrapJoined(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// coveredBy reports whether e is about a path one of errs already names.
func coveredBy(e error, errs []error) bool {
	path, _, _ := strings.Cut(e.Error(), ": ")
	for _, o := range errs {
		if p, _, _ := strings.Cut(o.Error(), ": "); p == path {
			return true
		}
	}
	return false
}

// numbers turns the strings found where a number or a boolean is expected
// into one, when they are one: so that "rpm": "${RPM:-60}" works (an
// environment variable is always a string).
func numbers(v any, t reflect.Type) any {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if reflect.PointerTo(t).Implements(unmarshalerType) {
		return v
	}
	switch x := v.(type) {
	case map[string]any:
		switch t.Kind() {
		case reflect.Struct:
			fields := jsonFields(t)
			for k, e := range x {
				if ft, ok := fields[k]; ok {
					x[k] = numbers(e, ft)
				}
			}
		case reflect.Map:
			for k, e := range x {
				x[k] = numbers(e, t.Elem())
			}
		}
	case []any:
		if t.Kind() == reflect.Slice {
			for i, e := range x {
				x[i] = numbers(e, t.Elem())
			}
		}
	case string:
		s := strings.TrimSpace(x)
		switch t.Kind() {
		case reflect.Int, reflect.Int64, reflect.Int32, reflect.Float64:
			if _, err := strconv.ParseFloat(s, 64); err == nil && s != "" {
				return json.Number(s)
			}
		case reflect.Bool:
			if b, err := strconv.ParseBool(s); err == nil {
				return b
			}
		}
	}
	return v
}
