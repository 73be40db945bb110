package proxyproto

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
)

// fuzzTrailer follows the fuzzed bytes as the ClientHello would, so Read
// always has more bytes to (wrongly) take.
const fuzzTrailer = "\x16\x03\x01SENTINEL"

func FuzzReadV1(f *testing.F) {
	for _, tc := range validHeaders {
		if strings.HasPrefix(tc.in, "PROXY") {
			f.Add(tc.in)
		}
	}
	for _, s := range []string{
		"",
		"PROXY",
		"PROXY \r\n",
		"PROXY UNKNOWN",
		"PROXY UNKNOWN\r",
		"PROXY UNKNOWN\n",
		"PROXY UNKNOWNX\r\n",
		"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",
		"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n",
		"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n",
		"PROXY TCP4 ::1 ::2 1 2\r\n",
		"PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n",
		"PROXY TCP6 fe80::1%eth0 ::2 1 2\r\n",
		"PROXY TCP6 ::ffff:1.2.3.4 ::ffff:5.6.7.8 1 2\r\n",
		"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
		"PROXY TCP4 192.0.2.1 198.51.100.2 +1 2\r\n",
		"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r\r\n",
		"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
		"PROXY UNKNOWN " + strings.Repeat("x", 100) + "\r\n",
		"GET / HTTP/1.1\r\n\r\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		checkRead(t, []byte(s))
	})
}

func FuzzReadV2(f *testing.F) {
	for _, tc := range validHeaders {
		if !strings.HasPrefix(tc.in, "PROXY") {
			f.Add([]byte(tc.in))
		}
	}
	for _, b := range [][]byte{
		v2Raw(0x11, famTCP4, v4Block),
		v2Raw(0x22, famTCP4, v4Block),
		v2Raw(0x21, 0x13, v4Block),
		v2Raw(0x21, famTCP4, v4Block[:11]),
		v2Raw(0x21, famTCP6, make([]byte, 35)),
		v2Raw(0x21, famTCP4, v4Block, []byte{0x04, 0x00}),
		v2Raw(0x21, famTCP4, v4Block, []byte{0x04, 0x00, 0x02, 'x'}),
		v2Raw(0x20, 0x13),
		append(v2Sig[:], 0x21, 0x11, 0xff, 0xff),
		append(v2Sig[:], 0x21, 0x11, 0x08, 0x00),
		v2Sig[:7],
		[]byte("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
	} {
		f.Add(b)
	}
	f.Fuzz(checkRead)
}

// checkRead holds Read's properties on any input: no panic, the same result
// however the bytes are split across reads, never a byte read past a header
// it accepts, and a result that survives re-encoding with AppendV2.
func checkRead(t *testing.T, data []byte) {
	in := append(bytes.Clone(data), fuzzTrailer...)
	cr := &countingReader{r: bytes.NewReader(in)}
	h, err := Read(cr)

	h1, err1 := Read(iotest.OneByteReader(bytes.NewReader(in)))
	if fmt.Sprint(err) != fmt.Sprint(err1) || !reflect.DeepEqual(h, h1) {
		t.Fatalf("Read depends on read sizes: %+v, %v vs one byte at a time %+v, %v", h, err, h1, err1)
	}
	// The Parser, fed as an event loop feeds it, is Read.
	for _, chunk := range []int{1, 7} {
		hp, errp, n := feed(in, chunk)
		if fmt.Sprint(err) != fmt.Sprint(errp) || !reflect.DeepEqual(h, hp) || (err == nil && n != cr.n) {
			t.Fatalf("Parser in %d-byte pieces: %+v, %v after %d bytes; Read: %+v, %v after %d", chunk, hp, errp, n, h, err, cr.n)
		}
	}
	if err != nil {
		if h != nil {
			t.Fatalf("Read returned header %+v with error %v", h, err)
		}
		return
	}

	// Read consumed exactly one header: those bytes alone parse the same
	// (no lookahead), and without their last byte they are a truncated
	// header (nothing read past its end). The trailer may legitimately be
	// part of the header when the input's length field says so.
	if h2, err := Read(bytes.NewReader(in[:cr.n])); err != nil || *h2 != *h {
		t.Fatalf("header bytes alone: %+v, %v; want %+v", h2, err, h)
	}
	if _, err := Read(bytes.NewReader(in[:cr.n-1])); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("Read consumed %d bytes, but %q is already %v", cr.n, in[:cr.n-1], err)
	}
	if h.Version != 1 && h.Version != 2 {
		t.Fatalf("version %d", h.Version)
	}
	switch h.Command {
	case Proxy:
		for _, a := range []netip.AddrPort{h.Source, h.Destination} {
			if !a.IsValid() || a.Addr().Is4In6() || a.Addr().Zone() != "" {
				t.Fatalf("Proxy header with address %v", a)
			}
		}
	case Local:
		if h.Source.IsValid() || h.Destination.IsValid() {
			t.Fatalf("Local header with addresses %+v", h)
		}
	default:
		t.Fatalf("command %d", h.Command)
	}

	b := AppendV2(nil, h.Source, h.Destination, "app.example.com")
	cr = &countingReader{r: bytes.NewReader(append(b, fuzzTrailer...))}
	h2, err := Read(cr)
	if err != nil {
		t.Fatalf("Read(AppendV2(%+v)) = %v", h, err)
	}
	if cr.n != len(b) {
		t.Fatalf("Read(AppendV2(…)) consumed %d of %d bytes", cr.n, len(b))
	}
	if h2.Command != h.Command || h2.Source != h.Source || h2.Destination != h.Destination {
		t.Fatalf("round trip through v2: %+v, want %+v", h2, h)
	}
}
