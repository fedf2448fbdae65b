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
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/guard"
	"github.com/rlsproxy/rlsproxy/internal/wire"
	"github.com/rlsproxy/rlsproxy/session"
)

// Transaction pooling: a client holds an upstream connection only from its
// first message after the server reported idle until the server reports
// idle again with nothing owed (ReadyForQuery 'I', the ledger settled); an
// idle client holds none. Before the client's first message on a connection
// that last served another identity, the proxy installs the client's role,
// claims and signature there, pipelined ahead of the message, its answers
// proved and dropped as for a reset's re-installation (ledger.go). What
// cannot follow the client to another connection (session settings the
// proxy does not carry, LISTEN, temporary objects, WITH HOLD cursors,
// session advisory locks, SQL PREPARE) is recognised by the guard
// (guard/state.go) and pins the client to its connection for the rest of
// its session; prepared statements follow it (prepared.go), and so do the
// settings the server reports in ParameterStatus (application_name,
// TimeZone, ...).
//
// The relay's logic is the session mode's (relay.go); this file is its
// driver in transaction mode: a goroutine reading the client for the
// session's life, and one reading the server while a connection is
// attached.

// PoolMode is how long a client holds an upstream connection.
type PoolMode int

const (
	// SessionPooling: from login to logout.
	SessionPooling PoolMode = iota
	// TransactionPooling: for each transaction.
	TransactionPooling
)

// txState is what a transaction-pooled session keeps between transactions.
type txState struct {
	pool    *session.Pool
	target  *session.Target
	stmts   *statements
	live    *liveSessions
	metrics *Metrics
	log     *slog.Logger
	// refuse refuses what would pin (Config.RefuseSessionState).
	refuse bool

	// mu orders attaching and detaching against the client side's sends:
	// the relay's up is set and cleared under it, and sending marks a
	// client write under way, during which the connection stays.
	mu      sync.Mutex
	sending bool
	// nudged asks the server side to check whether it may detach (the
	// client side wrote nothing the server will answer).
	nudged atomic.Bool

	// stmtsMu orders what the client side does to the statements (and to
	// the attached connection's record of them) against what the server
	// side learns of them (an error, ReadyForQuery).
	stmtsMu sync.Mutex

	// pinned, once set, names why the client keeps its connection for the
	// rest of its session.
	pinned string
	// carried are the client's values of session.CarriedSettings, as the servers
	// reported them to it; carriedSig is their session.CarriedSignature.
	carried    map[string]string
	carriedSig string

	// cancels counts CancelRequests under way to the attached connection:
	// it is not handed to another client before they are delivered.
	cancels sync.WaitGroup
}

// pin keeps the client on its connection for the rest of its session.
func (t *txState) pin(reason string) bool {
	if t == nil || t.pinned != "" {
		return false
	}
	t.pinned = reason
	t.metrics.pinned.WithLabelValues(reason).Inc()
	t.log.Info("session pinned to its upstream connection", "reason", reason)
	return true
}

// refusal is the error for a client message transaction pooling cannot
// pass on: a DEALLOCATE among other statements, a name in the proxy's
// statement namespace, a Parse past the names a client may keep, and, when
// pinning is refused (Config.RefuseSessionState), a statement that would
// pin; nil when it may pass.
func (t *txState) refusal(v guard.Verdict, frame []byte) *clientError {
	if t != nil && v.DeallocateMixed {
		return newClientError(codeFeatureNotSupported, "deallocate_mixed",
			"rlsproxy (transaction pooling) renames prepared statements per connection: send DEALLOCATE of a named statement as a query of its own, not with other statements")
	}
	if t != nil {
		// The proxy's names for the prepared statements of the clients
		// sharing the connection (the client's own too): none is the
		// client's to run, or to make, by name.
		for _, name := range v.ExecutedNames() {
			if strings.HasPrefix(name, statementPrefix) {
				return newClientError(codeInvalidStatementName, "statement_namespace",
					fmt.Sprintf("prepared statement %q does not exist", name))
			}
		}
		for _, name := range v.PreparedNames() {
			if strings.HasPrefix(name, statementPrefix) {
				return newClientError(codeFeatureNotSupported, "statement_namespace",
					fmt.Sprintf("rlsproxy (transaction pooling) keeps the prepared statement names beginning %q for its own: name %q otherwise", statementPrefix, name))
			}
		}
	}
	if t != nil && frame[0] == 'P' && t.stmts.tooMany(cstring(frame[5:])) {
		return newClientError(codeProgramLimitExceeded, "prepared_statements",
			fmt.Sprintf("rlsproxy (transaction pooling) keeps at most %d prepared statements per client: close some (Close, DEALLOCATE)", maxNames))
	}
	if t == nil || !t.refuse || v.Pin == "" || t.pinned != "" {
		return nil
	}
	text := frame[5:]
	if frame[0] == 'P' {
		text = text[min(len(cstring(text))+1, len(text)):]
	}
	text = cstring(text)
	if len(text) > 80 {
		text = append(text[:77:77], "..."...)
	}
	return newClientError(codeFeatureNotSupported, "session_state", fmt.Sprintf(
		"rlsproxy (transaction pooling) refuses %q: it would leave %s in the session's upstream connection, which the next transaction may not have; use SET LOCAL or set_config(..., true), ON COMMIT DROP, or the _xact_ forms of advisory locks, or connect to a session-pooled rlsproxy",
		text, pinWords[v.Pin]))
}

