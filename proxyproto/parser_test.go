package proxyproto

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// feed drives a Parser as an event loop does, handing it at most chunk
// bytes per read of src.
func feed(src []byte, chunk int) (*Header, error, int) {
	var p Parser
	read := 0
	for {
		h, done, err := p.Step()
		if done {
			return h, err, read
		}
		want := p.Want()
		if len(want) == 0 {
			return nil, errors.New("Want asked for nothing"), read
		}
		if read == len(src) {
			return nil, p.End(io.EOF), read
		}
		n := min(len(want), chunk, len(src)-read)
		copy(want, src[read:read+n])
		p.Add(n)
		read += n
	}
}

// TestParserAsRead: a header fed in pieces of any size parses, fails
// and consumes exactly as Read does on the whole stream, and never asks
// for a byte past the header.
func TestParserAsRead(t *testing.T) {
	after := []byte("\x16\x03\x01 the ClientHello")
	inputs := [][]byte{
		[]byte("PROXY TCP4 203.0.113.9 192.0.2.1 4242 443\r\n"),
		[]byte("PROXY TCP6 2001:db8::9 2001:db8::1 4242 443\r\n"),
		[]byte("PROXY UNKNOWN\r\n"),
		[]byte("PROXY TCP4 203.0.113.9 192.0.2.1 4242 443\n"),
		[]byte("PROXY TCP4 1.2.3.4\r\n"),
		[]byte("PROXY "),
		[]byte("GET / HTTP/1.1\r\n"),
		[]byte("\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\xcb\x00\x71\x09\xc0\x00\x02\x01\x10\x92\x01\xbb"),
		[]byte("\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"),
		[]byte("\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\xcb\x00"),
		[]byte("\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c"),
		{},
	}
	for _, in := range inputs {
		stream := append(append([]byte(nil), in...), after...)
		cr := &countingReader{r: bytes.NewReader(stream)}
		want, wantErr := Read(cr)
		for _, chunk := range []int{1, 3, 7, 1000} {
			got, gotErr, n := feed(stream, chunk)
			if (gotErr == nil) != (wantErr == nil) || (gotErr != nil && gotErr.Error() != wantErr.Error()) {
				t.Errorf("%q in %d-byte pieces: error %v, Read says %v", in, chunk, gotErr, wantErr)
				continue
			}
			if gotErr == nil && (got.Source != want.Source || got.Destination != want.Destination || got.Command != want.Command) {
				t.Errorf("%q in %d-byte pieces: %+v, Read says %+v", in, chunk, got, want)
			}
			if gotErr == nil && n != cr.n {
				t.Errorf("%q in %d-byte pieces: consumed %d bytes, Read %d", in, chunk, n, cr.n)
			}
		}
	}
}
