// Package config is the TOML schema of portcullis: strict decoding,
// defaults and validation. Every error names the file, line and key it is
// about, so an operator can fix a broken file without guessing:
//
//	cfg, err := config.Load("portcullis.toml")
//	if err != nil {
//		// portcullis.toml:14: listener[0].route[1].sni: duplicate sni "a.example.com" (first at line 9)
//	}
//
// The package is pure: it reads the file and nothing else. Loading
// certificates, opening databases and binding sockets happen when the
// config is compiled into a snapshot; those steps report their failures
// through [Config.KeyError] so they carry the same file:line:key.
package config

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// Defaults applied to keys the file leaves out.
const (
	DefaultShutdownGrace    = 30 * time.Second
	DefaultHandshakeTimeout = 5 * time.Second
	DefaultIdleTimeout      = 10 * time.Minute
	DefaultDialTimeout      = 5 * time.Second
	DefaultResponseTimeout  = 60 * time.Second
	DefaultDatabase         = "portcullis.db"
)

// Route modes and L7 backend protocols.
const (
	ModeL4 = "l4"
	ModeL7 = "l7"

	BackendH2C    = "h2c"
	BackendH2     = "h2"
	BackendHTTP1  = "http1"
	BackendHTTPS1 = "https1"
)

// Config is one decoded and validated configuration file.
type Config struct {
	ShutdownGrace Duration   `toml:"shutdown_grace" json:"shutdown_grace"`
	Admin         Admin      `toml:"admin" json:"admin"`
	Metrics       Metrics    `toml:"metrics" json:"metrics"`
	State         State      `toml:"state" json:"state"`
	GeoIP         GeoIP      `toml:"geoip" json:"geoip"`
	Firewall      Firewall   `toml:"firewall" json:"firewall"`
	Listeners     []Listener `toml:"listener" json:"listener"`

	// Path is the file the config was read from; relative paths inside
	// the file are resolved against its directory.
	Path string `toml:"-" json:"-"`

	lines lineTable
}

// Admin configures the gRPC admin API.
type Admin struct {
	UnixSocket string `toml:"unix_socket" json:"unix_socket,omitempty"`
	Listen     string `toml:"listen" json:"listen,omitempty"`
	TLSCert    string `toml:"tls_cert" json:"tls_cert,omitempty"`
	TLSKey     string `toml:"tls_key" json:"tls_key,omitempty"`
	ClientCA   string `toml:"client_ca" json:"client_ca,omitempty"`
}

// Metrics configures the Prometheus endpoint.
type Metrics struct {
	Listen string `toml:"listen" json:"listen,omitempty"`
}

// State configures the SQLite override store.
type State struct {
	Database string `toml:"database" json:"database,omitempty"`
}

// GeoIP names the MaxMind country database.
type GeoIP struct {
	Database string `toml:"database" json:"database,omitempty"`
}

// Firewall is the global blocklist and rate limit.
type Firewall struct {
	Block          []string   `toml:"block" json:"block,omitempty"`
	BlockCountries []string   `toml:"block_countries" json:"block_countries,omitempty"`
	RateLimit      *RateLimit `toml:"rate_limit" json:"rate_limit,omitempty"`
}

// RateLimit allows Connections new connections per Window per source
// address (IPv6 sources are grouped by /64).
type RateLimit struct {
	Connections int      `toml:"connections" json:"connections"`
	Window      Duration `toml:"window" json:"window"`
	// MaxSources bounds how many source addresses are tracked at once;
	// 0 means the firewall's default.
	MaxSources int `toml:"max_sources" json:"max_sources,omitempty"`
}

// Listener is one named TCP listener and its routes.
type Listener struct {
	Name                 string   `toml:"name" json:"name"`
	Listen               string   `toml:"listen" json:"listen"`
	ProxyProtocol        bool     `toml:"proxy_protocol" json:"proxy_protocol,omitempty"`
	ProxyProtocolTrusted []string `toml:"proxy_protocol_trusted" json:"proxy_protocol_trusted,omitempty"`
	// ForwardedTrusted lists clients (the PROXY header's source when one
	// is honoured) whose X-Forwarded-For is appended to on L7 routes; from
	// anyone else it is replaced.
	ForwardedTrusted []string `toml:"forwarded_trusted" json:"forwarded_trusted,omitempty"`
	MaxConnections   int      `toml:"max_connections" json:"max_connections"`
	HandshakeTimeout Duration `toml:"handshake_timeout" json:"handshake_timeout"`
	IdleTimeout      Duration `toml:"idle_timeout" json:"idle_timeout"`
	DialTimeout      Duration `toml:"dial_timeout" json:"dial_timeout"`
	Routes           []Route  `toml:"route" json:"route"`
}

