package main

import (
	"crypto/tls"
	"database/sql"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	_ "github.com/mattn/go-sqlite3"

	"github.com/portcullis/portcullis/testnet"
	"github.com/portcullis/portcullis/testpki"
)

// TestCtl drives `portcullis ctl` in-process against a daemon subprocess,
// through every command, checking the output and that each change
// reaches the data path.
func TestCtl(t *testing.T) {
	app, other := testnet.NamedBackend(t, "app"), testnet.NamedBackend(t, "other")
	env := newEnv(t)
	proxyAddr := freeAddr(t)
	env.writeConfig(t, "5s", l4Listener(proxyAddr, "app.test", app))
	d := env.start(t)
	admin := "unix:" + env.sock

	ctl := func(t *testing.T, wantCode int, args ...string) (stdout, stderr string) {
		t.Helper()
		code, stdout, stderr := runCmd(append([]string{"ctl", "-admin", admin}, args...)...)
		if code != wantCode {
			t.Fatalf("ctl %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, wantCode, stdout, stderr)
		}
		return stdout, stderr
	}
	contains := func(t *testing.T, out string, want ...string) {
		t.Helper()
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("output lacks %q:\n%s", w, out)
			}
		}
	}
	lacks := func(t *testing.T, out string, unwanted string) {
		t.Helper()
		if strings.Contains(out, unwanted) {
			t.Errorf("output has %q:\n%s", unwanted, out)
		}
	}
	ask := func(t *testing.T, sni string) string {
		t.Helper()
		got, err := testnet.Ask(proxyAddr, testnet.ClientHello(t, &tls.Config{ServerName: sni}))
		if err != nil {
			return "error: " + err.Error()
		}
		return got
	}
	jsonOf := func(t *testing.T, out string) map[string]any {
		t.Helper()
		var v map[string]any
		if err := json.Unmarshal([]byte(out), &v); err != nil {
			t.Fatalf("not JSON (%v):\n%s", err, out)
		}
		return v
	}

	t.Run("status", func(t *testing.T) {
		out, _ := ctl(t, 0, "status")
		contains(t, out, "version:     dev", env.config, "last reload: success (startup)",
			"LISTENER", "public", proxyAddr, "unlimited")
	})
	t.Run("status json", func(t *testing.T) {
		out, _ := ctl(t, 0, "-o", "json", "status")
		v := jsonOf(t, out)
		if v["version"] != "dev" {
			t.Errorf("version = %v", v["version"])
		}
		ls, _ := v["listeners"].([]any)
		if len(ls) != 1 || ls[0].(map[string]any)["name"] != "public" {
			t.Errorf("listeners = %v", v["listeners"])
		}
	})
	t.Run("health", func(t *testing.T) {
		out, _ := ctl(t, 0, "health")
		contains(t, out, "SERVING")
	})
	t.Run("routes", func(t *testing.T) {
		out, _ := ctl(t, 0, "routes")
		contains(t, out, "LISTENER", "app.test", app, "file")
		out, _ = ctl(t, 0, "-o", "json", "routes", "public")
		routes, _ := jsonOf(t, out)["routes"].([]any)
		if len(routes) != 1 {
			t.Fatalf("routes = %v", routes)
		}
		if r := routes[0].(map[string]any); r["sni"] != "app.test" || r["backend"] != app || r["origin"] != "file" {
			t.Errorf("route = %v", r)
		}
		_, stderr := ctl(t, 1, "routes", "nosuch")
		contains(t, stderr, "NotFound")
	})
	t.Run("route put and rm", func(t *testing.T) {
		out, _ := ctl(t, 0, "route", "put", "-listener", "public", "-sni", "new.test", "-backend", other)
		contains(t, out, "new.test", other, "override")
		if got := ask(t, "new.test"); got != "other" {
			t.Fatalf("new.test routed to %q after route put", got)
		}
		out, _ = ctl(t, 0, "routes")
		contains(t, out, "new.test")
		// Overriding a file route: the origin says so.
		out, _ = ctl(t, 0, "route", "put", "-listener", "public", "-sni", "app.test", "-backend", other)
		contains(t, out, "file, overridden")
		if got := ask(t, "app.test"); got != "other" {
			t.Fatalf("app.test routed to %q after overriding it", got)
		}

		out, _ = ctl(t, 0, "route", "rm", "public", "new.test")
		contains(t, out, "route deleted")
		out, _ = ctl(t, 0, "routes")
		lacks(t, out, "new.test")
		if got := ask(t, "new.test"); !strings.HasPrefix(got, "error") {
			t.Fatalf("new.test still routed (to %q) after route rm", got)
		}
		_, stderr := ctl(t, 1, "route", "rm", "public", "nosuch.test")
		contains(t, stderr, "portcullis ctl: NotFound: ")
		_, stderr = ctl(t, 1, "route", "put", "-listener", "public", "-sni", "bad..name", "-backend", other)
		contains(t, stderr, "portcullis ctl: InvalidArgument: ")
		_, stderr = ctl(t, 2, "route", "put", "-listener", "public")
		contains(t, stderr, "needs -listener, -sni and -backend")
		// A bool flag takes no separate value: "-send-proxy false" set it
		// and dropped "false", and every flag after it went unread. The
		// command is refused rather than run as something else.
		_, stderr = ctl(t, 2, "route", "put", "-listener", "public", "-sni", "proxied.test", "-backend", other, "-send-proxy", "false")
		contains(t, stderr, `unexpected argument "false"`)
		out, _ = ctl(t, 0, "routes")
		lacks(t, out, "proxied.test")
	})
	t.Run("firewall", func(t *testing.T) {
		out, _ := ctl(t, 0, "firewall", "add", "192.0.2.7")
		contains(t, out, "firewall rule added")
		out, _ = ctl(t, 0, "firewall")
		contains(t, out, "BLOCK", "192.0.2.7/32", "override")
		out, _ = ctl(t, 0, "-o", "json", "firewall")
		jsonOf(t, out)
		out, _ = ctl(t, 0, "firewall", "rm", "192.0.2.7")
		contains(t, out, "firewall rule removed")
		out, _ = ctl(t, 0, "firewall")
		lacks(t, out, "192.0.2.7")
		_, stderr := ctl(t, 1, "firewall", "add", "not-an-address")
		contains(t, stderr, "portcullis ctl: InvalidArgument: ")
		_, stderr = ctl(t, 1, "firewall", "rm", "192.0.2.8")
		contains(t, stderr, "portcullis ctl: NotFound: ")
	})
	t.Run("maxconns", func(t *testing.T) {
		out, _ := ctl(t, 0, "maxconns", "public", "5")
		contains(t, out, "max_connections set")
		out, _ = ctl(t, 0, "status")
		contains(t, out, "5 (file, overridden)")
		_, stderr := ctl(t, 1, "maxconns", "nosuch", "5")
		contains(t, stderr, "portcullis ctl: NotFound: ")
		_, stderr = ctl(t, 2, "maxconns", "public", "many")
		contains(t, stderr, "N must be a number")
	})
	t.Run("overrides", func(t *testing.T) {
		ctl(t, 0, "firewall", "add", "198.51.100.0/24")
		out, _ := ctl(t, 0, "overrides")
		contains(t, out, "KIND", "route", "public app.test", "firewall", "198.51.100.0/24", "listener", "max_connections=5")
		out, _ = ctl(t, 0, "-o", "json", "overrides")
		jsonOf(t, out)

		out, _ = ctl(t, 0, "overrides", "clear", "route", "public", "app.test")
		contains(t, out, "override cleared")
		if got := ask(t, "app.test"); got != "app" {
			t.Fatalf("app.test routed to %q after clearing its override, want the file's backend", got)
		}
		out, _ = ctl(t, 0, "overrides", "clear", "listener", "public")
		contains(t, out, "override cleared")
		_, stderr := ctl(t, 1, "overrides", "clear", "listener", "public")
		contains(t, stderr, "portcullis ctl: NotFound: ")
		out, _ = ctl(t, 0, "overrides")
		lacks(t, out, "max_connections=5")
		contains(t, out, "198.51.100.0/24")

		// The destructive command runs only as written: an operator
		// asking for help is not taken to mean "clear everything".
		_, stderr = ctl(t, 2, "overrides", "clear-all", "-h")
		contains(t, stderr, "usage: overrides clear")
		out, _ = ctl(t, 0, "overrides")
		contains(t, out, "198.51.100.0/24")

		out, _ = ctl(t, 0, "overrides", "clear-all")
		contains(t, out, "1 override(s) cleared")
		out, _ = ctl(t, 0, "-o", "json", "overrides")
		if ov, ok := jsonOf(t, out)["overrides"].([]any); ok && len(ov) != 0 {
			t.Errorf("overrides left after clear-all: %v", ov)
		}
		_, stderr = ctl(t, 2, "overrides", "clear", "everything")
		contains(t, stderr, "usage: overrides clear")
	})
	t.Run("reload", func(t *testing.T) {
		out, _ := ctl(t, 0, "reload")
		contains(t, out, "reloaded: config hash ")
		out, _ = ctl(t, 0, "status")
		contains(t, out, "last reload: success (admin")
	})
	t.Run("snapshot", func(t *testing.T) {
		ctl(t, 0, "firewall", "add", "203.0.113.9")
		file := filepath.Join(t.TempDir(), "backup.db")
		out, _ := ctl(t, 0, "snapshot", file)
		contains(t, out, "snapshot written to "+file)
		db := openIntact(t, file)
		var tables int
		if err := db.QueryRow("SELECT count(*) FROM sqlite_master WHERE type = 'table'").Scan(&tables); err != nil || tables == 0 {
			t.Fatalf("snapshot has %d tables, %v", tables, err)
		}
		_, stderr := ctl(t, 2, "snapshot")
		contains(t, stderr, "usage: snapshot FILE")
	})
	t.Run("usage errors", func(t *testing.T) {
		_, stderr := ctl(t, 2, "bogus")
		contains(t, stderr, `unknown command "bogus"`)
		ctl(t, 2)
		ctl(t, 2, "-o", "yaml", "status")
		_, stderr = ctl(t, 2, "firewall", "zap", "192.0.2.1")
		contains(t, stderr, `unknown firewall command "zap"`)
		// A flag after the command is an argument: it must not be
		// ignored, printing a table where JSON was asked for.
		for _, args := range [][]string{{"status", "-o", "json"}, {"health", "-o", "json"}, {"routes", "-o", "json"}, {"routes", "public", "-o", "json"}, {"reload", "-o", "json"}} {
			out, stderr := ctl(t, 2, args...)
			contains(t, stderr, args[0]+`: unexpected argument "-o": flags go before the command`)
			if out != "" {
				t.Errorf("ctl %s printed %q", strings.Join(args, " "), out)
			}
		}
		_, stderr = ctl(t, 2, "routes", "public", "extra")
		contains(t, stderr, `routes: unexpected argument "extra"`)
	})
	t.Run("daemon unreachable", func(t *testing.T) {
		code, _, stderr := runCmd("ctl", "-admin", "unix:"+filepath.Join(t.TempDir(), "none.sock"), "-timeout", "2s", "status")
		if code != 1 || !strings.Contains(stderr, "portcullis ctl: Unavailable: ") {
			t.Fatalf("exit %d, stderr %q; want 1 and Unavailable", code, stderr)
		}
	})

	d.stop(t)
}

