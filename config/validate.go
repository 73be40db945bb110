package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// Validate checks the whole configuration and returns every problem it
// finds (joined), each pinned to file, line and key. It is the one
// validation path: `portcullis check`, file reloads and admin mutations
// (validated against the would-be effective config) all call it.
func (c *Config) Validate() error {
	v := validator{c: c}
	v.top()
	v.firewall()
	if len(c.Listeners) == 0 {
		// Also what a file caught mid-write (truncated, not yet written)
		// looks like; rejecting it keeps the running listeners open
		// until the write completes.
		v.errs = append(v.errs, &Error{File: c.Path, Key: "listener", Err: errors.New("at least one [[listener]] is required")})
	}
	names := map[string]string{}
	addrs := map[string]string{}
	var binds []bind
	for i := range c.Listeners {
		key := fmt.Sprintf("listener[%d]", i)
		l := &c.Listeners[i]
		v.listener(i, key, l)
		if l.Name != "" {
			if prev, ok := names[l.Name]; ok {
				v.errf(key+".name", "duplicate listener name %q (first at %s)", l.Name, v.where(prev))
			} else {
				names[l.Name] = key + ".name"
			}
		}
		if a, err := CanonicalHostPort(l.Listen); err == nil {
			if prev, ok := addrs[a]; ok {
				v.errf(key+".listen", "duplicate listen address %q (first at %s)", l.Listen, v.where(prev))
			} else {
				addrs[a] = key + ".listen"
				binds = v.bind(binds, bind{key + ".listen", l.Listen, a})
			}
		}
	}
	// serve binds the metrics and admin sockets after the listeners.
	for _, b := range []bind{{key: "metrics.listen", text: c.Metrics.Listen}, {key: "admin.listen", text: c.Admin.Listen}} {
		if a, err := CanonicalHostPort(b.text); err == nil {
			b.addr = a
			binds = v.bind(binds, b)
		}
	}
	return errors.Join(v.errs...)
}

// bind is a socket the file asks for: where, as written, and canonical.
type bind struct{ key, text, addr string }

// bind reports n if it cannot be bound beside the sockets before it, and
// returns binds with it added. A wildcard address takes its port on
// every interface, so ":443" and "127.0.0.1:443" cannot both be bound:
// the second fails with "address already in use".
func (v *validator) bind(binds []bind, n bind) []bind {
	host, port, _ := net.SplitHostPort(n.addr)
	for _, b := range binds {
		h, p, _ := net.SplitHostPort(b.addr)
		if p != port || port == "0" || h != host && h != "" && host != "" {
			continue
		}
		if h == host {
			v.errf(n.key, "%q is the address of %s (%s)", n.text, b.key, v.where(b.key))
		} else {
			v.errf(n.key, "%q overlaps %s %q (%s): a wildcard address takes its port on every interface", n.text, b.key, b.text, v.where(b.key))
		}
		break
	}
	return append(binds, n)
}

type validator struct {
	c    *Config
	errs []error
}

func (v *validator) errf(key, format string, args ...any) {
	v.errs = append(v.errs, v.c.KeyError(key, fmt.Errorf(format, args...)))
}

// where describes the place of an earlier key for "duplicate" messages.
func (v *validator) where(key string) string {
	if n := v.c.Line(key); n > 0 {
		return "line " + strconv.Itoa(n)
	}
	return key
}

func (v *validator) top() {
	c := v.c
	if c.ShutdownGrace < 0 {
		v.errf("shutdown_grace", "must not be negative")
	}
	a := c.Admin
	if a.Listen != "" {
		if _, err := CanonicalHostPort(a.Listen); err != nil {
			v.errf("admin.listen", "%v", err)
		}
		if a.TLSCert == "" || a.TLSKey == "" {
			v.errf("admin.listen", "a TCP admin listener requires tls_cert and tls_key (plaintext TCP is refused)")
		}
	}
	if (a.TLSCert == "") != (a.TLSKey == "") {
		v.errf("admin.tls_cert", "tls_cert and tls_key go together")
	}
	if p := c.Resolve(a.UnixSocket); len(p) > maxUnixSocketPath {
		v.errf("admin.unix_socket", "%q is %d bytes long; a Unix socket path can have at most %d", p, len(p), maxUnixSocketPath)
	}
	if a.TLSCert != "" && a.TLSKey != "" && a.Listen == "" {
		// They are the TCP listener's certificate; without one they
		// would be neither loaded nor used, and check would pass a
		// file that has no TCP admin API.
		v.errf("admin.tls_cert", "tls_cert and tls_key need admin.listen")
	}
	if a.ClientCA != "" && a.Listen == "" {
		v.errf("admin.client_ca", "client_ca needs admin.listen")
	}
	if c.Metrics.Listen != "" {
		if _, err := CanonicalHostPort(c.Metrics.Listen); err != nil {
			v.errf("metrics.listen", "%v", err)
		}
	}
}

