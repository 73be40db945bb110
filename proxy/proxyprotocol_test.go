package proxy

import (
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/portcullis/portcullis/proxyproto"
	"github.com/portcullis/portcullis/testnet"
)

// These tests cover the PROXY protocol on the data path: headers received
// on proxy_protocol listeners, the v2 header sent on send_proxy_protocol
// routes, and that the header's client address is the one the firewall,
// rate limiter and the next hop see.

// ppSig starts every v2 header (proxy-protocol.txt section 2.2).
const ppSig = "\r\n\r\n\x00\r\nQUIT\n"

// afterHello is what every client here sends right behind its ClientHello,
// so a backend can tell that the hello was replayed byte for byte and
// that nothing was dropped or inserted after it.
const afterHello = "after\n"

// ppListenerTOML is a listener that takes PROXY headers from 127.0.0.1
// only, with a route on sni that forwards a v2 header to backend.
func ppListenerTOML(name, sni, backend string, extra ...string) string {
	return fmt.Sprintf(`
[[listener]]
name = %q
listen = "127.0.0.1:0"
proxy_protocol = true
proxy_protocol_trusted = ["127.0.0.1/32"]
%s
`, name, strings.Join(extra, "\n")) + routeTOML(sni, backend, "  send_proxy_protocol = true")
}

// seen is what sniffBackend found at the start of a connection.
type seen struct {
	Kind      string         // "proxy" (a v2 header), "tls" (the bare ClientHello) or "other"
	Version   int            `json:",omitempty"`
	Command   string         `json:",omitempty"` // "PROXY" or "LOCAL"
	Src, Dst  netip.AddrPort // as proxyproto.Read parsed them
	Authority string         `json:",omitempty"` // PP2_TYPE_AUTHORITY
	Problem   string         `json:",omitempty"` // empty when hello and afterHello followed intact
}

// sniffBackend is a backend that reports, as one JSON line, whether the
// first bytes it got were a PROXY v2 header (parsed with proxyproto.Read,
// AUTHORITY TLV extracted) or the TLS record itself, and checks that what
// follows is exactly hello and then afterHello.
func sniffBackend(t *testing.T, hello []byte) string {
	return rawBackend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(20 * time.Second))
		b, _ := json.Marshal(sniff(c, hello))
		c.Write(append(b, '\n'))
	})
}

func sniff(r io.Reader, hello []byte) seen {
	first := make([]byte, len(ppSig))
	if _, err := io.ReadFull(r, first); err != nil {
		return seen{Kind: "other", Problem: "reading: " + err.Error()}
	}
	var s seen
	rest := hello
	switch {
	case string(first) == ppSig:
		s.Kind = "proxy"
		if err := readV2Rest(r, first, &s); err != nil {
			s.Problem = err.Error()
			return s
		}
	case first[0] == 0x16:
		s.Kind = "tls"
		if !bytes.Equal(first, hello[:len(first)]) {
			s.Problem = "the TLS record is not the ClientHello sent"
			return s
		}
		rest = hello[len(first):]
	default:
		return seen{Kind: "other", Problem: fmt.Sprintf("first bytes %q", first)}
	}
	got := make([]byte, len(rest))
	if _, err := io.ReadFull(r, got); err != nil {
		s.Problem = "reading the ClientHello: " + err.Error()
	} else if !bytes.Equal(got, rest) {
		s.Problem = "the bytes after the header are not the ClientHello sent"
	} else if line, err := readLine(r); line+"\n" != afterHello {
		s.Problem = fmt.Sprintf("after the ClientHello came %q (%v), want %q", line, err, afterHello)
	}
	return s
}

