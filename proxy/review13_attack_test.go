package proxy_test

// Attacks from review 13 on transaction pooling: state a client leaves in a
// shared backend, out of the state rules' sight (guard/state.go), that a
// client of another identity then finds there. The FIXED tests failed
// before their fix. (A custom setting that RESET ALL emptied reads '', as
// after DISCARD ALL: the value is gone, the name stays known to the server.) A client pinned to its
// backend would hold the only connection of oneConnection, so another
// client's query running at all proves the first was not pinned.

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// r13Pinned is the number of sessions the proxy pinned so far.
func r13Pinned(t *testing.T, p *proxytest.Proxy) float64 {
	t.Helper()
	return p.Counter(t, "rlsproxy_pinned_sessions_total")
}

// r13Run runs each query as a message of its own on c, failing on any error.
func r13Run(t *testing.T, c *rawClient, queries ...string) {
	t.Helper()
	for _, q := range queries {
		r10Must(t, c, q)
	}
}

// FIXED (the install on a change of identity now undoes all that DISCARD
// ALL does but the prepared statements, whatever made it). A temporary
// view or domain made without the word TEMP is
// invisible to the state rules, and so is the code inside it. Under a
// transaction-local search_path that leads with pg_temp (SET LOCAL or
// set_config(..., true): never pinned), an unqualified CREATE VIEW or
// CREATE DOMAIN makes a temporary object; guard/state.go's pin returns ""
// for a ViewStmt that is not TEMP by its words and, for a domain, looks at
// its name only, never at the expressions they store (the rules pass a
// set_config of an unprotected constant name, and pg_advisory_lock, in
// them). Selecting from the view (or casting to the domain) then runs
// set_config(name, value, false) or pg_advisory_lock with no state word in
// the statement: nothing pins. client a (user1) leaves, in the shared
// backend, any session setting it likes (search_path, statement_timeout,
// transform_null_equals, row_security, bytea_output, an application's own
// custom settings such as app.tenant) and session advisory locks; client b
// (user2) then runs with a's settings and holds a's lock (b's
// pg_advisory_lock(4242) succeeds at once, every other backend's blocks,
// and nothing ever unlocks it). The install on a change of identity
// (session/proof.go installBatch) runs DISCARD SEQUENCES and DISCARD TEMP,
// which drop the view and the domain (the evidence), but resets no setting
// and no advisory lock; and the session of a, never pinned, is released
// without DISCARD ALL (txpool.go stateful), so the state outlives a.
// --session-state refuse is bypassed the same way.
func TestReview13TempCodeHidesSessionState(t *testing.T) {
	for _, tc := range []struct {
		name   string
		attack []string
		probe  string
		want   string
	}{
		{"view set_config custom setting", []string{
			"BEGIN",
			"SET LOCAL search_path = pg_temp, public",
			"CREATE VIEW r13v AS SELECT pg_catalog.set_config('app.tenant', 'tenant-of-user1', false) AS x",
			"COMMIT",
			"SELECT x FROM r13v",
		}, "SELECT coalesce(nullif(current_setting('app.tenant', true), ''), '<unset>')", "<unset>"},
		{"view set_config search_path, set_config local", []string{
			"BEGIN",
			"SELECT set_config('search_path', 'pg_temp, public', true)",
			"CREATE VIEW r13v AS SELECT pg_catalog.set_config('search_path', 'auth, public', false) AS x",
			"SELECT x FROM r13v",
			"COMMIT",
		}, "SHOW search_path", `"$user", public`},
		{"view set_config statement_timeout", []string{
			"BEGIN; SET LOCAL search_path = pg_temp; CREATE VIEW r13v AS SELECT pg_catalog.set_config('statement_timeout', '1234', false) AS x; COMMIT",
			"SELECT x FROM r13v",
		}, "SHOW statement_timeout", "0"},
		{"domain check set_config", []string{
			"BEGIN",
			"SET LOCAL search_path = pg_temp, public",
			"CREATE DOMAIN r13d AS text CHECK (pg_catalog.set_config('transform_null_equals', VALUE, false) IS NOT NULL)",
			"SELECT 'on'::r13d",
			"COMMIT",
		}, "SELECT (NULL::int = NULL)::text IS NOT NULL", "f"},
		{"view advisory lock", []string{
			"BEGIN",
			"SET LOCAL search_path = pg_temp, public",
			"CREATE VIEW r13v AS SELECT pg_catalog.pg_try_advisory_lock(4242) AS x",
			"COMMIT",
			"SELECT x FROM r13v",
		}, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()", "0"},
		{"refuse mode: view set_config", []string{
			"BEGIN; SET LOCAL search_path = pg_temp; CREATE VIEW r13v AS SELECT pg_catalog.set_config('search_path', 'auth', false) AS x; COMMIT",
			"SELECT x FROM r13v",
		}, "SHOW search_path", `"$user", public`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, oneConnection, func(s *proxytest.Setup) {
				s.Config.RefuseSessionState = strings.HasPrefix(tc.name, "refuse")
			})
			a := rawSession(t, p, "user1")
			defer a.Close()
			r13Run(t, a, tc.attack...)
			if n := r13Pinned(t, p); n != 0 {
				t.Logf("a was pinned (%v): the attack held", n)
				return
			}
			// b shares the only backend while a is still connected, and
			// again after a left.
			b := rawSession(t, p, "user2")
			defer b.Close()
			if got := r10Must(t, b, tc.probe); len(got) != 1 || got[0] != tc.want {
				t.Errorf("b (user2), with a connected, on the backend a used: %s = %q, want %q (what a fresh backend has): a's session state reached b, and a was never pinned", tc.probe, got, tc.want)
			}
			a.send(t, &pgproto3.Terminate{})
			a.Close()
			c := rawSession(t, p, "user2")
			defer c.Close()
			if got := r10Must(t, c, tc.probe); len(got) != 1 || got[0] != tc.want {
				t.Errorf("a new session of user2 after a's session ended: %s = %q, want %q: the backend went back to the pool without a reset", tc.probe, got, tc.want)
			}
		})
	}
}

