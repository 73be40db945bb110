package l7

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
)

// ConnInfo describes the client connection handed to ServeConn.
type ConnInfo struct {
	Client         netip.AddrPort // real client: the peer, or the source from a trusted PROXY header
	Local          netip.AddrPort // local address of the accepted socket
	TrustForwarded bool           // append to the client's X-Forwarded-For instead of replacing it
	SNI            string
	// Cut, when done, closes the connection's backend connection too,
	// so that a caller closing conn at the end of its shutdown grace
	// ends ServeConn at once even if the relay is blocked writing to a
	// backend that stopped reading. Nil: never.
	Cut context.Context
	// RoutedHere reports whether a connection whose SNI were host would
	// have been routed where this one was. An HTTP/2 request for a host
	// that would not gets 421 (see misdirected). Nil: every host would.
	RoutedHere func(host string) bool
}

// misdirected reports whether an HTTP/2 request for authority (a host,
// with or without a port) came on a connection routed for another host.
// Clients reuse an HTTP/2 connection for every host its certificate
// covers that resolves to the same address (RFC 9113, 9.1.1), while the
// proxy routes a connection once, by its SNI: without this, one
// wildcard certificate on several routes sends requests to the backend
// of whichever host the connection was opened for. 421 Misdirected
// Request makes the client retry on a connection of its own (RFC 9110,
// 15.5.20). A request for an address never is: no SNI can name one.
func (ci *ConnInfo) misdirected(authority string) bool {
	if ci.RoutedHere == nil || authority == "" {
		return false
	}
	host := authority
	if strings.IndexByte(host, ':') >= 0 {
		if h, _, err := net.SplitHostPort(authority); err == nil {
			host = h
		}
	}
	host = strings.TrimSuffix(host, ".")
	if strings.EqualFold(host, strings.TrimSuffix(ci.SNI, ".")) {
		return false
	}
	if _, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil {
		return false
	}
	return !ci.RoutedHere(host)
}

