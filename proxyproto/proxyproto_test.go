package proxyproto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// trailer stands for the ClientHello that follows a header; Read must leave
// it unread.
const trailer = "HELLO"

// readers feed the same bytes through differently shaped Reads, since a
// socket may deliver a header in any number of pieces.
var readers = []struct {
	name string
	wrap func(io.Reader) io.Reader
}{
	{"whole", func(r io.Reader) io.Reader { return r }},
	{"one byte", iotest.OneByteReader},
	{"half", iotest.HalfReader},
	{"data err", iotest.DataErrReader},
}

// countingReader records how many bytes its user consumed.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// v2Raw builds a v2 header by hand, with the length field covering payload.
func v2Raw(verCmd, fam byte, payload ...[]byte) []byte {
	p := bytes.Join(payload, nil)
	b := append(v2Sig[:], verCmd, fam)
	b = binary.BigEndian.AppendUint16(b, uint16(len(p)))
	return append(b, p...)
}

// tlv builds one type-length-value entry.
func tlv(typ byte, value string) []byte {
	b := binary.BigEndian.AppendUint16([]byte{typ}, uint16(len(value)))
	return append(b, value...)
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

var (
	v4Block = []byte{192, 0, 2, 1, 198, 51, 100, 2, 0xdc, 0x04, 0x01, 0xbb} // 192.0.2.1:56324 -> 198.51.100.2:443
	v4Hdr   = Header{Version: 2, Command: Proxy, Source: ap("192.0.2.1:56324"), Destination: ap("198.51.100.2:443")}
	v6Src   = ap("[2001:db8::1]:56324")
	v6Dst   = ap("[2001:db8::2]:443")
	ffff    = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
)

// validHeaders are well-formed headers of every kind, shared by the
// round-trip, truncation and loopback tests.
var validHeaders = []struct {
	name string
	in   string
	want Header
}{
	{"v1 tcp4", "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
		Header{Version: 1, Command: Proxy, Source: ap("192.0.2.1:56324"), Destination: ap("198.51.100.2:443")}},
	{"v1 tcp6", "PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n",
		Header{Version: 1, Command: Proxy, Source: v6Src, Destination: v6Dst}},
	{"v1 tcp6 4-in-6 is unmapped", "PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 1 2\r\n",
		Header{Version: 1, Command: Proxy, Source: ap("192.0.2.1:1"), Destination: ap("[2001:db8::2]:2")}},
	{"v1 shortest tcp4", "PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
		Header{Version: 1, Command: Proxy, Source: ap("0.0.0.0:0"), Destination: ap("0.0.0.0:0")}},
	{"v1 shortest tcp6", "PROXY TCP6 :: :: 0 0\r\n",
		Header{Version: 1, Command: Proxy, Source: ap("[::]:0"), Destination: ap("[::]:0")}},
	{"v1 leading zero ports", "PROXY TCP4 192.0.2.1 198.51.100.2 00080 0443\r\n",
		Header{Version: 1, Command: Proxy, Source: ap("192.0.2.1:80"), Destination: ap("198.51.100.2:443")}},
	{"v1 longest tcp6", "PROXY TCP6 " + ffff + " " + ffff + " 65535 65535\r\n",
		Header{Version: 1, Command: Proxy, Source: netip.AddrPortFrom(netip.MustParseAddr(ffff), 65535), Destination: netip.AddrPortFrom(netip.MustParseAddr(ffff), 65535)}},
	{"v1 unknown", "PROXY UNKNOWN\r\n", Header{Version: 1, Command: Local}},
	{"v1 unknown 107 bytes", "PROXY UNKNOWN " + ffff + " " + ffff + " 65535 65535\r\n", Header{Version: 1, Command: Local}},
	{"v1 unknown junk", "PROXY UNKNOWN whatever\r\n", Header{Version: 1, Command: Local}},

	{"v2 tcp4", string(AppendV2(nil, v4Hdr.Source, v4Hdr.Destination, "")), v4Hdr},
	{"v2 tcp4 authority", string(AppendV2(nil, v4Hdr.Source, v4Hdr.Destination, "app.example.com")), v4Hdr},
	{"v2 tcp6", string(AppendV2(nil, v6Src, v6Dst, "app.example.com")),
		Header{Version: 2, Command: Proxy, Source: v6Src, Destination: v6Dst}},
	{"v2 mixed families", string(AppendV2(nil, v4Hdr.Source, v6Dst, "")),
		Header{Version: 2, Command: Proxy, Source: v4Hdr.Source, Destination: v6Dst}},
	{"v2 tcp4 every TLV kind", string(v2Raw(0x21, famTCP4, v4Block,
		tlv(0x01, "h2"), tlv(0x02, "app.example.com"), tlv(0x03, "\x00\x00\x00\x00"), tlv(0x04, ""),
		tlv(0x05, "id"), tlv(0x20, "\x05\x00\x00\x00\x00"), tlv(0x30, "ns"), tlv(0xea, "vpce-0123"))), v4Hdr},
	{"v2 tcp4 large TLV", string(v2Raw(0x21, famTCP4, v4Block, tlv(0x04, strings.Repeat("x", 1000)))), v4Hdr},
	{"v2 at MaxV2Len", string(v2Raw(0x21, famTCP4, v4Block, tlv(0x04, strings.Repeat("x", MaxV2Len-v2HeaderLen-12-3)))), v4Hdr},
	{"v2 local", string(v2Raw(0x20, famUnspec)), Header{Version: 2, Command: Local}},
	{"v2 local keeps no addresses", string(v2Raw(0x20, famTCP4, v4Block)), Header{Version: 2, Command: Local}},
	{"v2 local short block", string(v2Raw(0x20, famTCP6, []byte{1, 2, 3})), Header{Version: 2, Command: Local}},
	{"v2 local ignores TLVs", string(v2Raw(0x20, famUnspec, []byte{0x04, 0xff})), Header{Version: 2, Command: Local}},
	{"v2 local from AppendV2", string(AppendV2(nil, netip.AddrPort{}, v6Dst, "app.example.com")), Header{Version: 2, Command: Local}},
	{"v2 proxy unspec", string(v2Raw(0x21, famUnspec, tlv(0x04, ""))), Header{Version: 2, Command: Local}},
	{"v2 proxy udp4", string(v2Raw(0x21, famUDP4, v4Block)), Header{Version: 2, Command: Local}},
	{"v2 proxy unix", string(v2Raw(0x21, famUnixStream, make([]byte, 216), tlv(0x02, "a"))), Header{Version: 2, Command: Local}},
	{"v2 tcp6 4-in-6 is unmapped", string(v2Raw(0x21, famTCP6,
		[]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1},
		[]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 51, 100, 2},
		[]byte{0xdc, 0x04, 0x01, 0xbb})), v4Hdr},
}

