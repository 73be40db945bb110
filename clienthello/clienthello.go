// Package clienthello reads a TLS ClientHello off a connection without
// terminating TLS, to learn the server name it asks for:
//
//	h, err := clienthello.Read(conn, buf)
//	route := table.lookup(h.ServerName)
//	backend.Write(h.Raw) // replay exactly what was read
//
// It reads whole TLS records — the 5-byte header, then exactly the
// record's length — and never a byte past the record that completes the
// ClientHello, so the connection can afterwards be handed to the kernel
// (splice) or to crypto/tls with nothing stranded in a buffer. It
// imports nothing of ours, which also keeps its fuzz target fast.
package clienthello

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Limits on what a client may send before it is routed. A ClientHello
// with a post-quantum key share is about 1.8 KiB today; 64 KiB is the
// largest handshake message read for one connection.
const (
	recordHeaderLen = 5
	maxRecordLen    = 16384 + 2048 // TLSCiphertext upper bound (RFC 8446, section 5.2)
	maxHelloMsgLen  = 64 << 10
	// BufferSize is a good initial capacity for Read's buffer: most
	// ClientHellos fit.
	BufferSize = 2048
)

// ErrNotClientHello marks input that is not a TLS ClientHello: the
// client's fault, not the operator's.
var ErrNotClientHello = errors.New("clienthello: not a TLS ClientHello")

// Hello is what routing needs from a ClientHello.
type Hello struct {
	Raw        []byte // every byte read from the client, to replay
	ServerName string // server_name as sent, "" if absent
}

// Read reads whole TLS records from r until one complete ClientHello
// handshake message has arrived, even when it spans several records or
// arrives a byte at a time. Raw is built in buf (grown if needed), so a
// caller can pool buffers. Errors that are not the reader's own (a
// timeout, say) wrap ErrNotClientHello.
func Read(r io.Reader, buf []byte) (Hello, error) {
	p := NewParser(buf)
	for {
		want := p.Want()
		n, err := io.ReadFull(r, want)
		if err != nil {
			p.Add(n)
			return Hello{Raw: p.raw[:p.recordStart]}, readErr(err, p.Len() > 0)
		}
		h, done, err := p.Add(n)
		if err != nil || done {
			return h, err
		}
	}
}

// Parser assembles a ClientHello from bytes read as it asks: Want is
// where the next bytes go (the rest of a record header, or of a
// record), and Add says how many arrived there. Reading no more than
// Want, a caller never reads past the ClientHello, and one that reads
// from a non-blocking socket can stop whenever it would block and go on
// later. Read is a loop of the two.
type Parser struct {
	raw         []byte
	msg         []byte // handshake bytes collected from the record payloads
	recordStart int    // where the record being read begins in raw
	need        int    // how long raw must be to end the current step
}

// NewParser starts a ClientHello in buf (grown if needed).
func NewParser(buf []byte) Parser {
	return Parser{raw: buf[:0], need: recordHeaderLen}
}

// Len is how many bytes have arrived.
func (p *Parser) Len() int { return len(p.raw) }

// Want returns the buffer the next bytes should be read into: never
// empty, and never longer than what the current record still needs.
func (p *Parser) Want() []byte {
	have := len(p.raw)
	p.raw = grow(p.raw, p.need-have)
	want := p.raw[have:p.need]
	p.raw = p.raw[:have]
	return want
}

// Add takes n bytes read into Want's buffer. It reports done with the
// Hello once the message is complete, or the error that makes the
// input no ClientHello; otherwise more is wanted.
func (p *Parser) Add(n int) (Hello, bool, error) {
	p.raw = p.raw[:len(p.raw)+n]
	if len(p.raw) < p.need {
		return Hello{}, false, nil
	}
	start := p.recordStart
	if p.need == start+recordHeaderLen {
		n, err := checkHeader(p.raw[start:], start)
		if err != nil {
			return Hello{}, false, err
		}
		if len(p.raw)+n > maxHelloMsgLen+8*recordHeaderLen {
			return Hello{}, false, fmt.Errorf("%w: larger than %d bytes", ErrNotClientHello, maxHelloMsgLen)
		}
		p.need += n
		return Hello{}, false, nil
	}
	body := p.raw[start+recordHeaderLen : p.need]
	p.recordStart, p.need = p.need, p.need+recordHeaderLen
	if p.msg == nil {
		// The common case, one record: alias it. The full slice
		// expression caps it so a later append copies instead of
		// writing into raw.
		p.msg = body[:len(body):len(body)]
	} else {
		p.msg = append(p.msg, body...)
	}
	msg := p.msg
	if len(msg) < 4 {
		return Hello{}, false, nil
	}
	if msg[0] != 1 { // HandshakeType client_hello
		return Hello{}, false, fmt.Errorf("%w: handshake type %d", ErrNotClientHello, msg[0])
	}
	want := 4 + (int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3]))
	if want-4 > maxHelloMsgLen {
		return Hello{}, false, fmt.Errorf("%w: message length %d", ErrNotClientHello, want-4)
	}
	if len(msg) < want {
		return Hello{}, false, nil
	}
	sni, err := parseServerName(msg[4:want])
	if err != nil {
		return Hello{}, false, err
	}
	return Hello{Raw: p.raw, ServerName: sni}, true, nil
}

