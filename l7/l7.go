// Package l7 terminates TLS for routes with mode = "l7" and reverse-proxies
// their HTTP requests to one backend over h2c, h2 (TLS), HTTP/1.1 or
// HTTP/1.1 over TLS.
//
// The proxy's accept loop has already read the ClientHello off the socket
// to route by SNI, so ServeConn takes those bytes and replays them into
// crypto/tls. One Handler is built per route per config snapshot; its
// certificate, tls.Config and backend transport are built once and shared
// by every connection:
//
//	m := l7.NewMetrics(reg) // once per process
//	h, err := l7.NewHandler(l7.Options{
//		Route:    "public/api.example.com",
//		CertFile: "/etc/portcullis/api.pem", KeyFile: "/etc/portcullis/api-key.pem",
//		Backend:  "10.1.0.6:8080", Protocol: "h2c",
//		Metrics:  m,
//	})
//	// per accepted connection, in its own goroutine:
//	h.ServeConn(ctx, conn, hello, l7.ConnInfo{Client: client, Local: local, SNI: sni})
//	// when the snapshot is retired:
//	h.Close()
//
// # Two paths
//
// An HTTP/2 client on an h2c or h2 route is relayed frame by frame (see
// relay.go) over a backend connection dialed for that client connection
// alone: stream IDs, flow control, SETTINGS and PINGs pass through, and
// only header blocks are rewritten. Everything else — HTTP/1.1 clients,
// http1 and https1 backends, and a client that arrives while the backend
// cannot be dialed — is served by net/http and httputil.ReverseProxy
// with a backend transport shared by the route's connections (or, with
// SendProxyProtocol, one per client connection). Both paths apply the
// same forwarding headers, limits, timeouts and metrics.
//
// # Forwarding headers
//
// Every proxied request carries, towards the backend:
//
//   - X-Forwarded-Proto: https (the client always spoke TLS to us).
//   - X-Forwarded-Host: the Host (or :authority) the client asked for. The
//     Host header itself is passed through unchanged, so name-based
//     virtual hosts on the backend keep working.
//   - X-Forwarded-For and X-Real-IP, built from ConnInfo.Client: the peer
//     address, or the address from a trusted PROXY header.
//
// What the client itself sent depends on ConnInfo.TrustForwarded. When it
// is false (the default: the peer is an end user) any X-Forwarded-For,
// X-Forwarded-Host, X-Forwarded-Proto, X-Real-IP and Forwarded header from
// the client is dropped and replaced, so a client cannot forge its address.
// When it is true (the peer is a proxy we trust) the client address is
// appended to the incoming X-Forwarded-For chain ("a, b, client"), and the
// incoming X-Real-IP and Forwarded headers are passed on unchanged, since
// they already name the original client; X-Real-IP is set only if absent.
// Either way, these names spelled with underscores (X_Forwarded_For), which
// CGI-style backends read as the same variable, are dropped.
//
// # Errors
//
// A backend that cannot be reached (dial or TLS failure) gets 502 Bad
// Gateway; one that sends no response headers within ResponseTimeout gets
// 504 Gateway Timeout. Once headers have arrived the response streams for
// as long as it needs, provided it keeps moving: one on which nothing
// moved for IdleTimeout while the proxy waited on the backend is cut, and
// so is an upgraded connection silent both ways that long. HTTP/1.1
// Upgrade requests (WebSocket) pass through to http1 and https1 backends;
// HTTP/2 cannot carry them, so for h2c and h2 backends they get 502
// without the backend being asked. CONNECT is not proxied (405). An
// HTTP/2 request for a host that would have been routed elsewhere (a
// client reusing its connection for another name of the certificate)
// gets 421 Misdirected Request, so that it retries on a connection of
// its own (see ConnInfo.RoutedHere).
package l7

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"time"

	"github.com/portcullis/portcullis/regularfile"
)

// Backend protocols, as spelled in the config file.
const (
	protoH2C    = "h2c"
	protoH2     = "h2"
	protoHTTP1  = "http1"
	protoHTTPS1 = "https1"
)

// Defaults for Options durations left at zero; they match the config
// file's defaults so a zero Options behaves like an empty route.
const (
	defaultDialTimeout     = 5 * time.Second
	defaultResponseTimeout = 60 * time.Second
	defaultIdleTimeout     = 10 * time.Minute
)

const (
	// tlsHandshakeTimeout bounds the rest of the TLS handshake after the
	// ClientHello (which the accept loop has already read under its own
	// deadline).
	tlsHandshakeTimeout = 10 * time.Second
	// readHeaderTimeout bounds how long an HTTP/1.1 client may take to send
	// a request's headers, so a slowloris cannot pin a connection.
	readHeaderTimeout = 10 * time.Second
	// maxHeaderBytes caps request headers (HTTP/1.1 header block, HTTP/2
	// SETTINGS_MAX_HEADER_LIST_SIZE).
	maxHeaderBytes = 64 << 10
	// maxConcurrentStreams is advertised to HTTP/2 clients.
	maxConcurrentStreams = 250
	// backendIdleTimeout closes pooled backend connections nobody used for
	// this long.
	backendIdleTimeout = 90 * time.Second
)

