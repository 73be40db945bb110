// Package proxy is the data path: listeners, the accept loop, connection
// limits, the PROXY header and firewall checks, the ClientHello peek,
// route lookup, backend dial and the zero-copy relay.
//
// It reads compiled snapshots and never changes them:
//
//	srv := proxy.NewServer(proxy.Options{Logger: log, Registerer: reg})
//	snap, err := srv.Compile(cfg) // all-or-nothing; errors carry file:line:key
//	err = srv.Apply(snap)         // opens new sockets, swaps, closes removed ones
//	...
//	srv.Shutdown(ctx)             // stop accepting, drain until ctx ends, then close
package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/l7"
)

// Options configure a Server. The zero value works: logs are discarded
// and metrics go to a private registry.
type Options struct {
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// Server runs the listeners of the current snapshot.
type Server struct {
	log       *slog.Logger
	metrics   *metrics
	l7metrics *l7.Metrics
	rejectLog *sampler

	current atomic.Pointer[Snapshot]

	mu        sync.Mutex // serialises Apply and Shutdown
	listeners map[string]*runningListener
	closing   bool

	// drainCtx is cancelled when shutdown begins (L7 connections start a
	// graceful close); hardCtx when the grace period ends (every
	// remaining connection is closed).
	drainCtx, hardCtx       context.Context
	cancelDrain, cancelHard context.CancelFunc
	conns                   sync.WaitGroup
	live                    atomic.Int64 // connections conns is waiting for, so Shutdown knows whether it cut any

	loops   eventLoops     // relay L4 connections until they carry bulk data
	tracked trackedSockets // every connection's sockets, for the hard shutdown
}

// NewServer returns a Server with no listeners.
func NewServer(o Options) *Server {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	reg := o.Registerer
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	s := &Server{
		log:       log,
		metrics:   newMetrics(reg),
		l7metrics: l7.NewMetrics(reg),
		rejectLog: newSampler(10, time.Second),
		listeners: map[string]*runningListener{},
	}
	s.loops.warn = func(err error) {
		log.Warn("event loops could not start: relaying in goroutines until they can", "err", err)
	}
	s.drainCtx, s.cancelDrain = context.WithCancel(context.Background())
	s.hardCtx, s.cancelHard = context.WithCancel(context.Background())
	return s
}

// noKeepAlive turns off Go's default TCP keepalive on accepted
// connections: idle_timeout already closes a relay whose peer went away
// silently (no bytes either way), and the keepalive setup is four
// setsockopt calls per connection on the accept path.
var noKeepAlive = net.ListenConfig{KeepAlive: -1}

// runningListener is an open socket. It outlives snapshots: a reload
// that keeps the address keeps the socket, its counters and its live
// connections.
type runningListener struct {
	addr     string
	ln       *net.TCPListener
	raw      rawListener // accepts bare descriptors (Linux)
	active   atomic.Int64
	total    atomic.Uint64
	rejected [numReasons]atomic.Uint64
	done     chan struct{} // closed when serveListener returns
}

// Compile builds a snapshot from an effective config, reusing state the
// current snapshot can lend (rate-limiter counters, the GeoIP database).
// Nothing is published; pass the result to Apply, or Discard it.
func (s *Server) Compile(cfg *config.Config) (*Snapshot, error) {
	return s.compile(cfg, s.current.Load())
}

// Discard frees a compiled snapshot that will not be applied.
func (s *Server) Discard(snap *Snapshot) {
	if cur := s.current.Load(); snap != nil && snap != cur {
		snap.release(cur)
		// Compiling resolved the snapshot's series; those the serving
		// snapshot does not share would otherwise stay exported, at
		// zero, for listeners and routes that never served.
		s.metrics.forget(snap, cur, s.l7metrics)
	}
}

// Current returns the published snapshot, or nil before the first Apply.
func (s *Server) Current() *Snapshot { return s.current.Load() }

// Apply publishes snap: it opens sockets for new listen addresses, swaps
// the snapshot pointer, then closes listeners whose address is gone. If
// any socket cannot be opened, the sockets opened so far are closed, the
// old snapshot stays and the error names the listener.
// Live connections are never touched; they finish on the snapshot they
// started with.
func (s *Server) Apply(snap *Snapshot) error { return s.ApplyWith(snap, nil) }

// ErrShuttingDown is Apply's error once Shutdown has begun.
var ErrShuttingDown = errors.New("proxy: server is shutting down")

// ApplyWith is Apply with a commit step between opening the new sockets
// and swapping the pointer: commit runs only once the server has checked
// that it is not shutting down and every new socket is open, and the
// snapshot is published only if commit succeeds (otherwise the sockets
// opened are closed and commit's error is returned). Shutdown cannot
// begin in between, so a caller that stores a change in commit never
// stores one that is then refused.
func (s *Server) ApplyWith(snap *Snapshot, commit func() error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return ErrShuttingDown
	}
	var opened []*runningListener
	for i, lc := range snap.order {
		if _, ok := s.listeners[lc.addr]; ok {
			continue
		}
		ln, err := noKeepAlive.Listen(context.Background(), "tcp", lc.addr)
		if err != nil {
			for _, rl := range opened {
				rl.close()
			}
			return snap.cfg.KeyError(fmt.Sprintf("listener[%d].listen", i), err)
		}
		rl, err := newRunningListener(lc.addr, ln.(*net.TCPListener))
		if err != nil {
			for _, rl := range opened {
				rl.close()
			}
			return snap.cfg.KeyError(fmt.Sprintf("listener[%d].listen", i), err)
		}
		opened = append(opened, rl)
	}
	if commit != nil {
		if err := commit(); err != nil {
			for _, rl := range opened {
				rl.close()
			}
			return err
		}
	}

	if snap.geo != nil {
		// Connections accepted under snap may check the database this
		// long after accept, even once a later snapshot shares it.
		snap.geo.maxWait = max(snap.geo.maxWait, snap.maxWait)
	}
	prev := s.current.Swap(snap)
	for _, rl := range opened {
		s.listeners[rl.addr] = rl
		go s.serveListener(rl)
	}
	var removed []*runningListener
	for addr, rl := range s.listeners {
		if _, ok := snap.listeners[addr]; !ok {
			rl.close()
			delete(s.listeners, addr)
			removed = append(removed, rl)
		}
	}
	// Wait for the accept loops so the port is free when Apply returns.
	for _, rl := range removed {
		<-rl.done
	}
	if prev != nil {
		// The first snapshot's sockets are announced by the caller once
		// the daemon is up; a reload's are announced here.
		for _, rl := range opened {
			s.log.Info("listening", "listener", snap.listeners[rl.addr].name, "addr", rl.ln.Addr())
		}
		for _, rl := range removed {
			s.log.Info("listener closed", "listener", prev.listeners[rl.addr].name, "addr", rl.ln.Addr())
		}
		prev.retire(snap)
		s.metrics.forget(prev, snap, s.l7metrics)
	}
	return nil
}