// Route sends connections whose SNI matches to a backend.
type Route struct {
	SNI               string `toml:"sni" json:"sni"`
	Mode              string `toml:"mode" json:"mode,omitempty"`
	Backend           string `toml:"backend" json:"backend"`
	SendProxyProtocol bool   `toml:"send_proxy_protocol" json:"send_proxy_protocol,omitempty"`

	// L7 only.
	TLSCert           string `toml:"tls_cert" json:"tls_cert,omitempty"`
	TLSKey            string `toml:"tls_key" json:"tls_key,omitempty"`
	BackendProtocol   string `toml:"backend_protocol" json:"backend_protocol,omitempty"`
	BackendCA         string `toml:"backend_ca" json:"backend_ca,omitempty"`
	BackendServerName string `toml:"backend_server_name" json:"backend_server_name,omitempty"`
	// ResponseTimeout bounds the wait for a backend's response headers
	// (504 after it), counted from the last time the backend took some of
	// the request body; 0 means DefaultResponseTimeout.
	ResponseTimeout Duration `toml:"response_timeout" json:"response_timeout,omitempty"`

	// Source is where the route was written in the file
	// ("listener[0].route[2]"), so errors keep pointing at the right line
	// after overrides remove or add routes; empty for override routes.
	Source string `toml:"-" json:"-"`
}

// RouteKey names route ri of listener li for error messages: its place
// in the file, or, for a route that came from an override, its SNI.
func (c *Config) RouteKey(li, ri int) string {
	l := &c.Listeners[li]
	if src := l.Routes[ri].Source; src != "" {
		return src
	}
	return fmt.Sprintf("listener[%d].override(sni=%q)", li, l.Routes[ri].SNI)
}

// Duration is a time.Duration written as a Go duration string ("5s").
type Duration time.Duration

// UnmarshalText parses "1m30s" style durations.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("invalid duration %q (want e.g. \"5s\", \"10m\")", b)
	}
	*d = Duration(v)
	return nil
}

// MarshalText writes the duration back in the same form.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// Load reads and validates the file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return Parse(path, data)
}

// Parse decodes data (named path in errors), applies defaults and
// validates the result.
func Parse(path string, data []byte) (*Config, error) {
	c := &Config{Path: path}
	// A UTF-8 byte order mark, as Windows editors write it: TOML allows
	// one at the start, go-toml does not.
	data = bytes.TrimPrefix(data, []byte("\ufeff"))
	lines, kinds := indexLines(data)
	// Durations written as numbers or as zero are reported with the
	// file's other problems too, not on their own first.
	durations := durationErrors(path, lines, kinds)
	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	// Unknown keys are skipped and reported once the rest is decoded, so
	// a misspelt key does not hide the file's other problems.
	var unknown error
	if err := dec.Decode(c); err != nil {
		var sm *toml.StrictMissingError
		if !errors.As(err, &sm) {
			if durations != nil {
				// A duration the decoder cannot store (1.5, true) is
				// what failed; durations says so in the schema's words.
				return nil, durations
			}
			return nil, decodeError(path, err, lines)
		}
		unknown = decodeError(path, err, lines)
	}
	c.lines = lines
	for i := range c.Listeners {
		for j := range c.Listeners[i].Routes {
			c.Listeners[i].Routes[j].Source = fmt.Sprintf("listener[%d].route[%d]", i, j)
		}
	}
	c.ApplyDefaults()
	if err := errors.Join(durations, unknown, without(c.Validate(), durations), c.backendHosts()); err != nil {
		return nil, err
	}
	return c, nil
}

// without drops from err, a join of *Error, the errors about keys that
// reported already names, so a key is not reported twice: a "0s" window
// also fails validation as not positive.
func without(err, reported error) error {
	type joined interface{ Unwrap() []error }
	all, ok := err.(joined)
	if !ok || reported == nil {
		return err
	}
	keys := map[string]bool{}
	if r, ok := reported.(joined); ok {
		for _, e := range r.Unwrap() {
			if ce, ok := e.(*Error); ok {
				keys[ce.Key] = true
			}
		}
	}
	var errs []error
	for _, e := range all.Unwrap() {
		if ce, ok := e.(*Error); !ok || !keys[ce.Key] {
			errs = append(errs, e)
		}
	}
	return errors.Join(errs...)
}

// ApplyDefaults fills keys left empty. It is idempotent, so a config
// merged with overrides can be passed through it again.
func (c *Config) ApplyDefaults() {
	if c.ShutdownGrace == 0 {
		c.ShutdownGrace = Duration(DefaultShutdownGrace)
	}
	if c.State.Database == "" {
		c.State.Database = DefaultDatabase
	}
	for i := range c.Listeners {
		l := &c.Listeners[i]
		if l.HandshakeTimeout == 0 {
			l.HandshakeTimeout = Duration(DefaultHandshakeTimeout)
		}
		if l.IdleTimeout == 0 {
			l.IdleTimeout = Duration(DefaultIdleTimeout)
		}
		if l.DialTimeout == 0 {
			l.DialTimeout = Duration(DefaultDialTimeout)
		}
		for j := range l.Routes {
			l.Routes[j].ApplyDefaults()
		}
	}
}

