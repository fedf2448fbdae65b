package proxy

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/rlsproxy/rlsproxy/internal/wire"
	"github.com/rlsproxy/rlsproxy/session"
)

// Why a session ended, as counted in rlsproxy_sessions_ended_total.
const (
	endClientTerminate = "client_terminate"
	endClientClosed    = "client_closed"
	endServerClosed    = "server_closed"
	endTokenExpired    = "token_expired"
	endShutdown        = "shutdown"
	endProtocolError   = "protocol_error"
	endReinjectFailed  = "reinject_failed"
)

// relay is what the proxy does with the frames of an authenticated session:
// which bytes read from one side are written to the other, and when the
// session ends. It does no I/O itself. A driver reads, hands the bytes to
// fromClient or fromServer, writes the segments they return, and finishes
// the session once it has ended: the event loop (relay_loop_linux.go) for
// plaintext sessions, a pair of goroutines (relay_conn.go) otherwise.
//
// Frames are passed on as bytes: only their type byte is looked at, and only
// the few types the relay must act on are read further (Query, Parse and
// FunctionCall by the guard; ReadyForQuery and ErrorResponse on the way
// back). Frames up to the read buffer's size are handled whole; a larger one
// is streamed through as it arrives, or, when the guard must read it,
// gathered whole first.
//
// Work is counted in units: each Query, Sync and FunctionCall the server
// receives is answered by exactly one ReadyForQuery, except where PostgreSQL
// ignores them, which track follows (a Sync during COPY FROM STDIN). The
// counts tell when the server is idle (token expiry) and which answers
// belong to the proxy's own re-injected statements. Where the count cannot
// be known (a Query inside an unfinished extended-query batch, which
// PostgreSQL skips after an error), the session ends. The re-injected
// answers are checked for their mark besides, and the client is held back
// until they are in, so a count gone wrong ends the session rather than let
// a client statement run under the login role.
type relay struct {
	up      *session.Upstream
	metrics *Metrics
	guard   *sessionGuard // nil with --guard off

	// Frames up to these sizes are handled whole: the drivers' read buffers.
	clientBuf, serverBuf int

	// pending counts the ReadyForQuery messages the server still owes.
	pending atomic.Int64
	expired atomic.Bool
	// expiredErr is what the client is told when its token expires.
	expiredErr *clientError

	// handOffOver, when set, is the largest frame the guard reads that the
	// driver takes: the relay stops before a larger one and sets handOff,
	// for the event loop to give the session its own goroutines (a long
	// parse there would hold up the loop's other sessions).
	handOffOver int
	handOff     bool

	// Client-to-server state, touched only by the code reading the client.
	sent       int64  // units sent upstream
	clientPass int    // bytes of a large frame still to pass through
	frame      []byte // a large frame the guard must read, being gathered
	frameSize  int
	batchOpen  bool  // extended-query messages sent since the last Sync
	copyIn     bool  // the client is sending COPY data
	syncs      int64 // Syncs counted since the last Query or Execute
	ignored    int64 // of those, found to be ignored by the server (see track)
	// upstreamDirty records that the server may hold part of a frame: a
	// write upstream failed part-way, or the rest of a streamed frame was
	// dropped. The connection is then not reused.
	upstreamDirty bool

	// holding is set from a reset's re-injection until its answers are in:
	// the client's later messages wait (see sessionGuard).
	holding atomic.Bool

	// Server-to-client state, touched only by the code reading the server.
	recv       int64 // ReadyForQuery received
	dropping   bool  // the current unit is the proxy's own: its answers are dropped
	marked     bool  // the dropped unit carried the re-injection's mark
	released   bool  // holding was cleared: the driver resumes the client side
	serverPass int   // bytes of a large frame still to pass through
	serverDrop int   // bytes of a large frame still to drop

	// Set by the driver once the session has ended: whether the client left
	// a frame half-sent upstream, and whether the server side stopped
	// between frames.
	clientMidFrame bool
	serverBoundary bool

	endOnce sync.Once
	ended   atomic.Bool
	reason  string
	fatal   *clientError // told to the client as the session ends, if set
	stopMu  sync.Mutex
	stop    func() // wakes the driver to finish the session (setStop)

	bytesUp, bytesDown atomic.Int64
}

