package proxy

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// Interop with HAProxy, the reference implementation of the PROXY
// protocol, in both directions. HAProxy in mode tcp never shows what it
// parsed, so every setup ends at a sniffBackend behind a hop that sends a
// v2 header: the client address that arrives there went through HAProxy's
// parser or writer.

// startHAProxy runs haproxy in the foreground on a config made of the
// usual global and defaults sections plus sections, and returns once its
// sockets accept. It is killed when the test ends.
func startHAProxy(t *testing.T, sections string) {
	t.Helper()
	bin := haproxyPath(t)
	// A frontend that only rejects: it tells when HAProxy has bound its
	// sockets (all are bound before any accepts) without sending a probe
	// connection through the setup under test.
	ready := net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))
	cfg := fmt.Sprintf(`global
    maxconn 100

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend ready
    bind %s
    tcp-request connection reject

%s`, ready, sections)
	path := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer // read only after Wait
	cmd := exec.Command(bin, "-f", path, "-db")
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start haproxy: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("haproxy.cfg:\n%s\nhaproxy output:\n%s", cfg, out.String())
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", ready, time.Second)
		if err == nil {
			c.Close()
			return
		}
		select {
		case err := <-exited:
			exited <- err // for the cleanup
			t.Fatalf("haproxy exited (%v):\n%s\nconfig:\n%s", err, out.String(), cfg)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("haproxy did not listen on %s", ready)
		}
	}
}

// haproxyPath skips the test when HAProxy is not installed.
func haproxyPath(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		t.Skip("haproxy not installed: ", err)
	}
	return bin
}

// freePort returns a port on 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// TestHAProxySendsToPortcullis puts HAProxy in front of a portcullis
// listener that accepts PROXY headers: the client's address, as HAProxy
// wrote it in a v1 or v2 header, must be what portcullis forwards.
func TestHAProxySendsToPortcullis(t *testing.T) {
	haproxyPath(t)
	hello := clientHelloBytes(t, &tls.Config{ServerName: "hap.test"})
	for _, tc := range []struct{ name, option string }{
		{"v2", "send-proxy-v2"},
		{"v1", "send-proxy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := startProxy(t, ppListenerTOML("pp", "hap.test", sniffBackend(t, hello)))
			front := net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))
			startHAProxy(t, fmt.Sprintf(`frontend fe
    bind %s
    default_backend portcullis

backend portcullis
    server p %s %s
`, front, h.addr("pp"), tc.option))

			got, client := askSniff(t, "127.0.0.2", front, nil, hello)
			// Source and destination are the ones the client used: HAProxy's
			// header is passed on, not replaced by our own hop.
			want := seen{Kind: "proxy", Version: 2, Command: "PROXY", Src: client,
				Dst: netip.MustParseAddrPort(front), Authority: "hap.test"}
			if got != want {
				t.Fatalf("backend saw %+v\nwant          %+v", got, want)
			}
			if n := h.rejected("pp", "bad_proxy_header"); n != 0 {
				t.Fatalf("portcullis rejected %v of HAProxy's headers", n)
			}
		})
	}
}

// TestHAProxyReceivesFromPortcullis puts HAProxy (bind … accept-proxy)
// behind a portcullis route that sends v2. HAProxy passes on, in its own
// v2 header, the addresses it accepted, and the AUTHORITY it received
// (proxy-v2-options authority): the backend seeing the original client
// (127.0.0.2), portcullis's listener address and the SNI proves HAProxy
// parsed portcullis's header, TLV included.
func TestHAProxyReceivesFromPortcullis(t *testing.T) {
	haproxyPath(t)
	hello := clientHelloBytes(t, &tls.Config{ServerName: "hap.test"})
	backend := sniffBackend(t, hello)
	front := net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))
	startHAProxy(t, fmt.Sprintf(`frontend fe
    bind %s accept-proxy
    default_backend sniff

backend sniff
    server s %s send-proxy-v2 proxy-v2-options authority
`, front, backend))
	h := startProxy(t, `
[[listener]]
name = "l"
listen = "127.0.0.1:0"
`+routeTOML("hap.test", front, "  send_proxy_protocol = true"))

	got, client := askSniff(t, "127.0.0.2", h.addr("l"), nil, hello)
	want := seen{Kind: "proxy", Version: 2, Command: "PROXY", Src: client,
		Dst: netip.MustParseAddrPort(h.addr("l")), Authority: "hap.test"}
	if got != want {
		t.Fatalf("backend saw %+v\nwant          %+v", got, want)
	}
}
