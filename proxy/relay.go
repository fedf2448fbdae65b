package proxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

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

// relay pipes frames between an authenticated client and its upstream session.
//
// Each direction runs in its own goroutine and reads into its own buffer. A
// read is scanned for whole frames; everything scanned is written on in one
// write, so a pipeline of small messages costs one syscall each way. Frames
// are passed on as bytes: only their type byte is looked at, and only the few
// types the relay must act on are read further (Query, Parse and
// FunctionCall by the guard; ReadyForQuery and ErrorResponse on the way
// back). A frame larger than the buffer is streamed through in pieces.
//
// Work is counted in units: each Query, Sync and FunctionCall the server
// receives is answered by exactly one ReadyForQuery. The counts tell when
// the server is idle (token expiry) and which answers belong to the proxy's
// own re-injected statements.
type relay struct {
	client  net.Conn
	clientR *wire.Reader
	up      *session.Upstream
	metrics *Metrics
	guard   *sessionGuard // nil with --guard off

	clientMu sync.Mutex // serialises writes to the client

	// pending counts the ReadyForQuery messages the server still owes.
	pending atomic.Int64
	expired atomic.Bool
	// expiredErr is what the client is told when its token expires.
	expiredErr *clientError

	sent int64 // units written upstream; client-to-server goroutine only
	recv int64 // ReadyForQuery received; server-to-client goroutine only

	// Whether the upstream connection may be reused after the session: the
	// client never left a frame half-sent, and the server side stopped
	// between frames. Each is written by one goroutine, read after both end.
	clientMidFrame bool
	serverBoundary bool

	endOnce sync.Once
	reason  string
	ended   chan struct{}

	bytesUp, bytesDown atomic.Int64
}

var errStopped = errors.New("relay stopped")

func newRelay(c *clientConn, up *session.Upstream, m *Metrics, g *sessionGuard) *relay {
	return &relay{client: c.Conn, clientR: c.r, up: up, metrics: m, guard: g, ended: make(chan struct{})}
}

// run relays until the session ends and returns why it ended.
func (r *relay) run() string {
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.serverToClient()
	}()
	r.clientToServer()
	<-done
	return r.reason
}

// clientToServer forwards the client's frames upstream.
func (r *relay) clientToServer() {
	src := r.clientR
	dst := countingWriter{w: r.up.Conn, n: &r.bytesUp, c: r.metrics.bytesUp}
	for {
		buf := src.Buffered()
		start, n := 0, 0 // buf[start:n] is scanned and not yet written
		units := int64(0)
		large := 0
		for {
			typ, size, ok, err := wire.Header(buf[n:])
			if err != nil {
				r.end(endProtocolError, newClientError(codeProtocolViolation, "protocol", "invalid frame from client: "+err.Error()))
				return
			}
			if !ok {
				break
			}
			if n+size > len(buf) {
				if size > src.Size() {
					large = size
				}
				break
			}
			if typ == 'X' {
				if r.toServer(dst, buf[start:n], units) == nil {
					r.end(endClientTerminate, nil)
				}
				return
			}
			if r.guard != nil && inspected(typ) {
				if sub, resets := r.guard.check(typ, buf[n:n+size]); sub != nil || resets {
					if r.toServer(dst, buf[start:n], units) != nil || r.sendChecked(dst, buf[n:n+size], sub, resets) != nil {
						return
					}
					n += size
					start, units = n, 0
					continue
				}
			}
			units += wire.Units(typ)
			n += size
		}
		if n > 0 {
			if r.toServer(dst, buf[start:n], units) != nil {
				return
			}
			src.Discard(n)
			continue
		}
		if large > 0 {
			if !r.forwardLarge(dst, buf[0], large) {
				return
			}
			continue
		}
		if err := src.Fill(); err != nil {
			r.end(endClientClosed, nil)
			return
		}
	}
}

// forwardLarge passes on a client frame too large for the buffer: streamed,
// or read whole when the guard must see it.
func (r *relay) forwardLarge(dst io.Writer, typ byte, size int) bool {
	if r.guard == nil || !inspected(typ) {
		if r.toServer(nil, nil, wire.Units(typ)) != nil {
			return false
		}
		r.clientMidFrame = true
		if err := r.clientR.CopyN(dst, size); err != nil {
			r.end(endClientClosed, nil)
			return false
		}
		r.clientMidFrame = false
		return true
	}
	if size > maxInspected {
		r.end(endProtocolError, newClientError(codeProtocolViolation, "protocol",
			fmt.Sprintf("message of %d bytes is larger than rlsproxy's guard reads (%d)", size, maxInspected)))
		return false
	}
	frame := make([]byte, size)
	if err := r.clientR.ReadFull(frame); err != nil {
		r.end(endClientClosed, nil)
		return false
	}
	sub, resets := r.guard.check(typ, frame)
	return r.sendChecked(dst, frame, sub, resets) == nil
}

