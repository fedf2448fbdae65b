package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"time"
)

// Options are what the flags say, unchecked: config.go judges them. They
// come in groups so that each subcommand registers the flags it uses and
// refuses the rest, instead of silently ignoring them.

// serveOptions are the flags of `rlsproxy serve`: every group.
type serveOptions struct {
	clientOptions
	upstreamOptions
	poolOptions
	issuerOptions
	tokenOptions
	leewayOptions
	policyOptions
	signingOptions
	guardOptions
	adminOptions
	logOptions
	configFile string
}

func (o *serveOptions) register(fs *flag.FlagSet) {
	o.registerProxy(fs)
	o.registerIssuer(fs)
	fs.StringVar(&o.configFile, "config", "", "YAML `file` of settings, keyed by flag name; flags and RLSPROXY_* variables win; SIGHUP reads it again")
}

// registerProxy registers serve's flags but the issuer's: `rlsproxy dev`
// runs the same proxy with an issuer of its own.
func (o *serveOptions) registerProxy(fs *flag.FlagSet) {
	o.registerClients(fs)
	o.registerUpstream(fs)
	o.registerPool(fs)
	o.registerTokenRules(fs)
	o.registerLeeway(fs)
	o.registerPolicy(fs)
	o.registerSigning(fs)
	o.registerGuard(fs)
	o.registerAdmin(fs)
	o.registerLog(fs)
}

// devOptions are the flags only `rlsproxy dev` has; it registers them next
// to serveOptions.registerProxy.
type devOptions struct {
	dir, issuerListen string
	ttl               time.Duration
}

func (o *devOptions) registerDev(fs *flag.FlagSet) {
	fs.StringVar(&o.dir, "dev-dir", defaultDevDir(), "`directory` holding the dev issuer's key")
	fs.StringVar(&o.issuerListen, "issuer-listen", "127.0.0.1:0", "loopback `address` of the dev issuer's JWKS")
	fs.DurationVar(&o.ttl, "ttl", time.Hour, "lifetime of the printed demo tokens")
}

// sqlOptions are the flags of `rlsproxy sql`: the names the SQL creates and
// grants, the key it stores, and the leeway its exp check allows.
type sqlOptions struct {
	upstreamOptions
	policyOptions
	signingOptions
	leewayOptions
	harden, transition bool
}

func (o *sqlOptions) register(fs *flag.FlagSet) {
	o.registerUpstream(fs)
	o.registerPolicy(fs)
	o.registerSigning(fs)
	o.registerLeeway(fs)
	fs.BoolVar(&o.harden, "harden", false, "include the hardening section (revoke TEMP, plpgsql, set_config, backend termination, pg_stat_activity)")
	fs.BoolVar(&o.transition, "transition", false, "with --signing-key-file: keep the --upstream login a member of the mapped roles, so proxies not yet restarted with the key keep working; run the SQL again without it once they are")
}

// checkOptions are the flags of `rlsproxy check`: how to log in, and the
// roles, settings and key the database is checked against.
type checkOptions struct {
	upstreamOptions
	policyOptions
	signingOptions
}

func (o *checkOptions) register(fs *flag.FlagSet) {
	o.registerUpstream(fs)
	o.registerPolicy(fs)
	o.registerSigning(fs)
}

// clientOptions: how clients reach the proxy, and how long they may stay.
type clientOptions struct {
	listen, databases               string
	tlsCert, tlsKey                 string
	insecurePlaintext               bool
	maxClientConns                  int
	startupTimeout, shutdownTimeout time.Duration
	frameTimeout, clientIdleTimeout time.Duration
	relayLoops                      int
	peers                           string
	reusePort                       bool
}

