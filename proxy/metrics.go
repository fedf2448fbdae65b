package proxy

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"

	"github.com/rlsproxy/rlsproxy/session"
)

// Metrics are the proxy's Prometheus series. They are registered on the
// registry passed to NewMetrics, never on a global one.
type Metrics struct {
	clientsCurrent   prometheus.Gauge
	clientsTotal     prometheus.Counter
	auth             *prometheus.CounterVec
	upstreamConnect  prometheus.Histogram
	bytes            *prometheus.CounterVec
	bytesUp          prometheus.Counter
	bytesDown        prometheus.Counter
	sessionsEnded    *prometheus.CounterVec
	JWKSFetches      *prometheus.CounterVec
	cancelsForwarded prometheus.Counter
	cancelsToPeers   prometheus.Counter
	guardRejections  *prometheus.CounterVec
	tokenCache       *prometheus.CounterVec
	// Transaction pooling.
	poolWait   prometheus.Histogram
	pinned     *prometheus.CounterVec
	reprepared prometheus.Counter
}

// NewMetrics registers the series on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	f := promauto.With(reg)
	m := &Metrics{
		clientsCurrent: f.NewGauge(prometheus.GaugeOpts{Name: "rlsproxy_client_connections",
			Help: "Client connections open now."}),
		clientsTotal: f.NewCounter(prometheus.CounterOpts{Name: "rlsproxy_client_connections_total",
			Help: "Client connections accepted."}),
		auth: f.NewCounterVec(prometheus.CounterOpts{Name: "rlsproxy_authentications_total",
			Help: "Client authentications by result: ok, anonymous, or the reason of the rejection."}, []string{"result"}),
		upstreamConnect: f.NewHistogram(prometheus.HistogramOpts{Name: "rlsproxy_upstream_connect_seconds",
			Help:    "Time to open an upstream session: connect, authenticate, install role and claims.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}),
		bytes: f.NewCounterVec(prometheus.CounterOpts{Name: "rlsproxy_relayed_bytes_total",
			Help: "Bytes relayed after startup, by direction."}, []string{"direction"}),
		sessionsEnded: f.NewCounterVec(prometheus.CounterOpts{Name: "rlsproxy_sessions_ended_total",
			Help: "Relayed sessions that ended, by reason."}, []string{"reason"}),
		JWKSFetches: f.NewCounterVec(prometheus.CounterOpts{Name: "rlsproxy_jwks_fetches_total",
			Help: "Fetches of the issuer's key set, by result."}, []string{"result"}),
		guardRejections: f.NewCounterVec(prometheus.CounterOpts{Name: "rlsproxy_guard_rejections_total",
			Help: "Client messages refused by the SQL guard, by rule."}, []string{"rule"}),
		tokenCache: f.NewCounterVec(prometheus.CounterOpts{Name: "rlsproxy_token_cache_lookups_total",
			Help: "Lookups of verified tokens in the cache, by result (hit skips signature verification)."}, []string{"result"}),
		cancelsToPeers: f.NewCounter(prometheus.CounterOpts{Name: "rlsproxy_cancel_requests_to_peers_total",
			Help: "CancelRequests for a session this instance does not hold, forwarded to its peers (--peers)."}),
		cancelsForwarded: f.NewCounter(prometheus.CounterOpts{Name: "rlsproxy_cancel_requests_forwarded_total",
			Help: "CancelRequests that matched a session and were sent upstream."}),
		poolWait: f.NewHistogram(prometheus.HistogramOpts{Name: "rlsproxy_pool_wait_seconds",
			Help:    "Time a transaction-pooled client waited for an upstream connection.",
			Buckets: prometheus.ExponentialBuckets(0.00005, 4, 12)}),
		pinned: f.NewCounterVec(prometheus.CounterOpts{Name: "rlsproxy_pinned_sessions_total",
			Help: "Transaction-pooled sessions pinned to their upstream connection, by reason."}, []string{"reason"}),
		reprepared: f.NewCounter(prometheus.CounterOpts{Name: "rlsproxy_statements_reprepared_total",
			Help: "Prepared statements a transaction-pooled client used on a connection that did not hold them, prepared there again."}),
	}
	m.bytesUp = m.bytes.WithLabelValues("client_to_server")
	m.bytesDown = m.bytes.WithLabelValues("server_to_client")
	return m
}

// JWKSFetched counts a key set fetch; pass it as auth.Config.OnFetch.
func (m *Metrics) JWKSFetched(ok bool) {
	if ok {
		m.JWKSFetches.WithLabelValues("ok").Inc()
	} else {
		m.JWKSFetches.WithLabelValues("error").Inc()
	}
}

// TokenCacheLookup counts a token cache lookup; pass it as
// auth.Config.OnCacheLookup.
func (m *Metrics) TokenCacheLookup(hit bool) {
	if hit {
		m.tokenCache.WithLabelValues("hit").Inc()
	} else {
		m.tokenCache.WithLabelValues("miss").Inc()
	}
}

// RegisterPool registers gauges of p's upstream connections on reg: how
// many are open and how many of them wait idle for the next session.
func RegisterPool(reg prometheus.Registerer, p *session.Pool) {
	f := promauto.With(reg)
	f.NewGaugeFunc(prometheus.GaugeOpts{Name: "rlsproxy_upstream_connections",
		Help: "Upstream connections open now, in use or idle in the pool."},
		func() float64 { open, _ := p.Stats(); return float64(open) })
	f.NewGaugeFunc(prometheus.GaugeOpts{Name: "rlsproxy_upstream_connections_idle",
		Help: "Upstream connections idle in the pool, kept for the next session of their role."},
		func() float64 { _, idle := p.Stats(); return float64(idle) })
	reg.MustRegister(poolCollector{p})
}

// poolCollector reads the pool's snapshot at each scrape: connections by
// role and database, clients waiting, and how connections were handed out
// and taken back.
type poolCollector struct{ p *session.Pool }

var (
	poolConnsDesc = prometheus.NewDesc("rlsproxy_pool_connections",
		"Upstream connections open, by role and database; in use = open - idle.", []string{"role", "database"}, nil)
	poolIdleDesc = prometheus.NewDesc("rlsproxy_pool_idle_connections",
		"Upstream connections idle in the pool, by role and database.", []string{"role", "database"}, nil)
	poolWaitingDesc = prometheus.NewDesc("rlsproxy_pool_waiting_clients",
		"Clients waiting for an upstream connection now.", nil, nil)
	poolHandedDesc = prometheus.NewDesc("rlsproxy_pool_checkouts_total",
		"Upstream connections handed to clients, by whether the client's identity was installed on them already (same_identity) or had to be (install).", []string{"identity"}, nil)
	poolReleasesDesc = prometheus.NewDesc("rlsproxy_pool_releases_total",
		"Upstream connections taken back into the pool, by whether they were reset (DISCARD ALL) first.", []string{"kind"}, nil)
)

func (c poolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{poolConnsDesc, poolIdleDesc, poolWaitingDesc, poolHandedDesc, poolReleasesDesc} {
		ch <- d
	}
}

func (c poolCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.p.Snapshot()
	for _, k := range s.ByKey {
		ch <- prometheus.MustNewConstMetric(poolConnsDesc, prometheus.GaugeValue, float64(k.Open), k.Role, k.Database)
		ch <- prometheus.MustNewConstMetric(poolIdleDesc, prometheus.GaugeValue, float64(k.Idle), k.Role, k.Database)
	}
	ch <- prometheus.MustNewConstMetric(poolWaitingDesc, prometheus.GaugeValue, float64(s.Waiting))
	ch <- prometheus.MustNewConstMetric(poolHandedDesc, prometheus.CounterValue, float64(s.IdentityHits), "same_identity")
	ch <- prometheus.MustNewConstMetric(poolHandedDesc, prometheus.CounterValue, float64(s.Installs), "install")
	ch <- prometheus.MustNewConstMetric(poolReleasesDesc, prometheus.CounterValue, float64(s.Resets), "reset")
	ch <- prometheus.MustNewConstMetric(poolReleasesDesc, prometheus.CounterValue, float64(s.ReusedWithoutReset), "without_reset")
}
