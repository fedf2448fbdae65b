package proxy

import (
	"bytes"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/guard"
	"github.com/rlsproxy/rlsproxy/internal/wire"
	"github.com/rlsproxy/rlsproxy/session"
)

// However the bytes arrive, the relay passes frames on unchanged and counts
// every unit: drivers offer it what they read, in pieces of any size, and
// keep what it leaves for the next read.
func TestRelaySplitsAnywhere(t *testing.T) {
	var client, server []byte
	for i := range 50 {
		size := []int{0, 10, 100, 1000}[i%4]
		big := string(bytes.Repeat([]byte{'q'}, size))
		for _, m := range []pgproto3.FrontendMessage{
			&pgproto3.Query{String: "SELECT '" + big + "'"},
			&pgproto3.Parse{Query: "SELECT $1"}, &pgproto3.Bind{Parameters: [][]byte{[]byte(big)}},
			&pgproto3.Execute{}, &pgproto3.Sync{},
		} {
			client, _ = m.Encode(client)
		}
		for _, m := range []pgproto3.BackendMessage{
			&pgproto3.RowDescription{Fields: []pgproto3.FieldDescription{{Name: []byte("c")}}},
			&pgproto3.DataRow{Values: [][]byte{[]byte(big)}}, &pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")},
			&pgproto3.ReadyForQuery{TxStatus: 'I'}, &pgproto3.ParseComplete{}, &pgproto3.BindComplete{},
			&pgproto3.DataRow{Values: [][]byte{[]byte(big)}}, &pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")},
			&pgproto3.ReadyForQuery{TxStatus: 'T'},
		} {
			server, _ = m.Encode(server)
		}
	}
	for _, buf := range []int{16, 64, 1 << 16} { // frames larger than buf are streamed
		for _, chunk := range []int{1, 3, 7, 100, 4096} {
			r := newRelay(session.NewUpstream(nil, 1, &session.Grant{Role: "authenticated"}), nil, nil, nil)
			r.clientBuf, r.serverBuf = buf, buf
			if got := feedAll(t, r.fromClient, client, buf, chunk); !bytes.Equal(got, client) {
				t.Fatalf("buf %d chunk %d: client bytes changed in relay", buf, chunk)
			}
			if r.ledger.idle() {
				t.Fatalf("buf %d chunk %d: nothing owed after the client's messages", buf, chunk)
			}
			if got := feedAll(t, r.fromServer, server, buf, chunk); !bytes.Equal(got, server) {
				t.Fatalf("buf %d chunk %d: server bytes changed in relay (%s)", buf, chunk, r.reason)
			}
			if !r.ledger.idle() || r.ledger.txStatus() != 'T' {
				t.Fatalf("buf %d chunk %d: answers still owed after every ReadyForQuery, status %c", buf, chunk, r.ledger.txStatus())
			}
		}
	}
}

// feedAll offers stream to feed as a driver would: reads of random size up
// to chunk bytes appended to what feed left over.
func feedAll(t *testing.T, feed func([]byte, [][]byte) (int, [][]byte), stream []byte, buf, chunk int) []byte {
	t.Helper()
	var out, held []byte
	rng := rand.New(rand.NewPCG(uint64(buf), uint64(chunk)))
	for len(stream) > 0 || len(held) > 0 {
		room := max(1, buf-len(held))
		k := min(len(stream), 1+rng.IntN(min(chunk, room)))
		held = append(held, stream[:k]...)
		stream = stream[k:]
		n, segs := feed(held, nil)
		for _, s := range segs {
			out = append(out, s...)
		}
		held = append(held[:0], held[n:]...)
		if k == 0 && n == 0 {
			t.Fatalf("%d bytes left that the relay will not take", len(held))
		}
	}
	return out
}

