package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/portcullis/portcullis/testpki"
)

// waitAccepts dials addr until a connection succeeds.
func waitAccepts(t *testing.T, d *daemon, addr string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return
		}
		if !d.running() {
			t.Fatalf("daemon exited (%v) before %s accepted; log:\n%s", d.err, addr, d.log())
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never accepted", addr)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestServeStartupFailureWithLiveConnection: the proxy listeners open
// before /metrics and the admin API. When a later startup step fails (here
// the admin TLS certificate does not load), the daemon must exit non-zero
// promptly, even if a client connected in the meantime — not wait without
// limit for that connection while ignoring SIGTERM.
//
// The daemon's output is a full pipe (heldOutput), so the daemon stops
// at the first line it logs, "configuration loaded": the proxy listener
// is open by then, and the admin certificate not yet loaded. The test
// connects while it is held there, deterministically.
func TestServeStartupFailureWithLiveConnection(t *testing.T) {
	backend, gotHello := stuckBackend(t)
	env := newEnv(t)
	proxyAddr, adminAddr := freeAddr(t), freeAddr(t)
	writeFile(t, filepath.Join(env.dir, "admin.pem"), "not a certificate\n")
	writeFile(t, filepath.Join(env.dir, "admin-key.pem"), "not a key\n")
	writeFile(t, env.config, fmt.Sprintf(`shutdown_grace = "30s"

[admin]
unix_socket = "portcullis.sock"
listen = %q
tls_cert = "admin.pem"
tls_key = "admin-key.pem"

[metrics]
listen = %q

[state]
database = "portcullis.db"

`, adminAddr, env.metrics)+l4Listener(proxyAddr, "app.test", backend))

	out := newHeldOutput(t)
	out.hold(t)
	d := env.launch(t, out)
	// The daemon now waits to write "configuration loaded"; if it logged
	// anything before opening the listener, it would wait there instead
	// and never accept.
	waitAccepts(t, d, proxyAddr)
	openProxied(t, proxyAddr, "app.test", gotHello)

	// Let the startup go on, to fail at the admin certificate.
	out.release()

	// The startup has failed; the process must exit non-zero now, and the
	// proxy socket must be closed. (The stuck backend holds the relay for
	// a minute.)
	select {
	case <-d.done:
	case <-time.After(20 * time.Second):
		// Show that even SIGTERM is ignored at this point.
		d.signal(t, syscall.SIGTERM)
		select {
		case <-d.done:
			t.Fatalf("daemon hung after its startup failed until SIGTERM; log:\n%s", d.log())
		case <-time.After(5 * time.Second):
			t.Fatalf("daemon hung after its startup failed and ignored SIGTERM; log:\n%s", d.log())
		}
	}
	if code := d.cmd.ProcessState.ExitCode(); code == 0 || countLines(d.log(), "exiting", "admin.tls_cert") != 1 {
		t.Fatalf("exit code %d after a failed startup, want non-zero and the error logged; log:\n%s", code, d.log())
	}
	waitRefused(t, proxyAddr)
	if _, err := os.Lstat(env.sock); err == nil {
		t.Errorf("admin socket %s left behind", env.sock)
	}
}

// TestServeSIGTERMAfterSIGHUPs: a SIGTERM that arrives while a SIGHUP
// reload is running, after more SIGHUPs (logrotate, a config-management
// run, `systemctl reload` twice), must still stop the daemon. Signals are
// queued in a channel of two and read only between reloads, so the
// third signal is dropped and the daemon keeps running.
//
// The daemon's output is a pipe (heldOutput) the test fills after
// startup, so the SIGHUP reload stops at its "configuration loaded" line,
// inside Manager.Reload; the reload counter, bumped just before that
// line, shows when it is there.
func TestServeSIGTERMAfterSIGHUPs(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.Leaf(t, "secure.test")
	env := newEnv(t)
	proxyAddr := freeAddr(t)
	env.writeConfig(t, "5s", fmt.Sprintf(`[[listener]]
name = "public"
listen = %q

  [[listener.route]]
  sni = "secure.test"
  mode = "l7"
  tls_cert = %q
  tls_key = %q
  backend = "127.0.0.1:1"
`, proxyAddr, leaf.CertFile, leaf.KeyFile))
	out := newHeldOutput(t)
	d := env.waitStarted(t, env.launch(t, out))
	if n := reloadsCounted(t, env.metrics); n != 1 {
		t.Fatalf("%v successful reloads counted after startup, want 1", n)
	}

	// A SIGHUP reload, held at its log line. (The daemon is idle, as
	// hold needs.)
	out.hold(t)
	d.signal(t, syscall.SIGHUP)
	deadline := time.Now().Add(20 * time.Second)
	for reloadsCounted(t, env.metrics) != 2 {
		if time.Now().After(deadline) {
			t.Fatal("the SIGHUP reload never got to its log line")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Meanwhile: more SIGHUPs, then SIGTERM. (The pauses only keep the
	// runtime from merging the SIGHUPs into one delivery.)
	for range 3 {
		d.signal(t, syscall.SIGHUP)
		time.Sleep(100 * time.Millisecond)
	}
	d.signal(t, syscall.SIGTERM)
	time.Sleep(200 * time.Millisecond)
	// Let the reload (and any later ones) finish.
	out.release()

	select {
	case <-d.done:
	case <-time.After(20 * time.Second):
		t.Fatalf("SIGTERM was lost: daemon still running 20s later; log:\n%s", d.log())
	}
	if code := d.cmd.ProcessState.ExitCode(); code != 0 || countLines(d.log(), "msg=stopped") != 1 {
		t.Fatalf("exit code %d; want 0 after a clean stop; log:\n%s", code, d.log())
	}
}

// reloadsCounted returns portcullis_config_reloads_total{result="success"}
// from the daemon's /metrics at addr.
func reloadsCounted(t *testing.T, addr string) float64 {
	t.Helper()
	for line := range strings.Lines(string(scrape(t, addr))) {
		if v, ok := strings.CutPrefix(line, `portcullis_config_reloads_total{result="success"} `); ok {
			n, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	return 0
}

// TestServeStartupErrorsNameFileLineKey: the settings serve reads only at
// start fail like every other config error, with file:line: key, so the
// operator is pointed at the line to fix.
func TestServeStartupErrorsNameFileLineKey(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	for _, tc := range []struct {
		name, metrics, database, want string
	}{
		{"database in a missing directory", "127.0.0.1:0", "missing/portcullis.db", ":5: state.database: "},
		{"metrics address taken", busy.Addr().String(), "portcullis.db", ":2: metrics.listen: "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newEnv(t)
			writeFile(t, env.config, fmt.Sprintf("[metrics]\nlisten = %q\n\n[state]\ndatabase = %q\n\n", tc.metrics, tc.database)+
				l4Listener("127.0.0.1:0", "app.test", "127.0.0.1:9"))
			d := env.startNoWait(t)
			if code := d.wait(t, 20*time.Second); code == 0 {
				t.Fatalf("daemon exited 0; log:\n%s", d.log())
			}
			if countLines(d.log(), "exiting", env.config+tc.want) != 1 {
				t.Fatalf("the error does not name %s%s; log:\n%s", env.config, tc.want, d.log())
			}
		})
	}
}
