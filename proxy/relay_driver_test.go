package proxy

// Tests of the relay's drivers (the event loop and the goroutine pair)
// against in-process TCP sockets and a fake server, for timings a real
// PostgreSQL will not produce on demand: a server that reads nothing, a
// socket that takes part of a write. (TestMain still starts a PostgreSQL
// for the package.) They came from a review of the event loop; each failed
// before its fix.

import (
	"bytes"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/rlsproxy/rlsproxy/guard"
	"github.com/rlsproxy/rlsproxy/internal/wire"
	"github.com/rlsproxy/rlsproxy/session"
)

// socketPair returns both ends of a loopback TCP connection. rcvbuf > 0 sets
// SO_RCVBUF on the accepted end (before the handshake, via the listener).
func socketPair(t *testing.T, rcvbuf int) (dialed, accepted *net.TCPConn) {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		if rcvbuf > 0 {
			_ = c.Control(func(fd uintptr) { _ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvbuf) })
		}
		return nil
	}}
	l, err := lc.Listen(t.Context(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ch := make(chan net.Conn, 1)
	go func() { c, _ := l.Accept(); ch <- c }()
	d, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	a := <-ch
	t.Cleanup(func() { d.Close(); a.Close() })
	return d.(*net.TCPConn), a.(*net.TCPConn)
}

func encode(t *testing.T, msgs ...interface{ Encode([]byte) ([]byte, error) }) []byte {
	var out []byte
	for _, m := range msgs {
		var err error
		if out, err = m.Encode(out); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

type driverSession struct {
	r                 *relay
	client, server    *net.TCPConn // the test's ends
	proxyCli, proxyUp *net.TCPConn // the relay's ends
	clientR           *wire.Reader
	done              chan struct{}
}

func newDriverSession(t *testing.T, guard *sessionGuard, serverRcvbuf int) *driverSession {
	s := &driverSession{done: make(chan struct{})}
	s.client, s.proxyCli = socketPair(t, 0)
	s.proxyUp, s.server = socketPair(t, serverRcvbuf)
	up := session.NewUpstream(s.proxyUp, 1, &session.Grant{Role: "authenticated"})
	s.r = newRelay(up, NewMetrics(prometheus.NewRegistry()), guard, nil)
	s.clientR = wire.NewReader(s.proxyCli, 32<<10, 64<<20)
	return s
}

func (s *driverSession) start(t *testing.T, driver string) {
	switch driver {
	case "loop":
		ls, err := newRelayLoops(1)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(ls.close)
		go func() {
			defer close(s.done)
			if !ls.run(s.r, s.proxyCli, s.clientR) {
				t.Error("the loop did not take the session")
			}
		}()
	default:
		go func() {
			defer close(s.done)
			s.r.runConns(s.proxyCli, s.clientR, nil, nil)
		}()
	}
}

var driverNames = []string{"loop", "goroutines"}

// A client that sends a statement and Terminate in one write (fire and
// forget): the statement still reaches the server. (stop once set a
// deadline in the past on the upstream conn before the pump wrote it.)
func TestDriverStatementBeforeTerminate(t *testing.T) {
	for _, driver := range driverNames {
		t.Run(driver, func(t *testing.T) {
			s := newDriverSession(t, nil, 0)
			s.start(t, driver)
			q := encode(t, &pgproto3.Query{String: "INSERT INTO audit VALUES ('client leaves')"})
			if _, err := s.client.Write(append(append([]byte(nil), q...), encode(t, &pgproto3.Terminate{})...)); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(q))
			_ = s.server.SetReadDeadline(time.Now().Add(2 * time.Second))
			n, err := io.ReadFull(s.server, got)
			<-s.done
			if err != nil || !bytes.Equal(got, q) {
				t.Fatalf("server got %d of the %d bytes of the Query sent before Terminate (%v); session ended: %s", n, len(q), err, s.r.reason)
			}
		})
	}
}

// When the token expires while a statement runs, the session ends after it,
// and the client gets the statement's answers (perhaps a COMMIT's) before
// the FATAL.
func TestDriverAnswersBeforeExpiry(t *testing.T) {
	for _, driver := range driverNames {
		t.Run(driver, func(t *testing.T) {
			s := newDriverSession(t, nil, 0)
			s.start(t, driver)
			q := encode(t, &pgproto3.Query{String: "COMMIT"})
			if _, err := s.client.Write(q); err != nil {
				t.Fatal(err)
			}
			_ = s.server.SetReadDeadline(time.Now().Add(2 * time.Second))
			if _, err := io.ReadFull(s.server, make([]byte, len(q))); err != nil {
				t.Fatal(err)
			}
			s.r.expire(newClientError(codeInvalidPassword, "token_expired", "token expired"))
			answer := encode(t, &pgproto3.CommandComplete{CommandTag: []byte("COMMIT")}, &pgproto3.ReadyForQuery{TxStatus: 'I'})
			if _, err := s.server.Write(answer); err != nil {
				t.Fatal(err)
			}
			_ = s.client.SetReadDeadline(time.Now().Add(3 * time.Second))
			got, _ := io.ReadAll(s.client)
			<-s.done
			if s.r.reason != endTokenExpired {
				t.Fatalf("session ended: %s", s.r.reason)
			}
			if !bytes.HasPrefix(got, answer) {
				t.Fatalf("client got %q, want the COMMIT's answer before the FATAL", got)
			}
		})
	}
}

// The token expires while a frame larger than the buffer is being streamed
// upstream, and the rest of it is dropped: the server holds half a frame,
// so the connection must not go back to the pool.
func TestDriverExpiryMidStreamNotReusable(t *testing.T) {
	r := newRelay(session.NewUpstream(nil, 1, &session.Grant{Role: "authenticated"}), NewMetrics(prometheus.NewRegistry()), nil, nil)
	r.clientBuf, r.serverBuf = 64, 64
	var upstream []byte
	feed := func(b []byte) {
		n, out := r.fromClient(b, nil)
		if n != len(b) {
			t.Fatalf("consumed %d of %d", n, len(b))
		}
		for _, seg := range out {
			upstream = append(upstream, seg...)
		}
	}
	feed(encode(t, &pgproto3.Query{String: "SELECT pg_sleep(5)"}))
	big := encode(t, &pgproto3.CopyData{Data: bytes.Repeat([]byte{'x'}, 200)}) // ignored outside COPY
	feed(big[:100])
	r.expire(newClientError(codeInvalidPassword, "token_expired", "token expired"))
	feed(big[100:]) // the client finishes its frame
	z := encode(t, &pgproto3.ReadyForQuery{TxStatus: 'I'})
	if n, _ := r.fromServer(z, nil); n != len(z) {
		t.Fatal("ReadyForQuery not consumed")
	}
	// What both drivers record at the end.
	r.clientMidFrame = r.clientPass > 0
	r.serverBoundary = r.serverPass == 0 && r.serverDrop == 0
	sentOfBig := len(upstream) - len(encode(t, &pgproto3.Query{String: "SELECT pg_sleep(5)"}))
	t.Logf("reason %s, %d of the %d bytes of the CopyData frame sent upstream, reusable %v", r.reason, sentOfBig, len(big), r.reusable())
	if r.reusable() && sentOfBig != len(big) {
		t.Fatalf("reusable() is true with %d of %d bytes of a frame written upstream", sentOfBig, len(big))
	}
}

// A session is handed off to goroutines while the loop holds bytes for the
// server that its socket did not take, and the server is busy writing a long
// result (PostgreSQL reads no input meanwhile). The backlog is written by
// the pumps, so the result keeps flowing to the client, and relay.end
// (Shutdown) still ends the session.
func TestDriverHandOffWithServerBacklog(t *testing.T) {
	for _, driver := range driverNames {
		t.Run(driver, func(t *testing.T) {
			g := newSessionGuard(guard.New(testPolicy, 100),
				NewMetrics(prometheus.NewRegistry()))
			s := newDriverSession(t, g, 4096)
			_ = s.proxyUp.SetWriteBuffer(4096)

			// The server streams a long result and reads nothing meanwhile,
			// once the Query asking for it has arrived (an answer owed to
			// nothing ends the session: the ledger).
			go func() {
				if _, err := io.ReadFull(s.server, make([]byte, 1)); err != nil {
					return
				}
				row := encode(t, &pgproto3.DataRow{Values: [][]byte{bytes.Repeat([]byte{'r'}, 8000)}})
				for {
					if _, err := s.server.Write(row); err != nil {
						return
					}
				}
			}()
			// The client reads everything it is sent.
			var received atomic.Int64
			go func() {
				buf := make([]byte, 64<<10)
				for {
					n, err := s.client.Read(buf)
					received.Add(int64(n))
					if err != nil {
						return
					}
				}
			}()
			// The client has sent the Query whose result that is, pipelined
			// ~60 KB of small messages and then a Query over handOffOver
			// (4 KB), all in the socket before the relay starts, so the loop
			// reads them in one read.
			pipeline, _ := (&pgproto3.Query{String: "SELECT repeat('r', 8000) FROM generate_series(1, 1e9)"}).Encode(nil)
			for range 60 {
				pipeline, _ = (&pgproto3.Bind{Parameters: [][]byte{bytes.Repeat([]byte{'b'}, 980)}}).Encode(pipeline)
			}
			pipeline, _ = (&pgproto3.Query{String: "SELECT 1 -- " + string(bytes.Repeat([]byte{'q'}, 5000))}).Encode(pipeline)
			go func() { _, _ = s.client.Write(pipeline) }()
			time.Sleep(100 * time.Millisecond)

			s.start(t, driver)
			time.Sleep(500 * time.Millisecond)
			before := received.Load()
			time.Sleep(2 * time.Second)
			after := received.Load()
			t.Logf("server-to-client bytes: %d, two seconds later %d", before, after)

			s.r.end(endShutdown, newClientError(codeAdminShutdown, "shutdown", "shutting down"))
			select {
			case <-s.done:
			case <-time.After(2 * time.Second):
				t.Errorf("the session did not end within 2s of relay.end (Shutdown)")
				s.server.Close() // unblocks the hand-off's write, for cleanup
				<-s.done
			}
			if after == before {
				t.Errorf("server-to-client relaying stopped although the client reads")
			}
		})
	}
}

// A write upstream that the end of the session cuts short (here the token
// expires while the server reads nothing) leaves half a frame on the
// server: the connection must not go back to the pool.
func TestDriverCutWriteNotReusable(t *testing.T) {
	s := newDriverSession(t, nil, 4096)
	_ = s.proxyUp.SetWriteBuffer(4096)
	s.start(t, "goroutines")
	// A whole Bind (0 units) that fits the 32 KB buffer; the server is busy
	// and reads nothing yet.
	bind := encode(t, &pgproto3.Bind{Parameters: [][]byte{bytes.Repeat([]byte{'b'}, 30000)}})
	if _, err := s.client.Write(bind); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // the pump is blocked in its write
	s.r.expire(newClientError(codeInvalidPassword, "token_expired", "token expired"))
	<-s.done
	_ = s.server.SetReadDeadline(time.Now().Add(time.Second))
	got, _ := io.ReadAll(s.server)
	t.Logf("reason %s, server received %d of %d bytes of the Bind, reusable %v", s.r.reason, len(got), len(bind), s.r.reusable())
	if s.r.reusable() && len(got) != len(bind) {
		t.Fatalf("reusable() is true with %d of %d bytes of a frame written upstream", len(got), len(bind))
	}
}