// ServeConn terminates TLS on conn, replaying hello (the ClientHello bytes
// the accept loop already read) first, then serves HTTP/2 or HTTP/1.1 as
// ALPN chose and proxies every request to the backend. It returns when the
// connection is finished: closed by either side, idle for IdleTimeout, or
// ctx cancelled.
//
// Cancelling ctx starts a graceful close: HTTP/2 gets GOAWAY, HTTP/1.1
// closes after the response in flight (a connection still in its TLS
// handshake, or yet to send its first request, gets that one answered),
// and idle connections close at once. Requests in flight run to
// completion, and an upgraded connection (WebSocket), which has no
// graceful close, runs on like an L4 relay; to bound that, the caller
// closes conn (the proxy does when its shutdown grace ends), which makes
// ServeConn return promptly.
//
// conn is closed before ServeConn returns, and no request handler is
// still running then.
func (h *Handler) ServeConn(ctx context.Context, conn net.Conn, hello []byte, ci ConnInfo) {
	defer conn.Close()
	if !ci.Client.IsValid() {
		ci.Client = addrPort(conn.RemoteAddr())
	}
	if !ci.Local.IsValid() {
		ci.Local = addrPort(conn.LocalAddr())
	}
	ci.Client = netip.AddrPortFrom(ci.Client.Addr().Unmap(), ci.Client.Port())
	ci.Local = netip.AddrPortFrom(ci.Local.Addr().Unmap(), ci.Local.Port())

	pc := &prefixConn{stallConn: stallConn{Conn: conn, stall: stallGuard{timeout: h.idleTimeout}}, prefix: hello}
	if ci.Client.IsValid() {
		// net/http reports this as Request.RemoteAddr, so the real
		// client shows up in its logs rather than a PROXY sender.
		pc.remote = net.TCPAddrFromAddrPort(ci.Client)
	}
	tc := tls.Server(pc, h.tlsConfig)
	tc.SetDeadline(time.Now().Add(tlsHandshakeTimeout))
	// The handshake is not part of what a drain stops: the client was
	// accepted before it and has sent its ClientHello, and on L4 routes
	// the same connection is relayed. The deadline bounds it, and the
	// caller's hard cut closes conn.
	if err := tc.HandshakeContext(context.WithoutCancel(ctx)); err != nil {
		// Client garbage or a client that gave up: debug, not warn.
		h.log.Debug("tls handshake failed", "client", ci.Client, "err", err)
		return
	}
	tc.SetDeadline(time.Time{})

	if h.h2Backend && tc.ConnectionState().NegotiatedProtocol == "h2" {
		if err := h.serveRelay(ctx, tc, ci); err != errNotRelayed {
			return
		}
	}

	c := h.newClientConn(ctx, ci)
	c.conn = conn
	defer c.finish()

	// One http.Server per connection costs a few small allocations next
	// to the TLS handshake just done, and buys a per-connection graceful
	// Shutdown for both HTTP/1.1 and HTTP/2 (ConfigureServer hooks the
	// HTTP/2 GOAWAY into Server.Shutdown).
	l := newConnListener(tc)
	// The drain is armed only once Serve tracks the connection
	// (StateNew): before that, a Shutdown would find no connection to
	// wait for, and the close after it would cut one the client has just
	// finished its handshake on.
	//
	// HTTP/2 gets Shutdown's GOAWAY. HTTP/1.1 gets keep-alives turned
	// off instead: the response in flight is the connection's last, an
	// idle connection closes at once, and a fresh one (accepted before
	// the drain, handshake just done) still has its first request
	// answered, which Shutdown would drop unanswered. An upgraded
	// (hijacked) connection has no graceful close: it runs on until it
	// ends or the caller closes conn.
	h2 := tc.ConnectionState().NegotiatedProtocol == "h2"
	var stop func() bool
	drained := make(chan struct{})
	srv := &http.Server{
		Handler:           c,
		ReadHeaderTimeout: readHeaderTimeout,
		IdleTimeout:       h.idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          h.errorLog,
		BaseContext:       func(net.Listener) context.Context { return c.ctx },
	}
	srv.ConnState = func(_ net.Conn, s http.ConnState) {
		switch s {
		case http.StateNew: // on Serve's goroutine, this one
			stop = context.AfterFunc(ctx, func() {
				defer close(drained)
				if !h2 {
					srv.SetKeepAlivesEnabled(false)
					return
				}
				// Shutdown returns once the connection is done, or
				// when c.ctx ends as ServeConn finishes.
				srv.Shutdown(c.ctx)
				conn.Close()
			})
		case http.StateClosed, http.StateHijacked:
			// A hijacked connection (an upgrade) is no longer the
			// server's; its handler runs on and c.finish waits for it.
			l.connDone()
		}
	}
	h2srv := &http2.Server{
		MaxConcurrentStreams: maxConcurrentStreams,
		IdleTimeout:          h.idleTimeout, // only counts without streams
		// A client not heard from for half the idle timeout is
		// pinged and must answer within the other half: one that stopped
		// reading altogether would otherwise hold a stream stalled on
		// flow control (and its backend request) for ever.
		ReadIdleTimeout: h.idleTimeout / 2,
		PingTimeout:     h.idleTimeout / 2,
	}
	if err := http2.ConfigureServer(srv, h2srv); err != nil {
		// Only possible with a CipherSuites list lacking what HTTP/2
		// requires, and srv has none.
		h.log.Error("configuring http2 server", "err", err)
		return
	}

	srv.Serve(l) // returns once the listener is closed by connDone or Shutdown
	if l.handedOut() {
		<-l.done
	}
	c.waitHandlers()

	c.cancel() // ends a Shutdown still waiting
	if stop != nil && !stop() {
		<-drained
	}
}

// addrPort returns a's address if it is a TCP address.
func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort()
	}
	return netip.AddrPort{}
}

