package proxy_test

// Attacks from review 14 on the protocol lifecycle under transaction
// pooling (txpool.go, ledger.go, relay.go, cancel.go, timeouts.go,
// session/pool.go): who holds a connection when, what the proxy pipelines
// ahead of a client's message, where a CancelRequest lands, what a client
// may make the proxy keep, and what runs after a token expires.
//
// FIXED tests failed on the code they were written against, before their
// fix; HELD tests pass and record what was tried.

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/demo"
	"github.com/rlsproxy/rlsproxy/internal/devissuer"
	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// r14Login logs in by hand as sub with token and returns the client and the
// proxy's BackendKeyData for its session. It reports failures as an error,
// so that it may run off the test's goroutine.
func r14Login(p *proxytest.Proxy, sub, token string) (c *rawClient, pid, secret uint32, err error) {
	conn, err := net.Dial("tcp", p.Addr)
	if err != nil {
		return nil, 0, 0, err
	}
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	c = &rawClient{Conn: conn, fe: pgproto3.NewFrontend(conn, conn)}
	if _, err := c.Write(startupPacket(3<<16, "user", sub, "database", "app")); err != nil {
		return nil, 0, 0, err
	}
	for {
		m, err := c.fe.Receive()
		if err != nil {
			conn.Close()
			return nil, 0, 0, err
		}
		switch m := m.(type) {
		case *pgproto3.AuthenticationCleartextPassword:
			c.fe.Send(&pgproto3.PasswordMessage{Password: token})
			if err := c.fe.Flush(); err != nil {
				return nil, 0, 0, err
			}
		case *pgproto3.BackendKeyData:
			pid, secret = m.ProcessID, binary.BigEndian.Uint32(m.SecretKey)
		case *pgproto3.ErrorResponse:
			conn.Close()
			return nil, 0, 0, fmt.Errorf("login as %s: %s %s", sub, m.Code, m.Message)
		case *pgproto3.ReadyForQuery:
			return c, pid, secret, nil
		}
	}
}

// r14MustLogin is r14Login on the test's goroutine; the client is closed
// when the test ends.
func r14MustLogin(t *testing.T, p *proxytest.Proxy, sub string) (*rawClient, uint32, uint32) {
	t.Helper()
	c, pid, secret, err := r14Login(p, sub, p.Token(t, sub))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, pid, secret
}

// r14Within reads c's answers up to ReadyForQuery (with its status), a
// FATAL, or d of silence ("timeout"), as untilReady's short strings.
func r14Within(t *testing.T, c *rawClient, d time.Duration) string {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(d))
	defer c.SetReadDeadline(time.Now().Add(20 * time.Second))
	var seq []string
	for {
		m, err := c.fe.Receive()
		if err != nil {
			return strings.Join(append(seq, "timeout"), " ")
		}
		switch m := m.(type) {
		case *pgproto3.ReadyForQuery:
			return strings.Join(append(seq, "Z"+string(m.TxStatus)), " ")
		case *pgproto3.ErrorResponse:
			seq = append(seq, shortAnswer(m))
			if m.Severity == "FATAL" {
				return strings.Join(seq, " ")
			}
		default:
			seq = append(seq, shortAnswer(m))
		}
	}
}

// r14Rows returns, as the superuser, user_id:content of the notes whose
// content starts with prefix.
func r14Rows(t *testing.T, prefix string) string {
	t.Helper()
	var got string
	var err error
	// Retried: a backend cleaning up r14PlantTemp's tables as it exits may
	// hold the server's lock table for a while (53200 at login).
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		var conn *pgx.Conn
		if conn, err = pgx.Connect(context.Background(), pg.SuperDSN(demo.Database)); err == nil {
			err = conn.QueryRow(context.Background(),
				"SELECT coalesce(string_agg(user_id || ':' || content, ',' ORDER BY id), '') FROM notes WHERE content LIKE $1 || '%'", prefix).Scan(&got)
			conn.Close(context.Background())
		}
		if err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// r14RowsSettled is r14Rows once some row is there or 2 s have passed: a
// statement that runs after the proxy ended its session may commit after the
// client has read its answer.
func r14RowsSettled(t *testing.T, prefix string) string {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		rows := r14Rows(t, prefix)
		if rows != "" || time.Now().After(deadline) {
			return rows
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// r14PlantTemp makes n temporary tables on c's connection, perTx a
// transaction, each with a dozen dependent objects (toast table and index,
// types, defaults, checks), without pinning c: an unqualified CREATE while
// pg_temp leads the search_path names no temporary object
// (TestTxPoolingTempBySearchPath).
func r14PlantTemp(t *testing.T, c *rawClient, n, perTx int) {
	t.Helper()
	for i := 0; i < n; i += perTx {
		var b strings.Builder
		b.WriteString("BEGIN; SET LOCAL search_path = pg_temp;")
		for j := i; j < min(i+perTx, n); j++ {
			fmt.Fprintf(&b, " CREATE TABLE r14_t%d (a int DEFAULT 1 CHECK (a > 0), b int DEFAULT 1 CHECK (b > 0),"+
				" c int DEFAULT 1 CHECK (c > 0), d int DEFAULT 1 CHECK (d > 0), e text);", j)
		}
		b.WriteString(" COMMIT")
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		r10Must(t, c, b.String())
	}
}

// r14DropPlanted drops, as the superuser, the temporary tables
// r14PlantTemp made on backend pid, once that backend is gone (its own
// cleanup at exit can run out of lock space as the install did), so that
// no other test counts them.
func r14DropPlanted(t *testing.T, pid string) {
	su := superConn(t)
	ctx := context.Background()
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		var alive bool
		if err := su.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1::int)", pid).Scan(&alive); err != nil || !alive {
			break
		}
	}
	for {
		rows, err := su.Query(ctx, `SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c
			JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE c.relname LIKE 'r14\_t%' AND c.relkind = 'r' AND c.relpersistence = 't' LIMIT 100`)
		if err != nil {
			t.Errorf("cleanup: %v", err)
			return
		}
		var names []string
		for rows.Next() {
			var n string
			_ = rows.Scan(&n)
			names = append(names, n)
		}
		rows.Close()
		if len(names) == 0 {
			return
		}
		if _, err := su.Exec(ctx, "DROP TABLE IF EXISTS "+strings.Join(names, ", ")); err != nil {
			t.Errorf("cleanup: %v", err)
			return
		}
	}
}

