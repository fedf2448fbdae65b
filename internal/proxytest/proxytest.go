// Package proxytest runs rlsproxy for tests against a real PostgreSQL and a
// real JWKS served over HTTP: a throwaway cluster holding the demo schema, a
// dev issuer behind an httptest server, and a proxy on a loopback port.
package proxytest

import (
	"github.com/rlsproxy/rlsproxy/internal/devissuer"

	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"fmt"
	"log/slog"
	"net"
	"net/http/httptest"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rlsproxy/rlsproxy/auth"
	"github.com/rlsproxy/rlsproxy/guard"
	"github.com/rlsproxy/rlsproxy/internal/demo"
	"github.com/rlsproxy/rlsproxy/internal/pgtemp"
	"github.com/rlsproxy/rlsproxy/proxy"
	"github.com/rlsproxy/rlsproxy/session"
)

// Postgres is a throwaway cluster holding the demo database.
type Postgres struct {
	*pgtemp.Cluster
	// Upstream is the service login's URL (role authenticator, database app).
	Upstream string
}

// StartPostgres starts a cluster and creates the demo database. Call it from
// TestMain; it fails loudly rather than skipping when PostgreSQL is missing.
func StartPostgres(ctx context.Context) (*Postgres, error) {
	c, err := pgtemp.Start(ctx, pgtemp.Options{})
	if err != nil {
		return nil, err
	}
	up, err := demo.Setup(ctx, c)
	if err != nil {
		c.Stop()
		return nil, err
	}
	return &Postgres{Cluster: c, Upstream: up}, nil
}

// Main runs a test binary with a shared Postgres, handed to setup first.
func Main(m *testing.M, setup func(*Postgres) error) {
	ctx := context.Background()
	pg, err := StartPostgres(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "proxytest: cannot start PostgreSQL:", err)
		os.Exit(1)
	}
	code := 1
	func() {
		defer pg.Stop()
		if err := setup(pg); err != nil {
			fmt.Fprintln(os.Stderr, "proxytest: setup:", err)
			return
		}
		code = m.Run()
	}()
	os.Exit(code)
}

// Proxy is a running proxy with its issuer.
type Proxy struct {
	Addr     string // host:port
	Host     string
	Port     int
	Issuer   *devissuer.Issuer
	ECKeyID  string // key id of the issuer's P-256 key
	Server   *proxy.Server
	Config   proxy.Config
	Registry *prometheus.Registry
	logs     *syncBuffer
}

// Setup is what a test proxy is made of. Options change it before the proxy
// starts; the guard (Config.Guard) and the pool (Config.Pool) are built from
// the fields after Config.
type Setup struct {
	proxy.Config
	Upstream     string // DSN of the service login
	Policy       session.Policy
	Signer       *session.Signer
	PoolConfig   session.PoolConfig
	GuardOff     bool
	GuardOptions []guard.Option
}

// Option changes the setup before the proxy starts.
type Option func(*Setup)

// Pooled keeps up to size upstream connections between sessions, with at
// most maxConns open (0: no bound).
func Pooled(size, maxConns int) Option {
	return func(s *Setup) {
		s.PoolConfig = session.PoolConfig{Size: size, MaxConns: maxConns, WaitTimeout: 500 * time.Millisecond}
	}
}

// GuardOff turns the SQL guard off.
func GuardOff(s *Setup) { s.GuardOff = true }

// TransactionPooling relays each transaction on whichever pooled connection
// is free (--pool-mode transaction).
func TransactionPooling(s *Setup) { s.PoolMode = proxy.TransactionPooling }

// SessionPooling keeps each client on one upstream connection from login to
// logout (--pool-mode session, the default): for the tests of what only
// that mode promises, also when the suite runs in transaction mode.
func SessionPooling(s *Setup) { s.PoolMode = proxy.SessionPooling }

// AllowCode lets through code the guard cannot see into (--guard-allow-code).
func AllowCode(s *Setup) { s.GuardOptions = append(s.GuardOptions, guard.AllowCode) }

// GoroutineRelay relays every session with a goroutine per direction, as
// TLS sessions are, instead of on the event loops.
func GoroutineRelay(s *Setup) { s.RelayLoops = -1 }

// RelayLoops sets the number of event loops.
func RelayLoops(n int) Option { return func(s *Setup) { s.RelayLoops = n } }

// DefaultPolicy is the policy the tests start from.
func DefaultPolicy() session.Policy {
	return session.Policy{
		DefaultRole: "authenticated", RoleClaim: "cognito:groups",
		ClaimsSetting: "request.jwt.claims", ClaimPrefix: "jwt.claims.",
	}
}

