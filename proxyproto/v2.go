package proxyproto

import (
	"encoding/binary"
	"fmt"
	"io"
	"net/netip"
)

// v2Sig starts every v2 header (spec section 2.2).
var v2Sig = [12]byte{'\r', '\n', '\r', '\n', 0, '\r', '\n', 'Q', 'U', 'I', 'T', '\n'}

const (
	v2HeaderLen = 16 // signature, version/command, family/transport, length

	v2Version = 0x2
	v2Local   = 0x0
	v2Proxy   = 0x1

	// Address family (high nibble) and transport (low nibble) pairs the
	// spec defines; every other byte "must be rejected as invalid".
	famUnspec     = 0x00
	famTCP4       = 0x11
	famUDP4       = 0x12
	famTCP6       = 0x21
	famUDP6       = 0x22
	famUnixStream = 0x31
	famUnixDgram  = 0x32

	tlvAuthority = 0x02

	// maxAuthority is the longest AUTHORITY value AppendV2 writes: an SNI
	// host name is a DNS name, at most 255 octets (RFC 1035 section 2.3.4).
	maxAuthority = 255
)

// v2AddrLen is the size of the address block each family needs.
func v2AddrLen(fam byte) (int, bool) {
	switch fam {
	case famUnspec:
		return 0, true
	case famTCP4, famUDP4:
		return 12, true
	case famTCP6, famUDP6:
		return 36, true
	case famUnixStream, famUnixDgram:
		return 216, true
	}
	return 0, false
}

// readV2 reads the rest of a v2 header whose first prefixLen bytes are in
// buf[:prefixLen]; buf has room for MaxV1Len bytes, which also holds the
// address block of any IP header with a few TLVs.
func readV2(r io.Reader, buf []byte) (*Header, error) {
	verCmd, fam := buf[12], buf[13]
	if v := verCmd >> 4; v != v2Version {
		return nil, fmt.Errorf("%w: v2: version %d", ErrUnsupported, v)
	}
	cmd := verCmd & 0xf
	if cmd != v2Local && cmd != v2Proxy {
		return nil, fmt.Errorf("%w: v2: command %#x", ErrUnsupported, cmd)
	}
	// The family byte is checked under LOCAL too, where its value is
	// otherwise ignored: an undefined one "must be rejected as invalid"
	// (spec section 2.2), and it tells a corrupt stream early.
	addrLen, ok := v2AddrLen(fam)
	if !ok {
		return nil, fmt.Errorf("%w: v2: address family and transport %#04x", ErrUnsupported, fam)
	}
	if _, err := io.ReadFull(r, buf[prefixLen:v2HeaderLen]); err != nil {
		return nil, readErr(err)
	}
	length := int(binary.BigEndian.Uint16(buf[14:16]))
	// Checked before reading or allocating: the length field is the
	// sender's word only.
	if v2HeaderLen+length > MaxV2Len {
		return nil, fmt.Errorf("%w: v2: length %d exceeds %d", ErrTooLong, length, MaxV2Len-v2HeaderLen)
	}
	if cmd == v2Proxy && length < addrLen {
		return nil, fmt.Errorf("%w: v2: length %d shorter than the %d-byte address block", ErrInvalid, length, addrLen)
	}
	payload := buf[v2HeaderLen:]
	if length <= len(payload) {
		payload = payload[:length]
	} else {
		payload = make([]byte, length)
	}
	if _, err := io.ReadFull(r, payload); err != nil {
		return nil, readErr(err)
	}
	if cmd == v2Local {
		// The receiver "must discard the protocol block including the
		// family" and must not assume it is empty (spec section 2.2).
		return &Header{Version: 2, Command: Local}, nil
	}
	if err := checkTLVs(payload[addrLen:]); err != nil {
		return nil, err
	}
	h := &Header{Version: 2, Command: Proxy}
	switch fam {
	case famTCP4:
		h.Source = netip.AddrPortFrom(netip.AddrFrom4([4]byte(payload[0:4])), binary.BigEndian.Uint16(payload[8:10]))
		h.Destination = netip.AddrPortFrom(netip.AddrFrom4([4]byte(payload[4:8])), binary.BigEndian.Uint16(payload[10:12]))
	case famTCP6:
		h.Source = netip.AddrPortFrom(netip.AddrFrom16([16]byte(payload[0:16])).Unmap(), binary.BigEndian.Uint16(payload[32:34]))
		h.Destination = netip.AddrPortFrom(netip.AddrFrom16([16]byte(payload[16:32])).Unmap(), binary.BigEndian.Uint16(payload[34:36]))
	default:
		// AF_UNSPEC, AF_UNIX or a datagram transport: nothing a TCP proxy
		// can use as a client address, so keep the socket's own.
		h.Command = Local
	}
	return h, nil
}

