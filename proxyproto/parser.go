package proxyproto

import (
	"errors"
	"io"
)

// Parser reads a header from bytes its caller reads as it asks, for a
// caller that cannot block in Read: an event loop reading a
// non-blocking socket stops whenever the socket would block and goes on
// once it is readable. Want says how many bytes to read next and where;
// Add takes them; Step says whether the header is complete. The
// parsing is Read's own, run again over the bytes so far: a header is
// at most MaxV2Len bytes, so even a sender that trickles it a byte at a
// time costs little.
type Parser struct {
	got  []byte
	want int // what the last Step asked for beyond got
}

// errMore is what the replayed stream says where got ends.
var errMore = errors.New("proxyproto: more bytes wanted")

// replay is got as a stream that ends with end.
type replay struct {
	p   *Parser
	b   []byte
	end error
}

func (r *replay) Read(b []byte) (int, error) {
	if len(r.b) == 0 {
		if r.end == errMore {
			r.p.want = len(b)
		}
		return 0, r.end
	}
	n := copy(b, r.b)
	r.b = r.b[n:]
	return n, nil
}

// Step parses what has arrived. It reports done with the header, or the
// error that makes the stream no valid header; otherwise Want says what
// is needed next.
func (p *Parser) Step() (h *Header, done bool, err error) {
	h, err = Read(&replay{p: p, b: p.got, end: errMore})
	if errors.Is(err, errMore) {
		return nil, false, nil
	}
	return h, true, err
}

// Want returns the buffer the next bytes go into: exactly what Read
// would ask for, so nothing past the header is ever read. Call it after
// a Step that was not done.
func (p *Parser) Want() []byte {
	n := len(p.got)
	if cap(p.got)-n < p.want {
		grown := make([]byte, n, n+p.want)
		copy(grown, p.got)
		p.got = grown
	}
	return p.got[n : n+p.want]
}

// Add takes n bytes read into Want's buffer.
func (p *Parser) Add(n int) { p.got = p.got[:len(p.got)+n] }

// End returns the error Read gives when the stream fails with err (such
// as io.EOF) after the bytes so far.
func (p *Parser) End(err error) error {
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	_, rerr := Read(&replay{p: p, b: p.got, end: err})
	return rerr
}
