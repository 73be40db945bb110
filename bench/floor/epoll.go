package main

import (
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"syscall"
	"unsafe"
)

func serveEpoll(listen, backend string) error {
	baddr, err := netip.ParseAddrPort(backend)
	if err != nil {
		return fmt.Errorf("-backend must be IP:port for -model epoll: %w", err)
	}
	laddr, err := netip.ParseAddrPort(listen)
	if err != nil {
		return fmt.Errorf("-listen must be IP:port for -model epoll: %w", err)
	}
	loops := runtime.GOMAXPROCS(0)
	errs := make(chan error, loops)
	for range loops {
		l, err := newLoop(laddr, baddr)
		if err != nil {
			return err
		}
		go func() { errs <- l.run() }()
	}
	return <-errs
}

// loop is one event loop: a listener of its own (the kernel spreads new
// connections over the loops' SO_REUSEPORT sockets) and the connections
// it accepted.
type loop struct {
	ep, ln  int
	backend rawSockaddr
	conns   map[int32]*econn // by either socket's descriptor
	buf     []byte           // read buffer shared by every connection
}

// side is one socket of a connection and what the loop knows of it.
// Readiness is edge-triggered: a flag stays set until a call says
// EAGAIN (or a short read drains the socket).
type side struct {
	fd                 int
	readable, writable bool
	peerClosed         bool // EPOLLRDHUP seen: read until EOF
	eof                bool // read returned 0
	shut               bool // SHUT_WR sent
}

type econn struct {
	client, backend side
	hello           []byte // the ClientHello record as it arrives
	dialed          bool
	connected       bool
	toBackend       []byte // read from the client, not yet written
	toClient        []byte
}

func newLoop(laddr, baddr netip.AddrPort) (*loop, error) {
	family, lsa := sockaddr(laddr)
	ln, err := syscall.Socket(family, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	const soReusePort = 0xf
	for _, opt := range []int{syscall.SO_REUSEADDR, soReusePort} {
		if err := syscall.SetsockoptInt(ln, syscall.SOL_SOCKET, opt, 1); err != nil {
			return nil, err
		}
	}
	if err := syscall.Bind(ln, lsa); err != nil {
		return nil, fmt.Errorf("bind %s: %w", laddr, err)
	}
	if err := syscall.Listen(ln, 4096); err != nil {
		return nil, err
	}
	ep, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	if err := syscall.EpollCtl(ep, syscall.EPOLL_CTL_ADD, ln, &syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(ln)}); err != nil {
		return nil, err
	}
	return &loop{ep: ep, ln: ln, backend: newRawSockaddr(baddr), conns: map[int32]*econn{}, buf: make([]byte, 64<<10)}, nil
}

func sockaddr(a netip.AddrPort) (int, syscall.Sockaddr) {
	if a.Addr().Is4() {
		return syscall.AF_INET, &syscall.SockaddrInet4{Port: int(a.Port()), Addr: a.Addr().As4()}
	}
	return syscall.AF_INET6, &syscall.SockaddrInet6{Port: int(a.Port()), Addr: a.Addr().As16()}
}

// run waits for the loop's epoll descriptor to become readable through
// the runtime's poller (so no thread blocks in epoll_wait and the
// scheduler's monitor has no system call to retake), then handles
// every ready event with a non-blocking epoll_wait.
func (l *loop) run() error {
	if err := syscall.SetNonblock(l.ep, true); err != nil {
		return err
	}
	f := os.NewFile(uintptr(l.ep), "epoll")
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	events := make([]syscall.EpollEvent, 256)
	for {
		err := rc.Read(func(uintptr) bool {
			n := epollPoll(l.ep, events)
			for _, ev := range events[:n] {
				l.handle(ev)
			}
			return n > 0
		})
		if err != nil {
			return err
		}
	}
}

