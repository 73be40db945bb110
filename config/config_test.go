package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const good = `
shutdown_grace = "10s"

[firewall]
block = ["203.0.113.0/24", "198.51.100.7", "2001:db8:bad::/48"]
rate_limit = { connections = 50, window = "10s" }

[[listener]]
name = "public"
listen = ":8443"

  [[listener.route]]
  sni = "App.Example.com."
  backend = "127.0.0.1:9001"

  [[listener.route]]
  sni = "*"
  backend = "127.0.0.1:9002"
  send_proxy_protocol = true

[[listener]]
name = "internal"
listen = "127.0.0.1:9443"
max_connections = 10
`

func TestParseGood(t *testing.T) {
	c, err := Parse("p.toml", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if c.ShutdownGrace.D().Seconds() != 10 {
		t.Errorf("shutdown_grace = %v", c.ShutdownGrace.D())
	}
	r := c.Listeners[0].Routes[0]
	if r.SNI != "app.example.com" || r.Mode != ModeL4 {
		t.Errorf("route not normalised: %+v", r)
	}
	if c.Listeners[0].HandshakeTimeout.D() != DefaultHandshakeTimeout || c.Listeners[0].IdleTimeout.D() != DefaultIdleTimeout {
		t.Errorf("defaults not applied: %+v", c.Listeners[0])
	}
	if c.Line("listener[0].route[1].sni") != 17 {
		t.Errorf("line of listener[0].route[1].sni = %d, want 17", c.Line("listener[0].route[1].sni"))
	}
	if c.Line("firewall.rate_limit.window") != 6 {
		t.Errorf("line of rate_limit.window = %d", c.Line("firewall.rate_limit.window"))
	}
}

func TestHashIgnoresLayout(t *testing.T) {
	a, _ := Parse("a.toml", []byte(good))
	b, _ := Parse("b.toml", []byte("# a comment\n"+good))
	if a.Hash() != b.Hash() {
		t.Fatal("comments changed the hash")
	}
	c, _ := Parse("c.toml", []byte(strings.Replace(good, "9001", "9003", 1)))
	if a.Hash() == c.Hash() {
		t.Fatal("a changed backend kept the hash")
	}
}

func TestErrorsNameFileLineKey(t *testing.T) {
	base := "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n"
	for _, tc := range []struct {
		name, toml, want string
	}{
		{"unknown key", "bogus = 1\n", "p.toml:1: bogus: unknown key"},
		{"unknown nested key", base + "[[listener.route]]\nsni = \"a\"\nbackend = \"b:1\"\nbakend = \"x\"\n", "p.toml:7: listener.route.bakend: unknown key"},
		{"unknown key in an inline table", "[firewall]\nrate_limit = { connections = 5, window = \"1s\", burst = 2 }\n", "p.toml:2: firewall.rate_limit.burst: unknown key"},
		{"unknown key in an inline route", base + "route = [{ sni = \"a.test\", backend = \"b:1\", bakend = \"x\" }]\n", "p.toml:4: listener.route.bakend: unknown key"},
		{"wrong type", base + "max_connections = \"ten\"\n", "p.toml:4"},
		{"bad duration", base + "idle_timeout = \"forever\"\n", "p.toml:4"},
		{"syntax", "[[listener]\n", "p.toml:1"},
		{"duplicate name", base + "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:2\"\n", "p.toml:5: listener[1].name: duplicate listener name \"a\" (first at line 2)"},
		{"duplicate listen", base + "[[listener]]\nname = \"b\"\nlisten = \"127.0.0.1:01\"\n", "p.toml:6: listener[1].listen: duplicate listen address"},
		{"duplicate sni", base + "[[listener.route]]\nsni = \"x.test\"\nbackend = \"b:1\"\n[[listener.route]]\nsni = \"X.test.\"\nbackend = \"b:2\"\n", "p.toml:8: listener[0].route[1].sni: duplicate sni \"x.test\" (first at line 5)"},
		{"bad backend", base + "[[listener.route]]\nsni = \"x.test\"\nbackend = \"nohost\"\n", "p.toml:6: listener[0].route[0].backend"},
		{"backend port 0", base + "[[listener.route]]\nsni = \"x.test\"\nbackend = \"127.0.0.1:0\"\n", "p.toml:6: listener[0].route[0].backend: \"127.0.0.1:0\": port 0"},
		{"bad sni", base + "[[listener.route]]\nsni = \"a.*.test\"\nbackend = \"b:1\"\n", "p.toml:5: listener[0].route[0].sni"},
		{"two-label wildcard sni", base + "[[listener.route]]\nsni = \"*.*.test\"\nbackend = \"b:1\"\n", "p.toml:5: listener[0].route[0].sni: \"*.*.test\" is not"},
		{"backend host with a space", base + "[[listener.route]]\nsni = \"a.test\"\nbackend = \"a b:1\"\n", "p.toml:6: listener[0].route[0].backend: host \"a b\" is not an IP address or host name"},
		{"negative max", base + "max_connections = -1\n", "p.toml:4: listener[0].max_connections: must not be negative"},
		{"negative timeout", base + "idle_timeout = \"-1s\"\n", "p.toml:4: listener[0].idle_timeout: must not be negative"},
		{"bad cidr", "[firewall]\nblock = [\n  \"10.0.0.0/8\",\n  \"10.0.0.0/33\",\n]\n", "p.toml:4: firewall.block[1]"},
		{"zoned block entry", "[firewall]\nblock = [\"10.0.0.0/8\", \"fe80::1%eth0\"]\n", "p.toml:2: firewall.block[1]: \"fe80::1%eth0\" has a zone"},
		{"host bits", "[firewall]\nblock = [\"10.0.0.1/8\"]\n", "p.toml:2: firewall.block[0]: \"10.0.0.1/8\" has host bits set (did you mean \"10.0.0.0/8\"?)"},
		{"countries without geoip", "[firewall]\nblock_countries = [\"KP\"]\n", "p.toml:2: firewall.block_countries: needs [geoip] database"},
		{"bad country", "[geoip]\ndatabase = \"x.mmdb\"\n[firewall]\nblock_countries = [\"KPX\"]\n", "p.toml:4: firewall.block_countries[0]"},
		{"admin certificate without listen", "[admin]\ntls_cert = \"c\"\ntls_key = \"k\"\n", "p.toml:2: admin.tls_cert: tls_cert and tls_key need admin.listen"},
		{"plaintext admin", "[admin]\nlisten = \"127.0.0.1:7443\"\n", "p.toml:2: admin.listen: a TCP admin listener requires tls_cert and tls_key"},
		{"l7 without cert", base + "[[listener.route]]\nsni = \"x.test\"\nbackend = \"b:1\"\nmode = \"l7\"\n", "listener[0].route[0].tls_cert: required"},
		{"l4 with l7 key", base + "[[listener.route]]\nsni = \"x.test\"\nbackend = \"b:1\"\nbackend_protocol = \"h2\"\n", "p.toml:7: listener[0].route[0].backend_protocol: only applies"},
		{"proxy protocol without trusted", base + "proxy_protocol = true\n", "listener[0].proxy_protocol_trusted"},
		{"server name on a plaintext backend", base + "[[listener.route]]\nsni = \"x.test\"\nbackend = \"b:1\"\nmode = \"l7\"\ntls_cert = \"c\"\ntls_key = \"k\"\nbackend_server_name = \"b.internal\"\n", "p.toml:10: listener[0].route[0].backend_server_name: only applies to TLS backends"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("p.toml", []byte(tc.toml))
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q\ndoes not contain %q", err, tc.want)
			}
			var ce *Error
			if !errors.As(err, &ce) {
				t.Fatalf("error %T is not a *config.Error", err)
			}
		})
	}
}

