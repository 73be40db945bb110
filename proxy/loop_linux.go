package proxy

import (
	"errors"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// An L4 relay starts in an event loop, not in goroutines of its own.
// Most connections only ever carry small messages (a TLS handshake, a
// request, a response) and then sit idle or close. A goroutine per
// direction holds a stack for all that time; a loop holds an idle relay
// in a few hundred bytes (8.5 KiB per idle proxied connection became
// 2.8 in the benchmark) and serves every ready connection from one
// wakeup. The first read that fills a whole chunk means bulk data: the
// loop then hands the connection to the goroutine relay (relayJob),
// which splices.
//
// A connection the loop took from its accept (see handshake_linux.go)
// is a pair of bare descriptors the loop owns: it alone calls the
// kernel on them and closes them, under mu, and a hard shutdown asks it
// to (loopConn.cut). Those of a relay handed over as *net.TCPConns it
// borrows: every system call on them goes through RawConn.Control
// (which holds the descriptor open against a concurrent Close), and
// closing them is net's Close as everywhere else. A hard shutdown that
// closes them tells the loop through loopConn.cut.

// eventLoops are a Server's loops, one per GOMAXPROCS, started with the
// first relay and stopped by Shutdown.
type eventLoops struct {
	mu      sync.Mutex
	loops   atomic.Pointer[[]*eventLoop]
	stopped bool
	next    atomic.Uint32
	failing bool        // the last try to start them failed
	warn    func(error) // told when they cannot start (once until they do)
}

// pick returns the loop for a new relay, or nil when relays must run in
// goroutines: the loops could not start (the process is out of
// descriptors; the next relay tries again), or the Server shut down.
func (ls *eventLoops) pick() *eventLoop {
	all := ls.loops.Load()
	if all == nil {
		all = ls.startLoops()
		if all == nil {
			return nil
		}
	}
	return (*all)[ls.next.Add(1)%uint32(len(*all))]
}

func (ls *eventLoops) startLoops() *[]*eventLoop {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if all := ls.loops.Load(); all != nil || ls.stopped {
		return all
	}
	var all []*eventLoop
	for range runtime.GOMAXPROCS(0) {
		l, err := newEventLoop()
		if err != nil {
			// Not stop: their run goroutines were never started, so
			// nothing would close done.
			for _, l := range all {
				l.file.Close()
			}
			if !ls.failing && ls.warn != nil {
				ls.warn(err)
			}
			ls.failing = true
			return nil
		}
		all = append(all, l)
	}
	for _, l := range all {
		go l.run()
		go l.finish()
	}
	ls.failing = false
	ls.loops.Store(&all)
	return &all
}

// stop ends the loops' goroutines. The Server calls it once no
// connection is left, so no loop holds one.
func (ls *eventLoops) stop() {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	ls.stopped = true
	if all := ls.loops.Swap(nil); all != nil {
		for _, l := range *all {
			l.stop()
		}
	}
}

// eventLoop is one epoll instance and the relays registered with it.
// Everything about its connections happens under mu: the loop's event
// batches, a relay's arrival, an idle check and a hard cut.
type eventLoop struct {
	ep   int
	file *os.File // ep, waited on through the runtime's poller
	done chan struct{}

	// The finisher goroutine runs what an ending relay leaves to do (its
	// access log line, counters, the connection's bookkeeping), never
	// the loop: a log write that blocks (a log pipe nobody reads) must
	// not stop every relay of the loop, as it stopped only the relay
	// that was ending when relays had goroutines of their own.
	wake     chan struct{} // the finisher has work; buffered 1
	quit     chan struct{}
	finished chan struct{}

	mu     sync.Mutex
	after  []func() // for the finisher
	conns  map[uint32]*loopConn
	nextID uint32
	buf    []byte // the read buffer, shared by every connection
	idleQs map[time.Duration]*idleQueue
	// deadlineQs hold handshakes by their deadline's length:
	// handshake_timeout while the ClientHello is read, dial_timeout
	// while the backend's connect is.
	deadlineQs map[time.Duration]*idleQueue
	epoch      time.Time     // the idle checks' clock starts here
	sys        loopCall      // the system call in progress, under mu
	call       func(uintptr) // sys.run, made once
}

func newEventLoop() (*eventLoop, error) {
	ep, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	if err := syscall.SetNonblock(ep, true); err != nil {
		syscall.Close(ep)
		return nil, err
	}
	l := &eventLoop{
		ep:     ep,
		file:   os.NewFile(uintptr(ep), "epoll"),
		done:   make(chan struct{}),
		conns:  map[uint32]*loopConn{},
		buf:    make([]byte, chunkSize),
		idleQs: map[time.Duration]*idleQueue{},

		deadlineQs: map[time.Duration]*idleQueue{},
		epoch:      time.Now(),

		wake:     make(chan struct{}, 1),
		quit:     make(chan struct{}),
		finished: make(chan struct{}),
	}
	l.sys.ep, l.call = ep, l.sys.run
	return l, nil
}

func (l *eventLoop) stop() {
	l.mu.Lock()
	for _, qs := range []map[time.Duration]*idleQueue{l.idleQs, l.deadlineQs} {
		for _, q := range qs {
			q.timer.Stop()
		}
	}
	l.mu.Unlock()
	l.file.Close()
	<-l.done
	close(l.quit)
	<-l.finished
}

// finish runs what relays left to do, in the order they left it, until
// stop; what is queued then still runs.
func (l *eventLoop) finish() {
	defer close(l.finished)
	for {
		select {
		case <-l.wake:
		case <-l.quit:
			l.mu.Lock()
			after := l.takeAfter()
			l.mu.Unlock()
			runAll(after)
			return
		}
		l.mu.Lock()
		after := l.takeAfter()
		l.mu.Unlock()
		runAll(after)
	}
}

// later queues f for the finisher. The caller holds mu.
func (l *eventLoop) later(f func()) {
	l.after = append(l.after, f)
	select {
	case l.wake <- struct{}{}:
	default: // already woken; it takes the whole queue
	}
}

// run waits for the epoll descriptor to become readable through the
// runtime's poller, so no thread blocks in epoll_wait (the scheduler's
// monitor would retake its P on every wait, which costs more than the
// wait), then handles what is ready with a non-blocking epoll_wait.
func (l *eventLoop) run() {
	defer close(l.done)
	rc, err := l.file.SyscallConn()
	if err != nil {
		return
	}
	events := make([]syscall.EpollEvent, 128)
	// Every registration is edge-triggered, so a batch shorter than
	// events emptied the ready list, and the next event makes the epoll
	// descriptor readable again: wait then, without asking epoll_wait
	// once more for nothing. An edge that comes while the batch is
	// handled is kept by the poller for the wait, within one Read.
	poll := func(uintptr) bool {
		for {
			l.mu.Lock()
			n := epollPoll(l.ep, events)
			for _, ev := range events[:n] {
				l.handle(ev)
			}
			l.mu.Unlock()
			if n < len(events) {
				return false
			}
		}
	}
	rc.Read(poll) // until stop closes the descriptor
}

// takeAfter returns the callbacks queued under mu, for the finisher to
// run once it has released mu.
func (l *eventLoop) takeAfter() []func() {
	after := l.after
	l.after = nil
	return after
}

func runAll(fs []func()) {
	for _, f := range fs {
		f()
	}
}

// loopConn is a relay while its loop moves its bytes. It is what an
// idle L4 connection costs besides its sockets, so it holds only what
// the loop needs; a relayJob is made if the relay moves to goroutines.
type loopConn struct {
	l               *eventLoop
	client, backend *net.TCPConn
	sock            [2]loopSocket // client, backend
	dir             [2]loopDir    // client → backend, backend → client
	toBackend       int64         // bytes written each way
	toClient        int64
	noPipe          prometheus.Counter
	finish          func(relayResult)

	idle     time.Duration
	idleQ    *idleQueue // the loop's queue for idle, if idle > 0
	prev     *loopConn  // in idleQ
	next     *loopConn
	due      time.Duration // the next idle check, on the loop's clock
	lastSeen uint64        // the kernel's byte counters at the last idle check
	quiet    time.Duration // how long they were unchanged

	id   uint32
	gone bool // finished or handed over to goroutines
	// raw: the loop owns the sockets as the bare descriptors fd
	// (client, backend; -1 if none), from their accept (see serveRaw);
	// otherwise client and backend, borrowed through sock[i].rc.
	raw   bool
	stay  bool // a raw relay net could not take (see takeNet)
	fd    [2]int32
	hs    *loopHandshake // until the relay starts, for a raw connection
	socks *sockets       // a raw connection's, told of the sockets net makes of fd
}

// loopSocket is one socket as the loop sees it. Readiness is
// edge-triggered: a flag stays set until a call says EAGAIN (or a short
// read drains the socket).
type loopSocket struct {
	rc         syscall.RawConn
	readable   bool
	writable   bool
	peerClosed bool // EPOLLRDHUP seen: read on until EOF, which brings no edge
	urgent     bool // EPOLLPRI seen: a read stops short at the urgent mark, so read on until EAGAIN
	watchOut   bool // EPOLLOUT is in the registration (only once a write would block)
}

type loopDir struct {
	pending *[]byte // a pooled chunk holding read bytes; [off:n] not written yet
	off, n  int32
	done    bool // source's EOF reached and passed on
}

// loopCall is a system call on one socket, made through
// RawConn.Control: its arguments and results live in the loop (one
// call at a time, under mu), so that a call allocates nothing and a
// connection stores none of them.
type loopCall struct {
	op  int
	p   []byte
	n   int
	err error
	ep  int
	ev  syscall.EpollEvent
}

const (
	opRead = iota
	opWrite
	opShutdown
	opAdd
	opAddWatchingOut
	opWatchOut
	opRemove
)

func (s *loopCall) run(fd uintptr) {
	s.err = nil
	switch s.op {
	case opRead:
		for {
			s.n, s.err = rawRead(fd, s.p)
			if s.err != syscall.EINTR {
				return
			}
		}
	case opWrite:
		for {
			s.n, s.err = rawWrite(fd, s.p)
			if s.err != syscall.EINTR {
				return
			}
		}
	case opShutdown:
		syscall.RawSyscall(syscall.SYS_SHUTDOWN, fd, syscall.SHUT_WR, 0)
	case opAdd:
		s.err = epollCtl(s.ep, syscall.EPOLL_CTL_ADD, int(fd), &s.ev)
	case opAddWatchingOut:
		s.ev.Events |= syscall.EPOLLOUT
		s.err = epollCtl(s.ep, syscall.EPOLL_CTL_ADD, int(fd), &s.ev)
	case opWatchOut:
		s.ev.Events |= syscall.EPOLLOUT
		s.err = epollCtl(s.ep, syscall.EPOLL_CTL_MOD, int(fd), &s.ev)
	case opRemove:
		s.err = epollCtl(s.ep, syscall.EPOLL_CTL_DEL, int(fd), &s.ev)
	}
}

// do runs op on socket i of c; an error is the system call's, or net's
// ErrClosed once the socket was closed. The caller holds mu.
func (l *eventLoop) do(c *loopConn, i int, op int) error {
	l.sys.op = op
	// The event's 64-bit data (Fd and Pad) says which connection and
	// which of its sockets became ready.
	l.sys.ev = syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLPRI | syscall.EPOLLRDHUP | epollET, Fd: int32(c.id), Pad: int32(i)}
	if c.raw {
		if c.fd[i] < 0 {
			return net.ErrClosed
		}
		l.call(uintptr(c.fd[i]))
		return l.sys.err
	}
	if err := c.sock[i].rc.Control(l.call); err != nil {
		return err
	}
	return l.sys.err
}

