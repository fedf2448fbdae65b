package proxy_test

// Transaction pooling (txpool.go): identity exact in every transaction,
// prepared statements that follow their client, session state pinned, and
// the rest of the session's meaning kept.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
	"github.com/rlsproxy/rlsproxy/internal/sqlquote"
	"github.com/rlsproxy/rlsproxy/session"
)

// txPooled is transaction pooling over size upstream connections, with a
// pool wait long enough for many clients to queue.
func txPooled(size int) proxytest.Option {
	return func(s *proxytest.Setup) {
		proxytest.TransactionPooling(s)
		s.PoolConfig = session.PoolConfig{Size: size, MaxConns: size, WaitTimeout: 60 * time.Second}
		// Hundreds of clients log in at once through a few connections:
		// on a loaded machine the last ones wait longer than 10 s.
		s.StartupTimeout = time.Minute
	}
}

// txUsers gives each of n users one row of signed_notes and of notes, which
// their policies show them alone.
func txUsers(t *testing.T, n int) []string {
	t.Helper()
	var users []string
	var values []string
	for i := range n {
		u := fmt.Sprintf("tx-user-%02d", i)
		users = append(users, u)
		values = append(values, fmt.Sprintf("('%s', 'row of %s')", u, u))
	}
	r10Super(t, "INSERT INTO signed_notes (user_id, content) VALUES "+strings.Join(values, ", ")+
		"; INSERT INTO notes (user_id, content) VALUES "+strings.Join(values, ", "))
	t.Cleanup(func() {
		_, _ = superConn(t).Exec(context.Background(), "DELETE FROM signed_notes WHERE user_id LIKE 'tx-user-%'; DELETE FROM notes WHERE user_id LIKE 'tx-user-%'")
	})
	return users
}

// The proof: 200 clients of 50 users over 5 upstream connections,
// randomly interleaved, at least 10,000 transactions, each asserting its
// role, its claim settings, auth.user_id() and the rows its policies show.
// Guard on, and guard off with signed claims.
func TestTxPoolingIdentityExact(t *testing.T) {
	const clients, users, conns, perClient = 200, 50, 5, 50
	names := txUsers(t, users)
	for _, mode := range []struct {
		name string
		opts []proxytest.Option
	}{
		{"guard on", []proxytest.Option{withSigner}},
		{"guard off, signed claims", []proxytest.Option{withSigner, proxytest.GuardOff}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, append([]proxytest.Option{txPooled(conns)}, mode.opts...)...)
			var done, mismatches atomic.Int64
			var firstErr sync.Once
			fail := func(format string, args ...any) {
				mismatches.Add(1)
				firstErr.Do(func() { t.Errorf(format, args...) })
			}
			var wg sync.WaitGroup
			for c := range clients {
				wg.Add(1)
				go func() {
					defer wg.Done()
					user := names[c%users]
					ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
					defer cancel()
					cfg, err := pgx.ParseConfig(p.DSN(user, p.Token(t, user)))
					if err != nil {
						fail("%v", err)
						return
					}
					if c%4 == 1 {
						cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
					}
					// No login may fail: a new upstream connection's first
					// answer once went to a read pgconn left under way on a
					// loaded machine (session.TestOpenSlowWrites).
					conn, err := pgx.ConnectConfig(ctx, cfg)
					if err != nil {
						fail("client %d connect: %v", c, err)
						return
					}
					defer conn.Close(context.Background())
					rng := rand.New(rand.NewPCG(uint64(c), 11))
					for range perClient {
						if err := txCheck(ctx, conn, user, rng.IntN(3)); err != nil {
							fail("client %d (%s): %v", c, user, err)
						}
						done.Add(1)
						if rng.IntN(4) == 0 {
							time.Sleep(time.Duration(rng.IntN(2000)) * time.Microsecond)
						}
					}
				}()
			}
			wg.Wait()
			st := p.Config.Pool.Snapshot()
			t.Logf("%d transactions, %d mismatches; upstream connections opened %d, discarded %d; installs %d, same-identity hits %d (%.0f%%)",
				done.Load(), mismatches.Load(), st.Opened, st.Discarded, st.Installs, st.IdentityHits,
				100*float64(st.IdentityHits)/float64(max(1, st.IdentityHits+st.Installs)))
			if done.Load() < clients*perClient || mismatches.Load() != 0 {
				t.Fatalf("%d transactions, %d mismatches", done.Load(), mismatches.Load())
			}
			if st.Opened > conns {
				t.Errorf("opened %d upstream connections, want at most %d", st.Opened, conns)
			}
			if st.Installs == 0 {
				t.Error("no transaction needed an install: the test interleaves nothing")
			}
		})
	}
}

// txCheck runs one transaction, of one of three shapes, and checks that it
// ran as user.
func txCheck(ctx context.Context, conn *pgx.Conn, user string, shape int) error {
	const q = `SELECT current_user::text, current_setting('jwt.claims.sub'), auth.user_id(),
		(current_setting('request.jwt.claims')::jsonb ->> 'sub'),
		(SELECT string_agg(content, ',') FROM signed_notes),
		(SELECT string_agg(content, ',') FROM notes)`
	var role, sub, uid, claimsSub, signedRows, rows string
	scan := func(r pgx.Row) error {
		return r.Scan(&role, &sub, &uid, &claimsSub, &signedRows, &rows)
	}
	var err error
	switch shape {
	case 0: // one statement, autocommit
		err = scan(conn.QueryRow(ctx, q))
	case 1: // an explicit transaction of several statements
		var tx pgx.Tx
		if tx, err = conn.Begin(ctx); err == nil {
			if _, err = tx.Exec(ctx, "SELECT 1"); err == nil {
				err = scan(tx.QueryRow(ctx, q))
			}
			if err == nil {
				err = tx.Commit(ctx)
			} else {
				_ = tx.Rollback(ctx)
			}
		}
	case 2: // a batch: several statements in one pipeline
		b := &pgx.Batch{}
		b.Queue("SELECT 1")
		b.Queue(q).QueryRow(func(r pgx.Row) error { return scan(r) })
		err = conn.SendBatch(ctx, b).Close()
	}
	if err != nil {
		return err
	}
	want := "row of " + user
	if role != "authenticated" || sub != user || uid != user || claimsSub != user || signedRows != want || rows != want {
		return fmt.Errorf("shape %d ran as role %s sub %s auth.user_id() %s claims.sub %s, saw signed_notes %q notes %q",
			shape, role, sub, uid, claimsSub, signedRows, rows)
	}
	return nil
}

// txStateCase is a statement run by client A, and what it leaves: pin names
// the reason it pins A to its backend ("" for none), probe is a query whose
// answer, want, shows the state A's later transactions still see.
type txStateCase struct {
	sql, pin    string
	probe, want string
}

