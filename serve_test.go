package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	_ "github.com/mattn/go-sqlite3"

	"github.com/portcullis/portcullis/rpc"
	"github.com/portcullis/portcullis/testnet"
	"github.com/portcullis/portcullis/testpki"
)

// l4Listener is a config body with one listener routing sni to backend.
func l4Listener(listen, sni, backend string) string {
	return fmt.Sprintf(`[[listener]]
name = "public"
listen = %q

  [[listener.route]]
  sni = %q
  backend = %q
`, listen, sni, backend)
}

// l7Listener is a config body with one listener terminating TLS for sni
// with leaf's files and proxying HTTP to an http1 backend.
func l7Listener(listen, sni string, leaf testpki.Leaf, backend string) string {
	return fmt.Sprintf(`[[listener]]
name = "public"
listen = %q

  [[listener.route]]
  sni = %q
  mode = "l7"
  tls_cert = %q
  tls_key = %q
  backend = %q
  backend_protocol = "http1"
`, listen, sni, leaf.CertFile, leaf.KeyFile, backend)
}

// readHello reads one TLS record (the ClientHello a test client sent).
func readHello(c net.Conn) error {
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(c, hdr); err != nil {
		return err
	}
	_, err := io.ReadFull(c, make([]byte, int(hdr[3])<<8|int(hdr[4])))
	return err
}

// stuckBackend accepts connections, reads the ClientHello, reports it on
// the returned channel, then holds the connection open reading until the
// peer goes away.
func stuckBackend(t *testing.T) (addr string, gotHello <-chan struct{}) {
	got := make(chan struct{}, 4)
	addr = testnet.Backend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		if readHello(c) != nil {
			return
		}
		got <- struct{}{}
		io.Copy(io.Discard, c)
	})
	return addr, got
}

// openProxied dials the proxy, sends a ClientHello for sni and waits
// until the backend has received it, so the connection is live.
func openProxied(t *testing.T, proxyAddr, sni string, gotHello <-chan struct{}) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", proxyAddr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write(testnet.ClientHello(t, &tls.Config{ServerName: sni})); err != nil {
		t.Fatal(err)
	}
	select {
	case <-gotHello:
	case <-time.After(10 * time.Second):
		t.Fatal("backend never received the ClientHello")
	}
	return c
}

// TestServeSIGTERMDrains: after SIGTERM the listener is closed at once,
// but a live connection keeps relaying in both directions until its
// backend finishes; then the daemon exits 0 without waiting out the
// grace period.
func TestServeSIGTERMDrains(t *testing.T) {
	gotHello := make(chan struct{}, 1)
	release, stop := make(chan struct{}), make(chan struct{})
	backend := testnet.Backend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		if readHello(c) != nil {
			return
		}
		gotHello <- struct{}{}
		line, err := testnet.ReadLine(c) // echo one line: the relay still works
		if err != nil {
			return
		}
		io.WriteString(c, line+"\n")
		select {
		case <-release:
			io.WriteString(c, "finished\n")
		case <-stop:
		}
	})
	t.Cleanup(func() { close(stop) }) // runs before the backend's cleanup waits for it

	env := newEnv(t)
	proxyAddr := freeAddr(t)
	env.writeConfig(t, "20s", l4Listener(proxyAddr, "app.test", backend))
	d := env.start(t)

	c := openProxied(t, proxyAddr, "app.test", gotHello)
	c.SetDeadline(time.Now().Add(30 * time.Second))
	d.signal(t, syscall.SIGTERM)

	waitRefused(t, proxyAddr)
	if !d.running() {
		t.Fatal("daemon exited while a connection was live")
	}
	if _, err := io.WriteString(c, "ping\n"); err != nil {
		t.Fatal(err)
	}
	if line, err := testnet.ReadLine(c); err != nil || line != "ping" {
		t.Fatalf("echo after SIGTERM: %q, %v", line, err)
	}

	close(release)
	if line, err := testnet.ReadLine(c); err != nil || line != "finished" {
		t.Fatalf("after release: %q, %v; want \"finished\"", line, err)
	}
	if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("after finished: read %d, %v; want EOF (backend's half-close)", n, err)
	}
	c.Close()

	if code := d.wait(t, 15*time.Second); code != 0 {
		t.Fatalf("exit code %d, want 0", code)
	}
	log := d.log()
	if countLines(log, "shutting down: draining connections", "grace=20s") != 1 || countLines(log, "stopped") != 1 {
		t.Errorf("missing shutdown log lines:\n%s", log)
	}
	if countLines(log, "grace period over") != 0 {
		t.Errorf("connections were cut although they finished within the grace period:\n%s", log)
	}
}

