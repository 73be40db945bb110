package proxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/portcullis/portcullis/testnet"
)

// TestHandshakesHoldNoGoroutine: connections wait for their PROXY
// header or ClientHello in an event loop, not in a goroutine each.
func TestHandshakesHoldNoGoroutine(t *testing.T) {
	const n = 200
	for _, tc := range []struct{ name, toml string }{
		{"plain", "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\nhandshake_timeout = \"1m\"\n" + routeTOML("x.test", "127.0.0.1:1")},
		{"proxy_protocol", ppListenerTOML("l", "x.test", "127.0.0.1:1", `handshake_timeout = "1m"`)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := startProxy(t, tc.toml)
			addr := h.addr("l")
			// One connection first, so the loops have started.
			first, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer first.Close()
			testnet.WaitFor(t, "the first accepted", func() bool { return h.srv.live.Load() == 1 })
			before := runtime.NumGoroutine()
			for range n {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
			}
			testnet.WaitFor(t, "every connection accepted", func() bool { return h.srv.live.Load() == n+1 })
			if grew := runtime.NumGoroutine() - before; grew > n/10 {
				t.Fatalf("%d goroutines more for %d connections waiting for their first bytes, want about none", grew, n)
			}
		})
	}
}

// TestDialTimeoutInLoop: a backend whose connect never completes is
// given up after dial_timeout, and the client is turned away as
// backend_unreachable with net's words for it.
func TestDialTimeoutInLoop(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "slow.test"})
	backend := fullBacklog(t)
	h, logs := startLoggedProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\ndial_timeout = \"200ms\"\n"+routeTOML("slow.test", backend))
	c, err := net.Dial("tcp", h.addr("l"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	c.Write(hello)
	if n, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatalf("read %d bytes, want the connection closed", n)
	}
	line := logs.waitLine(t, "reason", "backend_unreachable")
	want := fmt.Sprintf("dial tcp %s: i/o timeout", backend)
	if err, _ := line["err"].(string); err != want {
		t.Fatalf("logged err %q, want %q", err, want)
	}
	if n := h.rejected("l", "backend_unreachable"); n != 1 {
		t.Fatalf("backend_unreachable = %v, want 1", n)
	}
}

// TestRefusedDialInLoop: a backend that refuses the connect is reported
// as net's dial would report it.
func TestRefusedDialInLoop(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "gone.test"})
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	backend := dead.Addr().String()
	dead.Close()
	h, logs := startLoggedProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+routeTOML("gone.test", backend))
	c, err := net.Dial("tcp", h.addr("l"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(hello)
	line := logs.waitLine(t, "reason", "backend_unreachable")
	want := fmt.Sprintf("dial tcp %s: connect: connection refused", backend)
	if err, _ := line["err"].(string); err != want {
		t.Fatalf("logged err %q, want %q", err, want)
	}
}

// TestHostNameBackendThroughNet: a backend named by host name is dialed
// through net, which resolves it, after the loop read the ClientHello.
func TestHostNameBackendThroughNet(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "name.test"})
	backend := echoBackend(t, hello)
	_, port, _ := net.SplitHostPort(backend)
	h, logs := startLoggedProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+routeTOML("name.test", "localhost:"+port))
	c, err := dialEcho(h.addr("l"), hello, "ping")
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	line := logs.waitLine(t, "msg", "connection")
	if b, _ := line["backend"].(string); !strings.HasPrefix(b, "localhost:") {
		t.Fatalf("access line names backend %q", b)
	}
}

// TestProxyProtocolTurnedOnWhileAccepting: a reload that turns
// proxy_protocol on finds the accept loop waiting as the listener was,
// for a bare descriptor; the connection it then accepts still has its
// PROXY header read.
func TestProxyProtocolTurnedOnWhileAccepting(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "pp.test"})
	backend := sniffBackend(t, hello)
	h := startProxy(t, "[[listener]]\nname = \"pp\"\nlisten = \"127.0.0.1:0\"\n"+routeTOML("pp.test", backend, "  send_proxy_protocol = true"))
	h.apply(ppListenerTOML("pp", "pp.test", backend))
	got, _ := askSniff(t, "", h.addr("pp"), v2Header(0x21, 0x11, v2Addrs(ppSrc4, ppDst4)), hello)
	if got.Kind != "proxy" || got.Src != ppSrc4 {
		t.Fatalf("backend saw %+v, want a PROXY header from %v", got, ppSrc4)
	}
}