var txStateCases = []txStateCase{
	{"SET search_path = public, pg_catalog", "set", "SHOW search_path", "public, pg_catalog"},
	{"SELECT set_config('statement_timeout', '1234', false)", "set", "SHOW statement_timeout", "1234ms"},
	{"SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", "session_characteristics", "SHOW default_transaction_isolation", "serializable"},
	{"LISTEN tx_channel", "listen", "SELECT string_agg(c, ',') FROM pg_listening_channels() c", "tx_channel"},
	{"CREATE TEMP TABLE tx_temp (x int); INSERT INTO tx_temp VALUES (7)", "temp_object", "SELECT x::text FROM tx_temp", "7"},
	{"DECLARE tx_cursor CURSOR WITH HOLD FOR SELECT 'held'::text", "hold_cursor", "SELECT count(*)::text FROM pg_cursors WHERE name = 'tx_cursor'", "1"},
	{"SELECT pg_advisory_lock(4242)", "advisory_lock", "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND pid = pg_backend_pid()", "1"},
	{"PREPARE tx_prep AS SELECT 'prepared'::text", "prepare", "EXECUTE tx_prep", "prepared"},

	// Look-alikes that leave nothing a later transaction misses.
	{"BEGIN; SET LOCAL search_path = public; COMMIT", "", "SHOW search_path", `"$user", public`},
	{"SELECT set_config('statement_timeout', '1234', true)", "", "SHOW statement_timeout", "0"},
	{"RESET statement_timeout", "", "SHOW statement_timeout", "0"},
	{"SELECT pg_advisory_xact_lock(4242)", "", "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242", "0"},
	{"BEGIN; CREATE TEMP TABLE tx_gone (x int) ON COMMIT DROP; COMMIT", "", "SELECT count(*)::text FROM pg_class WHERE relname = 'tx_gone'", "0"},
	{"BEGIN; DECLARE c CURSOR FOR SELECT 1; COMMIT", "", "SELECT count(*)::text FROM pg_cursors", "0"},
	{"SELECT 'SET search_path = x; LISTEN y'", "", "SELECT 1::text", "1"},
	// Reported settings follow the client instead (TestTxPoolingCarriedSettings).
	{"SET application_name = 'client-a'", "", "SHOW application_name", "client-a"},
	{"SET TimeZone = 'Asia/Tokyo'", "", "SHOW TimeZone", "Asia/Tokyo"},
}

// With one upstream connection, a pinned client keeps it: another client's
// transaction waits out --pool-wait and gets 53300. One that is not pinned
// lets it go, and still sees its own state. The reason is counted once.
func TestTxPoolingPins(t *testing.T) {
	for _, tc := range txStateCases {
		t.Run(tc.sql, func(t *testing.T) {
			p := proxytest.Start(t, pg, func(s *proxytest.Setup) {
				proxytest.TransactionPooling(s)
				s.PoolConfig = session.PoolConfig{Size: 1, MaxConns: 1, WaitTimeout: time.Second}
			})
			ctx := context.Background()
			a := rawSession(t, p, "user1")
			b := connect(t, p, "user2", p.Token(t, "user2"))
			before := p.Counter(t, "rlsproxy_pinned_sessions_total")
			r10Must(t, a, tc.sql)
			var one int
			err := b.QueryRow(ctx, "SELECT 1").Scan(&one)
			pinned := err != nil && strings.Contains(err.Error(), "53300")
			if tc.pin != "" && !pinned {
				t.Errorf("not pinned: another client's transaction got the connection (%v)", err)
			}
			if tc.pin == "" && err != nil {
				t.Errorf("pinned (or failed): another client's transaction: %v", err)
			}
			if got := p.Counter(t, "rlsproxy_pinned_sessions_total") - before; got != map[bool]float64{true: 1, false: 0}[tc.pin != ""] {
				t.Errorf("pinned sessions counted %v", got)
			}
			if tc.pin != "" && !strings.Contains(p.Logs(), "reason="+tc.pin) {
				t.Errorf("no log of the pin with reason=%s", tc.pin)
			}
			for range 3 { // and again, after other clients' transactions
				if got := r10Must(t, a, tc.probe); len(got) != 1 || got[0] != tc.want {
					t.Errorf("%s: %v, want %s", tc.probe, got, tc.want)
				}
				if tc.pin == "" {
					if err := b.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
						t.Errorf("another client's transaction: %v", err)
					}
				}
			}
			if got := r10Must(t, a, "SELECT current_user::text || ' ' || current_setting('jwt.claims.sub')"); got[0] != "authenticated user1" {
				t.Errorf("a runs as %v", got)
			}
		})
	}
}

// --session-state refuse: what would pin is refused with 0A000 naming the
// statement, and nothing pins; the look-alikes pass.
func TestTxPoolingRefuseSessionState(t *testing.T) {
	p := proxytest.Start(t, pg, func(s *proxytest.Setup) {
		proxytest.TransactionPooling(s)
		s.RefuseSessionState = true
		s.PoolConfig = session.PoolConfig{Size: 1, MaxConns: 1, WaitTimeout: time.Second}
	})
	a := rawSession(t, p, "user1")
	b := connect(t, p, "user2", p.Token(t, "user2"))
	for _, tc := range txStateCases {
		rows, code := r10Query(t, a, tc.sql)
		switch {
		case tc.pin != "" && code != "0A000":
			t.Errorf("%s: SQLSTATE %q (%v), want 0A000", tc.sql, code, rows)
		case tc.pin == "" && code != "":
			t.Errorf("%s: SQLSTATE %s", tc.sql, code)
		}
		var one int
		if err := b.QueryRow(context.Background(), "SELECT 1").Scan(&one); err != nil {
			t.Fatalf("after %s, another client's transaction: %v", tc.sql, err)
		}
	}
	if got := p.Counter(t, "rlsproxy_pinned_sessions_total"); got != 0 {
		t.Errorf("%v sessions pinned", got)
	}
}

