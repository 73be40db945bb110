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

// serveConn takes one accepted connection through the pre-routing stages
// in order — PROXY header, firewall, ClientHello — each reading from the
// bare socket, so nothing is ever buffered past what a stage needs.
// Errors from the ClientHello stage are counted as bad_client_hello
// unless the handshake deadline expired.
//
// An L4 connection's relay runs in two fresh goroutines and this one
// returns: its stack grew through the dial and the ClientHello, and an
// idle relay should not keep that stack for its lifetime. The relay then
// owns the connection's bookkeeping (see closeConn).
func (s *Server) serveConn(snap *Snapshot, lc *listenerConfig, rl *runningListener, c *net.TCPConn) {
	start := time.Now()
	peer := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	peer = netip.AddrPortFrom(peer.Addr().Unmap(), peer.Port())
	local := c.LocalAddr().(*net.TCPAddr).AddrPort()
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	client := peer

	// A hard shutdown closes the sockets, which unblocks any stage below
	// and the relay. One registration covers both (see sockets).
	socks := &sockets{client: c}
	s.tracked.add(socks)
	// closeConn is the connection's end: run here, or by the relay once
	// both directions are done.
	closeConn := func() {
		s.tracked.remove(socks)
		rl.active.Add(-1)
		lc.m.active.Dec()
		s.live.Add(-1)
		s.conns.Done()
	}
	handedOff := false
	defer func() {
		if !handedOff {
			closeConn()
		}
	}()
	// failed turns the connection away after a read, dial or write
	// failed, unless the hard shutdown made it fail by cancelling the
	// dial or closing the sockets (hardCtx ends first): that says
	// nothing of the client or the backend, and Shutdown's CutError
	// counts the connection. Rejecting it would log a bad_client_hello,
	// or a warning that the backend is unreachable, for every handshake
	// a restart cuts.
	failed := func(why reason, client netip.AddrPort, err error) {
		if s.hardCtx.Err() != nil {
			c.Close() // sockets.close may not have reached it yet
			return
		}
		s.reject(rl, lc, c, why, client, err)
	}

	c.SetReadDeadline(start.Add(lc.handshakeTimeout))
	if lc.proxyProtocol {
		if !containsAddr(lc.trusted, peer.Addr()) {
			s.reject(rl, lc, c, reasonBadProxyHeader, peer, errors.New("sender not in proxy_protocol_trusted"))
			return
		}
		h, err := proxyproto.Read(c)
		if err != nil {
			failed(timeoutOr(err, reasonBadProxyHeader), peer, err)
			return
		}
		if h.Command == proxyproto.Proxy && h.Source.IsValid() {
			client = netip.AddrPortFrom(h.Source.Addr().Unmap(), h.Source.Port())
			// Pass on the address the client originally connected to,
			// as HAProxy does, not our own hop's.
			local = netip.AddrPortFrom(h.Destination.Addr().Unmap(), h.Destination.Port())
		}
	}

	// The blocklist goes first so a blocked address spends no rate-limit
	// quota.
	switch snap.rules.Check(client.Addr()) {
	case firewall.BlockedIP:
		s.reject(rl, lc, c, reasonBlockedIP, client, nil)
		return
	case firewall.BlockedCountry:
		s.reject(rl, lc, c, reasonBlockedCountry, client, nil)
		return
	}
	// The time of the check, not of the accept: a PROXY header may
	// arrive up to handshake_timeout later (a load balancer that sends
	// it with the client's first bytes), and a stale time would restart
	// the source in the limiter, handing it a fresh budget.
	if snap.limiter != nil && !snap.limiter.Allow(client.Addr(), time.Now()) {
		s.reject(rl, lc, c, reasonRateLimited, client, nil)
		return
	}

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
		failed(timeoutOr(err, reasonBadClientHello), client, err)
		return
	}
	r := lc.routes.lookup(hello.ServerName)
	if r == nil {
		s.reject(rl, lc, c, reasonNoRoute, client, noRouteError(hello.ServerName))
		return
	}
	c.SetReadDeadline(time.Time{})
	r.m.conns.Inc()

	if r.l7 != nil {
		// crypto/tls owns the connection from here; the hello bytes are
		// replayed into it, so they must not go back to the pool.
		raw := append([]byte(nil), hello.Raw...)
		sni := hello.ServerName
		release()
		lconn := &l7Conn{TCPConn: c}
		r.l7.ServeConn(s.drainCtx, lconn, raw, l7.ConnInfo{
			Client:         client,
			Local:          local,
			TrustForwarded: containsAddr(lc.forwardedTrusted, client.Addr()),
			SNI:            sni,
			Cut:            s.hardCtx,
			RoutedHere:     r.routedHere,
		})
		// The hello was read before the handler, as on L4 routes.
		in, out := uint64(len(raw))+lconn.in.Load(), lconn.out.Load()
		r.m.toBackend.Add(float64(in))
		r.m.toClient.Add(float64(out))
		s.log.LogAttrs(context.Background(), slog.LevelInfo, "connection",
			slog.String("listener", lc.name), slog.Any("client", client), slog.String("sni", sni),
			slog.String("route", r.sni), slog.String("mode", "l7"), slog.String("backend", r.backend),
			slog.Uint64("bytes_in", in), slog.Uint64("bytes_out", out),
			slog.Duration("duration", time.Since(start)))
		return
	}

	dialStart := time.Now()
	// No TCP keepalive (see noKeepAlive): a dead backend is noticed by
	// idle_timeout, and the probes' setsockopt calls cost every dial.
	d := net.Dialer{Timeout: lc.dialTimeout, KeepAlive: -1}
	b, err := dialBackend(s.hardCtx, &d, r)
	if err != nil {
		failed(reasonBackendUnreachable, client, err)
		return
	}
	r.m.dial.Observe(time.Since(dialStart).Seconds())
	socks.setBackend(b)

	// PROXY v2 header and the recorded ClientHello go out in one write.
	out := hello.Raw
	if r.sendProxy {
		out = proxyproto.AppendV2(make([]byte, 0, 64+len(hello.ServerName)+len(hello.Raw)), client, local, hello.ServerName)
		out = append(out, hello.Raw...)
	}
	if _, err := b.Write(out); err != nil {
		b.Close()
		failed(reasonBackendUnreachable, client, err)
		return
	}
	sni, helloLen := hello.ServerName, len(hello.Raw)
	release()

	handedOff = true
	s.relay(socks, c, b, lc.idleTimeout, func(res relayResult) {
		c.Close()
		b.Close()
		res.toBackend += int64(helloLen)
		r.m.toBackend.Add(float64(res.toBackend))
		r.m.toClient.Add(float64(res.toClient))
		// LogAttrs: no per-connection boxing of the values, and nothing
		// built at all when info lines are off.
		s.log.LogAttrs(context.Background(), slog.LevelInfo, "connection",
			slog.String("listener", lc.name), slog.Any("client", client), slog.String("sni", sni),
			slog.String("route", r.sni), slog.String("backend", r.backend),
			slog.Int64("bytes_in", res.toBackend), slog.Int64("bytes_out", res.toClient),
			slog.Duration("duration", time.Since(start)), slog.String("end", res.end))
		closeConn()
	})
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
	client     *net.TCPConn
	backend    atomic.Pointer[net.TCPConn] // set once dialed
	loop       atomic.Pointer[loopConn]    // set while an event loop relays them
	closing    atomic.Bool
	prev, next *sockets // in trackedSockets, under its mu
}

// close is the hard shutdown's: it closes whatever is there. A closed
// socket brings an event loop no event, so a relay in one is told.
func (s *sockets) close() {
	s.closing.Store(true)
	s.client.Close()
	if b := s.backend.Load(); b != nil {
		b.Close()
	}
	if c := s.loop.Load(); c != nil {
		c.cut()
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
