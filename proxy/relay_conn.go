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
// take (TLS on either side), and where there is no event loop. The readers
// hold the bytes buffered during startup. It returns once both directions
// have stopped and the client has been told why, if it is to be told.
func (r *relay) runConns(client net.Conn, clientR *wire.Reader) {
	up := r.up
	r.clientBuf, r.serverBuf = clientR.Size(), up.Reader.Size()
	r.setStop(func() {
		// Unblocks both directions, whether reading or writing.
		now := time.Now()
		_ = client.SetDeadline(now)
		_ = up.Conn.SetDeadline(now)
	})
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.pump(up.Reader, client, false)
	}()
	r.pump(clientR, up.Conn, true)
	<-done

	_ = up.Conn.SetDeadline(time.Time{})
	if r.fatal != nil {
		_ = client.SetDeadline(time.Now().Add(time.Second))
		_, _ = client.Write(encodeError(nil, "FATAL", r.fatal))
	}
	_ = client.Close()
}

// pump relays one direction: read, let the relay decide, write.
func (r *relay) pump(src *wire.Reader, dst net.Conn, fromClient bool) {
	feed, lost := r.fromServer, r.lostServer
	if fromClient {
		feed, lost = r.fromClient, r.lostClient
	}
	var out [][]byte
	for {
		var n int
		n, out = feed(src.Buffered(), out[:0])
		if len(out) > 0 {
			bufs := net.Buffers(out)
			w, err := bufs.WriteTo(dst)
			r.count(fromClient, int(w))
			if err != nil {
				if fromClient {
					r.lostServer(err)
				} else {
					r.lostClient(err)
				}
			}
		}
		src.Discard(n)
		if r.ended.Load() {
			break
		}
		if err := src.Fill(); err != nil {
			lost(err)
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