// pinWords say what each pin reason leaves behind.
var pinWords = map[string]string{
	guard.PinSet:                    "a setting changed for the session",
	guard.PinSessionCharacteristics: "session transaction characteristics",
	guard.PinListen:                 "a LISTEN",
	guard.PinTempObject:             "a temporary object",
	guard.PinHoldCursor:             "a WITH HOLD cursor",
	guard.PinAdvisoryLock:           "a session-level advisory lock",
	guard.PinPrepare:                "an SQL prepared statement",
	guard.PinLoad:                   "a loaded library",
	guard.PinCode:                   "whatever a DO block does",
	guard.PinDblink:                 "a dblink connection",
	guard.PinUnparsed:               "something the guard could not read",
	guard.PinPreparedReset:          "a reset run out of the proxy's sight",
}

// reported follows a ParameterStatus from the attached connection: the
// connection's value, and the client's, which its later connections are
// given.
func (t *txState) reported(up *session.Upstream, body []byte) {
	var ps pgproto3.ParameterStatus
	if ps.Decode(body) != nil {
		return
	}
	if up != nil {
		up.SetParameter(ps.Name, ps.Value)
	}
	if slices.Contains(session.CarriedSettings, ps.Name) && t.carried[ps.Name] != ps.Value {
		t.carried[ps.Name] = ps.Value
		t.carriedSig = session.CarriedSignature(t.carried)
	}
}

// extra returns the carried settings up must be given for the client: those
// whose value there is not the client's, or, when the install resets the
// connection's settings first (a change of identity: RESET ALL), those
// whose value the connection had at login is not the client's.
func (t *txState) extra(up *session.Upstream, reset bool) []session.Setting {
	if !reset && t.carriedSig == up.CarriedSignature() {
		return nil // the same values: the common case, one comparison
	}
	var out []session.Setting
	for _, name := range session.CarriedSettings {
		have := up.Parameter(name)
		if reset {
			have = up.InitialParameter(name)
		}
		if v, ok := t.carried[name]; ok && have != v {
			out = append(out, session.Setting{Name: name, Value: v})
		}
	}
	return out
}

// liveSessions are the transaction-pooled sessions alive, by number: the
// statements of a session that ended are closed on each connection before
// its next client (relay.sweep), so that no client finds another's in
// pg_prepared_statements.
type liveSessions struct {
	mu  sync.Mutex
	ids map[uint64]struct{}
	// ended counts the sessions that ended: a connection swept at that
	// count holds no statement of an ended session.
	ended atomic.Uint64
}

func (l *liveSessions) add(id uint64) {
	l.mu.Lock()
	if l.ids == nil {
		l.ids = map[uint64]struct{}{}
	}
	l.ids[id] = struct{}{}
	l.mu.Unlock()
}

func (l *liveSessions) remove(id uint64) {
	l.mu.Lock()
	delete(l.ids, id)
	l.mu.Unlock()
	l.ended.Add(1)
}

