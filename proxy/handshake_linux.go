package proxy

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/portcullis/portcullis/clienthello"
	"github.com/portcullis/portcullis/proxyproto"
)

// Connections to a listener without proxy_protocol are accepted as bare
// descriptors and taken through their handshake — ClientHello, route,
// dial, the hello's write — by an event loop, the relay's own, with raw
// system calls (see rawRead) and no goroutine. Going through net costs
// each connection a goroutine's start and two trips through the
// scheduler (the wait for the ClientHello and for the dial), and
// ordinary system calls (accept4, connect, setsockopt, the hello's reads
// and write, close): the first such call after the process sat idle
// wakes the scheduler's monitor thread, which then runs every 20 µs
// until the process is idle again. bench/README.md has the numbers.
//
// On a proxy_protocol listener the loop reads the PROXY header first
// (proxyproto.Parser), and the firewall runs once it names the client.
// What a loop does not serve itself goes to a goroutine through net:
// an L7 route, and a backend named by host name (dialing it resolves
// the name).

// rawListener is a duplicate descriptor of a listening socket, set up
// with the runtime's poller as an *os.File: net's listener has no
// RawConn.Read to wait on (it returns EINVAL).
type rawListener struct {
	file *os.File
	rc   syscall.RawConn
	sa   syscall.RawSockaddrAny // the last accepted peer; one accept loop per listener
}

func newRunningListener(addr string, ln *net.TCPListener) (*runningListener, error) {
	rl := &runningListener{addr: addr, ln: ln, done: make(chan struct{})}
	rc, err := ln.SyscallConn()
	if err != nil {
		ln.Close()
		return nil, err
	}
	dup, derr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) { dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		derr = err
	}
	if derr != nil {
		ln.Close()
		return nil, os.NewSyscallError("fcntl", derr)
	}
	// The duplicate shares the socket's non-blocking flag, so NewFile
	// registers it with the poller.
	rl.raw.file = os.NewFile(uintptr(dup), "listener")
	if rl.raw.rc, err = rl.raw.file.SyscallConn(); err != nil {
		rl.close()
		return nil, err
	}
	return rl, nil
}

func (r *rawListener) ok() bool { return r.file != nil }

func (r *rawListener) close() {
	if r.file != nil {
		r.file.Close()
	}
}

// accept waits for a connection and returns its descriptor,
// non-blocking, with Nagle off as net would leave it.
func (r *rawListener) accept() (int, netip.AddrPort, error) {
	fd := -1
	var errno syscall.Errno
	err := r.rc.Read(func(lfd uintptr) bool {
		for {
			size := uint32(unsafe.Sizeof(r.sa))
			n, _, e := syscall.RawSyscall6(syscall.SYS_ACCEPT4, lfd, uintptr(unsafe.Pointer(&r.sa)), uintptr(unsafe.Pointer(&size)), syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0, 0)
			switch e {
			case 0:
				fd = int(n)
				return true
			case syscall.EINTR, syscall.ECONNABORTED: // as net: the next one
			case syscall.EAGAIN:
				return false
			default:
				errno = e
				return true
			}
		}
	})
	if err != nil {
		// Only close makes the wait fail.
		return -1, netip.AddrPort{}, fmt.Errorf("%w: %v", net.ErrClosed, err)
	}
	if errno != 0 {
		return -1, netip.AddrPort{}, os.NewSyscallError("accept4", errno)
	}
	setNoDelay(fd)
	return fd, addrPort(&r.sa), nil
}

// addrPort reads an IPv4 or IPv6 socket address, IPv4-mapped addresses
// unmapped as everywhere else.
func addrPort(sa *syscall.RawSockaddrAny) netip.AddrPort {
	switch sa.Addr.Family {
	case syscall.AF_INET:
		in := (*syscall.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(in.Addr), ntohs(in.Port))
	case syscall.AF_INET6:
		in := (*syscall.RawSockaddrInet6)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom16(in.Addr).Unmap(), ntohs(in.Port))
	}
	return netip.AddrPort{}
}

// ntohs reads a port as the kernel stores it, in network byte order.
func ntohs(p uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&p))
	return uint16(b[0])<<8 | uint16(b[1])
}

func htons(p uint16) uint16 {
	var n uint16
	b := (*[2]byte)(unsafe.Pointer(&n))
	b[0], b[1] = byte(p>>8), byte(p)
	return n
}

