package l7

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics holds the L7 collectors. Create it once per process and share it
// between every Handler of every snapshot: series are keyed by route, so a
// route that survives a reload keeps counting where it left off.
type Metrics struct {
	requests      *prometheus.CounterVec
	duration      *prometheus.HistogramVec
	activeStreams *prometheus.GaugeVec
	backendErrors *prometheus.CounterVec
}

// Backend error kinds (label values of portcullis_l7_backend_errors_total).
const (
	kindUnreachable = "unreachable" // dial or TLS handshake failed
	kindTimeout     = "timeout"     // no response headers within ResponseTimeout
	kindOther       = "other"       // anything else the transport reported
)

// codeClasses are the code_class label values, indexed by status/100 - 1.
var codeClasses = [...]string{"1xx", "2xx", "3xx", "4xx", "5xx"}

// NewMetrics creates the L7 collectors and registers them with reg (nil
// registers nothing). It panics if they are already registered, like
// prometheus.MustRegister: call it once.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "portcullis_l7_requests_total",
			Help: "HTTP requests proxied on L7 routes, by route and response status class (1xx counts protocol upgrades such as WebSocket; 4xx includes clients that left before the backend answered).",
		}, []string{"listener", "route", "code_class"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "portcullis_l7_request_duration_seconds",
			Help: "Time from an L7 request's arrival until its response was completely sent (streams and upgrades included).",
			// Up to a minute: the default ResponseTimeout, beyond which
			// the interesting requests are long streams anyway.
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"listener", "route"}),
		activeStreams: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "portcullis_l7_active_streams",
			Help: "L7 requests (HTTP/2 streams or HTTP/1.1 requests) currently in flight.",
		}, []string{"listener", "route"}),
		backendErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "portcullis_l7_backend_errors_total",
			Help: "L7 requests that got no response from the backend, by kind (unreachable, timeout, other).",
		}, []string{"listener", "route", "kind"}),
	}
	if reg != nil {
		reg.MustRegister(m.requests, m.duration, m.activeStreams, m.backendErrors)
	}
	return m
}

// routeMetrics are one route's series, resolved once in NewHandler so a
// request touches no label maps.
type routeMetrics struct {
	requests      [len(codeClasses)]prometheus.Counter
	duration      prometheus.Observer
	activeStreams prometheus.Gauge
	unreachable   prometheus.Counter
	timeout       prometheus.Counter
	other         prometheus.Counter
}

func (m *Metrics) forRoute(listener, route string) *routeMetrics {
	rm := &routeMetrics{
		duration:      m.duration.WithLabelValues(listener, route),
		activeStreams: m.activeStreams.WithLabelValues(listener, route),
		unreachable:   m.backendErrors.WithLabelValues(listener, route, kindUnreachable),
		timeout:       m.backendErrors.WithLabelValues(listener, route, kindTimeout),
		other:         m.backendErrors.WithLabelValues(listener, route, kindOther),
	}
	for i, c := range codeClasses {
		rm.requests[i] = m.requests.WithLabelValues(listener, route, c)
	}
	return rm
}

func (rm *routeMetrics) requestDone(code int, d time.Duration) {
	if rm == nil {
		return
	}
	if i := code/100 - 1; i >= 0 && i < len(rm.requests) {
		rm.requests[i].Inc()
	}
	rm.duration.Observe(d.Seconds())
}

func (rm *routeMetrics) streamStarted() {
	if rm != nil {
		rm.activeStreams.Inc()
	}
}

func (rm *routeMetrics) streamDone() {
	if rm != nil {
		rm.activeStreams.Dec()
	}
}

func (rm *routeMetrics) backendError(kind string) {
	if rm == nil {
		return
	}
	switch kind {
	case kindUnreachable:
		rm.unreachable.Inc()
	case kindTimeout:
		rm.timeout.Inc()
	default:
		rm.other.Inc()
	}
}

// DeleteRoute drops a route's series once the route is gone from the
// configuration, so routes that come and go (through the admin API, say)
// do not pile up series. Requests still running on the old route keep
// counting into series that are no longer exported.
func (m *Metrics) DeleteRoute(listener, route string) {
	if m == nil {
		return
	}
	labels := prometheus.Labels{"listener": listener, "route": route}
	m.requests.DeletePartialMatch(labels)
	m.duration.DeletePartialMatch(labels)
	m.activeStreams.DeletePartialMatch(labels)
	m.backendErrors.DeletePartialMatch(labels)
}
