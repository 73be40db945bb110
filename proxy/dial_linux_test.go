package proxy

import (
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"
)

// TestBackendDialLeavesThePortToConnect checks that the proxy does not
// bind its backend sockets before connecting. A socket bound to port 0
// holds its port against every destination, so all backends would share
// one ephemeral port range between them, instead of one range each.
//
// The test reads it from the port the backend sees: since Linux 4.6 a
// connect picks an even ephemeral port first and a bind to port 0 an odd
// one, each taking the other parity only when its own is used up.
func TestBackendDialLeavesThePortToConnect(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "port.test"})
	ports := make(chan int, 16)
	backend := rawBackend(t, func(c *net.TCPConn) {
		ports <- c.RemoteAddr().(*net.TCPAddr).Port
		c.SetDeadline(time.Now().Add(time.Minute))
		io.ReadFull(c, make([]byte, len(hello)))
		io.Copy(c, c)
	})
	h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+routeTOML("port.test", backend))

	const n = 8
	odd := 0
	for i := range n {
		c, err := dialEcho(h.addr("l"), hello, "ping")
		if c != nil {
			defer c.Close()
		}
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		if p := <-ports; p%2 == 1 {
			odd++
		}
	}
	if odd == n {
		t.Fatalf("all %d backend connections came from odd ports: the proxy binds before it connects", n)
	}
}