// The pool's series: connections by role and database, waiting clients,
// checkouts by identity, releases, pins by reason, statements re-prepared.
func TestTxPoolingMetrics(t *testing.T) {
	p := proxytest.Start(t, pg, txPooled(2))
	ctx := context.Background()
	var conns []*pgx.Conn
	for _, u := range []string{"user1", "user2", "user1"} {
		conns = append(conns, connect(t, p, u, p.Token(t, u)))
	}
	subs := []string{"user1", "user2", "user1"}
	run := func(i int) {
		t.Helper()
		if got := queryStrings(t, conns[i], "SELECT current_setting('jwt.claims.sub')"); got[0] != subs[i] {
			t.Fatalf("client %d runs as %v", i, got)
		}
	}
	// Client 0 holds a backend in a transaction while the others run on the
	// other: both backends open.
	tx, err := conns[0].Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	run(1)
	run(2)
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	for i := range conns {
		run(i)
	}
	if _, err := conns[2].Exec(ctx, "LISTEN metrics_test"); err != nil {
		t.Fatal(err)
	}
	out, err := scrapeMetrics(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`rlsproxy_pool_connections{database="app",role="authenticated"} 2`,
		`rlsproxy_pool_idle_connections{database="app",role="authenticated"} 1`, // one pinned
		`rlsproxy_pool_waiting_clients 0`,
		`rlsproxy_pool_checkouts_total{identity="install"}`,
		`rlsproxy_pool_checkouts_total{identity="same_identity"}`,
		`rlsproxy_pool_releases_total{kind="without_reset"}`,
		`rlsproxy_pinned_sessions_total{reason="listen"} 1`,
		`rlsproxy_pool_wait_seconds_count`,
		`rlsproxy_statements_reprepared_total`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// The settings the server reports follow each client from backend to
// backend and never reach another client: over one connection, A's
// application_name, TimeZone, DateStyle and read-only default are A's in
// every transaction and never B's.
func TestTxPoolingCarriedSettings(t *testing.T) {
	p := proxytest.Start(t, pg, txPooled(1))
	a := rawSession(t, p, "user1", "application_name", "client-a")
	b := rawSession(t, p, "user2")
	const show = "SELECT current_setting('application_name') || '|' || current_setting('TimeZone') || '|' || current_setting('DateStyle') || '|' || current_setting('default_transaction_read_only')"
	bDefault := r10Must(t, b, show)[0]
	r10Must(t, a, "SET TimeZone = 'Asia/Tokyo'; SET DateStyle = 'SQL, DMY'; SET default_transaction_read_only = on")
	for range 3 {
		if got := r10Must(t, a, show)[0]; got != "client-a|Asia/Tokyo|SQL, DMY|on" {
			t.Errorf("A sees %s", got)
		}
		if got := r10Must(t, b, show)[0]; got != bDefault {
			t.Errorf("B sees %s, want its own %s", got, bDefault)
		}
	}
	r10Must(t, a, "RESET TimeZone; SET application_name = 'client-a2'")
	if got := r10Must(t, a, show)[0]; !strings.HasPrefix(got, "client-a2|"+strings.Split(bDefault, "|")[1]) {
		t.Errorf("A after RESET sees %s", got)
	}
	// A client that leaves does not leave its settings to the next one.
	a.Close()
	c := rawSession(t, p, "user3")
	if got := r10Must(t, c, show)[0]; got != bDefault {
		t.Errorf("C after A left sees %s, want %s", got, bDefault)
	}
}

// A change of identity resets the connection's settings (RESET ALL) before
// the client's carried ones go on: two clients of other identities that set
// the same TimeZone and application_name keep them, though the connection
// held those values already when each came to it.
func TestTxPoolingCarriedSettingsSameValues(t *testing.T) {
	p := proxytest.Start(t, pg, txPooled(1))
	a := rawSession(t, p, "user1")
	b := rawSession(t, p, "user2")
	const show = "SELECT current_setting('TimeZone') || '|' || current_setting('application_name') || '|' || current_setting('jwt.claims.sub')"
	for _, c := range []*rawClient{a, b} {
		r10Must(t, c, "SET TimeZone = 'Asia/Tokyo'; SET application_name = 'same'")
	}
	for range 3 {
		for c, sub := range map[*rawClient]string{a: "user1", b: "user2"} {
			if got := r10Must(t, c, show)[0]; got != "Asia/Tokyo|same|"+sub {
				t.Errorf("%s sees %s", sub, got)
			}
		}
	}
}

// Session mode releases a connection without DISCARD ALL when the session
// left nothing behind (the next install overwrites identity), and resets it
// when it did.
func TestSessionReleaseWithoutReset(t *testing.T) {
	p := proxytest.Start(t, pg, proxytest.SessionPooling, proxytest.Pooled(1, 1))
	releases := func(kind string) float64 {
		out, err := scrapeMetrics(p)
		if err != nil {
			t.Fatal(err)
		}
		var v float64
		for _, line := range strings.Split(out, "\n") {
			if strings.HasPrefix(line, `rlsproxy_pool_releases_total{kind="`+kind+`"} `) {
				fmt.Sscan(strings.Fields(line)[1], &v)
			}
		}
		return v
	}
	for _, tc := range []struct {
		sql   string
		reset bool
		// parsed: a named statement is prepared (Parse) first.
		parsed bool
	}{
		{"SELECT count(*) FROM notes", false, false},
		{"BEGIN; SELECT 1; COMMIT", false, false},
		{"SET LOCAL statement_timeout = 5", false, false},
		{"SET search_path = pg_catalog", true, false},
		{"SET application_name = 'left-behind'", true, false},
		{"CREATE TEMP TABLE t (x int)", true, false},
		{"LISTEN c", true, false},
		// A temporary table the statement does not call one: pg_temp
		// leads the search_path. The next identity's install drops it.
		{"BEGIN; SET LOCAL search_path = pg_temp; CREATE TABLE notes (content text); COMMIT", false, false},
		{"DEALLOCATE ALL", true, true},
		// The statement's DEALLOCATE ALL leaves the other state it kept
		// (it once cleared the one reason kept, the statement's).
		{"CREATE TEMP TABLE notes (content text); LISTEN c; SET search_path = pg_catalog; DEALLOCATE ALL", true, true},
		// And one the server refuses, in a failed block, deallocates
		// nothing: s1 is still there after the ROLLBACK.
		{"BEGIN; SELECT 1/0", true, true},
	} {
		before := map[bool]float64{true: releases("reset"), false: releases("without_reset")}
		a := rawSession(t, p, "user1")
		if tc.parsed {
			a.send(t, &pgproto3.Parse{Name: "s1", Query: "SELECT 1"}, &pgproto3.Sync{})
			untilReady(t, a, 1)
		}
		if strings.Contains(tc.sql, "1/0") {
			r10Query(t, a, tc.sql)
			r10Query(t, a, "DEALLOCATE ALL")
			r10Must(t, a, "ROLLBACK")
		} else {
			r10Must(t, a, tc.sql)
		}
		a.Close()
		// The next client on the same backend finds nothing of A's.
		b := rawSession(t, p, "user2")
		got := r10Must(t, b, "SELECT current_setting('search_path') || '|' || current_setting('application_name') || '|' || current_setting('jwt.claims.sub') || '|' || (SELECT count(*) FROM pg_listening_channels()) || '|' || (SELECT count(*) FROM pg_class WHERE relpersistence = 't') || '|' || (SELECT count(*) FROM pg_prepared_statements)")
		if got[0] != `"$user", public||user2|0|0|0` {
			t.Errorf("after %q, the next client sees %s", tc.sql, got[0])
		}
		b.Close()
		if after := releases(map[bool]string{true: "reset", false: "without_reset"}[tc.reset]); after < before[tc.reset]+1 {
			t.Errorf("after %q: releases of kind reset=%v did not grow", tc.sql, tc.reset)
		}
	}
}

// A client that vanishes mid-statement leaves nothing running upstream: the
// proxy cancels the statement as it drops the connection (issue 12, item 3),
// in both pool modes.
func TestVanishedClientStatementCancelled(t *testing.T) {
	for _, mode := range []struct {
		name string
		opt  proxytest.Option
	}{{"session", proxytest.SessionPooling}, {"transaction", proxytest.TransactionPooling}} {
		t.Run(mode.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, mode.opt)
			c := rawSession(t, p, "user1")
			tag := fmt.Sprintf("vanish_%d", time.Now().UnixNano())
			c.send(t, &pgproto3.Query{String: "SELECT pg_sleep(30) AS " + tag})
			su := superConn(t)
			running := func() int {
				var n int
				if err := su.QueryRow(context.Background(),
					"SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' AND state = 'active' AND pid <> pg_backend_pid()", tag).Scan(&n); err != nil {
					t.Fatal(err)
				}
				return n
			}
			deadline := time.Now().Add(5 * time.Second)
			for running() == 0 && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			if running() == 0 {
				t.Fatal("the statement never ran")
			}
			c.Close() // the client vanishes
			deadline = time.Now().Add(5 * time.Second)
			for running() > 0 && time.Now().Before(deadline) {
				time.Sleep(50 * time.Millisecond)
			}
			if n := running(); n > 0 {
				t.Fatalf("the statement still runs upstream 5 s after its client left")
			}
		})
	}
}

