package main

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"time"

	"github.com/rlsproxy/rlsproxy/auth"
	"github.com/rlsproxy/rlsproxy/guard"
	"github.com/rlsproxy/rlsproxy/internal/dbsetup"
	"github.com/rlsproxy/rlsproxy/internal/devissuer"
	"github.com/rlsproxy/rlsproxy/internal/loopback"
	"github.com/rlsproxy/rlsproxy/proxy"
	"github.com/rlsproxy/rlsproxy/session"
)

// This file is the one place flag values are judged. Parsing (options.go)
// only fills in strings and numbers (enums excepted: they fail as they are
// parsed); wiring (serve.go, dev.go, sql.go, check.go) only builds what a
// config describes, and never finds a flag wrong.

// serveConfig is a checked serveOptions, in the packages' own types.
type serveConfig struct {
	listen          []string
	reusePort       bool
	admin           string // "": no admin listener
	pprof           bool
	shutdownTimeout time.Duration

	signer *session.Signer
	// dialer is nil only for `rlsproxy dev` without --upstream, which sets
	// it once it has started a database of its own.
	dialer *session.Dialer
	policy session.Policy
	pool   session.PoolConfig
	guard  *guardConfig // nil: --guard off
	// auth lacks the metrics callbacks, which exist once wired, and for
	// `rlsproxy dev` the issuer, whose URL is known once its port is open.
	auth auth.Config
	// proxy lacks what is built from the rest: Verifier, Pool, Guard,
	// Logger and Metrics.
	proxy proxy.Config

	dev *devOptions // nil for serve
	// certs is the TLS certificate, read again on SIGHUP; nil without TLS.
	certs *certReloader
	// reread builds the configuration again from the command line, the
	// environment and --config, for SIGHUP (nil for `rlsproxy dev`);
	// flags are the flag values this one was built from.
	reread func() (*serveConfig, error)
	flags  map[string]string
	level  *slog.LevelVar
}

type guardConfig struct {
	cacheSize int
	allowCode bool
	// noRules: --guard off under transaction pooling, where the guard only
	// tells what statements leave in the session.
	noRules bool
	limits  guard.ParseLimits
}

// guardCacheSize is not a flag: verdicts are small, and a text repeated
// often enough to matter fits many times over.
const guardCacheSize = 10000

// maxLeeway is auth's bound on --leeway, checked here as well because
// `rlsproxy sql` writes the leeway into the database without a verifier.
const maxLeeway = 5 * time.Minute

// warning is a setting that is valid but weakens what the proxy protects.
type warning struct {
	msg   string
	attrs []any
}

const upstreamRequired = "--upstream is required: the DSN of the service login, e.g. postgres://authenticator:secret@db:5432/app"

