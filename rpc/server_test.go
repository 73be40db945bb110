package rpc_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	_ "github.com/mattn/go-sqlite3"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/portcullis/portcullis/rpc/adminpb"
	"github.com/portcullis/portcullis/state"
	"github.com/portcullis/portcullis/testnet"
	"github.com/portcullis/portcullis/testpki"
)

func myActor() string { return "uid:" + strconv.Itoa(os.Getuid()) }

func TestGetStatus(t *testing.T) {
	h := newHarness(t, fileConfig{})
	h.wantBackend("public", "app.test", "app")
	h.wantBackend("public", "v1.api.test", "api")

	st, err := h.cli.Status(h.ctx())
	if err != nil {
		t.Fatal(err)
	}
	if st.Version != testVersion {
		t.Errorf("version %q, want %q", st.Version, testVersion)
	}
	if st.ConfigPath != h.path || len(st.ConfigHash) != 64 {
		t.Errorf("config path %q hash %q, want %q and a sha256", st.ConfigPath, st.ConfigHash, h.path)
	}
	lr := st.LastReload
	if lr.GetResult() != "success" || lr.GetTrigger() != "startup" || lr.GetError() != "" || lr.GetSucceededUnix() == 0 || lr.GetAttemptedUnix() == 0 {
		t.Errorf("last reload %+v, want a successful startup", lr)
	}
	if st.OrphanedOverrides != 0 {
		t.Errorf("orphaned overrides %d, want 0", st.OrphanedOverrides)
	}
	if len(st.Listeners) != 2 {
		t.Fatalf("listeners %v, want aux and public", st.Listeners)
	}
	byName := map[string]*adminpb.ListenerStatus{}
	for _, l := range st.Listeners {
		byName[l.Name] = l
	}
	pub, aux := byName["public"], byName["aux"]
	if pub == nil || aux == nil {
		t.Fatalf("listeners %v, want aux and public", st.Listeners)
	}
	if pub.Address != h.addr("public") || aux.Address != h.addr("aux") {
		t.Errorf("addresses %s, %s; want %s, %s", pub.Address, aux.Address, h.addr("public"), h.addr("aux"))
	}
	if pub.MaxConnections != 0 || aux.MaxConnections != 7 || aux.MaxConnectionsOrigin != "file" {
		t.Errorf("max_connections public %d, aux %d (%s); want 0 and 7 (file)", pub.MaxConnections, aux.MaxConnections, aux.MaxConnectionsOrigin)
	}
	if pub.TotalConnections < 2 || aux.TotalConnections != 0 {
		t.Errorf("total connections public %d aux %d, want >= 2 and 0", pub.TotalConnections, aux.TotalConnections)
	}
	// The relays of the two asks end shortly after the client closed.
	testnet.WaitFor(t, "public active == 0", func() bool { return h.status("public").ActiveConnections == 0 })

	c, line, err := h.holdConn("aux", "aux.test")
	if err != nil || line != "aux" {
		t.Fatalf("hold aux: %q, %v", line, err)
	}
	defer c.Close()
	if a := h.status("aux"); a.ActiveConnections != 1 || a.TotalConnections != 1 {
		t.Errorf("aux active %d total %d with one connection held, want 1 and 1", a.ActiveConnections, a.TotalConnections)
	}
	h.wantRefused("aux", "nothing.test")
	h.waitRejected("aux", "no_route", 1)
}

func TestListRoutesOrigins(t *testing.T) {
	h := newHarness(t, fileConfig{})
	ctx := h.ctx()
	if _, err := h.cli.PutRoute(ctx, &adminpb.Route{Listener: "public", Sni: "new.test", Backend: h.backends["new"]}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.cli.PutRoute(ctx, &adminpb.Route{Listener: "public", Sni: "APP.test.", Backend: h.backends["alt"]}); err != nil {
		t.Fatal(err)
	}
	want := map[string][2]string{ // key -> origin, backend
		"public/app.test":   {"file, overridden", h.backends["alt"]},
		"public/*.api.test": {"file", h.backends["api"]},
		"public/new.test":   {"override", h.backends["new"]},
		"aux/aux.test":      {"file", h.backends["aux"]},
	}
	got := h.routes()
	if len(got) != len(want) {
		t.Errorf("ListRoutes: %d routes, want %d: %v", len(got), len(want), got)
	}
	for k, w := range want {
		r := got[k]
		if r == nil {
			t.Errorf("ListRoutes: no %s", k)
			continue
		}
		if r.Origin != w[0] || r.Backend != w[1] || r.Mode != "l4" {
			t.Errorf("ListRoutes %s: origin %q backend %s mode %q, want %q %s l4", k, r.Origin, r.Backend, r.Mode, w[0], w[1])
		}
	}

	// The listener filter.
	rs, err := h.cli.Routes(ctx, "aux")
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 1 || rs[0].Sni != "aux.test" || rs[0].Listener != "aux" {
		t.Errorf("ListRoutes(aux): %v", rs)
	}
}

func TestPutRoute(t *testing.T) {
	h := newHarness(t, fileConfig{})
	ctx := h.ctx()
	h.wantRefused("public", "new.test")

	got, err := h.cli.PutRoute(ctx, &adminpb.Route{Listener: "public", Sni: "New.Test.", Backend: h.backends["new"]})
	if err != nil {
		t.Fatal(err)
	}
	if got.Sni != "new.test" || got.Origin != "override" || got.Mode != "l4" || got.Listener != "public" {
		t.Errorf("PutRoute returned %+v, want the normalised route with origin override", got)
	}
	h.wantBackend("public", "new.test", "new")
	h.wantBackend("public", "app.test", "app") // the others are untouched
	h.wantRefused("aux", "new.test")           // and only on that listener

	// Replacing the same key keeps one override.
	if _, err := h.cli.PutRoute(ctx, &adminpb.Route{Listener: "public", Sni: "new.test", Backend: h.backends["alt"]}); err != nil {
		t.Fatal(err)
	}
	h.wantBackend("public", "new.test", "alt")
	if want := []string{"route public new.test set " + h.backends["alt"] + " actor=" + myActor()}; !slices.Equal(pbOverrideSet(h.overrides()), want) {
		t.Errorf("overrides %v, want %v", pbOverrideSet(h.overrides()), want)
	}
	if got, want := overrideSet(h.dbOverrides()), pbOverrideSet(h.overrides()); !slices.Equal(got, want) {
		t.Errorf("database %v, memory %v", got, want)
	}
}

func TestDeleteRoute(t *testing.T) {
	for _, tc := range []struct {
		name      string
		setup     func(h *harness)
		sni       string
		wantAfter []string // the override set after the delete, "" actor filled in
	}{
		{
			name:      "file route gets a tombstone",
			sni:       "app.test",
			wantAfter: []string{"route public app.test delete"},
		},
		{
			name: "overridden file route becomes a tombstone",
			setup: func(h *harness) {
				if _, err := h.cli.PutRoute(h.ctx(), &adminpb.Route{Listener: "public", Sni: "app.test", Backend: h.backends["alt"]}); err != nil {
					h.t.Fatal(err)
				}
				h.wantBackend("public", "app.test", "alt")
			},
			sni:       "app.test",
			wantAfter: []string{"route public app.test delete"},
		},
		{
			name: "override-only route drops the override",
			setup: func(h *harness) {
				if _, err := h.cli.PutRoute(h.ctx(), &adminpb.Route{Listener: "public", Sni: "new.test", Backend: h.backends["new"]}); err != nil {
					h.t.Fatal(err)
				}
				h.wantBackend("public", "new.test", "new")
			},
			sni:       "new.test",
			wantAfter: nil,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, fileConfig{})
			if tc.setup != nil {
				tc.setup(h)
			}
			if err := h.cli.DeleteRoute(h.ctx(), "public", strings.ToUpper(tc.sni)); err != nil {
				t.Fatal(err)
			}
			h.wantRefused("public", tc.sni)
			h.wantOrigin("public", tc.sni, "")
			h.wantBackend("public", "v1.api.test", "api")
			var want []string
			for _, w := range tc.wantAfter {
				want = append(want, w+" actor="+myActor())
			}
			if got := pbOverrideSet(h.overrides()); !slices.Equal(got, want) {
				t.Errorf("overrides %v, want %v", got, want)
			}
			if got := overrideSet(h.dbOverrides()); !slices.Equal(got, want) {
				t.Errorf("database %v, want %v", got, want)
			}
			// Deleting again: there is no such route any more.
			wantCode(t, h.cli.DeleteRoute(h.ctx(), "public", tc.sni), codes.NotFound)
		})
	}
}

