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
	guardRejections  *prometheus.CounterVec
	tokenCache       *prometheus.CounterVec
	// Transaction pooling.
	poolWait   prometheus.Histogram
	txInstalls *prometheus.CounterVec
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
		cancelsForwarded: f.NewCounter(prometheus.CounterOpts{Name: "rlsproxy_cancel_requests_forwarded_total",
			Help: "CancelRequests that matched a session and were sent upstream."}),
		poolWait: f.NewHistogram(prometheus.HistogramOpts{Name: "rlsproxy_pool_wait_seconds",
			Help:    "Time a transaction-pooled client waited for an upstream connection.",
			Buckets: prometheus.ExponentialBuckets(0.00005, 4, 12)}),
		txInstalls: f.NewCounterVec(prometheus.CounterOpts{Name: "rlsproxy_transaction_connections_total",
			Help: "Upstream connections handed to transaction-pooled clients, by whether the client's identity had to be installed (install) or was installed already (same_identity)."}, []string{"identity"}),
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
}
