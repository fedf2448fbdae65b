// Package proxy is the client side of rlsproxy: it accepts PostgreSQL
// connections, negotiates TLS, authenticates the token sent as the password,
// opens the upstream session and relays frames.
//
// A connection moves through four stages, one type each: a clientConn comes
// in (startup.go), its token becomes an auth.Identity, that identity becomes a
// session.Upstream, and the two become a relay (relay.go).
package proxy

import (
	"github.com/rlsproxy/rlsproxy/internal/loopback"

	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/auth"
	"github.com/rlsproxy/rlsproxy/guard"
	"github.com/rlsproxy/rlsproxy/internal/wire"
	"github.com/rlsproxy/rlsproxy/session"
)

// Verifier checks tokens; *auth.Verifier is the implementation.
type Verifier interface {
	Verify(ctx context.Context, token string) (*auth.Identity, error)
	Ready(ctx context.Context) bool
}

// Config configures a Server.
type Config struct {
	Verifier Verifier
	Policy   session.Policy
	Dialer   *session.Dialer
	// Pool keeps upstream connections between sessions; nil: a pool of
	// size 0 over Dialer (every session opens and closes its own).
	Pool *session.Pool
	// Guard inspects every Query, Parse and FunctionCall; nil turns it off.
	Guard *guard.Guard
	// Databases a client may ask for; empty means only the upstream DSN's
	// database, "*" means any.
	Databases []string
	// TLS, when set, answers SSLRequest with S.
	TLS *tls.Config
	// InsecurePlaintext accepts tokens over unencrypted TCP from non-loopback peers.
	InsecurePlaintext bool
	// MaxClientConns bounds client connections; beyond it clients get 53300.
	MaxClientConns int
	// StartupTimeout bounds the time from accept to ReadyForQuery.
	StartupTimeout time.Duration
	// TerminateOnExpiry ends a session when its token expires.
	TerminateOnExpiry bool
	// ExpiryLeeway is added to a token's exp before its session ends, the
	// same skew the verifier allowed when it accepted the token.
	ExpiryLeeway time.Duration
	// BufferSize is the read buffer of each client connection.
	BufferSize int
	// RelayLoops is the number of event loops that relay plaintext sessions
	// (relay_loop_linux.go): 0 means one per two CPUs the runtime uses (on
	// two cores one loop batches more per wake-up: 19 against 23 µs of CPU
	// per pgbench transaction), negative means none, every session relayed
	// by a goroutine per direction.
	RelayLoops int
	// MaxTokenBytes bounds the password message.
	MaxTokenBytes int
	// AuthFailureBurst failed authentications are allowed per client
	// address, then one per AuthFailureInterval (loopback is not limited).
	AuthFailureBurst    int
	AuthFailureInterval time.Duration
	Logger              *slog.Logger
	Metrics             *Metrics
	// Now returns the current time; nil means time.Now.
	Now func() time.Time
}

// Server accepts client connections and relays their sessions.
type Server struct {
	cfg     Config
	log     *slog.Logger
	cancels *cancelRegistry
	// authFailures limits failed authentications per client address.
	authFailures *authLimiter
	// buffers recycles the read buffers of client connections, so that a
	// storm of short connections does not churn the heap.
	buffers sync.Pool
	// held bounds the large frames all sessions gather for the guard.
	held *byteBudget

	conns atomic.Int64 // open client connections, startup included

	mu        sync.Mutex
	listeners []net.Listener
	relays    map[*relay]struct{}
	closing   bool
	wg        sync.WaitGroup

	loops *relayLoops // nil: sessions relayed by runConns
}

