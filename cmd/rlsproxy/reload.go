package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rlsproxy/rlsproxy/auth"
	"github.com/rlsproxy/rlsproxy/proxy"
	"github.com/rlsproxy/rlsproxy/session"
)

// certReloader serves the TLS certificate of --tls-cert/--tls-key and reads
// the files again on reload, so that a certificate renewed on disk
// (cert-manager, certbot) is used by new sessions without a restart. A pair
// that does not load leaves the previous one in use.
type certReloader struct {
	certFile, keyFile string
	cert              atomic.Pointer[tls.Certificate]
}

func newCertReloader(certFile, keyFile string) (*certReloader, error) {
	c := &certReloader{certFile: certFile, keyFile: keyFile}
	if err := c.reload(); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *certReloader) reload() error {
	cert, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return fmt.Errorf("--tls-cert/--tls-key: %w", err)
	}
	c.cert.Store(&cert)
	return nil
}

func (c *certReloader) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return c.cert.Load(), nil
}

// liveVerifier is the verifier sessions check tokens with; a reload that
// changes the issuer or the token rules replaces it whole, so a login is
// judged entirely by the old rules or entirely by the new ones, and the new
// rules start with an empty token cache (a token the old rules accepted is
// judged again).
type liveVerifier struct {
	v atomic.Pointer[auth.Verifier]
}

func (l *liveVerifier) Verify(ctx context.Context, token string) (*auth.Identity, error) {
	return l.v.Load().Verify(ctx, token)
}

func (l *liveVerifier) Ready(ctx context.Context) bool { return l.v.Load().Ready(ctx) }

// liveConfig is the configuration a running proxy was built from, and the
// parts of it a reload can change without dropping a session.
type liveConfig struct {
	mu   sync.Mutex
	cfg  *serveConfig
	log  *slog.Logger
	srv  *proxy.Server
	pool *session.Pool
	// verifier and newVerifier are set with srv and pool: a reload builds the
	// new issuer's verifier with newVerifier (the proxy's metrics and
	// logger attached) and swaps it into verifier once its keys load.
	verifier    *liveVerifier
	newVerifier func(auth.Config) (*auth.Verifier, error)
	// keyWait bounds how long a reload waits for a new issuer's keys.
	keyWait time.Duration
}

// tokenFlags are the issuer and the token rules: a change of any builds a
// new verifier, which must load the issuer's keys before it replaces the
// running one, or the reload is refused whole.
var tokenFlags = map[string]bool{
	"cognito-region": true, "cognito-user-pool-id": true, "issuer": true, "jwks-url": true, "jwks-refresh": true,
	"client-id": true, "audience": true, "token-use": true, "leeway": true, "token-cache-size": true,
}

// defaultKeyWait is how long a reload waits for a new issuer's keys: a key
// fetch's own timeout, and a little more.
const defaultKeyWait = 15 * time.Second

// roleFlags are the policy's roles, which a reload applies to sessions
// that start after it.
var roleFlags = map[string]bool{"role": true, "role-map": true, "role-claim": true, "anonymous-role": true}

func (l *liveConfig) set(srv *proxy.Server, pool *session.Pool, v *liveVerifier, newVerifier func(auth.Config) (*auth.Verifier, error)) {
	l.mu.Lock()
	l.srv, l.pool, l.verifier, l.newVerifier = srv, pool, v, newVerifier
	l.mu.Unlock()
}

// reloadable are the flags a reload applies to the running proxy; a change
// of any other needs a restart, which the reload says.
var reloadable = map[string]bool{
	"tls-cert": true, "tls-key": true, "log-level": true,
	"frame-timeout": true, "client-idle-timeout": true,
	"pool-size": true, "max-upstream-conns": true, "pool-wait": true,
	"max-client-conns": true, "startup-timeout": true, "shutdown-timeout": true,
}

