package main

import (
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"os"
	"reflect"
	"sync"
	"time"

	"github.com/spf13/pflag"

	"github.com/byokproxy/byokproxy/admin"
	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/proxy"
)

// reloadPollInterval is how often the reloader checks its files for a
// change. Polling the modification time and size works the same for an
// edited file, a replaced file and a Kubernetes ConfigMap symlink swap.
const reloadPollInterval = 2 * time.Second

// reloader applies a changed configuration to a running proxy. It reloads on
// SIGHUP and when the config file, the identity file or a *_file secret
// changes. A configuration that fails to load or validate is logged and the
// running one stays in force.
type reloader struct {
	flags   *pflag.FlagSet
	environ func() []string
	log     *slog.Logger

	handler *proxy.Handler
	admin   *admin.API
	// ui, when not nil, is the admin listener's handler with the settings
	// page; it gets the admin token on each reload too.
	ui     *admin.UI
	prober *proxy.Prober
	store  *keystore.Store

	mu       sync.Mutex
	current  *config.Config
	idDigest [32]byte
	stamps   map[string]fileStamp
}

// newReloader returns a reloader for a proxy started with cfg, loaded from
// flags and the process environment.
func newReloader(flags *pflag.FlagSet, cfg *config.Config, log *slog.Logger,
	handler *proxy.Handler, adminAPI *admin.API, prober *proxy.Prober, store *keystore.Store) *reloader {
	r := &reloader{
		flags: flags, environ: os.Environ, log: log,
		handler: handler, admin: adminAPI, prober: prober, store: store,
		current: cfg,
	}
	if ids := store.Identities(); ids != nil {
		r.idDigest = sha256.Sum256([]byte(ids.SecretText()))
	}
	r.stamps = r.statFiles(cfg)
	return r
}

// run reloads on every value from hup and on every change of the watched
// files, checked every poll, until ctx ends.
func (r *reloader) run(ctx context.Context, hup <-chan os.Signal, poll time.Duration) {
	ticker := time.NewTicker(poll)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			r.log.Info("SIGHUP received, reloading the configuration")
			r.reload()
		case <-ticker.C:
			if changed := r.changedFile(); changed != "" {
				r.log.Info("file changed, reloading the configuration", "file", changed)
				r.reload()
			}
		}
	}
}

// fileStamp identifies one version of a file. The digest is part of it
// because file systems keep modification times at a coarse clock, so an
// edit of the same size made right after the last check can keep the old
// time.
type fileStamp struct {
	modTime time.Time
	size    int64
	digest  [32]byte
	missing bool
}

// watchedFiles returns the files whose change triggers a reload.
func (r *reloader) watchedFiles(cfg *config.Config) []string {
	files := []string{}
	if path := r.flags.Lookup("config"); path != nil && path.Value.String() != "" {
		files = append(files, path.Value.String())
	}
	files = append(files, cfg.Keystore.IdentityFile, cfg.Admin.TokenFile)
	for _, pc := range cfg.Providers {
		if pc != nil {
			files = append(files, pc.SharedKeyFile)
		}
	}
	out := files[:0]
	for _, f := range files {
		if f != "" {
			out = append(out, f)
		}
	}
	return out
}

func (r *reloader) statFiles(cfg *config.Config) map[string]fileStamp {
	stamps := map[string]fileStamp{}
	for _, f := range r.watchedFiles(cfg) {
		info, err := os.Stat(f)
		if err != nil {
			stamps[f] = fileStamp{missing: true}
			continue
		}
		stamp := fileStamp{modTime: info.ModTime(), size: info.Size()}
		// The watched files are a config, an identity and secrets: small
		// enough to hash on every check.
		if data, err := os.ReadFile(f); err == nil {
			stamp.digest = sha256.Sum256(data)
			clear(data)
		}
		stamps[f] = stamp
	}
	return stamps
}

// changedFile returns a watched file that changed since the last check, or
// "". A file that fails to reload is not reported again until it changes
// once more.
func (r *reloader) changedFile() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.statFiles(r.current)
	changed := ""
	for f, stamp := range now {
		if old, ok := r.stamps[f]; !ok || old != stamp {
			changed = f
		}
	}
	r.stamps = now
	return changed
}

