package proxy_test

// Attacks from review 16 on 3c247c1: statement names keyed by their first
// 63 bytes (proxy/prepared.go key, size, maxNames and the 54000 refusal),
// ledger.queued counting Executes with the abort at expiry (relay.expire,
// Upstream.Abort), and the nudge taken under t.mu (txpool.go).
//
// FIXED tests failed on 3c247c1, before their fix; HELD tests pass and
// record what was tried.

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// r16Drain reads answers until the proxy ends the session, as short strings.
func r16Drain(c *rawClient) string {
	var seen []string
	for {
		m, err := c.fe.Receive()
		if err != nil {
			return strings.Join(seen, " ")
		}
		seen = append(seen, shortAnswer(m))
	}
}

// FIXED (cancelRunning resets the connection, then cancels the running
// statement). The abort at expiry did not keep pipelined statements from
// starting and committing after the token expired. The client pipelines,
// 700 ms before its token expires, an extended-protocol batch whose first
// Execute runs past the expiry (pg_sleep(1.5)) followed by an INSERT
// (variant "implicit": P/B/E sleep, P/B/E INSERT, Sync; variant "block":
// after BEGIN, P/B/E sleep, P/B/E INSERT, P/B/E COMMIT, Sync). At expiry
// ledger.queued sees two or three Executes owed, so relay.expire sets
// abortUpstream and cancelRunning aborts the connection (SO_LINGER 0, RST).
// But the backend has read the whole batch already, and in the extended
// protocol it writes nothing until the Sync's ReadyForQuery (Execute's
// DataRow/CommandComplete stay in its 8 KiB output buffer; only a notice or
// an error is flushed at once, which is why the review-15 "one sync"
// variant, whose COMMIT outside a block raises a WARNING, was stopped). So
// after the sleep it runs the INSERT, commits it (Sync, or the Execute of
// COMMIT), and only then fails to write: the row, written after the expiry
// as the expired identity, is committed. README ("the server finishes the
// running statement and dies at its next write, before it commits anything
// queued") does not hold for the extended protocol, which is what every
// driver's pipeline/batch mode uses (pgx SendBatch, JDBC batches).
// Code: proxy/relay.go:769-781 (expire), relay.go:738-743 (cancelRunning:
// Abort only), session/upstream.go:370 (Abort). Fix: at expiry with work
// queued, stop the backend rather than its socket: send a CancelRequest
// before the RST (the running statement fails, its error is flushed at once
// and fails on the reset socket, and everything up to Sync is skipped), or
// pg_terminate_backend(pid) from a service connection; or never forward
// past the first Execute/Query of a batch once the token is within the
// leeway of its expiry.
func TestReview16ExpiryExtendedPipelineCommits(t *testing.T) {
	for _, tc := range []struct {
		name  string
		begin bool
		tail  []pgproto3.FrontendMessage
	}{
		{"implicit", false, []pgproto3.FrontendMessage{&pgproto3.Sync{}}},
		{"block", true, []pgproto3.FrontendMessage{&pgproto3.Parse{Query: "COMMIT"}, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{}}},
	} {
		for _, mode := range poolModes {
			t.Run(tc.name+" "+mode.name, func(t *testing.T) {
				tag := "r16 expiry " + tc.name + " " + mode.name
				t.Cleanup(func() { r10Super(t, "DELETE FROM notes WHERE content LIKE 'r16 expiry%'") })
				p := proxytest.Start(t, pg, mode.setup)
				tok, exp := r14ShortToken(t, p, "user1", 2*time.Second)
				a, _, _ := rawStartup(t, p, "user1", tok, "")
				defer a.Close()
				if tc.begin {
					r10Must(t, a, "BEGIN")
				}
				time.Sleep(time.Until(exp.Add(-700 * time.Millisecond)))
				msgs := []pgproto3.FrontendMessage{
					&pgproto3.Parse{Query: "SELECT pg_sleep(1.5)"}, &pgproto3.Bind{}, &pgproto3.Execute{},
					&pgproto3.Parse{Query: "INSERT INTO notes (content) VALUES ('" + tag + " at ' || clock_timestamp()::text)"},
					&pgproto3.Bind{}, &pgproto3.Execute{},
				}
				a.send(t, append(msgs, tc.tail...)...)
				seen := r16Drain(a)
				if rows := r14RowsSettled(t, tag); rows != "" {
					t.Errorf("token expired at %s; a statement pipelined behind the running one ran after it and committed: %s (client saw %q)",
						exp.UTC().Format("15:04:05.000"), rows, seen)
				}
			})
		}
	}
}

