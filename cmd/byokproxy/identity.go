package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/keystore"
)

const identityUsage = `Usage:
  byokproxy identity new [--out FILE]
      Create a fresh age X25519 identity. With --out, write it to FILE
      (mode 0600; an existing file is never overwritten) and print its
      recipient (age1...) on standard output. Without --out, print the
      identity file text on standard output and the recipient on standard
      error.

  byokproxy identity rewrap --config FILE [--restart] [--batch N]
      Encrypt every stored key again to the recipient of the first identity
      in keystore.identity_file, while the proxy keeps serving. To rotate:
        1. byokproxy identity new --out new.txt
        2. put new.txt's AGE-SECRET-KEY line first in the identity file,
           keeping the old line after it
        3. reload every proxy replica (SIGHUP, or let it notice the change)
        4. byokproxy identity rewrap --config FILE
        5. once it reports 0 failed, remove the old line and reload again
      Interrupting it (Ctrl-C) is safe: the next run resumes where it stopped.

Flags:
`

// identityCommand runs "byokproxy identity ..." and returns the exit code.
func identityCommand(args []string, cio cliIO) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(cio.stderr, identityUsage)
		if len(args) == 0 {
			return exitUsage
		}
		return exitOK
	}
	var err error
	switch args[0] {
	case "new":
		err = identityNew(args[1:], cio)
	case "rewrap":
		err = identityRewrap(context.Background(), args[1:], cio, nil)
	default:
		err = usagef("unknown identity command %q: use new or rewrap", args[0])
	}
	if err == nil {
		return exitOK
	}
	if errors.Is(err, pflag.ErrHelp) {
		return exitOK
	}
	fmt.Fprintf(cio.stderr, "byokproxy: %v\n", err)
	var usage *usageError
	if errors.As(err, &usage) {
		fmt.Fprintln(cio.stderr, `Run "byokproxy identity --help" for usage.`)
		return exitUsage
	}
	return exitFailure
}

func identityFlags(name string, cio cliIO) *pflag.FlagSet {
	fs := pflag.NewFlagSet("identity "+name, pflag.ContinueOnError)
	fs.SetOutput(cio.stderr)
	fs.Usage = func() {
		fmt.Fprint(cio.stderr, identityUsage)
		fs.PrintDefaults()
	}
	return fs
}

func parseIdentityFlags(fs *pflag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return err
		}
		return usagef("%v", err)
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	return nil
}

func identityNew(args []string, cio cliIO) error {
	fs := identityFlags("new", cio)
	out := fs.String("out", "", "write the identity to this `file` (mode 0600) instead of standard output")
	if err := parseIdentityFlags(fs, args); err != nil {
		return err
	}
	ids, err := keystore.GenerateIdentities()
	if err != nil {
		return fmt.Errorf("generating an identity failed: %w", err)
	}
	recipient := ids.Recipient().String()
	text := fmt.Sprintf("# created: %s\n# recipient: %s\n%s",
		time.Now().UTC().Format(time.RFC3339), recipient, ids.SecretText())

	if *out == "" {
		fmt.Fprint(cio.stdout, text)
		fmt.Fprintf(cio.stderr, "recipient: %s\n", recipient)
		return nil
	}
	if err := writeNewFile(*out, []byte(text)); err != nil {
		return err
	}
	fmt.Fprintln(cio.stdout, recipient)
	return nil
}

// writeNewFile creates path with mode 0600 and writes data, failing if the
// file exists: an identity file may hold the only copy of a secret key.
func writeNewFile(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%s already exists: an identity file is never overwritten; choose another --out path", path)
	}
	if err != nil {
		return fmt.Errorf("creating the identity file failed: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("writing %s failed: %w", path, err)
	}
	if err := f.Close(); err != nil {
		os.Remove(path)
		return fmt.Errorf("writing %s failed: %w", path, err)
	}
	return nil
}

// identityRewrap runs the rewrap until it completes, ctx ends or SIGINT or
// SIGTERM arrives. progress, when not nil, also receives each progress report,
// for tests.
func identityRewrap(ctx context.Context, args []string, cio cliIO, progress func(keystore.RewrapStats)) error {
	fs := identityFlags("rewrap", cio)
	config.RegisterFlags(fs)
	restart := fs.Bool("restart", false, "ignore the checkpoint of an interrupted run and scan from the start")
	batch := fs.Int64("batch", 100, "COUNT hint of each Redis SCAN call")
	every := fs.Int64("progress-every", 1000, "log progress after this many keys (and at least every 5 seconds)")
	tagUntagged := fs.Bool("tag-untagged", false, "also bind again, with a tag, the key payloads that older versions wrote without one; use once, right after upgrading, since anyone who can write Redis could have written such a payload")
	if err := parseIdentityFlags(fs, args); err != nil {
		return err
	}
	if fs.Lookup("config").Value.String() == "" {
		return usagef("identity rewrap needs --config FILE: the proxy's configuration, for redis.* and keystore.identity_file")
	}
	cfg, err := config.Load(fs, os.Environ())
	if err != nil {
		return err
	}
	if cfg.Dev {
		return usagef("identity rewrap needs a proxy configuration with a Redis server; --dev keeps keys in memory only")
	}
	log := newLogger(cfg, cio.stderr)

	ids, err := keystore.LoadIdentities(cfg.Keystore.IdentityFile)
	if err != nil {
		return fmt.Errorf("keystore.identity_file: %w", err)
	}
	rdb, err := keystore.OpenRedis(cfg.Redis)
	if err != nil {
		return err
	}
	defer rdb.Close()
	store := keystore.New(rdb, cfg.Redis.Prefix, ids)
	if err := store.Ping(ctx); err != nil {
		return fmt.Errorf("redis unreachable: %w; check redis.* in %s", err, fs.Lookup("config").Value.String())
	}

	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	log.Info("rewrap started", "recipient", ids.Recipient().String(), "identities", ids.Len(), "prefix", cfg.Redis.Prefix)
	start := time.Now()
	stats, err := store.Rewrap(ctx, keystore.RewrapOptions{
		Count:         *batch,
		Checkpoint:    true,
		Restart:       *restart,
		ProgressEvery: *every,
		Progress: func(st keystore.RewrapStats) {
			logRewrapStats(log, "rewrap progress", st, start)
			if progress != nil {
				progress(st)
			}
		},
		Logger:      log,
		TagUntagged: *tagUntagged,
	})
	logRewrapStats(log, "rewrap stopped", stats, start)
	fmt.Fprintf(cio.stdout, "rewrapped %d, already current %d, skipped because changed concurrently %d, failed %d (mailboxes scanned %d)\n",
		stats.Rewrapped, stats.Current, stats.Skipped, stats.Failed, stats.Mailboxes)
	switch {
	case errors.Is(err, context.Canceled):
		return errors.New("rewrap interrupted: run the same command again to resume from the checkpoint")
	case err != nil:
		return fmt.Errorf("rewrap stopped: %w; run the same command again to resume", err)
	case stats.Failed > 0:
		return fmt.Errorf("%d keys could not be rewrapped (see the log lines above); they are unchanged, and keys that no identity decrypts must be stored again", stats.Failed)
	}
	return nil
}

func logRewrapStats(log *slog.Logger, msg string, st keystore.RewrapStats, start time.Time) {
	log.Info(msg, "mailboxes", st.Mailboxes, "rewrapped", st.Rewrapped, "current", st.Current,
		"skipped", st.Skipped, "failed", st.Failed, "elapsed", time.Since(start).Round(time.Millisecond).String())
}
