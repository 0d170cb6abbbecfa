package main

import (
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/byokproxy/byokproxy/config"
)

func TestReadableSecretFileWarned(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, perm os.FileMode) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte("secret"), 0o600); err != nil {
			t.Fatal(err)
		}
		// Chmod after the write, so the umask cannot narrow the mode.
		if err := os.Chmod(path, perm); err != nil {
			t.Fatal(err)
		}
		return path
	}
	cfg := config.Defaults()
	cfg.Keystore.IdentityFile = write("identity.txt", 0o644)
	cfg.Admin.TokenFile = write("admin-token", 0o600)
	cfg.Forward.CAKeyFile = write("ca.key", 0o440)
	cfg.Provider("openai").SharedKeyFile = write("openai-key", 0o604)

	var logs syncBuffer
	warnReadableSecrets(cfg, slog.New(slog.NewJSONHandler(&logs, nil)))

	warned := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		if line == "" {
			continue
		}
		var entry struct {
			Key  string `json:"key"`
			Mode string `json:"mode"`
		}
		if err := json.Unmarshal([]byte(line), &entry); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		warned[entry.Key] = entry.Mode
	}
	if warned["keystore.identity_file"] != "0644" {
		t.Errorf("identity file of mode 0644: warning with mode %q, want 0644", warned["keystore.identity_file"])
	}
	if warned["providers.openai.shared_key_file"] != "0604" {
		t.Errorf("shared key file of mode 0604: warning with mode %q, want 0604", warned["providers.openai.shared_key_file"])
	}
	for _, key := range []string{"admin.token_file", "forward.ca_key_file"} {
		if mode, ok := warned[key]; ok {
			t.Errorf("%s warned with mode %s, though other users cannot read it", key, mode)
		}
	}
	if len(warned) != 2 {
		t.Errorf("warnings for %v, want the two readable files only", warned)
	}
}