// readV2Rest reads the rest of a v2 header whose signature is in sig,
// parses the whole header with proxyproto.Read and walks its TLVs for
// PP2_TYPE_AUTHORITY.
func readV2Rest(r io.Reader, sig []byte, s *seen) error {
	fixed := make([]byte, 4)
	if _, err := io.ReadFull(r, fixed); err != nil {
		return fmt.Errorf("reading the v2 fixed part: %w", err)
	}
	payload := make([]byte, binary.BigEndian.Uint16(fixed[2:4]))
	if _, err := io.ReadFull(r, payload); err != nil {
		return fmt.Errorf("reading the v2 payload: %w", err)
	}
	whole := bytes.NewReader(append(append(append([]byte(nil), sig...), fixed...), payload...))
	h, err := proxyproto.Read(whole)
	if err != nil {
		return err
	}
	if whole.Len() != 0 {
		return fmt.Errorf("proxyproto.Read left %d bytes of the header", whole.Len())
	}
	s.Version, s.Src, s.Dst = h.Version, h.Source, h.Destination
	s.Command = "LOCAL"
	if h.Command == proxyproto.Proxy {
		s.Command = "PROXY"
	}
	var tlvs []byte
	switch fixed[1] {
	case 0x11: // TCP over IPv4
		tlvs = payload[12:]
	case 0x21: // TCP over IPv6
		tlvs = payload[36:]
	}
	for len(tlvs) >= 3 {
		n := int(binary.BigEndian.Uint16(tlvs[1:3]))
		if 3+n > len(tlvs) {
			return errors.New("TLV overruns the header")
		}
		if tlvs[0] == 0x02 {
			s.Authority = string(tlvs[3 : 3+n])
		}
		tlvs = tlvs[3+n:]
	}
	return nil
}

