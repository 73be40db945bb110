package l7

import (
	"errors"
	"net/http"
	"strconv"
	"strings"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// requestFields checks a request's header block and returns the one the
// backend gets: :scheme of the backend connection, the forwarding headers
// as the package comment describes, hop-by-hop headers removed; and its
// content-length (-1 without one), which its DATA must match. A request
// the relay answers itself gets a status instead; a malformed one gets a
// stream error code.
func (r *relay) requestFields(f *headerBlock) (out []hpack.HeaderField, bodyLeft int64, status int, errCode http2.ErrCode) {
	method, path, scheme := f.pseudoValue("method"), f.pseudoValue("path"), f.pseudoValue("scheme")
	switch {
	case f.truncated:
		return nil, 0, http.StatusRequestHeaderFieldsTooLarge, http2.ErrCodeNo
	case method == "" || f.pseudo&pseudoStatus != 0:
		return nil, 0, 0, http2.ErrCodeProtocol
	case method == http.MethodConnect:
		return nil, 0, http.StatusMethodNotAllowed, http2.ErrCodeNo
	case path == "" || scheme == "":
		return nil, 0, 0, http2.ErrCodeProtocol
	}
	// A malformed request must not reach a backend, which may read it
	// differently, or as more than one request (RFC 9113, 8.1.1): what
	// the general path's HTTP/2 server refuses
	// (x/net/internal/httpcommon.NewServerRequest), and a content-length
	// the request's DATA cannot match (clientData checks the rest).
	length, ok := contentLength(f)
	authority := f.pseudoValue("authority")
	switch {
	case !ok || f.endStream && length > 0:
		return nil, 0, 0, http2.ErrCodeProtocol
	case path[0] != '/' && path != "*":
		return nil, 0, 0, http2.ErrCodeProtocol
	case !httpguts.ValidHeaderFieldName(method):
		return nil, 0, 0, http2.ErrCodeProtocol
	case !validAuthority(authority):
		return nil, 0, 0, http2.ErrCodeProtocol
	case f.pseudo&pseudoProtocol != 0:
		// Extended CONNECT, which the relay does not offer.
		return nil, 0, 0, http2.ErrCodeProtocol
	}

	trusted := r.ci.TrustForwarded
	host := authority
	hosts := 0
	var xff []string
	hasRealIP := false
	out = r.reqFields[:0]
	defer func() { r.reqFields = out[:0] }() // reused: encoded before the next block
	for _, hf := range f.fields {
		switch hf.Name {
		case ":scheme":
			hf.Value = r.h.scheme
		case "connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade":
			// Connection-specific: malformed in HTTP/2 (RFC 9113, 8.2.2).
			return nil, 0, 0, http2.ErrCodeProtocol
		case "te":
			if hf.Value != "trailers" {
				return nil, 0, 0, http2.ErrCodeProtocol
			}
		case "proxy-authorization", "proxy-authenticate":
			continue // meant for the proxy, as ReverseProxy treats them
		case "host":
			// A Host that names another host than :authority would
			// escape the misdirected check (RFC 9113, 8.3.1).
			if hosts++; hosts > 1 || authority != "" && hf.Value != authority || !validAuthority(hf.Value) {
				return nil, 0, 0, http2.ErrCodeProtocol
			}
			host = hf.Value
		case "x-forwarded-for":
			if trusted {
				xff = append(xff, hf.Value)
			}
			continue
		case "x-forwarded-host", "x-forwarded-proto":
			continue
		case "x-real-ip":
			if !trusted {
				continue
			}
			hasRealIP = true
		case "forwarded":
			if !trusted {
				continue
			}
		default:
			if spellsForwarding(hf.Name) {
				continue
			}
		}
		out = append(out, hf)
	}
	if r.ci.misdirected(host) {
		return nil, 0, http.StatusMisdirectedRequest, http2.ErrCodeNo
	}
	if r.clientIP != "" && !hasRealIP {
		out = append(out, hpack.HeaderField{Name: "x-real-ip", Value: r.clientIP})
	}
	// One field, comma-separated, as most backends read only the first
	// X-Forwarded-For; without a trusted chain it is just the client.
	switch {
	case len(xff) > 0 && r.clientIP != "":
		out = append(out, hpack.HeaderField{Name: "x-forwarded-for", Value: strings.Join(xff, ", ") + ", " + r.clientIP})
	case len(xff) > 0:
		out = append(out, hpack.HeaderField{Name: "x-forwarded-for", Value: strings.Join(xff, ", ")})
	case r.clientIP != "":
		out = append(out, hpack.HeaderField{Name: "x-forwarded-for", Value: r.clientIP})
	}
	out = append(out, hpack.HeaderField{Name: "x-forwarded-proto", Value: "https"})
	if host != "" {
		out = append(out, hpack.HeaderField{Name: "x-forwarded-host", Value: host})
	}
	return out, length, 0, http2.ErrCodeNo
}

// trailerFields checks a request's trailers and returns the ones the
// backend gets. A field that may not be a trailer (RFC 9110, 6.5.1) or
// is connection-specific (RFC 9113, 8.2.2) makes the request malformed,
// as on the general path; forwarding headers are dropped, as from the
// header section. The fields are f's, filtered in place.
func trailerFields(f *headerBlock) ([]hpack.HeaderField, bool) {
	out := f.fields[:0]
	for _, hf := range f.fields {
		switch {
		case hf.Name == "upgrade" || !httpguts.ValidTrailerHeader(hf.Name):
			return nil, false
		case forwardingName(hf.Name):
			continue
		}
		out = append(out, hf)
	}
	return out, true
}

// responseFields returns the fields of a response's header block, or of
// its trailers, that the client gets: not the connection-specific ones,
// which make an HTTP/2 message malformed (RFC 9113, 8.2.2) and which
// net/http's transport drops on the general path, as nginx does; nor,
// in trailers, fields that may not be trailers (RFC 9110, 6.5.1), which
// net/http's server drops there. The fields are f's, filtered in place.
func responseFields(f *headerBlock, trailers bool) []hpack.HeaderField {
	out := f.fields[:0]
	for _, hf := range f.fields {
		switch {
		case hf.IsPseudo():
		case connectionSpecific(hf.Name):
			continue
		case trailers && !httpguts.ValidTrailerHeader(hf.Name):
			continue
		}
		out = append(out, hf)
	}
	return out
}

// connectionSpecific reports whether name (in lower case) is a field
// HTTP/2 does not allow (RFC 9113, 8.2.2).
func connectionSpecific(name string) bool {
	switch name {
	case "connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade":
		return true
	}
	return false
}

// responseLength returns how much content a response with status code
// must bring: 0 if it has none (RFC 9110, 6.4.1), whatever its
// content-length, which then describes the response a GET would have
// had; else its content-length, -1 without one. ok is false as for
// contentLength.
func responseLength(b *headerBlock, code int, head bool) (n int64, ok bool) {
	if head || code == http.StatusNoContent || code == http.StatusNotModified {
		return 0, true
	}
	return contentLength(b)
}

// contentLength returns a message's content-length, -1 if it has none.
// ok is false if a content-length is not a number, or two disagree.
func contentLength(b *headerBlock) (n int64, ok bool) {
	n = -1
	for _, f := range b.fields {
		if f.Name != "content-length" {
			continue
		}
		v, err := strconv.ParseUint(f.Value, 10, 63)
		if err != nil || n >= 0 && int64(v) != n {
			return -1, false
		}
		n = int64(v)
	}
	return n, true
}

// validAuthority reports whether a is empty or a host[:port] without
// userinfo, which RFC 9113 (8.3.1) forbids in :authority.
func validAuthority(a string) bool {
	return strings.IndexByte(a, '@') < 0 && httpguts.ValidHostHeader(a)
}

// isHead reports whether b is the header block of a HEAD request.
func isHead(b *headerBlock) bool {
	return b.pseudoValue("method") == http.MethodHead
}

// parseStatus returns a :status value as a number, or 0 if it is not
// three digits.
func parseStatus(s string) int {
	if len(s) != 3 {
		return 0
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 100 {
		return 0
	}
	return n
}

// statusBodies are the short bodies of the responses the relay writes
// itself, the same as the general path's.
var statusBodies = map[int]string{}

func init() {
	for _, code := range []int{
		http.StatusBadGateway, http.StatusGatewayTimeout,
		http.StatusMethodNotAllowed, http.StatusRequestHeaderFieldsTooLarge,
		http.StatusMisdirectedRequest,
	} {
		statusBodies[code] = strings.ToLower(http.StatusText(code)) + "\n"
	}
}

// headerBlock is one decoded header block (a HEADERS frame and its
// CONTINUATIONs). Its fields are the peer's reused buffer: valid until the
// peer's next block is read.
type headerBlock struct {
	streamID  uint32
	endStream bool
	priority  http2.PriorityParam // zero when the HEADERS frame had none
	fields    []hpack.HeaderField
	pseudo    uint8 // pseudo-header fields present, by pseudoBit
	truncated bool  // over the size limit: fields is incomplete
}

func (b *headerBlock) pseudoValue(name string) string {
	for _, f := range b.fields {
		if !f.IsPseudo() {
			break
		}
		if f.Name[1:] == name {
			return f.Value
		}
	}
	return ""
}

// headerDecoder decodes a peer's header blocks into one reused slice,
// checking what RFC 9113 section 8.2 asks of every field. It replaces the
// framer's own ReadMetaHeaders, which allocates a frame and a fresh slice
// per block.
type headerDecoder struct {
	dec     *hpack.Decoder
	maxList uint32 // SETTINGS_MAX_HEADER_LIST_SIZE we hold the peer to

	block   headerBlock
	size    uint32 // of the fields so far, as RFC 9113 counts it
	regular bool   // a regular field was seen
	invalid error
}

func newHeaderDecoder(maxList uint32) *headerDecoder {
	d := &headerDecoder{maxList: maxList}
	d.dec = hpack.NewDecoder(4096, d.emit)
	d.dec.SetMaxStringLength(int(maxList))
	return d
}

var (
	errPseudoAfterRegular = errors.New("pseudo-header field after a regular one")
	errBadPseudo          = errors.New("unknown or repeated pseudo-header field")
	errBadFieldName       = errors.New("invalid header field name")
	errBadFieldValue      = errors.New("invalid header field value")
	errSelfDependency     = errors.New("stream depends on itself") // RFC 9113, 5.3.1
)

// Pseudo-header fields HTTP/2 defines, as bits.
const (
	pseudoMethod uint8 = 1 << iota
	pseudoScheme
	pseudoAuthority
	pseudoPath
	pseudoProtocol
	pseudoStatus
)

func pseudoBit(name string) uint8 {
	switch name {
	case ":method":
		return pseudoMethod
	case ":scheme":
		return pseudoScheme
	case ":authority":
		return pseudoAuthority
	case ":path":
		return pseudoPath
	case ":protocol":
		return pseudoProtocol
	case ":status":
		return pseudoStatus
	}
	return 0
}

func (d *headerDecoder) emit(f hpack.HeaderField) {
	if d.invalid != nil || d.block.truncated {
		return // keep decoding for the HPACK table's sake only
	}
	if d.size += f.Size(); d.size > d.maxList {
		d.block.truncated = true
		return
	}
	switch {
	case !httpguts.ValidHeaderFieldValue(f.Value):
		d.invalid = errBadFieldValue
	case f.IsPseudo():
		bit := pseudoBit(f.Name)
		switch {
		case d.regular:
			d.invalid = errPseudoAfterRegular
		case bit == 0 || d.block.pseudo&bit != 0:
			d.invalid = errBadPseudo
		}
		d.block.pseudo |= bit
	default:
		d.regular = true
		if !validFieldName(f.Name) {
			d.invalid = errBadFieldName
		}
	}
	d.block.fields = append(d.block.fields, f)
}

// validFieldName reports whether name is a token in lower case, as
// HTTP/2 requires of field names.
func validFieldName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if 'A' <= c && c <= 'Z' || !httpguts.IsTokenRune(rune(c)) {
			return false
		}
	}
	return true
}