// A temporary table made by an unqualified CREATE while pg_temp leads the
// search_path does not pin (the statement names no temporary object), and
// does not reach another identity either: installing it on the connection
// drops the temporary objects.
func TestTxPoolingTempBySearchPath(t *testing.T) {
	p := proxytest.Start(t, pg, func(s *proxytest.Setup) {
		proxytest.TransactionPooling(s)
		s.PoolConfig = session.PoolConfig{Size: 1, MaxConns: 1, WaitTimeout: 5 * time.Second}
	})
	a := rawSession(t, p, "user1")
	r10Must(t, a, "BEGIN; SET LOCAL search_path = pg_temp; CREATE TABLE notes (user_id text, content text); INSERT INTO notes VALUES ('user2', 'planted'); COMMIT")
	b := rawSession(t, p, "user2")
	got := r10Must(t, b, "SELECT (SELECT count(*) FROM pg_class WHERE relpersistence = 't') || '|' || (SELECT count(*) FROM notes WHERE content = 'planted')")
	if got[0] != "0|0" {
		t.Errorf("user2 on the connection user1 left: temporary relations|planted rows = %s, want 0|0", got[0])
	}
}

// A DEALLOCATE ALL prepared by one client drops every statement of the
// connection it runs on, other clients' too, when it is executed, not when
// it is prepared: the proxy forgets them then, so that the others' next
// Bind prepares them again instead of failing.
func TestTxPoolingPreparedDeallocateAll(t *testing.T) {
	p := proxytest.Start(t, pg, func(s *proxytest.Setup) {
		proxytest.TransactionPooling(s)
		s.PoolConfig = session.PoolConfig{Size: 1, MaxConns: 1, WaitTimeout: 5 * time.Second}
	})
	a := rawSession(t, p, "user1")
	b := rawSession(t, p, "user2")
	a.send(t, &pgproto3.Parse{Name: "d", Query: "DEALLOCATE ALL"}, &pgproto3.Sync{})
	untilReady(t, a, 1)
	b.send(t, &pgproto3.Parse{Name: "s", Query: "SELECT current_setting('jwt.claims.sub')"}, &pgproto3.Sync{})
	untilReady(t, b, 1)
	a.send(t, &pgproto3.Bind{PreparedStatement: "d"}, &pgproto3.Execute{}, &pgproto3.Sync{})
	if got := strings.Join(untilReady(t, a, 1), " "); got != "? C:DEALLOCATE ALL Z" {
		t.Fatalf("a's DEALLOCATE ALL: %s", got)
	}
	for range 2 {
		b.send(t, &pgproto3.Bind{PreparedStatement: "s"}, &pgproto3.Execute{}, &pgproto3.Sync{})
		if got := strings.Join(untilReady(t, b, 1), " "); got != "? D:user2 C:SELECT 1 Z" {
			t.Fatalf("b's statement after a's DEALLOCATE ALL: %s", got)
		}
	}
	// a's own statements are gone, as they would be without the proxy.
	a.send(t, &pgproto3.Bind{PreparedStatement: "d"}, &pgproto3.Execute{}, &pgproto3.Sync{})
	if got := strings.Join(untilReady(t, a, 1), " "); got != "E:26000 Z" {
		t.Fatalf("a's Bind of its deallocated statement: %s", got)
	}
}

// A statement the proxy prepares again on another connection is held there
// only if the server ran that Parse: in a pipeline, an error skips it up to
// the next Sync, also after a Sync the server has answered.
func TestTxPoolingRepreparedSkipped(t *testing.T) {
	p := proxytest.Start(t, pg, func(s *proxytest.Setup) {
		proxytest.TransactionPooling(s)
		s.PoolConfig = session.PoolConfig{Size: 2, MaxConns: 2, WaitTimeout: 5 * time.Second}
	})
	a := rawSession(t, p, "user1") // its startup opens X
	b := rawSession(t, p, "user2") // Y
	defer b.Close()
	a.send(t, &pgproto3.Parse{Name: "s", Query: "SELECT current_setting('jwt.claims.sub')"}, &pgproto3.Sync{})
	untilReady(t, a, 1)            // s on X, the connection released last
	c := rawSession(t, p, "user3") // its startup takes X
	r10Must(t, c, "BEGIN")         // and holds it
	// On Y, where s is prepared again ahead of its Bind, after an error
	// that skips that Parse, and after a Sync answered before the error.
	a.send(t, &pgproto3.Parse{Name: "q", Query: "SELECT 1"}, &pgproto3.Sync{},
		&pgproto3.Parse{Name: "t", Query: "SELECT * FROM no_such_table"},
		&pgproto3.Bind{PreparedStatement: "s"}, &pgproto3.Execute{}, &pgproto3.Sync{})
	if got := strings.Join(untilReady(t, a, 2), " "); got != "? Z E:42P01 Z" {
		t.Fatalf("the pipeline: %s", got)
	}
	r10Must(t, c, "COMMIT")
	a.send(t, &pgproto3.Bind{PreparedStatement: "s"}, &pgproto3.Execute{}, &pgproto3.Sync{})
	if got := strings.Join(untilReady(t, a, 1), " "); got != "? D:user1 C:SELECT 1 Z" {
		t.Fatalf("s after the pipeline: %s", got)
	}
}

// A client waiting for an upstream connection has sent its statement: it
// is not idle, whatever --client-idle-timeout says.
func TestTxPoolingWaitIsNotIdle(t *testing.T) {
	p := proxytest.Start(t, pg, func(s *proxytest.Setup) {
		proxytest.TransactionPooling(s)
		s.PoolConfig = session.PoolConfig{Size: 1, MaxConns: 1, WaitTimeout: 10 * time.Second}
		s.ClientIdleTimeout = time.Second
	})
	b := rawSession(t, p, "user2")
	a := rawSession(t, p, "user1")
	b.send(t, &pgproto3.Query{String: "SELECT pg_sleep(3)"})
	time.Sleep(200 * time.Millisecond) // b holds the one connection
	if got := r10Must(t, a, "SELECT current_setting('jwt.claims.sub')"); got[0] != "user1" {
		t.Fatalf("a after waiting for the connection: %v", got)
	}
	untilReady(t, b, 1)
}

