package proxy

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/maxmind/mmdbwriter"
	"github.com/maxmind/mmdbwriter/mmdbtype"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/testnet"
)

// These tests drive the firewall through real sockets. Linux routes all
// of 127.0.0.0/8 to lo, so a client that binds 127.0.0.2, 127.0.0.3, …
// before dialling is a distinct source address to the proxy, with no
// PROXY header in between: the blocklist, the GeoIP lookup and the rate
// limiter all see what the kernel reports for the socket.

const (
	fwSNI      = "fw.test"
	fwGreeting = "fw-backend"
)

// fwBackend is a backend that reads exactly one ClientHello, answers with
// fwGreeting and then echoes. conns counts the connections it was given,
// so a test can prove a rejected client never reached it.
type fwBackend struct {
	addr  string
	conns atomic.Int64
}

func newFWBackend(t *testing.T, hello []byte) *fwBackend {
	t.Helper()
	b := &fwBackend{}
	b.addr = rawBackend(t, func(c *net.TCPConn) {
		b.conns.Add(1)
		c.SetDeadline(time.Now().Add(30 * time.Second))
		got := make([]byte, len(hello))
		if _, err := io.ReadFull(c, got); err != nil {
			return
		}
		if !bytes.Equal(got, hello) {
			io.WriteString(c, "hello mangled\n")
			return
		}
		io.WriteString(c, fwGreeting+"\n")
		io.Copy(c, c)
	})
	return b
}

// fwConfig is a config with one listener "l" on listen and a route for
// fwSNI to backend. head goes before the listener ([geoip], [firewall]);
// extra are further route blocks.
func fwConfig(head, listen, backend string, extra ...string) string {
	return head + fmt.Sprintf("\n[[listener]]\nname = \"l\"\nlisten = %q\n", listen) +
		routeTOML(fwSNI, backend) + strings.Join(extra, "")
}

// fwClient dials one listener from chosen source addresses.
type fwClient struct {
	t     *testing.T
	h     *harness
	b     *fwBackend
	hello []byte
	addr  string // where to dial; normally h.addr("l")
}

func newFWClient(t *testing.T, h *harness, b *fwBackend, hello []byte) *fwClient {
	return &fwClient{t: t, h: h, b: b, hello: hello, addr: h.addr("l")}
}