// FIXED (the client's frames wait for the install's answers: relay.prepare
// holds them, runTx sends the install alone). A client's first message on
// a connection that last served
// another identity goes upstream right behind the proxy's install of the
// client's identity (txpool.go prepare/runTx: `out = append([][]byte{pre},
// out...)`, one write). The install is one extended-protocol batch ending in
// its own Sync (session/proof.go installBatch). When any of its statements
// fails, PostgreSQL rolls the install back, answers the Sync, and then runs
// the client's message with the identity the connection had before: the
// previous client's role, claims and signature. The proxy sees the error
// (ledger.answer, own entry), ends the session with 08006 and discards the
// connection, but the message has already run (and so has whatever else the
// client pipelined: Upstream.Close's Terminate comes after it).
//
// Client A (user1) makes the install fail for whoever comes next: in
// unpinned transactions (`SET LOCAL search_path = pg_temp; CREATE TABLE
// ...`) it leaves 2,000 temporary tables of a dozen objects each on its
// connection, and goes idle. The next client of another identity, B
// (user2), sends `INSERT INTO notes (content) VALUES (...)`; its install
// runs DISCARD TEMP (the previous identity's temporary objects), which needs
// a lock per object in one transaction and fails with 53200 "out of shared
// memory". B's INSERT then runs as user1: notes.user_id defaults to
// current_setting('jwt.claims.sub'), so B's row is stored as user1's and A
// reads it. Any statement of B's runs as A (UPDATE, DELETE, INSERT ...
// SELECT of B's rows into a table A reads), with A's signature valid on that
// backend. The same happens to A's own message whenever A's install fails
// (next test).
//
// Fix: make the install fail closed: on a change of identity, hold the
// client's frames until the install's ReadyForQuery has come and been proved
// (one round trip, only when the identity changes; a connection of the same
// identity keeps the pipelined path). Wrapping the install in BEGIN ...
// COMMIT inside its Sync is not enough: a failed install then leaves a
// failed block, but a client message that begins with ROLLBACK (or COMMIT)
// ends it and runs the rest as the previous identity. Apart from that,
// DISCARD TEMP in the install lets one client's temporary objects exhaust
// the server's lock table for everyone; the pin rules could count a CREATE
// under a search_path led by pg_temp as temp_object.
func TestReview14FailedInstallRunsNextClientAsPrevious(t *testing.T) {
	const tag = "r14 planted: "
	t.Cleanup(func() { r10Super(t, "DELETE FROM notes WHERE content LIKE 'r14 planted:%'") })
	p := proxytest.Start(t, pg, oneConnection)
	b := rawSession(t, p, "user2") // logged in before: its startup needs the connection
	defer b.Close()
	a := rawSession(t, p, "user1")
	defer a.Close()
	pid := r10Must(t, a, "SELECT pg_backend_pid()::text")[0]
	t.Cleanup(func() { r14DropPlanted(t, pid) })
	r14PlantTemp(t, a, 2000, 50)

	b.send(t, &pgproto3.Query{String: "INSERT INTO notes (content) VALUES ('" + tag + "secret of user2')"})
	got := r14Within(t, b, 10*time.Second)
	rows := r14RowsSettled(t, tag)
	t.Logf("b's INSERT: %s; rows: %s", got, rows)
	if strings.Contains(rows, "user1:") {
		t.Errorf("b's (user2) INSERT ran with user1's identity: the row is %q", rows)
	}
}

