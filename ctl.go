package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/portcullis/portcullis/rpc"
	"github.com/portcullis/portcullis/rpc/adminpb"
)

const ctlUsage = `usage: portcullis ctl [flags] COMMAND

commands:
  status                                   daemon, config and listener status
  health                                   gRPC health of the admin service
  routes [LISTENER]                        effective routes with their origin
  route put -listener L -sni S -backend B [-mode l7 -tls-cert F -tls-key F
            -backend-protocol P -backend-ca F -backend-server-name N
            -response-timeout D] [-send-proxy]
                                           files are read by the daemon, relative
                                           to its config file's directory
  route rm LISTENER SNI
  firewall                                 effective blocklist with origins
  firewall add VALUE | firewall rm VALUE   IP or CIDR
  maxconns LISTENER N                      0 = unlimited
  overrides                                stored overrides (orphans marked)
  overrides clear route LISTENER SNI | firewall VALUE | listener LISTENER
  overrides clear-all
  reload                                   re-read the config file
  snapshot FILE                            consistent copy of the database

flags:
`

func ctlCmd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("ctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, ctlUsage); fs.PrintDefaults() }
	admin := fs.String("admin", "unix:portcullis.sock", "admin API: unix:PATH or HOST:PORT (TLS)")
	var do rpc.DialOptions
	fs.StringVar(&do.CAFile, "tls-ca", "", "CA bundle to verify a TCP admin server")
	fs.StringVar(&do.CertFile, "tls-cert", "", "client certificate (mTLS)")
	fs.StringVar(&do.KeyFile, "tls-key", "", "client key (mTLS)")
	fs.StringVar(&do.ServerName, "server-name", "", "name to verify the server certificate against")
	out := fs.String("o", "table", "output: table or json")
	timeout := fs.Duration("timeout", 30*time.Second, "call timeout")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0 // asked for: the usage is the answer, as for `portcullis -h`
		}
		return 2
	}
	if *out != "table" && *out != "json" {
		fmt.Fprintf(stderr, "portcullis ctl: -o %q: want table or json\n", *out)
		fs.Usage()
		return 2
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	if (do.CertFile == "") != (do.KeyFile == "") {
		// Loading the pair would fail on the empty name alone, as
		// "open : no such file or directory".
		fmt.Fprintln(stderr, "portcullis ctl: -tls-cert and -tls-key go together")
		fs.Usage()
		return 2
	}
	c, err := rpc.Dial(*admin, do)
	if err != nil {
		fmt.Fprintln(stderr, "portcullis ctl:", err)
		return 1
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	p := &printer{w: stdout, json: *out == "json"}
	if err := ctl(ctx, c, p, fs.Args()); err != nil {
		var ue usageError
		if errors.As(err, &ue) {
			fmt.Fprintln(stderr, "portcullis ctl:", err)
			fs.Usage()
			return 2
		}
		if st, ok := status.FromError(err); ok {
			fmt.Fprintf(stderr, "portcullis ctl: %s: %s\n", st.Code(), st.Message())
			// A server that wants a client certificate ends the TLS
			// connection, and what reaches the client is a broken pipe
			// or a reset that names no certificate.
			// A dial that failed, or a server certificate that did not
			// verify, never got as far as the server asking for one.
			if st.Code() == codes.Unavailable && !strings.HasPrefix(*admin, "unix:") && do.CertFile == "" &&
				!strings.Contains(st.Message(), "Error while dialing") && !strings.Contains(st.Message(), "failed to verify certificate") {
				fmt.Fprintln(stderr, "portcullis ctl: an admin server with client_ca set refuses clients without -tls-cert and -tls-key")
			}
		} else {
			fmt.Fprintln(stderr, "portcullis ctl:", err)
		}
		return 1
	}
	return 0
}

type usageError string

func (e usageError) Error() string { return string(e) }

func ctl(ctx context.Context, c *rpc.Client, p *printer, args []string) error {
	cmd, rest := args[0], args[1:]
	need := func(n int, form string) error {
		if len(rest) != n {
			return usageError("usage: " + form)
		}
		return nil
	}
	// Flags end at the command, so one written after it ("status -o
	// json") is an argument, and ignoring it would print a table.
	most := func(n int) error {
		if len(rest) <= n {
			return nil
		}
		extra := rest[n]
		for _, a := range rest {
			if strings.HasPrefix(a, "-") {
				extra = a
				break
			}
		}
		if strings.HasPrefix(extra, "-") {
			return usageError(fmt.Sprintf("%s: unexpected argument %q: flags go before the command (ctl [flags] COMMAND)", cmd, extra))
		}
		return usageError(fmt.Sprintf("%s: unexpected argument %q", cmd, extra))
	}
	switch cmd {
	case "status":
		if err := most(0); err != nil {
			return err
		}
		st, err := c.Status(ctx)
		if err != nil {
			return err
		}
		return p.status(st)
	case "health":
		if err := most(0); err != nil {
			return err
		}
		s, err := c.Health(ctx)
		if err != nil {
			return err
		}
		if p.json {
			return json.NewEncoder(p.w).Encode(map[string]string{"status": s.String()})
		}
		fmt.Fprintln(p.w, s)
		return nil
	case "routes":
		if err := most(1); err != nil {
			return err
		}
		listener := ""
		if len(rest) > 0 {
			listener = rest[0]
		}
		routes, err := c.Routes(ctx, listener)
		if err != nil {
			return err
		}
		return p.routes(&adminpb.ListRoutesResponse{Routes: routes})
	case "route":
		if len(rest) == 0 {
			return usageError("usage: route put ... | route rm LISTENER SNI")
		}
		switch rest[0] {
		case "put":
			r, err := routeFlags(rest[1:])
			if err != nil {
				return err
			}
			got, err := c.PutRoute(ctx, r)
			if err != nil {
				return err
			}
			return p.routes(&adminpb.ListRoutesResponse{Routes: []*adminpb.Route{got}})
		case "rm", "delete":
			rest = rest[1:]
			if err := need(2, "route rm LISTENER SNI"); err != nil {
				return err
			}
			return p.done(c.DeleteRoute(ctx, rest[0], rest[1]), "route deleted")
		}
		return usageError("unknown route command " + strconv.Quote(rest[0]))
	case "firewall":
		if len(rest) == 0 {
			fw, err := c.FirewallRules(ctx)
			if err != nil {
				return err
			}
			return p.firewall(fw)
		}
		op, rest := rest[0], rest[1:]
		if len(rest) != 1 {
			return usageError("usage: firewall add|rm VALUE")
		}
		switch op {
		case "add":
			_, err := c.AddFirewallRule(ctx, rest[0])
			return p.done(err, "firewall rule added")
		case "rm", "remove":
			return p.done(c.RemoveFirewallRule(ctx, rest[0]), "firewall rule removed")
		}
		return usageError("unknown firewall command " + strconv.Quote(op))
	case "maxconns":
		if err := need(2, "maxconns LISTENER N"); err != nil {
			return err
		}
		n, err := strconv.ParseInt(rest[1], 10, 64)
		if err != nil {
			return usageError("maxconns: N must be a number")
		}
		return p.done(c.SetMaxConnections(ctx, rest[0], n), "max_connections set")
	case "overrides":
		if len(rest) == 0 {
			ov, err := c.Overrides(ctx)
			if err != nil {
				return err
			}
			return p.overrides(&adminpb.ListOverridesResponse{Overrides: ov})
		}
		switch {
		case rest[0] == "clear-all" && len(rest) == 1:
			n, err := c.ClearAllOverrides(ctx)
			return p.done(err, fmt.Sprintf("%d override(s) cleared", n))
		case rest[0] == "clear" && len(rest) == 4 && rest[1] == "route":
			return p.done(c.ClearOverride(ctx, "route", rest[2], rest[3], ""), "override cleared")
		case rest[0] == "clear" && len(rest) == 3 && rest[1] == "firewall":
			return p.done(c.ClearOverride(ctx, "firewall", "", "", rest[2]), "override cleared")
		case rest[0] == "clear" && len(rest) == 3 && rest[1] == "listener":
			return p.done(c.ClearOverride(ctx, "listener", rest[2], "", ""), "override cleared")
		}
		return usageError("usage: overrides clear route LISTENER SNI | firewall VALUE | listener LISTENER | overrides clear-all")
	case "reload":
		if err := most(0); err != nil {
			return err
		}
		r, err := c.Reload(ctx)
		if err != nil {
			return err
		}
		if p.json {
			return p.proto(r)
		}
		fmt.Fprintf(p.w, "reloaded: config hash %s\n", short(r.ConfigHash))
		return nil
	case "snapshot":
		if err := need(1, "snapshot FILE"); err != nil || rest[0] == "" {
			return usageError("usage: snapshot FILE")
		}
		return snapshotTo(ctx, c, p, rest[0])
	}
	return usageError("unknown command " + strconv.Quote(cmd))
}

// snapshotTo writes the streamed backup to a temporary file and renames
// it into place, so FILE is either a whole database or untouched. The
// temporary file is new (mode 0600) under a random name: a fixed one
// that someone else could create first, as a symlink say, would have the
// database written wherever they chose.
func snapshotTo(ctx context.Context, c *rpc.Client, p *printer, path string) error {
	// Renamed over a directory, the copy would fail only once streamed,
	// as "rename FILE.partial-N DIR: file exists".
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		return fmt.Errorf("snapshot: %s is a directory; name the file to write", path)
	}
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".partial-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	n, err := c.Snapshot(ctx, f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if p.json {
		return json.NewEncoder(p.w).Encode(map[string]any{"result": "snapshot written", "file": path, "bytes": n})
	}
	// The hint names the file absolutely: a relative [state] database is
	// resolved against the config file's directory, not ctl's, and would
	// name a file that does not exist, which starts an empty database.
	abs, err := filepath.Abs(path)
	if err != nil {
		abs = path
	}
	fmt.Fprintf(p.w, "snapshot written to %s (%d bytes); restore by starting with [state] database = %q\n", path, n, abs)
	return nil
}

