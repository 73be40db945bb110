//go:build !linux

package proxy

import "errors"

// spliceAvailable is false here: bulk directions stay on read/write,
// whose writes keep what a write timeout left unwritten (see copyChunk).
// The runtime's own (*net.TCPConn).ReadFrom would drop such a remainder.
const spliceAvailable = false

// splicer exists for the compiler only; newSplicer is never called when
// spliceAvailable is false.
type splicer struct{}

func newSplicer(*direction) (*splicer, error) {
	return nil, errors.New("splice: not on this platform")
}

func (*splicer) chunk() (int64, error) { return 0, errors.New("splice: not on this platform") }

func (*splicer) close() {}

// limitUnsent is Linux's TCP_NOTSENT_LOWAT cap; elsewhere the send
// queue keeps the platform's own limit.
func limitUnsent(uintptr) {}
