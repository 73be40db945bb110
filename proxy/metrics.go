package proxy

import "github.com/prometheus/client_golang/prometheus"

// reason is why a connection was turned away before or while routing.
// The names are metric label values and part of the public interface.
type reason uint8

const (
	reasonMaxConnections reason = iota
	reasonBlockedIP
	reasonBlockedCountry
	reasonRateLimited
	reasonNoRoute
	reasonHandshakeTimeout
	reasonBadClientHello
	reasonBadProxyHeader
	reasonBackendUnreachable
	numReasons
)

var reasonNames = [numReasons]string{
	"max_connections", "blocked_ip", "blocked_country", "rate_limited", "no_route",
	"handshake_timeout", "bad_client_hello", "bad_proxy_header", "backend_unreachable",
}

func (r reason) String() string { return reasonNames[r] }

// metrics are the data path's Prometheus collectors, registered once per
// process. Compiling a snapshot resolves the label values each listener
// and route needs, so the hot path never looks a label up.
type metrics struct {
	accepted   *prometheus.CounterVec
	active     *prometheus.GaugeVec
	rejected   *prometheus.CounterVec
	routeConns *prometheus.CounterVec
	routeBytes *prometheus.CounterVec
	dial       *prometheus.HistogramVec
	noPipe     prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		accepted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "portcullis", Name: "connections_accepted_total",
			Help: "TCP connections accepted, per listener.",
		}, []string{"listener"}),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "portcullis", Name: "connections_active",
			Help: "Connections currently open, per listener.",
		}, []string{"listener"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "portcullis", Name: "connections_rejected_total",
			Help: "Connections closed before relaying, per listener and reason.",
		}, []string{"listener", "reason"}),
		routeConns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "portcullis", Name: "route_connections_total",
			Help: "Connections routed, per listener and route (SNI pattern).",
		}, []string{"listener", "route"}),
		routeBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "portcullis", Name: "route_bytes_total",
			Help: "Bytes relayed per route and direction (client_to_backend, backend_to_client), added when the connection ends; on L7 routes, the bytes read from and written to the client, TLS included.",
		}, []string{"listener", "route", "direction"}),
		dial: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "portcullis", Name: "backend_dial_duration_seconds",
			Help:    "Time to establish the TCP connection to a backend.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"listener", "route"}),
		noPipe: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "portcullis", Name: "relay_pipe_unavailable_total",
			Help: "L4 directions that carried bulk data by read/write instead of splice because no pipe could be had (descriptor limit or the user's pipe quota, fs.pipe-user-pages-soft).",
		}),
	}
	reg.MustRegister(m.accepted, m.active, m.rejected, m.routeConns, m.routeBytes, m.dial, m.noPipe)
	return m
}

// listenerMetrics are one listener's resolved series.
type listenerMetrics struct {
	accepted prometheus.Counter
	active   prometheus.Gauge
	rejected [numReasons]prometheus.Counter
}

func (m *metrics) forListener(name string) listenerMetrics {
	lm := listenerMetrics{
		accepted: m.accepted.WithLabelValues(name),
		active:   m.active.WithLabelValues(name),
	}
	for r := reason(0); r < numReasons; r++ {
		lm.rejected[r] = m.rejected.WithLabelValues(name, r.String())
	}
	return lm
}

// routeMetrics are one route's resolved series.
type routeMetrics struct {
	conns     prometheus.Counter
	toBackend prometheus.Counter
	toClient  prometheus.Counter
	dial      prometheus.Observer
}

func (m *metrics) forRoute(listener, sni string) routeMetrics {
	return routeMetrics{
		conns:     m.routeConns.WithLabelValues(listener, sni),
		toBackend: m.routeBytes.WithLabelValues(listener, sni, "client_to_backend"),
		toClient:  m.routeBytes.WithLabelValues(listener, sni, "backend_to_client"),
		dial:      m.dial.WithLabelValues(listener, sni),
	}
}

// forget drops the series of routes and listeners that prev had and next
// (nil: none) does not, and the L7 series of routes next keeps but no
// longer serves at L7, so configuration churn does not grow the
// exported series without bound. Connections still running on a removed
// route keep counting into series that are no longer exported. It also
// runs for a snapshot compiled and then thrown away (prev) against the
// one serving (next).
func (m *metrics) forget(prev, next *Snapshot, l7m interface{ DeleteRoute(listener, route string) }) {
	type key struct{ listener, sni string }
	keep := map[key]*route{}
	names := map[string]bool{}
	if next == nil {
		next = &Snapshot{}
	}
	for _, lc := range next.order {
		names[lc.name] = true
		for _, r := range lc.routes.all {
			keep[key{lc.name, r.sni}] = r
		}
	}
	for _, lc := range prev.order {
		for _, r := range lc.routes.all {
			kept := keep[key{lc.name, r.sni}]
			// A route that stays but is no longer L7 keeps its own
			// series; its L7 ones go now, as nothing would delete them
			// later.
			if r.l7 != nil && (kept == nil || kept.l7 == nil) {
				l7m.DeleteRoute(lc.name, r.sni)
			}
			if kept != nil {
				continue
			}
			labels := prometheus.Labels{"listener": lc.name, "route": r.sni}
			m.routeConns.DeletePartialMatch(labels)
			m.routeBytes.DeletePartialMatch(labels)
			m.dial.DeletePartialMatch(labels)
		}
		if !names[lc.name] {
			labels := prometheus.Labels{"listener": lc.name}
			m.accepted.DeletePartialMatch(labels)
			m.active.DeletePartialMatch(labels)
			m.rejected.DeletePartialMatch(labels)
		}
	}
}