func TestAllErrorsReported(t *testing.T) {
	_, err := Parse("p.toml", []byte("[[listener]]\nname = \"\"\nlisten = \"x\"\nmax_connections = -3\n"))
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{"listener[0].name", "listener[0].listen", "listener[0].max_connections"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("missing %s in %v", want, err)
		}
	}
}

func TestKeyErrorWithoutLine(t *testing.T) {
	c, _ := Parse("p.toml", []byte(good))
	err := c.KeyError("listener[0].route[9].tls_cert", errors.New("boom"))
	if err.Error() != "p.toml: listener[0].route[9].tls_cert: boom" {
		t.Fatal(err)
	}
}

func TestCloneIsDeep(t *testing.T) {
	c, _ := Parse("p.toml", []byte(good))
	h := c.Hash()
	n := c.Clone()
	n.Listeners[0].Routes[0].Backend = "changed:1"
	n.Firewall.Block[0] = "10.0.0.0/8"
	n.Firewall.RateLimit.Connections = 1
	n.Listeners = append(n.Listeners, Listener{Name: "x"})
	if c.Hash() != h {
		t.Fatal("mutating the clone changed the original")
	}
}

func TestResolve(t *testing.T) {
	c := &Config{Path: "/etc/portcullis/portcullis.toml"}
	if got := c.Resolve("certs/a.pem"); got != "/etc/portcullis/certs/a.pem" {
		t.Fatal(got)
	}
	if got := c.Resolve("/abs.pem"); got != "/abs.pem" {
		t.Fatal(got)
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.toml"))
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("err = %v", err)
	}
}

// TestLoadUTF8BOM: Windows editors (Notepad, PowerShell 5's
// `Set-Content -Encoding UTF8`) start a UTF-8 file with a byte order
// mark, which TOML allows (toml-test valid/utf8-bom-01); go-toml rejects
// it as an invisible "invalid character at start of key". Such a file
// must load, and errors in it must keep their line numbers.
func TestLoadUTF8BOM(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p.toml")
	if err := os.WriteFile(path, []byte("\ufeff"+good), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if c.Listeners[0].Name != "public" || c.ShutdownGrace.D().Seconds() != 10 {
		t.Fatalf("decoded %+v", c)
	}
	if err := os.WriteFile(path, []byte("\ufeff[[listener]]\nname = \"a\"\nlisten = \"nohost\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(path); err == nil || !strings.Contains(err.Error(), path+":3: listener[0].listen: ") {
		t.Fatalf("error %v, want %s:3: listener[0].listen", err, path)
	}
}

// TestUnknownKeyDoesNotHideValidation: a misspelt key is reported
// together with the file's invalid values, not on its own first (the
// README: "Validation errors are all printed at once").
func TestUnknownKeyDoesNotHideValidation(t *testing.T) {
	doc := "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nmax_conections = 10\nmax_connections = -1\n" +
		"[[listener.route]]\nsni = \"a..test\"\nbackend = \"b:1\"\n"
	_, err := Parse("p.toml", []byte(doc))
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{
		"p.toml:4: listener.max_conections: unknown key",
		"p.toml:5: listener[0].max_connections: must not be negative",
		"p.toml:7: listener[0].route[0].sni: ",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}
