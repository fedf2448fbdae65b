package proxy_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// attacks are the THREATS.md classes, each in a few spellings, as a client
// holding a valid token for user1 would send them.
var attacks = []struct{ name, sql string }{
	{"reset role", "RESET ROLE"}, // allowed, but re-established: must not end as authenticator
	{"set role", "SET ROLE admin"},
	{"set role none", "SET ROLE NONE"},
	{"set local role", "BEGIN; SET LOCAL ROLE admin; SELECT content FROM notes"},
	{"quoted role", `SET "role" TO admin`},
	{"comment between tokens", "SET/**/ROLE/**/admin"},
	{"unicode escaped", `SET U&"\0072ole" TO admin`},
	{"session authorization", "SET SESSION AUTHORIZATION authenticator"},
	{"set claim", "SET jwt.claims.sub = 'user2'"},
	{"set claim quoted", `SET "jwt"."claims"."sub" TO 'user2'`},
	{"set claims json", `SET request.jwt.claims = '{"sub":"user2"}'`},
	{"set_config", "SELECT set_config('jwt.claims.sub', 'user2', false)"},
	{"set_config qualified", "SELECT pg_catalog.set_config('role', 'admin', false)"},
	{"set_config computed name", "SELECT set_config('jwt.'||'claims.sub', 'user2', false)"},
	{"set_config unicode", `SELECT U&"\0073et_config"('jwt.claims.sub', 'user2', false)`},
	{"set_config in subquery", "SELECT (SELECT set_config('role', 'admin', false))"},
	{"set_config name cut by a cast", "SELECT set_config('rolex'::varchar(4), 'admin', false)"},
	{"set_config name padded by a cast", "SELECT set_config('role '::char(5), 'admin', false)"},
	{"set_config claim cut by a cast", "SELECT set_config('jwt.claims.subX'::varchar(14), 'user2', false)"},
	{"multi statement", "SELECT 1; SET ROLE admin; SELECT 2"},
	{"do block", "DO $$BEGIN PERFORM set_config('role','admin',false); END$$"},
	{"temp function", "CREATE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql AS $$SELECT set_config('role','admin',false)$$"},
	{"temp table default", "CREATE TEMP TABLE x (v text DEFAULT set_config('role','admin',false))"},
	{"explain", "EXPLAIN ANALYZE SELECT set_config('role', 'admin', false)"},
	{"prepare", "PREPARE p AS SELECT set_config('role', 'admin', false)"},
	{"query_to_xml", "SELECT query_to_xml('SELECT * FROM notes', true, false, '')"},
	{"alter role", "ALTER ROLE authenticated SET jwt.claims.sub = 'user2'"},
	{"reset then select", "RESET ROLE; SELECT content FROM notes"},
	{"discard then set", "DISCARD ALL; SELECT content FROM notes"},
	{"terminate others", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"},
}

// execSQL runs sql as a simple Query, or as Parse/Bind/Execute/Sync.
func execSQL(ctx context.Context, conn *pgx.Conn, sql string, extended bool) error {
	if extended {
		return conn.PgConn().ExecParams(ctx, sql, nil, nil, nil, nil).Read().Err
	}
	_, err := conn.Exec(ctx, sql, pgx.QueryExecModeSimpleProtocol)
	return err
}

// assertStillUser1 checks that the session is exactly what the token said.
func assertStillUser1(t *testing.T, conn *pgx.Conn) {
	t.Helper()
	ctx := context.Background()
	var cu, sub string
	if err := conn.QueryRow(ctx, "SELECT current_user, current_setting('jwt.claims.sub')", pgx.QueryExecModeSimpleProtocol).Scan(&cu, &sub); err != nil {
		t.Fatalf("after the attack: %v", err)
	}
	if cu != "authenticated" || sub != "user1" {
		t.Fatalf("after the attack: current_user %s, sub %s", cu, sub)
	}
	rows := queryStrings(t, conn, "SELECT user_id FROM notes")
	if len(rows) != 2 || rows[0] != "user1" || rows[1] != "user1" {
		t.Fatalf("after the attack the session sees %v", rows)
	}
}

// Every attack is refused (or, for resets, undone) in the simple and the
// extended protocol, and the session stays user1's.
func TestGuardStopsAttacks(t *testing.T) {
	p := proxytest.Start(t, pg)
	ctx := context.Background()
	for _, a := range attacks {
		for _, extended := range []bool{false, true} {
			if extended && strings.Contains(a.sql, ";") {
				continue // one statement per Parse
			}
			name := a.name + "/simple"
			if extended {
				name = a.name + "/extended"
			}
			t.Run(name, func(t *testing.T) {
				conn := connect(t, p, "user1", p.Token(t, "user1"))
				err := execSQL(ctx, conn, a.sql, extended)
				var pgErr *pgconn.PgError
				if a.sql == "RESET ROLE" && !extended {
					if err != nil {
						t.Fatalf("RESET ROLE alone is allowed: %v", err)
					}
				} else if !errors.As(err, &pgErr) || pgErr.Code != "42501" || !strings.Contains(pgErr.Message, "rlsproxy") {
					t.Fatalf("want 42501 from rlsproxy, got %v", err)
				}
				if conn.PgConn().TxStatus() != 'I' {
					_, _ = conn.Exec(ctx, "ROLLBACK")
				}
				assertStillUser1(t, conn)
			})
		}
	}
	if got := p.Counter(t, "rlsproxy_guard_rejections_total"); got == 0 {
		t.Fatal("guard rejections are not counted")
	}
}

// Harmless look-alikes pass: the guard reads the grammar, not words.
func TestGuardAllowsLookAlikes(t *testing.T) {
	p := proxytest.Start(t, pg)
	ctx := context.Background()
	conn := connect(t, p, "user1", p.Token(t, "user1"))
	for _, sql := range []string{
		`CREATE TEMP TABLE look ("role" text, set_config int, "authorization" text)`,
		"INSERT INTO look VALUES ('a', 1, 'b')",
		"UPDATE look SET role = 'x', set_config = 2",
		"SELECT role, set_config FROM look WHERE role = 'SET ROLE admin'",
		"SELECT 'SET ROLE admin; SELECT set_config(1)' -- SET ROLE admin",
		"SET statement_timeout = 5000",
		"SET search_path = public, pg_temp",
		"SET application_name = 'look-alike'",
		"SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED",
		"SHOW role",
		"SELECT current_setting('jwt.claims.sub')",
		"BEGIN", "SAVEPOINT s1", "SELECT 1", "ROLLBACK TO s1", "RELEASE s1", "COMMIT",
		"INSERT INTO look VALUES ('c', 3, 'd') ON CONFLICT DO NOTHING",
		"PREPARE q AS SELECT role FROM look", "EXECUTE q", "DEALLOCATE q",
		"DISCARD PLANS",
	} {
		if err := execSQL(ctx, conn, sql, false); err != nil {
			t.Errorf("%s: %v", sql, err)
		}
	}
	for _, sql := range []string{
		"UPDATE look SET role = 'x', set_config = 2",
		"SELECT role, set_config FROM look WHERE role = 'SET ROLE admin'",
		"SET statement_timeout = 5000",
		"SET search_path = public, pg_temp",
		"SHOW role",
		"SELECT current_setting('jwt.claims.sub')",
		"INSERT INTO look VALUES ('c', 3, 'd') ON CONFLICT DO NOTHING",
	} {
		if err := execSQL(ctx, conn, sql, true); err != nil {
			t.Errorf("%s (extended): %v", sql, err)
		}
	}
	assertStillUser1(t, conn)
	// Prepared statements of pgx (named, cached) work through the guard.
	for range 3 {
		if got := queryStrings(t, conn, "SELECT content FROM notes WHERE user_id = $1", "user1"); len(got) != 2 {
			t.Fatal(got)
		}
	}
}

// Inside a transaction block a refused statement fails the upstream
// transaction too, so client and server agree until ROLLBACK.
func TestGuardTransactionState(t *testing.T) {
	p := proxytest.Start(t, pg)
	ctx := context.Background()
	conn := connect(t, p, "user1", p.Token(t, "user1"))
	if _, err := conn.Exec(ctx, "BEGIN"); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "SET ROLE admin"); err == nil {
		t.Fatal("SET ROLE passed")
	}
	if s := conn.PgConn().TxStatus(); s != 'E' {
		t.Fatalf("client transaction status %q after a refused statement, want E (failed)", s)
	}
	_, err := conn.Exec(ctx, "SELECT 1")
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "25P02" {
		t.Fatalf("the server does not agree the transaction failed: %v", err)
	}
	if _, err := conn.Exec(ctx, "ROLLBACK"); err != nil {
		t.Fatal(err)
	}
	assertStillUser1(t, conn)

	// Outside a transaction nothing is left failed.
	if _, err := conn.Exec(ctx, "SET ROLE admin"); err == nil {
		t.Fatal("SET ROLE passed")
	}
	if s := conn.PgConn().TxStatus(); s != 'I' {
		t.Fatalf("transaction status %q, want I", s)
	}
}

