package proxy

import (
	"errors"
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
)

// relay pipes frames between an authenticated client and its upstream session.
//
// Each direction runs in its own goroutine and reads into its own buffer. A
// read is scanned for whole frames; everything scanned is written on in one
// write, so a pipeline of small messages costs one syscall each way. Frames
// are passed on as bytes: only their type byte is looked at, and only the few
// types the relay must act on are read further. A frame larger than the buffer
// is streamed through in pieces.
type relay struct {
	client  net.Conn
	clientR *wire.Reader
	up      *session.Upstream
	metrics *Metrics

	clientMu sync.Mutex // serialises writes to the client

	// pending counts the ReadyForQuery messages the server still owes: one for
	// each Query, Sync and FunctionCall forwarded. Zero means idle.
	pending atomic.Int64
	expired atomic.Bool
	// expiredErr is what the client is told when its token expires.
	expiredErr *clientError

	endOnce sync.Once
	reason  string
	ended   chan struct{}

	bytesUp, bytesDown atomic.Int64
}

var errStopped = errors.New("relay stopped")

func newRelay(c *clientConn, up *session.Upstream, m *Metrics) *relay {
	return &relay{client: c.Conn, clientR: c.r, up: up, metrics: m, ended: make(chan struct{})}
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
		n, units := 0, int64(0)
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
			switch typ {
			case 'Q', 'S', 'F':
				units++
			case 'X':
				if n > 0 {
					_ = r.toServer(dst, buf[:n], units)
				}
				r.end(endClientTerminate, nil)
				return
			}
			n += size
		}
		if n > 0 {
			if err := r.toServer(dst, buf[:n], units); err != nil {
				return
			}
			src.Discard(n)
			continue
		}
		if large > 0 {
			typ := buf[0]
			if typ == 'Q' || typ == 'F' {
				units = 1
			}
			if err := r.toServer(nil, nil, units); err != nil {
				return
			}
			if err := src.CopyN(dst, large); err != nil {
				r.end(endClientClosed, nil)
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

// toServer writes a batch of whole client frames holding units
// ReadyForQuery-producing messages. Once the token has expired nothing more
// is forwarded; the session ends when the server is idle. A nil dst only
// accounts for units.
func (r *relay) toServer(dst io.Writer, b []byte, units int64) error {
	if units > 0 {
		r.pending.Add(units)
	}
	if r.expired.Load() {
		if r.pending.Add(-units) == 0 {
			r.end(endTokenExpired, r.expiredErr)
		}
		return errStopped
	}
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
	for {
		buf := src.Buffered()
		n, ready := 0, int64(0)
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
			if typ == 'Z' {
				ready++
			}
			n += size
		}
		if n > 0 {
			if _, err := dst.Write(buf[:n]); err != nil {
				r.end(endClientClosed, nil)
				return
			}
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
			r.end(endServerClosed, newClientError(codeConnectionFailure, "upstream", "rlsproxy: the upstream server closed the connection"))
			return
		}
	}
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