// FIXED, as above. The same fail-open install, reached with the client's own
// CancelRequest: a cancel reaches the backend serving the client at that
// moment, which, from the client's first message on a connection of another
// identity, is running the proxy's install ahead of that message. A cancel
// that lands there fails the install (57014), and the message the client
// sent runs as the previous client. A driver does this by itself when a
// query's context times out while its install is slow (pgx sends a
// CancelRequest); an attacker repeats its cancel until it lands. Here the
// install is held in place by a lock the superuser takes on the backend's
// temporary schema (DISCARD TEMP waits for it), a stand-in for any slow
// install; A (user1) sends `INSERT INTO notes (content) ...` and then its
// cancel, and the row is stored as user2's, the connection's previous
// identity (a sends it twice: the proxy cancels what runs as it ends the
// session, which may catch one). Responsible code and fix: as above
// (txpool.go prepare/runTx, session/proof.go installBatch).
func TestReview14CancelDuringInstallRunsAsPrevious(t *testing.T) {
	const tag = "r14 cancelled install"
	t.Cleanup(func() { r10Super(t, "DELETE FROM notes WHERE content LIKE 'r14 cancelled install%'") })
	p := proxytest.Start(t, pg, oneConnection)
	a, pid, secret := r14MustLogin(t, p, "user1")
	c := rawSession(t, p, "user3") // gives the backend a temporary schema
	defer c.Close()
	r10Must(t, c, "BEGIN; SET LOCAL search_path = pg_temp; CREATE TABLE r14_ns (x int); COMMIT")
	b := rawSession(t, p, "user2") // the connection's last identity
	defer b.Close()
	ns := r10Must(t, b, "SELECT nspname FROM pg_namespace WHERE oid = pg_my_temp_schema()")[0]

	su := superConn(t)
	ctx := context.Background()
	tx, err := su.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, "COMMENT ON SCHEMA "+ns+" IS 'r14'"); err != nil {
		t.Fatal(err)
	}
	// Twice: the proxy cancels what runs as it ends a's session, which may
	// catch one of them.
	insert := &pgproto3.Query{String: "INSERT INTO notes (content) VALUES ('" + tag + "')"}
	a.send(t, insert, insert)
	time.Sleep(300 * time.Millisecond) // a's install waits in DISCARD TEMP
	if err := sendCancel(p.Addr, pid, secret); err != nil {
		t.Fatal(err)
	}
	got := r14Within(t, a, 5*time.Second)
	_ = tx.Rollback(ctx)
	rows := r14RowsSettled(t, tag)
	t.Logf("a's INSERT after its cancel: %s; rows: %s", got, rows)
	if strings.Contains(rows, "user2:") {
		t.Errorf("a's (user1) INSERT ran with user2's identity after a's cancel hit the install: %q", rows)
	}
}

// FIXED (runTx waits for cancels under way before it hands the startup's
// connection back). A CancelRequest could reach the next client's
// statement: at the
// start of a transaction-pooled session, runTx hands the connection the
// startup used back to the pool (txpool.go runTx, `t.pool.Return(first)`)
// without waiting for the cancels under way to it (t.cancels.Wait(), which
// serveUpstream and the end of runTx do before letting a connection go).
// The client knows its key from the BackendKeyData of the greeting, written
// before runTx starts; a CancelRequest sent at once finds relay.up still
// set to that connection, and while it travels to the server the
// connection goes to the next waiting client, whose statement the cancel
// then kills (57014). Here, with one upstream connection, B (user2) waits
// for it with `SELECT pg_sleep(0.05)` while A (user1) logs in; A sends its
// cancel as soon as it reads the greeting. The proxy's clock hook
// (Config.Now, called between the greeting and runTx) pauses A's session
// for up to a millisecond, as a busy scheduler would, to make the window
// wide enough to hit in a test. Fix: t.cancels.Wait() before
// t.pool.Return(first).
func TestReview14CancelAtLoginReachesNextClient(t *testing.T) {
	var armed atomic.Bool
	release := make(chan struct{})
	p := proxytest.Start(t, pg, oneConnection, func(s *proxytest.Setup) {
		s.Now = func() time.Time {
			if armed.CompareAndSwap(true, false) {
				select {
				case <-release:
				case <-time.After(5 * time.Second):
				}
			}
			return time.Now()
		}
	})
	b := rawSession(t, p, "user2")
	defer b.Close()
	c := rawSession(t, p, "user3")
	defer c.Close()
	tok := p.Token(t, "user1")
	waiting := func(n int) {
		for deadline := time.Now().Add(5 * time.Second); p.Config.Pool.Snapshot().Waiting != n; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%d clients never waited for the connection", n)
			}
		}
	}
	type login struct {
		a           *rawClient
		pid, secret uint32
		err         error
	}
	for i := range 40 {
		_ = b.SetDeadline(time.Now().Add(20 * time.Second))
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		r10Must(t, c, "BEGIN") // c holds the one connection
		logged := make(chan login, 1)
		go func() {
			a, pid, secret, err := r14Login(p, "user1", tok)
			logged <- login{a, pid, secret, err}
		}()
		waiting(1) // a's startup waits first
		b.send(t, &pgproto3.Query{String: "SELECT pg_sleep(0.05)"})
		waiting(2) // then b's transaction
		// The cancel's own connection is made now, so that only a's
		// session meets the paused clock.
		cc, err := net.Dial("tcp", p.Addr)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond)
		armed.Store(true)
		r10Must(t, c, "COMMIT") // the connection goes to a's startup, then to b
		l := <-logged
		if l.err != nil {
			t.Fatal(l.err)
		}
		go func() {
			time.Sleep(time.Duration(i%8) * 150 * time.Microsecond)
			release <- struct{}{}
		}()
		msg := binary.BigEndian.AppendUint32(nil, 16)
		msg = binary.BigEndian.AppendUint32(msg, 80877102)
		msg = binary.BigEndian.AppendUint32(msg, l.pid)
		msg = binary.BigEndian.AppendUint32(msg, l.secret)
		if _, err := cc.Write(msg); err != nil {
			t.Fatal(err)
		}
		_ = cc.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := cc.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("cancel: %v", err)
		}
		cc.Close()
		got := r14Within(t, b, 5*time.Second)
		l.a.Close()
		if strings.Contains(got, "E:57014") {
			t.Fatalf("trial %d: a's (user1) cancel, sent as a logged in, cancelled b's (user2) statement: %s", i, got)
		}
	}
}

