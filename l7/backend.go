package l7

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"

	"github.com/portcullis/portcullis/proxyproto"
)

// backendTransport is what both http.Transport and http2.Transport offer.
type backendTransport interface {
	http.RoundTripper
	CloseIdleConnections()
}

type dialFunc func(ctx context.Context) (net.Conn, error)

// newTransport builds the transport for h's backend protocol around dial,
// which returns a plain TCP connection (with any PROXY header already
// written). TLS, when the protocol has it, is layered on top here so the
// PROXY header precedes the TLS handshake on the wire.
func (h *Handler) newTransport(dial dialFunc) backendTransport {
	switch h.protocol {
	case protoH2C, protoH2:
		t := &http2.Transport{
			// The client's own Accept-Encoding passes through; the
			// proxy must not add gzip and then decode it again.
			DisableCompression: true,
			IdleConnTimeout:    backendIdleTimeout,
			// Ping a backend connection that has been silent this long,
			// so a dead one (lost without a FIN) is noticed and does not
			// swallow every new stream.
			ReadIdleTimeout: 30 * time.Second,
			PingTimeout:     15 * time.Second,
		}
		if h.protocol == protoH2C {
			// AllowHTTP lets http:// URLs through; DialTLSContext is
			// the only dial hook http2.Transport has, so it dials plain
			// TCP here (prior-knowledge h2c, RFC 9113 section 3.3).
			t.AllowHTTP = true
			t.DialTLSContext = func(ctx context.Context, _, _ string, _ *tls.Config) (net.Conn, error) {
				return dial(ctx)
			}
		} else {
			t.TLSClientConfig = h.backendTLS
			t.DialTLSContext = func(ctx context.Context, _, _ string, _ *tls.Config) (net.Conn, error) {
				return h.dialTLS(ctx, dial)
			}
		}
		return t
	default: // http1, https1
		t := &http.Transport{
			// Proxy stays nil: HTTP_PROXY from the daemon's environment
			// must not redirect backend traffic.
			DisableCompression: true,
			// The default of 2 would make every burst above two
			// concurrent requests open and then drop connections.
			MaxIdleConnsPerHost:    100,
			IdleConnTimeout:        backendIdleTimeout,
			MaxResponseHeaderBytes: 1 << 20,
			Protocols:              new(http.Protocols),
		}
		t.Protocols.SetHTTP1(true)
		// Every connection counts its reads for staleCheck (see
		// roundTripWithTimeout); for https1 it is the TLS connection,
		// whose reads are the transport's.
		if h.protocol == protoHTTP1 {
			t.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
				return countReads(dial(ctx))
			}
		} else {
			t.TLSClientConfig = h.backendTLS
			t.DialTLSContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
				return countReads(h.dialTLS(ctx, dial))
			}
		}
		return t
	}
}

// connectError is a failure to establish a backend connection: the
// request never reached the backend, so it is reported as unreachable.
type connectError struct {
	op  string // "dial", "proxy header", "tls handshake"
	err error
}

func (e *connectError) Error() string { return "backend " + e.op + ": " + e.err.Error() }
func (e *connectError) Unwrap() error { return e.err }

// dialBackend dials the backend over TCP.
func (h *Handler) dialBackend(ctx context.Context) (net.Conn, error) {
	start := time.Now()
	c, err := h.dialer.DialContext(ctx, "tcp", h.backend)
	if err != nil {
		return nil, &connectError{op: "dial", err: err}
	}
	if h.dialSeconds != nil {
		h.dialSeconds.Observe(time.Since(start).Seconds())
	}
	return c, nil
}

// dialTLS dials with dial and runs the TLS handshake on top.
func (h *Handler) dialTLS(ctx context.Context, dial dialFunc) (net.Conn, error) {
	raw, err := dial(ctx)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, h.dialTimeout)
	defer cancel()
	tc := tls.Client(raw, h.backendTLS)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, &connectError{op: "tls handshake", err: err}
	}
	// A backend that ignores ALPN would get HTTP/2 frames it cannot
	// parse; say why instead.
	if want := h.backendTLS.NextProtos[0]; want == "h2" && tc.ConnectionState().NegotiatedProtocol != want {
		raw.Close()
		return nil, &connectError{op: "tls handshake", err: fmt.Errorf("backend did not negotiate ALPN %q", want)}
	}
	return tc, nil
}