// maxUnixSocketPath is the longest path bind(2) takes for a Unix socket
// on Linux: sun_path is 108 bytes, the terminating NUL included.
const maxUnixSocketPath = 107

func (v *validator) firewall() {
	f := v.c.Firewall
	for i, b := range f.Block {
		if _, err := ParsePrefix(b); err != nil {
			v.errf(fmt.Sprintf("firewall.block[%d]", i), "%v", err)
		} else if strings.Contains(b, "%") {
			// The firewall refuses zoned entries when it compiles them;
			// say so here, where the error can name the entry.
			v.errf(fmt.Sprintf("firewall.block[%d]", i), "%q has a zone; block entries are addresses or CIDRs without one", b)
		}
	}
	for i, cc := range f.BlockCountries {
		if !validCountry(cc) {
			v.errf(fmt.Sprintf("firewall.block_countries[%d]", i), "%q is not an ISO 3166-1 alpha-2 country code", cc)
		}
	}
	if len(f.BlockCountries) > 0 && v.c.GeoIP.Database == "" {
		v.errf("firewall.block_countries", "needs [geoip] database")
	}
	if rl := f.RateLimit; rl != nil {
		if rl.Connections <= 0 || rl.Connections > 65535 {
			v.errf("firewall.rate_limit.connections", "must be between 1 and 65535")
		}
		if rl.Window <= 0 {
			v.errf("firewall.rate_limit.window", "must be positive")
		}
		if rl.MaxSources < 0 {
			v.errf("firewall.rate_limit.max_sources", "must not be negative")
		}
	}
}

func (v *validator) listener(li int, key string, l *Listener) {
	if l.Name == "" {
		v.errf(key+".name", "required")
	}
	if _, err := CanonicalHostPort(l.Listen); err != nil {
		v.errf(key+".listen", "%v", err)
	}
	for i, p := range l.ProxyProtocolTrusted {
		if _, err := ParsePrefix(p); err != nil {
			v.errf(fmt.Sprintf("%s.proxy_protocol_trusted[%d]", key, i), "%v", err)
		}
	}
	if l.ProxyProtocol && len(l.ProxyProtocolTrusted) == 0 {
		v.errf(key+".proxy_protocol_trusted", "proxy_protocol = true needs at least one trusted sender")
	}
	for i, p := range l.ForwardedTrusted {
		if _, err := ParsePrefix(p); err != nil {
			v.errf(fmt.Sprintf("%s.forwarded_trusted[%d]", key, i), "%v", err)
		}
	}
	if l.MaxConnections < 0 {
		v.errf(key+".max_connections", "must not be negative (0 means unlimited)")
	}
	for _, d := range []struct {
		name string
		val  Duration
	}{{"handshake_timeout", l.HandshakeTimeout}, {"idle_timeout", l.IdleTimeout}, {"dial_timeout", l.DialTimeout}} {
		if d.val < 0 {
			v.errf(key+"."+d.name, "must not be negative")
		}
	}
	snis := map[string]string{}
	for i := range l.Routes {
		rkey := v.c.RouteKey(li, i)
		r := &l.Routes[i]
		if err := r.Validate(); err != nil {
			var fe *fieldError
			if errors.As(err, &fe) {
				v.errf(rkey+"."+fe.field, "%v", fe.err)
			} else {
				v.errf(rkey, "%v", err)
			}
		}
		if r.SNI == "" {
			continue
		}
		if prev, ok := snis[r.SNI]; ok {
			v.errf(rkey+".sni", "duplicate sni %q (first at %s)", r.SNI, v.where(prev))
		} else {
			snis[r.SNI] = rkey + ".sni"
		}
	}
}

// fieldError names the route field a route-level error is about.
type fieldError struct {
	field string
	err   error
}

func (e *fieldError) Error() string { return e.field + ": " + e.err.Error() }
func (e *fieldError) Unwrap() error { return e.err }

// Field reports which route key err is about ("" when it names none).
// The admin API uses it to fill InvalidArgument details.
func Field(err error) string {
	var fe *fieldError
	if errors.As(err, &fe) {
		return fe.field
	}
	var ce *Error
	if errors.As(err, &ce) {
		return ce.Key
	}
	return ""
}

func fieldErr(field, format string, args ...any) error {
	return &fieldError{field: field, err: fmt.Errorf(format, args...)}
}