// localAddr is getsockname(2) of fd.
func localAddr(fd int) netip.AddrPort {
	var sa syscall.RawSockaddrAny
	size := uint32(unsafe.Sizeof(sa))
	if _, _, e := syscall.RawSyscall(syscall.SYS_GETSOCKNAME, uintptr(fd), uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&size))); e != 0 {
		return netip.AddrPort{}
	}
	return addrPort(&sa)
}

func setNoDelay(fd int) {
	one := int32(1)
	syscall.RawSyscall6(syscall.SYS_SETSOCKOPT, uintptr(fd), syscall.IPPROTO_TCP, syscall.TCP_NODELAY, uintptr(unsafe.Pointer(&one)), 4, 0)
}

func closeFD(fd int) { syscall.RawSyscall(syscall.SYS_CLOSE, uintptr(fd), 0, 0) }

// resetFD closes fd with a reset, as reject does through net.
func resetFD(fd int) {
	lingerZero(fd)
	closeFD(fd)
}

// lingerZero makes the close of fd's socket a reset.
func lingerZero(fd int) {
	l := syscall.Linger{Onoff: 1, Linger: 0}
	syscall.RawSyscall6(syscall.SYS_SETSOCKOPT, uintptr(fd), syscall.SOL_SOCKET, syscall.SO_LINGER, uintptr(unsafe.Pointer(&l)), unsafe.Sizeof(l), 0)
}