// New checks cfg and returns a Server.
func New(cfg Config) (*Server, error) {
	if cfg.Verifier == nil || cfg.Dialer == nil {
		return nil, errors.New("proxy: Verifier and Dialer are required")
	}
	if err := cfg.Policy.Validate(); err != nil {
		return nil, err
	}
	if cfg.MaxClientConns <= 0 {
		cfg.MaxClientConns = 1000
	}
	if cfg.StartupTimeout <= 0 {
		cfg.StartupTimeout = 30 * time.Second
	}
	if cfg.BufferSize <= 0 {
		cfg.BufferSize = 32 << 10
	}
	if cfg.MaxTokenBytes <= 0 {
		cfg.MaxTokenBytes = auth.DefaultMaxTokenBytes
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Pool == nil {
		cfg.Pool = session.NewPool(cfg.Dialer, session.PoolConfig{})
	}
	if cfg.AuthFailureBurst <= 0 {
		cfg.AuthFailureBurst = 20
	}
	if cfg.AuthFailureInterval <= 0 {
		cfg.AuthFailureInterval = time.Second
	}
	s := &Server{cfg: cfg, log: cfg.Logger, cancels: newCancelRegistry(), relays: map[*relay]struct{}{}, held: newByteBudget(maxHeldForGuard),
		authFailures: newAuthLimiter(cfg.AuthFailureInterval, cfg.AuthFailureBurst)}
	s.buffers.New = func() any { b := make([]byte, cfg.BufferSize); return &b }
	if cfg.RelayLoops >= 0 {
		n := cfg.RelayLoops
		if n == 0 {
			n = (runtime.GOMAXPROCS(0) + 1) / 2
		}
		loops, err := newRelayLoops(n)
		if err != nil {
			s.log.Warn("relaying every session with goroutines", "error", err)
		}
		s.loops = loops
	}
	return s, nil
}

// Listen opens a client listener. An address starting with "/" is a
// directory holding a unix socket named .s.PGSQL.<port>, as PostgreSQL does;
// the port is taken from "/dir:port" and defaults to 6432.
func Listen(addr string) (net.Listener, error) {
	if !strings.HasPrefix(addr, "/") {
		return net.Listen("tcp", addr)
	}
	dir, port := addr, "6432"
	if i := strings.LastIndexByte(addr, ':'); i > 0 {
		if _, err := strconv.Atoi(addr[i+1:]); err == nil {
			dir, port = addr[:i], addr[i+1:]
		}
	}
	path := filepath.Join(dir, ".s.PGSQL."+port)
	_ = os.Remove(path) // a stale socket of an earlier run
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	_ = os.Chmod(path, 0o777)
	return l, nil
}

// Serve accepts connections on l until Shutdown or until l fails.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return errors.New("proxy: server is shutting down")
	}
	s.listeners = append(s.listeners, l)
	s.mu.Unlock()
	for {
		conn, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			if closing {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return err
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.handle(ctx, conn)
		}()
	}
}

// Shutdown stops accepting, lets sessions finish until ctx is done, then ends
// the remaining ones with FATAL 57P01 and waits for them to close.
func (s *Server) Shutdown(ctx context.Context) {
	s.mu.Lock()
	s.closing = true
	for _, l := range s.listeners {
		l.Close()
	}
	s.mu.Unlock()

	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	defer s.cfg.Pool.Close()
	defer s.loops.close()
	select {
	case <-done:
		return
	case <-ctx.Done():
	}
	s.mu.Lock()
	for r := range s.relays {
		go r.end(endShutdown, newClientError(codeAdminShutdown, "shutdown", "terminating connection because rlsproxy is shutting down"))
	}
	s.mu.Unlock()
	<-done
}

