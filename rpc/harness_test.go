package rpc_test

import (
	"context"
	"crypto/tls"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/proxy"
	"github.com/portcullis/portcullis/reload"
	"github.com/portcullis/portcullis/rpc"
	"github.com/portcullis/portcullis/rpc/adminpb"
	"github.com/portcullis/portcullis/state"
	"github.com/portcullis/portcullis/testnet"
)

// grpc.Server.GracefulStop and ClientConn.Close leave nothing running,
// so no goleak option is needed.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const testVersion = "v0.0.0-rpctest"

// harness is the daemon as main.go wires it — state.Store, proxy.Server,
// reload.Manager, rpc.Server on the sockets of [admin] — running on a
// config file and SQLite database in a temp dir, with a client on the
// Unix socket. Its backends are testnet.NamedBackends that answer with
// their name, so h.ask tells which one a connection reached.
type harness struct {
	t        *testing.T
	dir      string
	path     string            // the config file
	backends map[string]string // backend name -> address
	file     fileConfig        // what the config file says now
	log      *slog.Logger

	store *state.Store // the handle the daemon uses
	px    *proxy.Server
	mgr   *reload.Manager
	run   *rpc.Running
	cli   *rpc.Client
	sock  string

	mu     sync.Mutex
	hellos map[string][]byte
	reader *state.Store // a second handle on the database, for checks
}

// fileConfig is the variable part of the config file the harness writes.
type fileConfig struct {
	App     string // backend name of the public listener's app.test route
	NoAux   bool   // leave out the "aux" listener
	Admin   string // extra lines in [admin]
	MaxAux  int    // aux's max_connections
	Trailer string // appended verbatim
}

// Backend names every harness has. "app" and "api" are the file's
// routes on "public", "aux" the file's route on "aux"; the others are
// targets for overrides.
var backendNames = []string{"app", "app2", "api", "aux", "alt", "new"}

