// Package proxyproto reads PROXY protocol headers (v1 text and v2 binary)
// and writes v2 headers, as specified by HAProxy in
// https://www.haproxy.org/download/3.0/doc/proxy-protocol.txt.
//
// Read consumes exactly one header and not a byte more, so the caller can
// go on reading the TLS ClientHello from the same *net.TCPConn and later
// relay it without a buffering wrapper in the way of splice:
//
//	conn.SetReadDeadline(time.Now().Add(handshakeTimeout))
//	h, err := proxyproto.Read(conn)
//	if err != nil {
//		conn.Close() // bad_proxy_header; errors.Is tells ErrNoHeader, ErrInvalid, …
//		return
//	}
//	client := socketAddr
//	if h.Command == proxyproto.Proxy {
//		client = h.Source
//	}
//
// Towards a backend that asked for it, one Write before the relay starts:
//
//	err := proxyproto.WriteV2(backend, client, localAddr, sni)
//
// The package only parses: whether a peer may send a header at all is the
// caller's policy.
package proxyproto

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
)

// Command says whether a header carries the original client's addresses.
type Command uint8

const (
	// Local means the header carries no usable addresses and the caller
	// keeps the socket's own. Read reports it for v2 LOCAL, v1 UNKNOWN, and
	// for v2 PROXY headers whose addresses are not TCP over IP (AF_UNSPEC,
	// AF_UNIX, or a DGRAM transport): a TCP proxy has no use for them.
	Local Command = 0
	// Proxy means Source and Destination hold the original connection's
	// endpoints.
	Proxy Command = 1
)

// Header is a parsed PROXY header.
type Header struct {
	Version     int // 1 or 2
	Command     Command
	Source      netip.AddrPort // zero unless Command == Proxy; 4-in-6 addresses are unmapped
	Destination netip.AddrPort // zero unless Command == Proxy
}

const (
	// MaxV1Len is the longest v1 header the spec allows, CRLF included.
	MaxV1Len = 107
	// MaxV2Len bounds a v2 header: the 16-byte fixed part plus address
	// block and TLVs. The length field allows 64 KiB, but real senders
	// (HAProxy, cloud load balancers) typically put a few hundred bytes of
	// TLVs at most behind the 216-byte worst-case address block, and Read
	// may allocate this much per connection, so the cap is 2 KiB.
	MaxV2Len = v2HeaderLen + 2048
)

// Errors returned by Read, usually wrapped with detail; test with errors.Is.
var (
	// ErrNoHeader means the stream does not start with a v1 or v2 signature.
	ErrNoHeader = errors.New("proxyproto: no PROXY header")
	// ErrInvalid means the header is malformed.
	ErrInvalid = errors.New("proxyproto: malformed header")
	// ErrTooLong means the header exceeds MaxV1Len or MaxV2Len.
	ErrTooLong = errors.New("proxyproto: header too long")
	// ErrUnsupported means a well-formed v2 signature with a version,
	// command or address family this implementation does not know.
	ErrUnsupported = errors.New("proxyproto: unsupported header")
)

// prefixLen is what Read asks for before it knows the version: the shortest
// valid header, "PROXY UNKNOWN\r\n", is 15 bytes and a v2 header is longer,
// so reading this much can never pass the end of a header.
const prefixLen = len("PROXY UNKNOWN\r\n")

// Read reads exactly one v1 or v2 PROXY header from r and nothing after it.
//
// It issues only reads whose length a valid header is sure to cover, so r
// should be the bare connection (a buffered reader would defeat the point).
// The caller bounds the time with a read deadline; Read returns the reader's
// error as soon as it sees one. A stream that ends before its first byte
// gives io.EOF (a health check that connects and closes), one that ends
// inside a header gives io.ErrUnexpectedEOF, both wrapped.
func Read(r io.Reader) (*Header, error) {
	// One buffer serves the whole v1 line and any v2 header without
	// large TLVs.
	buf := make([]byte, MaxV1Len)
	n, err := io.ReadFull(r, buf[:prefixLen])
	p := buf[:n]
	// Judge the bytes before the error, so a client speaking something
	// else gets ErrNoHeader even if it then stalls until the deadline.
	isV1 := hasPrefixOf(p, v1Prefix)
	isV2 := hasPrefixOf(p, string(v2Sig[:]))
	if !isV1 && !isV2 {
		return nil, ErrNoHeader
	}
	if err != nil {
		if n == 0 && err == io.EOF {
			return nil, fmt.Errorf("proxyproto: reading header: %w", err)
		}
		return nil, readErr(err)
	}
	if isV1 {
		return readV1(r, buf)
	}
	return readV2(r, buf)
}

// hasPrefixOf reports whether p and sig agree on their common length, that
// is, p could still be (or already is) the start of a header with sig.
func hasPrefixOf(p []byte, sig string) bool {
	k := min(len(p), len(sig))
	return string(p[:k]) == sig[:k]
}

// readErr wraps a read error met inside a header. io.ReadFull reports
// io.EOF when a read returned nothing at all, but past the header's first
// byte that is still truncation.
func readErr(err error) error {
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("proxyproto: reading header: %w", err)
}
