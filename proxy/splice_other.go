//go:build !linux

package proxy

import (
	"io"
	"net"
)

// splicer hands the rest of a bulk direction to the runtime's own copy,
// which uses whatever zero-copy path the platform has.
type splicer struct{ dst, src *net.TCPConn }

func newSplicer(d *direction) (*splicer, error) {
	return &splicer{dst: d.dst, src: d.src}, nil
}

func (s *splicer) chunk() (int64, error) {
	n, err := s.dst.ReadFrom(s.src)
	if err == nil {
		err = io.EOF // ReadFrom ends cleanly only at src's EOF
	}
	return n, err
}

func (s *splicer) close() {}

// limitUnsent is Linux's TCP_NOTSENT_LOWAT cap; elsewhere the send
// queue keeps the platform's own limit.
func limitUnsent(uintptr) {}