// TestCtlJSONEveryCommand: the README says "Add `-o json` for
// machine-readable output". Every command's stdout must then be JSON.
func TestCtlJSONEveryCommand(t *testing.T) {
	app := testnet.NamedBackend(t, "app")
	env := newEnv(t)
	env.writeConfig(t, "5s", l4Listener(freeAddr(t), "app.test", app))
	env.start(t)
	admin := "unix:" + env.sock
	for _, args := range [][]string{
		{"status"}, {"health"}, {"routes"}, {"firewall"}, {"overrides"}, {"reload"},
		{"firewall", "add", "198.51.100.7"},
		{"snapshot", filepath.Join(env.dir, "backup.db")},
	} {
		code, out, stderr := runCmd(append([]string{"ctl", "-admin", admin, "-o", "json"}, args...)...)
		if code != 0 {
			t.Errorf("ctl -o json %s: exit %d, stderr %s", strings.Join(args, " "), code, stderr)
			continue
		}
		if !json.Valid([]byte(out)) {
			t.Errorf("ctl -o json %s: stdout is not JSON:\n%s", strings.Join(args, " "), out)
		}
	}
}

// TestCtlSnapshotRestoreHint follows what `ctl snapshot` prints: a
// snapshot taken from another directory than the config's (the README
// runs ctl from the repository root, the config is in examples/), then
// the daemon restarted with the printed `[state] database = …` line,
// must come back with the overrides the snapshot holds. A relative path
// there is resolved against the config's directory, not ctl's.
func TestCtlSnapshotRestoreHint(t *testing.T) {
	app := testnet.NamedBackend(t, "app")
	env := newEnv(t)
	body := l4Listener(freeAddr(t), "app.test", app)
	env.writeConfig(t, "5s", body)
	d := env.start(t)
	admin := "unix:" + env.sock
	if code, _, stderr := runCmd("ctl", "-admin", admin, "firewall", "add", "203.0.113.9"); code != 0 {
		t.Fatalf("firewall add: exit %d\n%s", code, stderr)
	}
	t.Chdir(t.TempDir())
	code, out, stderr := runCmd("ctl", "-admin", admin, "snapshot", "backup.db")
	if code != 0 {
		t.Fatalf("snapshot: exit %d\n%s", code, stderr)
	}
	_, hint, ok := strings.Cut(strings.TrimSpace(out), "restore by starting with ")
	database, ok2 := strings.CutPrefix(hint, "[state] database = ")
	if !ok || !ok2 {
		t.Fatalf("no restore hint in %q", out)
	}
	d.stop(t)

	writeFile(t, env.config, strings.Replace(env.configText("5s", body),
		`database = "portcullis.db"`, "database = "+database, 1))
	env.start(t)
	code, out, stderr = runCmd("ctl", "-admin", admin, "firewall")
	if code != 0 {
		t.Fatalf("firewall: exit %d\n%s", code, stderr)
	}
	if !strings.Contains(out, "203.0.113.9") {
		t.Errorf("restarted with %s, the snapshot's override is gone:\n%s", hint, out)
	}
}

