package config

import (
	"reflect"
	"strings"
	"time"
)

// leaf is one key that holds a value, such as "redis.timeout".
type leaf struct {
	key string
	typ reflect.Type
}

var (
	configType   = reflect.TypeFor[Config]()
	durationType = reflect.TypeFor[time.Duration]()
)

// leafKeys lists every leaf key of Config in field order. The keys of the
// providers map are listed once for each of the given provider names.
func leafKeys(providerNames []string) []leaf {
	var out []leaf
	appendLeaves(&out, configType, "", providerNames)
	return out
}

func appendLeaves(out *[]leaf, t reflect.Type, prefix string, providerNames []string) {
	for i := range t.NumField() {
		f := t.Field(i)
		name := fieldKey(f)
		if name == "" {
			continue
		}
		key := prefix + name
		switch {
		case f.Type.Kind() == reflect.Struct:
			appendLeaves(out, f.Type, key+".", providerNames)
		case isProviderMap(f.Type):
			for _, p := range providerNames {
				appendLeaves(out, f.Type.Elem().Elem(), key+"."+p+".", providerNames)
			}
		default:
			*out = append(*out, leaf{key: key, typ: f.Type})
		}
	}
}

// fieldKey returns the config key of a struct field, or "" for a field that
// is not configurable.
func fieldKey(f reflect.StructField) string {
	name, _, _ := strings.Cut(f.Tag.Get("mapstructure"), ",")
	if name == "-" || !f.IsExported() {
		return ""
	}
	return name
}

// isProviderMap reports whether t is the type of Config.Providers.
func isProviderMap(t reflect.Type) bool {
	return t.Kind() == reflect.Map && t.Key().Kind() == reflect.String &&
		t.Elem().Kind() == reflect.Pointer && t.Elem().Elem().Kind() == reflect.Struct
}

// fieldOf returns the struct field of t whose config key is name.
func fieldOf(t reflect.Type, name string) (reflect.StructField, bool) {
	for i := range t.NumField() {
		f := t.Field(i)
		if fieldKey(f) == name {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

// valueAt returns the settable value of a leaf key inside c. With create set,
// a missing provider is added to the map, and without it valueAt reports false.
func valueAt(c *Config, key string, create bool) (reflect.Value, bool) {
	v := reflect.ValueOf(c).Elem()
	parts := strings.Split(key, ".")
	for i := 0; i < len(parts); i++ {
		f, ok := fieldOf(v.Type(), parts[i])
		if !ok {
			return reflect.Value{}, false
		}
		v = v.FieldByIndex(f.Index)
		if !isProviderMap(v.Type()) {
			continue
		}
		i++
		if i == len(parts) {
			return reflect.Value{}, false
		}
		name := reflect.ValueOf(parts[i])
		if v.IsNil() {
			if !create {
				return reflect.Value{}, false
			}
			v.Set(reflect.MakeMap(v.Type()))
		}
		elem := v.MapIndex(name)
		if !elem.IsValid() || elem.IsNil() {
			if !create {
				return reflect.Value{}, false
			}
			elem = reflect.New(v.Type().Elem().Elem())
			v.SetMapIndex(name, elem)
		}
		v = elem.Elem()
	}
	return v, true
}

// envName returns the environment variable that sets key.
func envName(key string) string {
	return envPrefix + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

const envPrefix = "BYOKPROXY_"
