package l7

import (
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"syscall"
	"testing"
)

// TestBackendDialSetsNoKeepalive checks that backend connections, on the
// relay and on the pooled net/http path, get no TCP keepalive, as on L4
// routes: idle_timeout, the transports' idle limits and HTTP/2 pings
// notice a backend that went away, and setting the probes up costs four
// setsockopt calls per dial.
//
// The backend reports the address the proxy dialed it from; the test
// finds that socket among its own descriptors (the handler runs in this
// process) and asks the kernel for its SO_KEEPALIVE.
func TestBackendDialSetsNoKeepalive(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startBackend(t, pki, beH2C, false, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(r.RemoteAddr))
	}))
	for _, tc := range []struct {
		name, protocol string
		h2             bool
	}{
		{"relay", "h2c", true},
		{"net/http", "http1", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: tc.protocol})
			addr := startProxy(t, h, false).addr
			c, _ := newClient(t, pki, addr, tc.h2, "")
			code, from := getStatus(t, c, url+"/")
			if code != http.StatusOK {
				t.Fatalf("status %d %q", code, from)
			}
			// The client connection is still open, and with it the
			// relay's backend connection; the pooled one is idle.
			fd := socketBetween(t, netip.MustParseAddrPort(from), netip.MustParseAddrPort(be.addr))
			on, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_KEEPALIVE)
			if err != nil {
				t.Fatal(err)
			}
			if on != 0 {
				t.Errorf("backend socket %s has SO_KEEPALIVE on", from)
			}
		})
	}
}

// socketBetween returns the descriptor of this process's TCP socket from
// local to remote.
func socketBetween(t *testing.T, local, remote netip.AddrPort) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		la, err1 := syscall.Getsockname(fd)
		ra, err2 := syscall.Getpeername(fd)
		if err1 == nil && err2 == nil && sockaddr(la) == local && sockaddr(ra) == remote {
			return fd
		}
	}
	t.Fatalf("no socket from %s to %s", local, remote)
	return -1
}

func sockaddr(sa syscall.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *syscall.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *syscall.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port))
	}
	return netip.AddrPort{}
}
