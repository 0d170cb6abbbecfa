package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"github.com/spf13/pflag"

	"github.com/byokproxy/byokproxy/admin"
	"github.com/byokproxy/byokproxy/audit"
	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/metrics"
	"github.com/byokproxy/byokproxy/proxy"
)

func serve(args []string) error {
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	config.RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := config.Load(fs, os.Environ())
	if err != nil {
		return err
	}
	log := newLogger(cfg, os.Stderr)
	// Load ignores a misspelt variable, and the key it meant to set then
	// keeps its value from the file or its default.
	for _, name := range config.UnknownEnv(os.Environ(), envAdminURL) {
		log.Warn("environment variable names no config key and is ignored; check its spelling against config.example.yaml", "variable", name)
	}
	disableCoreDumps(log)
	warnReadableSecrets(cfg, log)
	redis.SetLogger(redisLogger{log: log.With("component", "redis")})

	ids, rdb, cleanup, err := openStore(cfg, log)
	if err != nil {
		return err
	}
	defer cleanup()

	signer, err := mailbox.NewSigner(cfg.Auth.TokenSecrets)
	if err != nil {
		return fmt.Errorf("auth.token_secrets: %w", err)
	}

	reg := prometheus.NewRegistry()
	m := metrics.New(reg)
	store := keystore.New(rdb, cfg.Redis.Prefix, ids)
	store.EnableCache(cfg.Redis.CacheTTL)
	watchCtx, stopWatch := context.WithCancel(context.Background())
	defer stopWatch()
	go store.Watch(watchCtx, log.With("component", "cache"))

	var stdout io.Writer
	if cfg.Audit.Stdout {
		stdout = os.Stdout
	}
	writer := audit.NewWriter(rdb, store.Layout(), audit.Options{
		QueueSize:       cfg.Audit.QueueSize,
		StreamMaxLen:    cfg.Audit.StreamMaxLen,
		Stdout:          stdout,
		RetentionMonths: cfg.Metering.RetentionMonths,
		ResponseTTL:     cfg.Metering.ResponseTTL,
		Dropped:         m.AuditDropped,
		Logger:          log.With("component", "audit"),
	})
	auditCtx, stopAudit := context.WithCancel(context.Background())
	defer stopAudit()
	go writer.Run(auditCtx)

	handler, err := proxy.New(proxy.Options{
		Config: cfg, Store: store, Signer: signer, Audit: writer, Metrics: m, Logger: log,
	})
	if err != nil {
		return err
	}
	prober := proxy.NewProber(cfg)
	adminAPI := admin.New(admin.Options{
		Store: store, Signer: signer, Audit: writer, Token: cfg.Admin.Token,
		MonthlyTokenLimit: cfg.Metering.MonthlyTokenLimit,
		Prober:            prober,
		Logger:            log.With("component", "admin"),
	})
	// The page under /ui/ and its session cookie exist only with admin.ui;
	// otherwise every request goes to the API unchanged and /ui/ is a 404.
	adminHandler := admin.NewUI(adminAPI, admin.UIOptions{
		Enabled: cfg.Admin.UI,
		Token:   cfg.Admin.Token,
		Logger:  log.With("component", "admin-ui"),
	})
	// SIGHUP or a change of the config, identity or secret files reloads
	// what can change without a restart.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	reloadCtx, stopReload := context.WithCancel(context.Background())
	defer stopReload()
	reload := newReloader(fs, cfg, log.With("component", "reload"), handler, adminAPI, prober, store)
	reload.ui = adminHandler
	go reload.run(reloadCtx, hup, reloadPollInterval)

	servers := []*listener{
		{name: "proxy", setting: "listen", addr: cfg.Listen, tls: cfg.TLS, handler: handler, maxHeader: cfg.Limits.MaxHeaderBytes},
		{name: "admin", setting: "admin.listen", addr: cfg.Admin.Listen, tls: cfg.Admin.TLS, handler: adminHandler},
		{name: "metrics", setting: "metrics.listen", addr: cfg.Metrics.Listen, handler: metrics.Handler(reg)},
	}
	var forward *proxy.Forward
	var caFile string
	if cfg.Forward.Listen != "" {
		var ca tls.Certificate
		ca, caFile, err = forwardCA(cfg)
		if err != nil {
			return err
		}
		if cfg.Dev && cfg.Forward.CACertFile == "" {
			// The dev CA lives for one run; its certificate file goes with it.
			defer os.Remove(caFile)
		}
		forward, err = proxy.NewForward(handler, ca, log.With("component", "forward"))
		if err != nil {
			return err
		}
		servers = append(servers, &listener{name: "forward", setting: "forward.listen", addr: cfg.Forward.Listen, handler: forward, maxHeader: cfg.Limits.MaxHeaderBytes})
		log.Info("forward proxy enabled", "forward_listen", cfg.Forward.Listen, "ca_cert_file", caFile)
	}
	errs := make(chan error, len(servers))
	for _, s := range servers {
		if err := s.listen(log); err != nil {
			for _, started := range servers {
				started.close()
			}
			return err
		}
		go func() { errs <- s.serve() }()
	}
	log.Info("byokproxy started", "listen", cfg.Listen, "admin_listen", cfg.Admin.Listen, "admin_ui", cfg.Admin.UI,
		"metrics_listen", cfg.Metrics.Listen, "dev", cfg.Dev, "identities", ids.Len())
	if cfg.Dev {
		printDevBanner(os.Stderr, cfg, caFile)
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	var serveErr error
	select {
	case sig := <-sigs:
		log.Info("shutting down", "signal", sig.String(), "grace", cfg.ShutdownGrace.String())
	case serveErr = <-errs:
		log.Error("listener failed, shutting down", "error", serveErr)
	}

	// Stop accepting, let in-flight requests and streams finish within the
	// grace period, then deliver the audit events they produced. Another
	// signal during the grace period ends it at once, so an operator can
	// stop a long drain without losing the audit events. The delivery has
	// a limit of its own, which a signal does not shorten.
	ctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownGrace)
	defer cancel()
	flushLimit := max(cfg.ShutdownGrace/2, 5*time.Second)
	drained, stopped := make(chan struct{}), make(chan struct{})
	defer close(stopped)
	go func() {
		for {
			select {
			case sig := <-sigs:
				select {
				case <-drained:
					log.Warn("signal during the audit delivery, which ends within its limit", "signal", sig.String(), "limit", flushLimit.String())
				default:
					log.Warn("another signal, ending the grace period now", "signal", sig.String())
					cancel()
				}
			case <-stopped:
				return
			}
		}
	}()
	stop := func(s *listener) {
		if err := s.srv.Shutdown(ctx); err != nil {
			log.Warn("requests still running at the end of the grace period", "listener", s.name, "error", err)
			if s.name == "proxy" {
				handler.Cut()
			}
			s.srv.Close()
		}
	}
	// The forward listener stops accepting as the proxy listener does, so
	// no client starts a stream through it while the proxy listener drains,
	// only to have it cut when the grace period ends. Its server goes on
	// serving the connections already open, where a CONNECT now gets 503:
	// a server in Shutdown would close them without a response instead.
	if forward != nil {
		forward.StopIntercepting()
		for _, s := range servers {
			if s.name == "forward" {
				s.close()
			}
		}
	}
	for _, s := range servers {
		if s.name == "proxy" {
			stop(s)
		}
	}
	// Streams detached from the proxy listener's server are not among the
	// requests its Shutdown waits for, and the forward listener's Shutdown
	// does not wait for hijacked tunnels. Both are waited for here, before
	// the admin and metrics listeners stop, so that both serve while the
	// streams drain.
	if err := handler.Drain(ctx); err != nil {
		log.Warn("streams still open at the end of the grace period", "listener", "proxy", "error", err)
	}
	if forward != nil {
		if err := forward.Shutdown(ctx); err != nil {
			log.Warn("intercepted requests still running at the end of the grace period", "listener", "forward", "error", err)
			handler.Cut()
			forward.Close()
			// Close does not wait for the handlers of the requests it
			// cuts, which still record their exchanges.
			handler.Drain(ctx)
		}
	}
	for _, s := range servers {
		if s.name != "proxy" {
			stop(s)
		}
	}
	close(drained)
	flushCtx, cancelFlush := context.WithTimeout(context.Background(), flushLimit)
	defer cancelFlush()
	// Close logs what it could not deliver.
	writer.Close(flushCtx)
	log.Info("byokproxy stopped")
	return serveErr
}

