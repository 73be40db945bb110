package proxy

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// relayResult is what a finished relay reports for the access log and
// the byte counters.
type relayResult struct {
	toBackend, toClient int64
	end                 string // done, idle_timeout, client_reset, backend_reset, closed, or "error: …"
}

// startRelay copies both directions between the raw sockets in two
// goroutines and calls finish from the last of them once both are done.
// Each direction ends by half-closing its destination, so a client that
// shuts its write side still receives the whole reply. Neither goroutine
// outlives the connection.
//
// The arguments are *net.TCPConn on purpose: (*net.TCPConn).ReadFrom with
// a *net.TCPConn source is what lets the runtime use splice(2), so bulk
// payload never enters user space. Wrapping either side would silently
// fall back to a read/write loop through a buffer.
func startRelay(client, backend *net.TCPConn, idle time.Duration, finish func(relayResult)) {
	j := &relayJob{client: client, backend: backend, idle: idle, act: newActivity(client, backend), finish: finish}
	j.pending.Store(2)
	go j.copyToBackend()
	go j.copyToClient()
}

// relayJob is one relay's shared state.
type relayJob struct {
	client, backend *net.TCPConn
	idle            time.Duration
	act             *activity
	finish          func(relayResult)

	pending             atomic.Int32
	toBackend, toClient int64     // each written by its own direction
	ends                [2]string // why each direction ended
}

// copyToBackend and copyToClient are the two directions, named so that
// goroutine dumps say which way a stuck copy was going.
func (j *relayJob) copyToBackend() {
	j.toBackend, j.ends[0] = pipe(j.backend, j.client, "client", j.idle, j.act)
	j.done()
}

func (j *relayJob) copyToClient() {
	j.toClient, j.ends[1] = pipe(j.client, j.backend, "backend", j.idle, j.act)
	j.done()
}

// done runs finish when the second direction ends; the atomic counter
// orders both directions' writes before finish reads them.
func (j *relayJob) done() {
	if j.pending.Add(-1) != 0 {
		return
	}
	end := j.ends[0]
	if end == "done" {
		end = j.ends[1]
	}
	j.finish(relayResult{toBackend: j.toBackend, toClient: j.toClient, end: end})
}

// chunkSize is the read/write buffer for small messages. A read that
// fills it means bulk data is flowing, and the direction switches to
// splice for the rest of the connection.
const chunkSize = 16 << 10

// chunks lends read/write buffers only while a chunk is in flight, so an
// idle relay holds no buffer.
var chunks = sync.Pool{New: func() any { b := make([]byte, chunkSize); return &b }}

// pipe copies src to dst until src's EOF, then half-closes dst.
//
// It starts with plain read/write: a TLS handshake and small
// request/response exchanges are cheaper that way than through a splice
// pipe (two splice calls and pipe bookkeeping per message), and a relay
// waiting in this mode holds neither a buffer nor a pipe. The first read
// that fills a whole chunk switches the direction to splice, where bulk
// payload stays in the kernel.
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
	var armed time.Time // the read deadline now set on src
	spliced := false
	rc, err := src.SyscallConn()
	if err != nil {
		spliced = true
	}
	cr := &chunkReader{}
	read := cr.read // one method value per direction, not one per chunk
	for {
		if idle > 0 {
			// Re-arming costs a timer update; do it only when the
			// deadline is more than half used.
			if now := time.Now(); armed.Sub(now) < tick/2 {
				armed = now.Add(tick)
				src.SetReadDeadline(armed)
			}
		}
		var n int64
		var err error
		if spliced {
			n, err = dst.ReadFrom(src)
			if err == nil {
				err = io.EOF // ReadFrom ends cleanly only at src's EOF
			}
		} else {
			var full bool
			n, full, err = copyChunk(dst, rc, cr, read)
			spliced = full
		}
		total += n
		if n > 0 {
			lastChange = time.Now()
		}
		if err == nil {
			continue
		}
		if err == io.EOF {
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
		armed = time.Time{}
		now := time.Now()
		if c := act.count(); c != lastSeen {
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

// chunkReader reads one chunk from a raw socket into a pooled buffer.
// Its read method is handed to RawConn.Read, which parks the goroutine
// until the socket is readable (honouring the read deadline) before the
// buffer is taken; one chunkReader per direction, reused per chunk.
type chunkReader struct {
	buf *[]byte
	got int
	err error
}

func (cr *chunkReader) read(fd uintptr) bool {
	cr.buf = chunks.Get().(*[]byte)
	for {
		cr.got, cr.err = syscall.Read(int(fd), *cr.buf)
		if cr.err != syscall.EINTR {
			break
		}
	}
	if cr.err == syscall.EAGAIN {
		chunks.Put(cr.buf)
		cr.buf = nil
		return false // not readable after all: wait again
	}
	return true
}

// copyChunk waits until src is readable, reads once and writes what it
// got to dst. full reports a read that filled the buffer. It returns
// io.EOF at src's end of stream.
func copyChunk(dst *net.TCPConn, src syscall.RawConn, cr *chunkReader, read func(uintptr) bool) (n int64, full bool, err error) {
	if err := src.Read(read); err != nil {
		if cr.buf != nil {
			chunks.Put(cr.buf)
			cr.buf = nil
		}
		return 0, false, err
	}
	buf := cr.buf
	cr.buf = nil
	defer chunks.Put(buf)
	if cr.err != nil {
		return 0, false, os.NewSyscallError("read", cr.err)
	}
	if cr.got == 0 {
		return 0, false, io.EOF
	}
	w, err := dst.Write((*buf)[:cr.got])
	return int64(w), cr.got == len(*buf), err
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