func (o *clientOptions) registerClients(fs *flag.FlagSet) {
	fs.StringVar(&o.listen, "listen", "127.0.0.1:6432", "client listener `address`; a path starting with / is a unix socket directory (/dir or /dir:port); comma list for several")
	fs.StringVar(&o.databases, "databases", "", "comma `list` of databases a client may ask for, or *; default: the upstream's dbname")
	fs.StringVar(&o.tlsCert, "tls-cert", "", "certificate `file` (PEM) for client TLS")
	fs.StringVar(&o.tlsKey, "tls-key", "", "private key `file` (PEM) for client TLS")
	fs.BoolVar(&o.insecurePlaintext, "insecure-plaintext", false, "accept tokens over unencrypted connections from non-loopback peers")
	fs.IntVar(&o.maxClientConns, "max-client-conns", 1000, "client connections beyond this get SQLSTATE 53300")
	fs.DurationVar(&o.startupTimeout, "startup-timeout", 30*time.Second, "time a client has from connecting to a ready session")
	fs.DurationVar(&o.frameTimeout, "frame-timeout", time.Minute, "a client that starts a message and sends nothing more of it for this long is disconnected (08P01); negative: never")
	fs.DurationVar(&o.clientIdleTimeout, "client-idle-timeout", 0, "a client that sends nothing for this long while nothing is owed to it is disconnected (57P05); 0: never")
	fs.DurationVar(&o.shutdownTimeout, "shutdown-timeout", 30*time.Second, "on SIGTERM, time sessions have to finish before they are ended")
	fs.StringVar(&o.peers, "peers", "", "comma `list` of the other instances of this service (host:port; a DNS name resolving to several, as a Kubernetes headless Service does, counts for all): a CancelRequest for a session held elsewhere is forwarded to them")
	fs.BoolVar(&o.reusePort, "reuse-port", false, "listen with SO_REUSEPORT, so that several processes share the --listen port (Linux)")
	fs.IntVar(&o.relayLoops, "relay-loops", 0, "event loops relaying plaintext sessions; 0: one per two CPUs; -1: none, a goroutine pair per session (as TLS sessions always are)")
}

// upstreamOptions: the service login.
type upstreamOptions struct {
	upstream string
}

func (o *upstreamOptions) registerUpstream(fs *flag.FlagSet) {
	fs.StringVar(&o.upstream, "upstream", "", "libpq-style URL or keyword `DSN` of the service login (required)")
}

// poolOptions: upstream connections kept between client sessions.
type poolOptions struct {
	poolMode, sessionState           string
	poolSize, maxUpstreamConns       int
	poolWait, poolIdle, poolLifetime time.Duration
}

func (o *poolOptions) registerPool(fs *flag.FlagSet) {
	enumVar(fs, &o.poolMode, "pool-mode", "session", []string{"session", "transaction"}, "session: a client holds an upstream connection from login to logout; transaction: only during each transaction, installed with its identity (README, \"Transaction pooling\")")
	enumVar(fs, &o.sessionState, "session-state", "pin", []string{"pin", "refuse"}, "transaction mode: what to do with a statement that leaves state in its upstream connection (a session SET, LISTEN, a temporary table, ...; README, \"Transaction pooling\"): pin the client to that connection for the rest of its session, or refuse the statement")
	fs.IntVar(&o.poolSize, "pool-size", -1, "upstream connections kept idle per role, database and startup parameters between client sessions; -1: as many as --max-upstream-conns allows, or 20 without it (so that connect-per-query load reuses connections instead of churning); 0: no pooling")
	fs.IntVar(&o.maxUpstreamConns, "max-upstream-conns", 0, "upstream connections open at once; beyond it clients wait --pool-wait, then get 53300; 0: no bound")
	fs.DurationVar(&o.poolWait, "pool-wait", 5*time.Second, "how long a client waits for an upstream connection at --max-upstream-conns")
	fs.DurationVar(&o.poolIdle, "pool-idle-timeout", 10*time.Minute, "pooled connections idle for longer are closed; 0: never")
	fs.DurationVar(&o.poolLifetime, "pool-max-lifetime", time.Hour, "pooled connections older than this are closed when released; 0: never")
}

