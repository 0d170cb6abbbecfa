package config

import (
	"log/slog"
	"reflect"
	"slices"
	"strings"
	"time"
)

// secretKeys are the keys whose values LogValue shows only as "set" or
// "unset". "*" stands for a provider name.
var secretKeys = []string{
	"admin.token",
	"redis.password",
	"auth.token_secrets",
	"providers.*.shared_key",
}

// LogValue returns the configuration as nested slog groups for logging. Each
// secret is shown only as "set" or "unset", and a password in redis.url is
// replaced by "xxxxx". File paths are shown because they are not secrets.
func (c *Config) LogValue() slog.Value {
	return groupValue(reflect.ValueOf(c).Elem(), "")
}

func groupValue(v reflect.Value, prefix string) slog.Value {
	var attrs []slog.Attr
	for i := range v.NumField() {
		f := v.Type().Field(i)
		name := fieldKey(f)
		if name == "" {
			continue
		}
		key := prefix + name
		field := v.Field(i)
		switch {
		case f.Type.Kind() == reflect.Struct:
			attrs = append(attrs, slog.Attr{Key: name, Value: groupValue(field, key+".")})
		case isProviderMap(f.Type):
			attrs = append(attrs, slog.Attr{Key: name, Value: providersValue(field, key+".")})
		default:
			attrs = append(attrs, slog.Attr{Key: name, Value: leafValue(field, key)})
		}
	}
	return slog.GroupValue(attrs...)
}

func providersValue(m reflect.Value, prefix string) slog.Value {
	names := make([]string, 0, m.Len())
	for _, k := range m.MapKeys() {
		names = append(names, k.String())
	}
	slices.Sort(names)
	var attrs []slog.Attr
	for _, name := range names {
		p := m.MapIndex(reflect.ValueOf(name))
		if p.IsNil() {
			continue
		}
		attrs = append(attrs, slog.Attr{Key: name, Value: groupValue(p.Elem(), prefix+name+".")})
	}
	return slog.GroupValue(attrs...)
}

func leafValue(v reflect.Value, key string) slog.Value {
	if isSecretKey(key) {
		if v.IsZero() || (v.Kind() == reflect.Slice && v.Len() == 0) {
			return slog.StringValue("unset")
		}
		return slog.StringValue("set")
	}
	if key == "redis.url" {
		return slog.StringValue(redactURL(v.String()))
	}
	if v.Type() == durationType {
		return slog.StringValue(time.Duration(v.Int()).String())
	}
	return slog.AnyValue(v.Interface())
}

func isSecretKey(key string) bool {
	parts := strings.Split(key, ".")
	if len(parts) == 3 && parts[0] == "providers" {
		parts[1] = "*"
	}
	return slices.Contains(secretKeys, strings.Join(parts, "."))
}
