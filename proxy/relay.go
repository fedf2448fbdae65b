package proxy

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/rlsproxy/rlsproxy/guard"
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
	endServerConfused  = "upstream_protocol_error"
	endUnsafeSetting   = "unsafe_setting"
	endFrameStalled    = "client_frame_timeout"
	endIdleTimeout     = "client_idle_timeout"
)

// relay is what the proxy does with the frames of an authenticated session:
// which bytes read from one side are written to the other, and when the
// session ends. It does no I/O itself. A driver reads, hands the bytes to
// fromClient or fromServer, writes the segments they return (and, after
// fromServer, the proxy's own frames takeInject returns, upstream), and
// finishes the session once it has ended: the event loop
// (relay_loop_linux.go) for plaintext sessions, a pair of goroutines
// (relay_conn.go) otherwise.
//
// Frames are passed on as bytes: only their type byte is looked at, and only
// the few types the relay must act on are read further (Query, Parse and
// FunctionCall by the guard; ErrorResponse, ReadyForQuery, ParameterStatus
// and the answers to the proxy's own statements on the way back). Frames up
// to the read buffer's size are handled whole; a larger one is streamed
// through as it arrives, or, when the guard must read it, gathered whole
// first.
//
// What the server owes is the ledger's (ledger.go), kept from the server's
// own answers. After a client's reset (DISCARD ALL, RESET ROLE, ...) the
// client's next messages wait in the proxy until the reset is answered and
// the proxy's own batch that re-establishes role and claims is answered and
// proved; anything else ends the session, so no client statement runs as
// the login role.
type relay struct {
	// lastClientByte is when the client last sent bytes (Unix ns), and
	// midFrame whether they end inside a message: the server's watchdog
	// ends sessions stalled mid-message or idle too long (timeouts.go).
	lastClientByte atomic.Int64
	midFrame       atomic.Bool
	// acquiring: a transaction-pooled client has sent and waits for an
	// upstream connection; it is neither idle nor stalled.
	acquiring atomic.Bool

	// up is the upstream connection. In transaction mode (tx set) it
	// changes between transactions and is nil while the client holds none
	// (txpool.go).
	up *session.Upstream
	tx *txState
	// sessionState, in session mode, names why the connection may hold
	// state of the session's beyond its identity (a prepared statement, a
	// setting, ...), so that it must be reset before another session.
	sessionState string
	// settingReported, in session mode, records a ParameterStatus during
	// the session: a setting the next session must not inherit.
	settingReported bool
	metrics         *Metrics
	guard           *sessionGuard // nil with --guard off
	ledger          *ledger
	// held counts the bytes of large frames the guard must read that all
	// sessions hold while they gather them.
	held *byteBudget

	// Frames up to these sizes are handled whole: the drivers' read buffers.
	clientBuf, serverBuf int

	expired atomic.Bool
	// abortUpstream: the session ended at its token's expiry with more
	// than the running statement sent; its connection is aborted (expire).
	abortUpstream atomic.Bool
	// expiredErr is what the client is told when its token expires.
	expiredErr *clientError

	// handOffOver, when set, is the most the guard may parse for one
	// message on the driver (ParseCost): the relay stops before a message
	// that may cost more, or once the session has spent its parse budget
	// on the driver, and sets handOff, for the event loop to give the
	// session its own goroutines (a long parse there would hold up the
	// loop's other sessions).
	handOffOver int
	handOff     bool
	// parseSpent is the time the guard spent on the driver in the window
	// that began at parseWindow.
	parseSpent  time.Duration
	parseWindow time.Time

	// Client-to-server state, touched only by the code reading the client.
	clientPass int    // bytes of a large frame still to pass through
	clientDrop int    // bytes of a refused frame still to drop
	frame      []byte // a large frame the guard must read, being gathered
	frameSize  int
	// upstreamDirty records that the server may hold part of a frame: a
	// write upstream failed part-way, or the rest of a streamed frame was
	// dropped. The connection is then not reused.
	upstreamDirty bool

	// The client side waits while holding (a reset is being re-established)
	// or full (the ledger is): the server side sets released when it may
	// go on.
	holding, full atomic.Bool

	// Server-to-client state, touched only by the code reading the server.
	released   bool   // the client side may go on: the driver resumes it
	inject     []byte // the proxy's own frames, to be written upstream
	serverPass int    // bytes of a large frame still to pass through
	serverDrop int    // bytes of a large frame still to drop

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

func newRelay(up *session.Upstream, m *Metrics, sg *sessionGuard, held *byteBudget) *relay {
	if held == nil {
		held = newByteBudget(maxHeldForGuard)
	}
	return &relay{up: up, metrics: m, guard: sg, ledger: newLedger(), held: held}
}

// paused reports whether the client side must wait.
func (r *relay) paused() bool { return r.holding.Load() || r.full.Load() }

// fromClient takes bytes read from the client, appends to out the segments
// to write upstream, and returns how many bytes of in it consumed: the rest
// is an incomplete frame, to be offered again with more bytes after it.
// Segments may point into in; they must be written before in is reused.
func (r *relay) fromClient(in []byte, out [][]byte) (int, [][]byte) {
	n, start := 0, 0 // in[start:n] is scanned and not yet in out
	for n < len(in) && !r.ended.Load() && !r.paused() {
		if r.clientPass > 0 {
			k := min(r.clientPass, len(in)-n)
			r.clientPass -= k
			n += k
			continue
		}
		if r.clientDrop > 0 {
			k := min(r.clientDrop, len(in)-n)
			out = appendSegment(out, in[start:n])
			r.clientDrop -= k
			n += k
			start = n
			continue
		}
		if r.frame != nil {
			k := min(r.frameSize-len(r.frame), len(in)-n)
			if !r.held.take(k) {
				// Every session's large statements together may hold no
				// more: this one is dropped unread and refused.
				out = r.refuseGathered(out, newClientError(codeProgramLimitExceeded, "guard_limit",
					fmt.Sprintf("rlsproxy's guard already holds %d MiB of large statements of all sessions, the most it may: try again", r.held.max>>20)))
				continue
			}
			r.frame = append(r.frame, in[n:n+k]...)
			n += k
			start = n
			if len(r.frame) == r.frameSize {
				frame := r.frame
				r.frame = nil
				out = r.inspected(out, frame)
				r.held.give(len(frame))
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
		if typ == 'X' {
			// Not passed on: the upstream connection outlives the client.
			r.end(endClientTerminate, nil)
			break
		}
		if !frontendMessage(typ) {
			// PostgreSQL ends the connection too; the ledger need not know.
			r.end(endProtocolError, newClientError(codeProtocolViolation, "protocol", fmt.Sprintf("invalid frontend message type %d", typ)))
			break
		}
		if r.expired.Load() {
			// Nothing more goes upstream: the session ends once the server
			// has answered what it was sent.
			if r.ledger.quiet() {
				r.end(endTokenExpired, r.expiredErr)
			}
			n = len(in)
			start = n
			break
		}
		inspect := r.guard != nil && inspected(typ)
		if r.handOffOver > 0 && inspect && (size > r.handOffOver || r.parseBudgetSpent() ||
			size <= len(in)-n && guard.ParseCost(in[n+wire.HeaderLen:n+size]) > r.handOffOver) {
			r.handOff = true
			break
		}
		if size > len(in)-n {
			if size <= r.clientBuf {
				break // the rest will fit: wait for it
			}
			if inspect {
				out = appendSegment(out, in[start:n])
				if size > maxInspected {
					// Never held: its bytes are dropped as they come, and
					// the server fails a substitute in its place.
					substitute, refusal := r.guard.oversized(typ, size)
					r.ledger.sentRefused(substitute[0], refusal)
					out = append(out, substitute)
					start = n
					r.clientDrop = size
					continue
				}
				start = n
				// Grown as bytes come, not reserved on the word of a
				// header: a client that sends five bytes holds five.
				r.frame, r.frameSize = make([]byte, 0, min(size, r.clientBuf)), size
				continue
			}
			if r.tx != nil && typ == 'B' {
				// A Bind too large to hold: its statement's name is renamed
				// in the first part, the rest streamed through.
				prefix, ok := bindPrefix(in[n:])
				if !ok {
					if len(in)-n < r.clientBuf {
						break // the names will come
					}
					r.end(endProtocolError, newClientError(codeProtocolViolation, "protocol", "invalid Bind message from client"))
					break
				}
				out = appendSegment(out, in[start:n])
				out = r.txRef(out, in[n:n+prefix], size)
				n += prefix
				start = n
				r.clientPass = size - prefix
				continue
			}
			r.sent(typ)
			r.clientPass = size
			continue
		}
		if inspect {
			out = appendSegment(out, in[start:n])
			out = r.inspected(out, in[n:n+size])
			n += size
			start = n
			continue
		}
		if r.tx != nil && (typ == 'B' || typ == 'D' || typ == 'C') {
			out = appendSegment(out, in[start:n])
			out = r.txRef(out, in[n:n+size], size)
			n += size
			start = n
			continue
		}
		if typ == 'P' {
			r.noteParse(in[n : n+size])
		}
		r.sent(typ)
		n += size
	}
	if r.tx != nil {
		// Parse and Close frames sent while the server skips to Sync:
		// discarded.
		r.tx.stmts.undo(r.up, r.ledger.takeUndone())
	}
	r.noteClientBytes(in[n:])
	return n, appendSegment(out, in[start:n])
}

// noteClientBytes records that the client sent bytes, and whether it is in
// the middle of a message: rest is what fromClient left unread.
func (r *relay) noteClientBytes(rest []byte) {
	r.lastClientByte.Store(time.Now().UnixNano())
	mid := r.clientPass > 0 || r.clientDrop > 0 || r.frame != nil
	if !mid && len(rest) > 0 {
		_, size, ok, err := wire.Header(rest)
		mid = err == nil && (!ok || size > len(rest))
	}
	r.midFrame.Store(mid)
}

// noteParse records, in session mode, that a Parse named a statement, which
// outlives the session unless the connection is reset.
func (r *relay) noteParse(frame []byte) {
	if r.tx == nil && r.sessionState == "" && len(frame) > 5 && frame[5] != 0 {
		r.sessionState = "prepared_statement"
	}
}

// txRef sends, in transaction mode, a Bind, Describe or Close naming a
// prepared statement under its name on the server, after the frames that
// prepare it when the connection does not hold it. prefix is the whole
// frame, or for a Bind of size bytes too large to hold, its first part,
// which holds the names.
func (r *relay) txRef(out [][]byte, prefix []byte, size int) [][]byte {
	whole := len(prefix) == size
	frame := prefix
	if !whole {
		// A frame whose body is the names alone, renamed like a whole one;
		// its length is then made the whole renamed frame's.
		frame = rebuild('B', nil, prefix[5:])
	}
	pre, renamed, recs := r.tx.stmts.renameRef(r.up, frame)
	out = r.sentSilently(out, pre)
	if !whole {
		binary.BigEndian.PutUint32(renamed[1:], uint32(size-len(prefix)+len(renamed)-1))
	}
	r.ledger.sentForgetting(renamed[0], recs)
	if r.ledger.full() {
		r.full.Store(true)
	}
	return append(out, renamed)
}

// deallocated applies a DEALLOCATE the guard found in a transaction-pooled
// client's Query to the statements the proxy renamed for it: out gains
// what the connection needs first, and query is the DEALLOCATE Query of the
// statements' server names (nil: nothing to rename, the statement as sent
// stands). recs are what it drops from the connection's record of
// statements, for the ledger (statements.deallocate); later, for a Parse
// of a DEALLOCATE, which runs when executed.
func (r *relay) deallocated(v guard.Verdict, out [][]byte, later bool) ([][]byte, []byte, []stmtRecord) {
	t := r.tx
	switch {
	case v.DeallocateAll && !later:
		t.stmts.closeAll(r.up)
		return out, nil, forgetAll()
	case v.Deallocate != "":
		if pre, query, recs := t.stmts.deallocate(r.up, v.DeallocatedNames(), later); query != nil {
			return r.sentSilently(out, pre), query, recs
		}
	}
	return out, nil, nil
}

// sentSilently appends frames of the proxy's own that the client did not
// send (a statement prepared again), recorded so that their completions are
// not passed on; an error is.
func (r *relay) sentSilently(out [][]byte, pre []byte) [][]byte {
	if len(pre) == 0 {
		return out
	}
	for b := pre; len(b) >= 5; {
		_, size, _, _ := wire.Header(b)
		switch b[0] {
		case 'P':
			r.ledger.sentParse(string(cstring(b[5:size])), true)
		case 'Q':
			r.ledger.sentQuiet()
		default:
			r.ledger.sentSilent(b[0])
		}
		b = b[size:]
	}
	r.tx.metrics.reprepared.Inc()
	return append(out, pre)
}

// bindPrefix returns the length of a Bind frame's header, portal and
// statement name, if b holds them.
func bindPrefix(b []byte) (int, bool) {
	if len(b) < 5 {
		return 0, false
	}
	body := b[5:]
	i := bytes.IndexByte(body, 0)
	if i < 0 {
		return 0, false
	}
	j := bytes.IndexByte(body[i+1:], 0)
	if j < 0 {
		return 0, false
	}
	return 5 + i + 1 + j + 1, true
}

// loopParseBudget is the parse time a session may spend on an event loop
// per second before it is given goroutines of its own.
const loopParseBudget = 20 * time.Millisecond

// parseBudgetSpent reports whether the session has spent its parse budget
// on the driver in the current second.
func (r *relay) parseBudgetSpent() bool {
	if now := time.Now(); now.Sub(r.parseWindow) > time.Second {
		r.parseWindow, r.parseSpent = now, 0
	}
	return r.parseSpent > loopParseBudget
}

// refuseGathered gives up the large frame being gathered: its bytes so far
// are dropped, the rest will be as they come, and the server fails a
// substitute in its place.
func (r *relay) refuseGathered(out [][]byte, refusal *clientError) [][]byte {
	substitute := r.guard.substitute(r.frame[0], nil, refusal)
	r.ledger.sentRefused(substitute[0], refusal)
	r.clientDrop = r.frameSize - len(r.frame)
	r.dropFrame()
	return append(out, substitute)
}

// dropFrame forgets the large frame being gathered, if any.
func (r *relay) dropFrame() {
	if r.frame != nil {
		r.held.give(len(r.frame))
		r.frame = nil
	}
}

// sent records a client message in the ledger, and pauses the client side
// when the ledger is full.
func (r *relay) sent(typ byte) {
	r.ledger.sent(typ)
	if r.ledger.full() {
		r.full.Store(true)
	}
}

// inspected appends a frame the guard reads, or the substitute it makes for
// a refused one, and records it in the ledger. After a reset the client side
// waits for the session to be re-established.
func (r *relay) inspected(out [][]byte, frame []byte) [][]byte {
	var began time.Time
	if r.handOffOver > 0 {
		began = time.Now()
	}
	substitute, refusal, v := r.guard.check(frame[0], frame)
	if r.handOffOver > 0 {
		r.parseSpent += time.Since(began)
	}
	if substitute == nil {
		if refusal = r.tx.refusal(v, frame); refusal != nil {
			var name []byte
			if frame[0] == 'P' {
				name = cstring(frame[5:])
			}
			substitute, v = r.guard.substitute(frame[0], name, refusal), guard.Verdict{}
		}
	}
	var recs []stmtRecord
	if substitute == nil {
		out, frame, recs = r.stateEffects(out, frame, v)
	}
	switch {
	case substitute != nil:
		r.ledger.sentRefused(substitute[0], refusal)
		frame = substitute
	case frame == nil:
		// Replaced by the frames stateEffects sent.
	case v.Resets:
		if r.ledger.sentReset(recs) {
			r.holding.Store(true)
		}
	case recs != nil:
		r.ledger.sentForgetting(frame[0], recs)
	case r.tx != nil && frame[0] == 'P':
		r.ledger.sentParse(string(cstring(frame[5:])), false)
	default:
		r.ledger.sent(frame[0])
	}
	if r.tx != nil && frame != nil && frame[0] == 'Q' {
		// A simple Query destroys the unnamed statement, whoever's it was.
		r.up.SetUnnamedOwner(0)
	}
	if r.ledger.full() {
		r.full.Store(true)
	}
	if frame == nil {
		return out
	}
	return append(out, frame)
}

// stateEffects applies what a message the guard passed leaves in the
// session beyond its transaction: it pins a transaction-pooled client, or
// marks a session's connection for a reset; in transaction mode it renames
// prepared statements. It returns the frame to send (nil when it has
// appended to out what replaces it, and recorded it in the ledger), and
// what the frame drops from the connection's record of statements, for the
// ledger.
func (r *relay) stateEffects(out [][]byte, frame []byte, v guard.Verdict) ([][]byte, []byte, []stmtRecord) {
	if v.Pin != "" {
		if r.tx == nil {
			if r.sessionState == "" {
				r.sessionState = v.Pin
			}
		} else {
			r.tx.pin(v.Pin)
		}
	}
	switch frame[0] {
	case 'P':
		r.noteParse(frame)
		if t := r.tx; t != nil {
			if t.stmts.full() {
				t.pin("prepared_statements")
			}
			// A DEALLOCATE prepared runs when it is executed: ALL then
			// (statements.renameRef); a name is renamed now, as psycopg 3
			// deallocates through the extended protocol.
			var query []byte
			if v.Deallocate != "" {
				out, query, _ = r.deallocated(v, out, true)
			}
			if query != nil {
				name, _, _ := cut(frame[5:])
				frame, _ = (&pgproto3.Parse{Name: string(name), Query: string(cstring(query[5:]))}).Encode(nil)
			}
			frame = t.stmts.parse(r.up, frame, v.DeallocateAll, t.pinned == "")
		}
	case 'Q':
		t := r.tx
		if t == nil {
			// A DEALLOCATE ALL leaves the reason as it was: it is the
			// first one only (a later, other one was not kept), and the
			// server may not run it (a failed transaction block).
			break
		}
		var query []byte
		var recs []stmtRecord
		if out, query, recs = r.deallocated(v, out, false); query != nil {
			r.ledger.sentForgetting('Q', recs)
			return append(out, query), nil, nil
		}
		return out, frame, recs
	}
	return out, frame, nil
}

// frontendMessage reports the message types a client may send after
// startup (Terminate aside).
func frontendMessage(typ byte) bool {
	switch typ {
	case 'Q', 'P', 'B', 'D', 'E', 'C', 'S', 'H', 'F', 'd', 'c', 'f':
		return true
	}
	return false
}

// fromServer is fromClient's counterpart for bytes read from the server.
func (r *relay) fromServer(in []byte, out [][]byte) (int, [][]byte) {
	n, start := 0, 0 // in[start:n] is scanned and not yet in out
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
		body := in[n+wire.HeaderLen : min(n+size, len(in))]
		if typ == 'S' && whole {
			if r.tx != nil {
				r.tx.reported(r.up, body)
			} else {
				r.settingReported = true
			}
		}
		if typ == 'S' && whole && r.guard != nil {
			if ce := r.guard.parameterStatus(body); ce != nil {
				// What the server reports is what it lexes the next
				// statement with: nothing more of the client's is sent.
				r.end(endUnsafeSetting, ce)
				break
			}
		}
		route, refusal, ev, err := r.ledger.received(typ, body, whole)
		if t := r.tx; t != nil && typ == 'E' {
			if recs := r.ledger.takeUndone(); recs != nil {
				t.stmtsMu.Lock()
				t.stmts.undo(r.up, recs)
				t.stmtsMu.Unlock()
			}
		}
		if err != nil {
			r.end(endServerConfused, newClientError(codeConnectionFailure, "upstream_protocol",
				"rlsproxy: the upstream's answers no longer follow the protocol ("+err.Error()+"); reconnect"))
			break
		}
		switch {
		case route == toClient && whole:
			n += size
		case route == toClient:
			r.serverPass = size
		case route == replace:
			out = appendSegment(out, in[start:n])
			out = append(out, encodeError(nil, "ERROR", refusal))
			if whole {
				n += size
				start = n
			} else {
				start = n
				r.serverDrop = size
			}
		case whole: // drop
			out = appendSegment(out, in[start:n])
			n += size
			start = n
		default:
			out = appendSegment(out, in[start:n])
			start = n
			r.serverDrop = size
		}
		switch ev {
		case resetDone:
			if status := r.ledger.txStatus(); status != 'E' {
				b := r.up.Reinstall(status)
				r.ledger.sentOwn(b)
				r.inject = append(r.inject, b.Frames...)
				break
			}
			// A failed transaction block: the reset, if it ran at all,
			// was undone with it, and nothing runs until ROLLBACK.
			r.resume()
		case resetSkipped, ownDone:
			r.resume()
		}
		if r.full.Load() && !r.ledger.full() {
			r.full.Store(false)
			r.released = !r.holding.Load()
		}
	}
	out = appendSegment(out, in[start:n])
	if r.expired.Load() && r.ledger.quiet() {
		// The statement that was running when the token expired has
		// finished; its answers are in out, written before the session ends.
		r.end(endTokenExpired, r.expiredErr)
	}
	return n, out
}

// resume lets the client side go on after a reset.
func (r *relay) resume() {
	r.holding.Store(false)
	r.released = !r.full.Load()
}

// takeInject returns the proxy's own frames to write upstream, if any. Only
// the server side, which fills them, takes them.
func (r *relay) takeInject(clientSide bool) []byte {
	if clientSide {
		return nil
	}
	b := r.inject
	r.inject = nil
	return b
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

func appendSegment(out [][]byte, b []byte) [][]byte {
	if len(b) == 0 {
		return out
	}
	return append(out, b)
}

// cancelRunning cancels what the server still runs for a session that ended
// without waiting for it (the client vanished, the session was cut): closing
// the connection alone leaves a statement running, locks held, until it
// next writes. The connection is not reused (clean is false).
func (r *relay) cancelRunning(ctx context.Context, up *session.Upstream, clean bool) {
	if r.abortUpstream.Load() {
		// The reset first, then the cancel. The cancel alone would let
		// what was queued behind the running statement run; the reset
		// alone lets an extended-protocol pipeline run to its Sync, since
		// the server writes nothing before it. Cancelled, the running
		// statement's error is written at once, fails on the reset
		// connection, and the server skips the rest (to the Sync, or dies
		// at its next check for interrupts).
		up.Abort()
		_ = up.Cancel(ctx)
		return
	}
	if clean || r.ledger.quiet() {
		return
	}
	_ = up.Cancel(ctx)
}

// reusable reports whether the upstream connection can go back to the pool:
// the session ended from the client side or by expiry, between statements,
// with no frame half-sent either way.
func (r *relay) reusable() bool {
	switch r.reason {
	case endClientTerminate, endClientClosed, endTokenExpired, endIdleTimeout:
	default:
		return false
	}
	return r.ledger.reusable() && !r.clientMidFrame && !r.upstreamDirty && r.serverBoundary && len(r.inject) == 0
}

// expire is called when the session's token expires: the session ends now if
// the server is idle, else after the running statement. When the client had
// pipelined more behind it, the session ends now, its connection reset and
// the running statement cancelled (cancelRunning): the server has read the
// rest already, and would run it after the expiry.
func (r *relay) expire(e *clientError) {
	r.expiredErr = e
	r.expired.Store(true)
	switch {
	case r.ledger.quiet():
		r.end(endTokenExpired, e)
	case r.ledger.queued():
		r.abortUpstream.Store(true)
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