// issuerOptions: who issues the tokens, where its keys are, and which of
// its clients and audiences are accepted.
type issuerOptions struct {
	cognitoRegion, cognitoPool, issuer, jwksURL string
	jwksRefresh                                 time.Duration
	clientID, audience                          string
}

func (o *issuerOptions) registerIssuer(fs *flag.FlagSet) {
	fs.StringVar(&o.cognitoRegion, "cognito-region", "", "AWS `region` of the Cognito user pool")
	fs.StringVar(&o.cognitoPool, "cognito-user-pool-id", "", "Cognito user pool `id`, e.g. eu-west-1_AbCdEf123")
	fs.StringVar(&o.issuer, "issuer", "", "issuer `URL` of any OIDC provider (http only for loopback)")
	fs.StringVar(&o.jwksURL, "jwks-url", "", "JWKS `URL`; default: Cognito's <issuer>/.well-known/jwks.json, for other issuers the jwks_uri of their OIDC discovery document (<issuer>/.well-known/openid-configuration), or <issuer>/.well-known/jwks.json without one")
	fs.DurationVar(&o.jwksRefresh, "jwks-refresh", time.Hour, "how often the issuer's keys are refetched")
	fs.StringVar(&o.clientID, "client-id", "", "comma `list` of allowed app clients: client_id of access tokens, aud of id tokens")
	fs.StringVar(&o.audience, "audience", "", "comma `list` of accepted aud values, for issuers other than Cognito")
}

// tokenOptions: which tokens are accepted, how long they are remembered,
// and what their expiry does to a session.
type tokenOptions struct {
	tokenUse       string
	tokenCacheSize int
	onTokenExpiry  string
}

func (o *tokenOptions) registerTokenRules(fs *flag.FlagSet) {
	enumVar(fs, &o.tokenUse, "token-use", "access", []string{"access", "id", "any"}, "Cognito token_use accepted: access, id or any")
	fs.IntVar(&o.tokenCacheSize, "token-cache-size", 10000, "verified tokens remembered until they expire, so reconnects skip signature checks; -1: off")
	enumVar(fs, &o.onTokenExpiry, "on-token-expiry", "terminate", []string{"terminate", "ignore"}, "terminate: end the session when its token expires (after the running statement); ignore: keep it")
}

// leewayOptions stand alone because `rlsproxy sql` writes the leeway into
// the database's exp check without verifying any token itself.
type leewayOptions struct {
	leeway time.Duration
}

func (o *leewayOptions) registerLeeway(fs *flag.FlagSet) {
	fs.DurationVar(&o.leeway, "leeway", 30*time.Second, "clock skew allowed on exp, nbf and iat (at most 5m)")
}

// policyOptions: the roles a token maps to and the settings its claims go
// to; the proxy, `rlsproxy sql` and `rlsproxy check` must agree on them.
type policyOptions struct {
	role, roleClaim, roleMap, anonymousRole string
	claimsSetting, claimPrefix              string
}

func (o *policyOptions) registerPolicy(fs *flag.FlagSet) {
	fs.StringVar(&o.role, "role", "authenticated", "database `role` for a valid token with no mapped group")
	fs.StringVar(&o.roleClaim, "role-claim", "cognito:groups", "`claim` that selects the role (string or array)")
	fs.StringVar(&o.roleMap, "role-map", "", "`group=role,...`; the token's first mapped group wins")
	fs.StringVar(&o.anonymousRole, "anonymous-role", "", "`role` given without a token to clients whose user is anonymous; empty: off")
	fs.StringVar(&o.claimsSetting, "claims-setting", "request.jwt.claims", "`setting` that receives the whole claim set as JSON; empty: off")
	fs.StringVar(&o.claimPrefix, "claim-prefix", "jwt.claims.", "`prefix` of one setting per top-level claim; empty: off")
}

type signingOptions struct {
	signingKeyFile string
}

func (o *signingOptions) registerSigning(fs *flag.FlagSet) {
	fs.StringVar(&o.signingKeyFile, "signing-key-file", "", "`file` holding the secret (>= 32 bytes) that signs the claims; `rlsproxy sql --signing-key-file` provisions it in the database")
}