// EOF is the error for a client that closed its side before the
// ClientHello was complete: what Read returns when its reader hits EOF.
func (p *Parser) EOF() error {
	// As io.ReadFull says it to Read: EOF where a step (a record's
	// header, or its body) was to begin, unexpected EOF inside one.
	step := p.recordStart
	if p.need != step+recordHeaderLen {
		step += recordHeaderLen
	}
	if len(p.raw) == step {
		return readErr(io.EOF, len(p.raw) > 0)
	}
	return readErr(io.ErrUnexpectedEOF, true)
}

// checkHeader checks a record header and returns the record's length.
// start is where the record begins among the bytes read.
func checkHeader(hdr []byte, start int) (int, error) {
	if hdr[0] != 0x16 {
		if start == 0 && (string(hdr[:5]) == "PROXY" || string(hdr[:5]) == "\r\n\r\n\x00") {
			// The v1 line and the v2 signature begin so: a sender
			// that speaks the PROXY protocol to a listener not set
			// to read it, which the record type alone would hide.
			return 0, fmt.Errorf("%w: a PROXY protocol header where a ClientHello was expected", ErrNotClientHello)
		}
		return 0, fmt.Errorf("%w: record type %#x", ErrNotClientHello, hdr[0])
	}
	if hdr[1] != 3 {
		return 0, fmt.Errorf("%w: record version %#x%02x", ErrNotClientHello, hdr[1], hdr[2])
	}
	n := int(binary.BigEndian.Uint16(hdr[3:5]))
	if n == 0 || n > maxRecordLen {
		return 0, fmt.Errorf("%w: record length %d", ErrNotClientHello, n)
	}
	return n, nil
}

// grow extends b by n bytes, reallocating if needed.
func grow(b []byte, n int) []byte {
	if cap(b)-len(b) < n {
		nb := make([]byte, len(b), 2*cap(b)+n)
		copy(nb, b)
		b = nb
	}
	return b[:len(b)+n]
}

// readErr turns a short read into ErrNotClientHello (the client hung up
// mid-record) unless it is a timeout, which the caller counts apart.
// began says whether any byte had arrived.
func readErr(err error, began bool) error {
	var te interface{ Timeout() bool }
	if errors.As(err, &te) && te.Timeout() {
		return err
	}
	if errors.Is(err, io.EOF) && !began {
		return fmt.Errorf("%w: connection closed before any data", ErrNotClientHello)
	}
	return fmt.Errorf("%w: %v", ErrNotClientHello, err)
}

// parseServerName walks a ClientHello body (RFC 8446, section 4.1.2) to
// the server_name extension (RFC 6066, section 3). Every length is
// checked against what remains, so no input can make it read out of
// bounds.
func parseServerName(b []byte) (string, error) {
	s := cursor(b)
	if !s.skip(2+32) || // legacy_version, random
		!s.skipVec(1) || // legacy_session_id
		!s.skipVec(2) || // cipher_suites
		!s.skipVec(1) { // legacy_compression_methods
		return "", fmt.Errorf("%w: truncated", ErrNotClientHello)
	}
	if len(s) == 0 {
		return "", nil // no extensions at all (SSLv3-style hello)
	}
	exts, ok := s.vec(2)
	if !ok {
		return "", fmt.Errorf("%w: bad extensions length", ErrNotClientHello)
	}
	for len(exts) > 0 {
		typ, ok1 := exts.u16()
		data, ok2 := exts.vec(2)
		if !ok1 || !ok2 {
			return "", fmt.Errorf("%w: truncated extension", ErrNotClientHello)
		}
		if typ != 0 { // server_name
			continue
		}
		list, ok := data.vec(2)
		if !ok {
			return "", fmt.Errorf("%w: bad server_name list", ErrNotClientHello)
		}
		for len(list) > 0 {
			nameType, ok1 := list.u8()
			name, ok2 := list.vec(2)
			if !ok1 || !ok2 {
				return "", fmt.Errorf("%w: bad server_name entry", ErrNotClientHello)
			}
			if nameType == 0 { // host_name
				if len(name) == 0 || len(name) > 255 {
					return "", fmt.Errorf("%w: bad host_name length", ErrNotClientHello)
				}
				return string(name), nil
			}
		}
		return "", nil
	}
	return "", nil
}

// cursor is a bounds-checked reader over a byte slice.
type cursor []byte

func (c *cursor) skip(n int) bool {
	if len(*c) < n {
		return false
	}
	*c = (*c)[n:]
	return true
}

func (c *cursor) u8() (byte, bool) {
	if len(*c) < 1 {
		return 0, false
	}
	v := (*c)[0]
	*c = (*c)[1:]
	return v, true
}

func (c *cursor) u16() (uint16, bool) {
	if len(*c) < 2 {
		return 0, false
	}
	v := binary.BigEndian.Uint16(*c)
	*c = (*c)[2:]
	return v, true
}

// vec reads a vector with a lenBytes-long big-endian length prefix.
func (c *cursor) vec(lenBytes int) (cursor, bool) {
	if len(*c) < lenBytes {
		return nil, false
	}
	n := 0
	for i := 0; i < lenBytes; i++ {
		n = n<<8 | int((*c)[i])
	}
	*c = (*c)[lenBytes:]
	if len(*c) < n {
		return nil, false
	}
	v := (*c)[:n]
	*c = (*c)[n:]
	return v, true
}

func (c *cursor) skipVec(lenBytes int) bool {
	_, ok := c.vec(lenBytes)
	return ok
}