func newHarness(t *testing.T, f fileConfig) *harness {
	t.Helper()
	h := &harness{
		t:        t,
		dir:      t.TempDir(),
		backends: map[string]string{},
		hellos:   map[string][]byte{},
		log:      slog.New(slog.DiscardHandler),
	}
	if os.Getenv("PORTCULLIS_TEST_LOG") != "" {
		h.log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	// A Unix socket path must fit in sun_path (108 bytes).
	if len(filepath.Join(h.dir, "admin.sock")) > 100 {
		t.Fatalf("temp dir %s too long for a Unix socket path", h.dir)
	}
	h.path = filepath.Join(h.dir, "portcullis.toml")
	for _, n := range backendNames {
		h.backends[n] = testnet.NamedBackend(t, n)
	}
	if f.App == "" {
		f.App = "app"
	}
	if f.MaxAux == 0 {
		f.MaxAux = 7
	}
	h.writeConfig(f)
	h.start()
	t.Cleanup(func() {
		h.stop()
		if h.reader != nil {
			h.reader.Close()
		}
	})
	return h
}

// configText renders f. Listeners bind 127.0.0.1:0 and 127.0.0.2:0
// (listen addresses must differ); h.addr finds the ports.
func (h *harness) configText(f fileConfig) string {
	var b strings.Builder
	fmt.Fprintf(&b, `shutdown_grace = "5s"

[admin]
unix_socket = "admin.sock"
%s
[state]
database = "state.db"

[firewall]
block = ["203.0.113.0/24"]

[[listener]]
name = "public"
listen = "127.0.0.1:0"

  [[listener.route]]
  sni = "app.test"
  backend = %q

  [[listener.route]]
  sni = "*.api.test"
  backend = %q
`, f.Admin, h.backends[f.App], h.backends["api"])
	if !f.NoAux {
		fmt.Fprintf(&b, `
[[listener]]
name = "aux"
listen = "127.0.0.2:0"
max_connections = %d

  [[listener.route]]
  sni = "aux.test"
  backend = %q
`, f.MaxAux, h.backends["aux"])
	}
	b.WriteString(f.Trailer)
	return b.String()
}

func (h *harness) writeConfig(f fileConfig) {
	h.t.Helper()
	h.file = f
	h.writeRaw(h.configText(f))
}

func (h *harness) writeRaw(text string) {
	h.t.Helper()
	if err := os.WriteFile(h.path, []byte(text), 0o600); err != nil {
		h.t.Fatal(err)
	}
}

// start opens everything as main.go does and dials the Unix socket.
func (h *harness) start() {
	t := h.t
	t.Helper()
	cfg, err := config.Load(h.path)
	if err != nil {
		t.Fatal(err)
	}
	h.store, err = state.Open(cfg.Resolve(cfg.State.Database))
	if err != nil {
		t.Fatal(err)
	}
	h.px = proxy.NewServer(proxy.Options{Logger: h.log})
	h.mgr = reload.New(reload.Options{Path: h.path, Server: h.px, Store: h.store, Logger: h.log})
	if err := h.mgr.Start(context.Background()); err != nil {
		h.px.Shutdown(context.Background())
		h.store.Close()
		t.Fatal(err)
	}
	srv := rpc.NewServer(rpc.Options{Manager: h.mgr, Proxy: h.px, Store: h.store, Version: testVersion, Logger: h.log})
	h.run, err = rpc.Listen(cfg, srv, h.log)
	if err != nil {
		h.px.Shutdown(context.Background())
		h.store.Close()
		t.Fatal(err)
	}
	h.sock = cfg.Resolve(cfg.Admin.UnixSocket)
	h.cli, err = rpc.Dial("unix:"+h.sock, rpc.DialOptions{})
	if err != nil {
		t.Fatal(err)
	}
}

// stop closes the client, the admin sockets, the proxy and the store.
func (h *harness) stop() {
	if h.cli == nil {
		return
	}
	h.cli.Close()
	h.run.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := h.px.Shutdown(ctx); err != nil {
		h.t.Errorf("proxy shutdown: %v", err)
	}
	// The store may already be closed by a test; Close is idempotent.
	h.store.Close()
	h.cli, h.run, h.px, h.mgr, h.store = nil, nil, nil, nil, nil
}

// restart stops everything and starts again on the same files, as a
// daemon restart would.
func (h *harness) restart() {
	h.t.Helper()
	h.stop()
	h.start()
}

// ctx bounds an admin call so a hung server fails the test instead of
// the whole run.
func (h *harness) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	h.t.Cleanup(cancel)
	return ctx
}

func (h *harness) hello(sni string) []byte {
	h.mu.Lock()
	defer h.mu.Unlock()
	if b, ok := h.hellos[sni]; ok {
		return b
	}
	b := testnet.ClientHello(h.t, &tls.Config{ServerName: sni})
	h.hellos[sni] = b
	return b
}

// addr is the bound address of a listener of the running proxy.
func (h *harness) addr(listener string) string {
	h.t.Helper()
	a := h.px.Addr(listener)
	if !a.IsValid() {
		h.t.Fatalf("no listener %q", listener)
	}
	return a.String()
}

// ask sends a ClientHello for sni to listener and returns the name of
// the backend that answered.
func (h *harness) ask(listener, sni string) (string, error) {
	h.t.Helper()
	return testnet.Ask(h.addr(listener), h.hello(sni))
}

// wantBackend asserts that a connection for sni reaches backend want.
func (h *harness) wantBackend(listener, sni, want string) {
	h.t.Helper()
	got, err := h.ask(listener, sni)
	if err != nil || got != want {
		h.t.Fatalf("%s via %s: got backend %q, err %v; want %q", sni, listener, got, err, want)
	}
}