func TestRead(t *testing.T) {
	for _, tc := range validHeaders {
		for _, rd := range readers {
			t.Run(tc.name+"/"+rd.name, func(t *testing.T) {
				src := rd.wrap(strings.NewReader(tc.in + trailer))
				h, err := Read(src)
				if err != nil {
					t.Fatalf("Read(%q): %v", tc.in, err)
				}
				if *h != tc.want {
					t.Errorf("Read(%q) = %+v, want %+v", tc.in, *h, tc.want)
				}
				if rest, _ := io.ReadAll(src); string(rest) != trailer {
					t.Errorf("after the header %q is left, want %q", rest, trailer)
				}
			})
		}
	}
}

func TestReadInvalid(t *testing.T) {
	okV1 := "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
	tests := []struct {
		name string
		in   string
		want error
	}{
		{"tls record", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + strings.Repeat("\x00", 32), ErrNoHeader},
		{"http", "GET / HTTP/1.1\r\nHost: a\r\n\r\n", ErrNoHeader},
		{"short garbage", "x", ErrNoHeader},
		{"lowercase", strings.ToLower(okV1), ErrNoHeader},
		{"PROXY without space", "PROXYTCP4 192.0.2.1 198.51.100.2 1 2\r\n", ErrNoHeader},
		{"v2 signature typo", "\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + string(v4Block), ErrNoHeader},

		{"v1 double space", "PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n", ErrInvalid},
		{"v1 double space later", "PROXY TCP4 192.0.2.1  198.51.100.2 1 2\r\n", ErrInvalid},
		{"v1 trailing space", "PROXY TCP4 192.0.2.1 198.51.100.2 1 2 \r\n", ErrInvalid},
		{"v1 too few fields", "PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n", ErrInvalid},
		{"v1 too many fields", "PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n", ErrInvalid},
		{"v1 bare LF", "PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n", ErrInvalid},
		{"v1 early LF", "PROXY UNKNOWN\n\r\n", ErrInvalid},
		{"v1 CR CR LF", "PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r\r\n", ErrInvalid},
		{"v1 CR inside", "PROXY TCP4 192.0.2.1\r198.51.100.2 1 2\r\n", ErrInvalid},
		{"v1 NUL", "PROXY TCP4 192.0.2.1 198.51.100.2 1 2\x00\r\n", ErrInvalid},
		{"v1 empty protocol", "PROXY \r\n", ErrInvalid},
		{"v1 unknown protocol", "PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n", ErrInvalid},
		{"v1 UNKNOWNX", "PROXY UNKNOWNX\r\n", ErrInvalid},
		{"v1 UDP4", "PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n", ErrInvalid},
		{"v1 tcp4 with ipv6", "PROXY TCP4 ::1 ::2 1 2\r\n", ErrInvalid},
		{"v1 tcp4 with 4-in-6", "PROXY TCP4 ::ffff:192.0.2.1 198.51.100.2 1 2\r\n", ErrInvalid},
		{"v1 tcp6 with ipv4", "PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n", ErrInvalid},
		{"v1 tcp6 zone", "PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n", ErrInvalid},
		{"v1 ipv4 leading zero", "PROXY TCP4 192.0.2.01 198.51.100.2 1 2\r\n", ErrInvalid},
		{"v1 hostname", "PROXY TCP4 localhost 198.51.100.2 1 2\r\n", ErrInvalid},
		{"v1 port too big", "PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n", ErrInvalid},
		{"v1 port six digits", "PROXY TCP4 192.0.2.1 198.51.100.2 000080 2\r\n", ErrInvalid},
		{"v1 port plus", "PROXY TCP4 192.0.2.1 198.51.100.2 +80 2\r\n", ErrInvalid},
		{"v1 port minus", "PROXY TCP4 192.0.2.1 198.51.100.2 1 -2\r\n", ErrInvalid},
		{"v1 port hex", "PROXY TCP4 192.0.2.1 198.51.100.2 0x50 2\r\n", ErrInvalid},
		{"v1 port underscore", "PROXY TCP4 192.0.2.1 198.51.100.2 8_0 2\r\n", ErrInvalid},
		{"v1 over 107 bytes", "PROXY UNKNOWN " + strings.Repeat("x", 92) + "\r\n", ErrTooLong},
		{"v1 no CRLF", "PROXY UNKNOWN " + strings.Repeat("x", 200), ErrTooLong},

		{"v2 version 1", string(v2Raw(0x11, famTCP4, v4Block)), ErrUnsupported},
		{"v2 version 3", string(v2Raw(0x31, famTCP4, v4Block)), ErrUnsupported},
		{"v2 command 2", string(v2Raw(0x22, famTCP4, v4Block)), ErrUnsupported},
		{"v2 command 15", string(v2Raw(0x2f, famTCP4, v4Block)), ErrUnsupported},
		{"v2 family 4", string(v2Raw(0x21, 0x41, v4Block)), ErrUnsupported},
		{"v2 transport 3", string(v2Raw(0x21, 0x13, v4Block)), ErrUnsupported},
		{"v2 inet without transport", string(v2Raw(0x21, 0x10, v4Block)), ErrUnsupported},
		{"v2 local bad family", string(v2Raw(0x20, 0x13, v4Block)), ErrUnsupported},
		{"v2 tcp4 short block", string(v2Raw(0x21, famTCP4, v4Block[:11])), ErrInvalid},
		{"v2 tcp6 short block", string(v2Raw(0x21, famTCP6, make([]byte, 35))), ErrInvalid},
		{"v2 unix short block", string(v2Raw(0x21, famUnixStream, make([]byte, 215))), ErrInvalid},
		{"v2 stray TLV bytes", string(v2Raw(0x21, famTCP4, v4Block, []byte{0x04, 0x00})), ErrInvalid},
		{"v2 TLV overrun", string(v2Raw(0x21, famTCP4, v4Block, []byte{0x04, 0x00, 0x02, 'x'})), ErrInvalid},
		{"v2 TLV after TLV overrun", string(v2Raw(0x21, famTCP4, v4Block, tlv(0x01, "h2"), []byte{0x02, 0xff, 0xff})), ErrInvalid},
		{"v2 over MaxV2Len", string(v2Raw(0x21, famTCP4, v4Block, tlv(0x04, strings.Repeat("x", MaxV2Len-v2HeaderLen-12-2)))), ErrTooLong},
		{"v2 length 65535", string(v2Sig[:]) + "\x21\x11\xff\xff" + string(v4Block), ErrTooLong},
	}
	// Read may ask for more than a malformed v1 line holds, since it reads
	// as much as a valid line must still have; on a real connection the
	// ClientHello fills the gap, so it does here too.
	const hello = "\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
	for _, tc := range tests {
		for _, rd := range readers {
			t.Run(tc.name+"/"+rd.name, func(t *testing.T) {
				h, err := Read(rd.wrap(strings.NewReader(tc.in + hello + hello)))
				if !errors.Is(err, tc.want) {
					t.Fatalf("Read(%q) = %+v, %v; want %v", tc.in, h, err, tc.want)
				}
				if h != nil {
					t.Errorf("Read returned a header with error %v", err)
				}
				if !strings.HasPrefix(err.Error(), "proxyproto: ") {
					t.Errorf("error %q lacks the package prefix", err)
				}
			})
		}
	}
}

// TestReadTruncated cuts every valid header at every length: each cut must
// be reported as truncation, never as a bad or missing header, because a
// prefix of a good header can still arrive complete.
func TestReadTruncated(t *testing.T) {
	for _, tc := range validHeaders {
		t.Run(tc.name, func(t *testing.T) {
			for n := 1; n < len(tc.in); n++ {
				_, err := Read(strings.NewReader(tc.in[:n]))
				if !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatalf("Read(%q) = %v, want io.ErrUnexpectedEOF", tc.in[:n], err)
				}
			}
		})
	}
	t.Run("empty", func(t *testing.T) {
		_, err := Read(strings.NewReader(""))
		if !errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("Read(empty) = %v, want io.EOF", err)
		}
	})
}