// Addr returns the bound address of the listener called name in the
// current snapshot (useful with port 0), or an invalid AddrPort.
func (s *Server) Addr(name string) netip.AddrPort {
	snap := s.current.Load()
	if snap == nil {
		return netip.AddrPort{}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, lc := range snap.order {
		if lc.name == name {
			if rl := s.listeners[lc.addr]; rl != nil {
				return rl.ln.Addr().(*net.TCPAddr).AddrPort()
			}
		}
	}
	return netip.AddrPort{}
}

// ListenerStatus is a listener's live state, for the admin API.
type ListenerStatus struct {
	Name           string
	Address        string // bound address
	Active         int64
	Total          uint64
	MaxConnections int64
	ProxyProtocol  bool
	Rejected       map[string]uint64 // by reason; only non-zero reasons
}

// Status reports every listener of the current snapshot, by name.
func (s *Server) Status() []ListenerStatus {
	snap := s.current.Load()
	if snap == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []ListenerStatus
	for _, lc := range snap.order {
		rl := s.listeners[lc.addr]
		if rl == nil {
			continue
		}
		st := ListenerStatus{
			Name:           lc.name,
			Address:        rl.ln.Addr().String(),
			Active:         rl.active.Load(),
			Total:          rl.total.Load(),
			MaxConnections: lc.maxConns,
			ProxyProtocol:  lc.proxyProtocol,
			Rejected:       map[string]uint64{},
		}
		for r := reason(0); r < numReasons; r++ {
			if n := rl.rejected[r].Load(); n > 0 {
				st.Rejected[r.String()] = n
			}
		}
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Shutdown stops accepting, lets live connections finish until ctx is
// done, then closes the rest. If connections had to be cut it returns a
// *CutError wrapping ctx.Err().
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	// The closed listeners stay in the map: the admin API keeps serving
	// during the drain, and Status reads their connection counters from
	// there so operators can watch the drain. Apply refuses from now on,
	// so nothing opens or replaces one.
	for _, rl := range s.listeners {
		rl.close()
		<-rl.done
	}
	s.mu.Unlock()
	s.cancelDrain()

	done := make(chan struct{})
	go func() { s.conns.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		if s.live.Load() == 0 {
			// Nothing to cut (an expired context, a grace of 0s):
			// done is about to close.
			<-done
			break
		}
		err = &CutError{Connections: s.live.Load(), Err: ctx.Err()}
		s.cancelHard()
		s.tracked.closeAll()
		<-done
	}
	s.cancelHard()
	s.tracked.closeAll()
	// No connection is left, so no loop holds one.
	s.loops.stop()
	if snap := s.current.Swap(nil); snap != nil {
		snap.release(nil)
	}
	return err
}

// CutError is Shutdown's error when its context ended before every
// connection did: Connections were still live and have been closed.
type CutError struct {
	Connections int64
	Err         error // the context's
}

func (e *CutError) Error() string {
	return fmt.Sprintf("proxy: closed %d connection(s) still live: %v", e.Connections, e.Err)
}

func (e *CutError) Unwrap() error { return e.Err }

// close closes the listening socket; its accept loop then returns.
func (rl *runningListener) close() {
	rl.ln.Close()
	rl.raw.close()
}

// serveListener is the accept loop of one socket. On Linux it accepts
// bare descriptors, which go to an event loop (serveRaw); elsewhere it
// accepts through net, and serveConn serves each connection in a
// goroutine.
func (s *Server) serveListener(rl *runningListener) {
	defer close(rl.done)
	var backoff time.Duration
	for {
		var c *net.TCPConn
		var fd int
		var peer netip.AddrPort
		var err error
		if rl.raw.ok() {
			fd, peer, err = rl.raw.accept()
		} else {
			c, err = rl.ln.AcceptTCP()
		}
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: back off instead
			// of spinning, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			// "listener" is the name on every other line; the error
			// carries the address.
			name := rl.addr
			if lc := s.current.Load().listeners[rl.addr]; lc != nil {
				name = lc.name
			}
			s.rejectLog.log(s.log, slog.LevelError, "accept", "accept failed", "listener", name, "err", err)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		snap := s.current.Load()
		lc := snap.listeners[rl.addr]
		if lc == nil { // the listener is being removed by a reload
			closeAccepted(c, fd)
			continue
		}
		rl.total.Add(1)
		lc.m.accepted.Inc()
		// Only this goroutine increments active, so check-then-add
		// cannot overshoot the cap.
		if lc.maxConns > 0 && rl.active.Load() >= lc.maxConns {
			// The peer is the client unless a PROXY header, not read
			// at the cap, would have named another.
			var client netip.AddrPort
			if c == nil {
				if !lc.proxyProtocol {
					client = peer
				}
				resetFD(fd)
				s.rejected(rl, lc, reasonMaxConnections, client, nil)
				continue
			}
			if !lc.proxyProtocol {
				client = c.RemoteAddr().(*net.TCPAddr).AddrPort()
			}
			s.reject(rl, lc, c, reasonMaxConnections, client, nil)
			continue
		}
		rl.active.Add(1)
		lc.m.active.Inc()
		s.conns.Add(1)
		s.live.Add(1)
		if c == nil {
			s.serveRaw(snap, lc, rl, fd, peer)
			continue
		}
		go s.serveConn(snap, lc, rl, c)
	}
}

// closeAccepted closes a connection accepted either way.
func closeAccepted(c *net.TCPConn, fd int) {
	if c != nil {
		c.Close()
		return
	}
	closeFD(fd)
}

// reject counts and closes a connection turned away before relaying.
// It resets rather than closes: the client learns at once and no
// TIME_WAIT is left behind for connections that never did anything.
func (s *Server) reject(rl *runningListener, lc *listenerConfig, c *net.TCPConn, why reason, client netip.AddrPort, err error) {
	c.SetLinger(0)
	c.Close()
	s.rejected(rl, lc, why, client, err)
}

// rejected counts and logs a connection turned away, once its socket is
// reset.
func (s *Server) rejected(rl *runningListener, lc *listenerConfig, why reason, client netip.AddrPort, err error) {
	rl.rejected[why].Add(1)
	lc.m.rejected[why].Inc()
	level := slog.LevelDebug // client garbage is not the operator's error
	if why == reasonBackendUnreachable {
		level = slog.LevelWarn
	}
	attrs := []any{"listener", lc.name, "reason", why.String()}
	if client.IsValid() {
		attrs = append(attrs, "client", client)
	}
	if err != nil {
		attrs = append(attrs, "err", err)
	}
	s.rejectLog.log(s.log, level, why.String(), "connection rejected", attrs...)
}