// listener is one HTTP server of the process.
type listener struct {
	name string
	// setting is the configuration key of addr.
	setting   string
	addr      string
	tls       config.TLS
	handler   http.Handler
	maxHeader int
	ln        net.Listener
	srv       *http.Server
}

func (l *listener) listen(log *slog.Logger) error {
	ln, err := net.Listen("tcp", l.addr)
	if err != nil {
		env := "BYOKPROXY_" + strings.ToUpper(strings.ReplaceAll(l.setting, ".", "_"))
		return fmt.Errorf("%s listener: %w; set %s (environment variable %s) to another address", l.name, err, l.setting, env)
	}
	l.ln = ln
	l.srv = &http.Server{
		Handler: l.handler,
		// A slow client must not hold a connection open forever before its
		// request arrives; the body of a long stream has no such limit.
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	if l.maxHeader > 0 {
		// The handler rejects oversized headers in the provider's shape, and
		// the server's own limit sits above it as a hard stop.
		l.srv.MaxHeaderBytes = 2 * l.maxHeader
	}
	return nil
}

func (l *listener) serve() error {
	var err error
	if l.tls.CertFile != "" {
		err = l.srv.ServeTLS(l.ln, l.tls.CertFile, l.tls.KeyFile)
	} else {
		err = l.srv.Serve(l.ln)
	}
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("%s listener: %w", l.name, err)
}

func (l *listener) close() {
	if l.ln != nil {
		l.ln.Close()
	}
}

func newLogger(cfg *config.Config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.SlogLevel()}
	if cfg.LogFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// openStore returns the identities and Redis client. In --dev mode it starts
// an in-process Redis-compatible store and makes a fresh identity, admin
// token and token secret, all held in memory only.
func openStore(cfg *config.Config, log *slog.Logger) (*keystore.Identities, redis.UniversalClient, func(), error) {
	if cfg.Dev {
		mr := miniredis.NewMiniRedis()
		if err := mr.StartAddr("127.0.0.1:0"); err != nil {
			return nil, nil, nil, fmt.Errorf("dev store: %w", err)
		}
		ids, err := keystore.GenerateIdentities()
		if err != nil {
			mr.Close()
			return nil, nil, nil, err
		}
		if cfg.Admin.Token == "" {
			cfg.Admin.Token = randomToken()
		}
		if len(cfg.Auth.TokenSecrets) == 0 {
			cfg.Auth.TokenSecrets = []string{randomToken()}
		}
		rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
		log.Info("dev mode: in-process store and fresh identity, nothing is kept after exit", "store", mr.Addr())
		return ids, rdb, func() { rdb.Close(); mr.Close() }, nil
	}
	ids, err := keystore.LoadIdentities(cfg.Keystore.IdentityFile)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("keystore.identity_file: %w", err)
	}
	rdb, err := keystore.OpenRedis(cfg.Redis)
	if err != nil {
		return nil, nil, nil, err
	}
	// A Redis that is down at start is not fatal: /readyz reports it and
	// requests get 503 until it is back. The check runs beside the start so
	// the listeners come up at once.
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		if err := rdb.Ping(ctx).Err(); err != nil {
			log.Warn("redis unreachable at start; requests that need it get 503 until it is back", "error", err)
			return
		}
		// Requests are still served, because the setting can change while
		// the proxy runs, and /readyz reports it until it is fixed.
		if err := keystore.CheckEviction(ctx, rdb); errors.Is(err, keystore.ErrEvicting) {
			log.Error("redis may evict mailbox records and usage counters, which would make revoked tokens valid and reset allowances; /readyz fails until it is fixed", "error", err)
		}
	}()
	return ids, rdb, func() { rdb.Close() }, nil
}