// reload reads the configuration again (the command line, the environment
// and --config) and applies what changed that can change live. A
// configuration that does not validate is refused whole: nothing of it is
// applied.
func (l *liveConfig) reload() {
	l.mu.Lock()
	defer l.mu.Unlock()
	old := l.cfg
	if old.reread == nil {
		// rlsproxy dev: the certificate only.
		l.reloadCerts(old.certs)
		return
	}
	next, err := old.reread()
	if err != nil {
		l.log.Error("SIGHUP: the configuration does not validate and is refused whole; the running one stays", "error", err)
		return
	}
	var applied, restart []string
	roles, tokens := false, false
	for name, v := range next.flags {
		if old.flags[name] == v {
			continue
		}
		switch {
		case reloadable[name]:
			applied = append(applied, name)
		case roleFlags[name] && l.pool != nil:
			roles = true
			applied = append(applied, name)
		case tokenFlags[name] && l.verifier != nil:
			tokens = true
			applied = append(applied, name)
		default:
			restart = append(restart, name)
		}
	}
	if tokens {
		// First, before anything of the reload applies: a new issuer whose
		// keys cannot be loaded would refuse every login.
		v, err := l.loadVerifier(next.auth)
		if err != nil {
			l.log.Error("SIGHUP: the new issuer or token rules are refused, and the configuration with them, whole; the running one stays", "error", err)
			return
		}
		l.verifier.v.Swap(v).Close()
		if l.srv != nil {
			l.srv.SetExpiryLeeway(next.auth.Leeway)
		}
	}
	if roles {
		// The roles only: the claim settings need a restart (the guard
		// protects them by name).
		p := l.pool.Policy()
		p.DefaultRole, p.RoleMap, p.RoleClaim, p.AnonymousRole = next.policy.DefaultRole, next.policy.RoleMap, next.policy.RoleClaim, next.policy.AnonymousRole
		l.pool.SetPolicy(p)
	}
	sort.Strings(applied)
	sort.Strings(restart)
	if l.srv != nil {
		l.srv.SetClientTimeouts(next.proxy.FrameTimeout, next.proxy.ClientIdleTimeout)
		l.srv.SetClientLimits(next.proxy.MaxClientConns, next.proxy.StartupTimeout)
	}
	old.shutdownTimeout = next.shutdownTimeout
	if l.pool != nil {
		l.pool.SetLimits(next.pool.Size, next.pool.MaxConns, next.pool.WaitTimeout)
	}
	if old.level != nil && next.level != nil {
		old.level.Set(next.level.Level())
	}
	switch {
	case old.certs != nil && next.certs != nil:
		old.certs.certFile, old.certs.keyFile = next.certs.certFile, next.certs.keyFile
		l.reloadCerts(old.certs)
	case (old.certs == nil) != (next.certs == nil):
		restart = append(restart, "tls-cert (turning TLS on or off)")
	}
	// What was applied is the running configuration now; what needs a
	// restart stays as it was started.
	for _, name := range applied {
		old.flags[name] = next.flags[name]
	}
	l.log.Info("SIGHUP: configuration reloaded; sessions carry on", "applied", applied, "needs_restart", restart)
}

// loadVerifier builds the verifier of c and waits for its keys.
func (l *liveConfig) loadVerifier(c auth.Config) (*auth.Verifier, error) {
	return l.loadVerifierWith(l.newVerifier, c)
}

func (l *liveConfig) loadVerifierWith(newVerifier func(auth.Config) (*auth.Verifier, error), c auth.Config) (*auth.Verifier, error) {
	v, err := newVerifier(c)
	if err != nil {
		return nil, err
	}
	wait := l.keyWait
	if wait <= 0 {
		wait = defaultKeyWait
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := v.Load(ctx); err != nil {
		v.Close()
		return nil, err
	}
	return v, nil
}

// shutdownTimeout is --shutdown-timeout as last reloaded.
func (l *liveConfig) shutdownTimeout() time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cfg.shutdownTimeout
}

func (l *liveConfig) reloadCerts(certs *certReloader) {
	if certs == nil {
		return
	}
	if err := certs.reload(); err != nil {
		l.log.Error("SIGHUP: the TLS certificate did not load; the previous one stays in use", "error", err)
		return
	}
	l.log.Info("SIGHUP: reloaded the TLS certificate and key", "cert", certs.certFile)
}

// onHangup handles SIGHUP, which systemctl reload, log rotation and a closed
// terminal send, until stop is called: it must not end the proxy (Go's
// default); it reloads the configuration.
func onHangup(l *liveConfig) (stop func()) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-done:
				return
			case <-hup:
				l.reload()
			}
		}
	}()
	return func() {
		signal.Stop(hup)
		close(done)
	}
}
