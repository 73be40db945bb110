package proxy

import (
	"errors"
	"io"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// spliceAvailable says bulk directions switch to splice here.
const spliceAvailable = true

// maxSplice is the most one chunk moves; the pipe is sized to hold it,
// and it is also the cap on the destination's unsent bytes (see
// limitUnsent). 256 KiB rather than more: every spliced direction pins
// up to this much in its pipe and again in its send queue, a non-root
// user's pipe quota (fs.pipe-user-pages-soft, 64 MiB) holds four times
// as many pipes of this size as of 1 MiB, and in the benchmark the
// endpoints spent less CPU per byte with less data in flight between
// them (bench/README.md). 64 KiB helped the endpoints a little more and
// cost the relay a fifth more CPU per byte.
const maxSplice = 256 << 10

// minPipe is the smallest pipe worth splicing through. A pipe that holds
// less than one read chunk moves bulk data in more system calls than the
// read/write path it would replace, and the kernel does hand out such
// pipes (two pages) to a non-root user over fs.pipe-user-pages-soft.
const minPipe = chunkSize

var (
	errSpliceStalled = errors.New("splice: pipe holds data the kernel will not move")
	errPipeTooSmall  = errors.New("splice: the kernel gave a pipe smaller than a read chunk")
)

// splicer moves one direction's bulk data socket → pipe → socket with
// splice(2), so the payload never enters user space. Like the
// small-message path it calls the kernel directly (see rawRead) and
// waits for readiness through the sockets' RawConns, so deadlines and
// closes interrupt it as they do a read or a write. The pipe is made
// with the splicer and kept until the direction ends; it is empty
// between chunks, except after a write that timed out, whose rest the
// next chunk writes first.
type splicer struct {
	src, dst syscall.RawConn
	rfd, wfd int // the pipe's ends; -1 once closed

	inPipe, moved int
	err           error
	drain, pump   func(uintptr) bool // method values made once, not per chunk
}

// newSplicer makes the direction's pipe. It fails when no usable pipe
// can be had: the descriptor limit is reached, or the user's pipe quota
// leaves only a pipe smaller than minPipe. The caller then keeps the
// direction on read/write, which needs no pipe.
//
//go:noinline (keeps step's frame, and so every relay goroutine's stack, small)
func newSplicer(d *direction) (*splicer, error) {
	s := &splicer{src: d.rc, dst: d.wrc}
	if err := s.open(); err != nil {
		return nil, err
	}
	s.drain, s.pump = s.drainInto, s.pumpOut
	return s, nil
}

// chunk moves what src holds now, up to maxSplice bytes, through the
// pipe to dst; or, if a write timed out last time, what the pipe still
// holds. It returns io.EOF at src's end of stream.
func (s *splicer) chunk() (int64, error) {
	s.moved, s.err = 0, nil
	if s.inPipe == 0 {
		if err := s.src.Read(s.drain); err != nil {
			return 0, err
		}
		if s.err != nil {
			return 0, os.NewSyscallError("splice", s.err)
		}
		if s.inPipe == 0 {
			return 0, io.EOF
		}
	}
	err := s.dst.Write(s.pump)
	switch {
	case err != nil:
	case s.err == errSpliceStalled:
		err = s.err
	case s.err != nil:
		err = dstError{os.NewSyscallError("splice", s.err)}
	}
	return int64(s.moved), err
}

// drainInto is handed to src's RawConn.Read: one splice from the socket
// into the empty pipe; false (wait for readability) when there is
// nothing to read yet.
func (s *splicer) drainInto(fd uintptr) bool {
	for {
		n, err := rawSplice(int(fd), s.wfd, maxSplice)
		switch err {
		case nil:
			s.inPipe = n
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		default:
			s.err = err
			return true
		}
	}
}

// pumpOut is handed to dst's RawConn.Write: splice the pipe into the
// socket until it is empty, waiting for room when the socket is full.
func (s *splicer) pumpOut(fd uintptr) bool {
	for s.inPipe > 0 {
		n, err := rawSplice(s.rfd, int(fd), s.inPipe)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return false
		case err != nil:
			s.err = err
			return true
		case n == 0:
			s.err = errSpliceStalled
			return true
		}
		s.inPipe -= n
		s.moved += n
	}
	return true
}

func (s *splicer) open() error {
	var p [2]int32
	if _, _, e := syscall.RawSyscall(unix.SYS_PIPE2, uintptr(unsafe.Pointer(&p)), syscall.O_CLOEXEC|syscall.O_NONBLOCK, 0); e != 0 {
		return os.NewSyscallError("pipe2", e)
	}
	s.rfd, s.wfd = int(p[0]), int(p[1])
	// A larger pipe moves a bulk burst in one call. Growing it fails for
	// a non-root user over fs.pipe-user-pages-soft; the pipe the kernel
	// gave is still worth using unless it is smaller than a read chunk.
	if _, _, e := syscall.RawSyscall(unix.SYS_FCNTL, uintptr(s.rfd), unix.F_SETPIPE_SZ, maxSplice); e != 0 {
		size, _, e := syscall.RawSyscall(unix.SYS_FCNTL, uintptr(s.rfd), unix.F_GETPIPE_SZ, 0)
		if e != 0 || size < minPipe {
			s.close()
			return errPipeTooSmall
		}
	}
	s.dst.Control(limitUnsent)
	return nil
}

// limitUnsent caps the bytes dst's send queue holds that TCP has not
// sent yet at one pipe's worth (TCP_NOTSENT_LOWAT). Without it a
// direction whose receiver is slower than its sender lets that queue
// grow to net.ipv4.tcp_wmem's maximum (4 MiB by default) of pages the
// sender's kernel filled and cannot reuse until the receiver has read
// them. Measured with both ends on one host, the sender and receiver
// then spent about a third more CPU per byte than with no proxy between
// them; with the cap, about as much as without a proxy. Bytes in flight
// are not counted, so unlike a smaller SO_SNDBUF this does not shrink
// the window a long fat path needs; the cost is a wakeup per half a
// pipe drained. Kernels without the option keep the old queue.
func limitUnsent(fd uintptr) {
	v := int32(maxSplice)
	syscall.RawSyscall6(syscall.SYS_SETSOCKOPT, fd, syscall.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, uintptr(unsafe.Pointer(&v)), 4, 0)
}

// close releases the pipe, if any; whatever it still holds belonged to
// a connection that is failing anyway. A nil splicer has nothing to
// release.
func (s *splicer) close() {
	if s != nil && s.rfd >= 0 {
		closeFD(s.rfd)
		closeFD(s.wfd)
		s.rfd, s.wfd = -1, -1
	}
}

func rawSplice(in, out, n int) (int, error) {
	r, _, e := syscall.RawSyscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), unix.SPLICE_F_NONBLOCK)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}