// dialFrom connects to addr from the loopback address from (empty: the
// kernel's choice, 127.0.0.1).
func dialFrom(t *testing.T, from, addr string) *net.TCPConn {
	t.Helper()
	c, err := tryDialFrom(t, from, addr)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func tryDialFrom(t *testing.T, from, addr string) (*net.TCPConn, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s from %q: %w", addr, from, err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c.(*net.TCPConn), nil
}

// askSniff connects to addr from from, sends header, hello and afterHello
// in one write and decodes sniffBackend's report. It also returns the
// client's own address.
func askSniff(t *testing.T, from, addr string, header, hello []byte) (seen, netip.AddrPort) {
	t.Helper()
	c := dialFrom(t, from, addr)
	defer c.Close()
	client := c.LocalAddr().(*net.TCPAddr).AddrPort()
	msg := append(append(append([]byte(nil), header...), hello...), afterHello...)
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	line, err := readLine(c)
	if err != nil {
		t.Fatalf("no report from the backend: %q %v", line, err)
	}
	var s seen
	if err := json.Unmarshal([]byte(line), &s); err != nil {
		t.Fatalf("backend report %q: %v", line, err)
	}
	return s, client
}

// v2Header builds a v2 header by hand (not with proxyproto.AppendV2, so the
// reader is not only checked against its own writer).
func v2Header(verCmd, fam byte, body ...[]byte) []byte {
	p := bytes.Join(body, nil)
	b := append([]byte(ppSig), verCmd, fam)
	b = binary.BigEndian.AppendUint16(b, uint16(len(p)))
	return append(b, p...)
}

// v2Addrs is a v2 address block for src and dst (both of one family).
func v2Addrs(src, dst netip.AddrPort) []byte {
	b := append(src.Addr().AsSlice(), dst.Addr().AsSlice()...)
	b = binary.BigEndian.AppendUint16(b, src.Port())
	return binary.BigEndian.AppendUint16(b, dst.Port())
}

func tlv(typ byte, v string) []byte {
	return append(binary.BigEndian.AppendUint16([]byte{typ}, uint16(len(v))), v...)
}

var (
	ppSrc4 = netip.MustParseAddrPort("203.0.113.9:4242")
	ppDst4 = netip.MustParseAddrPort("192.0.2.1:443")
	ppSrc6 = netip.MustParseAddrPort("[2001:db8::9]:4242")
	ppDst6 = netip.MustParseAddrPort("[2001:db8::1]:443")
)

// TestProxyProtocolReceive sends every kind of valid header from a trusted
// peer and checks, at a backend the route forwards a v2 header to, that
// the header's source is the client address the data path uses — or the
// socket's own address for LOCAL/UNKNOWN headers.
func TestProxyProtocolReceive(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "pp.test"})
	backend := sniffBackend(t, hello)
	h := startProxy(t, ppListenerTOML("pp", "pp.test", backend))
	addr := h.addr("pp")
	listenerAddr := netip.MustParseAddrPort(addr)

	for _, tc := range []struct {
		name   string
		header []byte
		want   netip.AddrPort // zero: the client's socket address
		dst    netip.AddrPort // zero: the listener's address
	}{
		{"v1 TCP4", []byte("PROXY TCP4 203.0.113.9 192.0.2.1 4242 443\r\n"), ppSrc4, ppDst4},
		{"v1 TCP6", []byte("PROXY TCP6 2001:db8::9 2001:db8::1 4242 443\r\n"), ppSrc6, ppDst6},
		{"v1 UNKNOWN", []byte("PROXY UNKNOWN\r\n"), netip.AddrPort{}, netip.AddrPort{}},
		{"v1 UNKNOWN with addresses", []byte("PROXY UNKNOWN 203.0.113.9 192.0.2.1 4242 443\r\n"), netip.AddrPort{}, netip.AddrPort{}},
		{"v2 TCP4", v2Header(0x21, 0x11, v2Addrs(ppSrc4, ppDst4)), ppSrc4, ppDst4},
		{"v2 TCP6", v2Header(0x21, 0x21, v2Addrs(ppSrc6, ppDst6)), ppSrc6, ppDst6},
		{"v2 TCP4 with TLVs", v2Header(0x21, 0x11, v2Addrs(ppSrc4, ppDst4),
			tlv(0x02, "other.example"), tlv(0x04, strings.Repeat("\x00", 300)), tlv(0xE0, "custom")), ppSrc4, ppDst4},
		{"v2 TCP6 with 4-in-6 source", v2Header(0x21, 0x21, v2Addrs(
			netip.MustParseAddrPort("[::ffff:203.0.113.9]:4242"), netip.MustParseAddrPort("[::ffff:192.0.2.1]:443"))), ppSrc4, ppDst4},
		{"v2 LOCAL", v2Header(0x20, 0x00), netip.AddrPort{}, netip.AddrPort{}},
		{"v2 LOCAL with an address block", v2Header(0x20, 0x11, v2Addrs(ppSrc4, ppDst4)), netip.AddrPort{}, netip.AddrPort{}},
		{"v2 PROXY over UDP", v2Header(0x21, 0x12, v2Addrs(ppSrc4, ppDst4)), netip.AddrPort{}, netip.AddrPort{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, client := askSniff(t, "", addr, tc.header, hello)
			// A PROXY header's destination is passed on, as HAProxy does;
			// LOCAL and UNKNOWN keep the socket's addresses.
			want := seen{Kind: "proxy", Version: 2, Command: "PROXY", Src: tc.want, Dst: tc.dst, Authority: "pp.test"}
			if !tc.want.IsValid() {
				want.Src = client
			}
			if !tc.dst.IsValid() {
				want.Dst = listenerAddr
			}
			if got != want {
				t.Fatalf("backend saw %+v\nwant          %+v", got, want)
			}
		})
	}
	for _, why := range []string{"bad_proxy_header", "bad_client_hello", "handshake_timeout"} {
		if n := h.rejected("pp", why); n != 0 {
			t.Errorf("%v connections rejected as %s", n, why)
		}
	}
}