// A message that arrives in pieces takes an upstream connection once, when
// it is whole, not once per piece.
func TestTxPoolingPartialMessageOneCheckout(t *testing.T) {
	p := proxytest.Start(t, pg, proxytest.TransactionPooling)
	a := rawSession(t, p, "user1")
	frame, _ := (&pgproto3.Query{String: "SELECT current_setting('jwt.claims.sub')"}).Encode(nil)
	before := p.Counter(t, "rlsproxy_pool_checkouts_total")
	for _, piece := range [][]byte{frame[:3], frame[3:9], frame[9:]} {
		if _, err := a.Write(piece); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if got := strings.Join(untilReady(t, a, 1), " "); got != "T D:user1 C:SELECT 1 Z" {
		t.Fatalf("the query: %s", got)
	}
	if n := p.Counter(t, "rlsproxy_pool_checkouts_total") - before; n != 1 {
		t.Errorf("%v checkouts for one message in three pieces, want 1", n)
	}
}

// The statements of a session that ended are closed on each connection
// before its next client, and only those: another live client's stay.
func TestTxPoolingEndedSessionsStatementsClosed(t *testing.T) {
	p := proxytest.Start(t, pg, func(s *proxytest.Setup) {
		proxytest.TransactionPooling(s)
		s.PoolConfig = session.PoolConfig{Size: 1, MaxConns: 1, WaitTimeout: 5 * time.Second}
	})
	a := rawSession(t, p, "user1")
	a.send(t, &pgproto3.Parse{Name: "a1", Query: "SELECT 'ended-a1'"},
		&pgproto3.Parse{Name: "a2", Query: "SELECT 'ended-a2'"}, &pgproto3.Sync{})
	untilReady(t, a, 1)
	c := rawSession(t, p, "user3")
	defer c.Close()
	c.send(t, &pgproto3.Parse{Name: "c1", Query: "SELECT 'live-c1'"}, &pgproto3.Sync{})
	untilReady(t, c, 1)
	b := rawSession(t, p, "user2")
	defer b.Close()
	const count = `SELECT count(*) FILTER (WHERE statement LIKE 'SELECT ''ended-%') || ',' ||
		count(*) FILTER (WHERE statement LIKE 'SELECT ''live-%') FROM pg_prepared_statements`
	if got := r10Must(t, b, count)[0]; got != "2,1" {
		t.Fatalf("statements on the connection before a ended (ended, live): %s", got)
	}
	a.Close()
	deadline := time.Now().Add(5 * time.Second)
	got := ""
	for got != "0,1" && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		got = r10Must(t, b, count)[0]
	}
	if got != "0,1" {
		t.Fatalf("statements on the connection after a ended (ended, live): %s, want 0,1", got)
	}
	c.send(t, &pgproto3.Bind{PreparedStatement: "c1"}, &pgproto3.Execute{}, &pgproto3.Sync{})
	if got := strings.Join(untilReady(t, c, 1), " "); got != "? D:live-c1 C:SELECT 1 Z" {
		t.Fatalf("c's statement after the sweep: %s", got)
	}
}

// A Close or DEALLOCATE the server does not run (skipped after an error,
// refused in a failed transaction block) leaves the statement on the
// connection: the proxy keeps it on record, and closes it with the rest of
// the session's, or, after a DEALLOCATE ALL, resets the connection before
// its next client. Before, the record was dropped as the message was sent,
// and the statement stayed on the shared connection for good.
func TestTxPoolingUnrunDeallocateKeepsRecord(t *testing.T) {
	const parse = "SELECT 'unrun'"
	for _, tc := range []struct {
		name string
		drop func(t *testing.T, a *rawClient)
	}{
		{"close skipped after an error", func(t *testing.T, a *rawClient) {
			a.send(t, &pgproto3.Parse{Name: "bad", Query: "SELECT * FROM no_such_table"},
				&pgproto3.Close{ObjectType: 'S', Name: "s"}, &pgproto3.Sync{})
			if got := strings.Join(untilReady(t, a, 1), " "); got != "E:42P01 Z" {
				t.Fatalf("the pipeline: %s", got)
			}
		}},
		{"deallocate in a failed block", func(t *testing.T, a *rawClient) {
			inFailedBlock(t, a, "DEALLOCATE s")
		}},
		{"deallocate all in a failed block", func(t *testing.T, a *rawClient) {
			inFailedBlock(t, a, "DEALLOCATE ALL")
		}},
		{"discard all in a block", func(t *testing.T, a *rawClient) {
			inFailedBlock(t, a, "DISCARD ALL")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, oneConnection)
			a := rawSession(t, p, "user1")
			a.send(t, &pgproto3.Parse{Name: "s", Query: parse}, &pgproto3.Sync{})
			untilReady(t, a, 1)
			tc.drop(t, a)
			a.Close()
			if got := leftAfterEnd(t, p, parse); got != "0" {
				t.Fatalf("a's statement is still on the connection after a ended: %s", got)
			}
		})
	}
}

// inFailedBlock sends sql inside a transaction block that has failed, where
// the server refuses it, then rolls back.
func inFailedBlock(t *testing.T, c *rawClient, sql string) {
	t.Helper()
	r10Must(t, c, "BEGIN")
	if _, code := r10Query(t, c, "SELECT 1/0"); code != "22012" {
		t.Fatalf("SELECT 1/0: %q", code)
	}
	if _, code := r10Query(t, c, sql); code != "25P02" {
		t.Fatalf("%s in a failed block: %q, want 25P02", sql, code)
	}
	r10Must(t, c, "ROLLBACK")
}

// A client's Close and DEALLOCATE of its statement drop it from the server
// at once, under the name the proxy gave it there.
func TestTxPoolingCloseDropsStatement(t *testing.T) {
	p := proxytest.Start(t, pg, func(s *proxytest.Setup) {
		proxytest.TransactionPooling(s)
		s.PoolConfig = session.PoolConfig{Size: 1, MaxConns: 1, WaitTimeout: 5 * time.Second}
	})
	a := rawSession(t, p, "user1")
	defer a.Close()
	count := func(text string) string {
		return r10Must(t, a, "SELECT count(*) FROM pg_prepared_statements WHERE statement = "+sqlquote.Literal(text))[0]
	}
	a.send(t, &pgproto3.Parse{Name: "s", Query: "SELECT 'closed'"}, &pgproto3.Parse{Name: "d", Query: "SELECT 'deallocated'"},
		&pgproto3.Parse{Name: "q", Query: "SELECT 'deallocated later'"}, &pgproto3.Parse{Name: "dq", Query: "DEALLOCATE q"}, &pgproto3.Sync{})
	untilReady(t, a, 1)
	if c := count("SELECT 'closed'") + count("SELECT 'deallocated'") + count("SELECT 'deallocated later'"); c != "111" {
		t.Fatalf("statements prepared: %s", c)
	}
	a.send(t, &pgproto3.Close{ObjectType: 'S', Name: "s"}, &pgproto3.Sync{})
	if got := strings.Join(untilReady(t, a, 1), " "); got != "? Z" {
		t.Fatalf("Close: %s", got)
	}
	r10Must(t, a, "DEALLOCATE d")
	a.send(t, &pgproto3.Bind{PreparedStatement: "dq"}, &pgproto3.Execute{}, &pgproto3.Sync{})
	if got := strings.Join(untilReady(t, a, 1), " "); got != "? C:DEALLOCATE Z" {
		t.Fatalf("prepared DEALLOCATE: %s", got)
	}
	if c := count("SELECT 'closed'") + count("SELECT 'deallocated'") + count("SELECT 'deallocated later'"); c != "000" {
		t.Fatalf("statements left after Close, DEALLOCATE and a prepared DEALLOCATE: %s", c)
	}
}

