package proxy

import (
	"fmt"
	"testing"
)

func TestRouteLookup(t *testing.T) {
	tbl := newRouteTable()
	for _, p := range []string{"app.example.com", "*.example.com", "*.b.example.com", "*"} {
		tbl.add(&route{sni: p})
	}
	for _, tc := range []struct{ in, want string }{
		{"app.example.com", "app.example.com"},
		{"APP.Example.COM", "app.example.com"},
		{"app.example.com.", "app.example.com"},
		{"x.example.com", "*.example.com"},
		{"a.b.example.com", "*.b.example.com"},
		{"a.c.example.com", "*"},
		{"example.com", "*"},
		{"", "*"},
	} {
		if got := tbl.lookup(tc.in); got == nil || got.sni != tc.want {
			t.Errorf("lookup(%q) = %v, want %q", tc.in, got, tc.want)
		}
	}
	noDefault := newRouteTable()
	noDefault.add(&route{sni: "a.test"})
	if r := noDefault.lookup("b.test"); r != nil {
		t.Errorf("lookup without default = %q, want nil", r.sni)
	}
}

func BenchmarkRouteLookup(b *testing.B) {
	for _, n := range []int{10, 10000} {
		tbl := newRouteTable()
		for i := 0; i < n; i++ {
			tbl.add(&route{sni: fmt.Sprintf("host%d.example.com", i)})
			tbl.add(&route{sni: fmt.Sprintf("*.zone%d.example.net", i)})
		}
		tbl.add(&route{sni: "*"})
		for _, tc := range []struct{ name, sni string }{
			{"exact", fmt.Sprintf("host%d.example.com", n/2)},
			{"wildcard", fmt.Sprintf("api.zone%d.example.net", n/3)},
			{"default", "nothing.example.org"},
		} {
			b.Run(fmt.Sprintf("routes=%d/%s", 2*n, tc.name), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if tbl.lookup(tc.sni) == nil {
						b.Fatal("no route")
					}
				}
			})
		}
	}
}

// TestLiteralAddr: only a backend given as an address, unzoned, is
// dialed by an event loop itself; a host name is left to net, which
// resolves it on every dial.
func TestLiteralAddr(t *testing.T) {
	for _, tc := range []struct{ backend, want string }{
		{"127.0.0.1:9001", "127.0.0.1:9001"},
		{"[::1]:443", "[::1]:443"},
		{"[::ffff:192.0.2.1]:80", "192.0.2.1:80"},
		{"localhost:9001", ""},
		{"backend.internal:443", ""},
		{"[fe80::1%eth0]:443", ""},
	} {
		got := literalAddr(tc.backend)
		if (tc.want == "" && got.IsValid()) || (tc.want != "" && got.String() != tc.want) {
			t.Errorf("literalAddr(%q) = %v, want %q", tc.backend, got, tc.want)
		}
	}
}