// TestCtlSnapshotStagingNotFollowed: `ctl snapshot FILE` stages the
// copy under a name of its own, not a fixed FILE.partial that anyone
// who can write to FILE's directory (/tmp, say) can plant beforehand: a
// symlink there made ctl truncate and overwrite the file it points to
// with the database, and a file there received the database with the
// planter's mode and ownership.
func TestCtlSnapshotStagingNotFollowed(t *testing.T) {
	app := testnet.NamedBackend(t, "app")
	env := newEnv(t)
	env.writeConfig(t, "5s", l4Listener(freeAddr(t), "app.test", app))
	env.start(t)
	dir := t.TempDir()
	victim := filepath.Join(t.TempDir(), "victim")
	writeFile(t, victim, "precious\n")
	file := filepath.Join(dir, "backup.db")
	if err := os.Symlink(victim, file+".partial"); err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := runCmd("ctl", "-admin", "unix:"+env.sock, "snapshot", file); code != 0 {
		t.Fatalf("snapshot: exit %d\n%s", code, stderr)
	}
	if b, err := os.ReadFile(victim); err != nil || string(b) != "precious\n" {
		t.Errorf("the symlink's target was written: %.20q (%d bytes), %v", b, len(b), err)
	}
	fi, err := os.Lstat(file)
	if err != nil {
		t.Fatal(err)
	}
	if !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o600 {
		t.Errorf("%s: mode %v, want a regular file with mode 0600", file, fi.Mode())
	}
	openIntact(t, file)
}

