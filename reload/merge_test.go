package reload

import (
	"context"
	"fmt"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/state"
)

const mergeFile = `
[firewall]
block = ["203.0.113.0/24", "198.51.100.7", "2001:db8:bad::/48"]

[[listener]]
name = "public"
listen = "127.0.0.1:8443"
max_connections = 100

  [[listener.route]]
  sni = "app.example.com"
  backend = "10.1.0.5:443"

  [[listener.route]]
  sni = "*.api.example.com"
  backend = "10.1.0.6:443"

  [[listener.route]]
  sni = "*"
  backend = "10.1.0.9:443"

[[listener]]
name = "internal"
listen = "127.0.0.1:9443"

  [[listener.route]]
  sni = "db.internal"
  backend = "10.2.0.1:5432"
`

func mergeConfig(t *testing.T) *config.Config {
	t.Helper()
	c, err := config.Parse("portcullis.toml", []byte(mergeFile))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// routeTable lists the effective routes in order with their origins, and
// checks that RouteOrigins covers exactly those routes.
func routeTable(t *testing.T, e *Effective) []string {
	t.Helper()
	var out []string
	n := 0
	for _, l := range e.Config.Listeners {
		for _, r := range l.Routes {
			o, ok := e.RouteOrigins[RouteKey{l.Name, r.SNI}]
			if !ok {
				t.Errorf("route %s %s has no origin", l.Name, r.SNI)
			}
			out = append(out, fmt.Sprintf("%s %s -> %s [%s]", l.Name, r.SNI, r.Backend, o))
			n++
		}
	}
	if len(e.RouteOrigins) != n {
		t.Errorf("RouteOrigins has %d entries for %d routes: %v", len(e.RouteOrigins), n, e.RouteOrigins)
	}
	return out
}

func blockTable(t *testing.T, e *Effective) []string {
	t.Helper()
	var out []string
	for _, b := range e.Config.Firewall.Block {
		o, ok := e.FirewallOrigins[prefixKey(b)]
		if !ok {
			t.Errorf("block entry %s has no origin", b)
		}
		out = append(out, fmt.Sprintf("%s [%s]", b, o))
	}
	if len(e.FirewallOrigins) != len(e.Config.Firewall.Block) {
		t.Errorf("FirewallOrigins has %d entries for %d block entries: %v", len(e.FirewallOrigins), len(e.Config.Firewall.Block), e.FirewallOrigins)
	}
	return out
}

var fileRoutes = []string{
	"public app.example.com -> 10.1.0.5:443 [file]",
	"public *.api.example.com -> 10.1.0.6:443 [file]",
	"public * -> 10.1.0.9:443 [file]",
	"internal db.internal -> 10.2.0.1:5432 [file]",
}

func l4(backend string) config.Route { return config.Route{Backend: backend} }

func TestMergeRoutes(t *testing.T) {
	for _, tc := range []struct {
		name    string
		ovs     []state.RouteOverride
		want    []string
		orphans []Orphan
	}{
		{name: "no overrides", want: fileRoutes},
		{
			name: "override replaces the file route in place",
			// Any spelling of the name is the same key.
			ovs: []state.RouteOverride{{Listener: "public", SNI: "APP.Example.com.", Route: l4("10.9.9.9:443")}},
			want: []string{
				"public app.example.com -> 10.9.9.9:443 [file, overridden]",
				fileRoutes[1], fileRoutes[2], fileRoutes[3],
			},
		},
		{
			name: "new routes are appended in sorted order",
			ovs: []state.RouteOverride{
				{Listener: "public", SNI: "z.example.com", Route: l4("10.0.0.26:443")},
				{Listener: "internal", SNI: "cache.internal", Route: l4("10.0.0.3:6379")},
				{Listener: "public", SNI: "b.example.com", Route: l4("10.0.0.2:443")},
			},
			want: []string{
				fileRoutes[0], fileRoutes[1], fileRoutes[2],
				"public b.example.com -> 10.0.0.2:443 [override]",
				"public z.example.com -> 10.0.0.26:443 [override]",
				fileRoutes[3],
				"internal cache.internal -> 10.0.0.3:6379 [override]",
			},
		},
		{
			name: "tombstone hides the file route",
			ovs:  []state.RouteOverride{{Listener: "public", SNI: "*.API.example.com", Deleted: true}},
			want: []string{fileRoutes[0], fileRoutes[2], fileRoutes[3]},
		},
		{
			name: "tombstone with nothing to hide is silent",
			ovs:  []state.RouteOverride{{Listener: "public", SNI: "nothing.example.com", Deleted: true}},
			want: fileRoutes,
		},
		{
			name: "the key's sni wins over the route's",
			ovs:  []state.RouteOverride{{Listener: "public", SNI: "new.example.com", Route: config.Route{SNI: "other.example.com", Backend: "10.0.0.1:443"}}},
			want: append(slices.Clone(fileRoutes[:3]), "public new.example.com -> 10.0.0.1:443 [override]", fileRoutes[3]),
		},
		{
			name: "overrides for a listener not in the file are orphans",
			ovs: []state.RouteOverride{
				{Listener: "gone", SNI: "b.example.com", Deleted: true},
				{Listener: "gone", SNI: "a.example.com", Route: l4("10.0.0.1:443")},
				{Listener: "public", SNI: "app.example.com", Route: l4("10.9.9.9:443")},
			},
			want: []string{
				"public app.example.com -> 10.9.9.9:443 [file, overridden]",
				fileRoutes[1], fileRoutes[2], fileRoutes[3],
			},
			orphans: []Orphan{
				{Kind: "route", Listener: "gone", SNI: "a.example.com", Reason: `listener "gone" is not in the config file`},
				{Kind: "route", Listener: "gone", SNI: "b.example.com", Reason: `listener "gone" is not in the config file; the route it hides is gone with it`},
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := Merge(mergeConfig(t), &state.Overrides{Routes: tc.ovs})
			if got := routeTable(t, e); !slices.Equal(got, tc.want) {
				t.Errorf("routes:\n got %q\nwant %q", got, tc.want)
			}
			if !slices.Equal(e.Orphans, tc.orphans) {
				t.Errorf("orphans:\n got %+v\nwant %+v", e.Orphans, tc.orphans)
			}
			if err := e.Config.Validate(); err != nil {
				t.Errorf("merged config does not validate: %v", err)
			}
		})
	}
}

func TestMergeRouteDefaults(t *testing.T) {
	e := Merge(mergeConfig(t), &state.Overrides{Routes: []state.RouteOverride{{
		Listener: "public", SNI: "web.example.com",
		Route: config.Route{Mode: config.ModeL7, Backend: "10.0.0.1:8080", TLSCert: "c.pem", TLSKey: "k.pem"},
	}}})
	r := e.Config.Listener("public").Routes[3]
	if r.SNI != "web.example.com" || r.BackendProtocol != config.BackendH2C || r.ResponseTimeout != config.Duration(config.DefaultResponseTimeout) {
		t.Errorf("override route without defaults: %+v", r)
	}
}

func TestMergeFirewall(t *testing.T) {
	fileBlock := []string{"203.0.113.0/24 [file]", "198.51.100.7 [file]", "2001:db8:bad::/48 [file]"}
	for _, tc := range []struct {
		name string
		ovs  []state.FirewallOverride
		want []string
	}{
		{name: "no overrides", want: fileBlock},
		{
			name: "add appends normalised, sorted",
			ovs:  []state.FirewallOverride{{Value: "192.0.2.200"}, {Value: "192.0.2.0/25"}, {Value: "2001:db8::1"}},
			want: append(slices.Clone(fileBlock), "192.0.2.0/25 [override]", "192.0.2.200/32 [override]", "2001:db8::1/128 [override]"),
		},
		{
			// The file entry stays, spelled as in the file, once; its
			// origin says an override also blocks it.
			name: "add of a file entry in another spelling",
			ovs:  []state.FirewallOverride{{Value: "::ffff:198.51.100.7"}},
			want: []string{fileBlock[0], "198.51.100.7 [file, overridden]", fileBlock[2]},
		},
		{
			name: "remove drops matching file entries",
			ovs:  []state.FirewallOverride{{Value: "198.51.100.7/32", Remove: true}, {Value: "203.0.113.0/24", Remove: true}},
			want: []string{fileBlock[2]},
		},
		{
			name: "remove with nothing to remove is silent",
			ovs:  []state.FirewallOverride{{Value: "192.0.2.1", Remove: true}},
			want: fileBlock,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := Merge(mergeConfig(t), &state.Overrides{Firewall: tc.ovs})
			if got := blockTable(t, e); !slices.Equal(got, tc.want) {
				t.Errorf("block:\n got %q\nwant %q", got, tc.want)
			}
			if len(e.Orphans) != 0 {
				t.Errorf("orphans: %+v", e.Orphans)
			}
			if err := e.Config.Validate(); err != nil {
				t.Errorf("merged config does not validate: %v", err)
			}
		})
	}
}

