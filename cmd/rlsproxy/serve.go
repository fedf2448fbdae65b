package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
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
	fs := flag.NewFlagSet("rlsproxy serve", flag.ContinueOnError)
	var o serveOptions
	o.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	log, err := newLogger(o.logFormat, o.logLevel)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return runProxy(ctx, &o, log, nil)
}

// runProxy builds the proxy from o and serves until ctx is done, then drains.
// ready, if set, is called once the listeners are open.
func runProxy(ctx context.Context, o *serveOptions, log *slog.Logger, ready func(addrs []net.Addr)) error {
	if o.upstream == "" {
		return errors.New("--upstream is required: the DSN of the service login, e.g. postgres://authenticator:secret@db:5432/app")
	}
	var signer *session.Signer
	if o.signingKeyFile != "" {
		var err error
		if signer, err = session.LoadSigner(o.signingKeyFile); err != nil {
			return err
		}
	}
	dialer, err := session.NewDialer(o.upstream, signer)
	if err != nil {
		return err
	}
	policy, err := o.policy()
	if err != nil {
		return err
	}
	var sqlGuard *guard.Guard
	switch o.guard {
	case "on":
		sqlGuard = guard.New(policy, 10000)
		if err := sqlGuard.IsolateParsing(guard.ParseLimits{Helpers: o.guardParsers, Memory: uint64(o.guardParserMemory) << 20}); err != nil {
			return err
		}
		defer sqlGuard.Close()
	case "off":
		log.Warn("--guard off: clients can change their role and claims with SQL; only signed claims (--signing-key-file) and the database's privileges protect identity")
	default:
		return fmt.Errorf("--guard must be on or off, not %q", o.guard)
	}
	var terminate bool
	switch o.onTokenExpiry {
	case "terminate":
		terminate = true
	case "ignore":
	default:
		return fmt.Errorf("--on-token-expiry must be terminate or ignore, not %q", o.onTokenExpiry)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := proxy.NewMetrics(reg)

	issuer := o.issuer
	cognito := false
	switch {
	case o.cognitoRegion != "" || o.cognitoPool != "":
		if o.cognitoRegion == "" || o.cognitoPool == "" || o.issuer != "" {
			return errors.New("give --cognito-region with --cognito-user-pool-id, or --issuer, not both")
		}
		issuer, cognito = auth.CognitoIssuer(o.cognitoRegion, o.cognitoPool), true
	default:
		cognito = auth.IsCognitoIssuer(issuer)
	}
	vctx, cancelVerifier := context.WithCancel(context.Background())
	defer cancelVerifier()
	verifier, err := auth.New(vctx, auth.Config{
		Rules: auth.Rules{
			Issuer: issuer, Cognito: cognito, TokenUse: o.tokenUse,
			ClientIDs: splitList(o.clientID), Audiences: splitList(o.audience), Leeway: o.leeway,
		},
		JWKSURL:         o.jwksURL,
		RefreshInterval: o.jwksRefresh,
		OnFetch:         metrics.JWKSFetched,
		CacheSize:       o.tokenCacheSize,
		OnCacheLookup:   metrics.TokenCacheLookup,
	})
	if err != nil {
		return err
	}
	if !cognito && o.clientID == "" && o.audience == "" {
		log.Warn("no --audience or --client-id: tokens issued to any client of the issuer are accepted", "issuer", issuer)
	}

	var tlsConfig *tls.Config
	if o.tlsCert != "" || o.tlsKey != "" {
		cert, err := tls.LoadX509KeyPair(o.tlsCert, o.tlsKey)
		if err != nil {
			return fmt.Errorf("--tls-cert/--tls-key: %w", err)
		}
		tlsConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}

	pool := session.NewPool(dialer, policy, session.PoolConfig{
		Size: o.poolSize, MaxConns: o.maxUpstreamConns, WaitTimeout: o.poolWait,
		IdleTimeout: o.poolIdle, MaxLifetime: o.poolLifetime,
	})
	srv, err := proxy.New(proxy.Config{
		Verifier: verifier, Pool: pool, Guard: sqlGuard,
		Databases: splitList(o.databases), TLS: tlsConfig, InsecurePlaintext: o.insecurePlaintext,
		MaxClientConns: o.maxClientConns, StartupTimeout: o.startupTimeout, TerminateOnExpiry: terminate, ExpiryLeeway: o.leeway,
		RelayLoops: o.relayLoops,
		Logger:     log, Metrics: metrics,
	})
	if err != nil {
		return err
	}

	var listeners []net.Listener
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	for _, addr := range splitList(o.listen) {
		l, err := proxy.Listen(addr)
		if err != nil {
			return fmt.Errorf("--listen %s: %w", addr, err)
		}
		listeners = append(listeners, l)
	}
	if len(listeners) == 0 {
		return errors.New("--listen is empty")
	}

	errc := make(chan error, len(listeners)+1)
	var admin *http.Server
	if o.adminListen != "" {
		al, err := net.Listen("tcp", o.adminListen)
		if err != nil {
			return fmt.Errorf("--admin-listen %s: %w", o.adminListen, err)
		}
		admin = &http.Server{Handler: srv.AdminHandler(reg, o.pprof), ReadHeaderTimeout: 10 * time.Second}
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
		log.Info("listening", "addr", l.Addr().String(), "issuer", issuer, "upstream_user", dialer.User(), "upstream_database", dialer.Database())
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
	log.Info("shutting down: no new connections; draining sessions", "deadline", o.shutdownTimeout)
	sctx, cancel := context.WithTimeout(context.Background(), o.shutdownTimeout)
	defer cancel()
	srv.Shutdown(sctx)
	if admin != nil {
		_ = admin.Shutdown(sctx)
	}
	log.Info("stopped")
	return nil
}

func newLogger(format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format must be text or json, not %q", format)
}
