package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/portcullis/portcullis/testpki"
)

// errLine is the shape of every problem `check` prints: file:line: key: message.
var errLine = regexp.MustCompile(`^(.+\.toml):(\d+): ([a-z_0-9\[\]\.]+): (.+)$`)

func TestCheck(t *testing.T) {
	dir := t.TempDir()
	leaf := testpki.NewCA(t).Leaf(t, "secure.test")
	for _, tc := range []struct {
		name    string
		content string
		code    int
		stdout  []string // substrings of stdout
		errs    []string // "line: key" of every problem, in order
	}{
		{
			name: "good",
			content: `
[[listener]]
name = "public"
listen = "127.0.0.1:8443"

  [[listener.route]]
  sni = "app.test"
  backend = "127.0.0.1:9001"
  send_proxy_protocol = true

  [[listener.route]]
  sni = "secure.test"
  mode = "l7"
  tls_cert = "` + leaf.CertFile + `"
  tls_key = "` + leaf.KeyFile + `"
  backend = "127.0.0.1:9002"

[[listener]]
name = "empty"
listen = "127.0.0.1:8444"
`,
			code: 0,
			stdout: []string{
				"LISTENER  LISTEN",
				"public    127.0.0.1:8443  app.test     l4    127.0.0.1:9001  send-proxy-v2",
				"public    127.0.0.1:8443  secure.test  l7    127.0.0.1:9002  backend=h2c",
				"empty     127.0.0.1:8444  -",
				"(no routes)",
				"config OK: 2 listener(s), hash ",
			},
		},
		{
			name: "invalid values",
			content: `shutdown_grace = "-1s"

[firewall]
block = ["203.0.113.0/33", "198.51.100.7"]

[[listener]]
name = "public"
listen = "127.0.0.1:8443"
max_connections = -1

  [[listener.route]]
  sni = "app.test"
  backend = "127.0.0.1:9001"

  [[listener.route]]
  sni = "app.test"
  backend = "127.0.0.1:9002"
`,
			code: 1,
			errs: []string{
				"1: shutdown_grace",
				"4: firewall.block[0]",
				"9: listener[0].max_connections",
				"16: listener[0].route[1].sni",
			},
		},
		{
			name: "unknown keys",
			content: `[[listener]]
name = "public"
listen = "127.0.0.1:8443"
bogus = 1

  [[listener.route]]
  sni = "app.test"
  backend = "127.0.0.1:9001"
  colour = "red"
`,
			code: 1,
			errs: []string{"4: listener.bogus", "9: listener.route.colour"},
		},
		{
			name: "l7 certificate missing",
			content: `[[listener]]
name = "public"
listen = "127.0.0.1:8443"

  [[listener.route]]
  sni = "app.test"
  mode = "l7"
  tls_cert = "missing.pem"
  tls_key = "missing-key.pem"
  backend = "127.0.0.1:9001"
`,
			code: 1,
			errs: []string{"8: listener[0].route[0].tls_cert"},
		},
		{
			// A key left out has no line of its own: the problem is
			// pinned to the table that lacks it.
			name: "required keys missing",
			content: `[[listener]]
listen = "127.0.0.1:8443"

  [[listener.route]]
  sni = "app.test"
  mode = "l7"
  tls_cert = "cert.pem"
  backend = "127.0.0.1:9001"

[firewall]
rate_limit = { window = "10s" }
`,
			code: 1,
			errs: []string{
				"11: firewall.rate_limit.connections",
				"1: listener[0].name",
				"4: listener[0].route[0].tls_key",
			},
		},
		{
			// serve binds the listeners, then /metrics, then the admin
			// API: each of these would stop it with "address already
			// in use".
			name: "addresses that cannot all be bound",
			content: `[metrics]
listen = "127.0.0.1:8443"

[admin]
listen = ":8444"
tls_cert = "` + leaf.CertFile + `"
tls_key = "` + leaf.KeyFile + `"

[[listener]]
name = "public"
listen = "127.0.0.1:8443"

[[listener]]
name = "all"
listen = ":8444"

[[listener]]
name = "local"
listen = "127.0.0.1:8444"
`,
			code: 1,
			errs: []string{
				"19: listener[2].listen",
				"2: metrics.listen",
				"5: admin.listen",
			},
		},
		{
			// serve loads these at start and refuses to run without
			// them; check must not pass them.
			name: "admin certificate missing",
			content: `[admin]
listen = "127.0.0.1:9443"
tls_cert = "missing.pem"
tls_key = "missing-key.pem"

[[listener]]
name = "public"
listen = "127.0.0.1:8443"
`,
			code: 1,
			errs: []string{"3: admin.tls_cert"},
		},
		{
			name: "admin client CA without certificates",
			content: `[admin]
listen = "127.0.0.1:9443"
tls_cert = "` + leaf.CertFile + `"
tls_key = "` + leaf.KeyFile + `"
client_ca = "` + leaf.KeyFile + `"

[[listener]]
name = "public"
listen = "127.0.0.1:8443"
`,
			code: 1,
			errs: []string{"5: admin.client_ca"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".toml")
			writeFile(t, path, tc.content)
			code, stdout, stderr := runCmd("check", "-config", path)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout:\n%s\nstderr:\n%s", code, tc.code, stdout, stderr)
			}
			for _, s := range tc.stdout {
				if !strings.Contains(stdout, s) {
					t.Errorf("stdout lacks %q:\n%s", s, stdout)
				}
			}
			if tc.code == 0 {
				return
			}
			if stdout != "" {
				t.Errorf("a failed check printed a routing table:\n%s", stdout)
			}
			lines := strings.Split(strings.TrimSuffix(stderr, "\n"), "\n")
			var got []string
			for _, l := range lines {
				m := errLine.FindStringSubmatch(l)
				if m == nil || m[1] != path {
					t.Errorf("stderr line %q is not %s:LINE: KEY: MESSAGE", l, path)
					continue
				}
				got = append(got, m[2]+": "+m[3])
			}
			if strings.Join(got, "\n") != strings.Join(tc.errs, "\n") {
				t.Errorf("problems:\n%s\nwant:\n%s\nstderr:\n%s", strings.Join(got, "\n"), strings.Join(tc.errs, "\n"), stderr)
			}
		})
	}

	t.Run("missing file", func(t *testing.T) {
		code, _, stderr := runCmd("check", "-config", filepath.Join(dir, "nope.toml"))
		if code != 1 || !strings.Contains(stderr, "no such file") {
			t.Fatalf("exit %d, stderr %q", code, stderr)
		}
	})
	t.Run("bad flag", func(t *testing.T) {
		if code, _, _ := runCmd("check", "-nope"); code != 2 {
			t.Fatalf("exit %d, want 2", code)
		}
	})
}