func randomToken() string {
	b := make([]byte, 24)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// printDevBanner prints the listeners, the admin token and a first request
// to w, standard error in the proxy, where a developer running "make run"
// reads them. caFile is the forward proxy's CA certificate, if it runs.
func printDevBanner(w io.Writer, cfg *config.Config, caFile string) {
	extraLines := ""
	if cfg.Admin.UI {
		extraLines = "\n  key settings page: http://" + cfg.Admin.Listen + "/ui/ (sign in with the admin token)"
	}
	if cfg.Forward.Listen != "" {
		extraLines += "\n  forward proxy: http://" + cfg.Forward.Listen + " (its CA certificate: " + caFile + ")"
	}
	fmt.Fprintf(w, `
byokproxy is running in dev mode (in-memory store; everything is lost on exit).

  proxy:   http://%[1]s   (SDK base URLs: /openai/v1, /anthropic, /google)
  admin:   http://%[2]s
  metrics: http://%[3]s/metrics
  admin token: %[4]s%[5]s

Try it:
  export ADMIN_TOKEN=%[4]s BYOKPROXY_ADMIN_TOKEN=%[4]s BYOKPROXY_ADMIN_URL=http://%[2]s
  curl -s -X POST -H "Authorization: Bearer $ADMIN_TOKEN" http://%[2]s/admin/v1/mailboxes/alice@example.com/token
  curl -s -H "Authorization: Bearer $ADMIN_TOKEN" http://%[2]s/admin/v1/mailboxes/alice@example.com

`, cfg.Listen, cfg.Admin.Listen, cfg.Metrics.Listen, cfg.Admin.Token, extraLines)
}

// warnReadableSecrets logs a warning for each secret file that every user of
// the machine can read. It warns rather than stopping the start, because
// Kubernetes mounts Secret files with mode 0644 unless the volume sets
// defaultMode, and a container often has no other users.
func warnReadableSecrets(cfg *config.Config, log *slog.Logger) {
	for _, f := range cfg.SecretFiles() {
		info, err := os.Stat(f.Path)
		if err != nil {
			// The file was read at load time, so it has been removed
			// since, which the next reload reports.
			continue
		}
		if perm := info.Mode().Perm(); perm&0o004 != 0 {
			log.Warn("secret file is readable by every user on this machine; restrict it, such as with chmod 600",
				"key", f.Key, "path", f.Path, "mode", fmt.Sprintf("%#o", perm))
		}
	}
}

// disableCoreDumps sets the core file size limit to zero, so a crash never
// writes process memory, with any key being used at that moment, to disk.
func disableCoreDumps(log *slog.Logger) {
	if err := syscall.Setrlimit(syscall.RLIMIT_CORE, &syscall.Rlimit{Cur: 0, Max: 0}); err != nil {
		log.Warn("could not disable core dumps", "error", err)
	}
}
