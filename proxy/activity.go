package proxy

import (
	"net"
	"sync"
	"sync/atomic"
)

// activity is shared by the two directions of one relay: it tells
// whether bytes moved on the connection and records why it ended.
type activity struct {
	sockets [2]*net.TCPConn

	mu  sync.Mutex
	end string

	eofs atomic.Int32 // directions that reached their source's EOF
}

func newActivity(a, b *net.TCPConn) *activity {
	return &activity{sockets: [2]*net.TCPConn{a, b}}
}

// count sums the bytes received and acknowledged on both sockets (see
// bytesMoved): it changes whenever a byte moves either way on either
// side, including a slow peer taking what a blocked write offers. It is
// read only when an idle check fires, never per chunk.
func (a *activity) count() uint64 {
	return bytesMoved(a.sockets[0]) + bytesMoved(a.sockets[1])
}

// lastEOF records that a direction reached its source's EOF and reports
// whether the other one already had.
func (a *activity) lastEOF() bool {
	return a.eofs.Add(1) == 2
}

func (a *activity) close(why string) {
	a.mu.Lock()
	if a.end == "" {
		a.end = why
	}
	a.mu.Unlock()
}

func (a *activity) closed() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.end != ""
}

func (a *activity) reason() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.end
}
