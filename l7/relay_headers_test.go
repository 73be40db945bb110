package l7

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// headerFrames encodes each block with one HPACK encoder (so later blocks
// may refer to entries of earlier ones) and frames it as HEADERS plus
// CONTINUATIONs of at most frag bytes each.
func headerFrames(t *testing.T, frag int, blocks ...[]hpack.HeaderField) *http2.Framer {
	t.Helper()
	var wire, buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	fw := http2.NewFramer(&wire, nil)
	for i, fields := range blocks {
		buf.Reset()
		for _, f := range fields {
			enc.WriteField(f)
		}
		block := buf.Bytes()
		id := uint32(2*i + 1)
		first := block[:min(len(block), frag)]
		rest := block[len(first):]
		fw.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first, EndStream: true, EndHeaders: len(rest) == 0})
		for len(rest) > 0 {
			n := min(len(rest), frag)
			fw.WriteContinuation(id, n == len(rest), rest[:n])
			rest = rest[n:]
		}
	}
	fr := http2.NewFramer(nil, &wire)
	fr.SetMaxReadFrameSize(1 << 20)
	return fr
}

func readBlock(t *testing.T, d *headerDecoder, fr *http2.Framer) (*headerBlock, error) {
	t.Helper()
	f, err := fr.ReadFrame()
	if err != nil {
		t.Fatal(err)
	}
	return d.read(fr, f.(*http2.HeadersFrame))
}

// The relay's header decoder refuses what RFC 9113 section 8.2 calls
// malformed as a stream error, after decoding the whole block, so the
// next block (which may refer to entries the bad one added) still
// decodes.
func TestHeaderDecoderChecks(t *testing.T) {
	good := reqFields("GET", "/next", "x-added", "by-the-bad-block")
	tests := []struct {
		name   string
		fields []hpack.HeaderField
		want   error
	}{
		{"valid", reqFields("GET", "/", "x-a", "1"), nil},
		{"pseudo after regular", append(fields("x-a", "1"), reqFields("GET", "/")...), errPseudoAfterRegular},
		{"unknown pseudo", reqFields("GET", "/", ":foo", "bar"), errBadPseudo},
		{"repeated pseudo", append(reqFields("GET", "/"), fields(":path", "/again")...), errBadPseudo},
		{"upper-case name", reqFields("GET", "/", "X-Upper", "1"), errBadFieldName},
		{"empty name", reqFields("GET", "/", "", "1"), errBadFieldName},
		{"newline in value", reqFields("GET", "/", "x-a", "1\r\nx-b: 2"), errBadFieldValue},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// The bad block adds "x-added" to the table; the good one
			// after it refers to that entry.
			bad := append(append([]hpack.HeaderField{}, tt.fields...), fields("x-added", "by-the-bad-block")...)
			fr := headerFrames(t, 16, bad, good)
			d := newHeaderDecoder(maxHeaderBytes)
			blk, err := readBlock(t, d, fr)
			var se http2.StreamError
			switch {
			case tt.want == nil && err != nil:
				t.Fatalf("valid block: %v", err)
			case tt.want == nil:
				if blk.pseudo != pseudoMethod|pseudoScheme|pseudoAuthority|pseudoPath || blk.pseudoValue("path") != "/" {
					t.Errorf("pseudo bits %b, path %q", blk.pseudo, blk.pseudoValue("path"))
				}
			case !errors.As(err, &se) || se.Code != http2.ErrCodeProtocol || se.StreamID != 1 || !errors.Is(se.Cause, tt.want):
				t.Fatalf("err = %v, want a PROTOCOL_ERROR stream error on stream 1 caused by %v", err, tt.want)
			}
			blk, err = readBlock(t, d, fr)
			if err != nil || len(blk.fields) != len(good) || blk.fields[len(good)-1] != good[len(good)-1] {
				t.Fatalf("the block after: %v, %v; HPACK out of step", err, blk)
			}
		})
	}
}

