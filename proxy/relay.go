package proxy

import (
	"errors"
	"net"
	"os"
	"syscall"
	"time"
)

// relayResult is what a finished relay reports for the access log and
// the byte counters.
type relayResult struct {
	toBackend, toClient int64
	end                 string // done, idle_timeout, client_reset, backend_reset, closed, or "error: …"
}

// relay copies both directions between the raw sockets until both are
// done. Each direction ends by half-closing its destination, so a client
// that shuts its write side still receives the whole reply. The caller's
// goroutine runs one direction and one more goroutine runs the other;
// neither outlives the call.
//
// The arguments are *net.TCPConn on purpose: (*net.TCPConn).ReadFrom with
// a *net.TCPConn source is what lets the runtime use splice(2), so the
// payload never enters user space. Wrapping either side would silently
// fall back to a read/write loop through a buffer.
func relay(client, backend *net.TCPConn, idle time.Duration) relayResult {
	act := newActivity(client, backend)
	type result struct {
		n   int64
		end string
	}
	back := make(chan result, 1)
	go func() {
		n, end := copyToClient(client, backend, idle, act)
		back <- result{n, end}
	}()
	toBackend, end1 := copyToBackend(backend, client, idle, act)
	r := <-back
	end := end1
	if end == "done" {
		end = r.end
	}
	return relayResult{toBackend: toBackend, toClient: r.n, end: end}
}

// copyToBackend and copyToClient are the two directions, named so that
// goroutine dumps say which way a stuck copy was going.
func copyToBackend(backend, client *net.TCPConn, idle time.Duration, act *activity) (int64, string) {
	return pipe(backend, client, "client", idle, act)
}

func copyToClient(client, backend *net.TCPConn, idle time.Duration, act *activity) (int64, string) {
	return pipe(client, backend, "backend", idle, act)
}

// pipe copies src to dst until src's EOF, then half-closes dst.
//
// The idle timeout is a read deadline on src, re-armed every quarter
// period. When it fires, the kernel's per-socket receive counters tell
// whether anything moved on either socket in either direction since the
// last check; only a connection silent in both directions for the whole
// period is closed. Read deadlines are safe with splice: a timeout ends
// the copy between chunks, never with bytes held in the pipe.
func pipe(dst, src *net.TCPConn, srcName string, idle time.Duration, act *activity) (int64, string) {
	var total int64
	tick := idle / 4
	// The counters are first read at the first tick, not here: most
	// connections end before one, and reading them costs two syscalls.
	// A first reading that differs from zero counts as activity, which
	// at worst delays the idle verdict by one tick.
	var lastSeen uint64
	lastChange := time.Now()
	for {
		if idle > 0 {
			src.SetReadDeadline(time.Now().Add(tick))
		}
		n, err := dst.ReadFrom(src)
		total += n
		if err == nil { // src reached EOF
			dst.CloseWrite()
			return total, "done"
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) || act.closed() {
			// Record why before closing: closing wakes the other
			// direction with "use of closed connection", which is a
			// consequence, not the cause.
			act.close(endReason(err, srcName))
			src.Close()
			dst.Close()
			return total, act.reason()
		}
		now := time.Now()
		if c := act.count(); n > 0 || c != lastSeen {
			lastSeen, lastChange = c, now
			continue
		}
		if now.Sub(lastChange) >= idle {
			act.close("idle_timeout")
			src.Close()
			dst.Close()
			return total, act.reason()
		}
	}
}

// endReason names what ended a relay for the access log. Resets are how
// many clients hang up, so they get a plain name rather than an error.
func endReason(err error, srcName string) string {
	switch {
	case errors.Is(err, syscall.ECONNRESET):
		return srcName + "_reset"
	case errors.Is(err, syscall.EPIPE):
		if srcName == "client" {
			return "backend_reset"
		}
		return "client_reset"
	case errors.Is(err, net.ErrClosed):
		return "closed" // shutdown grace expired
	}
	return "error: " + err.Error()
}