func routeFlags(args []string) (*adminpb.Route, error) {
	fs := flag.NewFlagSet("route put", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	r := &adminpb.Route{}
	fs.StringVar(&r.Listener, "listener", "", "listener name")
	fs.StringVar(&r.Sni, "sni", "", "SNI pattern")
	fs.StringVar(&r.Backend, "backend", "", "backend host:port")
	fs.StringVar(&r.Mode, "mode", "", "l4 or l7")
	fs.BoolVar(&r.SendProxyProtocol, "send-proxy", false, "send PROXY v2 to the backend")
	fs.StringVar(&r.TlsCert, "tls-cert", "", "L7 certificate")
	fs.StringVar(&r.TlsKey, "tls-key", "", "L7 key")
	fs.StringVar(&r.BackendProtocol, "backend-protocol", "", "h2c, h2, http1, https1")
	fs.StringVar(&r.BackendCa, "backend-ca", "", "CA for TLS backends")
	fs.StringVar(&r.BackendServerName, "backend-server-name", "", "name to verify TLS backends against")
	fs.StringVar(&r.ResponseTimeout, "response-timeout", "", "L7 response header timeout")
	if err := fs.Parse(args); err != nil {
		return nil, usageError("route put: " + err.Error())
	}
	// Parsing stops at the first argument that is not a flag, so
	// "-send-proxy false" would set the flag, and "false" and every flag
	// after it would be dropped unread.
	if fs.NArg() > 0 {
		return nil, usageError(fmt.Sprintf("route put: unexpected argument %q (flags only; bool flags are -send-proxy or -send-proxy=false)", fs.Arg(0)))
	}
	if r.Listener == "" || r.Sni == "" || r.Backend == "" {
		return nil, usageError("route put needs -listener, -sni and -backend")
	}
	return r, nil
}

// printer renders responses as aligned tables or as JSON.
type printer struct {
	w    io.Writer
	json bool
}

func (p *printer) proto(m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, Indent: "  ", EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(p.w, string(b))
	return err
}

func (p *printer) done(err error, msg string) error {
	if err != nil {
		return err
	}
	if p.json {
		return json.NewEncoder(p.w).Encode(map[string]string{"result": msg})
	}
	_, err = fmt.Fprintln(p.w, msg)
	return err
}

func (p *printer) table(header string, rows [][]string) {
	tw := tabwriter.NewWriter(p.w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	tw.Flush()
}

func (p *printer) status(st *adminpb.GetStatusResponse) error {
	if p.json {
		return p.proto(st)
	}
	lr := st.LastReload
	fmt.Fprintf(p.w, "version:     %s\nuptime:      %s\nconfig:      %s (hash %s)\n", st.Version, time.Duration(st.UptimeSeconds)*time.Second, st.ConfigPath, short(st.ConfigHash))
	fmt.Fprintf(p.w, "last reload: %s (%s) at %s\n", lr.GetResult(), lr.GetTrigger(), unixTime(lr.GetAttemptedUnix()))
	if lr.GetError() != "" {
		fmt.Fprintf(p.w, "reload error: %s\n", lr.GetError())
	}
	if st.OrphanedOverrides > 0 {
		fmt.Fprintf(p.w, "orphaned overrides: %d (see `overrides`)\n", st.OrphanedOverrides)
	}
	fmt.Fprintln(p.w)
	var rows [][]string
	for _, l := range st.Listeners {
		maxc := "unlimited"
		if l.MaxConnections > 0 {
			maxc = strconv.FormatInt(l.MaxConnections, 10)
		}
		if l.MaxConnectionsOrigin != "" && l.MaxConnectionsOrigin != "file" {
			maxc += " (" + l.MaxConnectionsOrigin + ")"
		}
		var rej []string
		for reason, n := range l.Rejected {
			rej = append(rej, fmt.Sprintf("%s=%d", reason, n))
		}
		sort.Strings(rej)
		rows = append(rows, []string{l.Name, l.Address, strconv.FormatInt(l.ActiveConnections, 10), strconv.FormatUint(l.TotalConnections, 10), maxc, strconv.FormatBool(l.ProxyProtocol), strings.Join(rej, " ")})
	}
	p.table("LISTENER\tADDRESS\tACTIVE\tTOTAL\tMAX\tPROXY-PROTO\tREJECTED", rows)
	return nil
}

func (p *printer) routes(r *adminpb.ListRoutesResponse) error {
	if p.json {
		return p.proto(r)
	}
	var rows [][]string
	for _, rt := range r.Routes {
		opts := []string{}
		if rt.SendProxyProtocol {
			opts = append(opts, "send-proxy-v2")
		}
		if rt.Mode == "l7" {
			opts = append(opts, "backend="+rt.BackendProtocol)
		}
		rows = append(rows, []string{rt.Listener, rt.Sni, rt.Mode, rt.Backend, strings.Join(opts, ","), rt.Origin})
	}
	p.table("LISTENER\tSNI\tMODE\tBACKEND\tOPTIONS\tORIGIN", rows)
	return nil
}

func (p *printer) firewall(fw *adminpb.ListFirewallRulesResponse) error {
	if p.json {
		return p.proto(fw)
	}
	var rows [][]string
	for _, r := range fw.Rules {
		rows = append(rows, []string{r.Value, r.Origin})
	}
	p.table("BLOCK\tORIGIN", rows)
	if len(fw.BlockCountries) > 0 {
		fmt.Fprintf(p.w, "blocked countries (file): %s\n", strings.Join(fw.BlockCountries, " "))
	}
	return nil
}

func (p *printer) overrides(o *adminpb.ListOverridesResponse) error {
	if p.json {
		return p.proto(o)
	}
	var rows [][]string
	for _, ov := range o.Overrides {
		key, val := "", ""
		switch ov.Kind {
		case "route":
			key = ov.Listener + " " + ov.Sni
			if ov.Route != nil {
				val = ov.Route.Backend
			}
		case "firewall":
			key = ov.Value
		case "listener":
			key = ov.Listener
			val = "max_connections=" + strconv.FormatInt(ov.MaxConnections, 10)
		}
		note := ""
		if ov.Orphaned {
			note = "ORPHANED: " + ov.OrphanReason
		}
		rows = append(rows, []string{ov.Kind, key, ov.Action, val, ov.Actor, unixTime(ov.UpdatedUnix), note})
	}
	p.table("KIND\tKEY\tACTION\tVALUE\tBY\tAT\tNOTE", rows)
	return nil
}

func short(h string) string {
	if len(h) > 12 {
		return h[:12]
	}
	return h
}

func unixTime(s int64) string {
	if s == 0 {
		return "-"
	}
	return time.Unix(s, 0).UTC().Format(time.RFC3339)
}
