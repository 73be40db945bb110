//go:build !linux

package proxy

import (
	"errors"
	"net"
	"net/netip"
)

// Elsewhere every connection is accepted and served through net (see
// handshake_linux.go).
type rawListener struct{}

func newRunningListener(addr string, ln *net.TCPListener) (*runningListener, error) {
	return &runningListener{addr: addr, ln: ln, done: make(chan struct{})}, nil
}

func (rawListener) ok() bool { return false }
func (rawListener) close()   {}
func (rawListener) accept() (int, netip.AddrPort, error) {
	return -1, netip.AddrPort{}, errors.New("proxy: no raw accept on this platform")
}

func (s *Server) serveRaw(*Snapshot, *listenerConfig, *runningListener, int, netip.AddrPort) {
	panic("proxy: serveRaw without raw accept")
}

func closeFD(int) {}
func resetFD(int) {}
