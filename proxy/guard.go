package proxy

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/session"
)

// maxInspected bounds a Query, Parse or FunctionCall the guard reads whole.
const maxInspected = 64 << 20

// sessionGuard applies the guard to one session's messages.
//
// A refused message is not answered by the proxy directly: that could
// overtake the answers to messages pipelined before it. Instead it is
// replaced by a statement that fails in the server with a syntax error
// naming a per-session marker; the server answers it in order, exactly as it
// answers any failed statement (a transaction block becomes failed, an
// extended-protocol batch is skipped up to Sync), and the relay rewrites that
// one error into the guard's. Client and server so always agree on the
// transaction state.
//
// After a message that resets role or settings (RESET ALL, DISCARD ALL),
// the proxy sends the install statements right behind it and holds back the
// client's later messages until their answers have come back, proved to be
// the install's by a per-session mark and free of errors; they are dropped.
type sessionGuard struct {
	g        *session.Guard
	reinject []byte // a statement returning injected, then the install frames, ending with Sync
	injected []byte // "rlsproxy_reinjected_<random>": marks the answers to reinject
	marker   []byte // "rlsproxy_guard_<random>_"
	metrics  *Metrics

	mu      sync.Mutex
	seq     int64
	refused map[int64]*clientError
	units   []int64 // unit numbers whose answers are dropped, ascending
	pending atomic.Int32
}

func newSessionGuard(g *session.Guard, install []byte, m *Metrics) *sessionGuard {
	var nonce [8]byte
	_, _ = rand.Read(nonce[:])
	injected := "rlsproxy_reinjected_" + hex.EncodeToString(nonce[:])
	var reinject []byte
	for _, msg := range []pgproto3.FrontendMessage{&pgproto3.Parse{Query: "SELECT '" + injected + "'"}, &pgproto3.Bind{}, &pgproto3.Execute{}} {
		reinject, _ = msg.Encode(reinject)
	}
	_, _ = rand.Read(nonce[:])
	return &sessionGuard{
		g: g, reinject: append(reinject, install...), injected: []byte(injected), metrics: m,
		marker:  []byte("rlsproxy_guard_" + hex.EncodeToString(nonce[:]) + "_"),
		refused: map[int64]*clientError{},
	}
}

// inspected reports the message types the guard reads.
func inspected(typ byte) bool { return typ == 'Q' || typ == 'P' || typ == 'F' }

// check judges a whole Query, Parse or FunctionCall frame. It returns the
// frame to send instead (nil: send it as is) and whether the session must be
// re-established after it.
func (s *sessionGuard) check(typ byte, frame []byte) (substitute []byte, resets bool) {
	body := frame[5:]
	var v session.Verdict
	var name []byte
	switch typ {
	case 'Q':
		v = s.g.Query(cstring(body))
	case 'P':
		name = cstring(body)
		v = s.g.Parse(cstring(body[min(len(name)+1, len(body)):]))
	case 'F':
		if len(body) < 4 {
			return nil, false // malformed: the server refuses it
		}
		v = s.g.FunctionCall(binary.BigEndian.Uint32(body))
	}
	if v.Reject == nil {
		return nil, v.Resets
	}
	s.metrics.guardRejections.WithLabelValues(v.Reject.Rule).Inc()
	s.mu.Lock()
	s.seq++
	seq := s.seq
	s.refused[seq] = &clientError{code: v.Reject.Code, msg: v.Reject.Msg, reason: v.Reject.Rule}
	s.mu.Unlock()
	text := string(s.marker) + strconv.FormatInt(seq, 10)
	if typ == 'P' {
		out, _ := (&pgproto3.Parse{Name: string(name), Query: text}).Encode(nil)
		return out, false
	}
	out, _ := (&pgproto3.Query{String: text}).Encode(nil)
	return out, false
}

// expectInjected records that unit number n is the proxy's own.
func (s *sessionGuard) expectInjected(n int64) {
	s.mu.Lock()
	s.units = append(s.units, n)
	s.mu.Unlock()
	s.pending.Add(1)
}

// isInjected reports (once) whether unit number n is the proxy's own.
func (s *sessionGuard) isInjected(n int64) bool {
	if s.pending.Load() == 0 {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.units) > 0 && s.units[0] == n {
		s.units = s.units[1:]
		s.pending.Add(-1)
		return true
	}
	return false
}

// marks reports whether a DataRow carries the mark of the proxy's own
// re-injected statements.
func (s *sessionGuard) marks(frame []byte) bool { return bytes.Contains(frame, s.injected) }

// rewrite returns the guard's ErrorResponse for a server error caused by a
// substituted message, or nil for any other error.
func (s *sessionGuard) rewrite(frame []byte) []byte {
	i := bytes.Index(frame, s.marker)
	if i < 0 {
		return nil
	}
	digits := frame[i+len(s.marker):]
	end := 0
	for end < len(digits) && digits[end] >= '0' && digits[end] <= '9' {
		end++
	}
	seq, _ := strconv.ParseInt(string(digits[:end]), 10, 64)
	s.mu.Lock()
	ce := s.refused[seq]
	for k := range s.refused {
		if k <= seq { // answered, or skipped by the server
			delete(s.refused, k)
		}
	}
	s.mu.Unlock()
	if ce == nil {
		ce = newClientError(codeInsufficientPrivilege, "guard", "statement refused by rlsproxy")
	}
	return encodeError(nil, "ERROR", ce)
}

// cstring returns b up to its first NUL.
func cstring(b []byte) []byte {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		return b[:i]
	}
	return b
}