// FIXED (a pinned client's statements keep their names, not their texts:
// statements.parse). A client could make the proxy keep any amount of
// memory: every Parse
// of a named statement is kept whole in the client's statements
// (prepared.go statements.parse/keep, called from relay.go stateEffects),
// also past the documented bound of 2,000 statements or 8 MiB (which only
// pins the client: `if t.stmts.full() { t.pin(...) }`, and the Parse is
// kept anyway), and also when the server never ran it (a Parse it failed or
// skipped after an error keeps its frame: statements.undo restores only the
// connection's record). Here A sends, three times, a Parse that fails
// followed by ten 4 MiB Parses of new names and a Sync: the server skips
// all of them and holds nothing, and the proxy's heap grows by about 40 MiB
// each time, without end (a Parse may be up to 64 MiB, maxInspected). Fix:
// keep nothing once the client is pinned or past the bound (refuse the
// Parse, 54000, or let it through unrenamed on the pinned connection), and
// count the bytes of statements whose Parse the server did not run.
func TestReview14StatementsKeptWithoutBound(t *testing.T) {
	p := proxytest.Start(t, pg, oneConnection)
	a := rawSession(t, p, "user1")
	defer a.Close()
	big := "SELECT '" + strings.Repeat("x", 4<<20) + "'"
	a.send(t, &pgproto3.Parse{Name: "warm", Query: big}, &pgproto3.Sync{})
	untilReady(t, a, 1)
	before := heapInUse()
	for round := range 3 {
		_ = a.SetDeadline(time.Now().Add(20 * time.Second))
		a.send(t, &pgproto3.Parse{Name: "bad", Query: "SELECT * FROM r14_no_such_table"})
		for i := range 10 {
			a.send(t, &pgproto3.Parse{Name: fmt.Sprintf("s%d_%d", round, i), Query: big})
		}
		a.send(t, &pgproto3.Sync{})
		if got := strings.Join(untilReady(t, a, 1), " "); got != "E:42P01 Z" {
			t.Fatalf("round %d: %s", round, got)
		}
	}
	grown := (heapInUse() - before) >> 20
	t.Logf("heap grew %d MiB for 120 MiB of Parses the server never ran", grown)
	if grown > 32 {
		t.Errorf("the proxy keeps %d MiB of one client's statements, past the 8 MiB it documents and none of them on the server", grown)
	}
}