// handle runs one client connection from accept to close.
func (s *Server) handle(ctx context.Context, raw net.Conn) {
	m := s.cfg.Metrics
	m.clientsTotal.Inc()
	m.clientsCurrent.Inc()
	n := s.conns.Add(1)
	defer func() {
		s.conns.Add(-1)
		m.clientsCurrent.Dec()
	}()
	defer raw.Close()
	if n > int64(2*s.cfg.MaxClientConns) {
		return // far over the limit: do not even spend a startup on it
	}

	start := s.cfg.Now()
	_ = raw.SetDeadline(start.Add(s.cfg.StartupTimeout))
	buf := s.buffers.Get().(*[]byte)
	c := &clientConn{Conn: raw, r: wire.NewReaderBuffer(raw, *buf, s.cfg.BufferSize+s.cfg.MaxTokenBytes), local: loopback.Addr(raw.RemoteAddr())}
	defer func() {
		if b := c.r.Buffer(); len(b) == s.cfg.BufferSize { // not grown
			*buf = b
			s.buffers.Put(buf)
		}
	}()
	req, cancel, err := readStartup(c, s.cfg.TLS, s.cfg.Policy)
	if cancel != nil {
		if s.cancels.cancel(ctx, cancel.pid, cancel.secret) {
			m.cancelsForwarded.Inc()
		}
		return
	}
	if err != nil {
		s.reject(c, err, "startup")
		return
	}
	if req.minor > 0 || len(req.unsupportedOptions) > 0 {
		// A newer 3.x client learns at once that this session speaks 3.0.
		npv, _ := (&pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: 0, UnrecognizedOptions: req.unsupportedOptions}).Encode(nil)
		if _, err := c.Write(npv); err != nil {
			return
		}
	}
	if n > int64(s.cfg.MaxClientConns) {
		s.reject(c, newClientError(codeTooManyConnections, "too_many_clients", "sorry, too many clients already"), "startup")
		return
	}
	if s.cfg.Guard != nil {
		for _, e := range req.encodings {
			if err := guard.LexableEncoding(e); err != nil {
				s.reject(c, newClientError(codeInsufficientPrivilege, "client_encoding", err.Error()), "startup")
				return
			}
		}
	}

	sctx, cancelStartup := context.WithDeadline(ctx, start.Add(s.cfg.StartupTimeout))
	up, sess, err := s.authenticate(sctx, c, req)
	cancelStartup()
	if err != nil {
		s.reject(c, err, "auth")
		return
	}
	s.relay(c, req, up, sess, start)
}

// sessionInfo describes an authenticated session for logs.
type sessionInfo struct {
	subject, role string
	expires       time.Time
	grant         *session.Grant
}

// authenticate asks for the token, verifies it, and opens the upstream session.
func (s *Server) authenticate(ctx context.Context, c *clientConn, req *startupRequest) (*session.Upstream, sessionInfo, error) {
	var info sessionInfo
	grant, anonymous := (*session.Grant)(nil), false
	if req.user == "anonymous" {
		grant, anonymous = s.cfg.Policy.AnonymousGrant()
	}
	if !anonymous {
		if ok, wait := s.authFailures.allowed(c.RemoteAddr()); !ok {
			return nil, info, newClientError(codeRejectedConnection, "rate_limited",
				fmt.Sprintf("too many failed authentications from %s: try again in %s", hostOf(c.RemoteAddr()), wait.Round(time.Second)+time.Second))
		}
		if !c.tls && !c.local && !s.cfg.InsecurePlaintext {
			return nil, info, newClientError(codeInvalidAuthorization, "plaintext",
				fmt.Sprintf("rlsproxy does not accept tokens over an unencrypted connection from %s: connect with sslmode=require (the proxy needs --tls-cert and --tls-key), or start the proxy with --insecure-plaintext on a trusted network", hostOf(c.RemoteAddr())))
		}
		token, err := readPassword(c, s.cfg.MaxTokenBytes)
		if err != nil {
			return nil, info, err
		}
		id, err := s.cfg.Verifier.Verify(ctx, token)
		if err == nil {
			grant, err = s.cfg.Policy.Grant(id, s.log)
		}
		var ae *auth.Error
		if errors.As(err, &ae) && ae.Kind != auth.Unavailable {
			s.authFailures.failed(c.RemoteAddr())
		}
		if err != nil {
			return nil, info, err
		}
		info.subject, info.expires = id.Subject, id.ExpiresAt
	}
	info.role, info.grant = grant.Role, grant
	if !s.databaseAllowed(req.database) {
		return nil, info, newClientError(codeInvalidDatabase, "database",
			fmt.Sprintf("database %q is not served by this rlsproxy (see --databases)", req.database))
	}

	t0 := time.Now()
	up, err := s.cfg.Pool.Get(ctx, req.database, req.params, grant)
	s.cfg.Metrics.upstreamConnect.Observe(time.Since(t0).Seconds())
	if err != nil {
		return nil, info, err
	}
	if anonymous {
		s.cfg.Metrics.auth.WithLabelValues("anonymous").Inc()
	} else {
		s.cfg.Metrics.auth.WithLabelValues("ok").Inc()
	}
	return up, info, nil
}

func (s *Server) databaseAllowed(db string) bool {
	if len(s.cfg.Databases) == 0 {
		return db == s.cfg.Dialer.Database()
	}
	return slices.Contains(s.cfg.Databases, "*") || slices.Contains(s.cfg.Databases, db)
}