// TestProxyProtocolRejections checks that everything but a complete, valid
// header from a trusted peer is turned away and counted, and that a
// trusted peer that never finishes is cut at handshake_timeout.
func TestProxyProtocolRejections(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "pp.test"})
	backend := rawBackend(t, func(c *net.TCPConn) {
		t.Errorf("a rejected connection reached the backend")
	})
	h := startProxy(t, ppListenerTOML("pp", "pp.test", backend, `handshake_timeout = "300ms"`))
	addr := h.addr("pp")
	v1 := []byte("PROXY TCP4 203.0.113.9 192.0.2.1 4242 443\r\n")
	v2 := v2Header(0x21, 0x11, v2Addrs(ppSrc4, ppDst4))

	for _, tc := range []struct {
		name       string
		from       string // client source address
		send       [][]byte
		closeWrite bool // half-close after sending
		reason     string
	}{
		{"v1 garbage address", "", [][]byte{[]byte("PROXY TCP4 nonsense 192.0.2.1 1 2\r\n"), hello}, false, "bad_proxy_header"},
		{"v1 unknown protocol", "", [][]byte{[]byte("PROXY UDP4 203.0.113.9 192.0.2.1 4242 443\r\n"), hello}, false, "bad_proxy_header"},
		{"v1 IPv6 address under TCP4", "", [][]byte{[]byte("PROXY TCP4 2001:db8::9 192.0.2.1 4242 443\r\n"), hello}, false, "bad_proxy_header"},
		{"v1 port out of range", "", [][]byte{[]byte("PROXY TCP4 203.0.113.9 192.0.2.1 65536 443\r\n"), hello}, false, "bad_proxy_header"},
		{"v1 without CRLF", "", [][]byte{[]byte("PROXY UNKNOWN " + strings.Repeat("x", 120)), hello}, false, "bad_proxy_header"},
		{"v1 truncated then close", "", [][]byte{v1[:20]}, true, "bad_proxy_header"},
		{"v2 truncated then close", "", [][]byte{v2[:20]}, true, "bad_proxy_header"},
		{"v2 signature only then close", "", [][]byte{v2[:12]}, true, "bad_proxy_header"},
		{"v2 version 3", "", [][]byte{v2Header(0x31, 0x11, v2Addrs(ppSrc4, ppDst4)), hello}, false, "bad_proxy_header"},
		{"v2 undefined family", "", [][]byte{v2Header(0x21, 0x41, v2Addrs(ppSrc4, ppDst4)), hello}, false, "bad_proxy_header"},
		{"v2 length shorter than addresses", "", [][]byte{v2Header(0x21, 0x11, v2Addrs(ppSrc4, ppDst4)[:8]), hello}, false, "bad_proxy_header"},
		{"v2 broken TLV", "", [][]byte{v2Header(0x21, 0x11, v2Addrs(ppSrc4, ppDst4), []byte{0x02, 0x00, 0x09, 'x'}), hello}, false, "bad_proxy_header"},
		{"v2 over-long", "", [][]byte{v2Header(0x21, 0x11, v2Addrs(ppSrc4, ppDst4), tlv(0x04, strings.Repeat("\x00", 4000))), hello}, false, "bad_proxy_header"},
		{"TLS without header from a trusted peer", "", [][]byte{hello}, false, "bad_proxy_header"},
		{"plain HTTP from a trusted peer", "", [][]byte{[]byte("GET / HTTP/1.1\r\nHost: pp.test\r\n\r\n")}, false, "bad_proxy_header"},
		{"untrusted peer with a valid v1 header", "127.0.0.2", [][]byte{v1, hello}, false, "bad_proxy_header"},
		{"untrusted peer with a valid v2 header", "127.0.0.2", [][]byte{v2, hello}, false, "bad_proxy_header"},
		{"untrusted peer sending nothing", "127.0.0.2", nil, false, "bad_proxy_header"},
		{"trusted peer sending nothing", "", nil, false, "handshake_timeout"},
		{"trusted peer stalling inside a v1 header", "", [][]byte{v1[:20]}, false, "handshake_timeout"},
		{"trusted peer stalling inside a v2 header", "", [][]byte{v2[:20]}, false, "handshake_timeout"},
		{"trusted peer stalling after the header", "", [][]byte{v2}, false, "handshake_timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := h.rejected("pp", tc.reason)
			c, err := tryDialFrom(t, tc.from, addr)
			switch {
			case errors.Is(err, syscall.ECONNRESET):
				// On loopback the proxy can accept and reset an
				// untrusted peer before the dialer has looked at the
				// socket's state: the reset is all it sees.
			case err != nil:
				t.Fatal(err)
			default:
				// One write, so the header is not split unless the case
				// says so; the proxy may already have reset the peer.
				c.Write(bytes.Join(tc.send, nil))
				if tc.closeWrite {
					c.CloseWrite()
				}
				n, err := c.Read(make([]byte, 1))
				if err == nil {
					t.Fatalf("read %d bytes, want the connection closed", n)
				}
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					t.Fatal("the proxy did not close the connection")
				}
			}
			testnet.WaitFor(t, tc.reason+" counted", func() bool { return h.rejected("pp", tc.reason) == before+1 })
		})
	}
}