// FIXED (serverName drops the bytes of a character the 63-byte cut split).
// A Close (or Describe) of a statement name the client never
// prepared is renamed into the client's namespace as
// "rlsproxy_<n>_unknown_" + key(name), and key cuts the name at byte 63
// whatever it cuts: a name whose 63rd byte is inside a multibyte UTF-8
// character becomes a server name ending in half a character. PostgreSQL
// checks the encoding of every string it reads from a message
// (pq_getmsgstring), so it fails the Close with 22021 "invalid byte
// sequence for encoding UTF8", where without the proxy a Close of a name
// that does not exist is no error (CloseComplete): inside a transaction
// block the client's transaction is then aborted (25P02 for what follows),
// and in a pipeline everything up to Sync is skipped. Describe gets 22021
// instead of 26000 likewise. The key itself must stay bytewise (PostgreSQL
// keys its hash table by the first 63 bytes, cut anywhere); only the
// server name built from it is wrong. Code: proxy/prepared.go:102
// (serverName), with key at :60. Fix: build the unknown name from
// something always valid (hex of the key, or a fixed
// "rlsproxy_<n>_unknown" for every name: no statement has it either way).
func TestReview16UnknownMultibyteNameClose(t *testing.T) {
	p := proxytest.Start(t, pg, oneConnection)
	a := rawSession(t, p, "user1")
	defer a.Close()
	name := strings.Repeat("a", 62) + "é-never-prepared" // é is bytes 63 and 64
	r10Must(t, a, "BEGIN")
	a.send(t, &pgproto3.Close{ObjectType: 'S', Name: name}, &pgproto3.Sync{})
	closed := strings.Join(untilReady(t, a, 1), " ")
	_, code := r10Query(t, a, "SELECT 1")
	r10Must(t, a, "ROLLBACK")
	if closed != "? Z" || code != "" {
		t.Errorf("Close of a name never prepared, in a transaction block: %s, then SELECT 1: SQLSTATE %q; want CloseComplete and the block intact, as PostgreSQL answers", closed, code)
	}
	a.send(t, &pgproto3.Describe{ObjectType: 'S', Name: name}, &pgproto3.Sync{})
	if got := strings.Join(untilReady(t, a, 1), " "); got != "E:26000 Z" {
		t.Errorf("Describe of a name never prepared: %s, want E:26000 Z", got)
	}
}

