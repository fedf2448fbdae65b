package proxy

import (
	"context"
	"errors"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

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

// carriedSettings are the settings the server reports in ParameterStatus
// that a client may change (SET, set_config): they follow the client from
// connection to connection, installed with its identity, and so never pin.
var carriedSettings = []string{"application_name", "client_encoding", "DateStyle", "IntervalStyle", "TimeZone", "standard_conforming_strings"}

// txState is what a transaction-pooled session keeps between transactions.
type txState struct {
	pool     *session.Pool
	database string
	params   map[string]string
	grant    *session.Grant
	stmts    *statements
	metrics  *Metrics

	// mu orders attaching and detaching against the client side's sends:
	// the relay's up is set and cleared under it, and sending marks a
	// client write under way, during which the connection stays.
	mu      sync.Mutex
	sending bool
	// nudged asks the server side to check whether it may detach (the
	// client side wrote nothing the server will answer).
	nudged atomic.Bool

	// pinned, once set, names why the client keeps its connection for the
	// rest of its session.
	pinned string
	// carried are the client's values of carriedSettings, as the servers
	// reported them to it.
	carried map[string]string

	// cancels counts CancelRequests under way to the attached connection:
	// it is not handed to another client before they are delivered.
	cancels sync.WaitGroup
	// acquired counts the connections the session was handed, installs
	// those that needed the client's identity installed first.
	acquired, installs int
}

// pin keeps the client on its connection for the rest of its session.
func (t *txState) pin(reason string) bool {
	if t == nil || t.pinned != "" {
		return false
	}
	t.pinned = reason
	t.metrics.pinned.WithLabelValues(reason).Inc()
	return true
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
	if slices.Contains(carriedSettings, ps.Name) {
		t.carried[ps.Name] = ps.Value
	}
}

// extra returns the carried settings up must be given for the client.
func (t *txState) extra(up *session.Upstream) []session.Setting {
	var out []session.Setting
	for _, name := range carriedSettings {
		if v, ok := t.carried[name]; ok && up.Parameter(name) != v {
			out = append(out, session.Setting{Name: name, Value: v})
		}
	}
	return out
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
	r.clientBuf, r.serverBuf = clientR.Size(), 32<<10
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
		served = r.attach(first, client, resume, false)
	}
	for !r.ended.Load() {
		if len(clientR.Buffered()) > 0 && !r.paused() {
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
				if up, pre, err = r.acquire(ctx); err != nil {
					if !r.ended.Load() {
						r.end(endPoolExhausted, toClientError(err))
					}
					break
				}
				// Attached already sending: the new reader must not let go
				// of the connection before the client's message is on it.
				served = r.attach(up, client, resume, true)
			} else {
				t.sending = true
				t.mu.Unlock()
			}

			var n int
			n, out = r.fromClient(clientR.Buffered(), out[:0])
			if len(pre) > 0 {
				out = append([][]byte{pre}, out...)
				pre = nil
			}
			wrote := r.writeUpstream(up, out)
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
		if n := len(clientR.Buffered()); n > 0 && n < clientR.Size() && r.frameWhole(clientR.Buffered()) {
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
		t.pool.Release(rctx, up, r.reusable(), r.stateful(up), r.ledger.txStatus())
		rcancel()
	}
	if r.fatal != nil {
		_ = client.SetDeadline(time.Now().Add(time.Second))
		_, _ = client.Write(encodeError(nil, "FATAL", r.fatal))
	}
	_ = client.Close()
}

// frameWhole reports whether b starts with a whole frame.
func (r *relay) frameWhole(b []byte) bool {
	_, size, ok, err := wire.Header(b)
	return err == nil && ok && size <= len(b)
}

// acquire waits for a connection for the client's next transaction, and
// returns the frames to send ahead of the client's: the client's identity
// and carried settings, when the connection holds others.
func (r *relay) acquire(ctx context.Context) (*session.Upstream, []byte, error) {
	t := r.tx
	began := time.Now()
	up, installed, err := t.pool.Acquire(ctx, t.database, t.params, t.grant)
	t.metrics.poolWait.Observe(time.Since(began).Seconds())
	if err != nil {
		return nil, nil, err
	}
	t.acquired++
	// The ledger is idle, as it was when the last connection was let go:
	// it carries over.
	var pre []byte
	if extra := t.extra(up); !installed || len(extra) > 0 {
		b := up.Switch(t.grant, extra)
		r.ledger.sentOwn(b)
		pre = b.Frames
		t.installs++
		t.metrics.txInstalls.WithLabelValues("install").Inc()
	} else {
		t.metrics.txInstalls.WithLabelValues("same_identity").Inc()
	}
	return up, pre, nil
}

// attach makes up the session's connection and starts reading it; sending
// marks a client write under way, which the client side clears.
func (r *relay) attach(up *session.Upstream, client net.Conn, resume chan struct{}, sending bool) chan struct{} {
	t := r.tx
	t.nudged.Store(false)
	t.mu.Lock()
	r.up = up
	t.sending = sending
	t.mu.Unlock()
	served := make(chan struct{})
	go func() {
		defer close(served)
		r.serveUpstream(up, client, resume)
	}()
	return served
}

// writeUpstream writes out to up; a failure ends the session.
func (r *relay) writeUpstream(up *session.Upstream, out [][]byte) bool {
	total := 0
	for _, b := range out {
		total += len(b)
	}
	if total == 0 {
		return true
	}
	bufs := net.Buffers(out)
	w, err := bufs.WriteTo(up.Conn())
	r.count(true, int(w))
	if err == nil && int(w) == total {
		return true
	}
	r.upstreamDirty = true
	r.lost(false, err)
	return false
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
		r.writeClient(client, out)
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
			if t.nudged.Swap(false) && isStop(err) {
				_ = up.Conn().SetReadDeadline(time.Time{})
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
	if up.PreparedCount() > maxStatementsPerConnection {
		// Statements of clients long gone pile up: reset, which drops them.
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
	if !r.ledger.idle() || r.ledger.txStatus() != 'I' || r.paused() ||
		r.clientPass > 0 || r.clientDrop > 0 || r.frame != nil ||
		r.serverPass > 0 || r.serverDrop > 0 || len(r.inject) > 0 || len(src.Buffered()) > 0 || r.upstreamDirty {
		return false
	}
	r.up = nil
	return true
}

// writeClient writes the server's answers to the client; a failure ends the
// session.
func (r *relay) writeClient(client net.Conn, out [][]byte) {
	total := 0
	for _, b := range out {
		total += len(b)
	}
	if total == 0 {
		return
	}
	bufs := net.Buffers(out)
	w, err := bufs.WriteTo(client)
	r.count(false, int(w))
	if err != nil || int(w) != total {
		r.lost(true, err)
	}
}

// stateful reports whether a connection the session ends on may hold state
// of the session's beyond its identity, so that it must be reset before
// another client: a pinned session's, or statements it prepared.
func (r *relay) stateful(up *session.Upstream) bool {
	if r.tx != nil {
		return r.tx.pinned != "" || up.PreparedCount() > maxStatementsPerConnection
	}
	if r.guard == nil || !r.guard.g.TracksState() {
		return true // nothing read what the session's statements left
	}
	return r.sessionState != "" || r.settingReported
}

// endPoolExhausted: no connection freed up for the client's next
// transaction.
const endPoolExhausted = "pool_exhausted"