// reload loads the configuration again and applies it, or logs why not and
// keeps the running one. It returns the error it logged.
func (r *reloader) reload() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	cfg, err := config.Load(r.flags, r.environ())
	if err != nil {
		r.log.Error("config reload failed; the running configuration stays in force", "error", err)
		return err
	}
	old := r.current
	if cfg.Dev {
		// --dev generates these at start; a reload keeps them.
		if cfg.Admin.Token == "" && cfg.Admin.TokenFile == "" {
			cfg.Admin.Token = old.Admin.Token
		}
		if len(cfg.Auth.TokenSecrets) == 0 {
			cfg.Auth.TokenSecrets = old.Auth.TokenSecrets
		}
	}

	// Listeners change only at a restart, while settings that are checked
	// against them, such as auth.trust_mailbox_header and the forward
	// proxy's routes, take effect now. So they are checked again against
	// the listeners that run.
	running := *cfg
	running.Listen, running.Forward = old.Listen, old.Forward
	if err := running.Validate(); err != nil {
		err = fmt.Errorf("with the listeners running now, which change only at a restart: %w", err)
		r.log.Error("config reload failed; the running configuration stays in force", "error", err)
		return err
	}

	// Build everything that can fail before changing anything, so a failed
	// reload leaves no mix of old and new settings.
	signer, err := mailbox.NewSigner(cfg.Auth.TokenSecrets)
	if err != nil {
		err = fmt.Errorf("auth.token_secrets: %w", err)
		r.log.Error("config reload failed; the running configuration stays in force", "error", err)
		return err
	}
	var ids *keystore.Identities
	var idDigest [32]byte
	if cfg.Keystore.IdentityFile != "" {
		ids, err = keystore.LoadIdentities(cfg.Keystore.IdentityFile)
		if err != nil {
			err = fmt.Errorf("keystore.identity_file: %w", err)
			r.log.Error("config reload failed; the running configuration stays in force", "error", err)
			return err
		}
		idDigest = sha256.Sum256([]byte(ids.SecretText()))
	}
	if err := r.handler.Apply(cfg, signer); err != nil {
		r.log.Error("config reload failed; the running configuration stays in force", "error", err)
		return err
	}

	r.admin.SetToken(cfg.Admin.Token)
	if r.ui != nil {
		// The settings page signs in with the admin token and derives its
		// session key from it, so it must change with the API's.
		r.ui.SetToken(cfg.Admin.Token)
	}
	r.admin.SetSigner(signer)
	r.admin.SetDefaultLimit(cfg.Metering.MonthlyTokenLimit)
	r.prober.SetConfig(cfg)
	identitiesChanged := ids != nil && idDigest != r.idDigest
	if identitiesChanged {
		// Swapped only on a change, so a reload of other settings never
		// touches the identities that requests are using.
		r.store.SetIdentities(ids)
		r.idDigest = idDigest
	}
	for _, key := range restartOnlyChanges(old, cfg) {
		r.log.Warn("setting changed but takes effect only after a restart", "key", key)
	}
	r.current = cfg
	r.stamps = r.statFiles(cfg)
	r.log.Info("configuration reloaded", "identities_changed", identitiesChanged,
		"identities", r.store.Identities().Len())
	return nil
}

// restartOnlyChanges returns the keys of settings that differ between old
// and cfg but are read only at start: listeners, TLS files, Redis, audit
// delivery, logging and the shutdown grace period.
func restartOnlyChanges(old, cfg *config.Config) []string {
	checks := []struct {
		key      string
		old, new any
	}{
		{"listen", old.Listen, cfg.Listen},
		{"admin.listen", old.Admin.Listen, cfg.Admin.Listen},
		{"metrics.listen", old.Metrics.Listen, cfg.Metrics.Listen},
		{"forward", old.Forward, cfg.Forward},
		{"tls", old.TLS, cfg.TLS},
		{"admin.tls", old.Admin.TLS, cfg.Admin.TLS},
		{"admin.ui", old.Admin.UI, cfg.Admin.UI},
		{"redis", old.Redis, cfg.Redis},
		{"audit", old.Audit, cfg.Audit},
		{"metering.retention_months", old.Metering.RetentionMonths, cfg.Metering.RetentionMonths},
		{"metering.response_ttl", old.Metering.ResponseTTL, cfg.Metering.ResponseTTL},
		{"log_level", old.LogLevel, cfg.LogLevel},
		{"log_format", old.LogFormat, cfg.LogFormat},
		{"shutdown_grace", old.ShutdownGrace, cfg.ShutdownGrace},
		{"dev", old.Dev, cfg.Dev},
	}
	var keys []string
	for _, c := range checks {
		if !reflect.DeepEqual(c.old, c.new) {
			keys = append(keys, c.key)
		}
	}
	return keys
}