// HELD. Names alike in their first 63 bytes are one statement at every
// call site, as in PostgreSQL: Bind, Describe and Close, SQL DEALLOCATE as
// a Query and as a prepared statement, a DEALLOCATE of a long name in the
// proxy's namespace (refused to reach anything), and a multibyte name cut
// mid-character that was prepared (its server name is the proxy's).
func TestReview16HeldLongNames(t *testing.T) {
	long := strings.Repeat("n", 63)
	mb := strings.Repeat("m", 62) + "é"
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, a *rawClient) string
		want string
	}{
		{"bind describe close", func(t *testing.T, a *rawClient) string {
			a.send(t, &pgproto3.Parse{Name: long + "a", Query: "SELECT 'x'"}, &pgproto3.Describe{ObjectType: 'S', Name: long + "b"},
				&pgproto3.Bind{PreparedStatement: long + "c"}, &pgproto3.Execute{},
				&pgproto3.Close{ObjectType: 'S', Name: long + "d"}, &pgproto3.Bind{PreparedStatement: long + "a"}, &pgproto3.Sync{})
			return strings.Join(untilReady(t, a, 1), " ")
		}, "? ? T ? D:x C:SELECT 1 ? E:26000 Z"},
		{"sql deallocate", func(t *testing.T, a *rawClient) string {
			a.send(t, &pgproto3.Parse{Name: long + "a", Query: "SELECT 'x'"}, &pgproto3.Sync{})
			untilReady(t, a, 1)
			_, code := r10Query(t, a, `DEALLOCATE "`+long+`zz"`)
			a.send(t, &pgproto3.Bind{PreparedStatement: long + "a"}, &pgproto3.Sync{})
			return code + "|" + strings.Join(untilReady(t, a, 1), " ")
		}, "|E:26000 Z"},
		{"prepared deallocate", func(t *testing.T, a *rawClient) string {
			a.send(t, &pgproto3.Parse{Name: long + "a", Query: "SELECT 'x'"},
				&pgproto3.Parse{Name: "d", Query: `DEALLOCATE "` + long + `zz"`}, &pgproto3.Bind{PreparedStatement: "d"}, &pgproto3.Execute{},
				&pgproto3.Sync{})
			untilReady(t, a, 1)
			a.send(t, &pgproto3.Bind{PreparedStatement: long + "a"}, &pgproto3.Sync{})
			return strings.Join(untilReady(t, a, 1), " ")
		}, "E:26000 Z"},
		{"namespace", func(t *testing.T, a *rawClient) string {
			_, code := r10Query(t, a, `DEALLOCATE "rlsproxy_1_1`+long+`"`)
			return code
		}, "26000"},
		{"sql deallocate multibyte", func(t *testing.T, a *rawClient) string {
			// The identifier is cut at a character boundary (62 bytes):
			// PostgreSQL drops the statement named with 62 bytes.
			a.send(t, &pgproto3.Parse{Name: mb[:62], Query: "SELECT 'short'"}, &pgproto3.Parse{Name: mb + "1", Query: "SELECT 'cut'"}, &pgproto3.Sync{})
			untilReady(t, a, 1)
			_, code := r10Query(t, a, `DEALLOCATE "`+mb+`1"`)
			a.send(t, &pgproto3.Bind{PreparedStatement: mb[:62]}, &pgproto3.Execute{}, &pgproto3.Sync{},
				&pgproto3.Bind{PreparedStatement: mb + "1"}, &pgproto3.Execute{}, &pgproto3.Sync{})
			return code + "|" + strings.Join(untilReady(t, a, 2), " ")
		}, "|E:26000 Z ? D:cut C:SELECT 1 Z"},
		{"multibyte prepared", func(t *testing.T, a *rawClient) string {
			a.send(t, &pgproto3.Parse{Name: mb + "1", Query: "SELECT 'mb'"}, &pgproto3.Bind{PreparedStatement: mb + "2"}, &pgproto3.Execute{},
				&pgproto3.Close{ObjectType: 'S', Name: mb + "3"}, &pgproto3.Sync{})
			return strings.Join(untilReady(t, a, 1), " ")
		}, "? ? D:mb C:SELECT 1 ? Z"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "sql deallocate multibyte" {
				r16DirectDeallocate(t, mb)
			}
			p := proxytest.Start(t, pg, oneConnection)
			a := rawSession(t, p, "user1")
			defer a.Close()
			if got := tc.run(t, a); got != tc.want {
				t.Errorf("%s, want %s", got, tc.want)
			}
		})
	}
}