// BenchmarkRelayTransaction measures the relay's own work for one pgbench
// -S transaction (Bind, Execute, Sync; BindComplete, DataRow,
// CommandComplete, ReadyForQuery), prepared and as a simple Query, with the
// guard on and off: what the guard adds per transaction, apart from I/O.
//
//	go test -run '^$' -bench RelayTransaction -benchmem ./proxy/
func BenchmarkRelayTransaction(b *testing.B) {
	const sql = "SELECT abalance FROM pgbench_accounts WHERE aid = 42"
	var prepared, simple, answer []byte
	for _, m := range []pgproto3.FrontendMessage{&pgproto3.Bind{PreparedStatement: "P0_1", Parameters: [][]byte{[]byte("42")}},
		&pgproto3.Execute{}, &pgproto3.Sync{}} {
		prepared, _ = m.Encode(prepared)
	}
	simple, _ = (&pgproto3.Query{String: sql}).Encode(nil)
	for _, m := range []pgproto3.BackendMessage{&pgproto3.BindComplete{}, &pgproto3.DataRow{Values: [][]byte{[]byte("0")}},
		&pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")}, &pgproto3.ReadyForQuery{TxStatus: 'I'}} {
		answer, _ = m.Encode(answer)
	}
	guard := newSessionGuard(guard.New(testPolicy, 100), nil)
	for _, tc := range []struct {
		name  string
		query []byte
		g     *sessionGuard
	}{{"prepared/guard-off", prepared, nil}, {"prepared/guard-on", prepared, guard}, {"simple/guard-off", simple, nil}, {"simple/guard-on", simple, guard}} {
		b.Run(tc.name, func(b *testing.B) {
			r := newRelay(session.NewUpstream(nil, 1, &session.Grant{Role: "authenticated"}), nil, tc.g, nil)
			r.clientBuf, r.serverBuf = 1<<16, 1<<16
			out := make([][]byte, 0, 8)
			for b.Loop() {
				_, out = r.fromClient(tc.query, out[:0])
				_, out = r.fromServer(answer, out[:0])
			}
		})
	}
}

// FuzzRelay feeds arbitrary bytes, in pieces, through both directions with
// the guard off: whatever the bytes, the relay never panics, never takes
// more than it is given, and passes on exactly the bytes it consumed, in
// order, up to the point where it ends the session.
func FuzzRelay(f *testing.F) {
	var seed []byte
	for _, m := range []pgproto3.FrontendMessage{&pgproto3.Query{String: "SELECT 1"}, &pgproto3.Parse{Query: "SELECT $1"},
		&pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{}, &pgproto3.CopyData{Data: []byte("x")}, &pgproto3.CopyDone{}} {
		seed, _ = m.Encode(seed)
	}
	f.Add(seed, uint8(3), uint8(16))
	f.Add([]byte{'Q', 0, 0, 0, 3}, uint8(1), uint8(8))
	f.Fuzz(func(t *testing.T, stream []byte, chunk, buf uint8) {
		for _, client := range []bool{true, false} {
			r := newRelay(session.NewUpstream(nil, 1, &session.Grant{Role: "authenticated"}), nil, nil, nil)
			r.clientBuf, r.serverBuf = int(buf)+6, int(buf)+6
			feed := r.fromServer
			if client {
				feed = r.fromClient
			}
			var out, held []byte
			consumed := 0
			rest := stream
			for (len(rest) > 0 || len(held) > 0) && !r.ended.Load() {
				k := min(len(rest), int(chunk)+1, max(0, r.clientBuf-len(held)))
				held = append(held, rest[:k]...)
				rest = rest[k:]
				n, segs := feed(held, nil)
				if n < 0 || n > len(held) {
					t.Fatalf("consumed %d of %d", n, len(held))
				}
				for _, s := range segs {
					out = append(out, s...)
				}
				consumed += n
				held = append(held[:0], held[n:]...)
				if k == 0 && n == 0 {
					break // an incomplete frame at the end of the stream
				}
			}
			// Without the guard nothing is replaced or dropped; a session that
			// ended (Terminate, a frame it refuses) stops short.
			if r.ended.Load() {
				if !bytes.HasPrefix(stream[:consumed], out) {
					t.Fatalf("client %v: relayed bytes differ from the %d consumed (ended: %s)", client, consumed, r.reason)
				}
			} else if !bytes.Equal(out, stream[:consumed]) {
				t.Fatalf("client %v: relayed %d bytes, consumed %d", client, len(out), consumed)
			}
		}
	})
}