func TestFirewallRules(t *testing.T) {
	h := newHarness(t, fileConfig{})
	ctx := h.ctx()
	rules := func() map[string]string {
		t.Helper()
		r, err := h.cli.FirewallRules(ctx)
		if err != nil {
			t.Fatal(err)
		}
		m := map[string]string{}
		for _, x := range r.Rules {
			m[x.Value] = x.Origin
		}
		return m
	}
	if got, want := rules(), map[string]string{"203.0.113.0/24": "file"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("rules %v, want %v", got, want)
	}
	h.wantBackend("public", "app.test", "app")

	// Block the address the tests connect from.
	rule, err := h.cli.AddFirewallRule(ctx, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	if rule.Value != "127.0.0.1/32" || rule.Origin != "override" {
		t.Errorf("AddFirewallRule returned %+v", rule)
	}
	h.wantRefused("public", "app.test")
	h.waitRejected("public", "blocked_ip", 1)

	// Repeating a file entry marks it "file, overridden".
	if rule, err = h.cli.AddFirewallRule(ctx, "203.0.113.0/24"); err != nil {
		t.Fatal(err)
	}
	if rule.Origin != "file, overridden" {
		t.Errorf("re-adding a file rule: origin %q", rule.Origin)
	}
	want := map[string]string{"203.0.113.0/24": "file, overridden", "127.0.0.1/32": "override"}
	if got := rules(); !reflect.DeepEqual(got, want) {
		t.Errorf("rules %v, want %v", got, want)
	}

	// Removing the override-only rule drops its override; traffic flows.
	if err := h.cli.RemoveFirewallRule(ctx, "127.0.0.1/32"); err != nil {
		t.Fatal(err)
	}
	h.wantBackend("public", "app.test", "app")
	// Removing a file rule leaves a "remove" override.
	if err := h.cli.RemoveFirewallRule(ctx, "203.0.113.0/24"); err != nil {
		t.Fatal(err)
	}
	if got := rules(); len(got) != 0 {
		t.Errorf("rules after removing both: %v", got)
	}
	wantSet := []string{"firewall 203.0.113.0/24 remove actor=" + myActor()}
	if got := pbOverrideSet(h.overrides()); !slices.Equal(got, wantSet) {
		t.Errorf("overrides %v, want %v", got, wantSet)
	}
	if got := overrideSet(h.dbOverrides()); !slices.Equal(got, wantSet) {
		t.Errorf("database %v, want %v", got, wantSet)
	}
	// Clearing it restores the file's rule.
	if err := h.cli.ClearOverride(ctx, "firewall", "", "", "203.0.113.0/24"); err != nil {
		t.Fatal(err)
	}
	if got, want := rules(), map[string]string{"203.0.113.0/24": "file"}; !reflect.DeepEqual(got, want) {
		t.Errorf("rules after clear %v, want %v", got, want)
	}
}

// TestMaxConnectionsLive: SetListenerMaxConnections changes the cap of
// the running listener at once, and lowering it never cuts live
// connections.
func TestMaxConnectionsLive(t *testing.T) {
	h := newHarness(t, fileConfig{})
	ctx := h.ctx()
	if err := h.cli.SetMaxConnections(ctx, "public", 2); err != nil {
		t.Fatal(err)
	}
	if st := h.status("public"); st.MaxConnections != 2 || st.MaxConnectionsOrigin != "file, overridden" {
		t.Fatalf("public max_connections %d (%s), want 2 (file, overridden)", st.MaxConnections, st.MaxConnectionsOrigin)
	}

	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	hold := func() {
		t.Helper()
		c, line, err := h.holdConn("public", "app.test")
		if err != nil || line != "app" {
			t.Fatalf("connection under the cap: %q, %v", line, err)
		}
		held = append(held, c)
	}
	refused := func(n uint64) {
		t.Helper()
		c, line, err := h.holdConn("public", "app.test")
		if err == nil {
			c.Close()
			t.Fatalf("connection over the cap reached backend %q", line)
		}
		if isTimeout(err) {
			t.Fatalf("connection over the cap was left open, not closed: %v", err)
		}
		h.waitRejected("public", "max_connections", n)
	}

	hold()
	hold()
	refused(1)
	if st := h.status("public"); st.ActiveConnections != 2 {
		t.Errorf("active %d with two held, want 2", st.ActiveConnections)
	}

	// Close one: once the proxy has seen it go, the next is accepted.
	held[0].Close()
	held = held[1:]
	testnet.WaitFor(t, "public active == 1", func() bool { return h.status("public").ActiveConnections == 1 })
	hold()
	refused(2)

	// Lowering the cap below the live count cuts nothing.
	if err := h.cli.SetMaxConnections(ctx, "public", 1); err != nil {
		t.Fatal(err)
	}
	for _, c := range held {
		echo(t, c)
	}
	if st := h.status("public"); st.ActiveConnections != 2 || st.MaxConnections != 1 {
		t.Errorf("after lowering: active %d max %d, want 2 and 1", st.ActiveConnections, st.MaxConnections)
	}
	refused(3)

	// 0 is unlimited.
	if err := h.cli.SetMaxConnections(ctx, "public", 0); err != nil {
		t.Fatal(err)
	}
	hold()
	if got, want := pbOverrideSet(h.overrides()), []string{"listener public max=0 actor=" + myActor()}; !slices.Equal(got, want) {
		t.Errorf("overrides %v, want %v", got, want)
	}
}

func TestListOverridesActorAndOrphans(t *testing.T) {
	h := newHarness(t, fileConfig{})
	ctx := h.ctx()
	if _, err := h.cli.PutRoute(ctx, &adminpb.Route{Listener: "aux", Sni: "x.aux.test", Backend: h.backends["new"]}); err != nil {
		t.Fatal(err)
	}
	if err := h.cli.SetMaxConnections(ctx, "aux", 3); err != nil {
		t.Fatal(err)
	}
	if _, err := h.cli.PutRoute(ctx, &adminpb.Route{Listener: "public", Sni: "new.test", Backend: h.backends["new"]}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.cli.AddFirewallRule(ctx, "198.51.100.0/24"); err != nil {
		t.Fatal(err)
	}
	list := h.overrides()
	if len(list) != 4 {
		t.Fatalf("ListOverrides: %d entries, want 4: %v", len(list), list)
	}
	for _, o := range list {
		if o.Actor != myActor() {
			t.Errorf("%s override actor %q, want %q (the peer uid of the Unix socket)", o.Kind, o.Actor, myActor())
		}
		if o.UpdatedUnix == 0 || o.Orphaned {
			t.Errorf("%s override: updated %d orphaned %v", o.Kind, o.UpdatedUnix, o.Orphaned)
		}
	}
	if o := findOverride(list, "route", "aux", "x.aux.test", ""); o == nil || o.Action != "set" || o.Route.GetBackend() != h.backends["new"] {
		t.Errorf("route override %+v", o)
	}
	if o := findOverride(list, "listener", "aux", "", ""); o == nil || o.MaxConnections != 3 || o.Action != "set" {
		t.Errorf("listener override %+v", o)
	}
	if o := findOverride(list, "firewall", "", "", "198.51.100.0/24"); o == nil || o.Action != "add" {
		t.Errorf("firewall override %+v", o)
	}

	// The file loses the aux listener: its overrides are kept, not
	// applied, and reported.
	f := h.file
	f.NoAux = true
	h.writeConfig(f)
	if _, err := h.cli.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	list = h.overrides()
	if len(list) != 4 {
		t.Fatalf("ListOverrides after the edit: %d entries, want 4 (orphans are kept): %v", len(list), list)
	}
	for _, k := range [][2]string{{"route", "x.aux.test"}, {"listener", ""}} {
		o := findOverride(list, k[0], "aux", k[1], "")
		if o == nil || !o.Orphaned || !strings.Contains(o.OrphanReason, `listener "aux" is not in the config file`) {
			t.Errorf("%s override on the removed listener: %+v, want orphaned", k[0], o)
		}
	}
	if o := findOverride(list, "route", "public", "new.test", ""); o == nil || o.Orphaned {
		t.Errorf("route override on public: %+v, want not orphaned", o)
	}
	st, err := h.cli.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.OrphanedOverrides != 2 || len(st.Listeners) != 1 {
		t.Errorf("GetStatus: orphaned %d listeners %d, want 2 and 1", st.OrphanedOverrides, len(st.Listeners))
	}
	wantCode(t, func() error { _, err := h.cli.Routes(ctx, "aux"); return err }(), codes.NotFound)
	h.wantBackend("public", "new.test", "new")

	// Orphans can be cleared; the database follows.
	if err := h.cli.ClearOverride(ctx, "listener", "aux", "", ""); err != nil {
		t.Fatal(err)
	}
	if err := h.cli.ClearOverride(ctx, "route", "aux", "x.aux.test", ""); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"firewall 198.51.100.0/24 add actor=" + myActor(),
		"route public new.test set " + h.backends["new"] + " actor=" + myActor(),
	}
	if got := pbOverrideSet(h.overrides()); !slices.Equal(got, want) {
		t.Errorf("overrides %v, want %v", got, want)
	}
	if got := overrideSet(h.dbOverrides()); !slices.Equal(got, want) {
		t.Errorf("database %v, want %v", got, want)
	}
}

func TestClearOverrides(t *testing.T) {
	h := newHarness(t, fileConfig{})
	ctx := h.ctx()
	mutate := func() {
		t.Helper()
		for _, err := range []error{
			func() error {
				_, err := h.cli.PutRoute(ctx, &adminpb.Route{Listener: "public", Sni: "app.test", Backend: h.backends["alt"]})
				return err
			}(),
			h.cli.DeleteRoute(ctx, "aux", "aux.test"),
			func() error { _, err := h.cli.AddFirewallRule(ctx, "127.0.0.2/32"); return err }(),
			h.cli.SetMaxConnections(ctx, "aux", 1),
		} {
			if err != nil {
				t.Fatal(err)
			}
		}
		h.wantBackend("public", "app.test", "alt")
	}
	mutate()
	if n := len(h.overrides()); n != 4 {
		t.Fatalf("%d overrides, want 4", n)
	}

	// One at a time.
	if err := h.cli.ClearOverride(ctx, "route", "public", "App.Test", ""); err != nil {
		t.Fatal(err)
	}
	h.wantBackend("public", "app.test", "app")
	h.wantOrigin("public", "app.test", "file")
	if err := h.cli.ClearOverride(ctx, "route", "aux", "aux.test", ""); err != nil {
		t.Fatal(err)
	}
	h.wantOrigin("aux", "aux.test", "file")
	if err := h.cli.ClearOverride(ctx, "listener", "aux", "", ""); err != nil {
		t.Fatal(err)
	}
	if st := h.status("aux"); st.MaxConnections != 7 || st.MaxConnectionsOrigin != "file" {
		t.Errorf("aux max_connections %d (%s) after clearing, want the file's 7", st.MaxConnections, st.MaxConnectionsOrigin)
	}
	if err := h.cli.ClearOverride(ctx, "firewall", "", "", "127.0.0.2"); err != nil {
		t.Fatal(err)
	}
	if got := h.overrides(); len(got) != 0 {
		t.Errorf("overrides left: %v", got)
	}
	if got := overrideSet(h.dbOverrides()); len(got) != 0 {
		t.Errorf("database left: %v", got)
	}

	// All at once.
	mutate()
	n, err := h.cli.ClearAllOverrides(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n != 4 {
		t.Errorf("ClearAllOverrides cleared %d, want 4", n)
	}
	if got := h.overrides(); len(got) != 0 {
		t.Errorf("overrides left: %v", got)
	}
	if got := overrideSet(h.dbOverrides()); len(got) != 0 {
		t.Errorf("database left: %v", got)
	}
	h.wantBackend("public", "app.test", "app")
	h.wantBackend("aux", "aux.test", "aux")
	if n, err := h.cli.ClearAllOverrides(ctx); err != nil || n != 0 {
		t.Errorf("ClearAllOverrides on nothing: %d, %v", n, err)
	}
}

func TestReload(t *testing.T) {
	h := newHarness(t, fileConfig{})
	ctx := h.ctx()
	before, err := h.cli.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}

	// A good edit: app.test moves to app2.
	f := h.file
	f.App = "app2"
	h.writeConfig(f)
	resp, err := h.cli.Reload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if resp.Status.GetResult() != "success" || resp.Status.GetTrigger() != "admin" || resp.ConfigHash == before.ConfigHash || len(resp.ConfigHash) != 64 {
		t.Errorf("Reload: %+v, want success from admin with a new hash", resp)
	}
	h.wantBackend("public", "app.test", "app2")

	// A broken file: the error names file and line, the old config serves.
	text := h.configText(f)
	broken := strings.Replace(text, `name = "public"`, "name = \"public\"\nmax_connections = -1", 1)
	line := 1 + strings.Count(broken[:strings.Index(broken, "max_connections = -1")], "\n")
	h.writeRaw(broken)
	_, err = h.cli.Reload(ctx)
	wantCode(t, err, codes.FailedPrecondition)
	where := fmt.Sprintf("%s:%d", h.path, line)
	if msg := err.Error(); !strings.Contains(msg, where) || !strings.Contains(msg, "max_connections") {
		t.Errorf("Reload error %q, want it to name %s and the key", msg, where)
	}
	h.wantBackend("public", "app.test", "app2")
	st, err := h.cli.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.LastReload.GetResult() != "failure" || !strings.Contains(st.LastReload.GetError(), where) || st.ConfigHash != resp.ConfigHash {
		t.Errorf("GetStatus after a failed reload: %+v hash %s, want failure at %s and the old hash", st.LastReload, st.ConfigHash, where)
	}

	// Undecodable TOML is refused the same way.
	h.writeRaw(text + "\n[[listener]\n")
	_, err = h.cli.Reload(ctx)
	wantCode(t, err, codes.FailedPrecondition)
	if !regexp.MustCompile(regexp.QuoteMeta(h.path) + `:\d+`).MatchString(err.Error()) {
		t.Errorf("Reload error %q, want file:line", err)
	}
	h.wantBackend("public", "app.test", "app2")

	// Fixed again.
	h.writeRaw(text)
	if _, err := h.cli.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	h.wantBackend("public", "app.test", "app2")
}

func TestSnapshot(t *testing.T) {
	h := newHarness(t, fileConfig{})
	ctx := h.ctx()
	if _, err := h.cli.PutRoute(ctx, &adminpb.Route{Listener: "public", Sni: "new.test", Backend: h.backends["new"]}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.cli.AddFirewallRule(ctx, "198.51.100.7"); err != nil {
		t.Fatal(err)
	}
	if err := h.cli.SetMaxConnections(ctx, "aux", 2); err != nil {
		t.Fatal(err)
	}
	if err := h.cli.DeleteRoute(ctx, "public", "app.test"); err != nil {
		t.Fatal(err)
	}

	out := filepath.Join(t.TempDir(), "snap.db")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	n, err := h.cli.Snapshot(ctx, f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(out); err != nil || fi.Size() != n || n == 0 {
		t.Fatalf("snapshot file: %v, %v; Snapshot reported %d bytes", fi, err, n)
	}
	// No staging file is left next to the database.
	if m, _ := filepath.Glob(filepath.Join(h.dir, ".portcullis-backup-*")); len(m) != 0 {
		t.Errorf("backup staging files left: %v", m)
	}

	// Plain SQL on the copy.
	db, err := sql.Open("sqlite3", "file:"+out+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	counts := map[string]int{}
	for _, table := range []string{"route_override", "firewall_override", "listener_override"} {
		var c int
		if err := db.QueryRowContext(ctx, "SELECT count(*) FROM "+table).Scan(&c); err != nil {
			t.Fatal(err)
		}
		counts[table] = c
	}
	if want := map[string]int{"route_override": 2, "firewall_override": 1, "listener_override": 1}; !reflect.DeepEqual(counts, want) {
		t.Errorf("snapshot rows %v, want %v", counts, want)
	}
	var deleted int
	if err := db.QueryRowContext(ctx, `SELECT deleted FROM route_override WHERE listener = 'public' AND sni = 'app.test'`).Scan(&deleted); err != nil || deleted != 1 {
		t.Errorf("tombstone in snapshot: deleted=%d, %v", deleted, err)
	}
	db.Close()

	// And as a store: the same overrides the daemon serves.
	st, err := state.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	o, err := st.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := overrideSet(o), pbOverrideSet(h.overrides()); !slices.Equal(got, want) {
		t.Errorf("snapshot %v, daemon %v", got, want)
	}
	if got, want := o, h.mgr.Overrides(); !reflect.DeepEqual(sortedOverrides(got), sortedOverrides(want)) {
		t.Errorf("snapshot overrides %+v\nmanager overrides %+v", got, want)
	}
}

func TestHealthAndReflection(t *testing.T) {
	h := newHarness(t, fileConfig{})
	ctx := h.ctx()
	hs, err := h.cli.Health(ctx)
	if err != nil || hs != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("Health: %v, %v; want SERVING", hs, err)
	}

	conn, err := grpc.NewClient("unix:"+h.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(sctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.Name)
	}
	for _, want := range []string{"portcullis.admin.v1.Admin", "grpc.health.v1.Health"} {
		if !slices.Contains(names, want) {
			t.Errorf("reflection lists %v, want %s among them", names, want)
		}
	}
	// The descriptor is served too, so grpcurl can call without the .proto.
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "portcullis.admin.v1.Admin"}}); err != nil {
		t.Fatal(err)
	}
	if resp, err = stream.Recv(); err != nil {
		t.Fatal(err)
	}
	if fds := resp.GetFileDescriptorResponse().GetFileDescriptorProto(); len(fds) == 0 {
		t.Errorf("no file descriptor for portcullis.admin.v1.Admin: %v", resp)
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != io.EOF {
		t.Errorf("reflection stream end: %v", err)
	}
}

// TestErrorCodes: every rejected call gets the documented code (with
// the field for InvalidArgument) and changes nothing, in memory or on
// disk.
func TestErrorCodes(t *testing.T) {
	h := newHarness(t, fileConfig{})
	ctx := h.ctx()
	// Something to compare against, including an override of each kind.
	if _, err := h.cli.PutRoute(ctx, &adminpb.Route{Listener: "public", Sni: "new.test", Backend: h.backends["new"]}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.cli.AddFirewallRule(ctx, "198.51.100.1"); err != nil {
		t.Fatal(err)
	}
	if err := h.cli.SetMaxConnections(ctx, "aux", 4); err != nil {
		t.Fatal(err)
	}
	route := func(r *adminpb.Route) error { _, err := h.cli.PutRoute(ctx, r); return err }
	be := h.backends["new"]

	for _, tc := range []struct {
		name  string
		call  func() error
		code  codes.Code
		field string // BadRequest field; "" = none expected; suffix match when it starts with "*"
	}{
		{"put route unknown listener", func() error { return route(&adminpb.Route{Listener: "nope", Sni: "x.test", Backend: be}) }, codes.NotFound, ""},
		{"set max unknown listener", func() error { return h.cli.SetMaxConnections(ctx, "nope", 1) }, codes.NotFound, ""},
		{"list routes unknown listener", func() error { _, err := h.cli.Routes(ctx, "nope"); return err }, codes.NotFound, ""},
		{"delete missing route", func() error { return h.cli.DeleteRoute(ctx, "public", "missing.test") }, codes.NotFound, ""},
		{"delete route unknown listener", func() error { return h.cli.DeleteRoute(ctx, "nope", "app.test") }, codes.NotFound, ""},
		{"remove absent firewall rule", func() error { return h.cli.RemoveFirewallRule(ctx, "192.0.2.1") }, codes.NotFound, ""},
		{"clear absent route override", func() error { return h.cli.ClearOverride(ctx, "route", "public", "app.test", "") }, codes.NotFound, ""},
		{"clear absent firewall override", func() error { return h.cli.ClearOverride(ctx, "firewall", "", "", "203.0.113.0/24") }, codes.NotFound, ""},
		{"clear absent listener override", func() error { return h.cli.ClearOverride(ctx, "listener", "public", "", "") }, codes.NotFound, ""},

		{"bad backend", func() error { return route(&adminpb.Route{Listener: "public", Sni: "x.test", Backend: "nohost"}) }, codes.InvalidArgument, "route.backend"},
		// SplitHostPort takes any bytes as the host; none of these can be
		// dialled, and a stored host of megabytes would push every later
		// ListRoutes reply past gRPC's 4 MiB limit.
		{"backend host with a space", func() error {
			return route(&adminpb.Route{Listener: "public", Sni: "x.test", Backend: " 127.0.0.1:80"})
		}, codes.InvalidArgument, "route.backend"},
		{"backend host with NUL", func() error {
			return route(&adminpb.Route{Listener: "public", Sni: "x.test", Backend: "127.0.0.1\x00:80"})
		}, codes.InvalidArgument, "route.backend"},
		{"backend host with newline", func() error { return route(&adminpb.Route{Listener: "public", Sni: "x.test", Backend: "a\nb:80"}) }, codes.InvalidArgument, "route.backend"},
		{"backend host of 3 MiB", func() error {
			return route(&adminpb.Route{Listener: "public", Sni: "x.test", Backend: strings.Repeat("a", 3<<20) + ":80"})
		}, codes.InvalidArgument, "route.backend"},
		{"bad sni", func() error { return route(&adminpb.Route{Listener: "public", Sni: "a.*.b", Backend: be}) }, codes.InvalidArgument, "route.sni"},
		{"empty sni", func() error { return route(&adminpb.Route{Listener: "public", Backend: be}) }, codes.InvalidArgument, "route.sni"},
		{"bad mode", func() error { return route(&adminpb.Route{Listener: "public", Sni: "x.test", Backend: be, Mode: "l5"}) }, codes.InvalidArgument, "route.mode"},
		{"l4 with tls_cert", func() error {
			return route(&adminpb.Route{Listener: "public", Sni: "x.test", Backend: be, TlsCert: "a.pem"})
		}, codes.InvalidArgument, "route.tls_cert"},
		{"bad response_timeout", func() error {
			return route(&adminpb.Route{Listener: "public", Sni: "x.test", Backend: be, Mode: "l7", TlsCert: "a", TlsKey: "b", ResponseTimeout: "soon"})
		}, codes.InvalidArgument, "route.response_timeout"},
		// The file refuses a zero duration (it would read as the key
		// left out); so does the API, rather than serve the default.
		{"zero response_timeout", func() error {
			return route(&adminpb.Route{Listener: "public", Sni: "x.test", Backend: be, Mode: "l7", TlsCert: "a", TlsKey: "b", ResponseTimeout: "0s"})
		}, codes.InvalidArgument, "route.response_timeout"},
		{"zero response_timeout on l4", func() error {
			return route(&adminpb.Route{Listener: "public", Sni: "x.test", Backend: be, ResponseTimeout: "0s"})
		}, codes.InvalidArgument, "route.response_timeout"},
		{"no route", func() error { return route(nil) }, codes.InvalidArgument, "route"},
		{"no listener", func() error { return route(&adminpb.Route{Sni: "x.test", Backend: be}) }, codes.InvalidArgument, "listener"},
		{"bad cidr", func() error { _, err := h.cli.AddFirewallRule(ctx, "10.0.0.0/33"); return err }, codes.InvalidArgument, "value"},
		{"cidr with host bits", func() error { _, err := h.cli.AddFirewallRule(ctx, "10.0.0.1/8"); return err }, codes.InvalidArgument, "value"},
		// The file refuses a zoned entry; parsing alone would drop the
		// zone and block the address on every interface.
		{"zoned address", func() error { _, err := h.cli.AddFirewallRule(ctx, "fe80::1%eth0"); return err }, codes.InvalidArgument, "value"},
		{"zoned cidr", func() error { _, err := h.cli.AddFirewallRule(ctx, "fe80::1%eth0/128"); return err }, codes.InvalidArgument, "value"},
		{"remove bad cidr", func() error { return h.cli.RemoveFirewallRule(ctx, "nonsense") }, codes.InvalidArgument, "value"},
		{"negative max_connections", func() error { return h.cli.SetMaxConnections(ctx, "public", -1) }, codes.InvalidArgument, "max_connections"},
		{"huge max_connections", func() error { return h.cli.SetMaxConnections(ctx, "public", 1<<40) }, codes.InvalidArgument, "max_connections"},
		{"unknown kind", func() error { return h.cli.ClearOverride(ctx, "everything", "public", "", "") }, codes.InvalidArgument, "kind"},
		{"clear firewall bad value", func() error { return h.cli.ClearOverride(ctx, "firewall", "", "", "x") }, codes.InvalidArgument, "value"},
		// A missing key is a bad value, not a key that names nothing.
		{"delete route no sni", func() error { return h.cli.DeleteRoute(ctx, "public", "") }, codes.InvalidArgument, "sni"},
		{"clear route override no listener", func() error { return h.cli.ClearOverride(ctx, "route", "", "new.test", "") }, codes.InvalidArgument, "listener"},
		{"clear route override no sni", func() error { return h.cli.ClearOverride(ctx, "route", "public", "", "") }, codes.InvalidArgument, "sni"},
		{"clear listener override no listener", func() error { return h.cli.ClearOverride(ctx, "listener", "", "", "") }, codes.InvalidArgument, "listener"},

		// Valid on its own, but the effective config cannot compile it:
		// the certificate file does not exist.
		{"l7 route without its certificate", func() error {
			return route(&adminpb.Route{Listener: "public", Sni: "l7.test", Backend: be, Mode: "l7",
				TlsCert: filepath.Join(h.dir, "missing.pem"), TlsKey: filepath.Join(h.dir, "missing-key.pem")})
		}, codes.FailedPrecondition, "*.tls_cert"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			memBefore, dbBefore := pbOverrideSet(h.overrides()), overrideSet(h.dbOverrides())
			mgrBefore := sortedOverrides(h.mgr.Overrides())
			routesBefore := h.routes()

			err := tc.call()
			wantCode(t, err, tc.code)
			fields := badRequestFields(err)
			switch {
			case tc.field == "" && len(fields) != 0:
				t.Errorf("unexpected BadRequest fields %v", fields)
			case strings.HasPrefix(tc.field, "*"):
				if len(fields) != 1 || !strings.HasSuffix(fields[0], tc.field[1:]) {
					t.Errorf("BadRequest fields %v, want one ending in %q", fields, tc.field[1:])
				}
			case tc.field != "":
				if !slices.Equal(fields, []string{tc.field}) {
					t.Errorf("BadRequest fields %v, want [%s]", fields, tc.field)
				}
				if !strings.Contains(err.Error(), tc.field) {
					t.Errorf("message %q does not name the field %q", err, tc.field)
				}
			}

			if got := pbOverrideSet(h.overrides()); !slices.Equal(got, memBefore) {
				t.Errorf("ListOverrides changed: %v, was %v", got, memBefore)
			}
			if got := overrideSet(h.dbOverrides()); !slices.Equal(got, dbBefore) {
				t.Errorf("database changed: %v, was %v", got, dbBefore)
			}
			if got := sortedOverrides(h.mgr.Overrides()); !reflect.DeepEqual(got, mgrBefore) {
				t.Errorf("manager overrides changed: %+v, was %+v", got, mgrBefore)
			}
			if got := h.routes(); !routesEqual(got, routesBefore) {
				t.Errorf("ListRoutes changed")
			}
		})
	}
	h.wantBackend("public", "new.test", "new")
	h.wantRefused("public", "l7.test")
}

// TestOverrideWinsAcrossRestartAndEdit: an override beats the file,
// survives a restart and a file edit, and clearing it brings the file's
// value back.
func TestOverrideWinsAcrossRestartAndEdit(t *testing.T) {
	h := newHarness(t, fileConfig{})
	ctx := h.ctx()
	h.wantBackend("public", "app.test", "app")
	if _, err := h.cli.PutRoute(ctx, &adminpb.Route{Listener: "public", Sni: "app.test", Backend: h.backends["alt"]}); err != nil {
		t.Fatal(err)
	}
	if err := h.cli.SetMaxConnections(ctx, "aux", 3); err != nil {
		t.Fatal(err)
	}
	if err := h.cli.DeleteRoute(ctx, "public", "*.api.test"); err != nil {
		t.Fatal(err)
	}
	check := func(stage string) {
		t.Helper()
		h.wantBackend("public", "app.test", "alt")
		h.wantOrigin("public", "app.test", "file, overridden")
		h.wantRefused("public", "v1.api.test")
		h.wantOrigin("public", "*.api.test", "")
		if st := h.status("aux"); st.MaxConnections != 3 || st.MaxConnectionsOrigin != "file, overridden" {
			t.Errorf("%s: aux max_connections %d (%s), want 3 (file, overridden)", stage, st.MaxConnections, st.MaxConnectionsOrigin)
		}
	}
	check("after the mutations")

	h.restart()
	check("after a restart")
	if got := h.overrides(); len(got) != 3 {
		t.Errorf("after a restart: %d overrides, want 3: %v", len(got), got)
	}

	// The file moves app.test to app2 and changes aux's cap: the
	// overrides still win.
	f := h.file
	f.App, f.MaxAux = "app2", 9
	h.writeConfig(f)
	if _, err := h.cli.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	check("after a file edit")

	// Clearing restores the (new) file values.
	if err := h.cli.ClearOverride(ctx, "route", "public", "app.test", ""); err != nil {
		t.Fatal(err)
	}
	h.wantBackend("public", "app.test", "app2")
	h.wantOrigin("public", "app.test", "file")
	if err := h.cli.ClearOverride(ctx, "route", "public", "*.api.test", ""); err != nil {
		t.Fatal(err)
	}
	h.wantBackend("public", "v1.api.test", "api")
	if err := h.cli.ClearOverride(ctx, "listener", "aux", "", ""); err != nil {
		t.Fatal(err)
	}
	if st := h.status("aux"); st.MaxConnections != 9 || st.MaxConnectionsOrigin != "file" {
		t.Errorf("aux max_connections %d (%s), want the file's 9", st.MaxConnections, st.MaxConnectionsOrigin)
	}

	// And that too survives a restart.
	h.restart()
	h.wantBackend("public", "app.test", "app2")
	if got := h.overrides(); len(got) != 0 {
		t.Errorf("after clearing and restarting: %v", got)
	}
}

// TestConcurrentMutations: mutations racing from many clients end with
// the database and memory holding exactly the same overrides.
func TestConcurrentMutations(t *testing.T) {
	h := newHarness(t, fileConfig{})
	const n = 50
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			ctx := h.ctx()
			var err error
			switch i % 3 {
			case 0:
				_, err = h.cli.PutRoute(ctx, &adminpb.Route{Listener: "public", Sni: fmt.Sprintf("c%d.test", i), Backend: h.backends["new"]})
			case 1:
				_, err = h.cli.AddFirewallRule(ctx, fmt.Sprintf("198.51.100.%d/32", i))
			case 2:
				l := []string{"public", "aux"}[i%2]
				err = h.cli.SetMaxConnections(ctx, l, int64(100+i))
			}
			if err != nil {
				errs <- fmt.Errorf("mutation %d: %w", i, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	db := h.dbOverrides()
	mem := h.mgr.Overrides()
	if got, want := sortedOverrides(mem), sortedOverrides(db); !reflect.DeepEqual(got, want) {
		t.Errorf("memory and database differ:\nmemory   %+v\ndatabase %+v", got, want)
	}
	if got, want := pbOverrideSet(h.overrides()), overrideSet(db); !slices.Equal(got, want) {
		t.Errorf("ListOverrides and database differ:\napi %v\ndb  %v", got, want)
	}
	if len(db.Routes) != 17 || len(db.Firewall) != 17 || len(db.Listeners) != 2 {
		t.Errorf("database holds %d routes, %d firewall, %d listener overrides; want 17, 17, 2", len(db.Routes), len(db.Firewall), len(db.Listeners))
	}
	// What is published matches too.
	rules, err := h.cli.FirewallRules(h.ctx())
	if err != nil {
		t.Fatal(err)
	}
	if len(rules.Rules) != 18 {
		t.Errorf("%d effective firewall rules, want 18", len(rules.Rules))
	}
	for _, l := range db.Listeners {
		if st := h.status(l.Listener); st.MaxConnections != int64(l.MaxConnections) {
			t.Errorf("listener %s serves max_connections %d, database says %d", l.Listener, st.MaxConnections, l.MaxConnections)
		}
	}
	h.wantBackend("public", "c0.test", "new")
	h.wantBackend("public", "c48.test", "new")

	// And a restart loads the same set.
	want := pbOverrideSet(h.overrides())
	h.restart()
	if got := pbOverrideSet(h.overrides()); !slices.Equal(got, want) {
		t.Errorf("after restart %v, want %v", got, want)
	}
}

// TestStoreFailureChangesNothing: when the database write fails the
// caller gets Internal and neither memory nor the proxy changes.
func TestStoreFailureChangesNothing(t *testing.T) {
	h := newHarness(t, fileConfig{})
	ctx := h.ctx()
	if _, err := h.cli.PutRoute(ctx, &adminpb.Route{Listener: "public", Sni: "new.test", Backend: h.backends["new"]}); err != nil {
		t.Fatal(err)
	}
	routesBefore, ovBefore, dbBefore := h.routes(), pbOverrideSet(h.overrides()), overrideSet(h.dbOverrides())
	statusBefore := h.status("public")

	// The daemon's handle goes away under it.
	if err := h.store.Close(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		call func() error
	}{
		{"put new route", func() error {
			_, err := h.cli.PutRoute(ctx, &adminpb.Route{Listener: "public", Sni: "other.test", Backend: h.backends["alt"]})
			return err
		}},
		{"replace file route", func() error {
			_, err := h.cli.PutRoute(ctx, &adminpb.Route{Listener: "public", Sni: "app.test", Backend: h.backends["alt"]})
			return err
		}},
		{"delete file route", func() error { return h.cli.DeleteRoute(ctx, "public", "app.test") }},
		{"delete override route", func() error { return h.cli.DeleteRoute(ctx, "public", "new.test") }},
		{"add firewall rule", func() error { _, err := h.cli.AddFirewallRule(ctx, "127.0.0.1"); return err }},
		{"remove firewall rule", func() error { return h.cli.RemoveFirewallRule(ctx, "203.0.113.0/24") }},
		{"set max connections", func() error { return h.cli.SetMaxConnections(ctx, "public", 1) }},
		{"clear override", func() error { return h.cli.ClearOverride(ctx, "route", "public", "new.test", "") }},
		{"clear all", func() error { _, err := h.cli.ClearAllOverrides(ctx); return err }},
		{"snapshot", func() error { _, err := h.cli.Snapshot(ctx, io.Discard); return err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			wantCode(t, err, codes.Internal)
			if got := h.routes(); !routesEqual(got, routesBefore) {
				t.Errorf("ListRoutes changed")
			}
			if got := pbOverrideSet(h.overrides()); !slices.Equal(got, ovBefore) {
				t.Errorf("ListOverrides changed: %v, was %v", got, ovBefore)
			}
			if got := overrideSet(h.dbOverrides()); !slices.Equal(got, dbBefore) {
				t.Errorf("database changed: %v, was %v", got, dbBefore)
			}
		})
	}
	if st := h.status("public"); st.MaxConnections != statusBefore.MaxConnections {
		t.Errorf("max_connections %d, was %d", st.MaxConnections, statusBefore.MaxConnections)
	}
	// The proxy serves what it served.
	h.wantBackend("public", "app.test", "app")
	h.wantBackend("public", "new.test", "new")
	h.wantRefused("public", "other.test")
	// Reads that need no database still work.
	if _, err := h.cli.Status(ctx); err != nil {
		t.Errorf("GetStatus: %v", err)
	}
}

// sortedOverrides orders o as the store's Load does, so a manager's
// in-memory copy compares with a loaded one.
func sortedOverrides(o *state.Overrides) *state.Overrides {
	o = o.Clone()
	slices.SortFunc(o.Routes, func(a, b state.RouteOverride) int {
		return strings.Compare(a.Listener+"\x00"+a.SNI, b.Listener+"\x00"+b.SNI)
	})
	slices.SortFunc(o.Firewall, func(a, b state.FirewallOverride) int { return strings.Compare(a.Value, b.Value) })
	slices.SortFunc(o.Listeners, func(a, b state.ListenerOverride) int { return strings.Compare(a.Listener, b.Listener) })
	// A nil and an empty slice mean the same here.
	if len(o.Routes) == 0 {
		o.Routes = nil
	}
	if len(o.Firewall) == 0 {
		o.Firewall = nil
	}
	if len(o.Listeners) == 0 {
		o.Listeners = nil
	}
	return o
}

func routesEqual(a, b map[string]*adminpb.Route) bool {
	if len(a) != len(b) {
		return false
	}
	for k, r := range a {
		o, ok := b[k]
		if !ok || !proto.Equal(r, o) {
			return false
		}
	}
	return true
}

// TestListOverridesOrder: overrides are listed by kind, then listener,
// SNI and value — "pub" before "public" whatever their SNIs.
func TestListOverridesOrder(t *testing.T) {
	h := newHarness(t, fileConfig{Trailer: `
[[listener]]
name = "pub"
listen = "127.0.0.3:0"
`})
	ctx := h.ctx()
	for _, r := range []*adminpb.Route{
		{Listener: "public", Sni: "a.test", Backend: h.backends["new"]},
		{Listener: "pub", Sni: "z.test", Backend: h.backends["new"]},
		{Listener: "pub", Sni: "b.test", Backend: h.backends["new"]},
		{Listener: "aux", Sni: "zz.test", Backend: h.backends["new"]},
	} {
		if _, err := h.cli.PutRoute(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	for _, v := range []string{"198.51.100.20", "198.51.100.3"} {
		if _, err := h.cli.AddFirewallRule(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	for _, l := range []string{"public", "pub"} {
		if err := h.cli.SetMaxConnections(ctx, l, 1); err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	for _, o := range h.overrides() {
		got = append(got, strings.Join([]string{o.Kind, o.Listener, o.Sni, o.Value}, " "))
	}
	want := []string{
		"firewall   198.51.100.20/32",
		"firewall   198.51.100.3/32",
		"listener pub  ",
		"listener public  ",
		"route aux zz.test ",
		"route pub b.test ",
		"route pub z.test ",
		"route public a.test ",
	}
	if !slices.Equal(got, want) {
		t.Errorf("ListOverrides order:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestSnapshotLarge: a database bigger than one message arrives in
// several chunks, none over the limit, and reassembles into the same
// overrides.
func TestSnapshotLarge(t *testing.T) {
	h := newHarness(t, fileConfig{})
	const n = 4000
	h.fillRoutes(n)
	h.wantBackend("public", "r3999.bulk.test", "new")

	conn, err := grpc.NewClient("unix:"+h.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := adminpb.NewAdminClient(conn).Snapshot(h.ctx(), &adminpb.SnapshotRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var buf []byte
	chunks := 0
	for {
		c, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(c.Data) == 0 || len(c.Data) > 256<<10 {
			t.Errorf("chunk %d: %d bytes, want 1..256 KiB", chunks, len(c.Data))
		}
		buf = append(buf, c.Data...)
		chunks++
	}
	if chunks < 2 {
		t.Errorf("%d bytes in %d chunk(s), want several", len(buf), chunks)
	}
	out := filepath.Join(t.TempDir(), "snap.db")
	if err := os.WriteFile(out, buf, 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := state.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	o, err := st.Load(h.ctx())
	if err != nil {
		t.Fatal(err)
	}
	if len(o.Routes) != n || !reflect.DeepEqual(sortedOverrides(o), sortedOverrides(h.mgr.Overrides())) {
		t.Errorf("snapshot holds %d routes; differs from the daemon's %d", len(o.Routes), len(h.mgr.Overrides().Routes))
	}
}

// TestConcurrentDeletes: racing deletes of one override-only route or
// firewall rule succeed once; the others are told NotFound — not
// Internal, as they were when a delete that had checked the origin
// before another one dropped the override reached the database and
// found no row.
func TestConcurrentDeletes(t *testing.T) {
	h := newHarness(t, fileConfig{})
	for round := range 5 {
		sni, cidr := fmt.Sprintf("gone%d.test", round), fmt.Sprintf("198.51.100.%d/32", 100+round)
		if _, err := h.cli.PutRoute(h.ctx(), &adminpb.Route{Listener: "public", Sni: sni, Backend: h.backends["new"]}); err != nil {
			t.Fatal(err)
		}
		if _, err := h.cli.AddFirewallRule(h.ctx(), cidr); err != nil {
			t.Fatal(err)
		}
		for _, del := range []func() error{
			func() error { return h.cli.DeleteRoute(h.ctx(), "public", sni) },
			func() error { return h.cli.RemoveFirewallRule(h.ctx(), cidr) },
		} {
			const n = 16
			errs := make([]error, n)
			var wg sync.WaitGroup
			for i := range n {
				wg.Go(func() { errs[i] = del() })
			}
			wg.Wait()
			ok := 0
			for _, err := range errs {
				switch status.Code(err) {
				case codes.OK:
					ok++
				case codes.NotFound:
				default:
					t.Errorf("round %d: concurrent delete: %v, want OK or NotFound", round, err)
				}
			}
			if ok != 1 {
				t.Errorf("round %d: %d deletes succeeded, want 1", round, ok)
			}
		}
		if got := overrideSet(h.dbOverrides()); len(got) != 0 {
			t.Errorf("database %v", got)
		}
	}
	h.wantRefused("public", "gone0.test")
}

// failingWriter is a full disk: every write fails.
type failingWriter struct{ err error }

func (w failingWriter) Write([]byte) (int, error) { return 0, w.err }

// TestSnapshotWriteErrorEndsTheCall: when the caller's writer fails (a
// full disk), Client.Snapshot returns that error and the call ends on
// both sides, though the caller's context lives on (a backup job that
// keeps its client and retries). Left open, the stream kept a goroutine
// in the client and the daemon's call blocked in flow control, its
// full-size staging copy of the database on the daemon's disk, until the
// client closed its connection.
func TestSnapshotWriteErrorEndsTheCall(t *testing.T) {
	h := newHarness(t, fileConfig{})
	h.fillRoutes(4000) // several chunks, more than a flow-control window
	h.status("public") // the client's connection is up before the baseline
	before := goleak.IgnoreCurrent()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	full := errors.New("no space left on device")
	if _, err := h.cli.Snapshot(ctx, failingWriter{full}); !errors.Is(err, full) {
		t.Fatalf("Snapshot into a failing writer: %v, want %v", err, full)
	}
	goleak.VerifyNone(t, before)
	if m, _ := filepath.Glob(filepath.Join(h.dir, ".portcullis-backup-*")); len(m) != 0 {
		t.Errorf("backup staging files left: %v", m)
	}
}

// TestPutRouteFileTooLarge: an L7 route's certificate, key and CA paths
// come from the caller, and the daemon read whatever they named to the
// end: a huge file was read into memory whole, and a device that never
// ends (/dev/zero) ran the daemon out of memory, cutting every live
// connection. Each is now refused as the route's bad value: the huge file
// for its size, the device for not being a regular file.
func TestPutRouteFileTooLarge(t *testing.T) {
	h := newHarness(t, fileConfig{})
	leaf := testpki.NewCA(t).Leaf(t, "l7.test")
	huge := filepath.Join(h.dir, "huge.pem")
	if err := os.WriteFile(huge, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(huge, 64<<20); err != nil { // sparse: no disk used
		t.Fatal(err)
	}
	be := h.backends["new"]
	// The huge file comes first: before the bound, /dev/zero would take
	// the test process down with it.
	for _, tc := range []struct {
		name, field, want string
		route             *adminpb.Route
	}{
		{"tls_cert huge", "tls_cert", "larger than", &adminpb.Route{TlsCert: huge, TlsKey: leaf.KeyFile}},
		{"tls_cert endless", "tls_cert", "/dev/zero: not a regular file", &adminpb.Route{TlsCert: "/dev/zero", TlsKey: leaf.KeyFile}},
		{"tls_key endless", "tls_key", "/dev/zero: not a regular file", &adminpb.Route{TlsCert: leaf.CertFile, TlsKey: "/dev/zero"}},
		{"backend_ca endless", "backend_ca", "/dev/zero: not a regular file", &adminpb.Route{TlsCert: leaf.CertFile, TlsKey: leaf.KeyFile, BackendProtocol: "h2", BackendCa: "/dev/zero"}},
	} {
		r := tc.route
		r.Listener, r.Sni, r.Backend, r.Mode = "public", "l7.test", be, "l7"
		_, err := h.cli.PutRoute(h.ctx(), r)
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), tc.want) {
			t.Fatalf("%s: PutRoute = %v, want FailedPrecondition saying %q", tc.name, err, tc.want)
		}
		if fields := badRequestFields(err); len(fields) != 1 || !strings.HasSuffix(fields[0], "."+tc.field) {
			t.Errorf("%s: BadRequest fields %v, want one ending in .%s", tc.name, fields, tc.field)
		}
	}
	if _, err := h.cli.PutRoute(h.ctx(), &adminpb.Route{Listener: "public", Sni: "l7.test", Backend: be, Mode: "l7", TlsCert: leaf.CertFile, TlsKey: leaf.KeyFile}); err != nil {
		t.Fatal(err)
	}
}

// TestPutRouteSpecialFileRefusedAtOnce: a PutRoute whose certificate,
// key or CA path named a FIFO without a writer blocked in the open for
// ever, inside Manager.Mutate and so under the manager's lock: every
// later admin call (GetStatus and ListRoutes too), SIGHUP and file
// reload hung until a restart. Such a path is now the route's bad value,
// refused at once, with memory and database unchanged.
func TestPutRouteSpecialFileRefusedAtOnce(t *testing.T) {
	h := newHarness(t, fileConfig{})
	leaf := testpki.NewCA(t).Leaf(t, "l7.test")
	fifo := filepath.Join(h.dir, "fifo.pem")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	// Registered after the harness's, so it runs first: a call still
	// blocked in the open gets a writer (and then EOF) and ends, and the
	// harness can stop.
	t.Cleanup(func() {
		if w, err := os.OpenFile(fifo, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
			w.Close()
		}
	})
	before := h.overrides()
	be := h.backends["new"]
	for _, tc := range []struct {
		name, field, path string
		route             *adminpb.Route
	}{
		{"tls_cert FIFO", "tls_cert", fifo, &adminpb.Route{TlsCert: fifo, TlsKey: leaf.KeyFile}},
		{"tls_key FIFO", "tls_key", fifo, &adminpb.Route{TlsCert: leaf.CertFile, TlsKey: fifo}},
		{"backend_ca FIFO", "backend_ca", fifo, &adminpb.Route{TlsCert: leaf.CertFile, TlsKey: leaf.KeyFile, BackendProtocol: "h2", BackendCa: fifo}},
		{"tls_cert directory", "tls_cert", h.dir, &adminpb.Route{TlsCert: h.dir, TlsKey: leaf.KeyFile}},
	} {
		r := tc.route
		r.Listener, r.Sni, r.Backend, r.Mode = "public", "l7.test", be, "l7"
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := h.cli.PutRoute(ctx, r)
		cancel()
		if status.Code(err) == codes.DeadlineExceeded {
			t.Fatalf("%s: PutRoute still blocked after 10s (and holds the manager's lock): %v", tc.name, err)
		}
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), tc.path+": not a regular file") {
			t.Fatalf("%s: PutRoute = %v, want FailedPrecondition naming the path as not a regular file", tc.name, err)
		}
		if fields := badRequestFields(err); len(fields) != 1 || !strings.HasSuffix(fields[0], "."+tc.field) {
			t.Errorf("%s: BadRequest fields %v, want one ending in .%s", tc.name, fields, tc.field)
		}
		// The manager's lock is free: read-only calls answer.
		ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
		if _, err := h.cli.Status(ctx); err != nil {
			t.Fatalf("%s: GetStatus after the refused PutRoute: %v", tc.name, err)
		}
		if _, err := h.cli.Routes(ctx, "public"); err != nil {
			t.Fatalf("%s: ListRoutes after the refused PutRoute: %v", tc.name, err)
		}
		cancel()
	}
	if got, want := pbOverrideSet(h.overrides()), pbOverrideSet(before); !slices.Equal(got, want) {
		t.Errorf("overrides %v after refused PutRoutes, want %v", got, want)
	}
	if got := overrideSet(h.dbOverrides()); len(got) != 0 {
		t.Errorf("database holds %v after refused PutRoutes, want nothing", got)
	}
	h.wantRefused("public", "l7.test")
}