func TestMergeListeners(t *testing.T) {
	e := Merge(mergeConfig(t), &state.Overrides{Listeners: []state.ListenerOverride{
		{Listener: "zz-gone", MaxConnections: 1},
		{Listener: "public", MaxConnections: 5},
		{Listener: "a-gone", MaxConnections: 2},
	}})
	if got := e.Config.Listener("public").MaxConnections; got != 5 {
		t.Errorf("public max_connections = %d, want 5", got)
	}
	if got := e.Config.Listener("internal").MaxConnections; got != 0 {
		t.Errorf("internal max_connections = %d, want 0", got)
	}
	want := map[string]Origin{"public": OriginFileOverridden, "internal": OriginFile}
	if !reflect.DeepEqual(e.ListenerOrigins, want) {
		t.Errorf("ListenerOrigins = %v, want %v", e.ListenerOrigins, want)
	}
	wantOrphans := []Orphan{
		{Kind: "listener", Listener: "a-gone", Reason: `listener "a-gone" is not in the config file`},
		{Kind: "listener", Listener: "zz-gone", Reason: `listener "zz-gone" is not in the config file`},
	}
	if !slices.Equal(e.Orphans, wantOrphans) {
		t.Errorf("orphans:\n got %+v\nwant %+v", e.Orphans, wantOrphans)
	}
}