// Validate checks one route on its own (defaults applied). It does not
// load certificates: that happens when the route is compiled.
func (r *Route) Validate() error {
	if err := ValidateSNI(r.SNI); err != nil {
		return &fieldError{field: "sni", err: err}
	}
	backend, err := CanonicalHostPort(r.Backend)
	if err != nil {
		return &fieldError{field: "backend", err: err}
	}
	if strings.HasSuffix(backend, ":0") {
		// A listener may ask for any free port; a connection cannot.
		return fieldErr("backend", "%q: port 0 cannot be dialled", r.Backend)
	}
	switch r.Mode {
	case ModeL4:
		for _, f := range []struct{ name, val string }{
			{"tls_cert", r.TLSCert}, {"tls_key", r.TLSKey}, {"backend_protocol", r.BackendProtocol},
			{"backend_ca", r.BackendCA}, {"backend_server_name", r.BackendServerName},
		} {
			if f.val != "" {
				return fieldErr(f.name, "only applies to mode = \"l7\"")
			}
		}
		if r.ResponseTimeout != 0 {
			return fieldErr("response_timeout", "only applies to mode = \"l7\"")
		}
	case ModeL7:
		if r.TLSCert == "" {
			return fieldErr("tls_cert", "required for mode = \"l7\"")
		}
		if r.TLSKey == "" {
			return fieldErr("tls_key", "required for mode = \"l7\"")
		}
		if r.ResponseTimeout < 0 {
			return fieldErr("response_timeout", "must not be negative")
		}
		switch r.BackendProtocol {
		case BackendH2C, BackendHTTP1:
			if r.BackendCA != "" {
				return fieldErr("backend_ca", "only applies to TLS backends (h2, https1)")
			}
			if r.BackendServerName != "" {
				return fieldErr("backend_server_name", "only applies to TLS backends (h2, https1)")
			}
		case BackendH2, BackendHTTPS1:
		default:
			return fieldErr("backend_protocol", "%q is not one of h2c, h2, http1, https1", r.BackendProtocol)
		}
	default:
		return fieldErr("mode", "%q is not l4 or l7", r.Mode)
	}
	return nil
}

// ValidateSNI accepts "*" (the default route), "*.example.com" (one
// label wildcard) and plain host names, already normalised.
func ValidateSNI(s string) error {
	name := s // as written, for the messages
	switch {
	case s == "":
		return errors.New("required")
	case s == "*":
		return nil
	case strings.HasPrefix(s, "*."):
		s = s[2:]
	}
	if len(s) > 253 {
		return fmt.Errorf("host name longer than 253 bytes")
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 {
			return fmt.Errorf("%q is not a valid host name (empty or over-long label)", name)
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return fmt.Errorf("%q is not a valid host name or *.suffix wildcard", name)
			}
		}
	}
	return nil
}

// ParsePrefix reads an address ("192.0.2.1", "2001:db8::1") as a
// single-address prefix, or a CIDR ("192.0.2.0/24"). 4-in-6 addresses
// are unmapped so they match IPv4 clients.
func ParsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not an address or CIDR", s)
		}
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		if m := p.Masked(); m != p {
			return netip.Prefix{}, fmt.Errorf("%q has host bits set (did you mean %q?)", s, m.String())
		}
		return p, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not an address or CIDR", s)
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func validCountry(cc string) bool {
	if len(cc) != 2 {
		return false
	}
	for i := 0; i < 2; i++ {
		c := cc[i] | 0x20 // lower-case ASCII letters
		if c < 'a' || c > 'z' {
			return false
		}
	}
	return true
}

// canonicalHostPort checks a host:port and returns it in a canonical form
// so ":443" and "[::]:443" style duplicates are caught as the same string.
func CanonicalHostPort(s string) (string, error) {
	if s == "" {
		return "", errors.New("required (host:port)")
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", fmt.Errorf("%q is not host:port", s)
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return "", fmt.Errorf("%q: port %q is not a number from 0 to 65535", s, port)
	}
	if a, err := netip.ParseAddr(host); err == nil {
		a = a.Unmap()
		host = a.String()
		if a.IsUnspecified() {
			// ":443", "0.0.0.0:443" and "[::]:443" bind the same
			// wildcard socket (Go listens dual-stack on both).
			host = ""
		}
	}
	return net.JoinHostPort(strings.ToLower(host), strconv.FormatUint(n, 10)), nil
}

// CheckBackendHost refuses a backend whose host is neither an IP address
// nor a DNS host name of at most 253 bytes. CanonicalHostPort takes any
// bytes as the host: a space, NUL or newline makes a route no connection
// can reach, and a host of megabytes, stored as an override, pushes every
// later listing past gRPC's message limit. It is checked on the file as
// parsed and on what an admin call sends, not in Validate, which also
// runs on the overrides stored so far: one stored before this check would
// stop the daemon from starting, and with it the admin API that could
// clear it. A backend that is not host:port at all is left to Validate.
func CheckBackendHost(hostport string) error {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return nil
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return nil
	}
	if len(host) > 253 {
		return fmt.Errorf("host is %d bytes; a host name has at most 253", len(host))
	}
	for i := 0; i < len(host); i++ {
		c := host[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("host %q is not an IP address or host name", host)
		}
	}
	return nil
}

// backendHosts is CheckBackendHost on every route of the file.
func (c *Config) backendHosts() error {
	var errs []error
	for li := range c.Listeners {
		for ri, r := range c.Listeners[li].Routes {
			if err := CheckBackendHost(r.Backend); err != nil {
				errs = append(errs, c.KeyError(c.RouteKey(li, ri)+".backend", err))
			}
		}
	}
	return errors.Join(errs...)
}