// FIXED (at expiry with more than the running unit sent, the session ends at
// once and its connection is aborted: relay.expire, Upstream.Abort). A new
// transaction started after the token expired: the client
// pipelines, a moment before expiry, a statement that outlasts it and
// another transaction behind it (two Queries, or two Sync-terminated
// batches, in one write). fromClient forwards both at once (relay.go: the
// expiry is checked only for messages read after it), so the server runs
// the second one after the expiry, and it commits; the session then ends
// with 28P01. The README says "A token that expires ends the session once
// the running transaction finishes; no new one starts." A client can queue
// up to maxLedger (16,384) such transactions, each as long as it likes. Fix:
// once a token is near its expiry (within the leeway or a fixed margin),
// forward nothing past the first outstanding Sync, Query or FunctionCall
// until its ReadyForQuery has come; or, at expiry, when more than the
// running unit is queued upstream, cancel and close the connection (which
// runs nothing more of it).
func TestReview14PipelinedTransactionAfterExpiry(t *testing.T) {
	for _, tc := range []struct {
		name string
		msgs func(insert string) []pgproto3.FrontendMessage
	}{
		{"simple", func(insert string) []pgproto3.FrontendMessage {
			return []pgproto3.FrontendMessage{&pgproto3.Query{String: "SELECT pg_sleep(1.5)"}, &pgproto3.Query{String: insert}}
		}},
		{"extended", func(insert string) []pgproto3.FrontendMessage {
			return []pgproto3.FrontendMessage{
				&pgproto3.Parse{Query: "SELECT pg_sleep(1.5)"}, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{},
				&pgproto3.Parse{Query: insert}, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{}}
		}},
	} {
		for _, mode := range poolModes {
			t.Run(tc.name+" "+mode.name, func(t *testing.T) {
				tag := "r14 after expiry " + tc.name + " " + mode.name
				t.Cleanup(func() { r10Super(t, "DELETE FROM notes WHERE content LIKE 'r14 after expiry%'") })
				p := proxytest.Start(t, pg, mode.setup)
				tok, exp := r14ShortToken(t, p, "user1", 2*time.Second)
				a, _, _ := rawStartup(t, p, "user1", tok, "")
				defer a.Close()
				time.Sleep(time.Until(exp.Add(-700 * time.Millisecond)))
				a.send(t, tc.msgs("INSERT INTO notes (content) VALUES ('"+tag+" at ' || clock_timestamp()::text)")...)
				for {
					if _, err := a.fe.Receive(); err != nil {
						break // the session ends
					}
				}
				if rows := r14RowsSettled(t, tag); rows != "" {
					t.Errorf("a transaction began after the token expired at %s and committed: %s", exp.UTC().Format("15:04:05"), rows)
				}
			})
		}
	}
}

