package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/portcullis/portcullis/clienthello"
	"github.com/portcullis/portcullis/firewall"
	"github.com/portcullis/portcullis/l7"
	"github.com/portcullis/portcullis/proxyproto"
)

// helloBufs recycles ClientHello buffers between connections; most
// hellos fit the initial size.
var helloBufs = sync.Pool{New: func() any { b := make([]byte, 0, clienthello.BufferSize); return &b }}

// accepted is one connection from its accept to its end: what routing
// and the access log need, and its share of the Server's bookkeeping.
type accepted struct {
	s     *Server
	snap  *Snapshot
	lc    *listenerConfig
	rl    *runningListener
	start time.Time
	// client is the peer, or the PROXY header's source; local the
	// address it connected to (the header's destination), invalid until
	// known.
	client, local netip.AddrPort
	socks         *sockets
}

func (s *Server) newAccepted(snap *Snapshot, lc *listenerConfig, rl *runningListener, client netip.AddrPort) *accepted {
	a := &accepted{s: s, snap: snap, lc: lc, rl: rl, start: time.Now(), client: client, socks: &sockets{}}
	// A hard shutdown closes the sockets, which unblocks any stage and
	// the relay. One registration covers both (see sockets).
	s.tracked.add(a.socks)
	return a
}

// end is the connection's end: run by whoever holds it last (the
// handshake, or the relay once both directions are done).
func (a *accepted) end() {
	a.s.tracked.remove(a.socks)
	a.rl.active.Add(-1)
	a.lc.m.active.Dec()
	a.s.live.Add(-1)
	a.s.conns.Done()
}

// cutByShutdown says whether the hard shutdown made a read, dial or
// write fail, by cancelling the dial or closing the sockets (hardCtx
// ends first). That says nothing of the client or the backend, and
// Shutdown's CutError counts the connection: rejecting it would log a
// bad_client_hello, or a warning that the backend is unreachable, for
// every handshake a restart cuts.
func (a *accepted) cutByShutdown() bool { return a.s.hardCtx.Err() != nil }

// admit runs the firewall on the client's address: the blocklist first,
// so that a blocked address spends no rate-limit quota, then the rate
// limiter. It returns the reason to turn the connection away, if any.
func (a *accepted) admit() (reason, bool) {
	switch a.snap.rules.Check(a.client.Addr()) {
	case firewall.BlockedIP:
		return reasonBlockedIP, false
	case firewall.BlockedCountry:
		return reasonBlockedCountry, false
	}
	// The time of the check, not of the accept: a PROXY header may
	// arrive up to handshake_timeout later (a load balancer that sends
	// it with the client's first bytes), and a stale time would restart
	// the source in the limiter, handing it a fresh budget.
	if a.snap.limiter != nil && !a.snap.limiter.Allow(a.client.Addr(), time.Now()) {
		return reasonRateLimited, false
	}
	return 0, true
}

// serveConn takes one connection accepted through net through the
// pre-routing stages in order — PROXY header, firewall, ClientHello —
// each reading from the bare socket, so nothing is ever buffered past
// what a stage needs. Errors from the ClientHello stage are counted as
// bad_client_hello unless the handshake deadline expired. (On Linux,
// connections to listeners without proxy_protocol take these stages in
// an event loop instead: see serveRaw.)
func (s *Server) serveConn(snap *Snapshot, lc *listenerConfig, rl *runningListener, c *net.TCPConn) {
	peer := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	peer = netip.AddrPortFrom(peer.Addr().Unmap(), peer.Port())
	local := c.LocalAddr().(*net.TCPAddr).AddrPort()
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	a := s.newAccepted(snap, lc, rl, peer)
	a.local = local
	a.socks.setClient(c)
	c.SetReadDeadline(a.start.Add(lc.handshakeTimeout))
	s.handshake(a, c)
}

// handshake runs serveConn's stages on c, whose read deadline is set.
func (s *Server) handshake(a *accepted, c *net.TCPConn) {
	lc := a.lc
	if lc.proxyProtocol {
		if !a.trustedSender() {
			s.reject(a.rl, lc, c, reasonBadProxyHeader, a.client, errUntrustedSender)
			a.end()
			return
		}
		h, err := proxyproto.Read(c)
		if err != nil {
			a.failed(c, timeoutOr(err, reasonBadProxyHeader), err)
			a.end()
			return
		}
		a.takeHeader(h)
	}
	if why, ok := a.admit(); !ok {
		s.reject(a.rl, lc, c, why, a.client, nil)
		a.end()
		return
	}
	if !s.readHello(a, c) {
		a.end()
	}
}