// try dials from the source address from (empty: the kernel's choice),
// sends the ClientHello and waits for the backend's greeting. On success
// the connection is returned open; otherwise it is closed and the read
// error returned.
func (f *fwClient) try(from string) (*net.TCPConn, error) {
	f.t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	nc, err := d.Dial("tcp", f.addr)
	if err != nil {
		// The kernel completes the handshake before Accept, so even a
		// blocked client connects; but on loopback the proxy's reset can
		// arrive before the dialer collects the connect result, and then
		// the dial itself reports ECONNRESET.
		if errors.Is(err, syscall.ECONNRESET) {
			return nil, err
		}
		f.t.Fatalf("dial %s from %q: %v", f.addr, from, err)
	}
	c := nc.(*net.TCPConn)
	if from != "" {
		if got := c.LocalAddr().(*net.TCPAddr).AddrPort().Addr().Unmap(); got != netip.MustParseAddr(from) {
			c.Close()
			f.t.Fatalf("dialled from %s, want %s", got, from)
		}
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write(f.hello) // fails only if the reset already came; the read tells
	line, err := readLine(c)
	if err != nil {
		c.Close()
		return nil, err
	}
	if line != fwGreeting {
		c.Close()
		f.t.Fatalf("from %q: got %q, want the greeting %q", from, line, fwGreeting)
	}
	return c, nil
}

// open asserts that a connection from from reaches the backend and
// returns it open; it is closed when the test ends at the latest.
func (f *fwClient) open(from string) *net.TCPConn {
	f.t.Helper()
	c, err := f.try(from)
	if err != nil {
		f.t.Fatalf("from %q: want the backend's greeting, got %v", from, err)
	}
	f.t.Cleanup(func() { c.Close() })
	return c
}

// pass asserts that n connections in a row from from reach the backend.
func (f *fwClient) pass(from string, n int) {
	f.t.Helper()
	for i := range n {
		c, err := f.try(from)
		if err != nil {
			f.t.Fatalf("from %q, connection %d of %d: want the backend's greeting, got %v", from, i+1, n, err)
		}
		c.Close()
	}
}

// counts reads every rejection counter of listener "l".
func (f *fwClient) counts() map[string]float64 {
	m := map[string]float64{}
	for r := reason(0); r < numReasons; r++ {
		m[r.String()] = f.h.rejected("l", r.String())
	}
	return m
}

// refuse asserts that a connection from from is closed or reset without
// a byte from the backend, that it is counted under why and under no
// other reason, and that the backend was never dialled.
func (f *fwClient) refuse(from, why string) {
	f.t.Helper()
	before := f.counts()
	if _, ok := before[why]; !ok {
		f.t.Fatalf("no rejection reason %q", why)
	}
	dialled := f.b.conns.Load()
	c, err := f.try(from)
	if err == nil {
		c.Close()
		f.t.Fatalf("from %q: got the backend's greeting, want %s", from, why)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		f.t.Fatalf("from %q: connection held open (%v), want it closed as %s", from, err, why)
	}
	total := func(m map[string]float64) (n float64) {
		for _, v := range m {
			n += v
		}
		return n
	}
	testnet.WaitFor(f.t, fmt.Sprintf("the rejection from %s counted", from), func() bool {
		return total(f.counts()) > total(before)
	})
	for r, n := range f.counts() {
		want := before[r]
		if r == why {
			want++
		}
		if n != want {
			f.t.Errorf("from %q: %s went from %v to %v, want %v (counted as %s)", from, r, before[r], n, want, why)
		}
	}
	if n := f.b.conns.Load(); n != dialled {
		f.t.Errorf("from %q: the backend got %d connection(s), want none", from, n-dialled)
	}
}

// needLoopbackAliases skips where only 127.0.0.1 is configured (macOS).
func needLoopbackAliases(t *testing.T) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Skipf("cannot use 127.0.0.2 as a source address: %v", err)
	}
	ln.Close()
}

func needIPv6Loopback(t *testing.T) {
	t.Helper()
	ln, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	ln.Close()
}