// proxyDialer dials backend connections for one client connection and
// opens each with a PROXY v2 header naming that client. It remembers the
// connections it made so that they can all be closed when the client
// connection ends: none may ever carry another client's requests.
type proxyDialer struct {
	h  *Handler
	ci ConnInfo

	mu     sync.Mutex
	conns  map[*trackedConn]struct{}
	closed bool
}

func (d *proxyDialer) dial(ctx context.Context) (net.Conn, error) {
	c, err := d.h.dialWithProxyHeader(ctx, d.ci)
	if err != nil {
		return nil, err
	}
	tc := &trackedConn{Conn: c, d: d}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		// A dial that finished after the client connection did (the
		// transport may complete dials in the background).
		c.Close()
		return nil, &connectError{op: "dial", err: net.ErrClosed}
	}
	if d.conns == nil {
		d.conns = make(map[*trackedConn]struct{})
	}
	d.conns[tc] = struct{}{}
	return tc, nil
}

// dialWithProxyHeader dials the backend over TCP and writes a PROXY v2
// header naming ci's client.
func (h *Handler) dialWithProxyHeader(ctx context.Context, ci ConnInfo) (net.Conn, error) {
	c, err := h.dialBackend(ctx)
	if err != nil {
		return nil, err
	}
	// The header must precede everything else on the connection, and be
	// written at once (proxyproto.WriteV2 does a single Write).
	c.SetWriteDeadline(time.Now().Add(h.dialTimeout))
	if err := proxyproto.WriteV2(c, ci.Client, ci.Local, ci.SNI); err != nil {
		c.Close()
		return nil, &connectError{op: "proxy header", err: err}
	}
	c.SetWriteDeadline(time.Time{})
	return c, nil
}

// closeAll closes every connection still open and refuses new ones.
func (d *proxyDialer) closeAll() {
	d.mu.Lock()
	d.closed = true
	conns := d.conns
	d.conns = nil
	d.mu.Unlock()
	for c := range conns {
		c.Conn.Close()
	}
}

type trackedConn struct {
	net.Conn
	d *proxyDialer
}

func (c *trackedConn) Close() error {
	c.d.mu.Lock()
	delete(c.d.conns, c)
	c.d.mu.Unlock()
	return c.Conn.Close()
}

// countingConn is an HTTP/1.1 backend connection that counts the reads
// that returned data, so that staleCheck can tell whether a response
// was read before its request was sent.
type countingConn struct {
	net.Conn
	reads atomic.Uint64
}

func countReads(c net.Conn, err error) (net.Conn, error) {
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: c}, nil
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.reads.Add(1)
	}
	return n, err
}

// errStaleResponse is returned for a request whose response was read from
// bytes the backend sent before the request.
var errStaleResponse = errors.New("backend response arrived before the request was sent")

// staleCheck refuses an HTTP/1.1 response that the backend sent before
// it was asked: the rest of an earlier response, longer than its
// Content-Length (a 204 or HEAD response with a body, an application
// that writes past the length it declared). net/http's transport reads
// ahead, finds those bytes already buffered once the earlier body ends,
// and returns the connection to the pool at once; it drops the
// connection as unsolicited only if no request took it in the meantime.
// Under load one often has, and gets the smuggled bytes as its
// response, and the next client on that connection gets the response
// meant for this one, and so on down the pool. A response whose first
// byte came without a single read since the connection was handed to its
// request was buffered before the request: the connection is closed,
// so that its queue of shifted responses reaches nobody, and the request
// gets 502.
type staleCheck struct {
	mu    sync.Mutex
	conn  *countingConn // the connection the request got, nil before
	reads uint64        // conn's reads when the request got it
	stale bool
}

func (s *staleCheck) gotConn(info httptrace.GotConnInfo) {
	c, _ := info.Conn.(*countingConn)
	s.mu.Lock()
	defer s.mu.Unlock()
	// A new connection is a new attempt: the transport retries a
	// request it could not write on a connection firstByte closed, and
	// the response it returns then is the new connection's, to be
	// judged on its own.
	s.conn, s.stale = c, false
	if c != nil {
		s.reads = c.reads.Load()
	}
}

