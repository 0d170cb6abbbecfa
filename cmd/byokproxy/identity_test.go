package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"filippo.io/age"

	"github.com/byokproxy/byokproxy/internal/redistest"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/provider"
)

func TestIdentityNewWritesFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "identity.txt")
	r := runClient(t, nil, "", nil, "identity", "new", "--out", path)
	r.expect(t, exitOK)

	info, err := os.Stat(path)
	if err != nil {
		t.Fatalf("stat: %v", err)
	}
	if mode := info.Mode().Perm(); mode != 0o600 {
		t.Errorf("mode %o, want 600", mode)
	}
	ids, err := keystore.LoadIdentities(path)
	if err != nil {
		t.Fatalf("LoadIdentities: %v", err)
	}
	if ids.Len() != 1 {
		t.Errorf("%d identities, want 1", ids.Len())
	}
	recipient := strings.TrimSpace(r.stdout)
	if recipient != ids.Recipient().String() || !strings.HasPrefix(recipient, "age1") {
		t.Errorf("stdout %q, want the recipient %s", r.stdout, ids.Recipient())
	}
	if strings.Contains(r.stdout+r.stderr, "AGE-SECRET-KEY-") {
		t.Error("the secret key was printed")
	}

	before, _ := os.ReadFile(path)
	r = runClient(t, nil, "", nil, "identity", "new", "--out", path)
	r.expect(t, exitFailure)
	if !strings.Contains(r.stderr, "already exists") {
		t.Errorf("stderr %q, want it to say the file exists", r.stderr)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Error("an existing identity file was overwritten")
	}
}

func TestIdentityNewToStdout(t *testing.T) {
	r := runClient(t, nil, "", nil, "identity", "new")
	r.expect(t, exitOK)
	ids, err := keystore.ParseIdentities(strings.NewReader(r.stdout))
	if err != nil {
		t.Fatalf("stdout is not an identity file: %v", err)
	}
	if !strings.Contains(r.stderr, "recipient: "+ids.Recipient().String()) {
		t.Errorf("stderr %q does not name the recipient", r.stderr)
	}
}

func TestIdentityUsage(t *testing.T) {
	runClient(t, nil, "", nil, "identity").expect(t, exitUsage)
	runClient(t, nil, "", nil, "identity", "--help").expect(t, exitOK)
	runClient(t, nil, "", nil, "identity", "rotate").expect(t, exitUsage)
	runClient(t, nil, "", nil, "identity", "new", "extra").expect(t, exitUsage)
	runClient(t, nil, "", nil, "identity", "new", "--bogus").expect(t, exitUsage)
	r := runClient(t, nil, "", nil, "identity", "rewrap")
	r.expect(t, exitUsage)
	if !strings.Contains(r.stderr, "needs --config FILE") {
		t.Errorf("rewrap without --config: stderr %q", r.stderr)
	}
}

// rewrapSetup stores keys under one identity, then rewrites the identity
// file with a new identity in front, as the rotation procedure does.
type rewrapSetup struct {
	configFile string
	newX25519  *age.X25519Identity
	store      *keystore.Store
	keys       map[string]string
}

func newRewrapSetup(t *testing.T, n int) *rewrapSetup {
	t.Helper()
	rs := redistest.Start(t)
	prefix := rs.Prefix(t)
	dir := t.TempDir()
	identityFile := filepath.Join(dir, "identity.txt")
	runClient(t, nil, "", nil, "identity", "new", "--out", identityFile).expect(t, exitOK)
	oldIDs, err := keystore.LoadIdentities(identityFile)
	if err != nil {
		t.Fatalf("LoadIdentities: %v", err)
	}
	s := &rewrapSetup{configFile: filepath.Join(dir, "byokproxy.yaml"), keys: map[string]string{}}
	s.store = keystore.New(rs.Client(t), prefix, oldIDs)
	for i := range n {
		m := "user" + strconv.Itoa(i)
		key := newTestKey(t, provider.Google)
		if _, err := s.store.PutKey(context.Background(), mailbox.ID(m), provider.Google, []byte(key)); err != nil {
			t.Fatalf("PutKey: %v", err)
		}
		s.keys[m] = key
	}

	newIDs, err := keystore.GenerateIdentities()
	if err != nil {
		t.Fatalf("GenerateIdentities: %v", err)
	}
	s.newX25519, err = age.ParseX25519Identity(strings.TrimSpace(newIDs.SecretText()))
	if err != nil {
		t.Fatalf("ParseX25519Identity: %v", err)
	}
	old, _ := os.ReadFile(identityFile)
	if err := os.WriteFile(identityFile, append([]byte(newIDs.SecretText()), old...), 0o600); err != nil {
		t.Fatalf("write identity file: %v", err)
	}
	writeJSONConfig(t, s.configFile, map[string]any{
		"admin":    map[string]any{"token": "admin-token-0123456789-rewrap"},
		"auth":     map[string]any{"token_secrets": []string{"token-secret-0123456789-rewrap"}},
		"keystore": map[string]any{"identity_file": identityFile},
		"redis":    map[string]any{"url": rs.URL, "prefix": prefix},
	})
	return s
}

