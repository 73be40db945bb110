package reload

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	reloads     *prometheus.CounterVec
	lastOK      prometheus.Gauge
	lastSuccess prometheus.Gauge
	info        *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "portcullis", Name: "config_reloads_total",
			Help: "Configuration reload attempts by result (success, failure, unchanged).",
		}, []string{"result"}),
		lastOK: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "portcullis", Name: "config_last_reload_successful",
			Help: "1 if the last reload attempt succeeded (or found nothing to change), 0 if it failed.",
		}),
		lastSuccess: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "portcullis", Name: "config_last_reload_success_timestamp_seconds",
			Help: "Unix time of the last successful reload.",
		}),
		info: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "portcullis", Name: "config_info",
			Help: "Always 1; the hash label identifies the configuration file now serving.",
		}, []string{"hash"}),
	}
	// Every result is exported from the start, at 0: a series that first
	// appears at 1 is invisible to increase() and rate(), so an alert on
	// failed reloads would miss the first failure after every restart.
	for _, result := range []string{"success", "failure", "unchanged"} {
		m.reloads.WithLabelValues(result)
	}
	reg.MustRegister(m.reloads, m.lastOK, m.lastSuccess, m.info)
	return m
}