// HELD. The 54000 refusal of a Parse past maxNames (a pinned client with
// 20,000 names) in a pipeline: Bind and Execute behind it are skipped to
// the Sync, the ledger stays in step (the next batch is answered), a Close
// makes room, and another client on the connection is unaffected.
func TestReview16HeldNamesCapPipeline(t *testing.T) {
	p := proxytest.Start(t, pg, oneConnection)
	a := rawSession(t, p, "user1")
	defer a.Close()
	r10Must(t, a, "LISTEN r16_cap")
	var msgs []pgproto3.FrontendMessage
	for i := range 20000 {
		msgs = append(msgs, &pgproto3.Parse{Name: "s" + strings.Repeat("x", i%7) + strconv.Itoa(i), Query: "SELECT 1"})
	}
	_ = a.SetDeadline(time.Now().Add(30 * time.Second))
	a.send(t, append(msgs, &pgproto3.Sync{})...)
	if got := untilReady(t, a, 1); len(got) != 20001 {
		t.Fatalf("20,000 Parses: %d answers", len(got))
	}
	for _, c := range []struct {
		msgs []pgproto3.FrontendMessage
		want string
	}{
		{[]pgproto3.FrontendMessage{&pgproto3.Parse{Name: "more", Query: "SELECT 2"}, &pgproto3.Bind{PreparedStatement: "more"},
			&pgproto3.Execute{}, &pgproto3.Sync{}, &pgproto3.Query{String: "SELECT 3"}}, "E:54000 Z T D:3 C:SELECT 1 Z"},
		{[]pgproto3.FrontendMessage{&pgproto3.Close{ObjectType: 'S', Name: "s0"}, &pgproto3.Parse{Name: "more", Query: "SELECT 2"},
			&pgproto3.Bind{PreparedStatement: "more"}, &pgproto3.Execute{}, &pgproto3.Sync{}}, "? ? ? D:2 C:SELECT 1 Z"},
		{[]pgproto3.FrontendMessage{&pgproto3.Parse{Name: "more2", Query: "SELECT 2"}, &pgproto3.Sync{}}, "E:54000 Z"},
		{[]pgproto3.FrontendMessage{&pgproto3.Parse{Query: "SELECT 4"}, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{}}, "? ? D:4 C:SELECT 1 Z"},
	} {
		n := 0
		for _, m := range c.msgs {
			if _, ok := m.(*pgproto3.Sync); ok {
				n++
			} else if _, ok := m.(*pgproto3.Query); ok {
				n++
			}
		}
		a.send(t, c.msgs...)
		if got := strings.Join(untilReady(t, a, n), " "); got != c.want {
			t.Errorf("%s, want %s", got, c.want)
		}
	}
}

// r16DirectDeallocate checks, without the proxy, what the multibyte case
// expects: PostgreSQL's DEALLOCATE of mb+"1" drops the statement named
// mb[:62] and leaves the one named mb+"1".
func r16DirectDeallocate(t *testing.T, mb string) {
	t.Helper()
	ctx := context.Background()
	c := superConn(t)
	for _, n := range []string{mb[:62], mb + "1"} {
		if _, err := c.Prepare(ctx, n, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Exec(ctx, `DEALLOCATE "`+mb+`1"`); err != nil {
		t.Fatal(err)
	}
	var left []string
	rows, _ := c.Query(ctx, "SELECT name FROM pg_prepared_statements WHERE name LIKE 'mmm%'")
	for rows.Next() {
		var n string
		_ = rows.Scan(&n)
		left = append(left, n)
	}
	if len(left) != 1 || left[0] != (mb + "1")[:63] {
		t.Fatalf("without the proxy: left %q", left)
	}
}

// HELD. No false abort: a single statement running at expiry (a Query, or
// one Execute with its Sync) is answered, the session ends with 28P01, and
// the only connection goes back to the pool (the next client gets the same
// backend).
func TestReview16HeldSingleStatementAtExpiry(t *testing.T) {
	for _, tc := range []struct {
		name string
		msgs []pgproto3.FrontendMessage
	}{
		{"query", []pgproto3.FrontendMessage{&pgproto3.Query{String: "SELECT pg_sleep(1)"}}},
		{"extended", []pgproto3.FrontendMessage{&pgproto3.Parse{Query: "SELECT pg_sleep(1)"}, &pgproto3.Bind{},
			&pgproto3.Describe{ObjectType: 'P'}, &pgproto3.Execute{}, &pgproto3.Sync{}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, oneConnection)
			tok, exp := r14ShortToken(t, p, "user1", 2*time.Second)
			a, _, _ := rawStartup(t, p, "user1", tok, "")
			defer a.Close()
			pid := r10Must(t, a, "SELECT pg_backend_pid()")[0]
			time.Sleep(time.Until(exp.Add(-300 * time.Millisecond)))
			a.send(t, tc.msgs...)
			if got := r16Drain(a); !strings.HasSuffix(got, "C:SELECT 1 Z E:28P01") {
				t.Errorf("client saw %q", got)
			}
			b := rawSession(t, p, "user2")
			defer b.Close()
			if got := r10Must(t, b, "SELECT pg_backend_pid()")[0]; got != pid {
				t.Errorf("backend %s after expiry, was %s: the connection was aborted", got, pid)
			}
		})
	}
}
