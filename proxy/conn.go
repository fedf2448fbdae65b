package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/auth"
	"github.com/rlsproxy/rlsproxy/guard"
	"github.com/rlsproxy/rlsproxy/internal/loopback"
	"github.com/rlsproxy/rlsproxy/internal/wire"
	"github.com/rlsproxy/rlsproxy/session"
)

// serveConn runs one client connection from accept to close: startup,
// authentication, the upstream session, the relay.
func (s *Server) serveConn(ctx context.Context, raw net.Conn) {
	m := s.cfg.Metrics
	m.clientsTotal.Inc()
	m.clientsCurrent.Inc()
	n := s.conns.Add(1)
	defer func() {
		s.conns.Add(-1)
		m.clientsCurrent.Dec()
	}()
	defer raw.Close()
	maxConns, startupTimeout := s.maxClientConns.Load(), time.Duration(s.startupTimeout.Load())
	if n > 2*maxConns {
		return // far over the limit: do not even spend a startup on it
	}

	start := s.cfg.Now()
	_ = raw.SetDeadline(start.Add(startupTimeout))
	buf := s.buffers.Get().(*[]byte)
	c := &clientConn{Conn: raw, r: wire.NewReaderBuffer(raw, *buf, s.cfg.BufferSize+s.cfg.MaxTokenBytes), local: loopback.Addr(raw.RemoteAddr())}
	defer func() {
		if b := c.r.Buffer(); len(b) == s.cfg.BufferSize { // not grown
			*buf = b
			s.buffers.Put(buf)
		}
	}()
	req, cancelReq, err := readStartup(c, s.cfg.TLS, s.cfg.Pool.Policy())
	if cancelReq != nil {
		switch {
		case s.cancels.cancel(ctx, cancelReq.pid, cancelReq.secret):
			m.cancelsForwarded.Inc()
		case !cancelReq.fromPeer:
			// Not a session of this instance: perhaps a peer's.
			if s.peers.forward(ctx, cancelReq.pid, cancelReq.secret) > 0 {
				m.cancelsToPeers.Inc()
			}
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
	if n > maxConns {
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

	sctx, cancelStartup := context.WithDeadline(ctx, start.Add(startupTimeout))
	up, info, err := s.authenticate(sctx, c, req)
	cancelStartup()
	if err != nil {
		s.reject(c, err, "auth")
		return
	}
	s.serveSession(c, req, up, info, start)
}

// sessionInfo describes an authenticated session for logs.
type sessionInfo struct {
	subject, role string
	expires       time.Time
	// target is what the session asks the pool for.
	target *session.Target
}

// authenticate asks for the token, verifies it, and opens the upstream session.
func (s *Server) authenticate(ctx context.Context, c *clientConn, req *startupRequest) (*session.Upstream, sessionInfo, error) {
	var info sessionInfo
	grant, anonymous := (*session.Grant)(nil), false
	policy := s.cfg.Pool.Policy()
	if req.user == "anonymous" {
		grant, anonymous = policy.AnonymousGrant()
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
			grant, err = policy.Grant(id, s.log)
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
	info.role, info.target = grant.Role, session.NewTarget(req.database, req.params, grant)
	if !s.databaseAllowed(req.database) {
		return nil, info, newClientError(codeInvalidDatabase, "database",
			fmt.Sprintf("database %q is not served by this rlsproxy (see --databases)", req.database))
	}

	t0 := time.Now()
	up, err := s.cfg.Pool.Get(ctx, info.target)
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
		return db == s.cfg.Pool.Database()
	}
	return slices.Contains(s.cfg.Databases, "*") || slices.Contains(s.cfg.Databases, db)
}

// serveSession completes the startup for the client and relays the session.
func (s *Server) serveSession(c *clientConn, req *startupRequest, up *session.Upstream, info sessionInfo, start time.Time) {
	var guard *sessionGuard
	if s.cfg.Guard != nil {
		guard = newSessionGuard(s.cfg.Guard, s.cfg.Metrics)
		// The settings the server reads statements with, as it reports
		// them at connect: they include role and database defaults.
		for _, name := range []string{"client_encoding", "standard_conforming_strings"} {
			if ce := guard.lexing(name, up.Parameter(name)); ce != nil {
				s.cfg.Pool.Release(context.Background(), up, false, true, 0)
				s.reject(c, ce, "startup")
				return
			}
		}
	}
	log := s.log.With("peer", hostOf(c.RemoteAddr()), "sub", info.subject, "user", req.user,
		"role", info.role, "database", req.database, "application_name", req.applicationName)
	r := newRelay(up, s.cfg.Metrics, guard, s.held)
	defer r.dropFrame()
	var target canceler = up
	if s.cfg.PoolMode == TransactionPooling {
		id := s.sessionSeq.Add(1)
		s.live.add(id)
		defer s.live.remove(id)
		r.tx = &txState{pool: s.cfg.Pool, target: info.target,
			stmts: newStatements(id), live: &s.live, metrics: s.cfg.Metrics, carried: map[string]string{},
			log: log, refuse: s.cfg.RefuseSessionState}
		for _, name := range session.CarriedSettings {
			// Empty values too: another client's must not stay.
			r.tx.carried[name] = up.Parameter(name)
		}
		r.tx.carriedSig = up.CarriedSignature()
		target = r // the connection serving the client at the time
	}
	key := s.cancels.register(target)
	// Unregistered before the connection goes back to the pool, so that a
	// late CancelRequest cannot reach the next client's statement.
	unregister := sync.OnceFunc(func() { s.cancels.unregister(key) })
	defer unregister()
	release := func(clean bool) {
		unregister()
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r.cancelRunning(rctx, up, clean)
		s.cfg.Pool.Release(rctx, up, clean, r.stateful(up), r.ledger.txStatus())
	}

	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		release(true)
		s.reject(c, newClientError(codeAdminShutdown, "shutdown", "terminating connection because rlsproxy is shutting down"), "startup")
		return
	}
	s.sessions[r] = struct{}{}
	r.lastClientByte.Store(time.Now().UnixNano())
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.sessions, r)
		s.mu.Unlock()
	}()

	if _, err := c.Write(up.Greeting(key.pid, key.secret[:])); err != nil {
		release(true)
		return
	}
	_ = c.SetDeadline(time.Time{})

	if s.cfg.TerminateOnExpiry && !info.expires.IsZero() {
		exp := newClientError(codeInvalidPassword, "token_expired",
			"terminating connection: the token expired at "+info.expires.UTC().Format(time.RFC3339)+"; reconnect with a fresh token")
		t := time.AfterFunc(info.expires.Add(time.Duration(s.expiryLeeway.Load())).Sub(s.cfg.Now()), func() { r.expire(exp) })
		defer t.Stop()
	}

	switch {
	case r.tx != nil:
		// The relay holds and lets go of connections itself, starting
		// with the one the startup used.
		r.runTx(c.Conn, c.r, up)
		unregister()
	case s.loops.run(r, c.Conn, c.r):
		release(r.reusable())
	default:
		r.runConns(c.Conn, c.r, nil, nil)
		release(r.reusable())
	}
	s.cfg.Metrics.sessionsEnded.WithLabelValues(r.reason).Inc()
	log.Info("session end", "reason", r.reason, "duration", time.Since(start).Round(time.Millisecond),
		"bytes_in", r.bytesUp.Load(), "bytes_out", r.bytesDown.Load())
}

// reject tells the client why its connection is refused, then closes it.
func (s *Server) reject(c *clientConn, err error, stage string) {
	ce := toClientError(err)
	if stage == "auth" {
		s.cfg.Metrics.auth.WithLabelValues(ce.reason).Inc()
	}
	if !isProtocolNoise(err) {
		// A database that fails the proxy is the operator's to fix; a
		// client refused is routine.
		level := slog.LevelInfo
		if strings.HasPrefix(ce.reason, "upstream") {
			level = slog.LevelWarn
		}
		peer := hostOf(c.RemoteAddr())
		if ok, suppressed := s.refusals.allow(peer, ce.reason, time.Now()); ok {
			s.log.Log(context.Background(), level, "connection refused", "peer", peer, "stage", stage, "reason", ce.reason, "error", ce.msg,
				"refused_since_last_line", suppressed)
		}
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
