// Command byokproxy runs the byokproxy reverse proxy and its helper
// commands.
package main

import (
	"errors"
	"fmt"
	"os"
	"runtime/debug"

	"github.com/spf13/pflag"
)

const usage = `byokproxy: a reverse proxy that injects per-mailbox provider keys

Usage:
  byokproxy serve --config FILE   run the proxy
  byokproxy serve --dev           run with an in-process store, no services needed
  byokproxy healthcheck [--url URL]
                                  exit 0 if the proxy's /healthz answers 200
  byokproxy keys set|show|rm|use|test MAILBOX [PROVIDER] ...
                                  manage a mailbox's keys through the admin API
  byokproxy token issue|revoke MAILBOX
                                  print or revoke a mailbox's token
  byokproxy identity new [--out FILE]
                                  create an age identity for keystore.identity_file
  byokproxy identity rewrap --config FILE
                                  encrypt every stored key to the first identity
  byokproxy ca new --cert FILE --key FILE
                                  create the CA of the forward proxy (forward.ca_cert_file)

  byokproxy version               print the version

Run "byokproxy COMMAND --help" for the flags of a command.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "healthcheck":
		err = healthcheck(os.Args[2:])
	case "keys":
		os.Exit(keysCommand(os.Args[2:], osIO()))
	case "token":
		os.Exit(tokenCommand(os.Args[2:], osIO()))
	case "identity":
		os.Exit(identityCommand(os.Args[2:], osIO()))
	case "ca":
		os.Exit(caCommand(os.Args[2:], osIO()))
	case "version", "--version":
		fmt.Println("byokproxy " + version())
		return
	case "help", "-h", "--help":
		fmt.Print(usage)
		return
	default:
		fmt.Fprintf(os.Stderr, "byokproxy: unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	if errors.Is(err, pflag.ErrHelp) {
		// The flag set printed the help text already.
		return
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "byokproxy: %v\n", err)
		os.Exit(1)
	}
}

// version returns the module version and VCS revision the binary was built
// from, as the Go toolchain records them.
func version() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := info.Main.Version
	for _, setting := range info.Settings {
		if setting.Key == "vcs.revision" && len(setting.Value) >= 12 {
			v += " (" + setting.Value[:12] + ")"
		}
	}
	return v
}