// TestReadOversize checks that a huge length field is refused after the
// 16 fixed bytes, without reading or allocating what it announces.
func TestReadOversize(t *testing.T) {
	hdr := string(v2Sig[:]) + "\x21\x21\xff\xff"
	cr := &countingReader{r: io.MultiReader(strings.NewReader(hdr), zeros{})}
	if _, err := Read(cr); !errors.Is(err, ErrTooLong) {
		t.Fatalf("Read = %v, want ErrTooLong", err)
	}
	if cr.n != v2HeaderLen {
		t.Errorf("consumed %d bytes, want %d", cr.n, v2HeaderLen)
	}

	const runs = 100
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range runs {
		Read(strings.NewReader(hdr))
	}
	runtime.ReadMemStats(&after)
	if per := (after.TotalAlloc - before.TotalAlloc) / runs; per > 4096 {
		t.Errorf("Read allocated %d bytes per oversize header, want well under the announced 65535", per)
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

func TestAppendV2(t *testing.T) {
	sig := string(v2Sig[:])
	tests := []struct {
		name      string
		src, dst  netip.AddrPort
		authority string
		want      string
	}{
		{"tcp4", v4Hdr.Source, v4Hdr.Destination, "",
			sig + "\x21\x11\x00\x0c" + string(v4Block)},
		{"tcp4 authority", v4Hdr.Source, v4Hdr.Destination, "app.example.com",
			sig + "\x21\x11\x00\x1e" + string(v4Block) + "\x02\x00\x0fapp.example.com"},
		{"4-in-6 is tcp4", ap("[::ffff:192.0.2.1]:56324"), ap("[::ffff:198.51.100.2]:443"), "",
			sig + "\x21\x11\x00\x0c" + string(v4Block)},
		{"tcp6", ap("[2001:db8::1]:1"), ap("[2001:db8::2]:2"), "",
			sig + "\x21\x21\x00\x24" +
				"\x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01" +
				"\x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02" +
				"\x00\x01\x00\x02"},
		{"mixed maps ipv4", ap("192.0.2.1:1"), ap("[2001:db8::2]:2"), "a",
			sig + "\x21\x21\x00\x28" +
				"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xff\xff\xc0\x00\x02\x01" +
				"\x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02" +
				"\x00\x01\x00\x02" + "\x02\x00\x01a"},
		{"invalid source is local", netip.AddrPort{}, v4Hdr.Destination, "app.example.com",
			sig + "\x20\x00\x00\x00"},
		{"invalid destination is local", v4Hdr.Source, netip.AddrPort{}, "",
			sig + "\x20\x00\x00\x00"},
		{"longest authority", v4Hdr.Source, v4Hdr.Destination, strings.Repeat("a", 255),
			sig + "\x21\x11\x01\x0e" + string(v4Block) + "\x02\x00\xff" + strings.Repeat("a", 255)},
		{"overlong authority dropped", v4Hdr.Source, v4Hdr.Destination, strings.Repeat("a", 256),
			sig + "\x21\x11\x00\x0c" + string(v4Block)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			prefix := []byte("keep")
			got := AppendV2(prefix, tc.src, tc.dst, tc.authority)
			if string(got) != "keep"+tc.want {
				t.Fatalf("AppendV2 = %q\nwant        %q", got, "keep"+tc.want)
			}
			w := &writeRecorder{}
			if err := WriteV2(w, tc.src, tc.dst, tc.authority); err != nil {
				t.Fatal(err)
			}
			if len(w.writes) != 1 || w.writes[0] != tc.want {
				t.Errorf("WriteV2 wrote %q, want one Write of %q", w.writes, tc.want)
			}
			if _, err := Read(strings.NewReader(tc.want)); err != nil {
				t.Errorf("Read(AppendV2(…)): %v", err)
			}
		})
	}
	t.Run("write error", func(t *testing.T) {
		err := WriteV2(errWriter{}, v4Hdr.Source, v4Hdr.Destination, "")
		if !errors.Is(err, io.ErrClosedPipe) {
			t.Fatalf("WriteV2 = %v, want io.ErrClosedPipe", err)
		}
	})
}

type writeRecorder struct{ writes []string }

func (w *writeRecorder) Write(p []byte) (int, error) {
	w.writes = append(w.writes, string(p))
	return len(p), nil
}

type errWriter struct{}

func (errWriter) Write([]byte) (int, error) { return 0, io.ErrClosedPipe }

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	server, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	return client, server
}

