package config

import (
	"fmt"
	"math"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"
	"go.yaml.in/yaml/v3"

	"github.com/byokproxy/byokproxy/provider"
)

// flagKeys maps the flags of the serve command to the keys they set.
var flagKeys = []struct {
	flag, key, usage string
}{
	{"listen", "listen", "host:port of the provider routes, /healthz and /readyz"},
	{"admin-listen", "admin.listen", "host:port of the admin API"},
	{"metrics-listen", "metrics.listen", "host:port of /metrics"},
	{"forward-listen", "forward.listen", "host:port of the forward proxy; empty turns it off"},
	{"redis-url", "redis.url", "Redis URL, such as redis://127.0.0.1:6379/0"},
	{"log-level", "log_level", "log level: debug, info, warn or error"},
	{"log-format", "log_format", "log format: json or text"},
}

// RegisterFlags adds the flags of the serve command to fs: --config, --dev
// and one flag for each of the most often changed keys. Load reads them.
func RegisterFlags(fs *pflag.FlagSet) {
	d := Defaults()
	defaults := map[string]string{
		"listen":         d.Listen,
		"admin.listen":   d.Admin.Listen,
		"metrics.listen": d.Metrics.Listen,
		"forward.listen": d.Forward.Listen,
		"redis.url":      d.Redis.URL,
		"log_level":      d.LogLevel,
		"log_format":     d.LogFormat,
	}
	fs.String("config", "", "YAML config `file`; BYOKPROXY_* environment variables override it and flags override both")
	fs.Bool("dev", false, "run with an in-process store, a fresh identity and admin token, on loopback only")
	for _, f := range flagKeys {
		fs.String(f.flag, defaults[f.key], f.usage)
	}
}

// Load builds the configuration from, in rising precedence, the defaults, the
// YAML file named by --config, the BYOKPROXY_* variables in env and the flags
// set in fs. Then it reads the *_file secrets and validates the result.
//
// env has the form of os.Environ(). A variable is named BYOKPROXY_ and the
// key in upper case with "." replaced by "_", such as BYOKPROXY_REDIS_URL. A
// variable that is set counts even when empty, a later duplicate wins, and a
// list is written comma-separated. Variables that name no key are ignored. fs
// may be nil, and flags missing from it are skipped.
//
// On failure Load returns an *Error listing every problem found.
func Load(fs *pflag.FlagSet, env []string) (*Config, error) {
	v := viper.New()
	defaults := Defaults()
	for _, l := range leafKeys(provider.Names) {
		field, _ := valueAt(defaults, l.key, false)
		v.SetDefault(l.key, field.Interface())
	}

	var ps problems
	providerNames := slices.Clone(provider.Names)
	if path := flagString(fs, "config"); path != "" {
		file, err := readYAML(path)
		if err != nil {
			return nil, err
		}
		for _, name := range checkFileKeys(&ps, path, file) {
			if !slices.Contains(providerNames, name) {
				providerNames = append(providerNames, name)
			}
		}
		if err := v.MergeConfigMap(file); err != nil {
			return nil, fmt.Errorf("config: merge %s: %w", path, err)
		}
	}
	if err := v.MergeConfigMap(envLayer(env)); err != nil {
		return nil, fmt.Errorf("config: merge environment: %w", err)
	}
	if err := bindFlags(v, fs); err != nil {
		return nil, err
	}

	c := decode(v, providerNames, &ps)
	c.normalize()
	c.readSecretFiles(&ps)

	// A key that failed to load keeps its default, so validation would only
	// add a second, misleading line about it.
	failed := map[string]bool{}
	for _, p := range ps {
		failed[p.Key] = true
	}
	var vs problems
	c.validate(&vs)
	for _, p := range vs {
		if !failed[p.Key] {
			ps = append(ps, p)
		}
	}
	if err := ps.err(); err != nil {
		return nil, err
	}
	return c, nil
}

func flagString(fs *pflag.FlagSet, name string) string {
	if fs == nil || fs.Lookup(name) == nil {
		return ""
	}
	return fs.Lookup(name).Value.String()
}

func bindFlags(v *viper.Viper, fs *pflag.FlagSet) error {
	if fs == nil {
		return nil
	}
	binds := map[string]string{"dev": "dev"}
	for _, f := range flagKeys {
		binds[f.flag] = f.key
	}
	for flag, key := range binds {
		f := fs.Lookup(flag)
		if f == nil {
			continue
		}
		if err := v.BindPFlag(key, f); err != nil {
			return fmt.Errorf("config: bind --%s: %w", flag, err)
		}
	}
	return nil
}

// readYAML parses the config file into nested maps.
func readYAML(path string) (map[string]any, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, &Error{Problems: []Problem{{Key: "--config", Message: err.Error(), Fix: "fix the path"}}}
	}
	var m map[string]any
	if err := yaml.Unmarshal(data, &m); err != nil {
		return nil, &Error{Problems: []Problem{{Key: path, Message: "invalid YAML: " + err.Error(),
			Fix: "fix the syntax; config.example.yaml shows every key"}}}
	}
	if m == nil {
		m = map[string]any{}
	}
	return m, nil
}