// openIntact opens the SQLite database at path read-only, closed when
// the test ends, and fails the test unless it passes integrity_check.
func openIntact(t *testing.T, path string) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite3", "file:"+path+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	var check string
	if err := db.QueryRow("PRAGMA integrity_check").Scan(&check); err != nil || check != "ok" {
		t.Fatalf("%s: integrity_check: %q, %v", path, check, err)
	}
	return db
}

// TestCtlNamesMissingClientCertificate: an admin server with client_ca
// ends the TLS connection of a client without a certificate, and what
// the client sees names no certificate, so ctl says what is missing.
func TestCtlNamesMissingClientCertificate(t *testing.T) {
	adminAddr, serverCA, clientCA := startMutualTLSAdmin(t)
	ops := clientCA.Leaf(t, "ops.example")

	const hint = "refuses clients without -tls-cert and -tls-key"
	code, _, stderr := runCmd("ctl", "-admin", adminAddr, "-tls-ca", serverCA.CertFile, "status")
	if code != 1 || !strings.Contains(stderr, hint) {
		t.Fatalf("ctl without a client certificate: exit %d, stderr:\n%s", code, stderr)
	}
	code, stdout, stderr := runCmd("ctl", "-admin", adminAddr, "-tls-ca", serverCA.CertFile, "-tls-cert", ops.CertFile, "-tls-key", ops.KeyFile, "status")
	if code != 0 || strings.Contains(stderr, hint) {
		t.Fatalf("ctl with a client certificate: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
}

// TestCtlClientCertificateHintOnlyAfterTLS: the hint about client_ca is
// for a server that ended the handshake for want of a client
// certificate. A refused dial or a server certificate that does not
// verify never reached that point, and the hint would send the operator
// after client certificates instead of the address or -tls-ca.
func TestCtlClientCertificateHintOnlyAfterTLS(t *testing.T) {
	adminAddr, serverCA, _ := startMutualTLSAdmin(t)

	const hint = "refuses clients without -tls-cert and -tls-key"
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"server certificate not verified", []string{"-admin", adminAddr}, "certificate signed by unknown authority"},
		{"nothing listening", []string{"-admin", freeAddr(t), "-tls-ca", serverCA.CertFile}, "connection refused"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, stderr := runCmd(append(append([]string{"ctl"}, tc.args...), "status")...)
			if code != 1 || !strings.Contains(stderr, tc.want) || strings.Contains(stderr, hint) {
				t.Fatalf("exit %d, want 1 with %q and without the client_ca hint; stderr:\n%s", code, tc.want, stderr)
			}
		})
	}
}