// clientConn is the per-connection state: the connection's ReverseProxy,
// its backend transport, and a count of running handlers so ServeConn can
// wait for them.
type clientConn struct {
	h        *Handler
	ci       ConnInfo
	conn     net.Conn // the client's, closed by cutStalled
	clientIP string
	rt       backendTransport
	pd       *proxyDialer // nil unless the route sends PROXY headers
	proxy    httputil.ReverseProxy

	// ctx is the base of every request's context. It keeps ServeConn's
	// values but not its cancellation, which means "drain", not "abort";
	// it is cancelled when the connection is finished.
	ctx    context.Context
	cancel context.CancelFunc

	mu       sync.Mutex
	handlers int
	finished bool
	draining *waitGuard    // watching what is left of an HTTP/1.1 request body
	idle     chan struct{} // closed when finished and handlers reaches 0
}

func (h *Handler) newClientConn(ctx context.Context, ci ConnInfo) *clientConn {
	c := &clientConn{h: h, ci: ci, idle: make(chan struct{})}
	if ci.Client.IsValid() {
		c.clientIP = ci.Client.Addr().String()
	}
	c.ctx, c.cancel = context.WithCancel(context.WithoutCancel(ctx))
	c.rt = h.shared
	if h.sendProxy {
		// A transport of its own, so that no pooled backend connection
		// (whose PROXY header names this client) serves anyone else.
		c.pd = &proxyDialer{h: h, ci: ci}
		c.rt = h.newTransport(c.pd.dial)
	}
	c.proxy = httputil.ReverseProxy{
		Rewrite:   c.rewrite,
		Transport: roundTripperFunc(c.roundTrip),
		// Zero, not -1: ReverseProxy already flushes every write of a
		// response of unknown length (gRPC, chunked, long polls) and of
		// text/event-stream, so streams are never held back; and a
		// response declared empty must not be flushed early. That one
		// is a gRPC Trailers-Only error (grpc/grpc doc/PROTOCOL-HTTP2.md):
		// flushing its headers first splits it into HEADERS + empty DATA,
		// and clients then fail with "server closed the stream without
		// sending trailers". Declared-length bodies pass through the
		// server's few-KiB write buffer, never whole.
		FlushInterval: 0,
		ErrorLog:      h.errorLog,
		ErrorHandler:  h.handleError,
		// Without a pool ReverseProxy allocates a 32 KiB copy buffer
		// per response, which dominated the garbage under load.
		BufferPool: &copyBuffers,
	}
	return c
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func (c *clientConn) roundTrip(req *http.Request) (*http.Response, error) {
	res, err := c.h.roundTripWithTimeout(c.rt, req)
	if err == nil && (res.StatusCode < 100 || res.StatusCode > 999) {
		// net/http's transports take any three digits from an HTTP/1.1
		// backend and any number from an HTTP/2 one, but its server
		// panics on a status it cannot write, which closes the client's
		// connection without a response: 502 instead, as the relay
		// answers.
		res.Body.Close()
		return nil, fmt.Errorf("backend sent status %d", res.StatusCode)
	}
	return res, err
}

// rewrite points the outbound request at the backend and sets the
// forwarding headers as the package comment describes. ReverseProxy has
// already removed the client's Forwarded and X-Forwarded-* headers.
func (c *clientConn) rewrite(pr *httputil.ProxyRequest) {
	pr.Out.URL.Scheme = c.h.scheme
	pr.Out.URL.Host = c.h.backend
	// pr.Out.Host stays the client's Host: backends route on it.

	hdr := pr.Out.Header
	for k := range hdr {
		if spellsForwarding(k) {
			delete(hdr, k)
		}
	}
	var xff []string
	if c.ci.TrustForwarded {
		xff = pr.In.Header.Values("X-Forwarded-For")
		if v := pr.In.Header["Forwarded"]; len(v) > 0 {
			hdr["Forwarded"] = v
		}
	} else {
		hdr.Del("X-Real-Ip")
	}
	// clientIP is empty only for a connection without a TCP peer
	// address (never from the proxy's listeners); then nothing is
	// claimed about the client.
	if c.clientIP != "" {
		xff = append(xff, c.clientIP)
		if hdr.Get("X-Real-Ip") == "" {
			hdr.Set("X-Real-Ip", c.clientIP)
		}
	}
	if len(xff) > 0 {
		// One header, comma-separated, as most backends only read the
		// first X-Forwarded-For line.
		hdr.Set("X-Forwarded-For", strings.Join(xff, ", "))
	}
	hdr.Set("X-Forwarded-Proto", "https")
	if pr.In.Host != "" {
		hdr.Set("X-Forwarded-Host", pr.In.Host)
	}

	// An upgrade to h2c is not passed on ("h2c smuggling"): a backend
	// that switched would then read the client's HTTP/2 straight off
	// the tunnel, every request of it unseen by the proxy and carrying
	// whatever forwarding headers the client wrote. The upgrade is for
	// cleartext connections only (RFC 7540, 3.2) and deprecated (RFC
	// 9113, 3.1), so the request goes on as a plain one, and a 101 the
	// backend sends all the same is refused by ReverseProxy as an
	// upgrade nobody asked for.
	if httpguts.HeaderValuesContainsToken(hdr["Upgrade"], "h2c") {
		hdr.Del("Upgrade")
		hdr.Del("Connection")
		hdr.Del("Http2-Settings")
	}

	// Request trailers: Out's trailer map is a copy of In's taken before
	// the body was read, holding the declared names only; the server
	// fills in In's values when the body ends. Copy them over then, in
	// the goroutine that reads the body, which is the one the transport
	// sends the trailers from once it sees the end.
	//
	// Forwarding headers sent as trailers are not passed on either: a
	// backend that merges trailers into the headers would believe them.
	for k := range pr.Out.Trailer {
		if forwardingName(k) {
			delete(pr.Out.Trailer, k)
		}
	}
	if len(pr.Out.Trailer) > 0 && pr.Out.Body != nil && pr.Out.Body != http.NoBody {
		pr.Out.Body = &trailerBody{ReadCloser: pr.Out.Body, in: pr.In, out: pr.Out.Trailer}
	}
}

// spellsForwarding reports whether name is one of the forwarding headers
// the proxy sets spelled with underscores for dashes (X_Forwarded_For).
// Servers that hand headers to applications as CGI-style variables
// (Rack, WSGI, PHP) map both spellings to one HTTP_X_FORWARDED_FOR, and
// the client's may win over the proxy's (Puma's CVE-2024-45614), so
// these never pass, whoever sent them; nginx drops every header with an
// underscore by default for the same reason.
func spellsForwarding(name string) bool {
	if strings.IndexByte(name, '_') < 0 || len(name) > len("x-forwarded-proto") {
		return false
	}
	name = strings.ReplaceAll(name, "_", "-")
	for _, f := range [...]string{"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip"} {
		if strings.EqualFold(name, f) {
			return true
		}
	}
	return false
}

// forwardingName reports whether name, in any case, is one of the
// forwarding headers the proxy sets, Forwarded, or one of their
// underscore spellings.
func forwardingName(name string) bool {
	switch strings.ToLower(name) {
	case "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip", "forwarded":
		return true
	}
	return spellsForwarding(name)
}

// trailerBody copies a request's trailers, which arrive with the end of
// its body, to the outbound request's trailer map.
type trailerBody struct {
	io.ReadCloser
	in   *http.Request
	out  http.Header
	done bool
}

func (b *trailerBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF && !b.done {
		b.done = true
		for k, v := range b.in.Trailer {
			if _, declared := b.out[k]; declared {
				b.out[k] = v
			}
		}
	}
	return n, err
}

var (
	errUpgradeOverH2 = errors.New("protocol upgrade requested, but the backend speaks HTTP/2")
	errConnect       = errors.New("CONNECT is not proxied")
	errMisdirected   = errors.New("request for a host the connection was not routed for")
)

func (c *clientConn) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !c.enter() {
		// The connection is finished; HTTP/2 may still start a handler
		// for a stream that arrived just before.
		return
	}
	defer c.leave()

	h := c.h
	start := time.Now()
	guard := &waitGuard{timeout: h.idleTimeout, cut: c.cutStalled}
	rec := &statusRecorder{ResponseWriter: w, noInfo: !r.ProtoAtLeast(1, 1), guard: guard}
	var body *guardedBody
	if r.Body != nil && r.Body != http.NoBody {
		body = &guardedBody{ReadCloser: r.Body, g: guard}
		r.Body = body
	}
	h.metrics.streamStarted()
	if r.ProtoMajor == 1 {
		c.setDraining(nil) // the last request's body was read to its end
	}
	defer func() {
		if r.ProtoMajor == 1 && body != nil && !body.eof.Load() && !rec.hijacked {
			guard.begin(&guard.draining)
			c.setDraining(guard)
		} else {
			guard.stop()
		}
		h.metrics.streamDone()
		h.metrics.requestDone(rec.status(), time.Since(start))
	}()

	switch {
	case r.Method == http.MethodConnect:
		h.handleError(rec, r, errConnect)
	case r.ProtoMajor == 2 && c.ci.misdirected(r.Host):
		h.handleError(rec, r, errMisdirected)
	case h.h2Backend && httpguts.HeaderValuesContainsToken(r.Header["Connection"], "Upgrade"):
		h.handleError(rec, r, errUpgradeOverH2)
	default:
		if r.ProtoMajor == 1 {
			// The request body may still be arriving when the backend's
			// response starts (a streaming backend, one that answers
			// first and reads after); the proxy goes on relaying it.
			// Without this, net/http's HTTP/1.1 server would read and
			// throw away up to 256 KiB of it the moment the response
			// headers go out, from under the transport forwarding it.
			http.NewResponseController(w).EnableFullDuplex()
		}
		c.proxy.ServeHTTP(rec, r)
		if r.ProtoMajor == 1 {
			dropForbiddenTrailers(w.Header())
		}
	}
	if r.ProtoMajor == 2 && rec.wroteBody {
		// What is left buffered would otherwise be sent after the
		// handler returns, unguarded, into a window that may never
		// open. A response without a body is left alone (see
		// FlushInterval in newClientConn).
		rec.FlushError()
	}
}