// TestServeGraceExpires: a connection that never finishes is closed when
// shutdown_grace runs out, and the daemon still exits 0.
func TestServeGraceExpires(t *testing.T) {
	backend, gotHello := stuckBackend(t)
	env := newEnv(t)
	proxyAddr := freeAddr(t)
	env.writeConfig(t, "1s", l4Listener(proxyAddr, "app.test", backend))
	d := env.start(t)

	c := openProxied(t, proxyAddr, "app.test", gotHello)
	d.signal(t, syscall.SIGTERM)
	if code := d.wait(t, 15*time.Second); code != 0 {
		t.Fatalf("exit code %d, want 0", code)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("client connection still open after the daemon exited: %v", err)
	}
	if log := d.log(); countLines(log, "grace period over") != 1 || countLines(log, "connections=1") != 1 {
		t.Errorf("no \"grace period over\" line saying 1 connection was closed:\n%s", log)
	}
}

// TestServeSIGTERMDrainsWebSocket: a WebSocket through an L7 route is a
// live connection like an L4 relay: after SIGTERM it keeps carrying
// messages until it ends, within shutdown_grace, rather than being cut
// when the drain begins (HAProxy's soft stop and nginx's graceful quit
// keep upgraded connections too).
func TestServeSIGTERMDrainsWebSocket(t *testing.T) {
	var up websocket.Upgrader
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	be := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(time.Minute))
		for {
			mt, msg, err := c.ReadMessage()
			if err != nil {
				return
			}
			if err := c.WriteMessage(mt, msg); err != nil {
				return
			}
		}
	})}
	go be.Serve(ln)
	t.Cleanup(func() { be.Close() })

	ca := testpki.NewCA(t)
	leaf := ca.Leaf(t, "ws.test")
	env := newEnv(t)
	proxyAddr := freeAddr(t)
	env.writeConfig(t, "20s", l7Listener(proxyAddr, "ws.test", leaf, ln.Addr().String()))
	d := env.start(t)

	dialer := websocket.Dialer{
		NetDialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", proxyAddr)
		},
		TLSClientConfig:  &tls.Config{RootCAs: ca.Pool(), ServerName: "ws.test"},
		HandshakeTimeout: 10 * time.Second,
	}
	ws, _, err := dialer.Dial("wss://ws.test/", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	ws.SetReadDeadline(time.Now().Add(30 * time.Second)) // fail rather than hang
	echo := func(msg string) error {
		if err := ws.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
			return err
		}
		_, got, err := ws.ReadMessage()
		if err == nil && string(got) != msg {
			err = fmt.Errorf("echo %q, want %q", got, msg)
		}
		return err
	}
	if err := echo("before"); err != nil {
		t.Fatal(err)
	}

	d.signal(t, syscall.SIGTERM)
	d.waitLog(t, 1, "shutting down: draining connections")
	waitRefused(t, proxyAddr)
	if err := echo("during the drain"); err != nil {
		t.Fatalf("WebSocket cut when the drain began, %s before the end of shutdown_grace: %v", "20s", err)
	}
	ws.Close()

	if code := d.wait(t, 15*time.Second); code != 0 {
		t.Fatalf("exit code %d, want 0", code)
	}
	if log := d.log(); countLines(log, "grace period over") != 0 {
		t.Errorf("connections were cut although they finished within the grace period:\n%s", log)
	}
}