// Options configures a Handler for one L7 route. Zero durations mean the
// config file's defaults: DialTimeout 5s, ResponseTimeout 60s, IdleTimeout
// 10m.
type Options struct {
	Listener          string // metric and log labels, as on L4 routes:
	Route             string // the listener name and the route's SNI pattern
	CertFile, KeyFile string // PEM certificate chain and key, loaded by NewHandler
	Backend           string // host:port
	Protocol          string // "h2c" (when empty) | "h2" | "http1" | "https1"
	BackendCAFile     string // PEM roots for h2/https1 backends; empty means the system roots
	BackendServerName string // name sent and verified for TLS backends; empty means the Backend host
	SendProxyProtocol bool   // send a PROXY v2 header on every backend connection
	DialTimeout       time.Duration
	ResponseTimeout   time.Duration // wait for backend response headers, then 504
	IdleTimeout       time.Duration // client connection idle timeout
	Logger            *slog.Logger  // nil discards
	Metrics           *Metrics      // nil records nothing
	// DialSeconds observes how long each successful backend TCP dial
	// took (the route's dial latency histogram, as on L4 routes); nil
	// records nothing.
	DialSeconds interface{ Observe(float64) }
}

// Handler terminates TLS and proxies HTTP for one route. It is safe for
// concurrent use; build it with NewHandler.
type Handler struct {
	backend   string // host:port dialed
	protocol  string
	scheme    string // of outbound URLs: "http" or "https"
	h2Backend bool   // h2c or h2: Upgrade requests cannot be carried
	sendProxy bool

	dialTimeout, responseTimeout, idleTimeout time.Duration

	tlsConfig  *tls.Config // client-facing, shared by all connections
	backendTLS *tls.Config // nil for h2c and http1
	dialer     net.Dialer
	// dialSeconds observes successful backend dials; may be nil.
	dialSeconds interface{ Observe(float64) }
	shared      backendTransport // nil when every connection gets its own (PROXY v2)

	log      *slog.Logger
	errorLog *log.Logger // net/http's and ReverseProxy's own complaints, at debug
	logLimit logLimiter
	metrics  *routeMetrics // nil without Metrics

	closed atomic.Bool
}

