package proxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/portcullis/portcullis/testnet"
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

// TestShutdownCutsDialUncounted: a backend dial still in progress when
// the grace period ends is cancelled, and the connection is counted as
// cut, not rejected as backend_unreachable, which is logged as a warning
// that the backend is down.
func TestShutdownCutsDialUncounted(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "slow.test"})
	h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\ndial_timeout = \"1m\"\n"+routeTOML("slow.test", fullBacklog(t)))
	c, err := net.Dial("tcp", h.addr("l"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(hello)
	// Counted as routed just before the dial, which cannot complete.
	routed := h.srv.metrics.routeConns.WithLabelValues("l", "slow.test")
	testnet.WaitFor(t, "routed", func() bool { return testutil.ToFloat64(routed) == 1 })
	var cut *CutError
	if err := h.srv.Shutdown(canceledCtx()); !errors.As(err, &cut) || cut.Connections != 1 {
		t.Fatalf("Shutdown = %v, want a CutError for 1 connection", err)
	}
	if n := h.rejected("l", "backend_unreachable"); n != 0 {
		t.Fatalf("%v connection(s) rejected as backend_unreachable, want none: the shutdown cut the dial", n)
	}
}

// fullBacklog returns the address of a listening socket whose accept
// queue is full, so that the kernel drops the SYNs of a connect to it,
// which then waits until it times out or is cancelled.
func fullBacklog(t *testing.T) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	// A backlog of 0 holds one connection.
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	// On a listening socket, tcpi_unacked is the accept queue's length.
	testnet.WaitFor(t, "accept queue full", func() bool {
		info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		return err == nil && info.Unacked == 1
	})
	return addr
}