// netConn makes a *net.TCPConn of fd, for what a loop hands to
// goroutines. fd itself is closed either way: net keeps a duplicate.
// If net cannot make one (out of descriptors) and reset is set, fd goes
// with a reset: the client of a connection dropped so must learn at
// once, as one turned away does, not read an orderly close as the
// server's answer. (Not for a duplicate of a socket that stays open:
// the option would outlive it.)
func netConn(fd int, reset bool) (*net.TCPConn, error) {
	f := os.NewFile(uintptr(fd), "")
	c, err := net.FileConn(f)
	if err != nil && reset {
		lingerZero(fd)
	}
	f.Close()
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// serveRaw takes a connection accepted as a bare descriptor: the
// firewall here, the rest in an event loop, or through net in a
// goroutine when no loop can take it.
func (s *Server) serveRaw(snap *Snapshot, lc *listenerConfig, rl *runningListener, fd int, peer netip.AddrPort) {
	a := s.newAccepted(snap, lc, rl, peer)
	// Without a PROXY header the firewall can judge the peer at once;
	// with one, the loop does once it has the header.
	why, ok := reasonBadProxyHeader, true
	var err error
	if lc.proxyProtocol {
		if ok = a.trustedSender(); !ok {
			err = errUntrustedSender
		}
	} else {
		why, ok = a.admit()
	}
	if !ok {
		resetFD(fd)
		s.rejected(rl, lc, why, peer, err)
		a.end()
		return
	}
	if l := s.loops.pick(); l != nil && l.adoptHandshake(a, fd) {
		return
	}
	c, err := netConn(fd, true)
	if err != nil {
		a.dropped(err)
		a.end()
		return
	}
	a.socks.setClient(c)
	go func() {
		c.SetReadDeadline(a.start.Add(lc.handshakeTimeout))
		if lc.proxyProtocol {
			s.handshake(a, c) // the sender was found trusted above; handshake checks again
			return
		}
		if !s.readHello(a, c) {
			a.end()
		}
	}()
}

// dropped logs a connection net could not take from a loop (out of
// descriptors), which netConn has reset.
func (a *accepted) dropped(err error) {
	a.s.rejectLog.log(a.s.log, slog.LevelError, "accept", "connection dropped", "listener", a.lc.name, "client", a.client, "err", err)
}

// loopHandshake is a connection's state in its loop until the relay
// starts.
type loopHandshake struct {
	a         *accepted
	step      int
	pp        *proxyproto.Parser // the PROXY header, on a proxy_protocol listener
	bufp      *[]byte            // the pooled buffer the ClientHello is read into
	parser    clienthello.Parser
	hello     clienthello.Hello
	r         *route
	out       []byte // what the backend is still to get before the relay: [PROXY header +] ClientHello
	dialStart time.Time
}

const (
	stepProxy = iota // reading the PROXY header
	stepHello        // reading the ClientHello
	stepDial         // waiting for the backend's connect
	stepSend         // writing out to the backend
)

// adoptHandshake takes a new connection's descriptor into the loop. It
// reports false if it could not register it; the caller still owns fd.
func (l *eventLoop) adoptHandshake(a *accepted, fd int) bool {
	bufp := helloBufs.Get().(*[]byte)
	hs := &loopHandshake{a: a, step: stepHello, bufp: bufp, parser: clienthello.NewParser(*bufp)}
	if a.lc.proxyProtocol {
		hs.step, hs.pp = stepProxy, &proxyproto.Parser{}
	}
	c := &loopConn{l: l, raw: true, fd: [2]int32{int32(fd), -1}, hs: hs, socks: a.socks, idle: a.lc.idleTimeout, noPipe: a.s.metrics.noPipe}
	// Whatever arrived before the registration brings no edge: try it.
	c.sock[0].readable, c.sock[0].writable = true, true
	l.mu.Lock()
	c.id = l.newID()
	if err := l.do(c, 0, opAdd); err != nil {
		l.mu.Unlock()
		helloBufs.Put(bufp)
		return false
	}
	l.conns[c.id] = c
	if t := a.lc.handshakeTimeout; t > 0 {
		l.queue(t, true).push(c)
	}
	// Set the hook before the handshake can go on: once it is handed
	// over (handOver), a relay in another loop sets its own, which a
	// later store of c would overwrite, leaving that relay uncut by a
	// hard shutdown.
	a.socks.loop.Store(c)
	l.handshake(c)
	l.mu.Unlock()
	// A hard shutdown that began before the hook was set has found
	// nothing to close: cut here.
	if a.socks.closing.Load() {
		c.cut()
	}
	return true
}

// handshake goes on with c's handshake after an event. The caller holds
// mu.
func (l *eventLoop) handshake(c *loopConn) {
	switch c.hs.step {
	case stepProxy:
		l.readProxy(c)
	case stepHello:
		l.readHello(c)
	case stepDial:
		if c.sock[1].writable { // EPOLLOUT, or the error that ends the connect
			l.connected(c)
		}
	case stepSend:
		l.sendHello(c)
	}
}

// readProxy reads the PROXY header, then runs the firewall on the
// client it names and goes on to the ClientHello.
func (l *eventLoop) readProxy(c *loopConn) {
	hs := c.hs
	a := hs.a
	for {
		h, done, err := hs.pp.Step()
		if done {
			if err != nil {
				l.refuse(c, reasonBadProxyHeader, err)
				return
			}
			a.takeHeader(h)
			hs.pp = nil
			if why, ok := a.admit(); !ok {
				l.refuse(c, why, nil)
				return
			}
			hs.step = stepHello
			l.readHello(c)
			return
		}
		if !c.sock[0].readable {
			return
		}
		n, err := l.read(c, 0, hs.pp.Want())
		switch {
		case err == syscall.EAGAIN:
			c.sock[0].readable = false
			return
		case err != nil:
			l.refuse(c, reasonBadProxyHeader, hs.pp.End(sockError("read", localAddr(int(c.fd[0])), a.client, err)))
			return
		case n == 0:
			l.refuse(c, reasonBadProxyHeader, hs.pp.End(io.EOF))
			return
		}
		hs.pp.Add(n)
	}
}

func (l *eventLoop) readHello(c *loopConn) {
	hs := c.hs
	for c.sock[0].readable {
		n, err := l.read(c, 0, hs.parser.Want())
		switch {
		case err == syscall.EAGAIN:
			c.sock[0].readable = false
			return
		case err != nil:
			err = sockError("read", localAddr(int(c.fd[0])), hs.a.client, err)
			l.refuse(c, reasonBadClientHello, fmt.Errorf("%w: %v", clienthello.ErrNotClientHello, err))
			return
		case n == 0:
			l.refuse(c, reasonBadClientHello, hs.parser.EOF())
			return
		}
		hello, done, err := hs.parser.Add(n)
		if err != nil {
			l.refuse(c, reasonBadClientHello, err)
			return
		}
		if done {
			hs.hello = hello
			l.routeHello(c)
			return
		}
	}
}

// routeHello looks the ClientHello's name up and dials the route's
// backend, or hands the connection to a goroutine.
func (l *eventLoop) routeHello(c *loopConn) {
	hs, a := c.hs, c.hs.a
	r := a.lc.routes.lookup(hs.hello.ServerName)
	if r == nil {
		l.refuse(c, reasonNoRoute, noRouteError(hs.hello.ServerName))
		return
	}
	r.m.conns.Inc()
	hs.r = r
	if r.l7 != nil || !r.backendAddr.IsValid() {
		l.handOver(c)
		return
	}
	if r.sendProxy && !a.local.IsValid() { // a PROXY header may have named it
		a.local = localAddr(int(c.fd[0]))
	}
	hs.out = proxyAndHello(r, a, hs.hello)
	hs.dialStart = time.Now()
	fd, err := dialRaw(r.backendAddr)
	if fd >= 0 {
		c.fd[1] = int32(fd)
	}
	if err != nil {
		l.refuse(c, reasonBackendUnreachable, dialError(r, err))
		return
	}
	c.sock[1].watchOut = true
	if err := l.do(c, 1, opAddWatchingOut); err != nil {
		l.refuse(c, reasonBackendUnreachable, dialError(r, err))
		return
	}
	hs.step = stepDial
	if c.idleQ != nil {
		c.idleQ.remove(c)
	}
	if t := a.lc.dialTimeout; t > 0 {
		l.queue(t, true).push(c)
	}
	// A connect on loopback often completes at once, but its EPOLLOUT
	// still comes; so does the error of one that fails.
}

// dialRaw starts a non-blocking connect to addr. It returns the socket,
// if one was made, with the connect's error other than EINPROGRESS.
func dialRaw(addr netip.AddrPort) (int, error) {
	family := syscall.AF_INET6
	if addr.Addr().Is4() {
		family = syscall.AF_INET
	}
	n, _, e := syscall.RawSyscall(syscall.SYS_SOCKET, uintptr(family), syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if e != 0 {
		return -1, os.NewSyscallError("socket", e)
	}
	fd := int(n)
	setNoDelay(fd)
	var sa syscall.RawSockaddrAny
	size := uintptr(syscall.SizeofSockaddrInet6)
	if family == syscall.AF_INET {
		in := (*syscall.RawSockaddrInet4)(unsafe.Pointer(&sa))
		in.Family, in.Port, in.Addr = syscall.AF_INET, htons(addr.Port()), addr.Addr().As4()
		size = syscall.SizeofSockaddrInet4
	} else {
		in := (*syscall.RawSockaddrInet6)(unsafe.Pointer(&sa))
		in.Family, in.Port, in.Addr = syscall.AF_INET6, htons(addr.Port()), addr.Addr().As16()
	}
	_, _, e = syscall.RawSyscall(syscall.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&sa)), size)
	switch e {
	case 0, syscall.EINPROGRESS:
	case syscall.EINTR:
		// As net: the connect goes on asynchronously, and its EPOLLOUT
		// comes. Another connect would fail with EALREADY.
	default:
		return fd, os.NewSyscallError("connect", e)
	}
	return fd, nil
}