// TestProxyProtocolFirewallUsesHeaderAddress checks that the blocklist
// judges the address from the header, not the trusted peer's own.
func TestProxyProtocolFirewallUsesHeaderAddress(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "pp.test"})
	backend := sniffBackend(t, hello)
	h := startProxy(t, "[firewall]\nblock = [\"203.0.113.0/24\"]\n"+ppListenerTOML("pp", "pp.test", backend))
	addr := h.addr("pp")

	for _, tc := range []struct {
		name    string
		header  []byte
		blocked bool
		src     string
	}{
		{"v1 blocked source", []byte("PROXY TCP4 203.0.113.9 192.0.2.1 4242 443\r\n"), true, ""},
		{"v2 blocked source", v2Header(0x21, 0x11, v2Addrs(ppSrc4, ppDst4)), true, ""},
		{"v2 blocked 4-in-6 source", v2Header(0x21, 0x21, v2Addrs(
			netip.MustParseAddrPort("[::ffff:203.0.113.9]:4242"), netip.MustParseAddrPort("[::ffff:192.0.2.1]:443"))), true, ""},
		{"v1 allowed source", []byte("PROXY TCP4 198.51.100.1 192.0.2.1 5555 443\r\n"), false, "198.51.100.1:5555"},
		{"v2 allowed source", v2Header(0x21, 0x11, v2Addrs(netip.MustParseAddrPort("198.51.100.1:5555"), ppDst4)), false, "198.51.100.1:5555"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !tc.blocked {
				got, _ := askSniff(t, "", addr, tc.header, hello)
				if got.Src.String() != tc.src || got.Problem != "" {
					t.Fatalf("backend saw %+v, want source %s", got, tc.src)
				}
				return
			}
			before := h.rejected("pp", "blocked_ip")
			c := dialFrom(t, "", addr)
			c.Write(append(append(append([]byte(nil), tc.header...), hello...), afterHello...))
			if line, err := readLine(c); err == nil {
				t.Fatalf("a blocked client got through: %q", line)
			}
			testnet.WaitFor(t, "blocked_ip counted", func() bool { return h.rejected("pp", "blocked_ip") == before+1 })
		})
	}
}