// drainingDaemon starts a daemon with a 60 s grace period, opens a
// relayed connection that will not finish and sends SIGTERM, returning
// once the drain has begun.
func drainingDaemon(t *testing.T) (env *testEnv, d *daemon, proxyAddr string) {
	t.Helper()
	backend, gotHello := stuckBackend(t)
	env = newEnv(t)
	proxyAddr = freeAddr(t)
	env.writeConfig(t, "60s", l4Listener(proxyAddr, "app.test", backend))
	d = env.start(t)
	openProxied(t, proxyAddr, "app.test", gotHello)
	d.signal(t, syscall.SIGTERM)
	d.waitLog(t, 1, "shutting down: draining connections")
	return env, d, proxyAddr
}

// TestServeSecondSignalExits: while draining (a connection that will not
// finish, a long grace period), a second signal exits at once.
func TestServeSecondSignalExits(t *testing.T) {
	_, d, _ := drainingDaemon(t)
	if !d.running() {
		t.Fatal("daemon exited before the grace period although a connection was live")
	}
	d.signal(t, syscall.SIGINT)
	if code := d.wait(t, 15*time.Second); code == 0 {
		t.Fatal("exit code 0 after a second signal, want non-zero")
	}
	if log := d.log(); countLines(log, "second signal") != 1 {
		t.Errorf("no \"second signal\" line:\n%s", log)
	}
}

// TestServeStatusWhileDraining: during the drain the admin API stays up
// so operators can watch it; `ctl status` must still list the listener
// with the connection it is waiting for, not an empty table.
func TestServeStatusWhileDraining(t *testing.T) {
	env, d, proxyAddr := drainingDaemon(t)
	waitRefused(t, proxyAddr)
	code, out, stderr := runCmd("ctl", "-admin", "unix:"+env.sock, "status")
	if code != 0 {
		t.Fatalf("ctl status while draining: exit %d\n%s", code, stderr)
	}
	found := false
	for line := range strings.Lines(out) {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == "public" {
			found = true
			if f[2] != "1" {
				t.Errorf("ctl status while draining: listener public has ACTIVE %s, want 1:\n%s", f[2], out)
			}
		}
	}
	if !found {
		t.Errorf("ctl status while draining does not list listener public:\n%s", out)
	}
	d.signal(t, syscall.SIGTERM) // the second signal: exit at once
	d.wait(t, 15*time.Second)
}