// config checks every flag of serve and turns them into the packages'
// configs. dev is nil for `rlsproxy serve`; for `rlsproxy dev` it holds dev's
// own flags, and the issuer (and, without --upstream, the database) are
// dev's to provide. Warnings go to log, and only for a config that is valid.
func (o *serveOptions) config(log *slog.Logger, dev *devOptions) (*serveConfig, error) {
	cfg := &serveConfig{admin: o.adminListen, pprof: o.pprof, shutdownTimeout: o.shutdownTimeout, dev: dev}
	var warnings []warning
	var err error

	if cfg.signer, err = o.signer(); err != nil {
		return nil, err
	}
	switch {
	case o.upstream != "":
		if cfg.dialer, err = session.NewDialer(o.upstream, cfg.signer); err != nil {
			return nil, err
		}
	case dev == nil:
		return nil, errors.New(upstreamRequired)
	}
	if cfg.policy, err = o.policy(); err != nil {
		return nil, err
	}

	leeway, err := o.validLeeway()
	if err != nil {
		return nil, err
	}
	rules := auth.Rules{TokenUse: o.tokenUse, Leeway: leeway}
	if dev != nil {
		if dev.dir == "" {
			return nil, errors.New("--dev-dir is empty")
		}
		host, _, err := net.SplitHostPort(dev.issuerListen)
		if err != nil {
			return nil, fmt.Errorf("--issuer-listen: %w", err)
		}
		if !loopback.Host(host) {
			return nil, fmt.Errorf("--issuer-listen %s must be a loopback address: the dev issuer serves its keys over plain http", dev.issuerListen)
		}
		if dev.ttl <= 0 {
			return nil, fmt.Errorf("--ttl must be positive, not %s", dev.ttl)
		}
		rules.ClientIDs = []string{devissuer.ClientID}
	} else {
		switch {
		case o.cognitoRegion != "" || o.cognitoPool != "":
			if o.cognitoRegion == "" || o.cognitoPool == "" || o.issuer != "" {
				return nil, errors.New("give --cognito-region with --cognito-user-pool-id, or --issuer, not both")
			}
			rules.Issuer, rules.Cognito = auth.CognitoIssuer(o.cognitoRegion, o.cognitoPool), true
		case o.issuer != "":
			// auth.New judges the URL itself (https, or http on loopback).
			rules.Issuer, rules.Cognito = o.issuer, auth.IsCognitoIssuer(o.issuer)
		default:
			return nil, errors.New("no issuer configured: set --cognito-region and --cognito-user-pool-id, or --issuer")
		}
		rules.ClientIDs, rules.Audiences = splitList(o.clientID), splitList(o.audience)
		switch {
		case rules.Cognito && len(rules.ClientIDs) == 0:
			return nil, errors.New("--client-id is required with a Cognito user pool: without it, tokens of every app client of the pool would be accepted")
		case !rules.Cognito && len(rules.ClientIDs) == 0 && len(rules.Audiences) == 0:
			warnings = append(warnings, warning{"no --audience or --client-id: tokens issued to any client of the issuer are accepted", []any{"issuer", rules.Issuer}})
		}
		if o.jwksRefresh <= 0 {
			return nil, fmt.Errorf("--jwks-refresh must be positive, not %s", o.jwksRefresh)
		}
	}
	cfg.auth = auth.Config{Rules: rules, JWKSURL: o.jwksURL, RefreshInterval: o.jwksRefresh, CacheSize: o.tokenCacheSize}

	// Numbers whose out-of-range values the packages would quietly replace
	// with a default or, worse, take literally.
	for _, c := range []struct {
		bad        bool
		flag, want string
		value      any
	}{
		{o.maxClientConns < 1, "max-client-conns", "at least 1", o.maxClientConns},
		{o.startupTimeout <= 0, "startup-timeout", "positive", o.startupTimeout},
		{o.shutdownTimeout < 0, "shutdown-timeout", "0 or more", o.shutdownTimeout},
		{o.relayLoops < -1, "relay-loops", "-1 (none), 0 (one per two CPUs) or more", o.relayLoops},
		{o.tokenCacheSize == 0 || o.tokenCacheSize < -1, "token-cache-size", "-1 (off) or at least 1", o.tokenCacheSize},
		{o.poolSize < -1, "pool-size", "-1 (auto), 0 (no pooling) or more", o.poolSize},
		{o.maxUpstreamConns < 0, "max-upstream-conns", "0 (no bound) or more", o.maxUpstreamConns},
		{o.poolWait <= 0, "pool-wait", "positive", o.poolWait},
		{o.poolIdle < 0, "pool-idle-timeout", "0 (never) or more", o.poolIdle},
		{o.poolLifetime < 0, "pool-max-lifetime", "0 (never) or more", o.poolLifetime},
		{o.guardParsers < 1, "guard-parsers", "at least 1", o.guardParsers},
		{o.guardParserMemory < 1, "guard-parser-memory", "at least 1 (MiB)", o.guardParserMemory},
	} {
		if c.bad {
			return nil, fmt.Errorf("--%s must be %s, not %v", c.flag, c.want, c.value)
		}
	}

	if o.guard == "on" {
		// Code the guard cannot see into is safe to let through only when
		// the database itself keeps the session in its role and verifies
		// its claims: one login per role, which a signing key brings
		// (`rlsproxy dev` without --upstream makes its own key).
		byDatabase := cfg.signer != nil || (dev != nil && o.upstream == "")
		if o.guardAllowCode && !byDatabase {
			return nil, errors.New("--guard-allow-code needs --signing-key-file: without it the service login can reach every mapped role, and only the guard keeps code from changing the session's role")
		}
		cfg.guard = &guardConfig{cacheSize: guardCacheSize, allowCode: o.guardAllowCode, limits: guard.ParseLimits{
			Helpers: o.guardParsers, Memory: uint64(o.guardParserMemory) << 20,
		}}
	} else {
		if o.guardAllowCode {
			return nil, errors.New("--guard-allow-code is for --guard on: with --guard off everything is let through already")
		}
		if o.poolMode == "transaction" {
			// No rule, but transaction pooling must still know what
			// statements leave in the session.
			cfg.guard = &guardConfig{cacheSize: guardCacheSize, noRules: true, limits: guard.ParseLimits{
				Helpers: o.guardParsers, Memory: uint64(o.guardParserMemory) << 20,
			}}
		}
		warnings = append(warnings, warning{msg: "--guard off: clients can change their role and claims with SQL; only signed claims (--signing-key-file) and the database's privileges protect identity"})
	}
	poolSize := o.poolSize
	if poolSize < 0 {
		poolSize = 20
		if o.maxUpstreamConns > 0 {
			poolSize = o.maxUpstreamConns
		}
	}
	cfg.pool = session.PoolConfig{
		Size: poolSize, MaxConns: o.maxUpstreamConns, WaitTimeout: o.poolWait,
		IdleTimeout: o.poolIdle, MaxLifetime: o.poolLifetime,
	}

	cfg.reusePort = o.reusePort
	for _, p := range splitList(o.peers) {
		if _, _, err := net.SplitHostPort(p); err != nil {
			return nil, fmt.Errorf("--peers entry %q is not host:port", p)
		}
	}
	if cfg.listen = splitList(o.listen); len(cfg.listen) == 0 {
		return nil, errors.New("--listen is empty: give at least one address, e.g. 127.0.0.1:6432")
	}
	var tlsConfig *tls.Config
	switch {
	case (o.tlsCert == "") != (o.tlsKey == ""):
		return nil, errors.New("give --tls-cert and --tls-key together")
	case o.tlsCert != "":
		certs, err := newCertReloader(o.tlsCert, o.tlsKey)
		if err != nil {
			return nil, err
		}
		cfg.certs = certs
		tlsConfig = &tls.Config{GetCertificate: certs.getCertificate, MinVersion: tls.VersionTLS12}
	}
	cfg.proxy = proxy.Config{
		Databases: splitList(o.databases), TLS: tlsConfig, InsecurePlaintext: o.insecurePlaintext,
		MaxClientConns: o.maxClientConns, StartupTimeout: o.startupTimeout,
		TerminateOnExpiry: o.onTokenExpiry == "terminate", ExpiryLeeway: leeway,
		RelayLoops: o.relayLoops, Peers: splitList(o.peers),
		FrameTimeout: o.frameTimeout, ClientIdleTimeout: o.clientIdleTimeout,
	}
	if o.poolMode == "transaction" {
		cfg.proxy.PoolMode = proxy.TransactionPooling
		cfg.proxy.RefuseSessionState = o.sessionState == "refuse"
	}
	if o.pprof && o.adminListen == "" {
		return nil, errors.New("--pprof is served on --admin-listen, which is empty")
	}

	for _, w := range warnings {
		log.Warn(w.msg, w.attrs...)
	}
	return cfg, nil
}