// TestReadDeadline checks that a peer stalling inside a header cannot hold
// Read past the caller's deadline, and that the timeout comes back as such.
func TestReadDeadline(t *testing.T) {
	tests := []struct {
		name string
		sent string
	}{
		{"nothing", ""},
		{"v1 prefix", "PROXY TC"},
		{"v1 half", "PROXY TCP4 192.0.2.1 198."},
		{"v1 before LF", "PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r"},
		{"v2 half signature", string(v2Sig[:6])},
		{"v2 fixed part", string(v2Raw(0x21, famTCP4, v4Block)[:16])},
		{"v2 half TLVs", string(v2Raw(0x21, famTCP4, v4Block, tlv(0x02, "app.example.com"))[:35])},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			client, server := tcpPair(t)
			if _, err := io.WriteString(client, tc.sent); err != nil {
				t.Fatal(err)
			}
			server.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			_, err := Read(server)
			var ne net.Error
			if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
				t.Fatalf("Read = %v, want a timeout", err)
			}
		})
	}
}

// TestReadLeavesConnUsable is the reason Read exists in this form: after
// it, the bytes that follow the header are still on the bare connection.
func TestReadLeavesConnUsable(t *testing.T) {
	for _, tc := range validHeaders {
		t.Run(tc.name, func(t *testing.T) {
			client, server := tcpPair(t)
			if _, err := io.WriteString(client, tc.in+trailer); err != nil {
				t.Fatal(err)
			}
			client.(*net.TCPConn).CloseWrite()
			server.SetReadDeadline(time.Now().Add(10 * time.Second))
			h, err := Read(server)
			if err != nil {
				t.Fatal(err)
			}
			if *h != tc.want {
				t.Errorf("Read = %+v, want %+v", *h, tc.want)
			}
			rest, err := io.ReadAll(server)
			if err != nil || string(rest) != trailer {
				t.Errorf("after the header the connection holds %q, %v; want %q", rest, err, trailer)
			}
		})
	}
}

