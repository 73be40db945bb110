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
	rc.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			n = info.Bytes_received + info.Bytes_acked
		}
	})
	return n
}