// A client that sent extended-protocol messages without a Sync keeps its
// connection, whatever the last ReadyForQuery said: the server is inside
// the transaction those messages began (a portal suspended by a row limit,
// an Execute of BEGIN). Before, the connection went to the next client in
// the middle of it: a cursor's portal was gone (34000), another identity's
// session ended on the install's status check, and a client of the same
// token ran inside the first one's transaction block.
func TestTxPoolingHeldUntilSync(t *testing.T) {
	oneConn := func(s *proxytest.Setup) {
		proxytest.TransactionPooling(s)
		s.PoolConfig = session.PoolConfig{Size: 1, MaxConns: 1, WaitTimeout: 10 * time.Second}
	}
	// waiting sends b's query, which must wait for the connection, and
	// returns its answers when they come.
	waiting := func(t *testing.T, b *rawClient, sql string) <-chan string {
		b.send(t, &pgproto3.Query{String: sql})
		got := make(chan string, 1)
		go func() { got <- strings.Join(answersWithin3s(t, b), " ") }()
		time.Sleep(200 * time.Millisecond)
		select {
		case s := <-got:
			t.Fatalf("b ran while a held the connection mid-transaction: %s", s)
		default:
		}
		return got
	}
	t.Run("suspended portal", func(t *testing.T) {
		p := proxytest.Start(t, pg, oneConn)
		a := rawSession(t, p, "user1")
		defer a.Close()
		b := rawSession(t, p, "user2")
		defer b.Close()
		a.send(t, &pgproto3.Parse{Query: "SELECT g::text FROM generate_series(1, 6) g"}, &pgproto3.Bind{},
			&pgproto3.Execute{MaxRows: 3}, &pgproto3.Flush{})
		for suspended := false; !suspended; {
			switch m := a.receive(t).(type) {
			case *pgproto3.PortalSuspended:
				suspended = true
			case *pgproto3.ErrorResponse:
				t.Fatalf("%s %s", m.Code, m.Message)
			}
		}
		got := waiting(t, b, "SELECT current_setting('jwt.claims.sub')")
		a.send(t, &pgproto3.Execute{MaxRows: 3}, &pgproto3.Sync{})
		if s := strings.Join(untilReady(t, a, 1), " "); s != "D:4 D:5 D:6 ? Z" {
			t.Errorf("the cursor's next rows: %s", s)
		}
		if s := <-got; s != "D:user2 C:SELECT 1 ZI" {
			t.Errorf("b after a's Sync: %s", s)
		}
	})
	for _, same := range []bool{false, true} {
		t.Run(map[bool]string{false: "begin, other identity", true: "begin, same token"}[same], func(t *testing.T) {
			p := proxytest.Start(t, pg, oneConn)
			tok := p.Token(t, "user1")
			a, _, _ := rawStartup(t, p, "user1", tok, "")
			defer a.Close()
			b := rawSession(t, p, "user2")
			if same {
				b, _, _ = rawStartup(t, p, "user1", tok, "")
			}
			defer b.Close()
			a.send(t, &pgproto3.Parse{Query: "BEGIN"}, &pgproto3.Bind{}, &pgproto3.Execute{},
				&pgproto3.Parse{Query: "SELECT set_config('app.held', 'left by a', true)"}, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Flush{})
			for n := 0; n < 2; {
				switch m := a.receive(t).(type) {
				case *pgproto3.CommandComplete:
					n++
				case *pgproto3.ErrorResponse:
					t.Fatalf("%s %s", m.Code, m.Message)
				}
			}
			got := waiting(t, b, "SELECT coalesce(current_setting('app.held', true), '')")
			a.send(t, &pgproto3.Sync{})
			if s := strings.Join(untilReady(t, a, 1), " "); s != "Z" {
				t.Fatalf("a's Sync: %s", s)
			}
			select {
			case s := <-got:
				t.Fatalf("b ran inside a's transaction block: %s", s)
			case <-time.After(200 * time.Millisecond):
			}
			r10Must(t, a, "COMMIT")
			if s := <-got; s != "D: C:SELECT 1 ZI" {
				t.Errorf("b after a's COMMIT: %s", s)
			}
		})
	}
}

// A session that ends after extended-protocol messages without a Sync
// leaves the server inside their transaction: its connection is not given
// to the next session as it is (session and transaction pooling).
func TestSessionEndsMidExtendedTransaction(t *testing.T) {
	p := proxytest.Start(t, pg, func(s *proxytest.Setup) {
		s.PoolConfig = session.PoolConfig{Size: 1, MaxConns: 1, WaitTimeout: 10 * time.Second}
	})
	tok := p.Token(t, "user1")
	a, _, _ := rawStartup(t, p, "user1", tok, "")
	a.send(t, &pgproto3.Parse{Query: "BEGIN"}, &pgproto3.Bind{}, &pgproto3.Execute{},
		&pgproto3.Parse{Query: "SELECT set_config('app.held', 'left by a', true)"}, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Flush{})
	for n := 0; n < 2; {
		switch m := a.receive(t).(type) {
		case *pgproto3.CommandComplete:
			n++
		case *pgproto3.ErrorResponse:
			t.Fatalf("%s %s", m.Code, m.Message)
		}
	}
	a.Close()
	b, _, _ := rawStartup(t, p, "user1", tok, "")
	defer b.Close()
	b.send(t, &pgproto3.Query{String: "SELECT coalesce(current_setting('app.held', true), '')"})
	if got := strings.Join(answersWithin3s(t, b), " "); got != "D: C:SELECT 1 ZI" {
		t.Errorf("the next session, after one that ended inside a transaction: %s", got)
	}
}

