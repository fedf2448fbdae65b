package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/rlsproxy/rlsproxy/auth"
	"github.com/rlsproxy/rlsproxy/guard"
	"github.com/rlsproxy/rlsproxy/proxy"
	"github.com/rlsproxy/rlsproxy/session"
)

func cmdServe(args []string) error {
	build := serveBuilder(args)
	cfg, log, err := build(false)
	if err != nil {
		return err
	}
	cfg.reread = func() (*serveConfig, error) {
		next, _, err := build(true)
		return next, err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return runProxy(ctx, cfg, log, nil)
}

// serveBuilder returns what builds serve's configuration from args, the
// environment and --config: at start, and again on SIGHUP (quiet: flag
// errors are not printed). The logger is made by the first build.
func serveBuilder(args []string) func(quiet bool) (*serveConfig, *slog.Logger, error) {
	var log *slog.Logger
	return func(quiet bool) (*serveConfig, *slog.Logger, error) {
		fs := flag.NewFlagSet("rlsproxy serve", flag.ContinueOnError)
		if quiet {
			fs.SetOutput(io.Discard)
		}
		var o serveOptions
		o.register(fs)
		if err := parseFlags(fs, args); err != nil {
			return nil, log, err
		}
		if log == nil {
			log = o.logger(os.Stderr)
		} else {
			// A reload: the level the file or environment give now.
			o.level = new(slog.LevelVar)
			o.level.Set(logLevels[o.logLevel])
		}
		cfg, err := o.config(log, nil)
		if err != nil {
			return nil, log, err
		}
		cfg.flags = map[string]string{}
		fs.VisitAll(func(f *flag.Flag) { cfg.flags[f.Name] = f.Value.String() })
		cfg.level = o.level
		return cfg, log, nil
	}
}

// runProxy builds the proxy cfg describes and serves until ctx is done, then
// drains. ready, if set, is called once the listeners are open. Every error
// here comes from the world (a port taken, a helper that cannot start), not
// from a flag: config has judged those.
func runProxy(ctx context.Context, cfg *serveConfig, log *slog.Logger, ready func(addrs []net.Addr)) error {
	// SIGHUP must not end the proxy from here on; what it reloads needs the
	// server and the pool (set once they exist).
	live := &liveConfig{cfg: cfg, log: log}
	defer onHangup(live)()
	var sqlGuard *guard.Guard
	if cfg.guard != nil {
		// What statements leave in the session: transaction pooling pins on
		// it, and session pooling keeps a connection without a reset when
		// a session left nothing.
		opts := []guard.Option{guard.TrackState}
		if cfg.guard.allowCode {
			opts = append(opts, guard.AllowCode)
		}
		if cfg.guard.noRules {
			opts = append(opts, guard.NoRules)
		}
		sqlGuard = guard.New(cfg.policy, cfg.guard.cacheSize, opts...)
		limits := cfg.guard.limits
		limits.Logger = log
		if err := sqlGuard.IsolateParsing(limits); err != nil {
			return err
		}
		defer sqlGuard.Close()
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := proxy.NewMetrics(reg)

	// The verifier outlives ctx: the drain after it is done still has
	// sessions in startup whose tokens need the keys.
	vctx, cancelVerifier := context.WithCancel(context.Background())
	defer cancelVerifier()
	newVerifier := func(c auth.Config) (*auth.Verifier, error) {
		c.OnFetch, c.OnCacheLookup = metrics.JWKSFetched, metrics.TokenCacheLookup
		c.Logger = log
		return auth.New(vctx, c)
	}
	first, err := newVerifier(cfg.auth)
	if err != nil {
		return err
	}
	verifier := &liveVerifier{}
	verifier.v.Store(first)

	pc := cfg.proxy
	pc.Verifier, pc.Guard, pc.Logger, pc.Metrics = verifier, sqlGuard, log, metrics
	pc.Pool = session.NewPool(cfg.dialer, cfg.policy, cfg.pool)
	proxy.RegisterPool(reg, pc.Pool)
	srv, err := proxy.New(pc)
	if err != nil {
		return err
	}
	live.set(srv, pc.Pool, verifier, newVerifier)

	var listeners []net.Listener
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	for _, addr := range cfg.listen {
		l, err := proxy.ListenReusePort(addr, cfg.reusePort)
		if err != nil {
			return fmt.Errorf("--listen %s: %w", addr, err)
		}
		listeners = append(listeners, l)
	}

	errc := make(chan error, len(listeners)+1)
	var admin *http.Server
	if cfg.admin != "" {
		al, err := net.Listen("tcp", cfg.admin)
		if err != nil {
			return fmt.Errorf("--admin-listen %s: %w", cfg.admin, err)
		}
		admin = &http.Server{Handler: srv.AdminHandler(reg, cfg.pprof), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := admin.Serve(al); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("admin listener: %w", err)
			}
		}()
		log.Info("admin listening", "addr", al.Addr().String())
	}
	var addrs []net.Addr
	for _, l := range listeners {
		go func(l net.Listener) { errc <- srv.Serve(ctx, l) }(l)
		addrs = append(addrs, l.Addr())
		log.Info("listening", "addr", l.Addr().String(), "issuer", cfg.auth.Issuer, "upstream_user", cfg.dialer.User(), "upstream_database", cfg.dialer.Database())
	}
	if ready != nil {
		ready(addrs)
	}

	select {
	case <-ctx.Done():
	case err := <-errc:
		if err != nil {
			log.Error("listener failed", "error", err)
		}
	}
	deadline := live.shutdownTimeout()
	log.Info("shutting down: no new connections; draining sessions", "deadline", deadline)
	sctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	srv.Shutdown(sctx)
	if admin != nil {
		_ = admin.Shutdown(sctx)
	}
	log.Info("stopped")
	return nil
}
