package proxyproto

import (
	"bytes"
	"fmt"
	"io"
	"net/netip"
	"strings"
)

const v1Prefix = "PROXY "

// readV1 reads the rest of a v1 line whose first prefixLen bytes are in
// buf[:prefixLen]; buf has room for MaxV1Len bytes.
//
// The spec asks receivers not to read past the CRLF. Instead of one read
// per byte (one syscall each on a bare socket), each read asks for the
// fewest bytes any valid line starting with what has arrived must still
// have (v1Need), which takes a handful of reads for a typical line. A
// malformed line can be shorter than that bound; it is rejected once the
// bytes after it (the ClientHello) arrive, or at the caller's deadline.
func readV1(r io.Reader, buf []byte) (*Header, error) {
	line := buf[:prefixLen]
	seen := 0 // bytes already searched for LF
	for {
		if i := bytes.IndexByte(line[seen:], '\n'); i >= 0 {
			// A sender that ends its line in a bare LF is the usual
			// way to get here, and by now the read has often gone past
			// that LF into the ClientHello: name the missing CR rather
			// than report an LF "inside" the line the sender ended.
			// (An LF after a CR is always last: v1Need asks for one
			// byte after a CR.)
			if line[seen+i-1] != '\r' {
				return nil, fmt.Errorf("%w: v1: line ends in LF without CR (want CRLF)", ErrInvalid)
			}
			if seen+i != len(line)-1 {
				return nil, fmt.Errorf("%w: v1: LF inside the line", ErrInvalid)
			}
			return parseV1(line)
		}
		seen = len(line)
		if len(line) == MaxV1Len {
			return nil, fmt.Errorf("%w: v1: no CRLF within %d bytes", ErrTooLong, MaxV1Len)
		}
		need, err := v1Need(line)
		if err != nil {
			return nil, err
		}
		need = min(need, MaxV1Len-len(line))
		n, err := io.ReadFull(r, buf[len(line):len(line)+need])
		line = buf[:len(line)+n]
		if err != nil {
			return nil, readErr(err)
		}
	}
}

// v1Need returns a lower bound on the bytes still to come in a valid v1
// line that starts with line (which holds "PROXY " and no LF yet). It fails
// early on a prefix that no valid line starts with, so a garbage line is
// rejected without waiting for more of it.
func v1Need(line []byte) (int, error) {
	if i := bytes.IndexByte(line, '\r'); i >= 0 {
		if i != len(line)-1 {
			return 0, fmt.Errorf("%w: v1: CR not followed by LF", ErrInvalid)
		}
		return 1, nil
	}
	rest := line[len(v1Prefix):]
	field := bytes.Count(rest, []byte{' '}) // index of the field now arriving
	if field == 0 {
		if p := string(rest); !strings.HasPrefix("TCP4", p) && !strings.HasPrefix("TCP6", p) && !strings.HasPrefix("UNKNOWN", p) {
			return 0, fmt.Errorf("%w: v1: unknown protocol %.8q", ErrInvalid, rest)
		}
		return len("\r\n"), nil
	}
	// Shortest text of each field: protocol (already complete), source and
	// destination address, source and destination port.
	short := [5]int{0, 0, 0, len("0"), len("0")}
	proto, _, _ := bytes.Cut(rest, []byte{' '})
	switch string(proto) {
	case "UNKNOWN":
		return len("\r\n"), nil // anything may follow UNKNOWN
	case "TCP4":
		short[1], short[2] = len("0.0.0.0"), len("0.0.0.0")
	case "TCP6":
		short[1], short[2] = len("::"), len("::")
	default:
		return 0, fmt.Errorf("%w: v1: unknown protocol %.8q", ErrInvalid, proto)
	}
	if field >= len(short) {
		return 0, fmt.Errorf("%w: v1: too many fields", ErrInvalid)
	}
	partial := len(rest) - bytes.LastIndexByte(rest, ' ') - 1
	need := max(short[field]-partial, 0)
	for _, s := range short[field+1:] {
		need += len(" ") + s
	}
	return need + len("\r\n"), nil
}

// parseV1 parses a complete v1 line, CRLF included.
func parseV1(line []byte) (*Header, error) {
	s, ok := strings.CutSuffix(string(line), "\r\n")
	if !ok {
		return nil, fmt.Errorf("%w: v1: line does not end in CRLF", ErrInvalid)
	}
	s = s[len(v1Prefix):]
	if strings.ContainsAny(s, "\r\n") {
		return nil, fmt.Errorf("%w: v1: CR or LF inside the line", ErrInvalid)
	}
	// "the receiver must ignore anything presented before the CRLF is
	// found" after UNKNOWN (spec section 2.1), and keep the socket address.
	if s == "UNKNOWN" || strings.HasPrefix(s, "UNKNOWN ") {
		return &Header{Version: 1, Command: Local}, nil
	}
	if strings.Count(s, " ") != 4 {
		return nil, fmt.Errorf("%w: v1: want 5 single-space separated fields", ErrInvalid)
	}
	proto, s, _ := strings.Cut(s, " ")
	srcIP, s, _ := strings.Cut(s, " ")
	dstIP, s, _ := strings.Cut(s, " ")
	srcPort, dstPort, _ := strings.Cut(s, " ")
	if proto != "TCP4" && proto != "TCP6" {
		return nil, fmt.Errorf("%w: v1: unknown protocol %q", ErrInvalid, proto)
	}
	src, err := parseV1AddrPort(proto, srcIP, srcPort)
	if err != nil {
		return nil, err
	}
	dst, err := parseV1AddrPort(proto, dstIP, dstPort)
	if err != nil {
		return nil, err
	}
	return &Header{Version: 1, Command: Proxy, Source: src, Destination: dst}, nil
}

func parseV1AddrPort(proto, ip, port string) (netip.AddrPort, error) {
	a, err := netip.ParseAddr(ip)
	// The family must match the protocol; a zone means nothing to the
	// receiver.
	if err != nil || a.Zone() != "" || (proto == "TCP4") != a.Is4() {
		return netip.AddrPort{}, fmt.Errorf("%w: v1: bad %s address %q", ErrInvalid, proto, ip)
	}
	p, ok := parsePort(port)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("%w: v1: bad port %q", ErrInvalid, port)
	}
	return netip.AddrPortFrom(a.Unmap(), p), nil
}

// parsePort accepts 1 to 5 ASCII digits up to 65535 and nothing else (no
// sign, base prefix or underscore): the spec's port is a plain decimal
// number, and a lenient parser is one more way for two hops to disagree.
func parsePort(s string) (uint16, bool) {
	if len(s) == 0 || len(s) > len("65535") {
		return 0, false
	}
	n := 0
	for i := range len(s) {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	if n > 65535 {
		return 0, false
	}
	return uint16(n), true
}
