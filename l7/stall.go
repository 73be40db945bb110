package l7

import (
	"io"
	"net"
	"sync"
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

// waitGuard bounds how long one request on the general path may wait on
// its client: for more of the request body, or for room to write more of
// the response. A read of the body waits on no deadline (http.Server has
// no ReadTimeout, which would cut long uploads), and an HTTP/2 client
// holds a response write without stalling the socket by keeping its
// flow-control window shut: stallGuard sees neither. Without this, an
// HTTP/1.1 client that stops halfway through its body, or an HTTP/2
// client that answers pings but never opens its window, holds the
// handler, and on http1 backends a backend connection, for ever (the
// transport does not return from a round trip, cancelled or not, before
// its request body read does). A read or write that has waited a whole
// timeout closes the client connection, as on the relay; one that moves
// some bytes each timeout does not.
type waitGuard struct {
	timeout time.Duration
	cut     func() // closes the client connection

	// reading and writing are when the pending body read and response
	// write started, as time since monoBase; 0 while none is pending.
	// draining is when an HTTP/1.1 handler returned before the body's
	// end: net/http's server then reads the rest before the next
	// request, with no deadline (a read deadline set by the handler is
	// cleared when it returns, if a read is pending), so the guard
	// watches that too, until the next request or the connection's end.
	reading, writing, draining atomic.Int64

	started atomic.Bool
	mu      sync.Mutex
	timer   *time.Timer
	done    bool
}

// begin marks a read or write as pending and starts the timer, at the
// first one of the request.
func (g *waitGuard) begin(since *atomic.Int64) {
	since.Store(max(int64(time.Since(monoBase)), 1))
	if !g.started.Load() {
		g.mu.Lock()
		if g.timer == nil && !g.done {
			g.timer = time.AfterFunc(g.timeout, g.fire)
		}
		g.started.Store(true)
		g.mu.Unlock()
	}
}

func (g *waitGuard) end(since *atomic.Int64) { since.Store(0) }

func (g *waitGuard) fire() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.done {
		return
	}
	now := time.Since(monoBase)
	next := g.timeout
	for _, since := range [...]*atomic.Int64{&g.reading, &g.writing, &g.draining} {
		start := since.Load()
		if start == 0 {
			continue
		}
		waited := now - time.Duration(start)
		if waited >= g.timeout {
			g.done = true
			g.cut()
			return
		}
		next = min(next, g.timeout-waited)
	}
	g.timer.Reset(next)
}

// stop ends the guard with the request's handler.
func (g *waitGuard) stop() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.done = true
	if g.timer != nil {
		g.timer.Stop()
	}
}

// guardedBody is a request body whose reads a waitGuard watches.
type guardedBody struct {
	io.ReadCloser
	g   *waitGuard
	eof atomic.Bool // read to its end: set by the transport's goroutine
}

func (b *guardedBody) Read(p []byte) (int, error) {
	b.g.begin(&b.g.reading)
	n, err := b.ReadCloser.Read(p)
	b.g.end(&b.g.reading)
	if err == io.EOF {
		b.eof.Store(true)
	}
	return n, err
}