// The Bind of a prepared DEALLOCATE ALL drops the connection's record of
// statements, all owners', but its portal may never run (no Execute, one
// skipped after an error, the portal closed): the connection is reset
// before its next client. Before, the server kept every statement there,
// unrecorded, never counted or closed (found by review 11).
func TestTxPoolingBoundDeallocateAllNotExecuted(t *testing.T) {
	const text = "SELECT 'left behind'"
	for _, tc := range []struct {
		name string
		msgs []pgproto3.FrontendMessage
	}{
		{"bind without execute", []pgproto3.FrontendMessage{&pgproto3.Bind{PreparedStatement: "da"}, &pgproto3.Sync{}}},
		{"execute skipped after an error", []pgproto3.FrontendMessage{&pgproto3.Bind{PreparedStatement: "da"},
			&pgproto3.Parse{Name: "bad", Query: "SELECT * FROM no_such_table"}, &pgproto3.Execute{}, &pgproto3.Sync{}}},
		{"portal closed", []pgproto3.FrontendMessage{&pgproto3.Bind{DestinationPortal: "p", PreparedStatement: "da"},
			&pgproto3.Close{ObjectType: 'P', Name: "p"}, &pgproto3.Sync{}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := proxytest.Start(t, pg, oneConnection)
			a := rawSession(t, p, "user1")
			a.send(t, &pgproto3.Parse{Name: "s", Query: text}, &pgproto3.Parse{Name: "da", Query: "DEALLOCATE ALL"}, &pgproto3.Sync{})
			untilReady(t, a, 1)
			a.send(t, tc.msgs...)
			untilReady(t, a, 1)
			a.Close()
			if got := leftAfterEnd(t, p, text); got != "0" {
				t.Errorf("a's statement is still on the connection after a ended, unrecorded: %s", got)
			}
		})
	}
}

// A Bind of the unnamed statement by a client that prepared none finds
// none, also when another session of the same token (no install between
// them, so no Close of it) left one on the connection (found by review 11).
func TestTxPoolingUnnamedStatementOfAnotherSession(t *testing.T) {
	p := proxytest.Start(t, pg, oneConnection)
	tok := p.Token(t, "user1")
	a, _, _ := rawStartup(t, p, "user1", tok, "")
	defer a.Close()
	b, _, _ := rawStartup(t, p, "user1", tok, "")
	defer b.Close()
	a.send(t, &pgproto3.Parse{Query: "SELECT 'unnamed of a'::text"}, &pgproto3.Sync{})
	untilReady(t, a, 1)
	b.send(t, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{})
	if got := strings.Join(untilReady(t, b, 1), " "); got != "E:26000 Z" {
		t.Errorf("b's Bind of the unnamed statement, never prepared by b: %s", got)
	}
}

// SQL EXECUTE of a name in the proxy's namespace (another client's
// statement on the shared connection, as pg_prepared_statements shows it,
// or the client's own under its server name) reaches nothing: 26000, also
// under EXPLAIN and CREATE TABLE AS. Before, a client ran another's
// statement, or its own prepared DEALLOCATE ALL, which dropped every
// client's statements behind the proxy's back (found by review 11). A
// client's own SQL PREPARE and EXECUTE still work (and pin).
func TestTxPoolingExecuteOfProxyNames(t *testing.T) {
	p := proxytest.Start(t, pg, oneConnection)
	a := rawSession(t, p, "user1")
	defer a.Close()
	a.send(t, &pgproto3.Parse{Name: "s", Query: "SELECT 'secret of user1'::text"}, &pgproto3.Sync{})
	untilReady(t, a, 1)
	b := rawSession(t, p, "user2")
	defer b.Close()
	b.send(t, &pgproto3.Parse{Name: "da", Query: "DEALLOCATE ALL"}, &pgproto3.Sync{})
	untilReady(t, b, 1)
	theirs, own := serverNameOf(t, b, "secret of user1"), serverNameOf(t, b, "DEALLOCATE ALL")
	for _, q := range []string{
		"EXECUTE " + theirs,
		`EXECUTE "` + theirs + `"`,
		"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) EXECUTE " + theirs,
		"CREATE TEMP TABLE loot ON COMMIT DROP AS EXECUTE " + theirs,
		"EXPLAIN ANALYZE CREATE TEMP TABLE loot ON COMMIT DROP AS EXECUTE " + theirs,
		"SELECT 1; EXECUTE " + theirs,
		"EXECUTE " + own,
	} {
		if rows, code := r10Query(t, b, q); code != "26000" {
			t.Errorf("b: %s: %v %q, want 26000", q, rows, code)
		}
	}
	// Nor may a client make one in the namespace: the name of a client's
	// next statement is easy to guess, and its Parse would then fail.
	for _, q := range []string{"PREPARE rlsproxy_1_2 AS SELECT 1", "SELECT 1; PREPARE rlsproxy_9_1 AS SELECT 2"} {
		if rows, code := r10Query(t, b, q); code != "0A000" {
			t.Errorf("b: %s: %v %q, want 0A000", q, rows, code)
		}
	}
	a.send(t, &pgproto3.Bind{PreparedStatement: "s"}, &pgproto3.Execute{}, &pgproto3.Sync{})
	if got := strings.Join(untilReady(t, a, 1), " "); got != "? D:secret of user1 C:SELECT 1 Z" {
		t.Errorf("a's own statement after b's attempts: %s", got)
	}
	if got := r10Must(t, b, "PREPARE mine AS SELECT 'mine'; EXECUTE mine"); len(got) != 1 || got[0] != "mine" {
		t.Errorf("b's own SQL PREPARE and EXECUTE: %v", got)
	}
	if got := r10Must(t, b, "EXPLAIN (COSTS OFF) EXECUTE mine"); len(got) == 0 {
		t.Error("b's EXPLAIN EXECUTE of its own statement: no plan")
	}
}

// A DEALLOCATE query of a client's statement that the connection lacks
// (prepared on another one, or dropped there by another client's DISCARD
// ALL) is answered as PostgreSQL would: 25P02 in a failed transaction
// block, DEALLOCATE when a table the statement read was dropped since.
// Before, the proxy prepared the statement's text again ahead of it, with
// no Sync between: when that failed, the server skipped the query too, and
// the client never got its ReadyForQuery (found by review 11).
func TestTxPoolingDeallocateWhereNotPrepared(t *testing.T) {
	for _, tc := range []struct{ name, want string }{
		{"in a failed block", "E:25P02 ZE"},
		{"table dropped since", "C:DEALLOCATE ZI"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			table := "gone_" + strings.ReplaceAll(tc.name, " ", "_")
			r10Super(t, "DROP TABLE IF EXISTS "+table+"; CREATE TABLE "+table+" (x int); GRANT ALL ON "+table+" TO PUBLIC")
			t.Cleanup(func() { r10Super(t, "DROP TABLE IF EXISTS "+table) })
			p := proxytest.Start(t, pg, oneConnection)
			a := rawSession(t, p, "user1")
			defer a.Close()
			a.send(t, &pgproto3.Parse{Name: "s", Query: "SELECT x FROM " + table}, &pgproto3.Sync{})
			untilReady(t, a, 1)
			// Another client resets the shared connection: a's statement
			// is gone there, and so is the record of it.
			b := rawSession(t, p, "user2")
			r10Must(t, b, "DISCARD ALL")
			b.Close()
			if tc.name == "in a failed block" {
				a.send(t, &pgproto3.Query{String: "BEGIN; SELECT 1/0"})
				untilReady(t, a, 1)
			} else {
				r10Super(t, "DROP TABLE "+table)
			}
			a.send(t, &pgproto3.Query{String: "DEALLOCATE s"})
			if got := strings.Join(answersWithin3s(t, a), " "); got != tc.want {
				t.Errorf("DEALLOCATE s: %s, want %s", got, tc.want)
			}
		})
	}
}