var errUntrustedSender = errors.New("sender not in proxy_protocol_trusted")

// trustedSender says whether the peer may send a PROXY header. Called
// before the header is read, when client is still the peer.
func (a *accepted) trustedSender() bool { return containsAddr(a.lc.trusted, a.client.Addr()) }

// takeHeader makes a PROXY header's addresses the connection's.
func (a *accepted) takeHeader(h *proxyproto.Header) {
	if h.Command == proxyproto.Proxy && h.Source.IsValid() {
		a.client = netip.AddrPortFrom(h.Source.Addr().Unmap(), h.Source.Port())
		// Pass on the address the client originally connected to,
		// as HAProxy does, not our own hop's.
		a.local = netip.AddrPortFrom(h.Destination.Addr().Unmap(), h.Destination.Port())
	}
}

// failed turns the connection away after a read, dial or write failed,
// unless the hard shutdown made it fail.
func (a *accepted) failed(c *net.TCPConn, why reason, err error) {
	if a.cutByShutdown() {
		c.Close() // sockets.close may not have reached it yet
		return
	}
	a.s.reject(a.rl, a.lc, c, why, a.client, err)
}

// readHello reads the ClientHello from c and serves the route it asks
// for. It reports whether the connection lives on in a relay, which
// then ends it; otherwise the caller does.
func (s *Server) readHello(a *accepted, c *net.TCPConn) bool {
	bufp := helloBufs.Get().(*[]byte)
	// The buffer goes back to the pool as soon as its bytes are sent, not
	// when the connection ends: an idle relay should not pin it.
	release := func() {
		if bufp != nil {
			helloBufs.Put(bufp)
			bufp = nil
		}
	}
	defer release()
	hello, err := clienthello.Read(c, *bufp)
	if c := cap(hello.Raw); c > cap(*bufp) && c <= 4*clienthello.BufferSize {
		*bufp = hello.Raw[:0] // keep a grown buffer, within reason
	}
	if err != nil {
		a.failed(c, timeoutOr(err, reasonBadClientHello), err)
		return false
	}
	r := a.lc.routes.lookup(hello.ServerName)
	if r == nil {
		s.reject(a.rl, a.lc, c, reasonNoRoute, a.client, noRouteError(hello.ServerName))
		return false
	}
	c.SetReadDeadline(time.Time{})
	r.m.conns.Inc()
	return s.serveRoute(a, c, r, hello, release)
}

// serveRoute serves a routed connection whose ClientHello has been
// read: it runs an L7 route's handler, or dials an L4 route's backend
// and starts the relay. It reports whether the relay took the
// connection. release, if not nil, is called once hello's bytes are no
// longer needed.
//
// An L4 connection's relay runs in an event loop, or in goroutines of
// its own, and this goroutine returns: its stack grew through the dial
// and the ClientHello, and an idle relay should not keep that stack for
// its lifetime.
func (s *Server) serveRoute(a *accepted, c *net.TCPConn, r *route, hello clienthello.Hello, release func()) bool {
	if release == nil {
		release = func() {}
	}
	lc := a.lc
	if a.local == (netip.AddrPort{}) {
		local := c.LocalAddr().(*net.TCPAddr).AddrPort()
		a.local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	}
	if r.l7 != nil {
		// crypto/tls owns the connection from here; the hello bytes are
		// replayed into it, so they must not go back to the pool.
		raw := append([]byte(nil), hello.Raw...)
		sni := hello.ServerName
		release()
		lconn := &l7Conn{TCPConn: c}
		r.l7.ServeConn(s.drainCtx, lconn, raw, l7.ConnInfo{
			Client:         a.client,
			Local:          a.local,
			TrustForwarded: containsAddr(lc.forwardedTrusted, a.client.Addr()),
			SNI:            sni,
			Cut:            s.hardCtx,
			RoutedHere:     r.routedHere,
		})
		// The hello was read before the handler, as on L4 routes.
		in, out := uint64(len(raw))+lconn.in.Load(), lconn.out.Load()
		r.m.toBackend.Add(float64(in))
		r.m.toClient.Add(float64(out))
		s.log.LogAttrs(context.Background(), slog.LevelInfo, "connection",
			slog.String("listener", lc.name), slog.Any("client", a.client), slog.String("sni", sni),
			slog.String("route", r.sni), slog.String("mode", "l7"), slog.String("backend", r.backend),
			slog.Uint64("bytes_in", in), slog.Uint64("bytes_out", out),
			slog.Duration("duration", time.Since(a.start)))
		return false
	}

	dialStart := time.Now()
	// No TCP keepalive (see noKeepAlive): a dead backend is noticed by
	// idle_timeout, and the probes' setsockopt calls cost every dial.
	d := net.Dialer{Timeout: lc.dialTimeout, KeepAlive: -1}
	b, err := dialBackend(s.hardCtx, &d, r)
	if err != nil {
		a.failed(c, reasonBackendUnreachable, err)
		return false
	}
	r.m.dial.Observe(time.Since(dialStart).Seconds())
	a.socks.setBackend(b)

	// PROXY v2 header and the recorded ClientHello go out in one write.
	out := proxyAndHello(r, a, hello)
	if _, err := b.Write(out); err != nil {
		b.Close()
		a.failed(c, reasonBackendUnreachable, err)
		return false
	}
	sni, helloLen := hello.ServerName, len(hello.Raw)
	release()

	s.relay(a.socks, c, b, lc.idleTimeout, func(res relayResult) {
		c.Close()
		b.Close()
		a.relayed(r, sni, helloLen, res)
	})
	return true
}

