package l7

import (
	"bytes"
	"net"
	"net/netip"
	"testing"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// BenchmarkRelayRequestHeaders measures what the relay does with a
// request's header block apart from socket I/O: read the HEADERS frame,
// decode and check the HPACK block, build the backend's fields with the
// forwarding headers, encode them and frame them for the backend. The
// request is browser-like and the HPACK tables are warm, as they are from
// a connection's second request on.
func BenchmarkRelayRequestHeaders(b *testing.B) {
	req := reqFields("GET", "/api/items?page=2",
		"user-agent", "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0",
		"accept", "application/json",
		"accept-language", "en-US,en;q=0.9",
		"accept-encoding", "gzip, deflate, br, zstd",
		"cookie", "session=4f0c2b7e9a1d4c3b8e6f5a2d1c0b9a8e")

	// Two HEADERS frames of the same request: the first fills the
	// client's table, the second only refers to it, so it decodes the
	// same way every time.
	var wire, block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	fr := http2.NewFramer(&wire, nil)
	var firstLen int
	for id := uint32(1); id <= 3; id += 2 {
		firstLen = wire.Len()
		block.Reset()
		for _, f := range req {
			enc.WriteField(f)
		}
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block.Bytes(), EndStream: true, EndHeaders: true})
	}
	frames := wire.Bytes()
	second := frames[firstLen:]

	src := &replayReader{data: frames}
	client := newRelayPeer(discardConn{}, maxHeaderBytes)
	client.fr = http2.NewFramer(nil, src)
	backend := newRelayPeer(discardConn{}, maxResponseHeaderBytes)
	r := &relay{
		h:        &Handler{scheme: "http"},
		ci:       ConnInfo{Client: netip.MustParseAddrPort("203.0.113.7:50000")},
		clientIP: "203.0.113.7",
	}
	read := func() *headerBlock {
		f, err := client.fr.ReadFrame()
		if err != nil {
			b.Fatal(err)
		}
		blk, err := client.hdec.read(client.fr, f.(*http2.HeadersFrame))
		if err != nil {
			b.Fatal(err)
		}
		return blk
	}
	read() // the first request, which fills the decoder's table
	src.data, src.off = second, 0

	b.ReportAllocs()
	for b.Loop() {
		blk := read()
		fields, _, code, errCode := r.requestFields(blk)
		if code != 0 || errCode != http2.ErrCodeNo {
			b.Fatalf("refused: %d %v", code, errCode)
		}
		backend.write(func() error { return backend.writeHeaders(blk.streamID, fields, true, http2.PriorityParam{}) })
		backend.flush()
	}
}

// replayReader reads data over and over.
type replayReader struct {
	data []byte
	off  int
}

func (r *replayReader) Read(p []byte) (int, error) {
	n := copy(p, r.data[r.off:])
	r.off = (r.off + n) % len(r.data)
	return n, nil
}

// discardConn is a net.Conn whose writes go nowhere.
type discardConn struct{ net.Conn }

func (discardConn) Write(p []byte) (int, error) { return len(p), nil }
func (discardConn) Close() error                { return nil }