// sockError says what net's Read or Write on a socket from local to
// remote would have said of errno.
func sockError(op string, local, remote netip.AddrPort, errno error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: net.TCPAddrFromAddrPort(local), Addr: net.TCPAddrFromAddrPort(remote), Err: os.NewSyscallError(op, errno)}
}

// dialError says what net's dial would have said.
func dialError(r *route, err error) error {
	return &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(r.backendAddr), Err: err}
}

// connected finishes the dial once the backend socket is writable or
// failed.
func (l *eventLoop) connected(c *loopConn) {
	hs := c.hs
	var v int32
	size := uint32(4)
	_, _, e := syscall.RawSyscall6(syscall.SYS_GETSOCKOPT, uintptr(c.fd[1]), syscall.SOL_SOCKET, syscall.SO_ERROR, uintptr(unsafe.Pointer(&v)), uintptr(unsafe.Pointer(&size)), 0)
	if e == 0 && v != 0 {
		e = syscall.Errno(v)
	}
	if e != 0 {
		l.refuse(c, reasonBackendUnreachable, dialError(hs.r, os.NewSyscallError("connect", e)))
		return
	}
	hs.r.m.dial.Observe(time.Since(hs.dialStart).Seconds())
	if c.idleQ != nil {
		c.idleQ.remove(c)
	}
	hs.step = stepSend
	l.sendHello(c)
}

