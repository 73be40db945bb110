package l7

import (
	"bufio"
	"bytes"
	"net"
	"sync"
	"sync/atomic"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// relayPeer is one side of the relay: reads happen on one goroutine only,
// writes from any goroutine under mu.
type relayPeer struct {
	conn net.Conn
	br   *bufio.Reader
	fr   *http2.Framer
	hdec *headerDecoder
	// received counts the bytes read from conn, for the relay's stall
	// check: bytes, not frames, so that a large frame arriving slowly
	// counts as moving. Only the reading goroutine adds to it.
	received atomic.Uint64

	mu       sync.Mutex
	bw       pooledWriter
	enc      *hpack.Encoder
	encBuf   bytes.Buffer
	maxFrame uint32 // the peer's SETTINGS_MAX_FRAME_SIZE, for header blocks
}

func newRelayPeer(c net.Conn, maxHeaderList uint32) *relayPeer {
	p := &relayPeer{
		conn:     c,
		bw:       pooledWriter{conn: c},
		maxFrame: defaultMaxFrameSize,
	}
	p.br = bufio.NewReaderSize(countingReader{c, &p.received}, relayBufferSize)
	p.fr = http2.NewFramer(&p.bw, p.br)
	// The protocol's default until the peer's SETTINGS say more
	// (NewFramer's own default is the 16 MiB maximum).
	p.fr.SetMaxReadFrameSize(defaultMaxFrameSize)
	p.fr.SetReuseFrames()
	p.hdec = newHeaderDecoder(maxHeaderList)
	p.enc = hpack.NewEncoder(&p.encBuf)
	return p
}

// write runs fn, which writes frames, under p's lock. A write error means
// the peer is gone: its connection is closed, so that its reading side
// ends the relay.
func (p *relayPeer) write(fn func() error) {
	p.mu.Lock()
	err := fn()
	p.mu.Unlock()
	if err != nil {
		p.conn.Close()
	}
}

func (p *relayPeer) flush() {
	p.write(p.bw.Flush)
}

// pooledWriter buffers writes to conn in a bufio.Writer borrowed from a
// pool while there is something to send, and gives it back on Flush, so
// an idle connection holds no write buffer. Used under relayPeer.mu.
type pooledWriter struct {
	conn net.Conn
	bw   *bufio.Writer
}

var relayWriters = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, relayBufferSize) }}

func (w *pooledWriter) Write(p []byte) (int, error) {
	if w.bw == nil {
		w.bw = relayWriters.Get().(*bufio.Writer)
		w.bw.Reset(w.conn)
	}
	return w.bw.Write(p)
}

func (w *pooledWriter) Flush() error {
	if w.bw == nil {
		return nil
	}
	err := w.bw.Flush()
	if err == nil {
		w.bw.Reset(nil)
		relayWriters.Put(w.bw)
		w.bw = nil
	}
	// After an error the buffer stays: bufio keeps failing every later
	// write with it, which is what the relay wants of a dead peer.
	return err
}

// writeHeaders encodes fields and writes them as one HEADERS frame and as
// many CONTINUATIONs as the peer's frame size needs. Called with p.mu
// held, so that the block is contiguous on the wire and encoded in the
// order it is sent.
func (p *relayPeer) writeHeaders(id uint32, fields []hpack.HeaderField, end bool, prio http2.PriorityParam) error {
	p.encBuf.Reset()
	for _, f := range fields {
		p.enc.WriteField(f)
	}
	block := p.encBuf.Bytes()
	max := int(p.maxFrame)
	if !prio.IsZero() {
		max -= 5
	}
	frag := block[:min(len(block), max)]
	block = block[len(frag):]
	err := p.fr.WriteHeaders(http2.HeadersFrameParam{
		StreamID:      id,
		BlockFragment: frag,
		EndStream:     end,
		EndHeaders:    len(block) == 0,
		Priority:      prio,
	})
	for err == nil && len(block) > 0 {
		frag = block[:min(len(block), int(p.maxFrame))]
		block = block[len(frag):]
		err = p.fr.WriteContinuation(id, len(block) == 0, frag)
	}
	return err
}

var zeroPadding [255]byte

// forwardData writes f to p unchanged, padding included, so that both
// hops count the same bytes against flow control.
func (p *relayPeer) forwardData(f *http2.DataFrame) {
	data := f.Data()
	var pad []byte
	if f.Flags.Has(http2.FlagDataPadded) {
		pad = zeroPadding[:int(f.Length)-len(data)-1]
	}
	p.write(func() error { return p.fr.WriteDataPadded(f.StreamID, f.StreamEnded(), data, pad) })
}

// credit returns n bytes of connection-level window to p, for DATA the
// relay dropped.
func (p *relayPeer) credit(n uint32) {
	if n > 0 {
		p.write(func() error { return p.fr.WriteWindowUpdate(0, n) })
	}
}

// countingReader adds the bytes read from r to n.
type countingReader struct {
	r net.Conn
	n *atomic.Uint64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		c.n.Add(uint64(n))
	}
	return n, err
}