// TestServeSIGHUPReloads: SIGHUP re-reads the file (routing follows it)
// and recompiles even when the file is unchanged, which is how a
// certificate replaced in place is picked up. The watcher ignores the
// certificate files, so the last step is SIGHUP's doing alone.
func TestServeSIGHUPReloads(t *testing.T) {
	a, b := testnet.NamedBackend(t, "A"), testnet.NamedBackend(t, "B")
	ca1, ca2 := testpki.NewCA(t), testpki.NewCA(t)
	env := newEnv(t)
	certFile, keyFile := filepath.Join(env.dir, "secure.pem"), filepath.Join(env.dir, "secure-key.pem")
	installLeaf := func(l testpki.Leaf) {
		for src, dst := range map[string]string{l.CertFile: certFile, l.KeyFile: keyFile} {
			pem, err := os.ReadFile(src)
			if err != nil {
				t.Fatal(err)
			}
			writeFile(t, dst, string(pem))
		}
	}
	installLeaf(ca1.Leaf(t, "secure.test"))

	proxyAddr := freeAddr(t)
	body := func(backend string) string {
		return l4Listener(proxyAddr, "app.test", backend) + `
  [[listener.route]]
  sni = "secure.test"
  mode = "l7"
  tls_cert = "secure.pem"
  tls_key = "secure-key.pem"
  backend = "127.0.0.1:1"
`
	}
	env.writeConfig(t, "5s", body(a))
	d := env.start(t)
	ask := func() string {
		t.Helper()
		got, err := testnet.Ask(proxyAddr, testnet.ClientHello(t, &tls.Config{ServerName: "app.test"}))
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	servedBy := func(pool *x509.CertPool) error {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", proxyAddr,
			&tls.Config{ServerName: "secure.test", RootCAs: pool})
		if err == nil {
			conn.Close()
		}
		return err
	}
	if got := ask(); got != "A" {
		t.Fatalf("before reload: routed to %q, want A", got)
	}
	if err := servedBy(ca1.Pool()); err != nil {
		t.Fatalf("before reload: %v", err)
	}

	const loaded = `msg="configuration loaded" trigger=sighup`
	env.writeConfig(t, "5s", body(b))
	d.signal(t, syscall.SIGHUP)
	d.waitLog(t, 1, loaded)
	if got := ask(); got != "B" {
		t.Fatalf("after SIGHUP: routed to %q, want B", got)
	}

	installLeaf(ca2.Leaf(t, "secure.test"))
	d.signal(t, syscall.SIGHUP)
	d.waitLog(t, 2, loaded)
	if err := servedBy(ca2.Pool()); err != nil {
		t.Fatalf("after SIGHUP the replaced certificate is not served: %v", err)
	}
	if !d.running() {
		t.Fatal("SIGHUP stopped the daemon")
	}
	d.stop(t)
}