// checkTLVs walks the type-length-value list after the address block. The
// values are ignored, but a list whose lengths do not add up exactly is a
// malformed header.
func checkTLVs(b []byte) error {
	for len(b) > 0 {
		if len(b) < 3 {
			return fmt.Errorf("%w: v2: %d stray bytes after the TLVs", ErrInvalid, len(b))
		}
		n := 3 + int(binary.BigEndian.Uint16(b[1:3]))
		if n > len(b) {
			return fmt.Errorf("%w: v2: TLV type %#04x overruns the header", ErrInvalid, b[0])
		}
		b = b[n:]
	}
	return nil
}

// AppendV2 appends a v2 PROXY header for a connection from src to dst. The
// family is TCP over IPv4 when both addresses are IPv4 (4-in-6 counts as
// IPv4), else TCP over IPv6 with any IPv4 address mapped. When either
// address is invalid it appends a LOCAL header instead, so the receiver
// keeps the socket address rather than trusting zeros.
//
// A non-empty authority (the SNI) goes into a PP2_TYPE_AUTHORITY TLV; one
// longer than 255 bytes cannot be a host name and is left out, which keeps
// the header within what any receiver accepts.
func AppendV2(b []byte, src, dst netip.AddrPort, authority string) []byte {
	s, d := src.Addr().Unmap(), dst.Addr().Unmap()
	verCmd := byte(v2Version<<4 | v2Proxy)
	var fam byte
	switch {
	case !s.IsValid() || !d.IsValid():
		verCmd, fam, authority = v2Version<<4|v2Local, famUnspec, ""
	case s.Is4() && d.Is4():
		fam = famTCP4
	default:
		fam = famTCP6
	}
	if len(authority) > maxAuthority {
		authority = ""
	}
	length, _ := v2AddrLen(fam)
	if authority != "" {
		length += 3 + len(authority)
	}
	b = append(b, v2Sig[:]...)
	b = append(b, verCmd, fam)
	b = binary.BigEndian.AppendUint16(b, uint16(length))
	switch fam {
	case famTCP4:
		s4, d4 := s.As4(), d.As4()
		b = append(b, s4[:]...)
		b = append(b, d4[:]...)
	case famTCP6:
		s16, d16 := s.As16(), d.As16()
		b = append(b, s16[:]...)
		b = append(b, d16[:]...)
	}
	if fam != famUnspec {
		b = binary.BigEndian.AppendUint16(b, src.Port())
		b = binary.BigEndian.AppendUint16(b, dst.Port())
	}
	if authority != "" {
		b = append(b, tlvAuthority)
		b = binary.BigEndian.AppendUint16(b, uint16(len(authority)))
		b = append(b, authority...)
	}
	return b
}

// WriteV2 writes AppendV2's header to w in a single Write: "the sender must
// always ensure that the header is sent at once", as receivers may drop a
// connection whose first read holds a partial header (spec section 2).
func WriteV2(w io.Writer, src, dst netip.AddrPort, authority string) error {
	var arr [v2HeaderLen + 36 + 3 + maxAuthority]byte
	_, err := w.Write(AppendV2(arr[:0], src, dst, authority))
	if err != nil {
		return fmt.Errorf("proxyproto: writing header: %w", err)
	}
	return nil
}