// TestProxyProtocolRateLimitUsesHeaderAddress checks that the rate limiter
// keys on the header's address: all connections come from one trusted
// peer, but only the one client address that exceeds its quota is
// refused.
func TestProxyProtocolRateLimitUsesHeaderAddress(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "pp.test"})
	backend := sniffBackend(t, hello)
	listener := ppListenerTOML("pp", "pp.test", backend)
	const limit = "rate_limit = { connections = 1, window = \"1h\" }\n"
	h := startProxy(t, "[firewall]\nblock = [\"203.0.113.0/24\"]\n"+limit+listener)
	addr := h.addr("pp")
	header := func(src string) []byte {
		return []byte(fmt.Sprintf("PROXY TCP4 %s 192.0.2.1 4242 443\r\n", src))
	}
	refused := func(src, reason string) {
		t.Helper()
		before := h.rejected("pp", reason)
		c := dialFrom(t, "", addr)
		c.Write(append(append(header(src), hello...), afterHello...))
		if line, err := readLine(c); err == nil {
			t.Fatalf("client %s got through: %q", src, line)
		}
		testnet.WaitFor(t, reason+" counted", func() bool { return h.rejected("pp", reason) == before+1 })
	}
	allowed := func(src string) {
		t.Helper()
		if got, _ := askSniff(t, "", addr, header(src), hello); got.Src.Addr().String() != src || got.Problem != "" {
			t.Fatalf("backend saw %+v, want source %s", got, src)
		}
	}

	// A blocked address is refused before the limiter and spends nothing.
	refused("203.0.113.9", "blocked_ip")
	refused("203.0.113.9", "blocked_ip")
	allowed("198.51.100.1")
	allowed("198.51.100.2") // same socket peer, other client: its own quota
	refused("198.51.100.1", "rate_limited")
	refused("198.51.100.2", "rate_limited")
	// Unblocked by a reload that keeps the limiter, the address still has
	// its whole quota: the blocked attempts spent none of it.
	h.apply("[firewall]\n" + limit + listener)
	allowed("203.0.113.9")
	refused("203.0.113.9", "rate_limited")
}

// TestProxyProtocolSendOnOff checks that only a route with
// send_proxy_protocol gets a v2 header, that it carries the client's real
// address, the listener's address and the SNI, and that the header is
// followed by exactly the ClientHello.
func TestProxyProtocolSendOnOff(t *testing.T) {
	helloOn := clientHelloBytes(t, &tls.Config{ServerName: "on.test"})
	helloOff := clientHelloBytes(t, &tls.Config{ServerName: "off.test"})
	h := startProxy(t, `
[[listener]]
name = "l"
listen = "127.0.0.1:0"
`+routeTOML("on.test", sniffBackend(t, helloOn), "  send_proxy_protocol = true")+
		routeTOML("off.test", sniffBackend(t, helloOff)))
	addr := h.addr("l")
	listenerAddr := netip.MustParseAddrPort(addr)

	t.Run("on", func(t *testing.T) {
		got, client := askSniff(t, "", addr, nil, helloOn)
		want := seen{Kind: "proxy", Version: 2, Command: "PROXY", Src: client, Dst: listenerAddr, Authority: "on.test"}
		if got != want {
			t.Fatalf("backend saw %+v\nwant          %+v", got, want)
		}
	})
	t.Run("on from 127.0.0.2", func(t *testing.T) {
		got, client := askSniff(t, "127.0.0.2", addr, nil, helloOn)
		if client.Addr() != netip.MustParseAddr("127.0.0.2") {
			t.Fatalf("dialled from %s", client)
		}
		want := seen{Kind: "proxy", Version: 2, Command: "PROXY", Src: client, Dst: listenerAddr, Authority: "on.test"}
		if got != want {
			t.Fatalf("backend saw %+v\nwant          %+v", got, want)
		}
	})
	t.Run("off", func(t *testing.T) {
		got, _ := askSniff(t, "", addr, nil, helloOff)
		if want := (seen{Kind: "tls"}); got != want {
			t.Fatalf("backend saw %+v, want the bare ClientHello", got)
		}
	})
}

// TestProxyProtocolNotPassedOn checks that a header received on a
// proxy_protocol listener is consumed, not relayed: a route without
// send_proxy_protocol gets the bare ClientHello.
func TestProxyProtocolNotPassedOn(t *testing.T) {
	helloOn := clientHelloBytes(t, &tls.Config{ServerName: "on.test"})
	helloOff := clientHelloBytes(t, &tls.Config{ServerName: "off.test"})
	h := startProxy(t, ppListenerTOML("pp", "on.test", sniffBackend(t, helloOn))+routeTOML("off.test", sniffBackend(t, helloOff)))
	addr := h.addr("pp")

	got, _ := askSniff(t, "", addr, v2Header(0x21, 0x11, v2Addrs(ppSrc4, ppDst4)), helloOff)
	if want := (seen{Kind: "tls"}); got != want {
		t.Fatalf("route without send_proxy_protocol: backend saw %+v, want the bare ClientHello", got)
	}
}