// TestServeKill9KeepsAcknowledgedMutations: every firewall rule whose
// AddFirewallRule call returned OK survives SIGKILL of the daemon in the
// middle of a stream of mutations; the restart replaces the stale Unix
// socket; the database passes SQLite's integrity check.
func TestServeKill9KeepsAcknowledgedMutations(t *testing.T) {
	backend := testnet.NamedBackend(t, "A")
	env := newEnv(t)
	env.writeConfig(t, "5s", l4Listener(freeAddr(t), "app.test", backend))
	d := env.start(t)

	c, err := rpc.Dial("unix:"+env.sock, rpc.DialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var (
		mu    sync.Mutex
		acked []string
	)
	enough, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		for i := range 500 {
			value := fmt.Sprintf("198.51.100.%d/32", i%250+1)
			if i >= 250 {
				value = fmt.Sprintf("203.0.113.%d/32", i%250+1)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			r, err := c.AddFirewallRule(ctx, value)
			cancel()
			if err != nil {
				return // the daemon is gone
			}
			mu.Lock()
			acked = append(acked, r.Value)
			n := len(acked)
			mu.Unlock()
			if n == 100 {
				close(enough)
			}
		}
	}()
	select {
	case <-enough:
	case <-finished:
		t.Fatalf("mutations stopped early; log:\n%s", d.log())
	case <-time.After(30 * time.Second):
		t.Fatal("100 mutations took more than 30s")
	}
	d.signal(t, syscall.SIGKILL)
	if code := d.wait(t, 15*time.Second); code != -1 {
		t.Fatalf("exit code %d after SIGKILL, want -1 (killed)", code)
	}
	select {
	case <-finished:
	case <-time.After(15 * time.Second):
		t.Fatal("client still calling after the daemon died")
	}
	mu.Lock()
	want := append([]string(nil), acked...)
	mu.Unlock()
	t.Logf("%d mutations acknowledged before SIGKILL", len(want))
	if fi, err := os.Lstat(env.sock); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("expected a stale socket file left by SIGKILL: %v", err)
	}

	d2 := env.start(t)
	c2, err := rpc.Dial("unix:"+env.sock, rpc.DialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	fw, err := c2.FirewallRules(ctx)
	if err != nil {
		t.Fatal(err)
	}
	origin := map[string]string{}
	for _, r := range fw.Rules {
		origin[r.Value] = r.Origin
	}
	for _, v := range want {
		if o, ok := origin[v]; !ok || o != "override" {
			t.Errorf("acknowledged rule %s after restart: present %v, origin %q; want origin \"override\"", v, ok, o)
		}
	}
	d2.stop(t)

	openIntact(t, env.db)
}

// TestServeConfigMapSymlinkSwap: the config laid out as a Kubernetes
// ConfigMap volume (portcullis.toml -> ..data/portcullis.toml, ..data ->
// a timestamped directory) is reloaded when the kubelet's atomic ..data
// swap replaces it — what examples/kubernetes relies on.
func TestServeConfigMapSymlinkSwap(t *testing.T) {
	a, b := testnet.NamedBackend(t, "A"), testnet.NamedBackend(t, "B")
	env := newEnv(t)
	proxyAddr := freeAddr(t)
	publish := func(version, backend string) {
		dir := filepath.Join(env.dir, "..2026_01_01_00_00_"+version)
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(dir, "portcullis.toml"), env.configText("5s", l4Listener(proxyAddr, "app.test", backend)))
		tmp := filepath.Join(env.dir, "..data_tmp")
		if err := os.Symlink(filepath.Base(dir), tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(env.dir, "..data")); err != nil {
			t.Fatal(err)
		}
	}
	publish("01", a)
	if err := os.Symlink(filepath.Join("..data", "portcullis.toml"), env.config); err != nil {
		t.Fatal(err)
	}
	d := env.start(t)
	ask := func() string {
		t.Helper()
		got, err := testnet.Ask(proxyAddr, testnet.ClientHello(t, &tls.Config{ServerName: "app.test"}))
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	if got := ask(); got != "A" {
		t.Fatalf("before the swap: routed to %q, want A", got)
	}
	// The watcher may not be in place yet when the daemon reports it is
	// listening, and reload.Watch does not re-read the file once its
	// watch is added, so a swap before that would go unnoticed. Swap in
	// identical content until the watcher has seen one (a debug
	// "configuration unchanged" line), then make the real change.
	for i := 2; countLines(d.log(), `msg="configuration unchanged" trigger=file`) == 0; i++ {
		if i > 50 {
			t.Fatalf("the watcher never noticed a ..data swap; log:\n%s", d.log())
		}
		publish(fmt.Sprintf("%02d", i), a)
		time.Sleep(200 * time.Millisecond)
	}
	publish("99", b)
	d.waitLog(t, 1, `msg="configuration loaded" trigger=file`)
	if got := ask(); got != "B" {
		t.Fatalf("after the ..data swap: routed to %q, want B", got)
	}
	d.stop(t)
}

// TestServeStandardLoggerIsStructured: what net/http's transports say
// through the standard library's logger about a misbehaving backend
// (here an HTTP/1.1 backend that sends a second response nobody asked
// for) lands in the daemon's structured log at debug level, not as a raw
// line a log pipeline cannot parse.
func TestServeStandardLoggerIsStructured(t *testing.T) {
	backend := testnet.Backend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		br := bufio.NewReader(c)
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			if line == "\r\n" {
				break
			}
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
		io.Copy(io.Discard, c)
	})
	ca := testpki.NewCA(t)
	leaf := ca.Leaf(t, "web.test")
	env := newEnv(t)
	proxyAddr := freeAddr(t)
	env.writeConfig(t, "1s", l7Listener(proxyAddr, "web.test", leaf, backend))
	d := env.start(t)

	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", proxyAddr)
		},
		TLSClientConfig: &tls.Config{RootCAs: ca.Pool(), ServerName: "web.test"},
	}}
	defer client.CloseIdleConnections()
	resp, err := client.Get("https://web.test/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()

	log := d.waitLog(t, 1, "Unsolicited response")
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, "Unsolicited response") && (!strings.HasPrefix(line, "time=") || !strings.Contains(line, "level=DEBUG")) {
			t.Fatalf("the standard logger's line is not a debug record of the daemon's log:\n%s", line)
		}
	}
}
