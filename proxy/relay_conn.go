package proxy

import (
	"errors"
	"io"
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
	r.clientBuf, r.serverBuf = clientR.Size(), up.Reader.Size()
	resume := make(chan struct{}, 1)
	r.setStop(func() {
		// Reads stop at once; a write under way may finish (the answers
		// that come before a FATAL, the statements a client sent before
		// Terminate), within a second.
		now := time.Now()
		for _, c := range []net.Conn{client, up.Conn} {
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
		r.pump(up.Reader, client, false, toClient, resume)
	}()
	r.pump(clientR, up.Conn, true, toServer, resume)
	<-done

	_ = up.Conn.SetDeadline(time.Time{})
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
	write := func(out [][]byte) {
		total := 0
		for _, b := range out {
			total += len(b)
		}
		if total == 0 {
			return
		}
		bufs := net.Buffers(out)
		w, err := bufs.WriteTo(dst)
		r.count(fromClient, int(w))
		if err == nil && int(w) == total {
			return
		}
		if fromClient {
			r.upstreamDirty = true
			r.lostServer(err)
		} else {
			r.lostClient(err)
		}
	}
	write([][]byte{first})
	var out [][]byte
	for !r.ended.Load() {
		var n int
		n, out = feed(src.Buffered(), out[:0])
		write(out)
		src.Discard(n)
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
		if fromClient && r.holding.Load() {
			<-resume
			continue
		}
		if err := src.Fill(); err != nil {
			if fromClient {
				r.lostClient(err)
			} else {
				r.lostServer(err)
			}
			break
		}
	}
	if fromClient {
		r.clientMidFrame = r.clientPass > 0
	} else {
		r.serverBoundary = len(src.Buffered()) == 0 && r.serverPass == 0 && r.serverDrop == 0
	}
}

// lostClient ends the session after a failed read or write on the client.
func (r *relay) lostClient(err error) {
	if isStop(err) {
		return // the session had ended already
	}
	r.end(endClientClosed, nil)
}

// lostServer ends the session after a failed read or write upstream.
func (r *relay) lostServer(err error) {
	if isStop(err) {
		return
	}
	if err == nil {
		err = io.ErrShortWrite
	}
	r.end(endServerClosed, upstreamLost(err))
}

// isStop reports an I/O error caused by stop's deadlines.
func isStop(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// upstreamLost is what the client is told when the upstream connection fails.
func upstreamLost(err error) *clientError {
	msg := "rlsproxy: lost the upstream connection: " + err.Error()
	if errors.Is(err, io.EOF) {
		msg = "rlsproxy: the upstream server closed the connection"
	}
	return newClientError(codeConnectionFailure, "upstream", msg)
}
