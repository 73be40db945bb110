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
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"
)

// relayResult is what a finished relay reports for the access log and
// the byte counters.
type relayResult struct {
	toBackend, toClient int64
	end                 string // done, idle_timeout, client_reset, backend_reset, closed, or "error: …"
}

// relayJob copies both directions between the raw sockets in two
// goroutines and calls finish from the last of them once both are done.
// Each direction ends by half-closing its destination, so a client that
// shuts its write side still receives the whole reply. Neither goroutine
// outlives the connection. On Linux a relay starts in an event loop
// (loop_linux.go) and comes here once it carries bulk data.
//
// The sockets are *net.TCPConn on purpose: the relay works on the
// sockets themselves (their file descriptors, through syscall.RawConn),
// which is what lets bulk payload move with splice(2) and never enter
// user space. A wrapped connection would have no socket to splice.
//
// noPipe counts directions that moved bulk data without splice because
// no pipe could be had (see newSplicer).
func newRelayJob(client, backend *net.TCPConn, idle time.Duration, noPipe prometheus.Counter, finish func(relayResult)) *relayJob {
	return &relayJob{client: client, backend: backend, idle: idle, noPipe: noPipe, act: newActivity(client, backend), finish: finish}
}

// start runs the directions not yet done in goroutines of their own:
// both for a relay that starts here, the rest for one an event loop
// hands over (see eventLoop.migrate).
func (j *relayJob) start() {
	live := int32(2)
	for i, done := range j.dirDone {
		if done {
			live--
			j.ends[i] = "done"
			j.act.lastEOF()
		}
	}
	j.pending.Store(live)
	if !j.dirDone[0] {
		go j.copyToBackend()
	}
	if !j.dirDone[1] {
		go j.copyToClient()
	}
}

// relayJob is one goroutine relay's shared state.
type relayJob struct {
	client, backend *net.TCPConn
	idle            time.Duration
	noPipe          prometheus.Counter
	act             *activity
	finish          func(relayResult)

	// Set by an event loop that relayed the connection's first bytes
	// (see eventLoop.migrate): a direction already done, and bytes read
	// but not yet written, which the direction writes first.
	dirDone [2]bool
	seeds   [2]seed

	pending             atomic.Int32
	toBackend, toClient int64     // each written by its own direction
	ends                [2]string // why each direction ended
}

// seed is a pooled chunk holding bytes read from a direction's source:
// buf[off:n] is not written yet.
type seed struct {
	buf    *[]byte
	off, n int
}

// copyToBackend and copyToClient are the two directions, named so that
// goroutine dumps say which way a stuck copy was going.
func (j *relayJob) copyToBackend() {
	n, end := pipe(j.backend, j.client, "client", j.idle, j.act, j.noPipe, j.seeds[0])
	j.toBackend += n
	j.ends[0] = end
	j.done()
}

func (j *relayJob) copyToClient() {
	n, end := pipe(j.client, j.backend, "backend", j.idle, j.act, j.noPipe, j.seeds[1])
	j.toClient += n
	j.ends[1] = end
	j.done()
}