func TestHeaderDecoderLimits(t *testing.T) {
	t.Run("list over the limit is truncated", func(t *testing.T) {
		// Each field fits; together they do not.
		v := string(bytes.Repeat([]byte("a"), 200))
		big := reqFields("GET", "/", "x-1", v, "x-2", v, "x-3", v)
		fr := headerFrames(t, 100, big, reqFields("GET", "/small"))
		d := newHeaderDecoder(512)
		blk, err := readBlock(t, d, fr)
		if err != nil || !blk.truncated {
			t.Fatalf("err %v, block %+v; want a truncated block", err, blk)
		}
		if blk, err = readBlock(t, d, fr); err != nil || blk.truncated || blk.pseudoValue("path") != "/small" {
			t.Fatalf("the block after: %v, %+v", err, blk)
		}
	})
	t.Run("one field longer than the whole limit is a connection error", func(t *testing.T) {
		fr := headerFrames(t, 100, reqFields("GET", "/", "x-big", string(bytes.Repeat([]byte("a"), 600))))
		_, err := readBlock(t, newHeaderDecoder(512), fr)
		var ce http2.ConnectionError
		if !errors.As(err, &ce) || http2.ErrCode(ce) != http2.ErrCodeCompression {
			t.Fatalf("err = %v, want connection error COMPRESSION_ERROR", err)
		}
	})
	t.Run("a flood of CONTINUATIONs is a connection error", func(t *testing.T) {
		// Never indexed, so every field is on the wire in full: far
		// more bytes than a 1 KiB list can justify.
		var fields []hpack.HeaderField
		for range 2000 {
			fields = append(fields, hpack.HeaderField{Name: "x-flood", Value: string(bytes.Repeat([]byte("f"), 100)), Sensitive: true})
		}
		fr := headerFrames(t, 1000, fields)
		_, err := readBlock(t, newHeaderDecoder(1024), fr)
		var ce http2.ConnectionError
		if !errors.As(err, &ce) || http2.ErrCode(ce) != http2.ErrCodeProtocol {
			t.Fatalf("err = %v, want connection error PROTOCOL_ERROR", err)
		}
	})
	t.Run("undecodable HPACK is a connection error", func(t *testing.T) {
		var wire bytes.Buffer
		fw := http2.NewFramer(&wire, nil)
		fw.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte{0xff, 0xff, 0xff, 0xff}, EndHeaders: true})
		fr := http2.NewFramer(nil, &wire)
		_, err := readBlock(t, newHeaderDecoder(maxHeaderBytes), fr)
		var ce http2.ConnectionError
		if !errors.As(err, &ce) || http2.ErrCode(ce) != http2.ErrCodeCompression {
			t.Fatalf("err = %v, want connection error COMPRESSION_ERROR", err)
		}
	})
}

// A relay peer's write buffer is borrowed only while there is something
// to send: after a flush an idle connection holds none. After a failed
// flush it is kept, so every later write fails the same way.
func TestPooledWriter(t *testing.T) {
	var out bytes.Buffer
	w := pooledWriter{conn: writerConn{w: &out}}
	if err := w.Flush(); err != nil || w.bw != nil {
		t.Fatalf("flush with nothing written: %v, buffer %v", err, w.bw)
	}
	w.Write([]byte("frame"))
	if w.bw == nil || out.Len() != 0 {
		t.Fatalf("after a write: buffer %v, %d bytes sent", w.bw, out.Len())
	}
	if err := w.Flush(); err != nil || w.bw != nil || out.String() != "frame" {
		t.Fatalf("after a flush: %v, buffer %v, sent %q", err, w.bw, out.String())
	}

	broken := pooledWriter{conn: writerConn{w: failingWriter{}}}
	broken.Write([]byte("frame"))
	if err := broken.Flush(); err == nil || broken.bw == nil {
		t.Fatalf("failed flush: %v, buffer %v; want the error and the buffer kept", err, broken.bw)
	}
	if _, err := broken.Write([]byte("more")); err == nil {
		t.Fatal("a write after a failed flush succeeded")
	}
}

// writerConn is a net.Conn that only writes, to w.
type writerConn struct {
	net.Conn
	w io.Writer
}

func (c writerConn) Write(p []byte) (int, error) { return c.w.Write(p) }

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("peer gone") }