func (l *eventLoop) read(c *loopConn, i int, p []byte) (int, error) {
	l.sys.p = p
	err := l.do(c, i, opRead)
	l.sys.p = nil
	return l.sys.n, err
}

func (l *eventLoop) write(c *loopConn, i int, p []byte) (int, error) {
	l.sys.p = p
	err := l.do(c, i, opWrite)
	l.sys.p = nil
	return l.sys.n, err
}

// adopt starts relaying client and backend in the loop. It reports
// false if the sockets could not be registered; the caller then relays
// in goroutines.
func (l *eventLoop) adopt(socks *sockets, client, backend *net.TCPConn, idle time.Duration, noPipe prometheus.Counter, finish func(relayResult)) bool {
	c := &loopConn{l: l, client: client, backend: backend, idle: idle, noPipe: noPipe, finish: finish}
	for i, tc := range []*net.TCPConn{client, backend} {
		rc, err := tc.SyscallConn()
		if err != nil {
			return false
		}
		c.sock[i].rc, c.sock[i].writable = rc, true
	}
	l.mu.Lock()
	c.id = l.newID()
	for i := range c.sock {
		if err := l.do(c, i, opAdd); err != nil {
			if i == 1 {
				l.do(c, 0, opRemove)
			}
			l.mu.Unlock()
			return false
		}
	}
	l.conns[c.id] = c
	if idle > 0 {
		l.queue(idle, false).push(c)
	}
	l.mu.Unlock()
	// A hard shutdown that began before the hook was set has closed the
	// sockets already, and a closed socket brings no event: cut here.
	socks.loop.Store(c)
	if socks.closing.Load() {
		c.cut()
	}
	return true
}