// After a refused Parse, the extended-protocol messages up to Sync are
// discarded and the client receives exactly what PostgreSQL sends for a
// Parse that fails: ErrorResponse, then ReadyForQuery at Sync.
func TestGuardExtendedProtocolDiscardsUntilSync(t *testing.T) {
	p := proxytest.Start(t, pg)
	run := func(badSQL string) []string {
		c := rawSession(t, p, "user1")
		c.send(t,
			&pgproto3.Parse{Name: "s1", Query: badSQL},
			&pgproto3.Bind{PreparedStatement: "s1"},
			&pgproto3.Execute{},
			&pgproto3.Parse{Name: "s2", Query: "SELECT 2"},
			&pgproto3.Bind{PreparedStatement: "s2"},
			&pgproto3.Execute{},
			&pgproto3.Sync{},
			&pgproto3.Query{String: "SELECT current_user"},
		)
		var seq []string
		for len(seq) == 0 || seq[len(seq)-1] != "Z" || strings.Count(strings.Join(seq, ""), "Z") < 2 {
			switch m := c.receive(t).(type) {
			case *pgproto3.ErrorResponse:
				seq = append(seq, "E:"+m.Code)
			case *pgproto3.ReadyForQuery:
				seq = append(seq, "Z")
			case *pgproto3.DataRow:
				seq = append(seq, "D:"+string(m.Values[0]))
			case *pgproto3.RowDescription:
				seq = append(seq, "T")
			case *pgproto3.CommandComplete:
				seq = append(seq, "C")
			default:
				seq = append(seq, "?")
			}
		}
		return seq
	}
	refused := run("SELECT set_config('role', 'admin', false)")
	postgres := run("SELEC 1") // a Parse that PostgreSQL itself refuses
	want := "E:42501 Z T D:authenticated C Z"
	if strings.Join(refused, " ") != want {
		t.Fatalf("refused Parse: got %v, want %s", refused, want)
	}
	if strings.Join(postgres, " ") != strings.Replace(want, "42501", "42601", 1) {
		t.Fatalf("PostgreSQL's own failure: %v", postgres)
	}
}