// proxyAndHello is what goes to an L4 backend before the relay: the
// recorded ClientHello, after a PROXY v2 header if the route sends one.
func proxyAndHello(r *route, a *accepted, hello clienthello.Hello) []byte {
	if !r.sendProxy {
		return hello.Raw
	}
	out := proxyproto.AppendV2(make([]byte, 0, 64+len(hello.ServerName)+len(hello.Raw)), a.client, a.local, hello.ServerName)
	return append(out, hello.Raw...)
}

// relayed is an L4 relay's end once its sockets are closed: the
// route's byte counters, the access log line, and the connection's end.
// The ClientHello (helloLen bytes) went to the backend before the relay
// counted anything.
func (a *accepted) relayed(r *route, sni string, helloLen int, res relayResult) {
	res.toBackend += int64(helloLen)
	r.m.toBackend.Add(float64(res.toBackend))
	r.m.toClient.Add(float64(res.toClient))
	// LogAttrs: no per-connection boxing of the values, and nothing
	// built at all when info lines are off.
	a.s.log.LogAttrs(context.Background(), slog.LevelInfo, "connection",
		slog.String("listener", a.lc.name), slog.Any("client", a.client), slog.String("sni", sni),
		slog.String("route", r.sni), slog.String("backend", r.backend),
		slog.Int64("bytes_in", res.toBackend), slog.Int64("bytes_out", res.toClient),
		slog.Duration("duration", time.Since(a.start)), slog.String("end", res.end))
	a.end()
}

