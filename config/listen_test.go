package config

import (
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
)

// TestDuplicateWildcardListen: ":8443", "[::]:8443" and "0.0.0.0:8443"
// all bind the same wildcard socket (the second bind fails with "address
// already in use"), so `check` must report them as duplicates.
func TestDuplicateWildcardListen(t *testing.T) {
	for _, pair := range [][2]string{{":8443", "[::]:8443"}, {":8443", "0.0.0.0:8443"}, {"[::]:8443", "0.0.0.0:8443"}, {":8443", "[::ffff:0.0.0.0]:8443"}} {
		doc := "[[listener]]\nname = \"a\"\nlisten = \"" + pair[0] + "\"\n[[listener]]\nname = \"b\"\nlisten = \"" + pair[1] + "\"\n"
		_, err := Parse("p.toml", []byte(doc))
		want := "p.toml:6: listener[1].listen: duplicate listen address"
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q and %q: error %v, want %q", pair[0], pair[1], err, want)
		}
	}
}

// TestListenOverlapsWhatTheKernelRefuses: a wildcard address takes its
// port on every interface, so a second socket on a specific address of
// the same port cannot be bound — whether it is another listener or the
// metrics or admin endpoint. `check` must report what `serve` would fail
// on, and accept what binds side by side. Each pair is bound for real
// first, so the test follows the kernel rather than an assumption.
func TestListenOverlapsWhatTheKernelRefuses(t *testing.T) {
	port := freePort(t)
	at := func(host string) string { return net.JoinHostPort(host, port) }
	for _, tc := range []struct {
		name     string
		a, b     string // bound in this order
		doc      string // %[1]s = a, %[2]s = b
		overlaps bool
		want     string
	}{
		{"wildcard then specific listener", at(""), at("127.0.0.1"), twoListeners, true, "p.toml:6: listener[1].listen: "},
		{"specific then wildcard listener", at("127.0.0.1"), at("0.0.0.0"), twoListeners, true, "p.toml:6: listener[1].listen: "},
		{"IPv6 wildcard and IPv4 loopback", at("::"), at("127.0.0.1"), twoListeners, true, "p.toml:6: listener[1].listen: "},
		{"metrics on a listener's port", at(""), at("127.0.0.1"), "[metrics]\nlisten = %[2]q\n" + oneListener, true, "p.toml:2: metrics.listen: "},
		{"admin on the metrics port", at("127.0.0.1"), at(""), "[metrics]\nlisten = %[1]q\n[admin]\nlisten = %[2]q\ntls_cert = \"c\"\ntls_key = \"k\"\n[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\n", true, "p.toml:4: admin.listen: "},
		{"two specific addresses", at("127.0.0.1"), at("127.0.0.2"), twoListeners, false, ""},
		{"metrics on another port", "127.0.0.1:0", "127.0.0.1:0", "[metrics]\nlisten = %[2]q\n" + oneListener, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			first, err := net.Listen("tcp", tc.a)
			if err != nil {
				t.Fatal(err)
			}
			second, err := net.Listen("tcp", tc.b)
			if err == nil {
				second.Close()
			}
			first.Close()
			if tc.overlaps != (err != nil) {
				t.Fatalf("binding %s then %s: %v (the case's premise is wrong)", tc.a, tc.b, err)
			}
			doc := fmt.Sprintf(tc.doc, tc.a, tc.b)
			_, err = Parse("p.toml", []byte(doc))
			switch {
			case !tc.overlaps && err != nil:
				t.Fatalf("rejected addresses that bind side by side: %v\n%s", err, doc)
			case tc.overlaps && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("error %v, want %q\n%s", err, tc.want, doc)
			}
		})
	}
}

const (
	oneListener  = "[[listener]]\nname = \"a\"\nlisten = %[1]q\n"
	twoListeners = oneListener + "[[listener]]\nname = \"b\"\nlisten = %[2]q\n"
)

// freePort returns a TCP port nothing listens on now.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}

// TestUnixSocketPathTooLong: a Unix socket path (after resolving it
// against the config's directory) longer than the kernel's sun_path
// cannot be bound, so serve would refuse to start; check must say so.
func TestUnixSocketPathTooLong(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "p.toml")
	for _, tc := range []struct {
		name string
		n    int // length of the resolved socket path
		ok   bool
	}{
		{"fits", 107, true},
		{"one byte too long", 108, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			name := strings.Repeat("s", tc.n-len(dir)-len("/.sock")) + ".sock"
			ln, err := net.Listen("unix", filepath.Join(dir, name))
			if err == nil {
				ln.Close()
			}
			if tc.ok != (err == nil) {
				t.Fatalf("binding a %d-byte socket path: %v (the case's premise is wrong)", tc.n, err)
			}
			doc := "[admin]\nunix_socket = \"" + name + "\"\n[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\n"
			_, err = Parse(path, []byte(doc))
			switch {
			case tc.ok && err != nil:
				t.Fatalf("rejected a socket path that binds: %v", err)
			case !tc.ok && (err == nil || !strings.Contains(err.Error(), path+":2: admin.unix_socket: ")):
				t.Fatalf("error %v, want %s:2: admin.unix_socket", err, path)
			}
		})
	}
}