// dropForbiddenTrailers removes the trailers a backend sent undeclared
// that may not be trailers (RFC 9110, 6.5.1: framing, routing,
// connection fields such as Content-Length, Transfer-Encoding, Host).
// ReverseProxy passes undeclared trailers on as TrailerPrefix keys, which
// net/http's HTTP/2 server checks and its HTTP/1.1 server writes into
// the chunked trailer section as they are, where a client that merges
// trailers into the header section would believe them.
func dropForbiddenTrailers(h http.Header) {
	for k := range h {
		if name, ok := strings.CutPrefix(k, http.TrailerPrefix); ok && !httpguts.ValidTrailerHeader(name) {
			delete(h, k)
		}
	}
}

// cutStalled closes the connection of a client a request waited on for
// the idle timeout (see waitGuard).
func (c *clientConn) cutStalled() {
	c.h.log.Debug("client stalled a request for the idle timeout; closing its connection", "client", c.ci.Client)
	c.conn.Close()
}

// setDraining stops the guard watching the rest of the last HTTP/1.1
// request's body, if any, and sets g in its place.
func (c *clientConn) setDraining(g *waitGuard) {
	c.mu.Lock()
	old := c.draining
	c.draining = g
	c.mu.Unlock()
	if old != nil {
		old.stop()
	}
}

