package proxy

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"sync/atomic"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/guard"
)

// This file is the guard's wire side: it hands whole frames to the guard
// (guard/rules.go holds every rule) and turns refusals into frames that fail
// in the server in order.

// maxInspected bounds a Query, Parse or FunctionCall the guard reads whole:
// the most a session holds of one message. A longer one is refused (54000)
// without being held.
const maxInspected = 64 << 20

// sessionGuard applies the guard to one session's messages.
//
// A refused message is not answered by the proxy directly: that could
// overtake the answers to messages pipelined before it. Instead it is
// replaced by a statement that fails in the server with a syntax error; the
// server answers it in order, exactly as it answers any failed statement (a
// transaction block becomes failed, an extended-protocol batch is skipped up
// to Sync), and the relay replaces that one error, which the ledger knows
// by its place, with the guard's. Client and server so always agree on the
// transaction state.
type sessionGuard struct {
	g       *guard.Guard
	marker  string // "rlsproxy_guard_<random>": the text of substitutes
	metrics *Metrics
	// scsOff is set while the server reports standard_conforming_strings
	// off: the guard reads statements as the server will.
	scsOff atomic.Bool
}

func newSessionGuard(g *guard.Guard, m *Metrics) *sessionGuard {
	var nonce [8]byte
	_, _ = rand.Read(nonce[:])
	return &sessionGuard{g: g, metrics: m, marker: "rlsproxy_guard_" + hex.EncodeToString(nonce[:])}
}

// inspected reports the message types the guard reads.
func inspected(typ byte) bool { return typ == 'Q' || typ == 'P' || typ == 'F' }

// check judges a whole Query, Parse or FunctionCall frame. It returns the
// frame to send instead with the error to tell the client (nil: send it as
// is), and the verdict: whether the session must be re-established after
// it, and what it leaves in the session beyond its transaction.
func (s *sessionGuard) check(typ byte, frame []byte) (substitute []byte, refusal *clientError, v guard.Verdict) {
	body := frame[5:]
	var name []byte
	lex := guard.Lexing{NonStandardStrings: s.scsOff.Load()}
	switch typ {
	case 'Q':
		v = s.g.Query(cstring(body), lex)
	case 'P':
		name = cstring(body)
		v = s.g.Parse(cstring(body[min(len(name)+1, len(body)):]), lex)
	case 'F':
		if len(body) < 4 {
			return nil, nil, v // malformed: the server refuses it
		}
		v = s.g.FunctionCall(binary.BigEndian.Uint32(body))
	}
	if v.Reject == nil {
		return nil, nil, v
	}
	refusal = toClientError(v.Reject)
	return s.substitute(typ, name, refusal), refusal, guard.Verdict{}
}

// oversized returns the substitute and the refusal for a message longer
// than maxInspected.
func (s *sessionGuard) oversized(typ byte, size int) ([]byte, *clientError) {
	refusal := newClientError(codeProgramLimitExceeded, "guard_limit",
		fmt.Sprintf("message of %d bytes is longer than rlsproxy's guard reads (%d bytes)", size, maxInspected))
	return s.substitute(typ, nil, refusal), refusal
}

// substitute returns a message that fails in the server in place of a
// refused one of type typ (a Parse keeps the statement's name), and counts
// the refusal.
func (s *sessionGuard) substitute(typ byte, name []byte, refusal *clientError) []byte {
	if s.metrics != nil {
		s.metrics.guardRejections.WithLabelValues(refusal.reason).Inc()
	}
	var out []byte
	if typ == 'P' {
		out, _ = (&pgproto3.Parse{Name: string(name), Query: s.marker}).Encode(nil)
	} else {
		out, _ = (&pgproto3.Query{String: s.marker}).Encode(nil)
	}
	return out
}

// maxHeldForGuard bounds the bytes of large frames the guard must read that
// all sessions together hold while they arrive; beyond it a frame is
// refused (54000) without being held.
const maxHeldForGuard = 256 << 20

// byteBudget is a bound on bytes held across sessions.
type byteBudget struct {
	used atomic.Int64
	max  int64
}

func newByteBudget(max int64) *byteBudget { return &byteBudget{max: max} }

// take reserves n bytes, or reports false if that would pass the bound.
func (b *byteBudget) take(n int) bool {
	if b.used.Add(int64(n)) > b.max {
		b.used.Add(-int64(n))
		return false
	}
	return true
}

func (b *byteBudget) give(n int) { b.used.Add(-int64(n)) }

// parameterStatus follows the settings the server lexes statements with, as
// the server reports them: an error ends the session before another client
// message is sent.
func (s *sessionGuard) parameterStatus(body []byte) *clientError {
	var ps pgproto3.ParameterStatus
	if ps.Decode(body) != nil {
		return nil
	}
	return s.lexing(ps.Name, ps.Value)
}

// lexing checks one reported setting that decides how the server reads
// statements.
func (s *sessionGuard) lexing(name, value string) *clientError {
	switch name {
	case "standard_conforming_strings":
		s.scsOff.Store(value != "on")
	case "client_encoding":
		if err := guard.LexableEncoding(value); err != nil {
			return newClientError(codeInsufficientPrivilege, "client_encoding",
				"terminating connection: the server reports client_encoding "+value+": "+err.Error())
		}
	}
	return nil
}

// cstring returns b up to its first NUL.
func cstring(b []byte) []byte {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		return b[:i]
	}
	return b
}