// done runs finish when the last direction ends; the atomic counter
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
// The idle timeout is a read deadline on src and a write deadline on
// dst, re-armed every quarter period: a direction can be stuck either
// waiting for its source or waiting for its destination to take more (a
// client that stopped reading). When one fires, the kernel's per-socket
// counters of bytes received and bytes acknowledged tell whether
// anything moved on either socket in either direction since the last
// check; only a connection silent in both directions for the whole
// period is closed. A write that times out keeps what it has not written
// yet, in its buffer or pipe, and the next step writes that first.
func pipe(dst, src *net.TCPConn, srcName string, idle time.Duration, act *activity, noPipe prometheus.Counter, first seed) (int64, string) {
	var total int64
	tick := idle / 4
	// The counters are first read at the first tick, not here: most
	// connections end before one, and reading them costs two syscalls.
	// A first reading that differs from zero counts as activity, which
	// at worst delays the idle verdict by one tick.
	var lastSeen uint64
	lastChange := time.Now()
	var armed time.Time // the read deadline now set on src, and the write deadline on dst
	d, err := newDirection(dst, src)
	if err != nil { // only for a connection already closed
		if first.buf != nil {
			chunks.Put(first.buf)
		}
		act.close(endReason(err, srcName))
		src.Close()
		dst.Close()
		return 0, act.reason()
	}
	if first.buf != nil {
		// Written before anything is read; a chunk the loop read whole
		// reports full, and the direction goes on by splice.
		d.pending = first.buf
		d.cw = chunkWriter{p: (*first.buf)[:first.n], n: first.off}
	}
	for {
		if idle > 0 {
			// Re-arming costs a timer update; do it only when the
			// deadline is more than half used.
			if now := time.Now(); armed.Sub(now) < tick/2 {
				armed = now.Add(tick)
				src.SetReadDeadline(armed)
				dst.SetWriteDeadline(armed)
			}
		}
		n, err := d.step(noPipe)
		total += n
		if n > 0 {
			lastChange = time.Now()
		}
		if err == nil {
			continue
		}
		if err == io.EOF {
			d.sp.close()
			// The second direction to reach EOF leaves its FIN to the
			// close of both sockets that follows at once; a shutdown(2)
			// first would be a system call for nothing, and one that
			// fails when the peer has already reset.
			if !act.lastEOF() {
				d.closeWrite()
			}
			return total, "done"
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) || act.closed() {
			// Record why before closing: closing wakes the other
			// direction with "use of closed connection", which is a
			// consequence, not the cause.
			return total, d.fail(act, endReason(err, srcName))
		}
		armed = time.Time{}
		now := time.Now()
		if c := act.count(); c != lastSeen {
			lastSeen, lastChange = c, now
			continue
		}
		if now.Sub(lastChange) >= idle {
			return total, d.fail(act, "idle_timeout")
		}
	}
}

// direction is one direction's copying state. It lives on the heap, not
// in pipe's frame: every byte of that frame is on the stack of each idle
// relay goroutine, and a frame a little larger pushes them past their
// first 2 KiB of stack.
type direction struct {
	dst, src *net.TCPConn
	rc, wrc  syscall.RawConn
	cr       chunkReader
	cw       chunkWriter
	pending  *[]byte            // the chunk cw is writing, kept across a write timeout
	read     func(uintptr) bool // cr.read and cw.write, made once
	write    func(uintptr) bool
	sp       *splicer // from the first full chunk on
	pipeless bool     // no pipe could be had: read/write to the end
}

//go:noinline (see direction)
func newDirection(dst, src *net.TCPConn) (*direction, error) {
	d := &direction{dst: dst, src: src}
	var err error
	if d.rc, err = src.SyscallConn(); err != nil {
		return nil, err
	}
	if d.wrc, err = dst.SyscallConn(); err != nil {
		return nil, err
	}
	d.read, d.write = d.cr.read, d.cw.write
	return d, nil
}

// step copies one chunk: by read/write until a read fills a whole
// chunk, by splice from then on. A direction that cannot get a pipe (the
// descriptor limit, the user's pipe quota) stays on read/write rather
// than fail a connection that can still be relayed; it does not try
// again, so a process short of descriptors is not asked for one more
// per chunk.
func (d *direction) step(noPipe prometheus.Counter) (int64, error) {
	if d.sp != nil {
		return d.sp.chunk()
	}
	n, full, err := d.copyChunk()
	if full && spliceAvailable && !d.pipeless {
		var perr error
		if d.sp, perr = newSplicer(d); perr != nil {
			d.pipeless = true
			noPipe.Inc()
			// Still bulk: cap the destination's unsent queue as a
			// splicer would (see limitUnsent).
			d.wrc.Control(limitUnsent)
		}
	}
	return n, err
}

// fail ends the direction for reason and closes both sockets, which also
// wakes the other direction.
func (d *direction) fail(act *activity, reason string) string {
	d.sp.close()
	act.close(reason)
	d.src.Close()
	d.dst.Close()
	return act.reason()
}