// TestCheckSpecialFiles: a certificate, key, CA or GeoIP database that
// is a FIFO without a writer made `check` (and the reload it mirrors)
// block in the open for ever. It is a problem like any other, reported
// at once as file:line: key: naming the path, and a config whose files
// are symlinks to regular files (a Kubernetes secret volume) still
// passes.
func TestCheckSpecialFiles(t *testing.T) {
	dir := shortTempDir(t)
	leaf := testpki.NewCA(t).Leaf(t, "secure.test")
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	// A check still blocked in the open when the test gives up gets a
	// writer (and then EOF), so its goroutine ends with the test.
	t.Cleanup(func() {
		if w, err := os.OpenFile(fifo, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
			w.Close()
		}
	})
	linkCert, linkKey := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if err := os.Symlink(leaf.CertFile, linkCert); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(leaf.KeyFile, linkKey); err != nil {
		t.Fatal(err)
	}
	route := func(cert, key, extra string) string {
		return fmt.Sprintf(`[[listener]]
name = "public"
listen = "127.0.0.1:8443"

  [[listener.route]]
  sni = "secure.test"
  mode = "l7"
  tls_cert = %q
  tls_key = %q
  backend = "127.0.0.1:9001"
%s`, cert, key, extra)
	}
	admin := func(cert, key, ca string) string {
		return fmt.Sprintf(`[admin]
listen = "127.0.0.1:9443"
tls_cert = %q
tls_key = %q
client_ca = %q

`, cert, key, ca) + route(leaf.CertFile, leaf.KeyFile, "")
	}
	for _, tc := range []struct {
		name, content, want string // want: "line: key: message" prefix; "" for a pass
	}{
		{"route tls_cert", route(fifo, leaf.KeyFile, ""), "8: listener[0].route[0].tls_cert: " + fifo + ": not a regular file (named pipe)"},
		{"route tls_key", route(leaf.CertFile, fifo, ""), "9: listener[0].route[0].tls_key: " + fifo + ": not a regular file (named pipe)"},
		{"route backend_ca", route(leaf.CertFile, leaf.KeyFile, "  backend_protocol = \"h2\"\n  backend_ca = \""+fifo+"\"\n"), "12: listener[0].route[0].backend_ca: " + fifo + ": not a regular file (named pipe)"},
		{"route tls_cert directory", route(dir, leaf.KeyFile, ""), "8: listener[0].route[0].tls_cert: " + dir + ": not a regular file (directory)"},
		{"geoip database", "[geoip]\ndatabase = \"" + fifo + "\"\n\n" + route(leaf.CertFile, leaf.KeyFile, ""), "2: geoip.database: firewall: geoip: " + fifo + ": not a regular file (named pipe)"},
		{"admin tls_cert", admin(fifo, leaf.KeyFile, leaf.CertFile), "3: admin.tls_cert: " + fifo + ": not a regular file (named pipe)"},
		{"admin tls_key", admin(leaf.CertFile, fifo, leaf.CertFile), "4: admin.tls_key: " + fifo + ": not a regular file (named pipe)"},
		{"admin client_ca", admin(leaf.CertFile, leaf.KeyFile, fifo), "5: admin.client_ca: " + fifo + ": not a regular file (named pipe)"},
		{"symlinks", admin(linkCert, linkKey, linkCert) + "\n", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".toml")
			writeFile(t, path, tc.content)
			type result struct {
				code           int
				stdout, stderr string
			}
			done := make(chan result, 1)
			go func() {
				var r result
				r.code, r.stdout, r.stderr = runCmd("check", "-config", path)
				done <- r
			}()
			var r result
			select {
			case r = <-done:
			case <-time.After(10 * time.Second):
				t.Fatalf("check still blocked after 10s")
			}
			if tc.want == "" {
				if r.code != 0 {
					t.Fatalf("exit %d, want 0; stderr:\n%s", r.code, r.stderr)
				}
				return
			}
			if r.code != 1 || !strings.HasPrefix(r.stderr, path+":"+tc.want) || strings.Count(r.stderr, "\n") != 1 {
				t.Fatalf("exit %d, stderr %q; want 1 and one line %q", r.code, r.stderr, path+":"+tc.want)
			}
		})
	}
}

