package l7

import (
	"net"
	"sync/atomic"
	"time"
)

// stallGuard bounds how long a write may wait for a peer that has stopped
// reading. Without it, a client that opens its flow-control windows (or
// just asks for a download) and never reads blocks the writer for ever:
// on the relay the direction writing to it, and with it every stream and
// the backend connection; on the general path a handler and its pooled
// backend connection. Nothing else notices, since a stream is open.
//
// Before each write, arm sets a write deadline timeout (the idle timeout)
// ahead, but only once the one it set last is more than half used, so a
// stream of writes costs a clock read each and a deadline update per half
// timeout. A peer that takes some bytes each half timeout keeps its
// connection, as on L4 routes; one that takes none for a whole timeout
// fails the write, and the connection is closed.
type stallGuard struct {
	timeout time.Duration // 0: writes are not bounded
	// deadline is the write deadline arm set last, as time since
	// monoBase; 0 if none, noArm while a caller's own deadline is set.
	deadline atomic.Int64
}

const noArm = -1

// monoBase makes deadlines monotonic durations, immune to clock steps.
var monoBase = time.Now()

// arm renews c's write deadline when it is more than half used.
func (g *stallGuard) arm(c net.Conn) {
	if g.timeout <= 0 {
		return
	}
	dl := g.deadline.Load()
	if dl == noArm {
		return
	}
	now := time.Since(monoBase)
	if time.Duration(dl)-now > g.timeout/2 {
		return
	}
	next := now + g.timeout
	if g.deadline.CompareAndSwap(dl, int64(next)) {
		c.SetWriteDeadline(monoBase.Add(next))
	}
}

// set records a write deadline set by someone else (a handshake bound,
// crypto/tls's close_notify): arm leaves a non-zero one alone, and
// starts over after one is cleared.
func (g *stallGuard) set(t time.Time) {
	if t.IsZero() {
		g.deadline.Store(0)
	} else {
		g.deadline.Store(noArm)
	}
}

// stallConn is a connection whose writes are bounded by a stallGuard: the
// relay's backend connection.
type stallConn struct {
	net.Conn
	stall stallGuard
}

func newStallConn(c net.Conn, timeout time.Duration) *stallConn {
	sc := &stallConn{Conn: c}
	sc.stall.timeout = timeout
	return sc
}

func (c *stallConn) Write(p []byte) (int, error) {
	c.stall.arm(c.Conn)
	return c.Conn.Write(p)
}

func (c *stallConn) SetDeadline(t time.Time) error {
	c.stall.set(t)
	return c.Conn.SetDeadline(t)
}

func (c *stallConn) SetWriteDeadline(t time.Time) error {
	c.stall.set(t)
	return c.Conn.SetWriteDeadline(t)
}
