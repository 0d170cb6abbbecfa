package config

import (
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/byokproxy/byokproxy/provider"
)

const examplePath = "../config.example.yaml"

// exampleOverrides are the keys whose example value differs from the default:
// paths to files that exist on a deployed host.
var exampleOverrides = []string{"admin.token_file", "keystore.identity_file"}

// flattenYAML returns the dotted key of every value in m.
func flattenYAML(m map[string]any, prefix string, out map[string]any) {
	for k, v := range m {
		if sub, ok := v.(map[string]any); ok {
			flattenYAML(sub, prefix+k+".", out)
			continue
		}
		out[prefix+k] = v
	}
}

func TestExampleListsEveryKey(t *testing.T) {
	data, err := os.ReadFile(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := yaml.Unmarshal(data, &m); err != nil {
		t.Fatalf("parse %s: %v", examplePath, err)
	}
	inExample := map[string]any{}
	flattenYAML(m, "", inExample)

	inStruct := map[string]bool{}
	for _, l := range leafKeys(provider.Names) {
		inStruct[l.key] = true
		if _, ok := inExample[l.key]; !ok {
			t.Errorf("%s lacks key %s", examplePath, l.key)
		}
		if !strings.Contains(string(data), envName(l.key)) {
			t.Errorf("%s does not name %s, the variable of %s", examplePath, envName(l.key), l.key)
		}
	}
	for key := range inExample {
		if !inStruct[key] {
			t.Errorf("%s has key %s, which Config does not have", examplePath, key)
		}
	}
}

func TestExampleLoads(t *testing.T) {
	env := []string{
		"BYOKPROXY_ADMIN_TOKEN_FILE=" + writeFile(t, "admin-token", testAdminToken+"\n"),
		"BYOKPROXY_KEYSTORE_IDENTITY_FILE=" + writeIdentityFile(t),
		"BYOKPROXY_AUTH_TOKEN_SECRETS=" + testSecretA,
	}
	fs := newServeFlags(t, "--config", examplePath)
	c, err := Load(fs, env)
	if err != nil {
		t.Fatalf("Load %s: %v", examplePath, err)
	}

	// Every value the example sets, other than the paths, is the default, so
	// the defaults its comments state stay true.
	defaults := Defaults()
	for _, l := range leafKeys(provider.Names) {
		if slices.Contains(exampleOverrides, l.key) || slices.Contains(secretKeys, l.key) {
			continue
		}
		got, _ := valueAt(c, l.key, false)
		want, _ := valueAt(defaults, l.key, false)
		if got.Kind() == reflect.Slice && got.Len() == 0 && want.Len() == 0 {
			continue
		}
		if !reflect.DeepEqual(got.Interface(), want.Interface()) {
			t.Errorf("%s: example sets %v, default is %v", l.key, got.Interface(), want.Interface())
		}
	}
}