// dialBackend connects to r's backend. An address is parsed by the
// resolver without a lookup; a host name is resolved on every dial, so
// DNS changes apply.
//
// Not Dialer.DialTCP, which would skip that parse: it binds the socket
// to its local address, and a zero one is bound to port 0 before the
// connect. The kernel then picks a port free for every destination
// rather than for this backend alone, so all backends together share
// one ephemeral port range, and it costs a bind call per dial.
func dialBackend(ctx context.Context, d *net.Dialer, r *route) (*net.TCPConn, error) {
	c, err := d.DialContext(ctx, "tcp", r.backend)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// sockets are one connection's client and backend sockets as a hard
// shutdown sees them, registered in the Server's trackedSockets.
type sockets struct {
	client     atomic.Pointer[net.TCPConn] // unset while an event loop holds it as a bare descriptor
	backend    atomic.Pointer[net.TCPConn] // set once dialed
	loop       atomic.Pointer[loopConn]    // set while an event loop relays them
	closing    atomic.Bool
	prev, next *sockets // in trackedSockets, under its mu
}

// close is the hard shutdown's: it closes whatever is there. A closed
// socket brings an event loop no event, so a relay in one is told.
func (s *sockets) close() {
	s.closing.Store(true)
	if c := s.client.Load(); c != nil {
		c.Close()
	}
	if b := s.backend.Load(); b != nil {
		b.Close()
	}
	if c := s.loop.Load(); c != nil {
		c.cut()
	}
}

// setClient publishes the client socket, as setBackend does.
func (s *sockets) setClient(c *net.TCPConn) {
	s.client.Store(c)
	if s.closing.Load() {
		c.Close()
	}
}

// setBackend publishes the dialed backend socket. A shutdown that began
// before it could see it closes it here instead, so the hello write or
// the relay fails at once.
func (s *sockets) setBackend(b *net.TCPConn) {
	s.backend.Store(b)
	if s.closing.Load() {
		b.Close()
	}
}

// trackedSockets are the sockets of every connection being served, for
// the hard shutdown to close: an intrusive list under one lock, so that
// tracking a connection is a few pointer writes. (A context.AfterFunc
// per connection allocated about 170 bytes held for the connection's
// life, a large share of what an idle relay costs.)
type trackedSockets struct {
	mu   sync.Mutex
	head sockets // sentinel: head.next is the first, head.prev the last
	cut  bool
}

// add tracks s; once closeAll has run, it closes s at once instead.
func (t *trackedSockets) add(s *sockets) {
	t.mu.Lock()
	if t.cut {
		t.mu.Unlock()
		s.close()
		return
	}
	if t.head.next == nil {
		t.head.next, t.head.prev = &t.head, &t.head
	}
	s.prev, s.next = &t.head, t.head.next
	t.head.next.prev = s
	t.head.next = s
	t.mu.Unlock()
}

func (t *trackedSockets) remove(s *sockets) {
	t.mu.Lock()
	if s.next != nil {
		s.prev.next, s.next.prev = s.next, s.prev
		s.prev, s.next = nil, nil
	}
	t.mu.Unlock()
}

// closeAll closes every tracked connection's sockets, and those of any
// connection tracked from now on.
func (t *trackedSockets) closeAll() {
	t.mu.Lock()
	t.cut = true
	var all []*sockets
	for s := t.head.next; s != nil && s != &t.head; s = s.next {
		all = append(all, s)
	}
	t.mu.Unlock()
	for _, s := range all {
		s.close()
	}
}

// timeoutOr classifies a pre-routing read error: a deadline that expired
// is a handshake timeout, anything else is the stage's own reason.
func timeoutOr(err error, otherwise reason) reason {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return reasonHandshakeTimeout
	}
	return otherwise
}

// sampler rate-limits log lines per message so a flood of rejections
// cannot flood the log: at most burst lines per interval per message,
// then one line saying how many were suppressed. Keys come from a small
// fixed set (rejection reasons), so the map stays small.
type sampler struct {
	burst    int
	interval time.Duration

	mu    sync.Mutex
	state map[string]*sampleState
}

type sampleState struct {
	windowStart time.Time
	n           int
	suppressed  int
}

func newSampler(burst int, interval time.Duration) *sampler {
	return &sampler{burst: burst, interval: interval, state: map[string]*sampleState{}}
}

func (s *sampler) log(l *slog.Logger, level slog.Level, key, msg string, attrs ...any) {
	if !l.Enabled(context.Background(), level) {
		return
	}
	now := time.Now()
	s.mu.Lock()
	st := s.state[key]
	if st == nil {
		st = &sampleState{}
		s.state[key] = st
	}
	if now.Sub(st.windowStart) >= s.interval {
		st.windowStart, st.n = now, 0
	}
	st.n++
	if st.n > s.burst {
		st.suppressed++
		s.mu.Unlock()
		return
	}
	suppressed := st.suppressed
	st.suppressed = 0
	s.mu.Unlock()
	if suppressed > 0 {
		attrs = append(attrs, "suppressed", suppressed)
	}
	l.Log(context.Background(), level, msg, attrs...)
}

// l7Conn is the client socket an L7 handler serves. An L7 route has no
// relay counting bytes, so the socket counts what the handler reads and
// writes (TLS included): one atomic add per read or write, next to the
// cryptography each one costs.
type l7Conn struct {
	*net.TCPConn
	in, out atomic.Uint64
}

func (c *l7Conn) Read(p []byte) (int, error) {
	n, err := c.TCPConn.Read(p)
	c.in.Add(uint64(n))
	return n, err
}

func (c *l7Conn) Write(p []byte) (int, error) {
	n, err := c.TCPConn.Write(p)
	c.out.Add(uint64(n))
	return n, err
}

// noRouteError names the SNI no route matched, for the rejection's log
// line: what an operator needs to see to add the missing route.
type noRouteError string

func (e noRouteError) Error() string { return fmt.Sprintf("no route for sni %q", string(e)) }