// r14ShortToken mints a token for sub that expires in ttl whole seconds,
// starting at a fresh second, and returns it with its expiry.
func r14ShortToken(t *testing.T, p *proxytest.Proxy, sub string, ttl time.Duration) (string, time.Time) {
	t.Helper()
	time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second)))
	tok, err := p.Issuer.Mint(devissuer.TokenRequest{Subject: sub, TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	return tok, time.Now().Truncate(time.Second).Add(ttl)
}

// HELD, as documented since review 14 (the README said the running
// transaction finishes): a transaction block open when the token expires is
// rolled back. Nothing read after the expiry goes upstream, COMMIT
// included, and the session ends once the server owes nothing, with
// FATAL 28P01; the connection is reset. A BEGIN and an INSERT, the token
// expires, then COMMIT: the row is gone.
func TestReview14TransactionOpenAtExpiryRolledBack(t *testing.T) {
	const tag = "r14 open at expiry"
	t.Cleanup(func() { r10Super(t, "DELETE FROM notes WHERE content LIKE 'r14 open at expiry%'") })
	p := proxytest.Start(t, pg, oneConnection)
	tok, exp := r14ShortToken(t, p, "user1", 2*time.Second)
	a, _, _ := rawStartup(t, p, "user1", tok, "")
	defer a.Close()
	r10Must(t, a, "BEGIN")
	r10Must(t, a, "INSERT INTO notes (content) VALUES ('"+tag+"')")
	time.Sleep(time.Until(exp.Add(300 * time.Millisecond)))
	a.send(t, &pgproto3.Query{String: "COMMIT"})
	got := r14Within(t, a, 3*time.Second)
	if rows := r14Rows(t, tag); got != "E:28P01" || rows != "" {
		t.Errorf("COMMIT of the transaction open at expiry: %s; rows %q (want FATAL 28P01 and no row)", got, rows)
	}
}

// HELD. A statement sent before the token expired that waits for an
// upstream connection until after the expiry never runs: the relay checks
// the expiry once it holds one (fromClient), and the session ends with
// 28P01.
func TestReview14HeldExpiryWhileWaiting(t *testing.T) {
	const tag = "r14 waited past expiry"
	t.Cleanup(func() { r10Super(t, "DELETE FROM notes WHERE content LIKE 'r14 waited past expiry%'") })
	p := proxytest.Start(t, pg, oneConnection)
	c := rawSession(t, p, "user3")
	defer c.Close()
	tok, exp := r14ShortToken(t, p, "user1", 2*time.Second)
	a, _, _ := rawStartup(t, p, "user1", tok, "")
	defer a.Close()
	r10Must(t, c, "BEGIN") // c holds the one connection across a's expiry
	time.Sleep(time.Until(exp.Add(-500 * time.Millisecond)))
	a.send(t, &pgproto3.Query{String: "INSERT INTO notes (content) VALUES ('" + tag + "')"})
	time.Sleep(time.Until(exp.Add(500 * time.Millisecond)))
	r10Must(t, c, "COMMIT")
	if got := r14Within(t, a, 3*time.Second); got != "E:28P01" {
		t.Errorf("a: %s, want E:28P01", got)
	}
	if rows := r14RowsSettled(t, tag); rows != "" {
		t.Errorf("a's statement ran after the expiry: %s", rows)
	}
}

// HELD. Transaction boundaries come from the server: after each of these
// pipelines of client A (user1) on the one upstream connection, client B
// (user2) runs at once when the server is idle outside a transaction, and
// waits while A's transaction (or A's unsynced batch) is open; B always
// runs as itself with status I, and A's next statement runs as A. Covers
// BEGIN and COMMIT mid-string, COMMIT AND CHAIN, ROLLBACK of a failed
// block, empty Query, pipelines of several Syncs with errors, implicit
// transactions in a pipeline, row limits, a JDBC-style fetch in a
// transaction, COPY in and out in both protocols, CopyFail, COPY messages
// outside COPY, FunctionCall, Flush and Sync alone, and a Query after an
// unsynced batch.
func TestReview14HeldTransactionBoundaries(t *testing.T) {
	r10Super(t, "DROP TABLE IF EXISTS r14_held; CREATE TABLE r14_held (x text); GRANT ALL ON r14_held TO PUBLIC")
	t.Cleanup(func() { r10Super(t, "DROP TABLE IF EXISTS r14_held") })
	q := func(s string) pgproto3.FrontendMessage { return &pgproto3.Query{String: s} }
	ext := func(sql string, limit uint32) []pgproto3.FrontendMessage {
		return []pgproto3.FrontendMessage{&pgproto3.Parse{Query: sql}, &pgproto3.Bind{}, &pgproto3.Execute{MaxRows: limit}}
	}
	cat := func(parts ...any) []pgproto3.FrontendMessage {
		var out []pgproto3.FrontendMessage
		for _, p := range parts {
			switch p := p.(type) {
			case pgproto3.FrontendMessage:
				out = append(out, p)
			case []pgproto3.FrontendMessage:
				out = append(out, p...)
			}
		}
		return out
	}
	sync := &pgproto3.Sync{}
	// untilCopy reads up to CopyInResponse.
	untilCopy := func(t *testing.T, a *rawClient) {
		for {
			switch m := a.receive(t).(type) {
			case *pgproto3.CopyInResponse:
				return
			case *pgproto3.ErrorResponse:
				t.Fatalf("%s %s", m.Code, m.Message)
			}
		}
	}
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, a *rawClient) // leaves a's answers read
		open string                           // what ends a's transaction, if it is left open
	}{
		{"BEGIN mid-string", func(t *testing.T, a *rawClient) { r10Must(t, a, "SELECT 1; BEGIN; SELECT 2") }, "COMMIT"},
		{"BEGIN and COMMIT in one string", func(t *testing.T, a *rawClient) { r10Must(t, a, "BEGIN; SELECT 1; COMMIT; SELECT 2") }, ""},
		{"COMMIT AND CHAIN", func(t *testing.T, a *rawClient) { r10Must(t, a, "BEGIN"); r10Must(t, a, "COMMIT AND CHAIN") }, "COMMIT"},
		{"failed block left open", func(t *testing.T, a *rawClient) { r10Query(t, a, "BEGIN; SELECT 1/0") }, "ROLLBACK"},
		{"ROLLBACK of a failed block", func(t *testing.T, a *rawClient) {
			r10Query(t, a, "BEGIN; SELECT 1/0")
			r10Query(t, a, "SELECT 1")
			r10Must(t, a, "ROLLBACK")
		}, ""},
		{"empty Query", func(t *testing.T, a *rawClient) { a.send(t, q("")); untilReady(t, a, 1) }, ""},
		{"extended BEGIN", func(t *testing.T, a *rawClient) { a.send(t, cat(ext("BEGIN", 0), sync)...); untilReady(t, a, 1) }, "COMMIT"},
		{"Syncs with an error between", func(t *testing.T, a *rawClient) {
			a.send(t, cat(ext("SELECT 1", 0), sync, ext("SELECT 1/0", 0), sync, ext("SELECT 2", 0), sync)...)
			untilReady(t, a, 3)
		}, ""},
		{"implicit transaction failed in a pipeline", func(t *testing.T, a *rawClient) {
			a.send(t, cat(ext("INSERT INTO r14_held VALUES ('rolled back')", 0), ext("SELECT 1/0", 0), ext("BEGIN", 0), sync)...)
			untilReady(t, a, 1)
		}, ""},
		{"row limit then Sync", func(t *testing.T, a *rawClient) {
			a.send(t, cat(ext("SELECT generate_series(1, 5)", 2), sync)...)
			untilReady(t, a, 1)
		}, ""},
		{"fetch size in a transaction", func(t *testing.T, a *rawClient) {
			a.send(t, q("BEGIN"), &pgproto3.Parse{Query: "SELECT generate_series(1, 5)"}, &pgproto3.Bind{DestinationPortal: "c"},
				&pgproto3.Execute{Portal: "c", MaxRows: 2}, sync, &pgproto3.Execute{Portal: "c", MaxRows: 2}, sync)
			if got := strings.Join(untilReady(t, a, 3), " "); got != "C:BEGIN Z ? ? D:1 D:2 ? Z D:3 D:4 ? Z" {
				t.Fatalf("fetch: %s", got)
			}
		}, "COMMIT"},
		{"COPY FROM STDIN", func(t *testing.T, a *rawClient) {
			a.send(t, q("COPY r14_held FROM STDIN"))
			untilCopy(t, a)
			a.send(t, &pgproto3.CopyData{Data: []byte("a\n")}, &pgproto3.CopyDone{})
			untilReady(t, a, 1)
		}, ""},
		{"CopyFail", func(t *testing.T, a *rawClient) {
			a.send(t, q("COPY r14_held FROM STDIN"))
			untilCopy(t, a)
			a.send(t, &pgproto3.CopyData{Data: []byte("a\n")}, &pgproto3.CopyFail{Message: "no"})
			untilReady(t, a, 1)
		}, ""},
		{"COPY in a transaction", func(t *testing.T, a *rawClient) {
			a.send(t, q("BEGIN; COPY r14_held FROM STDIN"))
			untilCopy(t, a)
			a.send(t, &pgproto3.CopyData{Data: []byte("a\n")}, &pgproto3.CopyDone{})
			untilReady(t, a, 1)
		}, "ROLLBACK"},
		{"COPY TO STDOUT", func(t *testing.T, a *rawClient) { a.send(t, q("COPY (SELECT 1) TO STDOUT")); untilReady(t, a, 1) }, ""},
		{"extended COPY FROM STDIN", func(t *testing.T, a *rawClient) {
			a.send(t, cat(ext("COPY r14_held FROM STDIN", 0), &pgproto3.Flush{})...)
			untilCopy(t, a)
			a.send(t, &pgproto3.CopyData{Data: []byte("a\n")}, &pgproto3.CopyDone{}, sync)
			untilReady(t, a, 1)
		}, ""},
		{"extended COPY TO STDOUT", func(t *testing.T, a *rawClient) {
			a.send(t, cat(ext("COPY (SELECT 1) TO STDOUT", 0), sync)...)
			untilReady(t, a, 1)
		}, ""},
		{"COPY messages outside COPY", func(t *testing.T, a *rawClient) {
			a.send(t, &pgproto3.CopyData{Data: []byte("x")}, &pgproto3.CopyDone{}, &pgproto3.CopyFail{Message: "x"}, q("SELECT 1"))
			untilReady(t, a, 1)
		}, ""},
		{"FunctionCall", func(t *testing.T, a *rawClient) {
			a.send(t, &pgproto3.FunctionCall{Function: 2078, ArgFormatCodes: []uint16{0},
				Arguments: [][]byte{[]byte("jwt.claims.sub"), []byte("user2"), []byte("false")}})
			if got := strings.Join(untilReady(t, a, 1), " "); got != "E:42501 Z" {
				t.Fatalf("FunctionCall: %s", got)
			}
		}, ""},
		{"Flush and Sync alone", func(t *testing.T, a *rawClient) { a.send(t, &pgproto3.Flush{}, sync); untilReady(t, a, 1) }, ""},
		{"Query after an unsynced batch", func(t *testing.T, a *rawClient) {
			a.send(t, cat(ext("SELECT 1", 0), &pgproto3.Flush{}, q("SELECT 2"))...)
			untilReady(t, a, 1)
		}, ""},
		{"unsynced batch", func(t *testing.T, a *rawClient) {
			a.send(t, cat(ext("SELECT 1", 0), &pgproto3.Flush{})...)
			for {
				if _, ok := a.receive(t).(*pgproto3.CommandComplete); ok {
					return
				}
			}
		}, "SYNC"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, oneConnection)
			b := rawSession(t, p, "user2")
			defer b.Close()
			a := rawSession(t, p, "user1")
			defer a.Close()
			tc.run(t, a)
			b.send(t, q("SELECT current_setting('jwt.claims.sub')"))
			if tc.open != "" {
				if got := r14Within(t, b, 300*time.Millisecond); got != "timeout" {
					t.Fatalf("b ran while a's transaction was open: %s", got)
				}
				if tc.open == "SYNC" {
					a.send(t, sync)
					untilReady(t, a, 1)
				} else {
					r10Must(t, a, tc.open)
				}
			}
			if got := r14Within(t, b, 5*time.Second); got != "T D:user2 C:SELECT 1 ZI" {
				t.Errorf("b: %s", got)
			}
			if got := r10Must(t, a, "SELECT current_setting('jwt.claims.sub') || ' ' || (SELECT count(*) FROM r14_held WHERE x = 'rolled back')"); got[0] != "user1 0" {
				t.Errorf("a afterwards: %v", got)
			}
		})
	}
}

