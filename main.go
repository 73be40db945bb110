// Command portcullis is a TLS-aware edge proxy: it routes TCP connections
// by the SNI of their TLS ClientHello, relaying L4 routes untouched and
// terminating L7 routes into an HTTP reverse proxy.
//
//	portcullis serve -config portcullis.toml   # run (SIGHUP reloads, SIGTERM drains)
//	portcullis check -config portcullis.toml   # validate, print the routing table
//	portcullis ctl -admin unix:portcullis.sock status
//	portcullis version
package main

import (
	"fmt"
	"io"
	"os"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	switch args[0] {
	case "serve":
		return serveCmd(args[1:], stderr)
	case "check":
		return checkCmd(args[1:], stdout, stderr)
	case "ctl":
		return ctlCmd(args[1:], stdout, stderr)
	case "version", "-version", "--version":
		fmt.Fprintln(stdout, "portcullis", version)
		return 0
	case "help", "-h", "-help", "--help":
		usage(stdout)
		return 0
	default:
		fmt.Fprintf(stderr, "portcullis: unknown command %q\n", args[0])
		usage(stderr)
		return 2
	}
}

func usage(w io.Writer) {
	fmt.Fprint(w, `usage:
  portcullis serve -config FILE [-log-format text|json] [-log-level info] [-pprof]
  portcullis check -config FILE
  portcullis ctl   -admin unix:PATH|HOST:PORT [-tls-ca F -tls-cert F -tls-key F] [-o table|json] COMMAND ...
  portcullis version
`)
}