// TestClientResetInLoopWordedAsNet: a client that resets its connection
// before its ClientHello is complete is logged as bad_client_hello with
// the words the net path's read gives it (operation, addresses, errno).
func TestClientResetInLoopWordedAsNet(t *testing.T) {
	h, logs := startLoggedProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\nhandshake_timeout = \"1m\"\n"+routeTOML("x.test", "127.0.0.1:1"))
	c, err := net.Dial("tcp", h.addr("l"))
	if err != nil {
		t.Fatal(err)
	}
	client := c.LocalAddr().String()
	testnet.WaitFor(t, "the connection accepted", func() bool { return h.srv.live.Load() == 1 })
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
	line := logs.waitLine(t, "reason", "bad_client_hello")
	want := fmt.Sprintf("clienthello: not a TLS ClientHello: read tcp %s->%s: read: connection reset by peer", h.addr("l"), client)
	if err, _ := line["err"].(string); err != want {
		t.Fatalf("logged err %q, want %q", err, want)
	}
}

// TestHandshakeTimeoutInLoopWordedAsNet: a client that sends no
// ClientHello within handshake_timeout is logged as handshake_timeout
// with the words of the net path's read deadline.
func TestHandshakeTimeoutInLoopWordedAsNet(t *testing.T) {
	h, logs := startLoggedProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\nhandshake_timeout = \"50ms\"\n"+routeTOML("x.test", "127.0.0.1:1"))
	c, err := net.Dial("tcp", h.addr("l"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	line := logs.waitLine(t, "reason", "handshake_timeout")
	want := fmt.Sprintf("read tcp %s->%s: i/o timeout", h.addr("l"), c.LocalAddr())
	if err, _ := line["err"].(string); err != want {
		t.Fatalf("logged err %q, want %q", err, want)
	}
}

// TestHandOverOutOfDescriptorsResets: a connection the loop hands to a
// goroutine (here for a backend named by host name) needs one
// descriptor more, for the duplicate net makes. Without it the
// connection is dropped, and the client must learn so at once, by a
// reset as every connection turned away does, not by an orderly close
// it would read as the server's answer to its ClientHello.
func TestHandOverOutOfDescriptorsResets(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "name.test"})
	backend := echoBackend(t, hello)
	_, port, _ := net.SplitHostPort(backend)
	h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+routeTOML("name.test", "localhost:"+port))
	// The first connection starts the loops while descriptors are free,
	// and is turned away in one, which closes its socket before counting
	// it: nothing of it is left to free a descriptor later.
	c, err := net.Dial("tcp", h.addr("l"))
	if err != nil {
		t.Fatal(err)
	}
	c.Write(clientHelloBytes(t, &tls.Config{ServerName: "other.test"}))
	testnet.WaitFor(t, "the first connection turned away", func() bool { return h.rejected("l", "no_route") == 1 })
	c.Close()
	c, err = net.Dial("tcp", h.addr("l"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	testnet.WaitFor(t, "the second accept", func() bool { return h.srv.Status()[0].Total == 2 })
	exhaustDescriptors(t)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(hello); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read %d bytes, %v; want a reset", n, err)
	}
}

// TestProxyHeaderTimeoutInLoopWordedAsNet: a trusted sender that stops
// inside its PROXY header is turned away at handshake_timeout, logged
// with the words of the net path's PROXY reader.
func TestProxyHeaderTimeoutInLoopWordedAsNet(t *testing.T) {
	h, logs := startLoggedProxy(t, ppListenerTOML("l", "x.test", "127.0.0.1:1", `handshake_timeout = "50ms"`))
	c, err := net.Dial("tcp", h.addr("l"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("PROXY TCP4 203.0.113.9"))
	line := logs.waitLine(t, "reason", "handshake_timeout")
	want := fmt.Sprintf("proxyproto: reading header: read tcp %s->%s: i/o timeout", h.addr("l"), c.LocalAddr())
	if err, _ := line["err"].(string); err != want {
		t.Fatalf("logged err %q, want %q", err, want)
	}
}