// newID returns an ID no connection of the loop has. The caller holds
// mu.
func (l *eventLoop) newID() uint32 {
	for l.conns[l.nextID] != nil {
		l.nextID++
	}
	id := l.nextID
	l.nextID++
	return id
}

// cut ends the relay after a hard shutdown closed its sockets, or
// closes them itself if the loop holds them as bare descriptors. A
// handshake cut so is not the client's or the backend's fault:
// Shutdown's CutError counts it.
func (c *loopConn) cut() {
	l := c.l
	l.mu.Lock()
	switch {
	case c.gone:
	case c.hs != nil:
		a := c.hs.a
		l.closeHandshake(c, false)
		l.later(a.end)
	default:
		l.end(c, "closed")
	}
	l.mu.Unlock()
}

// idleQueue holds a loop's relays with one idle_timeout in the order
// their next check falls due: every check is a quarter period after the
// last, as the goroutine relay's deadlines are (see pipe), so a relay
// re-queued at the tail keeps the order, and one timer serves the
// queue. A timer per relay would cost each idle connection another
// hundred-odd bytes.
//
// A deadline queue (deadline set) holds handshakes instead, each due
// once, idle after it joined: the ClientHello's or the dial's timeout.
//
// The timer is left running when the queue empties, and the queue in
// its map: most connections are short, so a queue empties and fills
// again many times a second, and a timer made or reset for each one
// costs the runtime's timer heap, and often a wakeup of the thread
// waiting in the poller, per connection. A timer that fires early finds
// nothing due and is set for the head; one that finds the queue empty
// retires it.
type idleQueue struct {
	l        *eventLoop
	idle     time.Duration
	deadline bool
	head     loopConn // sentinel: head.next is the first due
	timer    *time.Timer
	armed    bool // timer set and not yet fired
}