func (c *clientConn) enter() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.finished {
		return false
	}
	c.handlers++
	return true
}

func (c *clientConn) leave() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.handlers--
	if c.finished && c.handlers == 0 {
		close(c.idle)
	}
}

// waitHandlers refuses new handlers and waits for the running ones, whose
// request contexts the closed connection has cancelled.
func (c *clientConn) waitHandlers() {
	c.mu.Lock()
	if c.finished {
		c.mu.Unlock()
		return
	}
	c.finished = true
	n := c.handlers
	c.mu.Unlock()
	if n > 0 {
		<-c.idle
	}
}

// finish releases the connection's backend resources. Handlers are done by
// now, so every backend connection of a per-connection transport is idle
// or dead and can be closed.
func (c *clientConn) finish() {
	c.waitHandlers()
	c.setDraining(nil)
	c.cancel()
	if c.pd != nil {
		c.rt.CloseIdleConnections()
		c.pd.closeAll()
	} else if c.h.closed.Load() {
		// The snapshot was retired while this connection ran: release
		// what it returned to the pool.
		c.rt.CloseIdleConnections()
	}
}

// handleError is the one funnel for requests that get no backend
// response: it picks the status, counts, logs (rate-limited) and writes a
// short text body.
func (h *Handler) handleError(w http.ResponseWriter, r *http.Request, err error) {
	rec, _ := w.(*statusRecorder)
	code, kind := http.StatusBadGateway, ""
	var ce *connectError
	switch {
	case errors.Is(err, errConnect):
		code = http.StatusMethodNotAllowed
	case errors.Is(err, errMisdirected):
		code = http.StatusMisdirectedRequest
	case errors.Is(err, errUpgradeOverH2):
		// A route misconfiguration rather than a backend failure.
	case errors.Is(err, errResponseTimeout):
		code, kind = http.StatusGatewayTimeout, kindTimeout
	case r.Context().Err() != nil:
		// The client left (stream reset, connection closed); nobody is
		// listening for a status and the backend did nothing wrong.
		if rec != nil {
			rec.code = statusClientClosed
		}
		return
	case errors.As(err, &ce):
		kind = kindUnreachable
	default:
		kind = kindOther
	}

	if kind != "" {
		h.metrics.backendError(kind)
		if ok, suppressed := h.logLimit.allow(time.Now()); ok {
			h.log.Warn("backend error", "backend", h.backend, "kind", kind, "err", err, "suppressed", suppressed)
		}
	} else {
		h.log.Debug("request refused", "method", r.Method, "err", err)
	}

	if rec != nil && rec.hijacked {
		// An upgrade failed after the connection was taken over; there
		// is no HTTP response left to write.
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	io.WriteString(w, strings.ToLower(http.StatusText(code))+"\n")
}

// statusRecorder remembers the final status for metrics. Unwrap lets
// http.ResponseController (which ReverseProxy uses to flush) reach the
// server's writer.
type statusRecorder struct {
	http.ResponseWriter
	code      int
	hijacked  bool
	noInfo    bool       // an HTTP/1.0 client: no 1xx responses (RFC 9110, 15.2)
	guard     *waitGuard // watches writes and flushes; nil: none
	wroteBody bool
}

func (w *statusRecorder) WriteHeader(code int) {
	// ReverseProxy passes on every informational response the transport
	// reports, but the backend, asked in HTTP/1.1 or HTTP/2, cannot know
	// that an HTTP/1.0 client takes the first response for the final
	// one. A 101 reported so comes from an HTTP/2 backend, which may not
	// send one (RFC 9113, 8.6), and net/http's server would take it for
	// the final status; an HTTP/1.1 backend's is an upgrade, which
	// ReverseProxy writes itself on the hijacked connection.
	if code >= 100 && code < 200 && (w.noInfo || code == http.StatusSwitchingProtocols) {
		return
	}
	// 1xx responses (100 Continue, 103 Early Hints) are not final.
	if w.code == 0 && code >= 200 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusRecorder) Write(p []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	if len(p) > 0 {
		w.wroteBody = true
	}
	if w.guard == nil {
		return w.ResponseWriter.Write(p)
	}
	w.guard.begin(&w.guard.writing)
	defer w.guard.end(&w.guard.writing)
	return w.ResponseWriter.Write(p)
}

// FlushError is what http.ResponseController (ReverseProxy's flushes)
// finds first: a flush waits on the client as a write does.
func (w *statusRecorder) FlushError() error {
	if w.guard != nil {
		w.guard.begin(&w.guard.writing)
		defer w.guard.end(&w.guard.writing)
	}
	return http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *statusRecorder) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Hijack is reached by ReverseProxy for a 101 Switching Protocols.
func (w *statusRecorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err == nil {
		w.hijacked = true
		w.code = http.StatusSwitchingProtocols
		if brw.Reader.Buffered() > 0 {
			// What the client sent right behind its upgrade request
			// is in brw, and ReverseProxy copies from conn alone: read
			// that first, or the backend never sees it.
			conn = &bufferedConn{Conn: conn, r: brw.Reader}
		}
	}
	return conn, brw, err
}

// bufferedConn reads what r holds before reading the connection itself.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) {
	if c.r != nil {
		if c.r.Buffered() > 0 {
			return c.r.Read(p)
		}
		c.r = nil
	}
	return c.Conn.Read(p)
}