// TestCtlFlagMistakes: an admin socket named without "unix:", a client
// certificate without its key, an unknown -o and a snapshot into a
// directory are refused with what is wrong, not with what grpc, crypto/tls
// or rename(2) make of them ("produced zero addresses", "open : no such
// file or directory", "file exists") or with the usage alone.
func TestCtlFlagMistakes(t *testing.T) {
	env := newEnv(t)
	env.writeConfig(t, "5s", l4Listener(freeAddr(t), "app.test", testnet.NamedBackend(t, "app")))
	env.start(t)
	ca := testpki.NewCA(t)
	ops := ca.Leaf(t, "ops.example")

	for _, tc := range []struct {
		name     string
		args     []string
		wantCode int
		want     string
	}{
		{"socket without unix:", []string{"-admin", env.sock}, 1, "is not unix:PATH or HOST:PORT"},
		{"certificate without key", []string{"-admin", freeAddr(t), "-tls-ca", ca.CertFile, "-tls-cert", ops.CertFile}, 2, "-tls-cert and -tls-key go together"},
		{"key without certificate", []string{"-admin", freeAddr(t), "-tls-ca", ca.CertFile, "-tls-key", ops.KeyFile}, 2, "-tls-cert and -tls-key go together"},
		{"unknown output format", []string{"-admin", "unix:" + env.sock, "-o", "yaml"}, 2, `-o "yaml": want table or json`},
		{"snapshot to an empty name", []string{"-admin", "unix:" + env.sock, "snapshot", ""}, 2, "usage: snapshot FILE"},
		{"snapshot into a directory", []string{"-admin", "unix:" + env.sock, "snapshot", env.dir}, 1, env.dir + " is a directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := tc.args
			if !slices.Contains(args, "snapshot") {
				args = append(args, "status")
			}
			code, _, stderr := runCmd(append([]string{"ctl"}, args...)...)
			if code != tc.wantCode || !strings.Contains(stderr, tc.want) {
				t.Fatalf("exit %d, want %d with %q; stderr:\n%s", code, tc.wantCode, tc.want, stderr)
			}
		})
	}
	// The same socket with the prefix works.
	if code, _, stderr := runCmd("ctl", "-admin", "unix:"+env.sock, "status"); code != 0 {
		t.Fatalf("ctl -admin unix:%s status: exit %d\n%s", env.sock, code, stderr)
	}
}

// startMutualTLSAdmin starts a daemon whose admin API listens on TCP and
// wants client certificates signed by clientCA; its own certificate is
// signed by serverCA.
func startMutualTLSAdmin(t *testing.T) (adminAddr string, serverCA, clientCA *testpki.CA) {
	t.Helper()
	serverCA, clientCA = testpki.NewCA(t), testpki.NewCA(t)
	server := serverCA.Leaf(t, "127.0.0.1")
	adminAddr = freeAddr(t)
	env := newEnv(t)
	env.admin = fmt.Sprintf("listen = %q\ntls_cert = %q\ntls_key = %q\nclient_ca = %q\n", adminAddr, server.CertFile, server.KeyFile, clientCA.CertFile)
	env.writeConfig(t, "5s", l4Listener(freeAddr(t), "app.test", testnet.NamedBackend(t, "app")))
	env.start(t)
	return adminAddr, serverCA, clientCA
}