// queue returns the idle queue, or the deadline queue, for d, making it
// if need be. A queue goes when its timer finds it empty, so there are
// only as many as the timeouts of connections queued lately.
func (l *eventLoop) queue(d time.Duration, deadline bool) *idleQueue {
	qs := l.queues(deadline)
	q := qs[d]
	if q == nil {
		q = &idleQueue{l: l, idle: d, deadline: deadline}
		q.head.next, q.head.prev = &q.head, &q.head
		q.timer = time.AfterFunc(time.Hour, q.fire)
		q.timer.Stop()
		qs[d] = q
	}
	return q
}

func (l *eventLoop) queues(deadline bool) map[time.Duration]*idleQueue {
	if deadline {
		return l.deadlineQs
	}
	return l.idleQs
}

// now is the loop's clock for idle checks: monotonic, and small enough
// to keep in a Duration.
func (l *eventLoop) now() time.Duration { return time.Since(l.epoch) }

// tick is the time between a relay's idle checks. config accepts any
// positive idle_timeout, and under 4ns a quarter is zero: quiet time
// would never grow, so a silent relay would never close while the
// queue's timer fired without pause. One nanosecond at least.
func (q *idleQueue) tick() time.Duration {
	if q.deadline {
		return q.idle
	}
	return max(q.idle/4, 1)
}