// wantRefused asserts that a connection for sni is closed without
// reaching any backend.
func (h *harness) wantRefused(listener, sni string) {
	h.t.Helper()
	if got, err := h.ask(listener, sni); err == nil {
		h.t.Fatalf("%s via %s: reached backend %q, want the connection closed", sni, listener, got)
	}
}

// status returns one listener's GetStatus entry.
func (h *harness) status(listener string) *adminpb.ListenerStatus {
	h.t.Helper()
	st, err := h.cli.Status(h.ctx())
	if err != nil {
		h.t.Fatal(err)
	}
	for _, l := range st.Listeners {
		if l.Name == listener {
			return l
		}
	}
	h.t.Fatalf("GetStatus: no listener %q in %v", listener, st.Listeners)
	return nil
}

// waitRejected waits until listener has counted at least n rejections
// for reason (the counter is bumped after the client sees the close).
func (h *harness) waitRejected(listener, reason string, n uint64) {
	h.t.Helper()
	testnet.WaitFor(h.t, fmt.Sprintf("%s rejected[%s] >= %d", listener, reason, n), func() bool {
		return h.status(listener).Rejected[reason] >= n
	})
}

// routes returns ListRoutes as "listener/sni" -> route.
func (h *harness) routes() map[string]*adminpb.Route {
	h.t.Helper()
	rs, err := h.cli.Routes(h.ctx(), "")
	if err != nil {
		h.t.Fatal(err)
	}
	m := map[string]*adminpb.Route{}
	for _, r := range rs {
		m[r.Listener+"/"+r.Sni] = r
	}
	return m
}

// wantOrigin asserts a route's origin; origin "" means no such route.
func (h *harness) wantOrigin(listener, sni, origin string) {
	h.t.Helper()
	r, ok := h.routes()[listener+"/"+sni]
	switch {
	case origin == "" && ok:
		h.t.Fatalf("ListRoutes: %s/%s still listed (origin %q, backend %s)", listener, sni, r.Origin, r.Backend)
	case origin != "" && !ok:
		h.t.Fatalf("ListRoutes: no route %s/%s", listener, sni)
	case ok && r.Origin != origin:
		h.t.Fatalf("ListRoutes: %s/%s origin %q, want %q", listener, sni, r.Origin, origin)
	}
}

// overrides returns ListOverrides.
func (h *harness) overrides() []*adminpb.Override {
	h.t.Helper()
	o, err := h.cli.Overrides(h.ctx())
	if err != nil {
		h.t.Fatal(err)
	}
	return o
}

// dbOverrides reads the database through a second handle, as another
// process would see it.
func (h *harness) dbOverrides() *state.Overrides {
	h.t.Helper()
	if h.reader == nil {
		var err error
		if h.reader, err = state.Open(filepath.Join(h.dir, "state.db")); err != nil {
			h.t.Fatal(err)
		}
	}
	o, err := h.reader.Load(h.ctx())
	if err != nil {
		h.t.Fatal(err)
	}
	return o
}

// overrideSet renders stored overrides as sorted strings, the form the
// API's list is compared with.
func overrideSet(o *state.Overrides) []string {
	var out []string
	for _, r := range o.Routes {
		if r.Deleted {
			out = append(out, fmt.Sprintf("route %s %s delete actor=%s", r.Listener, r.SNI, r.Actor))
		} else {
			out = append(out, fmt.Sprintf("route %s %s set %s actor=%s", r.Listener, r.SNI, r.Route.Backend, r.Actor))
		}
	}
	for _, f := range o.Firewall {
		action := "add"
		if f.Remove {
			action = "remove"
		}
		out = append(out, fmt.Sprintf("firewall %s %s actor=%s", f.Value, action, f.Actor))
	}
	for _, l := range o.Listeners {
		out = append(out, fmt.Sprintf("listener %s max=%d actor=%s", l.Listener, l.MaxConnections, l.Actor))
	}
	slices.Sort(out)
	return out
}