// A prepared DEALLOCATE (psycopg 3 sends them) of a statement the
// connection lacks runs as it would where the statement was prepared.
func TestTxPoolingPreparedDeallocateWhereNotPrepared(t *testing.T) {
	p := proxytest.Start(t, pg, oneConnection)
	a := rawSession(t, p, "user1")
	defer a.Close()
	a.send(t, &pgproto3.Parse{Name: "s", Query: "SELECT 1"}, &pgproto3.Sync{})
	untilReady(t, a, 1)
	b := rawSession(t, p, "user2")
	r10Must(t, b, "DISCARD ALL") // a's statement is gone from the connection
	b.Close()
	a.send(t, &pgproto3.Parse{Query: "DEALLOCATE s"}, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{})
	if got := strings.Join(untilReady(t, a, 1), " "); got != "? ? C:DEALLOCATE Z" {
		t.Errorf("prepared DEALLOCATE s: %s", got)
	}
	a.send(t, &pgproto3.Bind{PreparedStatement: "s"}, &pgproto3.Execute{}, &pgproto3.Sync{})
	if got := strings.Join(untilReady(t, a, 1), " "); got != "E:26000 Z" {
		t.Errorf("Bind of s after its DEALLOCATE: %s", got)
	}
}

// With --guard-allow-code, a function a client calls (the guard does not
// see into it) can deallocate another client's statement by its server name
// (pg_prepared_statements lists it) and prepare another text under it:
// every change of identity on a connection drops the statements made
// before, so the other client's next Bind prepares its own text again and
// never runs the planted one as itself. Before, it did (found by review 11).
func TestTxPoolingCodeCannotSwapStatements(t *testing.T) {
	r10Super(t, "GRANT CREATE ON SCHEMA public TO authenticated")
	t.Cleanup(func() {
		r10Super(t, "DROP FUNCTION IF EXISTS public.swap_statement(text); REVOKE CREATE ON SCHEMA public FROM authenticated")
	})
	p := proxytest.Start(t, pg, oneConnection, proxytest.AllowCode)
	a := rawSession(t, p, "user1")
	defer a.Close()
	a.send(t, &pgproto3.Parse{Name: "s", Query: "SELECT 'what user1 prepared'::text"}, &pgproto3.Sync{})
	untilReady(t, a, 1)
	b := rawSession(t, p, "user2")
	defer b.Close()
	r10Must(t, b, `CREATE FUNCTION public.swap_statement(n text) RETURNS void LANGUAGE plpgsql AS $f$BEGIN
		EXECUTE format('DEALLOCATE %I', n);
		EXECUTE format('PREPARE %I AS SELECT %L || (pg_catalog.current_setting(''request.jwt.claims'')::json->>''sub'')', n, 'planted by user2, run as ');
	END$f$`)
	r10Must(t, b, "SELECT public.swap_statement("+sqlquote.Literal(serverNameOf(t, b, "what user1 prepared"))+")")
	a.send(t, &pgproto3.Bind{PreparedStatement: "s"}, &pgproto3.Execute{}, &pgproto3.Sync{})
	got := strings.Join(untilReady(t, a, 1), " ")
	t.Logf("a's Bind of s: %s", got)
	if got != "? D:what user1 prepared C:SELECT 1 Z" {
		t.Errorf("a's Bind of its statement after b's swap: %s", got)
	}
}

// A pinned client's statements stay on its connection, so the proxy keeps
// their names but not their texts (a client past the limits must not make
// it keep more): they run, and closing one and preparing it again works.
func TestTxPoolingPinnedStatementsWithoutText(t *testing.T) {
	p := proxytest.Start(t, pg, oneConnection)
	a := rawSession(t, p, "user1")
	defer a.Close()
	r10Must(t, a, "LISTEN pinned_statements")
	run := func(msgs ...pgproto3.FrontendMessage) string {
		a.send(t, append(msgs, &pgproto3.Sync{})...)
		return strings.Join(untilReady(t, a, 1), " ")
	}
	for i, want := range []string{"? ? D:42 C:SELECT 1 Z", "? D:42 C:SELECT 1 Z"} {
		var msgs []pgproto3.FrontendMessage
		if i == 0 {
			msgs = append(msgs, &pgproto3.Parse{Name: "s", Query: "SELECT 41 + 1"})
		}
		msgs = append(msgs, &pgproto3.Bind{PreparedStatement: "s"}, &pgproto3.Execute{})
		if got := run(msgs...); got != want {
			t.Errorf("run %d: %s, want %s", i, got, want)
		}
	}
	if got := run(&pgproto3.Close{ObjectType: 'S', Name: "s"}, &pgproto3.Parse{Name: "s", Query: "SELECT 43"},
		&pgproto3.Bind{PreparedStatement: "s"}, &pgproto3.Execute{}); got != "? ? ? D:43 C:SELECT 1 Z" {
		t.Errorf("closed and prepared again: %s", got)
	}
}

// A pinned client keeps the names of its statements in the proxy, never
// more than 20,000 (maxNames): a Parse of one more is refused (54000), one
// of a name it holds is not. Names are as long as PostgreSQL reads them
// (63 bytes): two alike that far are one statement, as without the proxy.
func TestTxPoolingStatementNamesBounded(t *testing.T) {
	p := proxytest.Start(t, pg, oneConnection)
	a := rawSession(t, p, "user1")
	defer a.Close()
	r10Must(t, a, "LISTEN names_bounded")
	long := strings.Repeat("n", 63)
	a.send(t, &pgproto3.Parse{Name: long + "-first", Query: "SELECT 'long'"}, &pgproto3.Bind{PreparedStatement: long + "-second"},
		&pgproto3.Execute{}, &pgproto3.Sync{})
	if got := strings.Join(untilReady(t, a, 1), " "); got != "? ? D:long C:SELECT 1 Z" {
		t.Errorf("a name alike in its first 63 bytes: %s", got)
	}
	var msgs []pgproto3.FrontendMessage
	for i := range 20000 - 1 {
		msgs = append(msgs, &pgproto3.Parse{Name: fmt.Sprintf("s%d", i), Query: "SELECT 1"})
	}
	a.send(t, append(msgs, &pgproto3.Sync{})...)
	if got := untilReady(t, a, 1); len(got) != 20000 || got[len(got)-2] != "?" {
		t.Fatalf("20,000 statements: %d answers, ending %v", len(got), got[len(got)-3:])
	}
	for _, c := range []struct{ name, want string }{
		{"one_more", "E:54000 Z"},
		{"s5", "? Z"},
		{long + "-third", "? Z"},
	} {
		a.send(t, &pgproto3.Parse{Name: c.name, Query: "SELECT 2"}, &pgproto3.Sync{})
		if got := strings.Join(untilReady(t, a, 1), " "); got != c.want {
			t.Errorf("Parse of %.20s: %s, want %s", c.name, got, c.want)
		}
	}
}
