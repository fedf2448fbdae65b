package proxy

import (
	"context"
	"net/http"
	httppprof "net/http/pprof"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// AdminHandler serves /metrics, /healthz (the process is alive) and /readyz
// (keys are loaded and the upstream accepts the service login), and with
// pprof set the Go profiler under /debug/pprof/.
func (s *Server) AdminHandler(reg *prometheus.Registry, pprof bool) http.Handler {
	mux := http.NewServeMux()
	if pprof {
		mux.HandleFunc("/debug/pprof/", httppprof.Index)
		mux.HandleFunc("/debug/pprof/profile", httppprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", httppprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", httppprof.Trace)
	}
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	ready := &readiness{s: s}
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		if msg := ready.check(r.Context()); msg != "" {
			http.Error(w, msg, http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	return mux
}

// readiness caches the upstream check briefly, so that a probe every second
// does not cost the database a login every second.
type readiness struct {
	s       *Server
	mu      sync.Mutex
	checked time.Time
	err     error
}

func (r *readiness) check(ctx context.Context) string {
	if !r.s.cfg.Verifier.Ready(ctx) {
		return "not ready: the issuer's keys are not loaded\n"
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if time.Since(r.checked) > 5*time.Second {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		r.err = r.s.cfg.Pool.Ping(ctx)
		cancel()
		r.checked = time.Now()
	}
	if r.err != nil {
		return "not ready: upstream: " + r.err.Error() + "\n"
	}
	return ""
}