func (s *staleCheck) firstByte() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != nil && s.conn.reads.Load() == s.reads {
		s.stale = true
		s.conn.Close()
	}
}

func (s *staleCheck) isStale() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stale
}

// errResponseTimeout is the cause of an outbound request cancelled because
// the backend sent no response headers within ResponseTimeout.
var errResponseTimeout = errors.New("no response headers within response timeout")

// errBackendIdle is the cause of an outbound request cancelled because,
// after its response headers, nothing moved for IdleTimeout while the
// proxy waited on the backend.
var errBackendIdle = errors.New("backend silent for the idle timeout")

// roundTripWithTimeout sends req on rt and bounds the wait for response
// headers by h.responseTimeout. The wait starts over whenever the
// transport takes more of the request body, so an upload that keeps
// moving is not cut however long it takes, while a backend that neither
// reads nor answers still gets 504. The bound is a cancellation timer on
// the request's context rather than a context deadline: a deadline would
// also cut the response body, and a gRPC stream or a download may rightly
// run far longer than the wait for its headers.
//
// Once headers are in, the same timer bounds the backend's silence
// instead, by h.idleTimeout, as idle_timeout bounds an L4 relay: a
// response body (or an upgraded connection, in both directions) on which
// nothing moved for that long while the proxy was waiting for the backend
// is cut. A body that keeps moving, however slowly, runs on; so does one
// the proxy is not reading because the client is slow to take it (the
// client's writes are bounded by stallGuard). The context lives until the
// body is closed.
func (h *Handler) roundTripWithTimeout(rt http.RoundTripper, req *http.Request) (*http.Response, error) {
	ctx, cancel := context.WithCancelCause(req.Context())
	timer := &responseTimer{d: h.responseTimeout, idle: h.idleTimeout, ctx: ctx, cancel: cancel}
	timer.t = time.AfterFunc(h.responseTimeout, timer.fire)
	octx := ctx
	var stale *staleCheck
	if !h.h2Backend {
		stale = &staleCheck{}
		octx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
			GotConn:              stale.gotConn,
			GotFirstResponseByte: stale.firstByte,
		})
	}
	out := req.WithContext(octx)
	if req.Body != nil && req.Body != http.NoBody {
		out.Body = &timedBody{ReadCloser: req.Body, timer: timer}
	}
	res, err := rt.RoundTrip(out)
	if !timer.stop() {
		// The timer fired first; whatever the transport returned was
		// cut short by it (or raced it and lost).
		if err == nil {
			res.Body.Close()
		}
		cancel(nil)
		return nil, fmt.Errorf("%w (%v)", errResponseTimeout, h.responseTimeout)
	}
	if err != nil {
		cancel(nil)
		return nil, err
	}
	if stale != nil && stale.isStale() {
		res.Body.Close()
		cancel(nil)
		return nil, errStaleResponse
	}
	cb := cancelBody{ReadCloser: res.Body, timer: timer}
	if rw, ok := res.Body.(io.ReadWriteCloser); ok {
		// A 101 Switching Protocols body is the raw connection, and
		// ReverseProxy needs it writable to relay the upgraded stream.
		// Cancelling the context does not close it, so it is closed
		// when the context ends: when the timer cuts it, and when the
		// request ends with nobody having closed it (ReverseProxy drops
		// a 101 it refuses without closing its body).
		res.Body = &cancelRWBody{cancelBody: cb, w: rw}
		context.AfterFunc(ctx, func() { rw.Close() })
	} else {
		res.Body = &cb
	}
	timer.watch()
	return res, nil
}

// responseTimer is the timer of one outbound request: first its response
// timeout, then, once the response headers are in, its idle timeout. The
// transport may still read the request body after the response headers
// arrived, so a restart must not revive a response timeout the round
// trip stopped; it counts as the request moving instead.
type responseTimer struct {
	d, idle time.Duration
	t       *time.Timer
	ctx     context.Context
	cancel  context.CancelCauseFunc

	mu       sync.Mutex
	stopped  bool // the response timeout is over: headers are in, or the round trip failed
	fired    bool // a restart found it fired: it stays fired
	watching bool // the idle timeout runs (set by watch)
	done     bool // the body is closed, or was cut

	// The idle state, updated without the lock: last is when something
	// last moved (as time since monoBase); waiting is set while a read
	// of the response body, i.e. a wait for the backend, is in progress.
	last    atomic.Int64
	waiting atomic.Bool
}