// CloseWrite passes ReverseProxy's half-close on (the backend's EOF) to
// the client, as the connection it wraps would.
func (c *bufferedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

func (w *statusRecorder) status() int {
	if w.code == 0 {
		return http.StatusOK // what net/http sends for a handler that wrote nothing
	}
	return w.code
}

// prefixConn replays the ClientHello the accept loop consumed before
// reading the connection itself. Its writes are bounded like a
// stallConn's (see stallGuard): both paths write to the client through
// it, under TLS.
type prefixConn struct {
	stallConn
	prefix []byte
	remote net.Addr // reported by RemoteAddr when set
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		if len(c.prefix) == 0 {
			c.prefix = nil // let the hello be collected
		}
		return n, nil
	}
	return c.Conn.Read(p)
}

func (c *prefixConn) RemoteAddr() net.Addr {
	if c.remote != nil {
		return c.remote
	}
	return c.Conn.RemoteAddr()
}

// connListener hands one connection to http.Server.Serve. The second
// Accept blocks until the connection is done (or the listener is closed),
// then fails, so Serve returns instead of waiting for a connection that
// will never come.
type connListener struct {
	conn net.Conn

	mu      sync.Mutex
	handed  bool
	done    chan struct{} // closed by connDone
	doneOne sync.Once
	closed  chan struct{} // closed by Close or connDone
	closeO  sync.Once
}

func newConnListener(c net.Conn) *connListener {
	return &connListener{conn: c, done: make(chan struct{}), closed: make(chan struct{})}
}

func (l *connListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if !l.handed {
		select {
		case <-l.closed:
		default:
			l.handed = true
			l.mu.Unlock()
			return l.conn, nil
		}
	}
	l.mu.Unlock()
	<-l.closed
	return nil, net.ErrClosed
}

// handedOut reports whether Serve took the connection, i.e. whether
// connDone will be called.
func (l *connListener) handedOut() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.handed
}

func (l *connListener) connDone() {
	l.doneOne.Do(func() { close(l.done) })
	l.Close()
}

func (l *connListener) Close() error {
	l.closeO.Do(func() { close(l.closed) })
	return nil
}

func (l *connListener) Addr() net.Addr { return l.conn.LocalAddr() }

// copyBuffers recycles ReverseProxy's body copy buffers across requests
// and connections.
var copyBuffers bufferPool

type bufferPool struct{ p sync.Pool }

func (b *bufferPool) Get() []byte {
	if v, ok := b.p.Get().(*[]byte); ok {
		return *v
	}
	return make([]byte, 32<<10)
}

func (b *bufferPool) Put(buf []byte) { b.p.Put(&buf) }
