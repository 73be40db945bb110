package proxy

import (
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/firewall"
	"github.com/portcullis/portcullis/l7"
)

// Snapshot is an immutable, compiled routing configuration. The accept
// loop loads the current one once per connection and hands it down, so a
// connection sees one consistent world even while a reload swaps in the
// next snapshot.
type Snapshot struct {
	cfg       *config.Config
	listeners map[string]*listenerConfig // by canonical listen address
	order     []*listenerConfig
	rules     *firewall.Rules
	limiter   *firewall.Limiter // nil: no rate limit
	geo       *geoHandle        // nil: no GeoIP database
	maxWait   time.Duration     // longest handshake_timeout, see geoHandle.maxWait
}

// Config returns the effective configuration the snapshot was compiled
// from. Callers must not modify it.
func (s *Snapshot) Config() *config.Config { return s.cfg }

// listenerConfig is one listener's compiled settings.
type listenerConfig struct {
	name             string
	addr             string // canonical host:port, the key listeners are matched by
	maxConns         int64
	proxyProtocol    bool
	trusted          []netip.Prefix // PROXY header senders
	forwardedTrusted []netip.Prefix
	handshakeTimeout time.Duration
	idleTimeout      time.Duration
	dialTimeout      time.Duration
	routes           *routeTable
	m                listenerMetrics
}

// route is one compiled route.
type route struct {
	listener string
	sni      string // normalised pattern
	backend  string
	// backendAddr is backend as an address, if it is one: a loop
	// dials it itself (see dialRaw). A host name is resolved on every
	// dial, through net.
	backendAddr netip.AddrPort
	sendProxy   bool
	l7          *l7.Handler // nil for L4
	// routedHere is l7.ConnInfo.RoutedHere for the route's connections:
	// whether a connection for a host would have been routed here. Made
	// once per snapshot, L7 routes only.
	routedHere func(host string) bool
	m          routeMetrics
}

// geoHandle shares one opened GeoIP database between consecutive
// snapshots while the file is unchanged.
type geoHandle struct {
	path string
	info os.FileInfo
	db   *firewall.GeoDB
	// maxWait is the longest handshake_timeout of the snapshots
	// published with db: a connection accepted under any of them may
	// still look a country up that long after accept (see retire).
	// Guarded by Server.mu.
	maxWait time.Duration
}

// compile turns an effective config into a snapshot. prev (may be nil)
// lends state that must survive reloads: the rate limiter's counters and
// an unchanged GeoIP database. Every failure names file, line and key.
func (s *Server) compile(cfg *config.Config, prev *Snapshot) (_ *Snapshot, err error) {
	snap := &Snapshot{cfg: cfg, listeners: map[string]*listenerConfig{}}
	defer func() {
		if err != nil {
			snap.release(prev)
			s.metrics.forget(snap, prev, s.l7metrics)
		}
	}()

	if err := s.compileFirewall(snap, prev); err != nil {
		return nil, err
	}
	for i := range cfg.Listeners {
		l := &cfg.Listeners[i]
		key := fmt.Sprintf("listener[%d]", i)
		lc, err := s.compileListener(cfg, i, key, l)
		// Append before checking err so release closes the L7 handlers
		// of a half-compiled listener too.
		if lc != nil {
			snap.order = append(snap.order, lc)
			snap.listeners[lc.addr] = lc
		}
		if err != nil {
			return nil, err
		}
		snap.maxWait = max(snap.maxWait, lc.handshakeTimeout)
	}
	return snap, nil
}

func (s *Server) compileFirewall(snap *Snapshot, prev *Snapshot) error {
	cfg := snap.cfg
	f := cfg.Firewall
	if cfg.GeoIP.Database != "" {
		path := cfg.Resolve(cfg.GeoIP.Database)
		st, err := os.Stat(path)
		if err != nil {
			return cfg.KeyError("geoip.database", err)
		}
		// Same inode, size and mtime: the file was not replaced (a
		// rename-over gets a new inode even when cp -p keeps the mtime).
		if g := prevGeo(prev); g != nil && g.path == path && os.SameFile(g.info, st) && g.info.Size() == st.Size() && g.info.ModTime().Equal(st.ModTime()) {
			snap.geo = g
		} else {
			db, err := firewall.OpenGeoDB(path)
			if err != nil {
				return cfg.KeyError("geoip.database", err)
			}
			snap.geo = &geoHandle{path: path, info: st, db: db}
		}
	}
	var geo *firewall.GeoDB
	if snap.geo != nil {
		geo = snap.geo.db
	}
	rules, err := firewall.NewRules(f.Block, f.BlockCountries, geo)
	if err != nil {
		return cfg.KeyError("firewall", err)
	}
	snap.rules = rules
	if rl := f.RateLimit; rl != nil {
		if prev != nil && prev.limiter != nil && prev.cfg.Firewall.RateLimit != nil && *prev.cfg.Firewall.RateLimit == *rl {
			snap.limiter = prev.limiter // keep counting across reloads
		} else {
			snap.limiter = firewall.NewLimiter(rl.Connections, rl.Window.D(), rl.MaxSources)
		}
	}
	return nil
}