// checkFileKeys reports every key of the file that Config does not have and
// removes it, so that one typo does not hide the other problems. It also
// removes null values, which mean "unset", and returns the provider names
// the file mentions.
func checkFileKeys(ps *problems, path string, file map[string]any) []string {
	var providerNames []string
	var walk func(m map[string]any, t reflect.Type, prefix string)
	walk = func(m map[string]any, t reflect.Type, prefix string) {
		for name, value := range m {
			key := prefix + name
			f, ok := fieldOf(t, strings.ToLower(name))
			switch {
			case !ok:
				ps.add(key, "unknown key in "+path, "remove it or fix its spelling; config.example.yaml lists every key")
				delete(m, name)
			case value == nil:
				delete(m, name)
			case f.Type.Kind() == reflect.Struct || isProviderMap(f.Type):
				sub, isMap := value.(map[string]any)
				if !isMap {
					ps.add(key, "is a single value in "+path, "write it as a section of keys, as config.example.yaml does")
					delete(m, name)
					continue
				}
				if f.Type.Kind() == reflect.Struct {
					walk(sub, f.Type, key+".")
					continue
				}
				for pname, pvalue := range sub {
					pkey := key + "." + pname
					switch pm := pvalue.(type) {
					case nil:
						delete(sub, pname)
					case map[string]any:
						providerNames = append(providerNames, strings.ToLower(pname))
						walk(pm, f.Type.Elem().Elem(), pkey+".")
					default:
						ps.add(pkey, "is a single value in "+path, "write it as a section of keys, as config.example.yaml does")
						delete(sub, pname)
					}
				}
			default:
				if _, isMap := value.(map[string]any); isMap {
					ps.add(key, "is a section in "+path, "write a single value")
					delete(m, name)
				}
			}
		}
	}
	walk(file, configType, "")
	return providerNames
}

// envLayer returns the values that env sets, as nested maps keyed like the
// config file.
// envKeys maps each variable name that sets a config key to that key.
func envKeys() map[string]string {
	keys := map[string]string{}
	for _, l := range leafKeys(provider.Names) {
		keys[envName(l.key)] = l.key
	}
	return keys
}

// UnknownEnv returns the names of the BYOKPROXY_* variables in env that name
// no config key, such as a misspelt one, which Load ignores. names lists
// variables read elsewhere, which are not reported.
func UnknownEnv(env []string, names ...string) []string {
	keys := envKeys()
	var unknown []string
	for _, kv := range env {
		name, _, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(name, envPrefix) || slices.Contains(names, name) {
			continue
		}
		if _, known := keys[name]; !known && !slices.Contains(unknown, name) {
			unknown = append(unknown, name)
		}
	}
	return unknown
}

func envLayer(env []string) map[string]any {
	keys := envKeys()
	layer := map[string]any{}
	for _, kv := range env {
		name, value, ok := strings.Cut(kv, "=")
		key, known := keys[name]
		if !ok || !known {
			continue
		}
		m := layer
		parts := strings.Split(key, ".")
		for _, p := range parts[:len(parts)-1] {
			sub, ok := m[p].(map[string]any)
			if !ok {
				sub = map[string]any{}
				m[p] = sub
			}
			m = sub
		}
		m[parts[len(parts)-1]] = value
	}
	return layer
}

// decode copies the value of every leaf key from v into a new Config,
// reporting each value that does not fit its field. Such a key keeps its
// default.
func decode(v *viper.Viper, providerNames []string, ps *problems) *Config {
	c := Defaults()
	for _, name := range providerNames {
		if c.Providers[name] == nil {
			c.Providers[name] = &Provider{}
		}
	}
	for _, l := range leafKeys(providerNames) {
		raw := v.Get(l.key)
		if raw == nil {
			continue
		}
		value, message, fix := convert(raw, l.typ)
		if message != "" {
			ps.add(l.key, message, fix)
			continue
		}
		field, _ := valueAt(c, l.key, true)
		field.Set(value)
	}
	return c
}

