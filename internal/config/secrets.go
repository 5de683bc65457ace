package config

import (
	"net/url"
	"reflect"
	"slices"
	"strings"
)

// Secrets returns every secret value the config holds: each field of type
// Secret wherever it is (client keys, team keys, admin keys, the metrics
// key, the routes' API keys, and any added later), the Redis URL of the
// shared limits and its password. Found by walking the config's types, so
// a new key path cannot be forgotten. Empty values are left out; each
// value appears once.
func (c *Config) Secrets() []string {
	var out []string
	add := func(s string) {
		if s != "" && !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	walkSecrets(reflect.ValueOf(c), add)
	for _, dsn := range []string{c.sharedRedis(), c.Usage.Store} {
		if !strings.Contains(dsn, "://") {
			continue // "sqlite", a path: nothing secret
		}
		add(dsn)
		if u, err := url.Parse(dsn); err == nil && u.User != nil {
			if pw, ok := u.User.Password(); ok {
				add(pw)
			}
		}
	}
	return out
}

func (c *Config) sharedRedis() string {
	if c.Shared == nil {
		return ""
	}
	return c.Shared.Redis
}

var secretType = reflect.TypeFor[Secret]()

// walkSecrets calls add with every Secret reachable from v.
func walkSecrets(v reflect.Value, add func(string)) {
	switch v.Kind() {
	case reflect.Pointer, reflect.Interface:
		if !v.IsNil() {
			walkSecrets(v.Elem(), add)
		}
	case reflect.Struct:
		for i := range v.NumField() {
			if v.Type().Field(i).IsExported() {
				walkSecrets(v.Field(i), add)
			}
		}
	case reflect.Slice, reflect.Array:
		for i := range v.Len() {
			walkSecrets(v.Index(i), add)
		}
	case reflect.Map:
		it := v.MapRange()
		for it.Next() {
			walkSecrets(it.Value(), add)
		}
	case reflect.String:
		if v.Type() == secretType {
			add(v.String())
		}
	}
}