// TestProxyProtocolChain runs two portcullis instances back to back: A
// takes clients directly and sends a v2 header to B, which trusts A and
// sends one on to the backend. The backend must see the original client,
// who dials from 127.0.0.2 so it differs from A's address (127.0.0.1).
func TestProxyProtocolChain(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "chain.test"})
	backend := sniffBackend(t, hello)
	b := startProxy(t, ppListenerTOML("b", "chain.test", backend))
	a := startProxy(t, `
[[listener]]
name = "a"
listen = "127.0.0.1:0"
`+routeTOML("chain.test", b.addr("b"), "  send_proxy_protocol = true"))

	got, client := askSniff(t, "127.0.0.2", a.addr("a"), nil, hello)
	if client.Addr() != netip.MustParseAddr("127.0.0.2") {
		t.Fatalf("dialled from %s", client)
	}
	if got.Kind != "proxy" || got.Command != "PROXY" || got.Src != client || got.Authority != "chain.test" || got.Problem != "" {
		t.Fatalf("backend saw %+v, want a PROXY header with source %s and authority chain.test", got, client)
	}
	if n := b.rejected("b", "bad_proxy_header"); n != 0 {
		t.Fatalf("B rejected %v headers from A", n)
	}
}

// TestProxyProtocolLinkLocalSender: a load balancer that reaches the
// proxy over IPv6 link-local addressing is reported by the kernel with
// its interface as zone (fe80::1%eth0). The zone says which link the
// address is on, not which address it is, so proxy_protocol_trusted =
// ["fe80::/10"] must still cover it.
func TestProxyProtocolLinkLocalSender(t *testing.T) {
	ll := linkLocalAddr(t)
	hello := clientHelloBytes(t, &tls.Config{ServerName: "pp.test"})
	backend := sniffBackend(t, hello)
	h := startProxy(t, fmt.Sprintf(`
[[listener]]
name = "pp"
listen = %q
proxy_protocol = true
proxy_protocol_trusted = ["fe80::/10"]
`, netip.AddrPortFrom(ll, 0).String())+routeTOML("pp.test", backend, "  send_proxy_protocol = true"))

	// Addr reports the bound address without its zone; dial with it.
	addr := netip.AddrPortFrom(ll, h.srv.Addr("pp").Port()).String()
	got, client := askSniff(t, "", addr, []byte("PROXY TCP4 203.0.113.9 192.0.2.1 4242 443\r\n"), hello)
	if client.Addr().Zone() == "" {
		t.Fatalf("dialled from %s, want a zoned link-local address", client)
	}
	if got.Kind != "proxy" || got.Src != ppSrc4 || got.Problem != "" {
		t.Fatalf("backend saw %+v, want the header's source %s (rejected as bad_proxy_header: %v)", got, ppSrc4, h.rejected("pp", "bad_proxy_header"))
	}
}

// linkLocalAddr returns a link-local IPv6 address of this host, zoned
// with its interface, that can be listened on and dialled; it skips the
// test where there is none.
func linkLocalAddr(t *testing.T) netip.Addr {
	t.Helper()
	ifs, err := net.Interfaces()
	if err != nil {
		t.Skip("no interfaces:", err)
	}
	for _, ifi := range ifs {
		if ifi.Flags&net.FlagUp == 0 {
			continue
		}
		addrs, _ := ifi.Addrs()
		for _, a := range addrs {
			n, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			ip, ok := netip.AddrFromSlice(n.IP)
			if !ok || !ip.Is6() || !ip.IsLinkLocalUnicast() {
				continue
			}
			ip = ip.WithZone(ifi.Name)
			if ln, err := net.Listen("tcp", netip.AddrPortFrom(ip, 0).String()); err == nil {
				ln.Close()
				return ip
			}
		}
	}
	t.Skip("no usable link-local IPv6 address")
	return netip.Addr{}
}