func (q *idleQueue) push(c *loopConn) {
	tick := q.tick()
	c.idleQ, c.due = q, q.l.now()+tick
	c.prev, c.next = q.head.prev, &q.head
	q.head.prev.next = c
	q.head.prev = c
	// An armed timer fires no later than c is due: it was set for a
	// connection queued before c.
	if !q.armed {
		q.timer.Reset(tick)
		q.armed = true
	}
}

func (q *idleQueue) remove(c *loopConn) {
	c.prev.next, c.next.prev = c.next, c.prev
	c.prev, c.next, c.idleQ = nil, nil, nil
}

// fire checks the relays now due: one that moved nothing on either
// socket, either way, for the whole period is closed; the others are
// queued again.
func (q *idleQueue) fire() {
	l := q.l
	l.mu.Lock()
	// The timer is set once, below, for the head; relays queued again
	// on the way must not set it for their own, later, check.
	q.armed = true
	now := l.now()
	tick := q.tick()
	for c := q.head.next; c != &q.head && c.due <= now; c = q.head.next {
		q.remove(c)
		if q.deadline {
			l.expire(c)
			continue
		}
		// The kernel's counters alone: every byte the loop relays was
		// received on one socket, and what it wrote is acknowledged on
		// the other. Taking the loop's own byte counts as activity first
		// would leave these stale, and the next check would see their
		// change and restart the quiet time one period late.
		if seen := c.bytesMoved(); seen != c.lastSeen {
			c.lastSeen, c.quiet = seen, 0
		} else {
			c.quiet += tick
		}
		if c.quiet >= c.idle {
			l.end(c, "idle_timeout")
			continue
		}
		q.push(c)
	}
	if first := q.head.next; first != &q.head {
		q.timer.Reset(max(first.due-now, 0))
	} else {
		q.armed = false
		if qs := l.queues(q.deadline); qs[q.idle] == q {
			delete(qs, q.idle) // found empty when its timer fired: retired
		}
	}
	l.mu.Unlock()
}

func (l *eventLoop) handle(ev syscall.EpollEvent) {
	c := l.conns[uint32(ev.Fd)]
	if c == nil || ev.Pad < 0 || ev.Pad > 1 {
		return
	}
	s := &c.sock[ev.Pad]
	failed := ev.Events&(syscall.EPOLLERR|syscall.EPOLLHUP) != 0
	if ev.Events&(syscall.EPOLLIN|syscall.EPOLLRDHUP) != 0 || failed {
		s.readable = true
	}
	if ev.Events&syscall.EPOLLOUT != 0 || failed {
		s.writable = true
	}
	if ev.Events&syscall.EPOLLRDHUP != 0 {
		s.peerClosed = true
	}
	if ev.Events&syscall.EPOLLPRI != 0 {
		// Urgent data is queued: a read stops short at its mark with
		// the rest of the stream behind it, and that rest brings no
		// new edge.
		s.readable, s.urgent = true, true
	}
	if c.hs != nil {
		l.handshake(c)
		return
	}
	l.pump(c)
}

