package proxy

import (
	"net"

	"golang.org/x/sys/unix"
)

// bytesReceived reads tcpi_bytes_received (Linux 4.1+) from the socket.
func bytesReceived(c *net.TCPConn) uint64 {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0
	}
	var n uint64
	rc.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			n = info.Bytes_received
		}
	})
	return n
}