// HELD. A CancelRequest reaches nothing of another client's: the key of a
// session that ended, the key of a client that is idle while another client
// runs on the connection it last used, and a wrong secret; nor, over many
// trials, a cancel sent as the sender's transaction ends and the connection
// passes to a waiting client (serveUpstream waits for cancels under way).
func TestReview14HeldCancel(t *testing.T) {
	p := proxytest.Start(t, pg, oneConnection)
	b := rawSession(t, p, "user2")
	defer b.Close()
	ended, endedPID, endedSecret := r14MustLogin(t, p, "user3")
	r10Must(t, ended, "SELECT 1")
	ended.Close()
	a, pid, secret := r14MustLogin(t, p, "user1")
	r10Must(t, a, "SELECT 1") // the connection's last client is a
	for _, tc := range []struct {
		name        string
		pid, secret uint32
	}{
		{"ended session's key", endedPID, endedSecret},
		{"idle client's key", pid, secret},
		{"wrong secret", pid, secret + 1},
	} {
		b.send(t, &pgproto3.Query{String: "SELECT pg_sleep(0.3)"})
		time.Sleep(50 * time.Millisecond)
		if err := sendCancel(p.Addr, tc.pid, tc.secret); err != nil {
			t.Fatal(err)
		}
		if got := r14Within(t, b, 5*time.Second); got != "T D: C:SELECT 1 ZI" {
			t.Errorf("%s: b's statement: %s", tc.name, got)
		}
	}
	for i := range 30 {
		_ = a.SetDeadline(time.Now().Add(20 * time.Second))
		_ = b.SetDeadline(time.Now().Add(20 * time.Second))
		a.send(t, &pgproto3.Query{String: "SELECT pg_sleep(0.02)"})
		time.Sleep(5 * time.Millisecond)
		b.send(t, &pgproto3.Query{String: "SELECT pg_sleep(0.05)"}) // waits for a's connection
		time.Sleep(time.Duration(10+i%10) * time.Millisecond)
		if err := sendCancel(p.Addr, pid, secret); err != nil {
			t.Fatal(err)
		}
		r14Within(t, a, 5*time.Second) // cancelled or not: a's own
		if got := r14Within(t, b, 5*time.Second); got != "T D: C:SELECT 1 ZI" {
			t.Fatalf("trial %d: a's cancel reached b's statement: %s", i, got)
		}
	}
}

