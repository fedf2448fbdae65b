package proxy

import (
	"fmt"
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
// receives is answered by exactly one ReadyForQuery. The counts tell when
// the server is idle (token expiry) and which answers belong to the proxy's
// own re-injected statements.
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

	// Server-to-client state, touched only by the code reading the server.
	recv       int64 // ReadyForQuery received
	dropping   bool  // the current unit is the proxy's own: its answers are dropped
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
	for n < len(in) && !r.ended.Load() {
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
				out = appendSegment(out, in[start:n])
				start = n
				r.frame, r.frameSize = make([]byte, 0, size), size
				continue
			}
			count(wire.Units(typ))
			r.clientPass = size
			continue
		}
		if typ == 'X' {
			// Not passed on: the upstream connection outlives the client.
			r.end(endClientTerminate, nil)
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
		count(wire.Units(typ))
		n += size
	}
	out = appendSegment(out, in[start:n])
	if !r.admit(units) {
		return n, out[:0]
	}
	return n, out
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
		// be the proxy's before they can arrive.
		r.guard.expectInjected(r.sent + u + 1)
		out = append(out, r.guard.reinject)
		u++
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
			r.end(endReinjectFailed, newClientError(codeConnectionFailure, "reinject",
				"rlsproxy could not re-establish the session's role and claims after a reset; reconnect"))
			return n, out
		case r.dropping:
			drop = true
		case typ == 'E' && r.guard != nil && whole:
			replace = r.guard.rewrite(in[n : n+size])
		}
		if typ == 'Z' && whole {
			ready++
			r.recv++
			r.up.TxStatus = in[n+5]
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
	return r.pending.Load() == 0 && !r.clientMidFrame && r.serverBoundary
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

// setStop installs the driver's wake-up. A session that ended before its
// driver started is seen by the driver's first look at ended.
func (r *relay) setStop(stop func()) {
	r.stopMu.Lock()
	r.stop = stop
	r.stopMu.Unlock()
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