// In a pipeline, a refused statement is answered in its place: what comes
// before and after it runs.
func TestGuardPipeline(t *testing.T) {
	p := proxytest.Start(t, pg)
	conn := connect(t, p, "user1", p.Token(t, "user1"))
	pl := conn.PgConn().StartPipeline(context.Background())
	for _, sql := range []string{"SELECT 'before'", "SELECT set_config('jwt.claims.sub', 'user2', false)", "SELECT 'after'"} {
		pl.SendQueryParams(sql, nil, nil, nil, nil)
		if err := pl.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	_ = pl.Flush()
	var got []string
	for len(got) < 6 {
		res, err := pl.GetResults()
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) {
			got = append(got, "error "+pgErr.Code)
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		switch r := res.(type) {
		case *pgconn.ResultReader:
			rr := r.Read()
			if rr.Err != nil {
				var pgErr *pgconn.PgError
				errors.As(rr.Err, &pgErr)
				got = append(got, "error "+pgErr.Code)
			} else {
				got = append(got, string(rr.Rows[0][0]))
			}
		case *pgconn.PipelineSync:
			got = append(got, "sync")
		}
	}
	if strings.Join(got, ",") != "before,sync,error 42501,sync,after,sync" {
		t.Fatalf("pipeline answers: %v", got)
	}
	if err := pl.Close(); err != nil {
		t.Fatal(err)
	}
	assertStillUser1(t, conn)
}

// FunctionCall calls a function by OID without SQL: set_config (2078) is
// refused, the large-object functions pass.
func TestGuardFunctionCall(t *testing.T) {
	p := proxytest.Start(t, pg)
	conn := connect(t, p, "user1", p.Token(t, "user1"))
	call := func(oid uint32, args ...[]byte) *pgproto3.ErrorResponse {
		fe := conn.PgConn().Frontend()
		fe.Send(&pgproto3.FunctionCall{Function: oid, Arguments: args, ArgFormatCodes: []uint16{0}, ResultFormatCode: 0})
		if err := fe.Flush(); err != nil {
			t.Fatal(err)
		}
		var e *pgproto3.ErrorResponse
		for {
			m, err := fe.Receive()
			if err != nil {
				t.Fatal(err)
			}
			if er, ok := m.(*pgproto3.ErrorResponse); ok {
				copy := *er
				e = &copy
			}
			if _, ok := m.(*pgproto3.ReadyForQuery); ok {
				return e
			}
		}
	}
	if e := call(2078, []byte("jwt.claims.sub"), []byte("user2"), []byte("f")); e == nil || e.Code != "42501" {
		t.Fatalf("FunctionCall set_config: %+v", e)
	}
	if e := call(957, []byte("131072")); e != nil { // lo_creat(INV_WRITE)
		t.Fatalf("FunctionCall lo_creat: %s %s", e.Code, e.Message)
	}
	assertStillUser1(t, conn)
}

// RESET ALL, DISCARD ALL, RESET ROLE and SET SESSION AUTHORIZATION DEFAULT
// pass, and the proxy re-establishes role and claims before the client sees
// ReadyForQuery, so clients and poolers that reset connections keep working.
func TestGuardResetsReestablishSession(t *testing.T) {
	p := proxytest.Start(t, pg)
	ctx := context.Background()
	conn := connect(t, p, "user1", p.Token(t, "user1"))
	for _, reset := range []string{
		"DISCARD ALL", "RESET ALL", "RESET ROLE", "SET SESSION AUTHORIZATION DEFAULT",
		"RESET SESSION AUTHORIZATION", "RESET jwt.claims.sub", "SET jwt.claims.sub TO DEFAULT",
		"SELECT 1; RESET ALL", "RESET ROLE; RESET ALL",
	} {
		// A prepared statement before the reset, re-prepared after it, as a
		// pooler's client would.
		if got := queryStrings(t, conn, "SELECT user_id FROM notes WHERE id = $1", 1); len(got) != 1 {
			t.Fatalf("before %s: %v", reset, got)
		}
		if _, err := conn.Exec(ctx, reset); err != nil {
			t.Fatalf("%s: %v", reset, err)
		}
		if reset == "DISCARD ALL" || strings.Contains(reset, "DISCARD") {
			conn.DeallocateAll(ctx) // the server forgot them; tell pgx
		}
		assertStillUser1(t, conn)
	}
	// In a transaction block, too.
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "RESET ROLE"); err != nil {
		t.Fatal(err)
	}
	var cu string
	if err := tx.QueryRow(ctx, "SELECT current_user").Scan(&cu); err != nil || cu != "authenticated" {
		t.Fatalf("in a transaction after RESET ROLE: %s %v", cu, err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	assertStillUser1(t, conn)
	// psql, which sends each line as a simple query.
	out, err := psql(t, p.DSN("user1", ""), p.Token(t, "user1"), nil, "-q", "-c", "DISCARD ALL", "-c", "SELECT current_user || ' ' || current_setting('jwt.claims.sub')")
	if err != nil || out != "authenticated user1" {
		t.Fatalf("psql after DISCARD ALL: %q %v", out, err)
	}
	// As a prepared statement a reset is refused: it could run later, where
	// the proxy cannot follow it.
	err = execSQL(ctx, conn, "RESET ROLE", true)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "42501" {
		t.Fatalf("RESET ROLE as a prepared statement: %v", err)
	}
}

// With --guard off the proxy forwards everything: the guard is what stops
// these statements (the signed-claims layer is tested on its own).
func TestGuardOff(t *testing.T) {
	p := proxytest.Start(t, pg, proxytest.GuardOff)
	conn := connect(t, p, "user1", p.Token(t, "user1"))
	if _, err := conn.Exec(context.Background(), "SET jwt.claims.sub = 'user2'"); err != nil {
		t.Fatal(err)
	}
	if got := queryStrings(t, conn, "SELECT user_id FROM notes"); len(got) != 1 || got[0] != "user2" {
		t.Fatalf("with the guard off the claim setting is not protected, as documented: %v", got)
	}
}