// checkNewOnly fails unless every key decrypts with the new identity alone.
func (s *rewrapSetup) checkNewOnly(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	for m, key := range s.keys {
		ct, err := s.store.Client().HGet(ctx, s.store.Layout().Mailbox(m), "ct:google").Result()
		if err != nil {
			t.Fatalf("HGET %s: %v", m, err)
		}
		r, err := age.Decrypt(strings.NewReader(ct), s.newX25519)
		if err != nil {
			t.Errorf("%s does not decrypt with the new identity alone: %v", m, err)
			continue
		}
		payload, _ := io.ReadAll(r)
		if !strings.HasPrefix(string(payload), "byokproxy-key/v2\n"+m+"\ngoogle\n") || !strings.HasSuffix(string(payload), "\n"+key) {
			t.Errorf("%s payload is not its bound key", m)
		}
	}
}

func TestIdentityRewrapCommand(t *testing.T) {
	s := newRewrapSetup(t, 12)
	var stdout, stderr bytes.Buffer
	cio := cliIO{stdout: &stdout, stderr: &stderr, getenv: func(string) string { return "" }}
	if err := identityRewrap(context.Background(), []string{"--config", s.configFile}, cio, nil); err != nil {
		t.Fatalf("identity rewrap: %v\n%s", err, stderr.String())
	}
	if want := "rewrapped 12, already current 0, skipped because changed concurrently 0, failed 0 (mailboxes scanned 12)\n"; stdout.String() != want {
		t.Errorf("stdout %q, want %q", stdout.String(), want)
	}
	if !strings.Contains(stderr.String(), "rewrap stopped") {
		t.Errorf("no closing log line:\n%s", stderr.String())
	}
	s.checkNewOnly(t)

	stdout.Reset()
	if err := identityRewrap(context.Background(), []string{"--config", s.configFile}, cio, nil); err != nil {
		t.Fatalf("second identity rewrap: %v", err)
	}
	if want := "rewrapped 0, already current 12,"; !strings.HasPrefix(stdout.String(), want) {
		t.Errorf("second run stdout %q, want it to start with %q", stdout.String(), want)
	}
	for m, key := range s.keys {
		if strings.Contains(stderr.String(), key) {
			t.Errorf("the log contains the key of %s", m)
		}
	}
}

func TestIdentityRewrapResumes(t *testing.T) {
	s := newRewrapSetup(t, 60)
	var stdout, stderr bytes.Buffer
	cio := cliIO{stdout: &stdout, stderr: &stderr, getenv: func(string) string { return "" }}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	args := []string{"--config", s.configFile, "--batch", "5", "--progress-every", "20"}
	err := identityRewrap(ctx, args, cio, func(keystore.RewrapStats) { cancel() })
	if err == nil || !strings.Contains(err.Error(), "run the same command again to resume") {
		t.Fatalf("interrupted rewrap error = %v, want one that says how to resume", err)
	}
	if !strings.Contains(stderr.String(), "rewrap progress") {
		t.Errorf("no progress line in the log:\n%s", stderr.String())
	}

	stdout.Reset()
	if err := identityRewrap(context.Background(), []string{"--config", s.configFile}, cio, nil); err != nil {
		t.Fatalf("resumed rewrap: %v", err)
	}
	if !strings.Contains(stderr.String(), "resuming rewrap from the checkpoint") {
		t.Errorf("the second run did not resume from the checkpoint:\n%s", stderr.String())
	}
	s.checkNewOnly(t)
}

func TestIdentityRewrapReportsFailures(t *testing.T) {
	s := newRewrapSetup(t, 3)
	// A ciphertext copied to another mailbox stays unusable and is reported.
	ctx := context.Background()
	ct := s.store.Client().HGet(ctx, s.store.Layout().Mailbox("user0"), "ct:google").Val()
	s.store.Client().HSet(ctx, s.store.Layout().Mailbox("intruder"), "ct:google", ct)

	var stdout, stderr bytes.Buffer
	cio := cliIO{stdout: &stdout, stderr: &stderr, getenv: func(string) string { return "" }}
	err := identityRewrap(ctx, []string{"--config", s.configFile}, cio, nil)
	if err == nil || !strings.Contains(err.Error(), "1 keys could not be rewrapped") {
		t.Fatalf("error = %v, want one failure reported", err)
	}
	if !strings.Contains(stdout.String(), "rewrapped 3,") || !strings.Contains(stdout.String(), "failed 1") {
		t.Errorf("stdout %q", stdout.String())
	}
	if !strings.Contains(stderr.String(), `"mailbox":"intruder"`) {
		t.Errorf("the log does not name the failed mailbox:\n%s", stderr.String())
	}
	if runClient(t, nil, "", nil, "identity", "rewrap", "--config", s.configFile).code != exitFailure {
		t.Error("identity rewrap with a failed key did not exit 1")
	}
}