// pbOverrideSet renders ListOverrides like overrideSet.
func pbOverrideSet(list []*adminpb.Override) []string {
	var out []string
	for _, o := range list {
		switch o.Kind {
		case "route":
			if o.Action == "delete" {
				out = append(out, fmt.Sprintf("route %s %s delete actor=%s", o.Listener, o.Sni, o.Actor))
			} else {
				out = append(out, fmt.Sprintf("route %s %s set %s actor=%s", o.Listener, o.Sni, o.Route.GetBackend(), o.Actor))
			}
		case "firewall":
			out = append(out, fmt.Sprintf("firewall %s %s actor=%s", o.Value, o.Action, o.Actor))
		case "listener":
			out = append(out, fmt.Sprintf("listener %s max=%d actor=%s", o.Listener, o.MaxConnections, o.Actor))
		default:
			out = append(out, "unknown kind "+o.Kind)
		}
	}
	slices.Sort(out)
	return out
}

// findOverride returns the listed override of kind with key (listener,
// sni or value), or nil.
func findOverride(list []*adminpb.Override, kind, listener, sni, value string) *adminpb.Override {
	for _, o := range list {
		if o.Kind == kind && o.Listener == listener && o.Sni == sni && o.Value == value {
			return o
		}
	}
	return nil
}

// badRequestFields returns the field names of the BadRequest detail of
// a status error.
func badRequestFields(err error) []string {
	var fields []string
	for _, d := range status.Convert(err).Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range br.FieldViolations {
				fields = append(fields, v.Field)
			}
		}
	}
	return fields
}

func wantCode(t *testing.T, err error, want codes.Code) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("got %v (%v), want code %v", got, err, want)
	}
}

// holdConn opens a raw TCP connection through listener, sends a
// ClientHello for sni and reads the backend's greeting: a live,
// counted, relayed connection until closed.
func (h *harness) holdConn(listener, sni string) (net.Conn, string, error) {
	h.t.Helper()
	c, err := net.DialTimeout("tcp", h.addr(listener), 5*time.Second)
	if err != nil {
		return nil, "", err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(h.hello(sni)); err != nil {
		c.Close()
		return nil, "", err
	}
	line, err := testnet.ReadLine(c)
	if err != nil {
		c.Close()
		return nil, line, err
	}
	return c, line, nil
}

// echo checks a held connection still relays both ways.
func echo(t *testing.T, c net.Conn) {
	t.Helper()
	if _, err := c.Write([]byte("ping\n")); err != nil {
		t.Fatalf("write through held connection: %v", err)
	}
	line, err := testnet.ReadLine(c)
	if err != nil || line != "ping" {
		t.Fatalf("echo through held connection: %q, %v", line, err)
	}
}

// isTimeout reports a deadline error: a connection that is left open,
// not one that was closed at once.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// fillRoutes restarts the daemon on a database holding n route
// overrides (r0.bulk.test … to the "new" backend), written directly in
// one transaction rather than by n synced admin calls, as a long-lived
// deployment would have them.
func (h *harness) fillRoutes(n int) {
	h.t.Helper()
	h.stop()
	db, err := sql.Open("sqlite3", filepath.Join(h.dir, "state.db"))
	if err != nil {
		h.t.Fatal(err)
	}
	defer db.Close()
	tx, err := db.Begin()
	if err != nil {
		h.t.Fatal(err)
	}
	actor := "CN=" + strings.Repeat("operator", 20)
	for i := range n {
		sni := fmt.Sprintf("r%d.bulk.test", i)
		route := fmt.Sprintf(`{"sni":%q,"mode":"l4","backend":%q}`, sni, h.backends["new"])
		if _, err := tx.Exec(`INSERT INTO route_override (listener, sni, deleted, route, actor, updated_at) VALUES ('public', ?, 0, ?, ?, '2026-01-02T03:04:05Z')`, sni, route, actor); err != nil {
			h.t.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		h.t.Fatal(err)
	}
	h.start()
}