// pump moves what can move both ways. The relay ends when both
// directions are done or one fails, and leaves for goroutines when a
// direction turns out to carry bulk data.
func (l *eventLoop) pump(c *loopConn) {
	for {
		bulk := false
		for i := range c.dir {
			if c.dir[i].done {
				continue
			}
			full, end := l.move(c, i)
			if end != "" {
				l.end(c, end)
				return
			}
			bulk = bulk || full
		}
		switch {
		case c.dir[0].done && c.dir[1].done:
			l.end(c, "done")
		case bulk && !l.migrate(c):
			continue // still here: move on until something would block
		}
		return
	}
}

var dirSource = [2]string{"client", "backend"}

// move copies direction i until its source or destination would block,
// writing what is pending first, and half-closes the destination after
// the source's EOF. full reports a read that filled the whole buffer:
// the chunk is left pending for the goroutine relay, which splices the
// rest. end is why the relay must end, if it must.
func (l *eventLoop) move(c *loopConn, i int) (full bool, end string) {
	d, src, dst := &c.dir[i], &c.sock[i], &c.sock[1-i]
	for {
		if d.pending != nil {
			if !dst.writable {
				return false, ""
			}
			w, err := l.write(c, 1-i, (*d.pending)[d.off:d.n])
			if err != nil && err != syscall.EAGAIN {
				return false, l.failure(err, i, true)
			}
			d.off += int32(w)
			c.count(i, w)
			if d.off < d.n {
				return false, l.blocked(c, i)
			}
			chunks.Put(d.pending)
			d.pending = nil
		}
		if !src.readable {
			return false, ""
		}
		n, err := l.read(c, i, l.buf)
		switch {
		case err == syscall.EAGAIN:
			src.readable, src.urgent = false, false
			return false, ""
		case err != nil:
			return false, l.failure(err, i, false)
		case n == 0:
			d.done = true
			// The second direction to reach EOF leaves its FIN to the
			// close of both sockets that follows (as pipe does).
			if !c.dir[1-i].done {
				l.do(c, 1-i, opShutdown)
			}
			return false, ""
		case n < len(l.buf) && !src.peerClosed && !src.urgent:
			// A short read emptied the socket: the next arrival is a new
			// edge.
			src.readable = false
		}
		if n == len(l.buf) {
			d.pending = chunks.Get().(*[]byte)
			d.off, d.n = 0, int32(copy(*d.pending, l.buf))
			return true, ""
		}
		w := 0
		if dst.writable {
			w, err = l.write(c, 1-i, l.buf[:n])
			if err != nil && err != syscall.EAGAIN {
				return false, l.failure(err, i, true)
			}
			c.count(i, w)
		}
		if w < n {
			d.pending = chunks.Get().(*[]byte)
			d.off, d.n = 0, int32(copy(*d.pending, l.buf[w:n]))
			return false, l.blocked(c, i)
		}
	}
}

// blocked marks direction i's destination full and makes sure its
// registration reports room.
func (l *eventLoop) blocked(c *loopConn, i int) string {
	dst := &c.sock[1-i]
	dst.writable = false
	if dst.watchOut {
		return ""
	}
	dst.watchOut = true
	if err := l.do(c, 1-i, opWatchOut); err != nil {
		return l.failure(err, i, true)
	}
	return ""
}

func (l *eventLoop) failure(err error, i int, writing bool) string {
	if errors.Is(err, net.ErrClosed) {
		return "closed"
	}
	if writing {
		err = dstError{os.NewSyscallError("write", err)}
	} else {
		err = os.NewSyscallError("read", err)
	}
	return endReason(err, dirSource[i])
}

func (c *loopConn) count(i, n int) {
	if i == 0 {
		c.toBackend += int64(n)
	} else {
		c.toClient += int64(n)
	}
}

// leave takes c out of the loop's bookkeeping.
func (l *eventLoop) leave(c *loopConn) {
	c.gone = true
	delete(l.conns, c.id)
	if c.idleQ != nil {
		c.idleQ.remove(c)
	}
}