// allKinds touches every rule at once.
func allKinds() *state.Overrides {
	return &state.Overrides{
		Routes: []state.RouteOverride{
			{Listener: "public", SNI: "app.example.com", Route: l4("10.9.9.9:443")},
			{Listener: "public", SNI: "*.api.example.com", Deleted: true},
			{Listener: "internal", SNI: "new.internal", Route: l4("10.2.0.9:443")},
			{Listener: "gone", SNI: "x.example.com", Route: l4("10.0.0.1:443")},
		},
		Firewall: []state.FirewallOverride{
			{Value: "203.0.113.0/24", Remove: true},
			{Value: "192.0.2.1"},
			{Value: "198.51.100.7"},
		},
		Listeners: []state.ListenerOverride{
			{Listener: "internal", MaxConnections: 3},
			{Listener: "gone", MaxConnections: 3},
		},
	}
}

func TestMergeDoesNotMutateInputs(t *testing.T) {
	file, pristine := mergeConfig(t), mergeConfig(t)
	o := allKinds()
	oBefore := o.Clone()
	e := Merge(file, o)
	if !reflect.DeepEqual(file, pristine) {
		t.Errorf("Merge modified the file config:\n got %+v\nwant %+v", file, pristine)
	}
	if !reflect.DeepEqual(o, oBefore) {
		t.Errorf("Merge modified the overrides:\n got %+v\nwant %+v", o, oBefore)
	}
	// Nor does the result share memory with the file config.
	e.Config.Firewall.Block[0] = "mutated"
	e.Config.Listeners[0].Routes[0].Backend = "mutated"
	e.Config.Listeners[0].MaxConnections = -1
	if !reflect.DeepEqual(file, pristine) {
		t.Error("the effective config shares memory with the file config")
	}
}