// FIXED (a change of identity and a reset draw a new seed). setseed is a
// built-in that leaves state in the backend (the seed
// of random()) whatever its arguments, and no state rule knows it: it is
// not in guard/state.go's sessionFunctions and holds no state word, so the
// statement never even reaches the parser. client a (user1) seeds the
// shared backend; client b (user2), on that backend, draws exactly the
// random() sequence a chose (the same as a direct session seeded alike),
// e.g. to predict identifiers, sampling or tokens b's SQL derives from
// random(). Not pinned, and the install on a change of identity does not
// reseed.
func TestReview13SetseedReachesOtherUser(t *testing.T) {
	ctx := context.Background()
	var want []string
	direct := superConn(t)
	if _, err := direct.Exec(ctx, "SELECT setseed(0.4242)"); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		var s string
		if err := direct.QueryRow(ctx, "SELECT random()::text").Scan(&s); err != nil {
			t.Fatal(err)
		}
		want = append(want, s)
	}
	p := proxytest.Start(t, pg, oneConnection)
	a := rawSession(t, p, "user1")
	defer a.Close()
	r13Run(t, a, "SELECT setseed(0.4242)")
	if n := r13Pinned(t, p); n != 0 {
		t.Logf("a was pinned (%v)", n)
		return
	}
	b := rawSession(t, p, "user2")
	defer b.Close()
	var got []string
	for range 3 {
		got = append(got, r10Must(t, b, "SELECT random()::text")[0])
	}
	if strings.Join(got, " ") == strings.Join(want, " ") {
		t.Errorf("b (user2) drew random() = %v, the sequence of setseed(0.4242) that a (user1) ran on the shared backend: a chose b's random numbers and was not pinned", got)
	}

	// Pinning would not be enough: DISCARD ALL, the reset of a pinned
	// session's connection (session/proof.go resetBatch), leaves the seed
	// as it is. a pins itself (LISTEN), seeds, and leaves; the connection
	// is reset and handed to b.
	p2 := proxytest.Start(t, pg, oneConnection)
	a2 := rawSession(t, p2, "user1")
	r13Run(t, a2, "LISTEN r13", "SELECT setseed(0.4242)")
	if r13Pinned(t, p2) != 1 {
		t.Fatal("LISTEN did not pin")
	}
	a2.send(t, &pgproto3.Terminate{})
	a2.Close()
	b2 := rawSession(t, p2, "user2")
	defer b2.Close()
	got = got[:0]
	for range 3 {
		got = append(got, r10Must(t, b2, "SELECT random()::text")[0])
	}
	if strings.Join(got, " ") == strings.Join(want, " ") {
		t.Errorf("after a's pinned session was reset (DISCARD ALL), b (user2) drew random() = %v, a's seeded sequence", got)
	}
}

