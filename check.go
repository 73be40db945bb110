package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"text/tabwriter"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/proxy"
	"github.com/portcullis/portcullis/rpc"
)

// checkCmd validates a config file the way a reload would — decoding,
// validation and compilation (certificates, GeoIP database) — plus the
// admin API's TLS material, which serve loads at start, and prints the
// routing table. It binds no sockets and reads no overrides.
func checkCmd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "portcullis.toml", "config file")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0 // asked for: the usage is the answer, as for `portcullis -h`
		}
		return 2
	}
	if fs.NArg() > 0 {
		// Flags end at the first argument: without this, a file named
		// without -config, or any flag after a stray word, would be
		// ignored and the default portcullis.toml used instead.
		fmt.Fprintf(stderr, "portcullis check: unexpected argument %q (the file goes after -config)\n", fs.Arg(0))
		fs.Usage()
		return 2
	}
	// Warnings (a certificate that has expired, say) go to stderr; the
	// file is still valid, as serve would take it.
	warn := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{
		Level: slog.LevelWarn,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{} // a check's output is read now, not later
			}
			return a
		},
	}))
	cfg, err := checkConfig(*path, warn)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	printRoutes(stdout, cfg)
	return 0
}

// checkConfig runs the shared validation path: the same Parse and
// Compile the reload path uses.
func checkConfig(path string, log *slog.Logger) (*config.Config, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return nil, err
	}
	srv := proxy.NewServer(proxy.Options{Logger: log})
	snap, err := srv.Compile(cfg)
	if err != nil {
		return nil, err
	}
	srv.Discard(snap)
	if err := rpc.CheckTLS(cfg); err != nil {
		return nil, err
	}
	return cfg, nil
}

func printRoutes(w io.Writer, cfg *config.Config) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LISTENER\tLISTEN\tSNI\tMODE\tBACKEND\tOPTIONS")
	for _, l := range cfg.Listeners {
		for _, r := range l.Routes {
			var opts []string
			if r.SendProxyProtocol {
				opts = append(opts, "send-proxy-v2")
			}
			if r.Mode == config.ModeL7 {
				opts = append(opts, "backend="+r.BackendProtocol)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", l.Name, l.Listen, r.SNI, r.Mode, r.Backend, strings.Join(opts, ","))
		}
		if len(l.Routes) == 0 {
			fmt.Fprintf(tw, "%s\t%s\t-\t-\t-\t(no routes)\n", l.Name, l.Listen)
		}
	}
	tw.Flush()
	fmt.Fprintf(w, "config OK: %d listener(s), hash %s\n", len(cfg.Listeners), cfg.Hash()[:12])
}