// closeWrite half-closes dst with a raw shutdown(2) (see rawRead). A
// socket already closed has nothing left to half-close.
func (d *direction) closeWrite() {
	d.wrc.Control(func(fd uintptr) {
		syscall.RawSyscall(syscall.SYS_SHUTDOWN, fd, syscall.SHUT_WR, 0)
	})
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
		cr.got, cr.err = rawRead(fd, *cr.buf)
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
// got to dst. full reports a chunk that filled the buffer, once all of
// it is written. It returns io.EOF at src's end of stream. When the
// write times out, the chunk stays pending and the next call writes the
// rest of it before reading again.
func (d *direction) copyChunk() (n int64, full bool, err error) {
	cr, cw := &d.cr, &d.cw
	if d.pending == nil {
		if err := d.rc.Read(d.read); err != nil {
			if cr.buf != nil {
				chunks.Put(cr.buf)
				cr.buf = nil
			}
			return 0, false, err
		}
		buf := cr.buf
		cr.buf = nil
		if cr.err != nil || cr.got == 0 {
			chunks.Put(buf)
			if cr.err != nil {
				return 0, false, os.NewSyscallError("read", cr.err)
			}
			return 0, false, io.EOF
		}
		d.pending = buf
		*cw = chunkWriter{p: (*buf)[:cr.got]}
	}
	before := cw.n
	err = d.wrc.Write(d.write)
	n = int64(cw.n - before)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return n, false, err
	}
	full = len(cw.p) == len(*d.pending)
	cw.p = nil
	chunks.Put(d.pending)
	d.pending = nil
	if err == nil && cw.err != nil {
		err = dstError{os.NewSyscallError("write", cw.err)}
	}
	return n, err == nil && full, err
}

// chunkWriter writes one chunk to a raw socket, waiting for room when
// the socket is full.
type chunkWriter struct {
	p   []byte
	n   int
	err error
}

func (cw *chunkWriter) write(fd uintptr) bool {
	for cw.n < len(cw.p) {
		w, err := rawWrite(fd, cw.p[cw.n:])
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return false
		case err != nil:
			cw.err = err
			return true
		}
		cw.n += w
	}
	return true
}

// rawRead and rawWrite call read(2) and write(2) on a non-blocking
// socket without the Go scheduler's system-call bookkeeping. They never
// block, so the scheduler loses nothing by not knowing; and that
// bookkeeping wakes the runtime's monitor thread (sysmon) from its deep
// sleep on the first system call after all threads were idle, which a
// relay waking for each message otherwise pays in context switches:
// about 3 of the 10 per short connection in the benchmark.
func rawRead(fd uintptr, p []byte) (int, error)  { return rawIO(syscall.SYS_READ, fd, p) }
func rawWrite(fd uintptr, p []byte) (int, error) { return rawIO(syscall.SYS_WRITE, fd, p) }

func rawIO(trap, fd uintptr, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	r, _, e := syscall.RawSyscall(trap, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

// dstError marks an error from writing to a direction's destination, so
// that a reset it reports is blamed on the destination's peer, not the
// source's: a write to a socket whose peer reset it fails with
// ECONNRESET first and EPIPE after.
type dstError struct{ err error }

func (e dstError) Error() string { return e.err.Error() }
func (e dstError) Unwrap() error { return e.err }

// endReason names what ended a relay for the access log. Resets are how
// many clients hang up, so they get a plain name rather than an error.
func endReason(err error, srcName string) string {
	dstName := "client"
	if srcName == "client" {
		dstName = "backend"
	}
	switch {
	case errors.Is(err, syscall.EPIPE),
		errors.Is(err, syscall.ECONNRESET) && errors.As(err, new(dstError)):
		return dstName + "_reset"
	case errors.Is(err, syscall.ECONNRESET):
		return srcName + "_reset"
	case errors.Is(err, net.ErrClosed):
		return "closed" // shutdown grace expired
	}
	return "error: " + err.Error()
}

// relay starts an L4 connection's relay in one of the Server's event
// loops, or in goroutines where there are none.
func (s *Server) relay(socks *sockets, client, backend *net.TCPConn, idle time.Duration, finish func(relayResult)) {
	s.loops.relay(socks, client, backend, idle, s.metrics.noPipe, finish)
}

func (ls *eventLoops) relay(socks *sockets, client, backend *net.TCPConn, idle time.Duration, noPipe prometheus.Counter, finish func(relayResult)) {
	if l := ls.pick(); l != nil && l.adopt(socks, client, backend, idle, noPipe, finish) {
		return
	}
	newRelayJob(client, backend, idle, noPipe, finish).start()
}