// sweep returns the Close frames, recorded in the ledger as the proxy's own,
// of the statements on up of sessions that ended.
func (r *relay) sweep(up *session.Upstream) []byte {
	t := r.tx
	ended := t.live.ended.Load()
	if up.Swept() == ended {
		return nil
	}
	var dead []uint64
	t.live.mu.Lock()
	up.PreparedOwners(func(owner uint64) {
		if _, alive := t.live.ids[owner]; !alive {
			dead = append(dead, owner)
		}
	})
	t.live.mu.Unlock()
	up.SetSwept(ended)
	var pre []byte
	for _, owner := range dead {
		for _, name := range up.DropPrepared(owner) {
			pre, _ = (&pgproto3.Close{ObjectType: 'S', Name: name}).Encode(pre)
			r.ledger.sentSilent('C')
		}
	}
	return pre
}

// Cancel cancels the statement of the connection the session holds now, if
// any: an idle client's cancel reaches nothing, as it would reach an idle
// backend.
func (r *relay) Cancel(ctx context.Context) error {
	t := r.tx
	t.mu.Lock()
	up := r.up
	if up != nil {
		t.cancels.Add(1)
	}
	t.mu.Unlock()
	if up == nil {
		return nil
	}
	defer t.cancels.Done()
	return up.Cancel(ctx)
}

