package proxy

import (
	"errors"
	"net"
	"time"

	"github.com/rlsproxy/rlsproxy/internal/wire"
)

// runConns drives the relay with a goroutine per direction and blocking
// reads and writes on the connections: for sessions the event loop cannot
// take (TLS on either side), for sessions it hands off, and where there is
// no event loop. The readers hold the bytes read and not yet relayed;
// toClient and toServer are bytes still to be written, before anything else.
// It returns once both directions have stopped and the client has been told
// why, if it is to be told.
func (r *relay) runConns(client net.Conn, clientR *wire.Reader, toClient, toServer []byte) {
	up := r.up
	r.clientBuf, r.serverBuf = clientR.Size(), up.Reader().Size()
	resume := make(chan struct{}, 1)
	r.setStop(func() {
		// Reads stop at once; a write under way may finish (the answers
		// that come before a FATAL, the statements a client sent before
		// Terminate), within a second.
		now := time.Now()
		for _, c := range []net.Conn{client, up.Conn()} {
			_ = c.SetReadDeadline(now)
			_ = c.SetWriteDeadline(now.Add(time.Second))
		}
		select {
		case resume <- struct{}{}:
		default:
		}
	})
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.pump(up.Reader(), client, false, toClient, resume)
	}()
	r.pump(clientR, up.Conn(), true, toServer, resume)
	<-done

	_ = up.Conn().SetDeadline(time.Time{})
	if r.fatal != nil {
		_ = client.SetDeadline(time.Now().Add(time.Second))
		_, _ = client.Write(encodeError(nil, "FATAL", r.fatal))
	}
	_ = client.Close()
}

// pump relays one direction: read, let the relay decide, write. The client
// side waits while the relay holds it back (a reset's re-injection); the
// server side wakes it through resume.
func (r *relay) pump(src *wire.Reader, dst net.Conn, fromClient bool, first []byte, resume chan struct{}) {
	feed := r.fromServer
	if fromClient {
		feed = r.fromClient
	}
	write := func(out [][]byte) { r.write(dst, out, fromClient) }
	write([][]byte{first})
	var out [][]byte
	for !r.ended.Load() {
		var n int
		n, out = feed(src.Buffered(), out[:0])
		write(out)
		src.Discard(n)
		if own := r.takeInject(fromClient); own != nil {
			// The client side waits (the relay holds it), so this is the
			// only writer upstream.
			if _, err := r.up.Conn().Write(own); err != nil {
				r.upstreamDirty = true
				r.lost(false, err)
			}
		}
		if r.ended.Load() {
			break
		}
		if !fromClient && r.released {
			r.released = false
			select {
			case resume <- struct{}{}:
			default:
			}
		}
		if fromClient && r.paused() {
			<-resume
			continue
		}
		if err := src.Fill(); err != nil {
			r.lost(fromClient, err)
			break
		}
	}
	if fromClient {
		r.clientMidFrame = r.clientPass > 0
	} else {
		r.serverBoundary = len(src.Buffered()) == 0 && r.serverPass == 0 && r.serverDrop == 0
	}
}

// isStop reports an I/O error caused by stop's deadlines (see relay.lost).
func isStop(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// write writes out to dst, the server when toServer, in one system call
// where it can; a failure ends the session, and a failed write upstream
// leaves the connection unusable (it may hold part of a frame).
func (r *relay) write(dst net.Conn, out [][]byte, toServer bool) bool {
	total := 0
	for _, b := range out {
		total += len(b)
	}
	if total == 0 {
		return true
	}
	bufs := net.Buffers(out)
	w, err := bufs.WriteTo(dst)
	r.count(toServer, int(w))
	if err == nil && int(w) == total {
		return true
	}
	if toServer {
		r.upstreamDirty = true
	}
	r.lost(!toServer, err)
	return false
}