// config checks sql's flags; the SQL names the roles of the policy, the
// login of --upstream and stores the key of --signing-key-file.
func (o *sqlOptions) config() (dbsetup.BootstrapOptions, error) {
	opts := dbsetup.BootstrapOptions{Harden: o.harden, Transition: o.transition}
	var err error
	if opts.Policy, err = o.policy(); err != nil {
		return opts, err
	}
	if opts.Leeway, err = o.validLeeway(); err != nil {
		return opts, err
	}
	if opts.Signer, err = o.signer(); err != nil {
		return opts, err
	}
	if o.transition && opts.Signer == nil {
		return opts, errors.New("--transition is about the per-role logins of --signing-key-file, which is not given")
	}
	if o.upstream != "" { // else the SQL names a default login role
		d, err := session.NewDialer(o.upstream, nil)
		if err != nil {
			return opts, err
		}
		opts.Login, opts.Database = d.User(), d.Database()
	}
	return opts, nil
}

// config checks check's flags. The dialer is serve's, connect timeout
// included, so check connects exactly as the proxy would.
func (o *checkOptions) config() (dbsetup.CheckOptions, error) {
	if o.upstream == "" {
		return dbsetup.CheckOptions{}, errors.New(upstreamRequired)
	}
	policy, err := o.policy()
	if err != nil {
		return dbsetup.CheckOptions{}, err
	}
	signer, err := o.signer()
	if err != nil {
		return dbsetup.CheckOptions{}, err
	}
	dialer, err := session.NewDialer(o.upstream, signer)
	if err != nil {
		return dbsetup.CheckOptions{}, err
	}
	return dbsetup.CheckOptions{Policy: policy, Login: dialer.User(), Signer: signer, Connect: dialer.Connect, ConnectAs: dialer.ConnectAs}, nil
}

// policy is shared by serve, sql and check: the database must be set up for
// exactly the roles and settings the proxy uses.
func (o *policyOptions) policy() (session.Policy, error) {
	roleMap, err := session.ParseRoleMap(o.roleMap)
	if err != nil {
		return session.Policy{}, err
	}
	p := session.Policy{
		DefaultRole: o.role, RoleClaim: o.roleClaim, RoleMap: roleMap, AnonymousRole: o.anonymousRole,
		ClaimsSetting: o.claimsSetting, ClaimPrefix: o.claimPrefix,
	}
	return p, p.Validate()
}

// signer is nil without --signing-key-file: claims go unsigned.
func (o *signingOptions) signer() (*session.Signer, error) {
	if o.signingKeyFile == "" {
		return nil, nil
	}
	return session.LoadSigner(o.signingKeyFile)
}

func (o *leewayOptions) validLeeway() (time.Duration, error) {
	if o.leeway < 0 || o.leeway > maxLeeway {
		return 0, fmt.Errorf("--leeway must be between 0 and %s, not %s: it only absorbs clock skew", maxLeeway, o.leeway)
	}
	return o.leeway, nil
}

// logger needs no check: both flags are enums.
var logLevels = map[string]slog.Level{"debug": slog.LevelDebug, "info": slog.LevelInfo, "warn": slog.LevelWarn, "error": slog.LevelError}

func (o *logOptions) logger(w io.Writer) *slog.Logger {
	o.level = new(slog.LevelVar)
	o.level.Set(logLevels[o.logLevel])
	opts := &slog.HandlerOptions{Level: o.level}
	if o.logFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