// HELD. What pins, in many spellings and paths (checked by the pinned
// sessions counter), and what drivers send daily that must not pin.
func TestReview13PinsAndFalsePositives(t *testing.T) {
	for _, tc := range []struct {
		queries []string
		pin     bool
	}{
		// Session settings, in a transaction block too, and set_config
		// with an is_local the guard cannot read.
		{[]string{"BEGIN", "SET search_path = public", "COMMIT"}, true},
		{[]string{"BEGIN; SET SESSION statement_timeout = 5000; COMMIT"}, true},
		{[]string{"SELECT set_config('search_path', 'public', (SELECT false))"}, true},
		{[]string{"SELECT set_config('search_path', 'public', 'of'::bool)"}, true},
		{[]string{"SELECT x FROM (VALUES (1)) v(x) WHERE set_config('work_mem', '8MB', x = 2) IS NOT NULL"}, true},
		{[]string{"SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"}, true},
		{[]string{"SET default_transaction_isolation = 'serializable'"}, true},
		{[]string{"SET xmloption = content"}, true},
		{[]string{"SET SCHEMA 'public'"}, true},
		// LISTEN, hold cursors, SQL PREPARE.
		{[]string{`LISTEN "Chan"`}, true},
		{[]string{"BEGIN", "DECLARE c CURSOR WITH HOLD FOR SELECT 1", "COMMIT"}, true},
		{[]string{"SELECT 1; DECLARE c NO SCROLL CURSOR WITH HOLD FOR SELECT 1"}, true},
		{[]string{"PREPARE r13p AS SELECT 1"}, true},
		// Temporary objects.
		{[]string{"SELECT 1 AS x INTO TEMP r13t"}, true},
		{[]string{"CREATE TEMPORARY TABLE r13t AS SELECT 1 AS x"}, true},
		{[]string{"CREATE TEMP VIEW r13tv AS SELECT 1"}, true},
		{[]string{"CREATE TEMP SEQUENCE r13s"}, true},
		{[]string{`CREATE TABLE "pg_temp".r13t (x int)`}, true},
		{[]string{"CREATE TYPE pg_temp.r13ty AS (x int)"}, true},
		{[]string{"BEGIN", "CREATE TEMP TABLE r13t (x int) ON COMMIT DELETE ROWS", "COMMIT"}, true},
		// Session advisory locks in every spelling and place.
		{[]string{"SELECT pg_catalog.pg_advisory_lock(1)"}, true},
		{[]string{`SELECT "pg_try_advisory_lock_shared"(1, 2)`}, true},
		{[]string{`SELECT U&"pg_advisory\005flock"(3)`}, true},
		{[]string{"SELECT x FROM (VALUES (4)) v(x) ORDER BY PG_TRY_ADVISORY_LOCK_SHARED(x)"}, true},
		{[]string{"SELECT * FROM generate_series(5, 5) g, LATERAL (SELECT pg_try_advisory_lock(g)) l"}, true},
		{[]string{"WITH l AS (SELECT pg_advisory_lock(6)) SELECT * FROM l"}, true},
		{[]string{"VALUES ((SELECT pg_advisory_lock(7)))"}, true},
		{[]string{"EXPLAIN (ANALYZE, COSTS OFF) SELECT pg_advisory_lock(8)"}, true},
		{[]string{"EXPLAIN ANALYSE SELECT pg_advisory_lock(9)"}, true},
		{[]string{"SELECT 1; SELECT pg_advisory_lock(10)"}, true},
		{[]string{"BEGIN", "SELECT pg_advisory_lock(11)", "COMMIT"}, true},
		// Never pinned: what drivers and ORMs send.
		{[]string{"BEGIN", "SET LOCAL statement_timeout = 5000", "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", "COMMIT"}, false},
		{[]string{"SELECT set_config('statement_timeout', '5000', true)"}, false},
		{[]string{"SELECT set_config('search_path', 'public', 't'::bool)"}, false},
		{[]string{"SET application_name = 'r13'"}, false},
		{[]string{"SET TIME ZONE 'UTC'", "SET SESSION TIME ZONE LOCAL"}, false},
		{[]string{"SET NAMES 'UTF8'", "SET datestyle TO iso, mdy", "SET intervalstyle = postgres"}, false},
		{[]string{"SELECT pg_advisory_xact_lock(12)", "SELECT pg_try_advisory_xact_lock_shared(13)"}, false},
		{[]string{"BEGIN", "CREATE TEMP TABLE r13t (x int) ON COMMIT DROP", "COMMIT"}, false},
		{[]string{"RESET statement_timeout", "SET work_mem TO DEFAULT"}, false},
		{[]string{"EXPLAIN SELECT pg_advisory_lock(14)"}, false},
		{[]string{"SELECT pg_advisory_unlock_all()"}, false},
		{[]string{"INSERT INTO notes (content) VALUES ('r13') RETURNING id > 0", "DELETE FROM notes WHERE content = 'r13'"}, false},
	} {
		name := strings.Join(tc.queries, " / ")
		t.Run(name, func(t *testing.T) {
			p := proxytest.Start(t, pg, oneConnection)
			a := rawSession(t, p, "user1")
			defer a.Close()
			r13Run(t, a, tc.queries...)
			if got := r13Pinned(t, p) > 0; got != tc.pin {
				t.Errorf("%s: pinned %v, want %v", name, got, tc.pin)
			}
		})
	}
}