// sendHello writes what the backend gets first, then starts the relay.
func (l *eventLoop) sendHello(c *loopConn) {
	hs := c.hs
	for len(hs.out) > 0 {
		if !c.sock[1].writable {
			return
		}
		n, err := l.write(c, 1, hs.out)
		switch {
		case err == syscall.EAGAIN:
			c.sock[1].writable = false
			return
		case err != nil:
			l.refuse(c, reasonBackendUnreachable, sockError("write", localAddr(int(c.fd[1])), hs.r.backendAddr, err))
			return
		}
		hs.out = hs.out[n:]
	}
	a, r := hs.a, hs.r
	sni, helloLen := hs.hello.ServerName, len(hs.hello.Raw)
	hs.release()
	c.hs = nil
	c.finish = func(res relayResult) {
		// A relay the goroutines finished has net's sockets to close;
		// one the loop ended has closed its descriptors.
		if c.client != nil {
			c.client.Close()
			c.backend.Close()
		}
		a.relayed(r, sni, helloLen, res)
	}
	if c.idle > 0 {
		l.queue(c.idle, false).push(c)
	}
	l.pump(c)
}

func (hs *loopHandshake) release() {
	if hs.bufp == nil {
		return
	}
	if c := cap(hs.hello.Raw); c > cap(*hs.bufp) && c <= 4*clienthello.BufferSize {
		*hs.bufp = hs.hello.Raw[:0] // keep a grown buffer, within reason
	}
	helloBufs.Put(hs.bufp)
	hs.bufp = nil
	hs.hello, hs.out, hs.parser = clienthello.Hello{}, nil, clienthello.Parser{}
}

// handOver gives a routed connection to a goroutine through net: L7
// routes, and backends named by host name.
func (l *eventLoop) handOver(c *loopConn) {
	hs := c.hs
	a, r := hs.a, hs.r
	l.do(c, 0, opRemove)
	l.leave(c)
	nc, err := netConn(int(c.fd[0]), true)
	if err != nil {
		hs.release()
		l.later(func() {
			a.dropped(err)
			a.end()
		})
		return
	}
	a.socks.setClient(nc)
	bufp, hello := hs.bufp, hs.hello
	hs.bufp = nil
	go func() {
		release := func() {
			if bufp != nil {
				helloBufs.Put(bufp)
				bufp = nil
			}
		}
		if !a.s.serveRoute(a, nc, r, hello, release) {
			a.end()
		}
		release()
	}()
}

// refuse turns a connection away during its handshake: reset, counted
// and logged with why, unless the hard shutdown is cutting it.
func (l *eventLoop) refuse(c *loopConn, why reason, err error) {
	a := c.hs.a
	l.closeHandshake(c, true)
	if a.cutByShutdown() {
		l.later(a.end)
		return
	}
	l.later(func() {
		a.s.rejected(a.rl, a.lc, why, a.client, err)
		a.end()
	})
}

// closeHandshake takes c out of the loop and closes its descriptors,
// the client's with a reset if reset.
func (l *eventLoop) closeHandshake(c *loopConn, reset bool) {
	l.leave(c)
	if reset {
		resetFD(int(c.fd[0]))
	} else {
		closeFD(int(c.fd[0]))
	}
	if c.fd[1] >= 0 {
		closeFD(int(c.fd[1]))
	}
	c.fd = [2]int32{-1, -1}
	c.hs.release()
}

// expire ends a handshake whose deadline passed: the ClientHello's
// (handshake_timeout) or the dial's (dial_timeout).
func (l *eventLoop) expire(c *loopConn) {
	if c.hs == nil {
		return
	}
	if c.hs.step == stepDial {
		l.refuse(c, reasonBackendUnreachable, dialError(c.hs.r, os.ErrDeadlineExceeded))
		return
	}
	// As net's read past the deadline says it.
	var err error = &net.OpError{Op: "read", Net: "tcp", Source: net.TCPAddrFromAddrPort(localAddr(int(c.fd[0]))), Addr: net.TCPAddrFromAddrPort(c.hs.a.client), Err: os.ErrDeadlineExceeded}
	if c.hs.step == stepProxy {
		err = c.hs.pp.End(err)
	}
	l.refuse(c, reasonHandshakeTimeout, err)
}