// NewHandler loads the route's certificate and builds its TLS config and
// backend transport. Errors start with "l7: " and the config key at fault.
func NewHandler(o Options) (*Handler, error) {
	h := &Handler{

		backend:         o.Backend,
		protocol:        o.Protocol,
		sendProxy:       o.SendProxyProtocol,
		dialTimeout:     orDefault(o.DialTimeout, defaultDialTimeout),
		responseTimeout: orDefault(o.ResponseTimeout, defaultResponseTimeout),
		idleTimeout:     orDefault(o.IdleTimeout, defaultIdleTimeout),
		log:             o.Logger,
	}
	if h.protocol == "" {
		h.protocol = protoH2C
	}
	if h.log == nil {
		h.log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	h.log = h.log.With("listener", o.Listener, "route", o.Route)
	h.errorLog = slog.NewLogLogger(h.log.Handler(), slog.LevelDebug)
	// No TCP keepalive, as on L4 routes: the relay's idle timeout, the
	// transports' idle limits and HTTP/2 pings notice a backend that went
	// away, and setting the probes up costs four setsockopt calls per
	// dial, one dial per relayed client connection.
	h.dialer = net.Dialer{Timeout: h.dialTimeout, KeepAlive: -1}
	h.dialSeconds = o.DialSeconds

	host, _, err := net.SplitHostPort(o.Backend)
	if err != nil {
		return nil, fmt.Errorf("l7: backend: %w", err)
	}

	cert, err := loadKeyPair(o.CertFile, o.KeyFile)
	if err != nil {
		return nil, err
	}
	h.warnCertificate(cert.Leaf, o.Route, o.CertFile, time.Now())
	h.tlsConfig = &tls.Config{
		Certificates: []tls.Certificate{cert},
		NextProtos:   []string{"h2", "http/1.1"},
		MinVersion:   tls.VersionTLS12,
	}

	switch h.protocol {
	case protoH2C, protoHTTP1:
		h.scheme = "http"
		if o.BackendCAFile != "" || o.BackendServerName != "" {
			return nil, fmt.Errorf("l7: backend_ca/backend_server_name: set for plain-text backend_protocol %q", h.protocol)
		}
	case protoH2, protoHTTPS1:
		h.scheme = "https"
		roots, err := loadRoots(o.BackendCAFile)
		if err != nil {
			return nil, err
		}
		name := o.BackendServerName
		if name == "" {
			name = host
		}
		alpn := "http/1.1"
		if h.protocol == protoH2 {
			alpn = "h2"
		}
		h.backendTLS = &tls.Config{
			RootCAs:    roots, // nil means the system roots
			ServerName: name,
			NextProtos: []string{alpn},
			MinVersion: tls.VersionTLS12,
			// Resumption saves a full handshake each time the pool
			// reconnects, and every PROXY-protocol client connection
			// dials its own backend connections.
			ClientSessionCache: tls.NewLRUClientSessionCache(0),
		}
	default:
		return nil, fmt.Errorf("l7: backend_protocol: unknown %q (want h2c, h2, http1 or https1)", o.Protocol)
	}
	h.h2Backend = h.protocol == protoH2C || h.protocol == protoH2

	if o.Metrics != nil {
		h.metrics = o.Metrics.forRoute(o.Listener, o.Route)
	}
	if !h.sendProxy {
		h.shared = h.newTransport(h.dialBackend)
	}
	return h, nil
}

// Close releases idle pooled backend connections. ServeConn calls still
// running keep working; the connections they hold are released as they
// finish.
func (h *Handler) Close() {
	h.closed.Store(true)
	if h.shared != nil {
		h.shared.CloseIdleConnections()
	}
}

// warnCertificate logs what makes a certificate that loads fail every
// client anyway: being outside its validity period, or not naming the
// hosts the route matches. The route is still compiled: a reload is all
// or nothing, and refusing it would hold back every other change in it
// (a blocklist entry, a new route), or the start itself.
func (h *Handler) warnCertificate(leaf *x509.Certificate, sni, certFile string, now time.Time) {
	if leaf == nil {
		return
	}
	switch {
	case now.After(leaf.NotAfter):
		h.log.Warn("tls_cert has expired: clients will refuse it", "tls_cert", certFile, "not_after", leaf.NotAfter.UTC())
	case now.Before(leaf.NotBefore):
		h.log.Warn("tls_cert is not valid yet: clients will refuse it", "tls_cert", certFile, "not_before", leaf.NotBefore.UTC())
	}
	// A wildcard route matches any one label there: the certificate
	// must too. The default route matches any name; nothing to check.
	host := sni
	if rest, ok := strings.CutPrefix(sni, "*."); ok {
		host = "any-label." + rest
	}
	if sni != "*" && leaf.VerifyHostname(host) != nil {
		h.log.Warn("tls_cert does not name the route's sni: clients will refuse it", "tls_cert", certFile, "sni", sni, "names", leaf.DNSNames)
	}
}

func loadKeyPair(certFile, keyFile string) (tls.Certificate, error) {
	certPEM, err := readPEMFile(certFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("l7: tls_cert: %w", err)
	}
	keyPEM, err := readPEMFile(keyFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("l7: tls_key: %w", err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		// crypto/tls says only "failed to parse private key" for a
		// passphrase-protected key, and names the pair: say what is
		// wrong, and with which file, since no passphrase can be given.
		if encryptedKey(keyPEM) {
			return tls.Certificate{}, fmt.Errorf("l7: tls_key: %s: the private key is encrypted (passphrase-protected); it must be stored unencrypted", keyFile)
		}
		return tls.Certificate{}, fmt.Errorf("l7: tls_cert/tls_key: %w", err)
	}
	return cert, nil
}

// encryptedKey reports whether keyPEM holds an encrypted private key:
// PKCS #8 "ENCRYPTED PRIVATE KEY", or a legacy PEM key with an
// ENCRYPTED Proc-Type header (openssl's -aes256 and -des3).
func encryptedKey(keyPEM []byte) bool {
	for {
		var b *pem.Block
		b, keyPEM = pem.Decode(keyPEM)
		if b == nil {
			return false
		}
		if b.Type == "ENCRYPTED PRIVATE KEY" ||
			strings.HasSuffix(b.Type, "PRIVATE KEY") && strings.Contains(b.Headers["Proc-Type"], "ENCRYPTED") {
			return true
		}
	}
}

func loadRoots(file string) (*x509.CertPool, error) {
	if file == "" {
		return nil, nil
	}
	pem, err := readPEMFile(file)
	if err != nil {
		return nil, fmt.Errorf("l7: backend_ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("l7: backend_ca: no PEM certificates in %s", file)
	}
	return pool, nil
}

// maxPEMFile bounds a certificate, key or CA bundle file; the largest
// system CA bundles are about 250 KiB.
const maxPEMFile = 4 << 20

// readPEMFile reads a route's certificate, key or CA file, at most
// maxPEMFile bytes of it: the admin API names these files too, and a
// device there or a huge file must be an error, not a daemon that reads
// until it runs out of memory or waits for ever.
func readPEMFile(path string) ([]byte, error) { return regularfile.Read(path, maxPEMFile) }

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// statusClientClosed records requests whose client went away before the
// backend answered (nginx's 499); it is never written to the wire.
const statusClientClosed = 499