// convert turns a value from the file, the environment, a flag or the
// defaults into type t. On failure it returns the problem and its fix.
func convert(raw any, t reflect.Type) (value reflect.Value, message, fix string) {
	out := reflect.New(t).Elem()
	switch {
	case t == durationType:
		d, message, fix := toDuration(raw)
		if message != "" {
			return out, message, fix
		}
		out.SetInt(int64(d))
	case t.Kind() == reflect.String:
		s, ok := raw.(string)
		if !ok {
			return out, fmt.Sprintf("%v is not a string", raw), "put the value in quotes"
		}
		out.SetString(s)
	case t.Kind() == reflect.Bool:
		b, ok := raw.(bool)
		if s, isString := raw.(string); isString {
			var err error
			b, err = strconv.ParseBool(strings.TrimSpace(s))
			ok = err == nil
		}
		if !ok {
			return out, fmt.Sprintf("%s is not true or false", describe(raw)), "use true or false"
		}
		out.SetBool(b)
	case t.Kind() == reflect.Int || t.Kind() == reflect.Int64:
		n, ok := toInt64(raw)
		if !ok {
			return out, fmt.Sprintf("%s is not a whole number", describe(raw)), "write digits only, such as 1000"
		}
		if out.OverflowInt(n) {
			return out, fmt.Sprintf("%d is too large", n), "set a smaller number"
		}
		out.SetInt(n)
	case t.Kind() == reflect.Slice && t.Elem().Kind() == reflect.String:
		list, message := toStrings(raw)
		if message != "" {
			return out, message, "write a YAML list, or comma-separated text in an environment variable"
		}
		out.Set(reflect.ValueOf(list))
	default:
		// Reaching here means a field of a type convert does not handle was
		// added to Config.
		return out, fmt.Sprintf("has type %s, which the loader does not support", t), "report this as a bug"
	}
	return out, "", ""
}

func toDuration(raw any) (time.Duration, string, string) {
	const fix = "write a number with a unit, such as 30s, 10m or 720h"
	switch v := raw.(type) {
	case time.Duration:
		return v, "", ""
	case string:
		d, err := time.ParseDuration(strings.TrimSpace(v))
		if err != nil {
			return 0, fmt.Sprintf("%q is not a duration", v), fix
		}
		return d, "", ""
	}
	// A bare number would mean nanoseconds, which is almost never intended.
	if n, ok := toInt64(raw); ok && n == 0 {
		return 0, "", ""
	}
	return 0, fmt.Sprintf("%v has no unit", raw), fix
}

func toInt64(raw any) (int64, bool) {
	switch v := raw.(type) {
	case int:
		return int64(v), true
	case int64:
		return v, true
	case int32:
		return int64(v), true
	case uint64:
		return int64(v), v <= math.MaxInt64
	case float64:
		if v != math.Trunc(v) || v < math.MinInt64 || v >= math.MaxInt64 {
			return 0, false
		}
		return int64(v), true
	case string:
		n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		return n, err == nil
	}
	return 0, false
}

// toStrings accepts a YAML list of strings or comma-separated text. Spaces
// around items and empty items of the text are dropped.
func toStrings(raw any) ([]string, string) {
	switch v := raw.(type) {
	case []string:
		return slices.Clone(v), ""
	case []any:
		out := make([]string, 0, len(v))
		for i, item := range v {
			s, ok := item.(string)
			if !ok {
				return nil, fmt.Sprintf("entry %d, %v, is not a string", i+1, item)
			}
			out = append(out, s)
		}
		return out, ""
	case string:
		var out []string
		for item := range strings.SplitSeq(v, ",") {
			if item = strings.TrimSpace(item); item != "" {
				out = append(out, item)
			}
		}
		return out, ""
	}
	return nil, fmt.Sprintf("%v is not a list", raw)
}

// describe formats a raw value for a message, quoting text.
func describe(raw any) string {
	if s, ok := raw.(string); ok {
		return strconv.Quote(s)
	}
	return fmt.Sprint(raw)
}

// normalize puts values into the form the rest of the program compares
// against: lower-case log settings and upstreams without a trailing slash.
func (c *Config) normalize() {
	c.LogLevel = strings.ToLower(strings.TrimSpace(c.LogLevel))
	c.LogFormat = strings.ToLower(strings.TrimSpace(c.LogFormat))
	for _, p := range c.Providers {
		p.Upstream = strings.TrimRight(p.Upstream, "/")
	}
}

// readSecretFiles sets each secret that has a *_file setting to the content
// of that file without the trailing line break. A secret set both ways is a
// problem.
func (c *Config) readSecretFiles(ps *problems) {
	readSecretFile(ps, "admin.token", &c.Admin.Token, c.Admin.TokenFile)
	readSecretFile(ps, "redis.password", &c.Redis.Password, c.Redis.PasswordFile)
	names := make([]string, 0, len(c.Providers))
	for name := range c.Providers {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		p := c.Providers[name]
		readSecretFile(ps, "providers."+name+".shared_key", &p.SharedKey, p.SharedKeyFile)
	}
}

func readSecretFile(ps *problems, key string, value *string, path string) {
	if path == "" {
		return
	}
	fileKey := key + "_file"
	data, err := os.ReadFile(path)
	if err != nil {
		ps.add(fileKey, err.Error(), "fix the path, or unset "+fileKey+" and set "+key)
		return
	}
	secret := strings.TrimRight(string(data), "\r\n")
	if secret == "" {
		ps.add(fileKey, path+" is empty", "write the secret into it")
		return
	}
	// The same secret in both places is harmless: an operator who exported
	// BYOKPROXY_ADMIN_TOKEN for the admin CLI runs serve in the same shell.
	if *value != "" && *value != secret {
		ps.add(key, "set together with "+fileKey+" to a different value", "keep one of them")
		return
	}
	*value = secret
}