// runTx drives a transaction-pooled session with goroutines: this one reads
// the client for the session's life; serveUpstream reads the attached
// connection. first is a connection the session holds already (the one its
// startup used), or nil. It returns once the session has ended, with the
// connection it held, if any, released.
func (r *relay) runTx(client net.Conn, clientR *wire.Reader, first *session.Upstream) {
	t := r.tx
	r.clientBuf, r.serverBuf = clientR.Size(), first.Reader().Size()
	resume := make(chan struct{}, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r.setStop(func() {
		now := time.Now()
		_ = client.SetReadDeadline(now)
		_ = client.SetWriteDeadline(now.Add(time.Second))
		t.mu.Lock()
		if r.up != nil {
			_ = r.up.Conn().SetReadDeadline(now)
			_ = r.up.Conn().SetWriteDeadline(now.Add(time.Second))
		}
		t.mu.Unlock()
		cancel()
		select {
		case resume <- struct{}{}:
		default:
		}
	})
	var served chan struct{} // closed when the attached connection's reader stops
	var out [][]byte
	var pre []byte
	if first != nil {
		// The startup's connection goes back at once: the client's first
		// message acquires one like any other (most likely this one).
		t.mu.Lock()
		r.up = nil
		t.mu.Unlock()
		// A cancel the client sent as soon as it had its key is on its way
		// to this backend: it must land before another client's statement
		// can, as at every other hand-over.
		t.cancels.Wait()
		t.pool.Return(first)
	}
	for !r.ended.Load() {
		ready := len(clientR.Buffered()) > 0 && !r.paused()
		if ready && !r.sendable(clientR) {
			// Part of a message, held until it is whole: the stall and
			// idle clocks (timeouts.go) see it as fromClient would.
			r.noteClientBytes(clientR.Buffered())
			ready = false
		}
		if ready {
			t.mu.Lock()
			up := r.up
			if up == nil {
				t.mu.Unlock()
				if b := clientR.Buffered(); b[0] == 'X' {
					r.end(endClientTerminate, nil) // no connection needed to say goodbye
					break
				}
				if r.expired.Load() {
					// No new transaction after the token expired.
					r.end(endTokenExpired, r.expiredErr)
					break
				}
				if served != nil {
					<-served // the last connection's reader has handed it back
				}
				var err error
				r.acquiring.Store(true)
				up, pre, err = r.acquire(ctx)
				r.acquiring.Store(false)
				if err != nil {
					if !r.ended.Load() {
						r.end(endPoolExhausted, toClientError(err))
					}
					break
				}
				served = r.attach(up, client, resume)
			} else {
				t.sending = true
				t.mu.Unlock()
			}

			if len(pre) > 0 && r.holding.Load() {
				// An install goes alone; sending stays set, so that the
				// connection is not let go between its answers and the
				// client's frames.
				wrote := r.write(up.Conn(), [][]byte{pre}, true)
				pre = nil
				if !wrote || r.ended.Load() {
					break
				}
				continue // paused until the install is answered
			}
			var n int
			t.stmtsMu.Lock()
			n, out = r.fromClient(clientR.Buffered(), out[:0])
			t.stmtsMu.Unlock()
			if len(pre) > 0 {
				out = append([][]byte{pre}, out...)
				pre = nil
			}
			wrote := r.write(up.Conn(), out, true)
			clientR.Discard(n)

			t.mu.Lock()
			t.sending = false
			if wrote && r.up == up && r.ledger.idle() {
				// The server owes nothing (what was sent is never answered,
				// or was answered while this side wrote): the server side,
				// waiting for an answer, checks whether it may let go. Under
				// mu, so that the connection is still this session's.
				t.nudged.Store(true)
				_ = up.Conn().SetReadDeadline(time.Now())
			}
			t.mu.Unlock()
			if r.ended.Load() {
				break
			}
		}
		if r.paused() {
			<-resume
			continue
		}
		if n := len(clientR.Buffered()); n > 0 && n < clientR.Size() && wholeFrame(clientR) {
			continue // a whole frame is waiting: relay it first
		}
		if err := clientR.Fill(); err != nil {
			r.lost(true, err)
			break
		}
	}
	r.clientMidFrame = r.clientPass > 0
	if served != nil {
		<-served
	}
	t.mu.Lock()
	up := r.up
	r.up = nil
	t.mu.Unlock()
	if up != nil {
		t.cancels.Wait()
		rctx, rcancel := context.WithTimeout(context.Background(), 5*time.Second)
		clean := r.reusable()
		r.cancelRunning(rctx, up, clean)
		t.pool.Release(rctx, up, clean, r.stateful(up), r.ledger.txStatus())
		rcancel()
	}
	if r.fatal != nil {
		_ = client.SetDeadline(time.Now().Add(time.Second))
		_, _ = client.Write(encodeError(nil, "FATAL", r.fatal))
	}
	_ = client.Close()
}

// wholeFrame reports whether the client's bytes begin with a whole frame.
func wholeFrame(b *wire.Reader) bool {
	_, _, complete, _, err := b.Peek()
	return err == nil && complete
}

// sendable reports whether the client's bytes may go upstream now. Holding
// a connection, any may (a frame larger than the buffer is streamed); else
// a connection is taken only for a whole frame, one larger than the buffer,
// or bytes that are no frame (fromClient refuses them): a message arriving
// in pieces takes one connection, once.
func (r *relay) sendable(b *wire.Reader) bool {
	t := r.tx
	t.mu.Lock()
	attached := r.up != nil
	t.mu.Unlock()
	if attached {
		return true
	}
	_, size, complete, ok, err := b.Peek()
	return err != nil || complete || (ok && size > b.Size())
}

// acquire waits for a connection for the client's next transaction, and
// returns the frames to send ahead of the client's: the client's identity
// and carried settings, when the connection holds others.
func (r *relay) acquire(ctx context.Context) (*session.Upstream, []byte, error) {
	t := r.tx
	began := time.Now()
	up, installed, err := t.pool.Acquire(ctx, t.target)
	t.metrics.poolWait.Observe(time.Since(began).Seconds())
	if err != nil {
		return nil, nil, err
	}
	return up, r.prepare(up, installed), nil
}

// prepare returns the frames to send on up, just acquired, ahead of the
// client's: the closing of ended sessions' statements, and the client's
// identity and carried settings where up holds others (installed: up holds
// the client's identity).
func (r *relay) prepare(up *session.Upstream, installed bool) []byte {
	t := r.tx
	// The ledger is idle, as it was when the last connection was let go:
	// it carries over.
	pre := r.sweep(up)
	if !installed && r.guard != nil && r.guard.g.AllowsCode() {
		// Code the guard does not see into (--guard-allow-code), run by a
		// client of the identity last installed, could have replaced
		// another client's statement under its name (they are listed in
		// pg_prepared_statements), which would then run as that client:
		// no statement made before outlives a change of identity.
		q, _ := (&pgproto3.Query{String: "DEALLOCATE ALL"}).Encode(nil)
		r.ledger.sentQuiet()
		up.ForgetPrepared()
		pre = append(pre, q...)
	}
	if extra := t.extra(up, !installed); !installed || len(extra) > 0 {
		b := up.Switch(t.target.Grant, extra)
		r.ledger.sentOwn(b)
		pre = append(pre, b.Frames...)
		// The client's frames wait for the install's answers (ownDone
		// resumes them): an install that fails (its own statement's error,
		// a cancel, a lock table or statement_timeout the last session
		// left) is rolled back at its Sync, and whatever came behind it
		// would run as the identity installed before.
		r.holding.Store(true)
	}
	return pre
}

// attach makes up the session's connection and starts reading it, with a
// client write under way (sending), which the client side clears: the
// reader must not let go of the connection before it is done.
func (r *relay) attach(up *session.Upstream, client net.Conn, resume chan struct{}) chan struct{} {
	t := r.tx
	t.nudged.Store(false)
	t.mu.Lock()
	r.up = up
	t.sending = true
	t.mu.Unlock()
	served := make(chan struct{})
	go func() {
		defer close(served)
		r.serveUpstream(up, client, resume)
	}()
	return served
}

// serveUpstream relays the attached connection's answers to the client until
// the transaction is over (the connection then goes back to the pool) or the
// session ends.
func (r *relay) serveUpstream(up *session.Upstream, client net.Conn, resume chan struct{}) {
	t := r.tx
	src := up.Reader()
	var out [][]byte
	detached := false
	for !r.ended.Load() {
		var n int
		n, out = r.fromServer(src.Buffered(), out[:0])
		r.write(client, out, false)
		src.Discard(n)
		if own := r.takeInject(false); own != nil {
			if _, err := up.Conn().Write(own); err != nil {
				r.upstreamDirty = true
				r.lost(false, err)
			}
		}
		if r.ended.Load() {
			break
		}
		if r.released {
			r.released = false
			select {
			case resume <- struct{}{}:
			default:
			}
		}
		if r.mayDetach(up, src) {
			detached = true
			break
		}
		if err := src.Fill(); err != nil {
			if r.ended.Load() {
				break
			}
			// Taken with the deadline under mu, as the client side sets
			// them: else a nudge set between the two would lose its flag
			// here and its deadline would end the session.
			t.mu.Lock()
			nudged := t.nudged.Swap(false)
			if nudged && isStop(err) {
				_ = up.Conn().SetReadDeadline(time.Time{})
			}
			t.mu.Unlock()
			if nudged && isStop(err) {
				continue
			}
			if isStop(err) {
				// A deadline nobody here set: the connection is unusable.
				err = errors.New("the upstream read timed out")
			}
			r.lost(false, err)
			break
		}
	}
	r.serverBoundary = len(src.Buffered()) == 0 && r.serverPass == 0 && r.serverDrop == 0
	if !detached {
		return // the session ended: runTx releases the connection
	}
	t.cancels.Wait()
	_ = up.Conn().SetDeadline(time.Time{})
	if statementsOverflow(up) {
		// Statements of clients long gone pile up, or some are not on
		// record: reset, which drops them.
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		t.pool.Release(rctx, up, true, true, 'I')
		cancel()
		return
	}
	t.pool.Return(up)
}

// maxStatementsPerConnection bounds the renamed statements a connection
// keeps for the clients it served; past it, it is reset before its next
// client.
const maxStatementsPerConnection = 5000

// statementsOverflow reports whether up must be reset before its next
// client for the statements it holds: more than it may keep, or some that
// are not on record.
func statementsOverflow(up *session.Upstream) bool {
	return up.PreparedCount() > maxStatementsPerConnection || up.PreparedUnknown()
}

// mayDetach lets go of up when the transaction is over: the server idle,
// out of any transaction block, every answer relayed, nothing of the
// client's half-sent, and the client not pinned.
func (r *relay) mayDetach(up *session.Upstream, src *wire.Reader) bool {
	t := r.tx
	t.mu.Lock()
	defer t.mu.Unlock()
	if r.up != up || t.sending || t.pinned != "" || r.expired.Load() {
		return false
	}
	if !r.ledger.atRest() || r.paused() ||
		r.clientPass > 0 || r.clientDrop > 0 || r.frame != nil ||
		r.serverPass > 0 || r.serverDrop > 0 || len(r.inject) > 0 || len(src.Buffered()) > 0 || r.upstreamDirty {
		return false
	}
	r.up = nil
	return true
}

// stateful reports whether a connection the session ends on may hold state
// of the session's beyond its identity, so that it must be reset before
// another client: a pinned session's, or statements it prepared.
func (r *relay) stateful(up *session.Upstream) bool {
	if r.tx != nil {
		return r.tx.pinned != "" || statementsOverflow(up)
	}
	if r.guard == nil || !r.guard.g.TracksState() {
		return true // nothing read what the session's statements left
	}
	return r.sessionState != "" || r.settingReported
}

// endPoolExhausted: no connection freed up for the client's next
// transaction.
const endPoolExhausted = "pool_exhausted"