// restart starts the wait over, unless the timer has fired or was stopped.
func (t *responseTimer) restart() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		t.moved()
		return
	}
	if !t.fired && !t.t.Reset(t.d) {
		// It had fired: Reset has scheduled it again, which only
		// cancels the same context a second time.
		t.fired = true
	}
}

// stop stops the response timeout for good and reports whether it had
// not fired.
func (t *responseTimer) stop() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.stopped = true
	return t.t.Stop() && !t.fired
}

// watch starts the idle timeout, once stop has reported the response
// timeout stopped; when it expires it cancels the request's context.
func (t *responseTimer) watch() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.watching = true
	t.moved()
	t.t.Reset(t.idle)
}

// moved records that something moved: a request body read, a write to
// an upgraded connection.
func (t *responseTimer) moved() {
	t.last.Store(int64(time.Since(monoBase)))
}

// reading brackets a read of the response body: a clock read and two
// stores, no system call.
func (t *responseTimer) reading(on bool) {
	if on {
		t.moved()
	}
	t.waiting.Store(on)
}

// close ends the idle timeout with the body.
func (t *responseTimer) close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.done = true
	t.t.Stop()
}

// fire is the timer's function: in the response timeout it cancels the
// request; in the idle timeout it cuts a response whose read has waited
// on a backend with nothing moving for a whole timeout, and otherwise
// sets itself for when that could next be true.
func (t *responseTimer) fire() {
	t.mu.Lock()
	if !t.watching {
		t.mu.Unlock()
		t.cancel(errResponseTimeout)
		return
	}
	if t.done || t.ctx.Err() != nil {
		// A body nobody closes (ReverseProxy drops a 101 it refuses)
		// stops here once the request ends.
		t.mu.Unlock()
		return
	}
	// Load waiting before last: a read sets last before waiting.
	if !t.waiting.Load() {
		// Not waiting for the backend: the response is being written
		// to the client, or has not been read yet.
		t.t.Reset(t.idle)
		t.mu.Unlock()
		return
	}
	if quiet := time.Since(monoBase) - time.Duration(t.last.Load()); quiet < t.idle {
		t.t.Reset(t.idle - quiet)
		t.mu.Unlock()
		return
	}
	t.done = true
	t.mu.Unlock()
	t.cancel(errBackendIdle)
}

// timedBody restarts the response timer whenever the transport takes some
// of the request body.
type timedBody struct {
	io.ReadCloser
	timer *responseTimer
}

func (b *timedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		b.timer.restart()
	}
	return n, err
}

// cancelBody is the response body: its reads are watched by the idle
// timeout, and closing it (ReverseProxy always does) releases the
// outbound request's context and timer.
type cancelBody struct {
	io.ReadCloser
	timer *responseTimer
}

func (b *cancelBody) Read(p []byte) (int, error) {
	b.timer.reading(true)
	n, err := b.ReadCloser.Read(p)
	b.timer.reading(false)
	return n, err
}

func (b *cancelBody) Close() error {
	err := b.ReadCloser.Close()
	b.timer.close()
	b.timer.cancel(nil)
	return err
}

type cancelRWBody struct {
	cancelBody
	w io.Writer
}

func (b *cancelRWBody) Write(p []byte) (int, error) {
	n, err := b.w.Write(p)
	if n > 0 {
		b.timer.moved()
	}
	return n, err
}

// logLimiter lets one backend error log line through per interval and
// counts the rest, so a dead backend under load costs one line a second,
// not one per request.
type logLimiter struct {
	next       atomic.Int64 // unix nanos before which lines are suppressed
	suppressed atomic.Int64
}

const logInterval = time.Second

// allow reports whether a line may be logged at now, and how many were
// suppressed since the last one that was.
func (l *logLimiter) allow(now time.Time) (ok bool, suppressed int64) {
	n := l.next.Load()
	if now.UnixNano() < n || !l.next.CompareAndSwap(n, now.Add(logInterval).UnixNano()) {
		l.suppressed.Add(1)
		return false, 0
	}
	return true, l.suppressed.Swap(0)
}