func (s *Server) compileListener(cfg *config.Config, li int, key string, l *config.Listener) (*listenerConfig, error) {
	addr, err := config.CanonicalHostPort(l.Listen)
	if err != nil {
		return nil, cfg.KeyError(key+".listen", err)
	}
	lc := &listenerConfig{
		name:             l.Name,
		addr:             addr,
		maxConns:         int64(l.MaxConnections),
		proxyProtocol:    l.ProxyProtocol,
		handshakeTimeout: l.HandshakeTimeout.D(),
		idleTimeout:      l.IdleTimeout.D(),
		dialTimeout:      l.DialTimeout.D(),
		routes:           newRouteTable(),
		m:                s.metrics.forListener(l.Name),
	}
	// lc is returned with errors too, so a failed compile can forget the
	// series resolved for it.
	if lc.trusted, err = parsePrefixes(l.ProxyProtocolTrusted); err != nil {
		return lc, cfg.KeyError(key+".proxy_protocol_trusted", err)
	}
	if lc.forwardedTrusted, err = parsePrefixes(l.ForwardedTrusted); err != nil {
		return lc, cfg.KeyError(key+".forwarded_trusted", err)
	}
	for j := range l.Routes {
		rc := &l.Routes[j]
		r := &route{
			listener:    l.Name,
			sni:         rc.SNI,
			backend:     rc.Backend,
			backendAddr: literalAddr(rc.Backend),
			sendProxy:   rc.SendProxyProtocol,
			m:           s.metrics.forRoute(l.Name, rc.SNI),
		}
		if rc.Mode == config.ModeL7 {
			h, err := l7.NewHandler(l7.Options{
				Listener:          l.Name,
				Route:             rc.SNI,
				CertFile:          cfg.Resolve(rc.TLSCert),
				KeyFile:           cfg.Resolve(rc.TLSKey),
				Backend:           rc.Backend,
				Protocol:          rc.BackendProtocol,
				BackendCAFile:     cfg.Resolve(rc.BackendCA),
				BackendServerName: rc.BackendServerName,
				SendProxyProtocol: rc.SendProxyProtocol,
				DialTimeout:       lc.dialTimeout,
				ResponseTimeout:   rc.ResponseTimeout.D(),
				IdleTimeout:       lc.idleTimeout,
				Logger:            s.log,
				Metrics:           s.l7metrics,
				DialSeconds:       r.m.dial,
			})
			if err != nil {
				field := l7ErrorKey(err)
				// The key names the field; drop the "l7: field: " prefix
				// that would repeat it.
				msg := strings.TrimPrefix(strings.TrimPrefix(err.Error(), "l7: "), field+": ")
				lc.routes.add(r) // without a handler: only so its series are forgotten
				return lc, cfg.KeyError(cfg.RouteKey(li, j)+"."+field, &relabeled{msg, err})
			}
			r.l7 = h
			routes := lc.routes
			r.routedHere = func(host string) bool { return routes.lookup(host) == r }
		}
		lc.routes.add(r)
	}
	return lc, nil
}

func prevGeo(prev *Snapshot) *geoHandle {
	if prev == nil {
		return nil
	}
	return prev.geo
}

// release frees what this snapshot owns and prev does not share. It runs
// when a compiled snapshot is thrown away unpublished.
func (s *Snapshot) release(prev *Snapshot) {
	for _, lc := range s.order {
		for _, r := range lc.routes.all {
			if r.l7 != nil {
				r.l7.Close()
			}
		}
	}
	if s.geo != nil && (prev == nil || prev.geo != s.geo) {
		s.geo.db.Close()
	}
}

// retire is called when next replaced s. L7 handlers only drop idle
// backend connections, so requests in flight finish. A GeoIP database
// that next no longer uses may still be read by a connection accepted
// before the swap, whose firewall check comes after its PROXY header
// (bounded by handshake_timeout); it is closed once that window has
// passed, so such a connection still gets a verdict. The window is the
// longest of every snapshot that shared the database, not only s's: a
// connection accepted under an earlier one with a longer
// handshake_timeout may still be waiting for its header.
func (s *Snapshot) retire(next *Snapshot) {
	for _, lc := range s.order {
		for _, r := range lc.routes.all {
			if r.l7 != nil {
				r.l7.Close()
			}
		}
	}
	if s.geo != nil && (next == nil || next.geo != s.geo) {
		db := s.geo.db
		time.AfterFunc(s.geo.maxWait+5*time.Second, func() { db.Close() })
	}
}

// relabeled is an error with a shorter message that still unwraps to
// the original (errors.Is(err, fs.ErrNotExist) keeps working).
type relabeled struct {
	msg string
	err error
}

func (r *relabeled) Error() string { return r.msg }
func (r *relabeled) Unwrap() error { return r.err }

// l7ErrorKey recovers the route key an l7 error is about from its
// "l7: key: ..." prefix, so the message points at the right line.
func l7ErrorKey(err error) string {
	msg := strings.TrimPrefix(err.Error(), "l7: ")
	if i := strings.Index(msg, ":"); i > 0 {
		k, _, _ := strings.Cut(msg[:i], "/")
		if strings.IndexFunc(k, func(r rune) bool { return !(r == '_' || r >= 'a' && r <= 'z') }) < 0 {
			return k
		}
	}
	return "tls_cert"
}

func parsePrefixes(ss []string) ([]netip.Prefix, error) {
	var ps []netip.Prefix
	for _, s := range ss {
		p, err := config.ParsePrefix(s)
		if err != nil {
			return nil, err
		}
		ps = append(ps, p)
	}
	return ps, nil
}

// containsAddr reports whether a is in one of ps. A peer on a link-local
// address comes with its interface as zone (fe80::1%eth0), which
// netip.Prefix.Contains never matches; the zone names the link, not the
// address, so it is dropped.
func containsAddr(ps []netip.Prefix, a netip.Addr) bool {
	a = a.WithZone("")
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// literalAddr is backend as an IP address and port, or the zero
// AddrPort for a host name (or a zoned address, which a raw dial would
// not scope).
func literalAddr(backend string) netip.AddrPort {
	ap, err := netip.ParseAddrPort(backend)
	if err != nil || ap.Addr().Zone() != "" {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