func newRelay(up *session.Upstream, m *Metrics, g *sessionGuard) *relay {
	return &relay{up: up, metrics: m, guard: g}
}

// fromClient takes bytes read from the client, appends to out the segments
// to write upstream, and returns how many bytes of in it consumed: the rest
// is an incomplete frame, to be offered again with more bytes after it.
// Segments may point into in; they must be written before in is reused.
func (r *relay) fromClient(in []byte, out [][]byte) (int, [][]byte) {
	n, start := 0, 0 // in[start:n] is scanned and not yet in out
	units := int64(0)
	count := func(u int64) { units += u; r.sent += u }
	passing := r.clientPass > 0
	for n < len(in) && !r.ended.Load() && !r.holding.Load() {
		if r.clientPass > 0 {
			k := min(r.clientPass, len(in)-n)
			r.clientPass -= k
			n += k
			continue
		}
		if r.frame != nil {
			k := min(r.frameSize-len(r.frame), len(in)-n)
			r.frame = append(r.frame, in[n:n+k]...)
			n += k
			start = n
			if len(r.frame) == r.frameSize {
				frame := r.frame
				r.frame = nil
				sub, resets := r.guard.check(frame[0], frame)
				out = r.checked(out, frame, sub, resets, count)
			}
			continue
		}
		typ, size, ok, err := wire.Header(in[n:])
		if err != nil {
			r.end(endProtocolError, newClientError(codeProtocolViolation, "protocol", "invalid frame from client: "+err.Error()))
			break
		}
		if !ok {
			break
		}
		if r.handOffOver > 0 && r.guard != nil && inspected(typ) && size > r.handOffOver {
			r.handOff = true
			break
		}
		if size > len(in)-n {
			if size <= r.clientBuf {
				break // the rest will fit: wait for it
			}
			if r.guard != nil && inspected(typ) {
				if size > maxInspected {
					r.end(endProtocolError, newClientError(codeProtocolViolation, "protocol",
						fmt.Sprintf("message of %d bytes is larger than rlsproxy's guard reads (%d)", size, maxInspected)))
					break
				}
				if _, ok := r.track(typ); !ok {
					break
				}
				out = appendSegment(out, in[start:n])
				start = n
				r.frame, r.frameSize = make([]byte, 0, size), size
				continue
			}
			u, ok := r.track(typ)
			if !ok {
				break
			}
			count(u)
			r.clientPass = size
			continue
		}
		if typ == 'X' {
			// Not passed on: the upstream connection outlives the client.
			r.end(endClientTerminate, nil)
			break
		}
		u, ok := r.track(typ)
		if !ok {
			break
		}
		if r.guard != nil && inspected(typ) {
			if sub, resets := r.guard.check(typ, in[n:n+size]); sub != nil || resets {
				out = appendSegment(out, in[start:n])
				out = r.checked(out, in[n:n+size], sub, resets, count)
				n += size
				start = n
				continue
			}
		}
		count(u)
		n += size
	}
	out = appendSegment(out, in[start:n])
	ok := r.admit(units)
	if r.ignored > 0 {
		// Counted earlier, never to be answered. (If this call was refused
		// for expiry, some may be taken off twice: the count then runs low,
		// which only ends the expired session sooner and keeps its
		// connection out of the pool.)
		if r.pending.Add(-r.ignored) <= 0 && r.expired.Load() {
			r.end(endTokenExpired, r.expiredErr)
		}
		r.ignored = 0
	}
	if !ok {
		if passing || r.clientPass > 0 {
			r.upstreamDirty = true
		}
		return n, out[:0]
	}
	return n, out
}