// HELD. What a client leaves without being pinned that the next identity
// must not find: its sequences' currval and lastval (DISCARD SEQUENCES on
// the install), temporary objects made without the word TEMP under a
// pg_temp-led search_path (DISCARD TEMP), the reported settings it
// changed (put back from the client's own values), and its unnamed
// statement.
func TestReview13NextIdentityFindsNothing(t *testing.T) {
	for _, tc := range []struct {
		name   string
		attack []string
		probe  string
		want   string // the probe's rows joined by " ", or "E:" and its SQLSTATE
	}{
		{"lastval", []string{"INSERT INTO notes (content) VALUES ('r13 secret')", "DELETE FROM notes WHERE content = 'r13 secret'"},
			"SELECT lastval()", "E:55000"},
		{"currval", []string{"SELECT nextval('notes_id_seq') > 0"}, "SELECT currval('notes_id_seq')", "E:55000"},
		{"shadow table", []string{
			"BEGIN", "SET LOCAL search_path = pg_temp, public",
			"CREATE TABLE notes (id int, user_id text, content text)",
			"INSERT INTO notes VALUES (0, 'user2', 'planted by user1')", "COMMIT",
		}, "SELECT content FROM notes ORDER BY 1", "user2: water the plants"},
		{"shadow view and select into", []string{
			"BEGIN; SELECT set_config('search_path', 'pg_temp', true); CREATE VIEW notes AS SELECT 1 AS planted; SELECT 2 AS y INTO r13i; CREATE SEQUENCE r13s; COMMIT",
		}, "SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()", "0"},
		{"transaction settings set for the session", []string{
			"SET SESSION transaction_read_only = on", "SET transaction_deferrable = on",
			"BEGIN", "SET SESSION transaction_isolation = 'serializable'", "COMMIT",
		}, "SELECT current_setting('transaction_read_only') || current_setting('transaction_deferrable') || current_setting('transaction_isolation')", "offoffread committed"},
		{"reported settings", []string{
			"SET default_transaction_read_only = on", "SET TimeZone = 'Asia/Tokyo'", "SET application_name = 'user1 was here'",
			"SET intervalstyle = iso_8601",
		}, "SELECT current_setting('default_transaction_read_only') || current_setting('TimeZone') || current_setting('application_name') || current_setting('IntervalStyle')", "offEtc/UTCpostgres"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, oneConnection)
			a := rawSession(t, p, "user1")
			defer a.Close()
			r13Run(t, a, tc.attack...)
			b := rawSession(t, p, "user2")
			defer b.Close()
			rows, code := r10Query(t, b, tc.probe)
			got := strings.Join(rows, " ")
			if code != "" {
				got = "E:" + code
			}
			if got != tc.want {
				t.Errorf("b after a's %s: %s = %q, want %q", tc.name, tc.probe, got, tc.want)
			}
		})
	}
	t.Run("hold cursor and LISTEN through Parse pin", func(t *testing.T) {
		for _, q := range []string{"DECLARE c CURSOR WITH HOLD FOR SELECT 1", "LISTEN r13", "SELECT pg_advisory_lock(15)"} {
			p := proxytest.Start(t, pg, oneConnection)
			a := rawSession(t, p, "user1")
			a.send(t, &pgproto3.Parse{Name: "s", Query: q}, &pgproto3.Bind{PreparedStatement: "s"}, &pgproto3.Execute{}, &pgproto3.Sync{})
			if got := strings.Join(untilReady(t, a, 1), " "); strings.Contains(got, "E:") {
				t.Errorf("%s: %s", q, got)
			}
			if r13Pinned(t, p) != 1 {
				t.Errorf("%s through Parse did not pin", q)
			}
			a.Close()
		}
	})
	t.Run("unnamed statement", func(t *testing.T) {
		p := proxytest.Start(t, pg, oneConnection)
		a := rawSession(t, p, "user1")
		defer a.Close()
		a.send(t, &pgproto3.Parse{Query: "SELECT 'statement of user1'::text"}, &pgproto3.Sync{})
		untilReady(t, a, 1)
		b := rawSession(t, p, "user2")
		defer b.Close()
		b.send(t, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{})
		if got := strings.Join(untilReady(t, b, 1), " "); !strings.HasPrefix(got, "E:") {
			t.Errorf("b's Bind of the unnamed statement ran a's: %s", got)
		}
	})
}

