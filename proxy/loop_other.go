//go:build !linux

package proxy

// Elsewhere every relay runs in goroutines (see loop_linux.go).
type eventLoops struct{}

type eventLoop struct{}

type loopConn struct{}

func (*eventLoops) pick() *eventLoop              { return nil }
func (*eventLoops) stop()                         {}
func (*eventLoop) adopt(*relayJob, *sockets) bool { return false }
func (*loopConn) cut()                            {}
