// Command byokproxy runs the byokproxy reverse proxy and its helper
// commands.
package main

import (
	"fmt"
	"os"
)

const usage = `byokproxy: a reverse proxy that injects per-mailbox provider keys

Usage:
  byokproxy serve --config FILE   run the proxy
  byokproxy serve --dev           run with an in-process store, no services needed
  byokproxy healthcheck [--url URL]
                                  exit 0 if the proxy's /healthz answers 200

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
	case "help", "-h", "--help":
		fmt.Print(usage)
		return
	default:
		fmt.Fprintf(os.Stderr, "byokproxy: unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "byokproxy: %v\n", err)
		os.Exit(1)
	}
}