// ApplyDefaults normalises the route: SNI lower-cased without a trailing
// dot, mode l4 unless set, h2c for L7 backends unless set.
func (r *Route) ApplyDefaults() {
	r.SNI = NormalizeSNI(r.SNI)
	if r.Mode == "" {
		r.Mode = ModeL4
	}
	if r.Mode == ModeL7 {
		if r.BackendProtocol == "" {
			r.BackendProtocol = BackendH2C
		}
		if r.ResponseTimeout == 0 {
			r.ResponseTimeout = Duration(DefaultResponseTimeout)
		}
	}
}

// NormalizeSNI lower-cases a host name and strips one trailing dot, the
// form route tables are keyed by.
func NormalizeSNI(s string) string {
	s = strings.TrimSuffix(s, ".")
	for i := 0; i < len(s); i++ {
		if c := s[i]; c >= 'A' && c <= 'Z' {
			return strings.ToLower(s)
		}
	}
	return s
}

// Resolve makes a path from the file relative to the config file's
// directory; absolute paths and "" are returned unchanged.
func (c *Config) Resolve(p string) string {
	if p == "" || filepath.IsAbs(p) || c.Path == "" {
		return p
	}
	return filepath.Join(filepath.Dir(c.Path), p)
}

// Hash identifies the parsed configuration: two files that decode to the
// same values have the same hash, whatever their comments or layout.
func (c *Config) Hash() string {
	b, err := json.Marshal(c)
	if err != nil {
		// Every field is a plain value; Marshal cannot fail.
		panic(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// Clone returns a deep copy that shares nothing mutable with c, so
// overrides can be merged into it without touching the decoded file.
func (c *Config) Clone() *Config {
	n := *c
	n.Firewall.Block = append([]string(nil), c.Firewall.Block...)
	n.Firewall.BlockCountries = append([]string(nil), c.Firewall.BlockCountries...)
	if c.Firewall.RateLimit != nil {
		rl := *c.Firewall.RateLimit
		n.Firewall.RateLimit = &rl
	}
	n.Listeners = make([]Listener, len(c.Listeners))
	for i, l := range c.Listeners {
		l.ProxyProtocolTrusted = append([]string(nil), l.ProxyProtocolTrusted...)
		l.ForwardedTrusted = append([]string(nil), l.ForwardedTrusted...)
		l.Routes = append([]Route(nil), l.Routes...)
		n.Listeners[i] = l
	}
	return &n
}

// Listener returns the listener called name, or nil.
func (c *Config) Listener(name string) *Listener {
	for i := range c.Listeners {
		if c.Listeners[i].Name == name {
			return &c.Listeners[i]
		}
	}
	return nil
}

// Error is a configuration error pinned to a place in the file.
type Error struct {
	File string // config file path
	Line int    // 1-based; 0 when the value has no line (it came from an override)
	Key  string // e.g. listener[0].route[2].sni
	Err  error
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	if e.Key != "" {
		b.WriteString(": ")
		b.WriteString(e.Key)
	}
	b.WriteString(": ")
	b.WriteString(e.Err.Error())
	return b.String()
}

func (e *Error) Unwrap() error { return e.Err }

// KeyError pins err to the line of key in the file. Compile steps outside
// this package (loading certificates, opening the GeoIP database) use it
// so their errors read like validation errors. A key the file leaves out
// (a required one) is pinned to the table that should hold it.
func (c *Config) KeyError(key string, err error) error {
	line := c.lines.line(key)
	if i := strings.LastIndexByte(key, '.'); line == 0 && i > 0 {
		line = c.lines.line(key[:i])
	}
	return &Error{File: c.Path, Line: line, Key: key, Err: err}
}

// Line reports the line key was written on, or 0.
func (c *Config) Line(key string) int { return c.lines.line(key) }

func decodeError(path string, err error, lines lineTable) error {
	var sm *toml.StrictMissingError
	if errors.As(err, &sm) {
		errs := make([]error, 0, len(sm.Errors))
		for _, de := range sm.Errors {
			line, _ := de.Position()
			errs = append(errs, &Error{File: path, Line: line, Key: unknownKey(de.Key(), line, lines), Err: errors.New("unknown key")})
		}
		return errors.Join(errs...)
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		line, _ := de.Position()
		msg := strings.TrimPrefix(de.Error(), "toml: ")
		return &Error{File: path, Line: line, Key: tomlKey(de.Key()), Err: errors.New(msg)}
	}
	return &Error{File: path, Err: err}
}

func tomlKey(k toml.Key) string { return strings.Join(k, ".") }

// unknownKey names an unknown key by its full path. go-toml names a key
// inside an inline table as if it belonged to the enclosing table
// ("firewall.burst" for rate_limit = { burst = 2 }), so the key written
// on that line with that name is looked up in the file's own index.
func unknownKey(k toml.Key, line int, lines lineTable) string {
	name := tomlKey(k)
	if len(k) == 0 {
		return name
	}
	var found []string
	for key, l := range lines {
		if l == line && (key == k[len(k)-1] || strings.HasSuffix(key, "."+k[len(k)-1])) {
			found = append(found, stripIndexes(key))
		}
	}
	if len(found) == 1 {
		return found[0]
	}
	return name
}
