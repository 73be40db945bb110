package l7

import (
	"net/http"
	"strconv"
	"strings"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// requestFields checks a request's header block and returns the one the
// backend gets: :scheme of the backend connection, the forwarding headers
// as the package comment describes, hop-by-hop headers removed. A request
// the relay answers itself gets a status instead; a malformed one gets a
// stream error code.
func (r *relay) requestFields(f *http2.MetaHeadersFrame) (out []hpack.HeaderField, status int, errCode http2.ErrCode) {
	method, path, scheme := f.PseudoValue("method"), f.PseudoValue("path"), f.PseudoValue("scheme")
	switch {
	case f.Truncated:
		return nil, http.StatusRequestHeaderFieldsTooLarge, http2.ErrCodeNo
	case method == "":
		return nil, 0, http2.ErrCodeProtocol
	case method == http.MethodConnect:
		return nil, http.StatusMethodNotAllowed, http2.ErrCodeNo
	case path == "" || scheme == "":
		return nil, 0, http2.ErrCodeProtocol
	}

	trusted := r.ci.TrustForwarded
	host := f.PseudoValue("authority")
	var xff []string
	hasRealIP := false
	out = make([]hpack.HeaderField, 0, len(f.Fields)+4)
	for _, hf := range f.Fields {
		switch hf.Name {
		case ":scheme":
			hf.Value = r.h.scheme
		case "connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade":
			// Connection-specific: malformed in HTTP/2 (RFC 9113, 8.2.2).
			return nil, 0, http2.ErrCodeProtocol
		case "te":
			if hf.Value != "trailers" {
				return nil, 0, http2.ErrCodeProtocol
			}
		case "proxy-authorization", "proxy-authenticate":
			continue // meant for the proxy, as ReverseProxy treats them
		case "host":
			if host == "" {
				host = hf.Value
			}
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
		}
		out = append(out, hf)
	}
	if r.clientIP != "" {
		xff = append(xff, r.clientIP)
		if !hasRealIP {
			out = append(out, hpack.HeaderField{Name: "x-real-ip", Value: r.clientIP})
		}
	}
	if len(xff) > 0 {
		out = append(out, hpack.HeaderField{Name: "x-forwarded-for", Value: strings.Join(xff, ", ")})
	}
	out = append(out, hpack.HeaderField{Name: "x-forwarded-proto", Value: "https"})
	if host != "" {
		out = append(out, hpack.HeaderField{Name: "x-forwarded-host", Value: host})
	}
	return out, 0, http2.ErrCodeNo
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

func statusText(n int) string { return strconv.Itoa(n) }

// statusBodies are the short bodies of the responses the relay writes
// itself, the same as the general path's.
var statusBodies = map[int]string{}

func init() {
	for _, code := range []int{
		http.StatusBadGateway, http.StatusGatewayTimeout,
		http.StatusMethodNotAllowed, http.StatusRequestHeaderFieldsTooLarge,
	} {
		statusBodies[code] = strings.ToLower(http.StatusText(code)) + "\n"
	}
}