// end closes the relay's sockets (which also takes them out of the
// epoll set) and queues its finish.
func (l *eventLoop) end(c *loopConn, why string) {
	l.leave(c)
	for i := range c.dir {
		if p := c.dir[i].pending; p != nil {
			chunks.Put(p)
			c.dir[i].pending = nil
		}
	}
	if c.raw {
		for _, fd := range c.fd {
			if fd >= 0 {
				closeFD(int(fd))
			}
		}
		c.fd = [2]int32{-1, -1}
	} else {
		c.client.Close()
		c.backend.Close()
	}
	res := relayResult{toBackend: c.toBackend, toClient: c.toClient, end: why}
	l.later(func() { c.finish(res) })
}

// migrate hands the relay to goroutines, with what each direction has
// read and not yet written, once bulk data flows.
//
// It reports false if the relay stays in the loop: a raw connection
// whose sockets net could not take, for want of descriptors.
func (l *eventLoop) migrate(c *loopConn) bool {
	if c.raw {
		if c.stay || !l.takeNet(c) {
			return false
		}
	} else {
		for i := range c.sock {
			if err := l.do(c, i, opRemove); err != nil {
				l.end(c, l.failure(err, i, false))
				return true
			}
		}
	}
	l.leave(c)
	j := newRelayJob(c.client, c.backend, c.idle, c.noPipe, c.finish)
	j.toBackend, j.toClient = c.toBackend, c.toClient
	for i, d := range c.dir {
		j.dirDone[i] = d.done
		if d.pending != nil {
			j.seeds[i] = seed{buf: d.pending, off: int(d.off), n: int(d.n)}
		}
	}
	// At once, not through the finisher: a finish blocked on a log
	// write must not hold up a transfer. start only starts goroutines.
	j.start()
	return true
}

// epollCtl is epoll_ctl(2) without the scheduler's bookkeeping (see
// rawRead). The event's Fd and Pad are its 64-bit data, which the loop
// fills with a connection ID and a socket index, not a descriptor.
func epollCtl(ep, op, fd int, ev *syscall.EpollEvent) error {
	_, _, e := syscall.RawSyscall6(syscall.SYS_EPOLL_CTL, uintptr(ep), uintptr(op), uintptr(fd), uintptr(unsafe.Pointer(ev)), 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// epollET is EPOLLET as the uint32 epoll_event wants it (syscall's
// constant is negative).
const epollET = 1 << 31

// epollPoll returns the events ready now, without waiting. It is
// epoll_pwait with no signal mask, which is epoll_wait: arm64 has only
// the former.
func epollPoll(ep int, events []syscall.EpollEvent) int {
	r, _, e := syscall.RawSyscall6(syscall.SYS_EPOLL_PWAIT, uintptr(ep), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	if e != 0 {
		return 0
	}
	return int(r)
}

// takeNet turns a raw connection's descriptors into *net.TCPConns for
// the goroutine relay, which waits through the runtime's poller, and
// takes the descriptors out of the loop. net keeps a duplicate of each
// (and makes one of its own on the way), so this needs free descriptors;
// without them it reports false and the relay stays in the loop, bulk
// and all, reading and writing through user space: counted as two
// directions without a pipe.
func (l *eventLoop) takeNet(c *loopConn) bool {
	var conns [2]*net.TCPConn
	for i, fd := range c.fd {
		dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		if err == nil {
			conns[i], err = netConn(dup, false)
		}
		if err != nil {
			if conns[0] != nil {
				conns[0].Close()
			}
			c.stay = true
			c.noPipe.Add(2)
			return false
		}
	}
	for i := range c.sock {
		l.do(c, i, opRemove)
		closeFD(int(c.fd[i]))
	}
	c.raw, c.fd, c.client, c.backend = false, [2]int32{-1, -1}, conns[0], conns[1]
	c.socks.setClient(c.client)
	c.socks.setBackend(c.backend)
	return true
}

// bytesMoved is what the idle check reads: the kernel's counters of
// both sockets.
func (c *loopConn) bytesMoved() uint64 {
	if c.raw {
		return bytesMovedFD(int(c.fd[0])) + bytesMovedFD(int(c.fd[1]))
	}
	return bytesMoved(c.client) + bytesMoved(c.backend)
}