// track follows the client's side of the protocol, one frame at a time, as
// far as the unit count needs, and returns the units the frame is answered
// with. It reports false, having ended the session, for a sequence whose
// answers cannot be counted.
func (r *relay) track(typ byte) (units int64, ok bool) {
	switch typ {
	case 'P', 'B', 'D', 'C':
		r.batchOpen = true
	case 'E':
		r.batchOpen = true
		r.syncs = 0
	case 'S':
		r.batchOpen = false
		if r.copyIn {
			return 0, true // PostgreSQL ignores Sync during COPY FROM STDIN
		}
		r.syncs++
		return 1, true
	case 'Q', 'F':
		if r.batchOpen {
			// After an error PostgreSQL skips every message up to Sync, this
			// one too: whether it is answered cannot be known here.
			r.end(endProtocolError, newClientError(codeProtocolViolation, "protocol",
				"rlsproxy does not relay a Query or FunctionCall inside an unfinished extended-query batch: send Sync first"))
			return 0, false
		}
		r.copyIn = false
		r.syncs = 0
		return 1, true
	case 'd', 'c', 'f':
		if !r.copyIn {
			// The server is in COPY FROM STDIN, begun by the last Query or
			// Execute, so it ignored the Syncs sent since (libpq sends one
			// right behind an Execute, and another after CopyDone).
			r.copyIn = true
			r.sent -= r.syncs
			r.ignored += r.syncs
			r.syncs = 0
		}
		if typ != 'd' {
			r.copyIn = false
		}
	}
	return 0, true
}

// checked appends an inspected frame, or the substitute the guard made for
// it, and after a reset the frames that re-establish the session.
func (r *relay) checked(out [][]byte, frame, substitute []byte, resets bool, count func(int64)) [][]byte {
	if substitute != nil {
		count(wire.Units(substitute[0]))
		return append(out, substitute)
	}
	u := wire.Units(frame[0])
	out = append(out, frame)
	if resets {
		// Registered before the frame is written, so the answers are known to
		// be the proxy's before they can arrive. Nothing more of the client's
		// goes upstream until they are in.
		r.guard.expectInjected(r.sent + u + 1)
		out = append(out, r.guard.reinject)
		u++
		r.holding.Store(true)
	}
	count(u)
	return out
}

// admit accounts for units about to be sent upstream. Once the token has
// expired nothing more is sent: the session ends when the server is idle.
func (r *relay) admit(units int64) bool {
	if units > 0 {
		r.pending.Add(units)
	}
	if r.expired.Load() {
		if r.pending.Add(-units) == 0 {
			r.end(endTokenExpired, r.expiredErr)
		}
		return false
	}
	return true
}

// fromServer is fromClient's counterpart for bytes read from the server.
func (r *relay) fromServer(in []byte, out [][]byte) (int, [][]byte) {
	n, start := 0, 0 // in[start:n] is scanned and not yet in out
	ready := int64(0)
	for n < len(in) && !r.ended.Load() {
		if r.serverPass > 0 {
			k := min(r.serverPass, len(in)-n)
			r.serverPass -= k
			n += k
			continue
		}
		if r.serverDrop > 0 {
			k := min(r.serverDrop, len(in)-n)
			out = appendSegment(out, in[start:n])
			r.serverDrop -= k
			n += k
			start = n
			continue
		}
		typ, size, ok, err := wire.Header(in[n:])
		if err != nil {
			r.end(endProtocolError, newClientError(codeProtocolViolation, "protocol", "invalid frame from upstream: "+err.Error()))
			break
		}
		if !ok {
			break
		}
		whole := size <= len(in)-n
		if !whole && size <= r.serverBuf {
			break // the rest will fit: wait for it
		}
		var replace []byte
		drop := false
		switch {
		case r.dropping && (typ == 'A' || typ == 'S'):
			// Notifications and parameter changes are the client's.
		case r.dropping && typ == 'E':
			r.end(endReinjectFailed, errReinject)
			return n, out
		case r.dropping:
			drop = true
			if typ == 'D' && whole && r.guard.marks(in[n:n+size]) {
				r.marked = true
			}
		case typ == 'E' && r.guard != nil && whole:
			replace = r.guard.rewrite(in[n : n+size])
		case typ == 'D' && r.guard != nil && r.holding.Load() && r.guard.marks(in[n:min(n+size, len(in))]):
			// The re-injection's answers, taken for the client's: the count
			// of units has gone wrong.
			r.end(endReinjectFailed, errReinject)
			return n, out
		}
		if typ == 'Z' && whole {
			ready++
			r.recv++
			r.up.TxStatus = in[n+5]
			if r.dropping {
				if !r.marked {
					r.end(endReinjectFailed, errReinject)
					return n, out
				}
				r.marked = false
				r.holding.Store(false)
				r.released = true
			}
			r.dropping = r.guard != nil && r.guard.isInjected(r.recv+1)
		}
		switch {
		case !whole && drop:
			out = appendSegment(out, in[start:n])
			start = n
			r.serverDrop = size
		case !whole:
			r.serverPass = size
		case drop || replace != nil:
			out = appendSegment(out, in[start:n])
			if replace != nil {
				out = append(out, replace)
			}
			n += size
			start = n
		default:
			n += size
		}
	}
	out = appendSegment(out, in[start:n])
	if ready > 0 && r.pending.Add(-ready) == 0 && r.expired.Load() {
		// The statement that was running when the token expired has
		// finished; its answers are in out, written before the session ends.
		r.end(endTokenExpired, r.expiredErr)
	}
	return n, out
}