func (l *loop) handle(ev syscall.EpollEvent) {
	if int(ev.Fd) == l.ln {
		l.accept()
		return
	}
	c := l.conns[ev.Fd]
	if c == nil {
		return
	}
	s := &c.client
	if int(ev.Fd) == c.backend.fd {
		s = &c.backend
	}
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
	switch {
	case !c.dialed:
		l.readHello(c)
	case !c.connected:
		if s != &c.backend || !s.writable {
			return // the client's bytes wait for the connect
		}
		if failed {
			l.close(c)
			return
		}
		c.connected = true
		l.pump(c)
	default:
		l.pump(c)
	}
}

func (l *loop) accept() {
	for {
		r, _, e := syscall.RawSyscall6(syscall.SYS_ACCEPT4, uintptr(l.ln), 0, 0, syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0, 0)
		fd := int(r)
		if e != 0 {
			return // EAGAIN, or a failure the next edge retries
		}
		c := &econn{client: side{fd: fd, readable: true, writable: true}, backend: side{fd: -1}}
		if !l.register(c, fd) {
			rawClose(fd)
			continue
		}
		l.readHello(c)
	}
}

// epollET is EPOLLET as the uint32 epoll_event wants it (syscall's
// constant is negative).
const epollET = 1 << 31

// register adds fd to the loop, edge-triggered, and turns off Nagle as
// Go's net package does for every TCP socket.
func (l *loop) register(c *econn, fd int) bool {
	one := int32(1)
	syscall.RawSyscall6(syscall.SYS_SETSOCKOPT, uintptr(fd), syscall.IPPROTO_TCP, syscall.TCP_NODELAY, uintptr(unsafe.Pointer(&one)), 4, 0)
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLOUT | syscall.EPOLLRDHUP | epollET, Fd: int32(fd)}
	if _, _, e := syscall.RawSyscall6(syscall.SYS_EPOLL_CTL, uintptr(l.ep), syscall.EPOLL_CTL_ADD, uintptr(fd), uintptr(unsafe.Pointer(&ev)), 0, 0); e != 0 {
		return false
	}
	l.conns[int32(fd)] = c
	return true
}

