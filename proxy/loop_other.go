//go:build !linux

package proxy

import (
	"net"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Elsewhere every relay runs in goroutines (see loop_linux.go).
type eventLoops struct{ warn func(error) }

type eventLoop struct{}

type loopConn struct{}

func (*eventLoops) pick() *eventLoop { return nil }
func (*eventLoops) stop()            {}
func (*eventLoop) adopt(*sockets, *net.TCPConn, *net.TCPConn, time.Duration, prometheus.Counter, func(relayResult)) bool {
	return false
}
func (*loopConn) cut() {}