// read decodes the block that hf starts, reading its CONTINUATION frames
// from fr (whose frame-order check guarantees they follow, on the same
// stream). A malformed field is a stream error once the whole block is
// decoded, so HPACK stays in step; undecodable HPACK is a connection
// error.
func (d *headerDecoder) read(fr *http2.Framer, hf *http2.HeadersFrame) (*headerBlock, error) {
	d.block = headerBlock{
		streamID:  hf.StreamID,
		endStream: hf.StreamEnded(),
		fields:    d.block.fields[:0],
	}
	if hf.HasPriority() {
		d.block.priority = hf.Priority
	}
	d.size, d.regular, d.invalid = 0, false, nil

	// A block may be at most this long on the wire, frame headers
	// included: a sender far past the field limit is flooding, not
	// sending headers. Counting the headers bounds a flood of empty
	// CONTINUATIONs too (CVE-2024-28182), which would otherwise keep the
	// block, and this loop, going for as long as the sender likes.
	const frameHeaderLen = 9
	budget := 2*int64(d.maxList) + 64<<10
	frag, ended := hf.HeaderBlockFragment(), hf.HeadersEnded()
	for {
		if budget -= frameHeaderLen + int64(len(frag)); budget < 0 {
			return nil, http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if _, err := d.dec.Write(frag); err != nil {
			return nil, http2.ConnectionError(http2.ErrCodeCompression)
		}
		if ended {
			break
		}
		f, err := fr.ReadFrame()
		if err != nil {
			return nil, err
		}
		cf := f.(*http2.ContinuationFrame) // guaranteed by the framer
		frag, ended = cf.HeaderBlockFragment(), cf.HeadersEnded()
	}
	if err := d.dec.Close(); err != nil {
		return nil, http2.ConnectionError(http2.ErrCodeCompression)
	}
	if d.block.priority.StreamDep == d.block.streamID {
		d.invalid = errSelfDependency
	}
	if d.invalid != nil {
		return &d.block, http2.StreamError{StreamID: d.block.streamID, Code: http2.ErrCodeProtocol, Cause: d.invalid}
	}
	return &d.block, nil
}