// TestCheckWarnsOfUnusableCertificate: a certificate clients will refuse
// (here, expired) does not fail check, as serve takes it too, but check
// says so on stderr, naming the route; a usable one draws no warning.
func TestCheckWarnsOfUnusableCertificate(t *testing.T) {
	ca := testpki.NewCA(t)
	expired := ca.LeafValid(t, time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour), "secure.test")
	for _, tc := range []struct {
		name string
		leaf testpki.Leaf
		warn string
	}{
		{"expired", expired, "tls_cert has expired"},
		{"valid", ca.Leaf(t, "secure.test"), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "portcullis.toml")
			writeFile(t, path, fmt.Sprintf(`
[[listener]]
name = "public"
listen = "127.0.0.1:8443"

  [[listener.route]]
  sni = "secure.test"
  mode = "l7"
  tls_cert = %q
  tls_key = %q
  backend = "127.0.0.1:9002"
`, tc.leaf.CertFile, tc.leaf.KeyFile))
			code, stdout, stderr := runCmd("check", "-config", path)
			if code != 0 || !strings.Contains(stdout, "config OK") {
				t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
			}
			if tc.warn == "" {
				if stderr != "" {
					t.Fatalf("stderr for a usable certificate:\n%s", stderr)
				}
				return
			}
			for _, want := range []string{"level=WARN", tc.warn, "listener=public", "route=secure.test", "tls_cert=" + tc.leaf.CertFile} {
				if !strings.Contains(stderr, want) {
					t.Errorf("stderr lacks %q:\n%s", want, stderr)
				}
			}
		})
	}
}