// sendChecked writes an inspected frame, or the substitute the guard made
// for it, and after a reset the frames that re-establish the session.
func (r *relay) sendChecked(dst io.Writer, frame, substitute []byte, resets bool) error {
	if substitute != nil {
		return r.toServer(dst, substitute, wire.Units(substitute[0]))
	}
	u := wire.Units(frame[0])
	if !resets {
		return r.toServer(dst, frame, u)
	}
	// Registered before the frame is written, so the answers are known to be
	// the proxy's before they can arrive.
	r.guard.expectInjected(r.sent + u + 1)
	if err := r.toServer(dst, frame, u); err != nil {
		return err
	}
	return r.toServer(dst, r.guard.reinject, 1)
}

// toServer writes a batch of whole client frames holding units
// ReadyForQuery-producing messages. Once the token has expired nothing more
// is forwarded; the session ends when the server is idle. A nil dst only
// accounts for units.
func (r *relay) toServer(dst io.Writer, b []byte, units int64) error {
	if len(b) == 0 && units == 0 {
		return nil
	}
	if units > 0 {
		r.pending.Add(units)
	}
	if r.expired.Load() {
		if r.pending.Add(-units) == 0 {
			r.end(endTokenExpired, r.expiredErr)
		}
		return errStopped
	}
	r.sent += units
	if dst == nil {
		return nil
	}
	if _, err := dst.Write(b); err != nil {
		r.end(endServerClosed, newClientError(codeConnectionFailure, "upstream", "rlsproxy: lost the upstream connection: "+err.Error()))
		return err
	}
	return nil
}

// serverToClient forwards the server's frames to the client.
func (r *relay) serverToClient() {
	src := r.up.Reader
	dst := countingWriter{w: lockedWriter{mu: &r.clientMu, w: r.client}, n: &r.bytesDown, c: r.metrics.bytesDown}
	dropping := false // the current unit is the proxy's own: its answers are dropped
	for {
		buf := src.Buffered()
		start, n := 0, 0 // buf[start:n] is scanned and not yet written
		ready := int64(0)
		large := 0
		for {
			typ, size, ok, err := wire.Header(buf[n:])
			if err != nil {
				r.end(endProtocolError, newClientError(codeProtocolViolation, "protocol", "invalid frame from upstream: "+err.Error()))
				return
			}
			if !ok {
				break
			}
			if n+size > len(buf) {
				if size > src.Size() {
					large = size
				}
				break
			}
			var replace []byte
			skip := false
			switch {
			case dropping && (typ == 'A' || typ == 'S'):
				// Notifications and parameter changes are the client's.
			case dropping && typ == 'E':
				r.end(endReinjectFailed, newClientError(codeConnectionFailure, "reinject",
					"rlsproxy could not re-establish the session's role and claims after a reset; reconnect"))
				return
			case dropping:
				skip = true
			case typ == 'E' && r.guard != nil:
				replace = r.guard.rewrite(buf[n : n+size])
			}
			if typ == 'Z' {
				ready++
				r.recv++
				r.up.TxStatus = buf[n+5]
				dropping = r.guard != nil && r.guard.isInjected(r.recv+1)
			}
			if skip || replace != nil {
				if n > start {
					if _, err := dst.Write(buf[start:n]); err != nil {
						r.end(endClientClosed, nil)
						return
					}
				}
				if replace != nil {
					if _, err := dst.Write(replace); err != nil {
						r.end(endClientClosed, nil)
						return
					}
				}
				start = n + size
			}
			n += size
		}
		if n > start {
			if _, err := dst.Write(buf[start:n]); err != nil {
				r.end(endClientClosed, nil)
				return
			}
		}
		if n > 0 {
			src.Discard(n)
			if ready > 0 {
				r.pending.Add(-ready)
				if r.expired.Load() {
					// The statement that was running when the token
					// expired has finished.
					r.end(endTokenExpired, r.expiredErr)
					return
				}
			}
			continue
		}
		if large > 0 {
			if err := src.CopyN(dst, large); err != nil {
				r.end(endServerClosed, nil)
				return
			}
			continue
		}
		if err := src.Fill(); err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				// end() stopped this read: nothing of a frame was taken.
				r.serverBoundary = len(src.Buffered()) == 0
			}
			r.end(endServerClosed, newClientError(codeConnectionFailure, "upstream", "rlsproxy: the upstream server closed the connection"))
			return
		}
	}
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

// end stops the relay once: it tells the client why (if fatal is set), closes
// the client, and unblocks the goroutine reading upstream.
func (r *relay) end(reason string, fatal *clientError) {
	r.endOnce.Do(func() {
		r.reason = reason
		if fatal != nil {
			r.clientMu.Lock()
			_ = r.client.SetWriteDeadline(time.Now().Add(time.Second))
			_, _ = r.client.Write(encodeError(nil, "FATAL", fatal))
			r.clientMu.Unlock()
		}
		_ = r.client.Close()
		_ = r.up.Conn.SetReadDeadline(time.Now())
		close(r.ended)
	})
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

// countingWriter counts the bytes relayed in one direction.
type countingWriter struct {
	w io.Writer
	n *atomic.Int64
	c interface{ Add(float64) }
}

func (c countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n.Add(int64(n))
	c.c.Add(float64(n))
	return n, err
}
