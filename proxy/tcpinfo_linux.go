package proxy

import (
	"net"

	"golang.org/x/sys/unix"
)

// bytesMoved reads how many bytes the socket has received and how many
// of those it sent the peer has acknowledged (tcpi_bytes_received and
// tcpi_bytes_acked, Linux 4.1+): together, whether anything moved on it
// either way.
func bytesMoved(c *net.TCPConn) uint64 {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0
	}
	var n uint64
	rc.Control(func(fd uintptr) { n = bytesMovedFD(int(fd)) })
	return n
}

// bytesMovedFD is bytesMoved of a bare descriptor.
func bytesMovedFD(fd int) uint64 {
	if fd < 0 {
		return 0
	}
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0
	}
	return info.Bytes_received + info.Bytes_acked
}