// TestReadBareLF: a sender that ends its v1 line in LF alone (a common
// hand-written or misconfigured header) is told the CR is missing, both
// when Read stops at the LF and when the ClientHello came in the same
// write and Read's last read went past the LF. Before, the second case
// said "LF inside the line", pointing the operator at the wrong fault.
func TestReadBareLF(t *testing.T) {
	for _, tc := range []struct{ name, line string }{
		{"tcp4", "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\n"},
		{"tcp6", "PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\n"},
		{"unknown", "PROXY UNKNOWN\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := tcpPair(t)
			if _, err := io.WriteString(client, tc.line+trailer); err != nil {
				t.Fatal(err)
			}
			client.(*net.TCPConn).CloseWrite()
			server.SetReadDeadline(time.Now().Add(10 * time.Second))
			h, err := Read(server)
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "LF without CR") {
				t.Fatalf("Read(%q) = %+v, %v; want ErrInvalid naming the missing CR", tc.line, h, err)
			}
		})
	}
}

func BenchmarkReadV1(b *testing.B) {
	in := []byte("PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n")
	r := bytes.NewReader(in)
	b.ReportAllocs()
	b.SetBytes(int64(len(in)))
	for b.Loop() {
		r.Reset(in)
		if _, err := Read(r); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkReadV2(b *testing.B) {
	in := AppendV2(nil, v6Src, v6Dst, "app.example.com")
	r := bytes.NewReader(in)
	b.ReportAllocs()
	b.SetBytes(int64(len(in)))
	for b.Loop() {
		r.Reset(in)
		if _, err := Read(r); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAppendV2(b *testing.B) {
	buf := make([]byte, 0, 128)
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendV2(buf[:0], v6Src, v6Dst, "app.example.com")
	}
}
