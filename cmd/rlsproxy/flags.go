package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/rlsproxy/rlsproxy/session"
)

// parseFlags parses args into fs; every flag not given on the command line is
// then read from RLSPROXY_<FLAG> (upper case, dashes as underscores).
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] || err != nil {
			return
		}
		env := "RLSPROXY_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(env); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s: %w", env, e)
			}
		}
	})
	return err
}

// serveOptions are the flags of `rlsproxy serve`, shared by `rlsproxy dev`.
type serveOptions struct {
	listen, upstream, databases                 string
	cognitoRegion, cognitoPool, issuer, jwksURL string
	clientID, audience, tokenUse                string
	leeway                                      time.Duration
	role, roleClaim, roleMap, anonymousRole     string
	claimsSetting, claimPrefix                  string
	tlsCert, tlsKey                             string
	insecurePlaintext                           bool
	adminListen                                 string
	maxClientConns                              int
	onTokenExpiry                               string
	logFormat, logLevel                         string
	startupTimeout, shutdownTimeout             time.Duration
	jwksRefresh                                 time.Duration
	guard, signingKeyFile                       string
	guardParsers, guardParserMemory             int
	tokenCacheSize                              int
	pprof                                       bool
	poolSize, maxUpstreamConns                  int
	relayLoops                                  int
	poolWait, poolIdle, poolLifetime            time.Duration
}

func (o *serveOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&o.listen, "listen", "127.0.0.1:6432", "client listener `address`; a path starting with / is a unix socket directory (/dir or /dir:port); comma list for several")
	fs.StringVar(&o.upstream, "upstream", "", "libpq-style URL or keyword `DSN` of the service login (required)")
	fs.StringVar(&o.databases, "databases", "", "comma `list` of databases a client may ask for, or *; default: the upstream's dbname")
	fs.StringVar(&o.cognitoRegion, "cognito-region", "", "AWS `region` of the Cognito user pool")
	fs.StringVar(&o.cognitoPool, "cognito-user-pool-id", "", "Cognito user pool `id`, e.g. eu-west-1_AbCdEf123")
	fs.StringVar(&o.issuer, "issuer", "", "issuer `URL` of any OIDC provider (http only for loopback)")
	fs.StringVar(&o.jwksURL, "jwks-url", "", "JWKS `URL`; default <issuer>/.well-known/jwks.json")
	fs.StringVar(&o.clientID, "client-id", "", "comma `list` of allowed app clients: client_id of access tokens, aud of id tokens")
	fs.StringVar(&o.audience, "audience", "", "comma `list` of accepted aud values, for issuers other than Cognito")
	fs.StringVar(&o.tokenUse, "token-use", "access", "Cognito token_use accepted: access, id or any")
	fs.DurationVar(&o.leeway, "leeway", 30*time.Second, "clock skew allowed on exp, nbf and iat")
	fs.StringVar(&o.role, "role", "authenticated", "database `role` for a valid token with no mapped group")
	fs.StringVar(&o.roleClaim, "role-claim", "cognito:groups", "`claim` that selects the role (string or array)")
	fs.StringVar(&o.roleMap, "role-map", "", "`group=role,...`; the token's first mapped group wins")
	fs.StringVar(&o.anonymousRole, "anonymous-role", "", "`role` given without a token to clients whose user is anonymous; empty: off")
	fs.StringVar(&o.claimsSetting, "claims-setting", "request.jwt.claims", "`setting` that receives the whole claim set as JSON; empty: off")
	fs.StringVar(&o.claimPrefix, "claim-prefix", "jwt.claims.", "`prefix` of one setting per top-level claim; empty: off")
	fs.StringVar(&o.tlsCert, "tls-cert", "", "certificate `file` (PEM) for client TLS")
	fs.StringVar(&o.tlsKey, "tls-key", "", "private key `file` (PEM) for client TLS")
	fs.BoolVar(&o.insecurePlaintext, "insecure-plaintext", false, "accept tokens over unencrypted connections from non-loopback peers")
	fs.StringVar(&o.adminListen, "admin-listen", "127.0.0.1:9187", "`address` of /metrics, /healthz and /readyz; empty: off")
	fs.IntVar(&o.maxClientConns, "max-client-conns", 1000, "client connections beyond this get SQLSTATE 53300")
	fs.StringVar(&o.onTokenExpiry, "on-token-expiry", "terminate", "terminate: end the session when its token expires (after the running statement); ignore: keep it")
	fs.StringVar(&o.logFormat, "log-format", "text", "text or json")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.DurationVar(&o.startupTimeout, "startup-timeout", 30*time.Second, "time a client has from connecting to a ready session")
	fs.DurationVar(&o.shutdownTimeout, "shutdown-timeout", 30*time.Second, "on SIGTERM, time sessions have to finish before they are ended")
	fs.DurationVar(&o.jwksRefresh, "jwks-refresh", time.Hour, "how often the issuer's keys are refetched")
	fs.IntVar(&o.relayLoops, "relay-loops", 0, "event loops relaying plaintext sessions; 0: one per two CPUs; -1: none, a goroutine pair per session (as TLS sessions always are)")
	fs.IntVar(&o.poolSize, "pool-size", 20, "upstream connections kept per database between client sessions (reset and proved clean); 0: no pooling")
	fs.IntVar(&o.maxUpstreamConns, "max-upstream-conns", 0, "upstream connections open at once; beyond it clients wait --pool-wait, then get 53300; 0: no bound")
	fs.DurationVar(&o.poolWait, "pool-wait", 5*time.Second, "how long a client waits for an upstream connection at --max-upstream-conns")
	fs.DurationVar(&o.poolIdle, "pool-idle-timeout", 10*time.Minute, "pooled connections idle for longer are closed")
	fs.DurationVar(&o.poolLifetime, "pool-max-lifetime", time.Hour, "pooled connections older than this are closed when released")
	fs.BoolVar(&o.pprof, "pprof", false, "serve the Go profiler at /debug/pprof/ on --admin-listen")
	fs.IntVar(&o.tokenCacheSize, "token-cache-size", 10000, "verified tokens remembered until they expire, so reconnects skip signature checks; -1: off")
	fs.StringVar(&o.guard, "guard", "on", "on: refuse SQL that could change the session's identity or run hidden code; off: forward everything")
	fs.IntVar(&o.guardParsers, "guard-parsers", 2, "helper processes that parse statements over 4 KB for the guard: how many such statements are checked at once")
	fs.IntVar(&o.guardParserMemory, "guard-parser-memory", 1024, "memory limit of each guard parser process, in MiB; a statement whose parse needs more is refused (54000)")
	fs.StringVar(&o.signingKeyFile, "signing-key-file", "", "`file` holding the secret (>= 32 bytes) that signs the claims; `rlsproxy sql --signing-key-file` provisions it in the database")
}

// policy builds the session policy from the role and claim flags.
func (o *serveOptions) policy() (session.Policy, error) {
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

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