// lost ends the session after a failed read or write on the client side or
// the server side. An error from the goroutine driver's own stop deadlines
// means the session had ended already.
func (r *relay) lost(clientSide bool, err error) {
	if isStop(err) {
		return
	}
	if clientSide {
		r.end(endClientClosed, nil)
		return
	}
	if err == nil {
		err = io.ErrShortWrite
	}
	r.end(endServerClosed, upstreamLost(err))
}

// upstreamLost is what the client is told when the upstream connection fails.
func upstreamLost(err error) *clientError {
	msg := "rlsproxy: lost the upstream connection: " + err.Error()
	if errors.Is(err, io.EOF) {
		msg = "rlsproxy: the upstream server closed the connection"
	}
	return newClientError(codeConnectionFailure, "upstream", msg)
}

// errReinject ends a session whose role and claims could not be shown to be
// back after a reset.
var errReinject = newClientError(codeConnectionFailure, "reinject",
	"rlsproxy could not re-establish the session's role and claims after a reset; reconnect")

func appendSegment(out [][]byte, b []byte) [][]byte {
	if len(b) == 0 {
		return out
	}
	return append(out, b)
}

// reusable reports whether the upstream connection can go back to the pool:
// the session ended from the client side or by expiry, between statements,
// with no frame half-sent either way.
func (r *relay) reusable() bool {
	switch r.reason {
	case endClientTerminate, endClientClosed, endTokenExpired:
	default:
		return false
	}
	return r.pending.Load() == 0 && !r.clientMidFrame && !r.upstreamDirty && r.serverBoundary
}

// expire is called when the session's token expires: the session ends now if
// the server is idle, else after the running statement.
func (r *relay) expire(e *clientError) {
	r.expiredErr = e
	r.expired.Store(true)
	if r.pending.Load() == 0 {
		r.end(endTokenExpired, e)
	}
}

// end records, once, why the session ended and what the client is told,
// and wakes the driver to finish it.
func (r *relay) end(reason string, fatal *clientError) {
	r.endOnce.Do(func() {
		r.reason, r.fatal = reason, fatal
		r.ended.Store(true)
		r.stopMu.Lock()
		defer r.stopMu.Unlock()
		if r.stop != nil {
			r.stop()
		}
	})
}

// setStop installs the driver's wake-up, and calls it at once if the
// session has ended already.
func (r *relay) setStop(stop func()) {
	r.stopMu.Lock()
	defer r.stopMu.Unlock()
	r.stop = stop
	if r.ended.Load() {
		stop()
	}
}

// count adds relayed bytes to the session's and the metrics' totals.
func (r *relay) count(up bool, n int) {
	if n == 0 {
		return
	}
	if up {
		r.bytesUp.Add(int64(n))
		r.metrics.bytesUp.Add(float64(n))
		return
	}
	r.bytesDown.Add(int64(n))
	r.metrics.bytesDown.Add(float64(n))
}