// FIXED (an anonymous grant is the same identity only as itself).
// Anonymous clients are different people with one identity (the
// --anonymous-role, no claims), so a connection that served one anonymous
// client goes to the next without an identity change, and the install's
// DISCARD TEMP (session/proof.go installBatch, only when
// !prev.SameIdentity(g)) never runs between them. Anonymous client a makes
// a temporary table without the word TEMP (unqualified CREATE TABLE under a
// transaction-local search_path led by pg_temp: not pinned), named as a
// table anonymous users may only INSERT into (a contact form, sign-up
// requests). Anonymous client b's INSERT then lands in a's temporary table,
// which shadows the real one (pg_temp is searched first), and a reads b's
// message back on its next transaction: a write-only table becomes
// readable by another person, and b's row never reaches the real table.
func TestReview13AnonymousShadowTable(t *testing.T) {
	r10Super(t, "DROP TABLE IF EXISTS r13_contact; CREATE TABLE r13_contact (msg text); GRANT INSERT ON r13_contact TO anon")
	t.Cleanup(func() { r10Super(t, "DROP TABLE IF EXISTS r13_contact") })
	p := proxytest.Start(t, pg, oneConnection, func(s *proxytest.Setup) { s.Policy.AnonymousRole = "anon" })
	anon := func() *rawClient {
		c, e, _ := rawStartup(t, p, "anonymous", "", "")
		if e != nil {
			t.Fatalf("anonymous startup: %s %s", e.Code, e.Message)
		}
		return c
	}
	a := anon()
	defer a.Close()
	if _, code := r10Query(t, a, "SELECT msg FROM r13_contact"); code != "42501" {
		t.Fatalf("anonymous may read r13_contact (%q): the premise is wrong", code)
	}
	r13Run(t, a, "BEGIN", "SET LOCAL search_path = pg_temp, public", "CREATE TABLE r13_contact (msg text)", "COMMIT")
	b := anon()
	defer b.Close()
	r13Run(t, b, "INSERT INTO r13_contact VALUES ('message of another anonymous person')")
	// a's temporary table went with the change of identity (42P01), or
	// holds nothing of b's.
	if got, code := r10Query(t, a, "SELECT coalesce(string_agg(msg, ','), '') FROM pg_temp.r13_contact"); code == "" && got[0] != "" {
		t.Errorf("anonymous a read what anonymous b inserted into a write-only table: %q", got[0])
	}
	var n int
	if err := superConn(t).QueryRow(context.Background(), "SELECT count(*) FROM r13_contact").Scan(&n); err != nil || n != 1 {
		t.Errorf("b's row in the real table: %d (%v), want 1", n, err)
	}
}