// Start runs a proxy in front of pg on a loopback port until the test ends.
func Start(t testing.TB, pg *Postgres, opts ...Option) *Proxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return StartListener(t, pg, l, opts...)
}

// StartListener is Start on a listener of the caller's.
func StartListener(t testing.TB, pg *Postgres, l net.Listener, opts ...Option) *Proxy {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())

	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	issuer, err := devissuer.New("", rsaKey)
	if err != nil {
		t.Fatal(err)
	}
	ecKID, _ := issuer.AddKey(ecKey)
	hs := httptest.NewServer(issuer)
	issuer.URL = hs.URL

	reg := prometheus.NewRegistry()
	metrics := proxy.NewMetrics(reg)
	verifier, err := auth.New(ctx, auth.Config{
		Rules:         auth.Rules{Issuer: hs.URL, TokenUse: "access", ClientIDs: []string{devissuer.ClientID}, Leeway: 5 * time.Second},
		OnFetch:       metrics.JWKSFetched,
		OnCacheLookup: metrics.TokenCacheLookup,
	})
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); !verifier.Ready(ctx); {
		if time.Now().After(deadline) {
			t.Fatal("verifier never loaded the JWKS")
		}
		time.Sleep(10 * time.Millisecond)
	}
	logs := &syncBuffer{}
	setup := Setup{
		Config: proxy.Config{
			Verifier:          verifier,
			TerminateOnExpiry: true, StartupTimeout: 10 * time.Second,
			Logger:  slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
			Metrics: metrics,
		},
		Upstream: pg.Upstream,
		Policy:   DefaultPolicy(),
	}
	Pooled(4, 0)(&setup) // the suite runs pooled, as production does by default
	if os.Getenv("RLSPROXY_TEST_POOL_MODE") == "transaction" {
		// The whole suite in transaction mode (make test-tx): each test's
		// own options still win.
		TransactionPooling(&setup)
	}
	for _, o := range opts {
		o(&setup)
	}
	if !setup.GuardOff || setup.PoolMode == proxy.TransactionPooling {
		opts := append([]guard.Option{guard.TrackState}, setup.GuardOptions...)
		if setup.GuardOff {
			opts = append(opts, guard.NoRules)
		}
		sqlGuard := guard.New(setup.Policy, 1000, opts...)
		if err := sqlGuard.IsolateParsing(guard.ParseLimits{Logger: setup.Logger}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(sqlGuard.Close)
		setup.Guard = sqlGuard
	}
	dialer, err := session.NewDialer(setup.Upstream, setup.Signer)
	if err != nil {
		t.Fatal(err)
	}
	cfg := setup.Config
	cfg.Pool = session.NewPool(dialer, setup.Policy, setup.PoolConfig)
	proxy.RegisterPool(reg, cfg.Pool)
	t.Cleanup(cfg.Pool.Close)
	srv, err := proxy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		srv.Shutdown(sctx)
		scancel()
		<-served
		cancel()
		verifier.Close()
		hs.Close()
		if t.Failed() {
			t.Logf("proxy log:\n%s", logs.String())
		}
	})
	p := &Proxy{Addr: l.Addr().String(), Issuer: issuer, ECKeyID: ecKID,
		Server: srv, Config: cfg, Registry: reg, logs: logs}
	if addr, ok := l.Addr().(*net.TCPAddr); ok {
		p.Host, p.Port = addr.IP.String(), addr.Port
	}
	return p
}

// Token mints an access token for sub with the given groups.
func (p *Proxy) Token(t testing.TB, sub string, groups ...string) string {
	t.Helper()
	tok, err := p.Issuer.Mint(devissuer.TokenRequest{Subject: sub, Groups: groups})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// DSN is a keyword/value DSN for user with password (a token) on the demo
// database; with an empty password it has none, so clients read PGPASSWORD.
func (p *Proxy) DSN(user, password string) string {
	dsn := fmt.Sprintf("host=%s port=%d dbname=%s user=%s sslmode=disable", p.Host, p.Port, demo.Database, user)
	if password != "" {
		dsn += " password=" + password
	}
	return dsn
}

// URL is a postgres:// URL for user with password on the demo database.
func (p *Proxy) URL(user, password string) string {
	return fmt.Sprintf("postgres://%s:%s@%s/%s?sslmode=disable", user, password, p.Addr, demo.Database)
}

// PortString is the proxy's port as text.
func (p *Proxy) PortString() string { return strconv.Itoa(p.Port) }

// Logs returns what the proxy has logged so far.
func (p *Proxy) Logs() string { return p.logs.String() }

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Counter sums the counter family name of the proxy's registry over its
// labels.
func (p *Proxy) Counter(t testing.TB, name string) float64 {
	t.Helper()
	mfs, err := p.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}