type guardOptions struct {
	guard                           string
	guardAllowCode                  bool
	guardParsers, guardParserMemory int
}

func (o *guardOptions) registerGuard(fs *flag.FlagSet) {
	enumVar(fs, &o.guard, "guard", "on", []string{"on", "off"}, "on: refuse SQL that could change the session's identity or run hidden code; off: forward everything")
	fs.BoolVar(&o.guardAllowCode, "guard-allow-code", false, "let through code the guard cannot see into (DO blocks, functions, triggers, rules: Sequelize, migrations); needs --signing-key-file, with which the database keeps each session in its role and verifies its claims")
	fs.IntVar(&o.guardParsers, "guard-parsers", 2, "helper processes that parse statements over 4 KB for the guard: how many such statements are checked at once")
	fs.IntVar(&o.guardParserMemory, "guard-parser-memory", 1024, "memory limit of each guard parser process, in MiB; a statement whose parse needs more is refused (54000)")
}

type adminOptions struct {
	adminListen string
	pprof       bool
}

func (o *adminOptions) registerAdmin(fs *flag.FlagSet) {
	fs.StringVar(&o.adminListen, "admin-listen", "127.0.0.1:9187", "`address` of /metrics, /healthz and /readyz; empty: off")
	fs.BoolVar(&o.pprof, "pprof", false, "serve the Go profiler at /debug/pprof/ on --admin-listen")
}

type logOptions struct {
	logFormat, logLevel string
	// level is the logger's, which a reload changes; set by logger.
	level *slog.LevelVar
}

func (o *logOptions) registerLog(fs *flag.FlagSet) {
	enumVar(fs, &o.logFormat, "log-format", "text", []string{"text", "json"}, "text or json")
	enumVar(fs, &o.logLevel, "log-level", "info", []string{"debug", "info", "warn", "error"}, "debug, info, warn or error")
}

// enumFlag is a string flag with a fixed set of values, so that a typo
// fails while the flags are parsed (from the command line or from
// RLSPROXY_*) instead of when the value is first used.
type enumFlag struct {
	value   *string
	allowed []string
}

// enumVar defines an enum flag stored in *p, as fs.StringVar does.
func enumVar(fs *flag.FlagSet, p *string, name, value string, allowed []string, usage string) {
	*p = value
	fs.Var(enumFlag{value: p, allowed: allowed}, name, usage)
}

func (e enumFlag) String() string {
	if e.value == nil { // the zero value the flag package makes to find defaults
		return ""
	}
	return *e.value
}

func (e enumFlag) Set(s string) error {
	if !slices.Contains(e.allowed, s) {
		return fmt.Errorf("must be %s", oneOf(e.allowed))
	}
	*e.value = s
	return nil
}

// oneOf lists choices for a person: "a or b", "a, b or c".
func oneOf(choices []string) string {
	if len(choices) < 2 {
		return strings.Join(choices, "")
	}
	return strings.Join(choices[:len(choices)-1], ", ") + " or " + choices[len(choices)-1]
}

// parseFlags parses args into fs; every flag not given on the command line is
// then read from RLSPROXY_<FLAG> (upper case, dashes as underscores). Only
// the flags fs defines are read, so a variable meant for another subcommand
// is ignored rather than refused.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%s takes no arguments, only flags: %q", fs.Name(), fs.Arg(0))
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] || err != nil {
			return
		}
		env := envName(f.Name)
		if v, ok := os.LookupEnv(env); ok {
			given[f.Name] = true
			if e := fs.Set(f.Name, v); e != nil {
				// The same shape as the flag package's own message, so a
				// value is reported alike wherever it came from.
				err = fmt.Errorf("%s: invalid value %q for flag -%s: %w", env, v, f.Name, e)
			}
		}
	})
	if err != nil {
		return err
	}
	return applyConfigFile(fs, given)
}

// envName is the environment variable of a flag.
func envName(flag string) string {
	return "RLSPROXY_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