// HELD (--guard off). UPDATE of pg_settings nested where the state rules
// do not look (pin checks it at the top of the statement only: inside WITH
// or COPY (...) TO it would pin nothing) is refused by the server itself:
// DO INSTEAD rules (pg_settings' update rule) are not supported there.
func TestReview13GuardOffNestedSettingsUpdate(t *testing.T) {
	for _, q := range []string{
		"WITH u AS (UPDATE pg_settings SET setting = '4321' WHERE name = 'statement_timeout' RETURNING 1) SELECT count(*) FROM u",
		"COPY (UPDATE pg_catalog.pg_settings SET setting = '4321' WHERE name = 'statement_timeout' RETURNING name) TO STDOUT",
	} {
		t.Run(q, func(t *testing.T) {
			p := proxytest.Start(t, pg, oneConnection, proxytest.GuardOff)
			a := rawSession(t, p, "user1")
			defer a.Close()
			a.send(t, &pgproto3.Query{String: q})
			if got := strings.Join(untilReady(t, a, 1), " "); got != "E:0A000 Z" {
				t.Errorf("%s: %s, want E:0A000 Z", q, got)
			}
		})
	}
}

// FIXED, as TestReview13TempCodeHidesSessionState, in session mode: a
// session that left nothing its words showed is released without DISCARD
// ALL, so the next session on the connection, of another identity, relied
// on the install alone. user1 leaves a setting, an advisory lock and a
// seed through a view; user2, on the same connection, finds none of them.
func TestReview13SessionModeHiddenState(t *testing.T) {
	p := proxytest.Start(t, pg, oneSessionConnection)
	a := rawSession(t, p, "user1")
	pid := r10Must(t, a, "SELECT pg_backend_pid()::text")[0]
	r13Run(t, a, "BEGIN; SET LOCAL search_path = pg_temp, public; CREATE VIEW r13s AS SELECT pg_catalog.set_config('app.tenant', 'tenant-of-user1', false) AS x, pg_catalog.pg_try_advisory_lock(4243) AS l, pg_catalog.setseed(0.4242)::text AS s; COMMIT",
		"SELECT x FROM r13s")
	// setseed's void reads '': seeded is the first number after the seed.
	seeded := r10Must(t, a, "SELECT setseed(0.4242)::text || random()::text")[0]
	r13Run(t, a, "SELECT x FROM r13s")
	a.send(t, &pgproto3.Terminate{})
	a.Close()
	b := rawSession(t, p, "user2")
	defer b.Close()
	if got := r10Must(t, b, "SELECT pg_backend_pid()::text")[0]; got != pid {
		t.Fatalf("user2 got backend %s, not user1's %s: the test proves nothing", got, pid)
	}
	for _, c := range []struct{ probe, want string }{
		{"SELECT coalesce(nullif(current_setting('app.tenant', true), ''), '<unset>')", "<unset>"},
		{"SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()", "0"},
	} {
		if got := r10Must(t, b, c.probe)[0]; got != c.want {
			t.Errorf("user2 after user1 on one connection: %s = %q, want %q", c.probe, got, c.want)
		}
	}
	if got := r10Must(t, b, "SELECT random()::text")[0]; got == seeded {
		t.Errorf("user2 drew random() = %s, the first number of user1's seed", got)
	}
}

// The look-alike that must pass: an anonymous client's own consecutive
// transactions are one identity, so its temporary table made out of the
// guard's sight (not pinned) is still there in its next transaction.
func TestReview13AnonymousOwnStateKept(t *testing.T) {
	p := proxytest.Start(t, pg, oneConnection, func(s *proxytest.Setup) { s.Policy.AnonymousRole = "anon" })
	a, e, _ := rawStartup(t, p, "anonymous", "", "")
	if e != nil {
		t.Fatalf("anonymous startup: %s %s", e.Code, e.Message)
	}
	defer a.Close()
	r13Run(t, a, "BEGIN", "SET LOCAL search_path = pg_temp, public", "CREATE TABLE r13_own (msg text)", "COMMIT",
		"INSERT INTO pg_temp.r13_own VALUES ('mine')")
	if got := r10Must(t, a, "SELECT msg FROM pg_temp.r13_own"); len(got) != 1 || got[0] != "mine" {
		t.Errorf("anonymous client's own temporary table in its next transaction: %v", got)
	}
}