// relay completes the startup for the client and relays the session.
func (s *Server) relay(c *clientConn, req *startupRequest, up *session.Upstream, info sessionInfo, start time.Time) {
	var guard *sessionGuard
	if s.cfg.Guard != nil {
		guard = newSessionGuard(s.cfg.Guard, s.cfg.Metrics)
		// The settings the server reads statements with, as it reports
		// them at connect: they include role and database defaults.
		for _, name := range []string{"client_encoding", "standard_conforming_strings"} {
			if ce := guard.lexing(name, up.Params[name]); ce != nil {
				s.cfg.Pool.Release(context.Background(), up, false)
				s.reject(c, ce, "startup")
				return
			}
		}
	}
	r := newRelay(up, info.grant, s.cfg.Metrics, guard, s.held)
	defer r.dropFrame()
	key := s.cancels.register(up)
	// Unregistered before the connection goes back to the pool, so that a
	// late CancelRequest cannot reach the next client's statement.
	unregister := sync.OnceFunc(func() { s.cancels.unregister(key) })
	defer unregister()

	out, _ := (&pgproto3.AuthenticationOk{}).Encode(nil)
	for k, v := range up.Params {
		out, _ = (&pgproto3.ParameterStatus{Name: k, Value: v}).Encode(out)
	}
	out, _ = (&pgproto3.BackendKeyData{ProcessID: key.pid, SecretKey: key.secret[:]}).Encode(out)
	out, _ = (&pgproto3.ReadyForQuery{TxStatus: up.TxStatus}).Encode(out)

	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		unregister()
		s.cfg.Pool.Release(context.Background(), up, true)
		s.reject(c, newClientError(codeAdminShutdown, "shutdown", "terminating connection because rlsproxy is shutting down"), "startup")
		return
	}
	s.relays[r] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.relays, r)
		s.mu.Unlock()
	}()

	if _, err := c.Write(out); err != nil {
		unregister()
		s.cfg.Pool.Release(context.Background(), up, true)
		return
	}
	_ = c.SetDeadline(time.Time{})

	log := s.log.With("peer", hostOf(c.RemoteAddr()), "sub", info.subject, "user", req.user,
		"role", info.role, "database", req.database, "application_name", req.applicationName)
	log.Info("session start")

	if s.cfg.TerminateOnExpiry && !info.expires.IsZero() {
		exp := newClientError(codeInvalidPassword, "token_expired",
			"terminating connection: the token expired at "+info.expires.UTC().Format(time.RFC3339)+"; reconnect with a fresh token")
		t := time.AfterFunc(info.expires.Add(s.cfg.ExpiryLeeway).Sub(s.cfg.Now()), func() { r.expire(exp) })
		defer t.Stop()
	}

	if !s.loops.run(r, c.Conn, c.r) {
		r.runConns(c.Conn, c.r, nil, nil)
	}
	reason := r.reason
	up.TxStatus = r.ledger.txStatus()
	rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	unregister()
	s.cfg.Pool.Release(rctx, up, r.reusable())
	cancel()
	s.cfg.Metrics.sessionsEnded.WithLabelValues(reason).Inc()
	log.Info("session end", "reason", reason, "duration", time.Since(start).Round(time.Millisecond),
		"bytes_in", r.bytesUp.Load(), "bytes_out", r.bytesDown.Load())
}

// reject tells the client why its connection is refused, then closes it.
func (s *Server) reject(c *clientConn, err error, stage string) {
	ce := toClientError(err)
	if stage == "auth" {
		s.cfg.Metrics.auth.WithLabelValues(ce.reason).Inc()
	}
	if !isProtocolNoise(err) {
		s.log.Info("connection refused", "peer", hostOf(c.RemoteAddr()), "stage", stage, "reason", ce.reason, "error", ce.msg)
		_ = c.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = c.Write(encodeError(nil, "FATAL", ce))
	}
}

// isProtocolNoise reports failures answered, as PostgreSQL does, by closing
// the socket without a word (see errDropped).
func isProtocolNoise(err error) bool { return errors.Is(err, errDropped) }

func hostOf(a net.Addr) string {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.IP.String()
	}
	if a.Network() == "unix" {
		return "unix"
	}
	return a.String()
}