func TestMergeDeterministic(t *testing.T) {
	file := mergeConfig(t)
	o := allKinds()
	want := Merge(file, o)
	for i := 0; i < 10; i++ {
		// Rotate every slice: a different input order each time.
		r := o.Clone()
		rot := func(n int) int { return (i + 1) % max(n, 1) }
		r.Routes = append(r.Routes[rot(len(r.Routes)):], r.Routes[:rot(len(r.Routes))]...)
		r.Firewall = append(r.Firewall[rot(len(r.Firewall)):], r.Firewall[:rot(len(r.Firewall))]...)
		r.Listeners = append(r.Listeners[rot(len(r.Listeners)):], r.Listeners[:rot(len(r.Listeners))]...)
		if got := Merge(file, r); !reflect.DeepEqual(got, want) {
			t.Fatalf("input order %d changed the result:\n got %+v\nwant %+v", i, got, want)
		}
	}
}

// TestMergeClearRestoresFile goes through the real store: put one
// override, merge, clear it, merge again — the file's value is back.
func TestMergeClearRestoresFile(t *testing.T) {
	ctx := context.Background()
	st, err := state.Open(filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	file := mergeConfig(t)
	base := Merge(file, nil)

	for _, tc := range []struct {
		name  string
		put   func() error
		clear func() error
	}{
		{"route replaced",
			func() error {
				return st.PutRoute(ctx, state.RouteOverride{Listener: "public", SNI: "app.example.com", Route: l4("10.9.9.9:443")})
			},
			func() error { return st.ClearRoute(ctx, "public", "app.example.com") }},
		{"route added",
			func() error {
				return st.PutRoute(ctx, state.RouteOverride{Listener: "public", SNI: "new.example.com", Route: l4("10.9.9.9:443")})
			},
			func() error { return st.ClearRoute(ctx, "public", "new.example.com") }},
		{"route tombstoned",
			func() error {
				return st.PutRoute(ctx, state.RouteOverride{Listener: "internal", SNI: "db.internal", Deleted: true})
			},
			func() error { return st.ClearRoute(ctx, "internal", "db.internal") }},
		{"firewall removed",
			func() error { return st.PutFirewall(ctx, state.FirewallOverride{Value: "198.51.100.7", Remove: true}) },
			func() error { return st.ClearFirewall(ctx, "198.51.100.7") }},
		{"firewall added",
			func() error { return st.PutFirewall(ctx, state.FirewallOverride{Value: "192.0.2.0/24"}) },
			func() error { return st.ClearFirewall(ctx, "192.0.2.0/24") }},
		{"max_connections",
			func() error {
				return st.PutListener(ctx, state.ListenerOverride{Listener: "public", MaxConnections: 1})
			},
			func() error { return st.ClearListener(ctx, "public") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			load := func() *Effective {
				o, err := st.Load(ctx)
				if err != nil {
					t.Fatal(err)
				}
				return Merge(file, o)
			}
			if err := tc.put(); err != nil {
				t.Fatal(err)
			}
			if with := load(); reflect.DeepEqual(with.Config, base.Config) {
				t.Fatal("the override changed nothing; the test tests nothing")
			}
			if err := tc.clear(); err != nil {
				t.Fatal(err)
			}
			if without := load(); !reflect.DeepEqual(without, base) {
				t.Errorf("after clearing:\n got %+v\nwant %+v", without, base)
			}
		})
	}
}

func TestMergeDoesNotValidate(t *testing.T) {
	e := Merge(mergeConfig(t), &state.Overrides{
		Routes:    []state.RouteOverride{{Listener: "public", SNI: "bad.example.com", Route: l4("no-port")}},
		Listeners: []state.ListenerOverride{{Listener: "public", MaxConnections: -1}},
	})
	err := e.Config.Validate()
	if err == nil {
		t.Fatal("an invalid override validated")
	}
	for _, want := range []string{"backend", "max_connections"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Validate = %v, want it to mention %s", err, want)
		}
	}
}

func TestMergeNil(t *testing.T) {
	e := Merge(nil, nil)
	if e.Config == nil || e.RouteOrigins == nil || e.FirewallOrigins == nil || e.ListenerOrigins == nil || e.Orphans != nil {
		t.Errorf("Merge(nil, nil) = %+v", e)
	}
	e = Merge(mergeConfig(t), nil)
	if got := routeTable(t, e); !slices.Equal(got, fileRoutes) {
		t.Errorf("Merge(file, nil) routes = %q", got)
	}
}