// HELD. Bounded cost of what a client may pipeline: 20,000 Parse/Bind
// pairs with no Sync (the ledger fills to maxLedger and the client side
// waits for the server), 100,000 Flush messages, and a Parse in a failed
// batch repeated under one name, answered and with the proxy's heap within
// a few MiB; and a client that holds the one connection in a transaction
// makes another wait its --pool-wait and get 53300, no more.
func TestReview14HeldPipelineCost(t *testing.T) {
	p := proxytest.Start(t, pg, func(s *proxytest.Setup) {
		oneConnection(s)
		s.PoolConfig.WaitTimeout = time.Second
	})
	a := rawSession(t, p, "user1")
	defer a.Close()
	b := rawSession(t, p, "user2")
	defer b.Close()
	before := heapInUse()
	var msgs []pgproto3.FrontendMessage
	for range 20000 {
		msgs = append(msgs, &pgproto3.Parse{Query: "SELECT 1"}, &pgproto3.Bind{})
	}
	a.send(t, append(msgs, &pgproto3.Sync{})...)
	if got := untilReady(t, a, 1); len(got) != 40001 {
		t.Errorf("20,000 Parse/Bind pairs: %d answers", len(got))
	}
	msgs = msgs[:0]
	for range 100000 {
		msgs = append(msgs, &pgproto3.Flush{})
	}
	a.send(t, append(msgs, &pgproto3.Sync{})...)
	if got := strings.Join(untilReady(t, a, 1), " "); got != "Z" {
		t.Errorf("Flushes: %s", got)
	}
	for range 200 {
		a.send(t, &pgproto3.Parse{Name: "bad", Query: "SELECT * FROM r14_no_such_table"}, &pgproto3.Parse{Name: "same", Query: "SELECT 1"}, &pgproto3.Sync{})
		untilReady(t, a, 1)
	}
	msgs = nil
	if grown := (heapInUse() - before) >> 20; grown > 16 {
		t.Errorf("heap grew %d MiB", grown)
	}
	r10Must(t, a, "BEGIN")
	b.send(t, &pgproto3.Query{String: "SELECT 1"})
	began := time.Now()
	got := r14Within(t, b, 5*time.Second)
	if !strings.Contains(got, "E:53300") || time.Since(began) > 3*time.Second {
		t.Errorf("b while a holds the connection: %s after %v", got, time.Since(began))
	}
	r10Must(t, a, "COMMIT")
}