// readHello reads the first TLS record, header and then exactly its
// length, and then connects to the backend.
func (l *loop) readHello(c *econn) {
	for {
		need := 5
		if len(c.hello) >= 5 {
			need = 5 + recordLen(c.hello)
			if len(c.hello) == need {
				break
			}
		}
		n, err := rawRead(c.client.fd, l.buf[:need-len(c.hello)])
		if err == syscall.EAGAIN {
			return
		}
		if err != nil || n == 0 {
			l.close(c)
			return
		}
		c.hello = append(c.hello, l.buf[:n]...)
	}
	r, _, e := syscall.RawSyscall(syscall.SYS_SOCKET, uintptr(l.backend.family), syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if e != 0 {
		l.close(c)
		return
	}
	fd := int(r)
	c.backend.fd = fd
	c.dialed = true
	c.toBackend, c.hello = c.hello, nil
	// Registered only after connect: a socket not yet connecting polls
	// as hung up.
	err := l.backend.connect(fd)
	if (err != nil && err != syscall.EINPROGRESS) || !l.register(c, fd) {
		l.close(c)
		return
	}
	if err == nil {
		c.connected, c.backend.writable = true, true
		l.pump(c)
	}
	// Otherwise EPOLLOUT (or EPOLLERR) says how the connect went.
}

// pump moves what can move both ways and closes the connection once
// both directions are done or one fails.
func (l *loop) pump(c *econn) {
	if !l.move(&c.client, &c.backend, &c.toBackend) || !l.move(&c.backend, &c.client, &c.toClient) {
		l.close(c)
		return
	}
	if c.client.shut && c.backend.shut {
		l.close(c)
	}
}

// move copies src to dst until one of them would block, writing what
// is pending first, and half-closes dst after src's EOF.
func (l *loop) move(src, dst *side, pending *[]byte) bool {
	for {
		if len(*pending) > 0 {
			if !dst.writable {
				return true
			}
			n, err := rawWrite(dst.fd, *pending)
			switch {
			case err == syscall.EAGAIN:
				dst.writable = false
				return true
			case err != nil:
				return false
			case n < len(*pending):
				*pending = (*pending)[n:]
				dst.writable = false
				return true
			}
			*pending = nil
		}
		if src.eof {
			if !dst.shut {
				dst.shut = true
				syscall.RawSyscall(syscall.SYS_SHUTDOWN, uintptr(dst.fd), syscall.SHUT_WR, 0)
			}
			return true
		}
		if !src.readable {
			return true
		}
		n, err := rawRead(src.fd, l.buf)
		switch {
		case err == syscall.EAGAIN:
			src.readable = false
			return true
		case err != nil:
			return false
		case n == 0:
			src.eof = true
			continue
		case n < len(l.buf) && !src.peerClosed:
			// A short read emptied the socket; the next arrival is a
			// new edge. After EPOLLRDHUP keep reading to the EOF, which
			// brings no edge of its own.
			src.readable = false
		}
		w := 0
		if dst.writable {
			w, err = rawWrite(dst.fd, l.buf[:n])
			if err != nil && err != syscall.EAGAIN {
				return false
			}
		}
		if w < n {
			dst.writable = false
			*pending = append(*pending, l.buf[w:n]...)
			return true
		}
	}
}

func (l *loop) close(c *econn) {
	for _, fd := range []int{c.client.fd, c.backend.fd} {
		if fd >= 0 {
			delete(l.conns, int32(fd))
			rawClose(fd) // also leaves the epoll set
		}
	}
}

// Every system call on a connection is raw: none blocks (the sockets
// are non-blocking), so the scheduler's system-call bookkeeping is not
// needed, and it is not free. The first such call after the process sat
// idle wakes the scheduler's monitor thread, which then runs every 20 µs
// until the process is idle again. A trial build that made only accept4
// a syscall.Syscall spent about 45 µs more CPU per connection, and its
// load generator more too.
func rawClose(fd int) { syscall.RawSyscall(syscall.SYS_CLOSE, uintptr(fd), 0, 0) }

func rawRead(fd int, p []byte) (int, error)  { return rawIO(syscall.SYS_READ, fd, p) }
func rawWrite(fd int, p []byte) (int, error) { return rawIO(syscall.SYS_WRITE, fd, p) }

func rawIO(trap uintptr, fd int, p []byte) (int, error) {
	r, _, e := syscall.RawSyscall(trap, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p)))
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

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

// rawSockaddr is the backend's address as connect(2) takes it, made once.
type rawSockaddr struct {
	family int
	addr   syscall.RawSockaddrAny
	len    uintptr
}

func newRawSockaddr(a netip.AddrPort) rawSockaddr {
	var r rawSockaddr
	port := [2]byte{byte(a.Port() >> 8), byte(a.Port())} // network byte order
	if a.Addr().Is4() {
		sa := (*syscall.RawSockaddrInet4)(unsafe.Pointer(&r.addr))
		sa.Family, sa.Addr = syscall.AF_INET, a.Addr().As4()
		*(*[2]byte)(unsafe.Pointer(&sa.Port)) = port
		r.family, r.len = syscall.AF_INET, syscall.SizeofSockaddrInet4
		return r
	}
	sa := (*syscall.RawSockaddrInet6)(unsafe.Pointer(&r.addr))
	sa.Family, sa.Addr = syscall.AF_INET6, a.Addr().As16()
	*(*[2]byte)(unsafe.Pointer(&sa.Port)) = port
	r.family, r.len = syscall.AF_INET6, syscall.SizeofSockaddrInet6
	return r
}

func (r *rawSockaddr) connect(fd int) error {
	_, _, e := syscall.RawSyscall(syscall.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&r.addr)), r.len)
	if e != 0 {
		return e
	}
	return nil
}