// TestFirewallBlockIP checks the blocklist against real source addresses:
// single addresses, IPv4 and IPv6 CIDRs, an IPv4-mapped entry, and a
// dual-stack listener whose IPv4 clients arrive as ::ffff:a.b.c.d.
func TestFirewallBlockIP(t *testing.T) {
	needLoopbackAliases(t)
	hello := clientHelloBytes(t, &tls.Config{ServerName: fwSNI})

	for _, tc := range []struct {
		name             string
		block            string
		blocked, allowed []string
	}{
		{"address", `["127.0.0.2"]`, []string{"127.0.0.2"}, []string{"127.0.0.1", "127.0.0.3"}},
		{"IPv4 CIDR", `["127.0.0.0/30"]`, []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"}, []string{"127.0.0.4", "127.0.0.5"}},
		{"IPv4-mapped entry", `["::ffff:127.0.0.2"]`, []string{"127.0.0.2"}, []string{"127.0.0.1"}},
		{"IPv4-mapped CIDR", `["::ffff:127.0.0.0/126"]`, []string{"127.0.0.3"}, []string{"127.0.0.4"}},
		// IPv6 rules never match IPv4 clients, ::/0 included.
		{"IPv6 rules only", `["::/0", "::1"]`, nil, []string{"127.0.0.1", "127.0.0.2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newFWBackend(t, hello)
			h := startProxy(t, fwConfig("[firewall]\nblock = "+tc.block+"\n", "127.0.0.1:0", b.addr))
			f := newFWClient(t, h, b, hello)
			for _, a := range tc.blocked {
				f.refuse(a, "blocked_ip")
			}
			for _, a := range tc.allowed {
				f.pass(a, 1)
			}
		})
	}

	// On a dual-stack socket an IPv4 client's address is ::ffff:127.0.0.2;
	// unless it is unmapped, an IPv4 rule would never match it (and ::/0
	// would match every IPv4 client).
	t.Run("dual-stack listener", func(t *testing.T) {
		ln, err := net.Listen("tcp", "[::]:0")
		if err != nil {
			t.Skipf("no dual-stack socket: %v", err)
		}
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", ln.Addr().(*net.TCPAddr).Port), 5*time.Second)
		ln.Close()
		if err != nil {
			t.Skipf("[::] does not accept IPv4 here: %v", err)
		}
		c.Close()

		b := newFWBackend(t, hello)
		h := startProxy(t, fwConfig("[firewall]\nblock = [\"127.0.0.2\", \"::/0\"]\n", "[::]:0", b.addr))
		f := newFWClient(t, h, b, hello)
		f.addr = fmt.Sprintf("127.0.0.1:%d", h.srv.Addr("l").Port())
		f.refuse("127.0.0.2", "blocked_ip")
		f.pass("127.0.0.1", 1)
		f.pass("127.0.0.3", 1)
	})

	t.Run("IPv6", func(t *testing.T) {
		needIPv6Loopback(t)
		b := newFWBackend(t, hello)
		fw := func(block string) string { return fwConfig("[firewall]\nblock = "+block+"\n", "[::1]:0", b.addr) }
		h := startProxy(t, fw(`["2001:db8::/32", "127.0.0.1", "::ffff:0:0/96"]`))
		f := newFWClient(t, h, b, hello)
		f.pass("::1", 1)
		for _, block := range []string{`["::1"]`, `["::1/128"]`, `["::/64"]`, `["::/0"]`} {
			h.apply(fw(block))
			f.refuse("::1", "blocked_ip")
		}
		h.apply(fw(`["::2"]`))
		f.pass("::1", 1)
	})
}

// geoNet is one network of a test GeoIP database.
type geoNet struct {
	cidr       string
	country    string // country.iso_code; "" for none
	registered string // registered_country.iso_code; "" for none
}

// writeCountryDB writes a GeoLite2-Country style database with mmdbwriter.
// Loopback networks are reserved, so they need IncludeReservedNetworks;
// IPv4 networks land in the ::/96 subtree of the IPv6 tree, where the
// reader looks IPv4 addresses up.
func writeCountryDB(t *testing.T, path string, nets ...geoNet) {
	t.Helper()
	tree, err := mmdbwriter.New(mmdbwriter.Options{
		DatabaseType:            "GeoLite2-Country",
		Description:             map[string]string{"en": "portcullis proxy firewall test"},
		IncludeReservedNetworks: true,
		RecordSize:              24,
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nets {
		_, ipnet, err := net.ParseCIDR(n.cidr)
		if err != nil {
			t.Fatal(err)
		}
		rec := mmdbtype.Map{}
		if n.country != "" {
			rec["country"] = mmdbtype.Map{"iso_code": mmdbtype.String(n.country)}
		}
		if n.registered != "" {
			rec["registered_country"] = mmdbtype.Map{"iso_code": mmdbtype.String(n.registered)}
		}
		if err := tree.Insert(ipnet, rec); err != nil {
			t.Fatalf("insert %s: %v", n.cidr, err)
		}
	}
	// Always a new file, never an overwrite: a database in use is
	// memory-mapped, and operators replace it by rename (geoipupdate does).
	if _, err := os.Stat(path); err == nil {
		t.Fatalf("%s exists; write a new file instead", path)
	}
	out, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tree.WriteTo(out); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestFirewallBlockCountry checks block_countries with a real .mmdb whose
// records place loopback addresses in countries.
func TestFirewallBlockCountry(t *testing.T) {
	needLoopbackAliases(t)
	hello := clientHelloBytes(t, &tls.Config{ServerName: fwSNI})
	b := newFWBackend(t, hello)
	h := startProxy(t, fwConfig("", "127.0.0.1:0", b.addr))
	f := newFWClient(t, h, b, hello)

	writeCountryDB(t, filepath.Join(h.dir, "geo.mmdb"),
		geoNet{cidr: "127.0.0.2/32", country: "KP"},
		geoNet{cidr: "127.0.0.3/32", country: "DE"},
		geoNet{cidr: "127.0.0.8/29", registered: "KP"}, // located nowhere: the registered country counts
		geoNet{cidr: "127.0.0.16/29", country: "kp"},   // lower case in the data
	)
	geo := func(db, head string) string {
		return fwConfig("[geoip]\ndatabase = \""+db+"\"\n\n[firewall]\nblock_countries = [\"KP\"]\n"+head, "127.0.0.1:0", b.addr)
	}

	// Turned on by a reload of a running server, relative to the config's
	// directory.
	h.apply(geo("geo.mmdb", ""))
	f.refuse("127.0.0.2", "blocked_country")
	f.pass("127.0.0.3", 1)
	f.pass("127.0.0.1", 1) // not in the database
	f.refuse("127.0.0.9", "blocked_country")
	f.refuse("127.0.0.17", "blocked_country")

	t.Run("address rules go first", func(t *testing.T) {
		h.apply(geo("geo.mmdb", "block = [\"127.0.0.2\"]\n"))
		f.refuse("127.0.0.2", "blocked_ip")
		f.pass("127.0.0.3", 1)
		h.apply(geo("geo.mmdb", ""))
	})

	// A failed compile that shares the open database with the running
	// snapshot must not close it: the country rule would then fail open.
	t.Run("failed compile keeps the database open", func(t *testing.T) {
		cur := h.srv.Current()
		cfg := parseInDir(t, h.dir, geo("geo.mmdb", "")+
			routeTOML("l7.test", b.addr, "  mode = \"l7\"\n  tls_cert = \"missing.pem\"\n  tls_key = \"missing-key.pem\""))
		if snap, err := h.srv.Compile(cfg); err == nil {
			h.srv.Discard(snap)
			t.Fatal("Compile with a missing certificate succeeded")
		}
		if h.srv.Current() != cur {
			t.Fatal("a failed compile changed the current snapshot")
		}
		f.refuse("127.0.0.2", "blocked_country")
		f.pass("127.0.0.3", 1)
	})

	t.Run("new database on reload", func(t *testing.T) {
		writeCountryDB(t, filepath.Join(h.dir, "geo2.mmdb"),
			geoNet{cidr: "127.0.0.2/32", country: "DE"},
			geoNet{cidr: "127.0.0.3/32", country: "KP"},
		)
		h.apply(geo("geo2.mmdb", ""))
		f.refuse("127.0.0.3", "blocked_country")
		f.pass("127.0.0.2", 1)
	})

	t.Run("block_countries removed", func(t *testing.T) {
		h.apply("[geoip]\ndatabase = \"geo2.mmdb\"\n" + fwConfig("", "127.0.0.1:0", b.addr))
		f.pass("127.0.0.3", 1)
	})
}

// parseInDir parses text as if it were dir/portcullis.toml, without
// writing it, so relative paths resolve in dir.
func parseInDir(t *testing.T, dir, text string) *config.Config {
	t.Helper()
	cfg, err := config.Parse(filepath.Join(dir, "portcullis.toml"), []byte(text))
	if err != nil {
		t.Fatalf("config does not parse: %v", err)
	}
	return cfg
}

// TestFirewallGeoIPDatabaseErrors checks that a missing or unusable GeoIP
// database fails Compile with an error that names the file, the line and
// the geoip.database key, both on a fresh server and on a running one,
// which keeps its snapshot and keeps blocking.
func TestFirewallGeoIPDatabaseErrors(t *testing.T) {
	needLoopbackAliases(t)
	hello := clientHelloBytes(t, &tls.Config{ServerName: fwSNI})
	b := newFWBackend(t, hello)
	h := startProxy(t, fwConfig("", "127.0.0.1:0", b.addr))
	f := newFWClient(t, h, b, hello)
	writeCountryDB(t, filepath.Join(h.dir, "good.mmdb"), geoNet{cidr: "127.0.0.2/32", country: "KP"})
	h.apply(fwConfig("[geoip]\ndatabase = \"good.mmdb\"\n[firewall]\nblock_countries = [\"KP\"]\n", "127.0.0.1:0", b.addr))

	dir := h.dir
	write := func(name string, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	valid, err := os.ReadFile(filepath.Join(dir, "good.mmdb"))
	if err != nil {
		t.Fatal(err)
	}
	random := make([]byte, 32<<10)
	rng := rand.New(rand.NewPCG(7, 7))
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	damaged := append([]byte(nil), valid...)
	for i := range min(256, len(damaged)) {
		damaged[i] = 0xff // search tree overwritten; the metadata still parses
	}
	write("empty.mmdb", nil)
	write("random.mmdb", random)
	write("truncated.mmdb", valid[:len(valid)/2])
	write("damaged.mmdb", damaged)
	if err := os.Mkdir(filepath.Join(dir, "adir.mmdb"), 0o700); err != nil {
		t.Fatal(err)
	}

	for _, name := range []string{"missing.mmdb", "empty.mmdb", "random.mmdb", "truncated.mmdb", "damaged.mmdb", "adir.mmdb"} {
		t.Run(name, func(t *testing.T) {
			// Line 3 holds the key, so the error can point at it.
			text := "# test\n[geoip]\ndatabase = \"" + name + "\"\n\n[firewall]\nblock_countries = [\"KP\"]\n" +
				fwConfig("", "127.0.0.1:0", b.addr)
			check := func(t *testing.T, err error) {
				t.Helper()
				if err == nil {
					t.Fatal("Compile succeeded")
				}
				var ce *config.Error
				if !errors.As(err, &ce) {
					t.Fatalf("error %q (%T) is not a *config.Error", err, err)
				}
				if ce.Key != "geoip.database" || ce.Line != 3 || ce.File != filepath.Join(dir, "portcullis.toml") {
					t.Errorf("error %q: file %q line %d key %q, want %s:3 geoip.database", err, ce.File, ce.Line, ce.Key, filepath.Join(dir, "portcullis.toml"))
				}
				if !strings.Contains(err.Error(), ":3: geoip.database: ") {
					t.Errorf("error %q does not read file:line: geoip.database", err)
				}
				if !strings.Contains(err.Error(), filepath.Join(dir, name)) {
					t.Errorf("error %q does not name the database file", err)
				}
				t.Log(err)
			}

			t.Run("fresh server", func(t *testing.T) {
				srv := NewServer(Options{})
				defer srv.Shutdown(canceledCtx())
				snap, err := srv.Compile(parseInDir(t, dir, text))
				if err == nil {
					srv.Discard(snap)
				}
				check(t, err)
			})
			t.Run("running server", func(t *testing.T) {
				cur := h.srv.Current()
				snap, err := h.srv.Compile(parseInDir(t, dir, text))
				if err == nil {
					h.srv.Discard(snap)
				}
				check(t, err)
				if h.srv.Current() != cur {
					t.Fatal("a failed compile changed the current snapshot")
				}
				f.refuse("127.0.0.2", "blocked_country")
				f.pass("127.0.0.1", 1)
			})
		})
	}
}

// TestFirewallRateLimit checks the per-source limit through the proxy:
// each source has its own budget, a blocked address spends none of it,
// and the limiter is shared by concurrent connections.
func TestFirewallRateLimit(t *testing.T) {
	needLoopbackAliases(t)
	hello := clientHelloBytes(t, &tls.Config{ServerName: fwSNI})
	b := newFWBackend(t, hello)
	const limit = "rate_limit = { connections = 3, window = \"1m\" }\n"
	h := startProxy(t, fwConfig("[firewall]\nblock = [\"127.0.0.2\"]\n"+limit, "127.0.0.1:0", b.addr))
	f := newFWClient(t, h, b, hello)

	f.pass("127.0.0.1", 3)
	f.refuse("127.0.0.1", "rate_limited")
	f.refuse("127.0.0.1", "rate_limited") // a rejected attempt does not reset anything
	f.pass("127.0.0.4", 3)                // a separate budget
	f.refuse("127.0.0.4", "rate_limited")

	// refuse also proves rate_limited does not move while these are
	// refused.
	for range 10 {
		f.refuse("127.0.0.2", "blocked_ip")
	}
	lim := h.srv.Current().limiter
	h.apply(fwConfig("[firewall]\n"+limit, "127.0.0.1:0", b.addr))
	if h.srv.Current().limiter != lim {
		t.Fatal("an unchanged rate_limit got a new limiter")
	}
	f.pass("127.0.0.2", 3) // the ten blocked attempts spent nothing
	f.refuse("127.0.0.2", "rate_limited")
	f.refuse("127.0.0.1", "rate_limited") // carried across the reload

	t.Run("concurrent", func(t *testing.T) {
		const n = 12
		before := h.rejected("l", "rate_limited")
		var wg sync.WaitGroup
		var passed, failed atomic.Int32
		for range n {
			wg.Go(func() {
				d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.5")}}
				c, err := d.Dial("tcp", f.addr)
				if errors.Is(err, syscall.ECONNRESET) { // refused before the dial returned
					failed.Add(1)
					return
				}
				if err != nil {
					t.Error(err)
					return
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				c.Write(hello)
				if line, err := readLine(c); err == nil && line == fwGreeting {
					passed.Add(1)
				} else {
					failed.Add(1)
				}
			})
		}
		wg.Wait()
		if passed.Load() != 3 || failed.Load() != n-3 {
			t.Fatalf("%d of %d concurrent connections passed, want exactly 3", passed.Load(), n)
		}
		testnet.WaitFor(t, "rate_limited counted", func() bool { return h.rejected("l", "rate_limited") == before+n-3 })
	})

	// IPv6 sources are keyed by /64; ::1 has a budget of its own.
	t.Run("IPv6", func(t *testing.T) {
		needIPv6Loopback(t)
		b := newFWBackend(t, hello)
		h := startProxy(t, fwConfig("[firewall]\n"+limit, "[::1]:0", b.addr))
		f := newFWClient(t, h, b, hello)
		f.pass("::1", 3)
		f.refuse("::1", "rate_limited")
	})
}

// TestFirewallRulesChangeOnReload checks that new connections see the
// blocklist of the current snapshot while a connection accepted before
// the reload keeps working.
func TestFirewallRulesChangeOnReload(t *testing.T) {
	needLoopbackAliases(t)
	hello := clientHelloBytes(t, &tls.Config{ServerName: fwSNI})
	b := newFWBackend(t, hello)
	open := fwConfig("", "127.0.0.1:0", b.addr)
	blocked := fwConfig("[firewall]\nblock = [\"127.0.0.2\"]\n", "127.0.0.1:0", b.addr)
	h := startProxy(t, open)
	f := newFWClient(t, h, b, hello)

	live := f.open("127.0.0.2")
	f.pass("127.0.0.2", 1)

	h.apply(blocked)
	f.refuse("127.0.0.2", "blocked_ip")
	f.pass("127.0.0.1", 1)

	// The connection from before the reload still relays both ways.
	live.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(live, "still here\n"); err != nil {
		t.Fatalf("write on the live connection: %v", err)
	}
	if line, err := readLine(live); err != nil || line != "still here" {
		t.Fatalf("live connection after the reload: %q, %v", line, err)
	}
	live.CloseWrite()
	if n, err := live.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after half-close: read %d, %v; want a clean EOF", n, err)
	}
	live.Close()

	h.apply(open)
	f.pass("127.0.0.2", 1)
}

// TestFirewallLimiterAcrossReloads checks that a reload keeps the
// limiter's counts while rate_limit is unchanged and starts afresh when
// it changes or comes back after being removed.
func TestFirewallLimiterAcrossReloads(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: fwSNI})
	b := newFWBackend(t, hello)
	cfg := func(rateLimit string, extra ...string) string {
		head := ""
		if rateLimit != "" {
			head = "[firewall]\nrate_limit = " + rateLimit + "\n"
		}
		return fwConfig(head, "127.0.0.1:0", b.addr, extra...)
	}
	const three = `{ connections = 3, window = "1m" }`
	h := startProxy(t, cfg(three))
	f := newFWClient(t, h, b, hello)

	f.pass("127.0.0.1", 3)
	lim := h.srv.Current().limiter
	if lim == nil {
		t.Fatal("no limiter")
	}

	// Unrelated changes: a route, a block entry. The spent budget stays.
	h.apply(cfg(three, routeTOML("other.test", b.addr)))
	f.refuse("127.0.0.1", "rate_limited")
	h.apply("[firewall]\nblock = [\"192.0.2.1\"]\nrate_limit = " + three + "\n" + fwConfig("", "127.0.0.1:0", b.addr))
	f.refuse("127.0.0.1", "rate_limited")
	if h.srv.Current().limiter != lim {
		t.Fatal("reloads with the same rate_limit replaced the limiter")
	}

	// A changed rate_limit is a new limiter: every source starts at zero.
	for _, tc := range []struct {
		rateLimit string
		n         int
	}{
		{`{ connections = 5, window = "1m" }`, 5},
		{`{ connections = 5, window = "2m" }`, 5},
		{`{ connections = 5, window = "2m", max_sources = 100 }`, 5},
	} {
		h.apply(cfg(tc.rateLimit))
		if h.srv.Current().limiter == lim {
			t.Fatalf("rate_limit %s kept the old limiter", tc.rateLimit)
		}
		lim = h.srv.Current().limiter
		f.pass("127.0.0.1", tc.n)
		f.refuse("127.0.0.1", "rate_limited")
	}

	// No rate_limit, no limit; restored, it starts from zero.
	h.apply(cfg(""))
	if h.srv.Current().limiter != nil {
		t.Fatal("a limiter without rate_limit")
	}
	f.pass("127.0.0.1", 8)
	h.apply(cfg(three))
	f.pass("127.0.0.1", 3)
	f.refuse("127.0.0.1", "rate_limited")
}

// TestRateLimitLatePROXYHeader: a trusted sender that forwards the PROXY
// header only with the client's first bytes (AWS NLB's default,
// header_placement = on_first_ack_with_payload) lets the client choose
// when the limiter is consulted, up to handshake_timeout after accept. A
// connection held silent for longer than the window must not hand its
// source a fresh budget.
func TestRateLimitLatePROXYHeader(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "pp.test"})
	backend := sniffBackend(t, hello)
	// window 2800ms: sub-windows of 400ms; handshake_timeout well above.
	listener := ppListenerTOML("pp", "pp.test", backend, `handshake_timeout = "30s"`)
	h := startProxy(t, "[firewall]\nrate_limit = { connections = 1, window = \"2800ms\" }\n"+listener)
	addr := h.addr("pp")
	const src = "198.51.100.77"
	header := proxyV1Header(src)
	msg := proxiedHello(src, hello)

	// The held connection: accepted now, header sent much later.
	late := heldConnection(t, h, addr)
	time.Sleep(4 * time.Second) // 10 sub-windows: past the limiter's clock-step rule

	// The source spends its budget of one...
	if got, _ := askSniff(t, "", addr, header, hello); got.Src.Addr().String() != src || got.Problem != "" {
		t.Fatalf("first connection: backend saw %+v", got)
	}
	before := h.rejected("pp", "rate_limited")
	c := dialFrom(t, "", addr)
	c.Write(msg)
	if line, err := readLine(c); err == nil {
		t.Fatalf("precondition: second connection got through (%q)", line)
	}
	testnet.WaitFor(t, "rate_limited counted", func() bool { return h.rejected("pp", "rate_limited") == before+1 })

	// ...then the held connection finally sends its header.
	late.Write(msg)
	if line, err := readLine(late); err == nil {
		t.Errorf("held connection got through within the window: %q", line)
	}
	// And the next ordinary connection from the same source.
	c = dialFrom(t, "", addr)
	c.Write(msg)
	if line, err := readLine(c); err == nil {
		t.Errorf("connection after the held one got through within the window: %q", line)
	}
}

// TestFirewallCountryLatePROXYHeaderAcrossReloads: a connection's
// firewall check runs on the snapshot it was accepted with, up to that
// listener's handshake_timeout after accept when the PROXY header comes
// late. A reload that keeps the GeoIP file shares the open database, and
// a later one that replaces the file retires it; the database must stay
// open for the longest handshake_timeout of every snapshot that shared
// it, not only of the last one, or a held connection from a blocked
// country is let through because its lookup finds the database closed.
func TestFirewallCountryLatePROXYHeaderAcrossReloads(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "pp.test"})
	backend := sniffBackend(t, hello)
	dir := t.TempDir()
	const src = "198.51.100.77"
	for _, db := range []string{"geo.mmdb", "geo2.mmdb"} {
		writeCountryDB(t, filepath.Join(dir, db), geoNet{cidr: "198.51.100.0/24", country: "KP"})
	}
	cfg := func(db, handshakeTimeout string) string {
		return fmt.Sprintf("[geoip]\ndatabase = %q\n\n[firewall]\nblock_countries = [\"KP\"]\n", filepath.Join(dir, db)) +
			ppListenerTOML("pp", "pp.test", backend, fmt.Sprintf("handshake_timeout = %q", handshakeTimeout))
	}
	h := startProxy(t, cfg("geo.mmdb", "1m"))
	addr := h.addr("pp")
	msg := proxiedHello(src, hello)

	// The held connection: accepted with a minute to send its header.
	late := heldConnection(t, h, addr)
	// The same database with a shorter handshake_timeout, then a new
	// database file (a geoipupdate run followed by SIGHUP).
	h.apply(cfg("geo.mmdb", "100ms"))
	h.apply(cfg("geo2.mmdb", "100ms"))
	// Past the second snapshot's handshake_timeout plus retire's margin,
	// when the first database used to be closed.
	time.Sleep(6 * time.Second)

	before := h.rejected("pp", "blocked_country")
	late.SetDeadline(time.Now().Add(10 * time.Second))
	late.Write(msg)
	if line, err := readLine(late); err == nil {
		t.Fatalf("held connection from a blocked country got through: %q", line)
	}
	testnet.WaitFor(t, "blocked_country counted", func() bool { return h.rejected("pp", "blocked_country") == before+1 })
}

// proxiedHello is what a load balancer sends for a client at src: a
// PROXY v1 header, the ClientHello and the bytes after it.
func proxiedHello(src string, hello []byte) []byte {
	return append(append(proxyV1Header(src), hello...), afterHello...)
}

func proxyV1Header(src string) []byte {
	return []byte(fmt.Sprintf("PROXY TCP4 %s 192.0.2.1 4242 443\r\n", src))
}

// heldConnection connects to addr, sends nothing, and returns once the
// proxy counts it active: a connection whose PROXY header is yet to come.
func heldConnection(t *testing.T, h *harness, addr string) *net.TCPConn {
	t.Helper()
	late := dialFrom(t, "", addr)
	testnet.WaitFor(t, "the held connection accepted", func() bool {
		st := h.srv.Status()
		return len(st) == 1 && st[0].Active == 1
	})
	return late
}