// FuzzRelayGuarded feeds arbitrary bytes from a client through the relay
// with the guard on (the guard's input path: framing, gathering, judging,
// substituting): whatever the bytes, it never panics, never takes more than
// it is given, and every frame it sends upstream is whole and either one of
// the client's frames or a substitute of the guard's.
func FuzzRelayGuarded(f *testing.F) {
	var seed []byte
	for _, m := range []pgproto3.FrontendMessage{&pgproto3.Query{String: "SET ROLE admin"}, &pgproto3.Parse{Query: "SELECT 'x\\', ' ; RESET ROLE; -- '"},
		&pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{}, &pgproto3.FunctionCall{Function: 2078}, &pgproto3.Query{String: "DISCARD ALL"}} {
		seed, _ = m.Encode(seed)
	}
	f.Add(seed, uint8(3), uint8(16))
	f.Add([]byte("Q\x00\x00\x00\x0bSELECT\x00"), uint8(1), uint8(8))
	g := newSessionGuard(guard.New(testPolicy, 64), nil)
	f.Fuzz(func(t *testing.T, stream []byte, chunk, buf uint8) {
		r := newRelay(session.NewUpstream(nil, 1, &session.Grant{Role: "authenticated"}), nil, g, nil)
		r.clientBuf, r.serverBuf = int(buf)+6, int(buf)+6
		var out, held []byte
		rest := stream
		for (len(rest) > 0 || len(held) > 0) && !r.ended.Load() && !r.paused() {
			k := min(len(rest), int(chunk)+1, max(0, r.clientBuf-len(held)))
			held = append(held, rest[:k]...)
			rest = rest[k:]
			n, segs := r.fromClient(held, nil)
			if n < 0 || n > len(held) {
				t.Fatalf("consumed %d of %d", n, len(held))
			}
			for _, s := range segs {
				out = append(out, s...)
			}
			held = append(held[:0], held[n:]...)
			if k == 0 && n == 0 {
				break
			}
		}
		// Whole frames only, unless a large frame was streamed through.
		for len(out) > 0 && r.clientPass == 0 {
			typ, size, ok, err := wire.Header(out)
			if err != nil || !ok || size > len(out) {
				t.Fatalf("a partial or malformed frame went upstream (type %q)", typ)
			}
			if inspected(typ) && !bytes.Contains(out[:size], []byte(g.marker)) && !bytes.Contains(stream, out[wire.HeaderLen:size]) {
				t.Fatalf("a frame the client never sent went upstream")
			}
			out = out[size:]
		}
	})
}

// All sessions together hold at most a bounded number of bytes of large
// frames the guard must read: past it, a frame is dropped unread (its bytes
// never go upstream) and the server fails a substitute, whose error becomes
// 54000 for the client; the session goes on.
func TestGuardFramesShareABudget(t *testing.T) {
	g := newSessionGuard(guard.New(testPolicy, 64), nil)
	held := newByteBudget(1000)
	r := newRelay(session.NewUpstream(nil, 1, &session.Grant{Role: "authenticated"}), nil, g, held)
	r.clientBuf, r.serverBuf = 64, 64
	big, _ := (&pgproto3.Query{String: "SELECT '" + strings.Repeat("x", 2000) + "'"}).Encode(nil)
	small, _ := (&pgproto3.Query{String: "SELECT 1"}).Encode(nil)
	var upstream []byte
	for rest := append(big, small...); len(rest) > 0; {
		k := min(len(rest), 50)
		n, out := r.fromClient(rest[:k], nil)
		for _, seg := range out {
			upstream = append(upstream, seg...)
		}
		rest = rest[n:]
		if n == 0 {
			t.Fatal("stuck")
		}
	}
	if bytes.Contains(upstream, []byte("xxxx")) || !bytes.Contains(upstream, []byte(g.marker)) || !bytes.HasSuffix(upstream, small) {
		t.Fatalf("upstream got %q", upstream)
	}
	if used := held.used.Load(); used != 0 {
		t.Fatalf("%d bytes still held", used)
	}
	z, _ := (&pgproto3.ErrorResponse{Severity: "ERROR", Code: "42601", Message: "syntax error at or near " + g.marker}).Encode(nil)
	z, _ = (&pgproto3.ReadyForQuery{TxStatus: 'I'}).Encode(z)
	_, out := r.fromServer(z, nil)
	var client []byte
	for _, seg := range out {
		client = append(client, seg...)
	}
	if !bytes.Contains(client, []byte("54000")) {
		t.Fatalf("the client got %q", client)
	}
}
