// Package proxy is the client side of rlsproxy: it accepts PostgreSQL
// connections, negotiates TLS, authenticates the token sent as the password,
// opens the upstream session and relays frames.
//
// server.go is the server's lifetime (configuration, listeners, shutdown);
// conn.go one connection's: a clientConn comes in (startup.go), its token
// becomes an auth.Identity, that identity a session.Grant and a
// session.Upstream, and the two become a relay (relay.go, driven by
// relay_loop_linux.go or relay_conn.go), whose ledger (ledger.go) holds what
// the server owes. SQLSTATEs are decided in errors.go alone.
package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rlsproxy/rlsproxy/auth"
	"github.com/rlsproxy/rlsproxy/guard"
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
	// Pool opens upstream sessions, with the policy they are set up by, and
	// keeps connections between them.
	Pool *session.Pool
	// Guard inspects every Query, Parse and FunctionCall; nil turns it off.
	// It also tells what a statement leaves in the session (guard.TrackState):
	// transaction pooling needs that, so there a guard is required, one
	// without rules (guard.NoRules) for --guard off.
	Guard *guard.Guard
	// PoolMode is how long a client holds an upstream connection.
	PoolMode PoolMode
	// Peers are the other instances of the same service (host:port, a host
	// may be a DNS name for several): a CancelRequest for a session this
	// instance does not hold is forwarded to them (peers.go).
	Peers []string
	// RefuseSessionState, in transaction mode, refuses a statement that
	// would leave state in its backend (guard/state.go), with an error
	// naming it, instead of pinning the client to the backend.
	RefuseSessionState bool
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
	// FrameTimeout ends a session whose client started a message and sent
	// nothing more of it for that long; 0: 60 s, negative: never.
	FrameTimeout time.Duration
	// ClientIdleTimeout ends a session whose client sent nothing for that
	// long while the server owed it nothing; 0: never.
	ClientIdleTimeout time.Duration
	// TerminateOnExpiry ends a session when its token expires.
	TerminateOnExpiry bool
	// ExpiryLeeway is added to a token's exp before its session ends, the
	// same skew the verifier allowed when it accepted the token.
	ExpiryLeeway time.Duration
	// BufferSize is the read buffer of each client connection.
	BufferSize int
	// RelayLoops is the number of event loops that relay plaintext sessions
	// (relay_loop_linux.go): 0 means one per two CPUs the runtime uses (a
	// loop with more sessions batches more per wake-up), negative means
	// none, every session relayed by a goroutine per direction.
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
	// refusals bounds the log lines about refused connections.
	refusals refusalLog
	// peers receive the cancels this instance does not hold; nil: none.
	peers *peerForwarder
	// stopWatchdog ends the watchdog (timeouts.go) at Shutdown.
	stopWatchdog chan struct{}
	// frameTimeout, idleTimeout and expiryLeeway are Config's, changed by
	// a reload.
	frameTimeout, idleTimeout, expiryLeeway atomic.Int64
	// maxClientConns and startupTimeout are Config's, changed by a reload.
	maxClientConns, startupTimeout atomic.Int64
	stopWatchdogOnce               sync.Once
	// buffers recycles the read buffers of client connections, so that a
	// storm of short connections does not churn the heap.
	buffers sync.Pool
	// held bounds the large frames all sessions gather for the guard.
	held *byteBudget

	conns      atomic.Int64  // open client connections, startup included
	sessionSeq atomic.Uint64 // numbers sessions, for their statements' names
	live       liveSessions  // transaction-pooled sessions, by number

	mu        sync.Mutex
	listeners []net.Listener
	sessions  map[*relay]struct{} // being relayed, for Shutdown to end
	closing   bool
	wg        sync.WaitGroup

	loops *relayLoops // nil: sessions relayed by runConns
}

// New checks cfg and returns a Server.
func New(cfg Config) (*Server, error) {
	if cfg.Verifier == nil || cfg.Pool == nil {
		return nil, errors.New("proxy: Verifier and Pool are required")
	}
	if err := cfg.Pool.Policy().Validate(); err != nil {
		return nil, err
	}
	if cfg.PoolMode == TransactionPooling && (cfg.Guard == nil || !cfg.Guard.TracksState()) {
		return nil, errors.New("proxy: transaction pooling needs a guard that tracks session state (guard.TrackState; guard.NoRules for --guard off)")
	}
	if cfg.MaxClientConns <= 0 {
		cfg.MaxClientConns = 1000
	}
	if cfg.StartupTimeout <= 0 {
		cfg.StartupTimeout = 30 * time.Second
	}
	if cfg.FrameTimeout == 0 {
		cfg.FrameTimeout = time.Minute
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
	if cfg.AuthFailureBurst <= 0 {
		cfg.AuthFailureBurst = 20
	}
	if cfg.AuthFailureInterval <= 0 {
		cfg.AuthFailureInterval = time.Second
	}
	s := &Server{cfg: cfg, log: cfg.Logger, cancels: newCancelRegistry(), sessions: map[*relay]struct{}{}, held: newByteBudget(maxHeldForGuard),
		authFailures: newAuthLimiter(cfg.AuthFailureInterval, cfg.AuthFailureBurst),
		peers:        newPeerForwarder(cfg.Peers)}
	s.buffers.New = func() any { b := make([]byte, cfg.BufferSize); return &b }
	s.SetClientTimeouts(cfg.FrameTimeout, cfg.ClientIdleTimeout)
	s.SetExpiryLeeway(cfg.ExpiryLeeway)
	s.SetClientLimits(cfg.MaxClientConns, cfg.StartupTimeout)
	s.stopWatchdog = make(chan struct{})
	go s.watchdog()
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
func Listen(addr string) (net.Listener, error) { return ListenReusePort(addr, false) }

// ListenReusePort is Listen, with SO_REUSEPORT on a TCP address when
// reusePort is set: several processes (instances of one service, an old and
// a new one during an upgrade) accept on the same port, the kernel spreading
// connections between them.
func ListenReusePort(addr string, reusePort bool) (net.Listener, error) {
	if !strings.HasPrefix(addr, "/") {
		lc := net.ListenConfig{}
		if reusePort {
			lc.Control = setReusePort
		}
		return lc.Listen(context.Background(), "tcp", addr)
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
			s.serveConn(ctx, conn)
		}()
	}
}

// SetClientTimeouts changes Config.FrameTimeout and ClientIdleTimeout (a
// reload of the configuration); they apply to every session at once.
func (s *Server) SetClientTimeouts(frame, idle time.Duration) {
	s.frameTimeout.Store(int64(frame))
	s.idleTimeout.Store(int64(idle))
}

// SetClientLimits changes Config.MaxClientConns and StartupTimeout (a
// reload of the configuration) for connections accepted after it.
func (s *Server) SetClientLimits(maxConns int, startup time.Duration) {
	s.maxClientConns.Store(int64(maxConns))
	s.startupTimeout.Store(int64(startup))
}

// SetExpiryLeeway changes Config.ExpiryLeeway (a reload of the
// configuration) for sessions that start after it.
func (s *Server) SetExpiryLeeway(d time.Duration) {
	s.expiryLeeway.Store(int64(d))
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
	defer s.stopWatchdogOnce.Do(func() { close(s.stopWatchdog) })
	defer s.cfg.Pool.Close()
	defer s.loops.close()
	select {
	case <-done:
		return
	case <-ctx.Done():
	}
	s.mu.Lock()
	for r := range s.sessions {
		go r.end(endShutdown, newClientError(codeAdminShutdown, "shutdown", "terminating connection because rlsproxy is shutting down"))
	}
	s.mu.Unlock()
	<-done
}
