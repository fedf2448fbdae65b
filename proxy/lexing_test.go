package proxy_test

import (
	"github.com/rlsproxy/rlsproxy/internal/devissuer"

	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/demo"
	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// The guard and the server must read the same statement. The server lexes a
// statement after converting it from the session's client_encoding, with
// the session's standard_conforming_strings, and both are the client's to
// choose (THREATS.md). These tests go through the real proxy to the real
// PostgreSQL: every way a client can choose an encoding the guard cannot
// read (refused), every way a statement can hide behind bytes another
// reading splits otherwise (refused), and the harmless look-alikes that must
// pass: other ASCII-safe encodings, backslashes, non-ASCII text, claims that
// are not ASCII.

// lexDrivers are the two relay drivers.
var lexDrivers = []struct {
	name string
	opts []proxytest.Option
}{
	{"event loop", nil},
	{"goroutines", []proxytest.Option{proxytest.GoroutineRelay}},
}

// lexAnswers is what a hand-spoken session received, as short strings
// ("T", "D:a,b", "C:SELECT 1", "E:42501", "F:42501" for a FATAL,
// "S:name=value" for a ParameterStatus, "1" ParseComplete, "2"
// BindComplete, "Z"), with the errors in full.
type lexAnswers struct {
	seq    []string
	errs   []pgproto3.ErrorResponse
	fatal  *pgproto3.ErrorResponse
	closed bool // the connection ended while reading
}

func (a lexAnswers) String() string {
	short := make([]string, len(a.seq))
	for i, s := range a.seq {
		if len(s) > 60 {
			s = s[:40] + fmt.Sprintf("...(%d bytes)", len(s))
		}
		short[i] = s
	}
	return strings.Join(short, " ")
}

// has reports whether the answers hold the short string s.
func (a lexAnswers) has(s string) bool {
	for _, x := range a.seq {
		if x == s {
			return true
		}
	}
	return false
}

// messages is every error message received, joined.
func (a lexAnswers) messages() string {
	var m []string
	for _, e := range a.errs {
		m = append(m, e.Severity+" "+e.Code+": "+e.Message)
	}
	return strings.Join(m, " | ")
}

// lexRead reads answers up to the n-th ReadyForQuery or the end of the
// connection; after a FATAL it reads on, so that anything the proxy let
// through after it shows.
func lexRead(t *testing.T, c *rawClient, n int) lexAnswers {
	t.Helper()
	var a lexAnswers
	for n > 0 {
		m, err := c.fe.Receive()
		if err != nil {
			var ne interface{ Timeout() bool }
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("no answer after %s", a)
			}
			a.closed = true // EOF or reset: the proxy closed the connection
			return a
		}
		switch m := m.(type) {
		case *pgproto3.ErrorResponse:
			a.errs = append(a.errs, *m)
			if m.Severity == "FATAL" {
				a.seq = append(a.seq, "F:"+m.Code)
				e := *m
				a.fatal = &e
				continue
			}
			a.seq = append(a.seq, "E:"+m.Code)
		case *pgproto3.ReadyForQuery:
			a.seq = append(a.seq, "Z")
			n--
		case *pgproto3.DataRow:
			var vals []string
			for _, v := range m.Values {
				vals = append(vals, string(v))
			}
			a.seq = append(a.seq, "D:"+strings.Join(vals, ","))
		case *pgproto3.CommandComplete:
			a.seq = append(a.seq, "C:"+string(m.CommandTag))
		case *pgproto3.RowDescription:
			a.seq = append(a.seq, "T")
		case *pgproto3.ParameterStatus:
			a.seq = append(a.seq, "S:"+m.Name+"="+m.Value)
		case *pgproto3.ParseComplete:
			a.seq = append(a.seq, "1")
		case *pgproto3.BindComplete:
			a.seq = append(a.seq, "2")
		case *pgproto3.NoData:
			a.seq = append(a.seq, "n")
		case *pgproto3.NoticeResponse:
		default:
			a.seq = append(a.seq, fmt.Sprintf("?%T", m))
		}
	}
	return a
}

// lexQuery sends one Query and reads its answers.
func lexQuery(t *testing.T, c *rawClient, sql string) lexAnswers {
	t.Helper()
	c.send(t, &pgproto3.Query{String: sql})
	return lexRead(t, c, 1)
}

// lexExtended sends sql as Parse, Bind, Execute, Sync and reads the answers.
func lexExtended(t *testing.T, c *rawClient, sql string) lexAnswers {
	t.Helper()
	c.send(t, &pgproto3.Parse{Query: sql}, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{})
	return lexRead(t, c, 1)
}

// lexValue runs a query that must succeed and returns its first value.
func lexValue(t *testing.T, c *rawClient, sql string) string {
	t.Helper()
	a := lexQuery(t, c, sql)
	for _, s := range a.seq {
		if strings.HasPrefix(s, "D:") {
			if len(a.errs) > 0 {
				break
			}
			return s[2:]
		}
	}
	t.Fatalf("%s: %s (%s)", sql, a, a.messages())
	return ""
}

// lexMustPass runs a statement that must succeed, and returns its answers.
func lexMustPass(t *testing.T, c *rawClient, sql string) lexAnswers {
	t.Helper()
	a := lexQuery(t, c, sql)
	if len(a.errs) > 0 || a.closed {
		t.Errorf("look-alike %q refused: %s (%s)", sql, a, a.messages())
	}
	return a
}

// lexMustRefuse runs a statement that the guard must refuse with 42501
// and a message holding word, the session going on.
func lexMustRefuse(t *testing.T, c *rawClient, sql, word string, extended bool) {
	t.Helper()
	var a lexAnswers
	if extended {
		a = lexExtended(t, c, sql)
	} else {
		a = lexQuery(t, c, sql)
	}
	if a.String() != "E:42501 Z" || !strings.Contains(a.messages(), word) {
		t.Errorf("%q (extended %v): got %s (%s), want E:42501 Z naming %s", sql, extended, a, a.messages(), word)
	}
}

// lexAssertIdentity checks that the session is still user1 as
// authenticated, in client_encoding enc.
func lexAssertIdentity(t *testing.T, c *rawClient, sub, enc string) {
	t.Helper()
	if got := lexValue(t, c, "SELECT current_user || ',' || current_setting('jwt.claims.sub') || ',' || current_setting('client_encoding')"); got != "authenticated,"+sub+","+enc {
		t.Fatalf("session is now %s, want authenticated,%s,%s", got, sub, enc)
	}
}

// lexLoginState is what a hidden statement could change for good: the
// login role's password and its stored settings.
func lexLoginState(t *testing.T, su *pgx.Conn) string {
	t.Helper()
	var pw, settings string
	if err := su.QueryRow(context.Background(), `
		SELECT coalesce(rolpassword, ''),
		       (SELECT coalesce(string_agg(array_to_string(setconfig, ','), ';'), '') FROM pg_db_role_setting
		        WHERE setrole = 'authenticator'::regrole
		          AND setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = $1)))
		FROM pg_authid WHERE rolname = 'authenticator'`, demo.Database).Scan(&pw, &settings); err != nil {
		t.Fatal(err)
	}
	return pw + "|" + settings
}

// lexGuardLoginState checks after the test that the login role is as it
// was, and puts it back if not, so that a guard that failed here does not
// break every other test of the package.
func lexGuardLoginState(t *testing.T, su *pgx.Conn) {
	t.Helper()
	before := lexLoginState(t, su)
	t.Cleanup(func() {
		if after := lexLoginState(t, su); after != before {
			t.Errorf("BUG: the login role changed: %q, was %q", after, before)
			cfg, err := pgx.ParseConfig(pg.Upstream)
			if err != nil {
				t.Fatal(err)
			}
			_ = pg.Exec(context.Background(), "postgres", fmt.Sprintf(
				"ALTER ROLE authenticator PASSWORD %s; ALTER ROLE authenticator RESET ALL; ALTER ROLE authenticator IN DATABASE %s RESET ALL",
				quoteLiteral(cfg.Password), demo.Database))
		}
	})
}

// lexWaitGone waits until no backend runs with application_name app: a
// backend reads and runs what is in its socket even after the proxy closed
// it, so its traces are final only then.
func lexWaitGone(t *testing.T, su *pgx.Conn, app string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var n int
		if err := su.QueryRow(context.Background(), "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("backend of %s still running", app)
		}
	}
}

// lexClientOnlySpellings are client_encoding values naming an encoding whose
// multibyte characters can end in an ASCII byte (a backslash), in the
// spellings PostgreSQL accepts (it ignores case and non-alphanumerics).
var lexClientOnlySpellings = []string{
	"SJIS", "sjis", "Shift_JIS", "shift-jis", "mskanji", "win932", "windows932",
	"SHIFT_JIS_2004", "shiftjis2004",
	"BIG5", "big-5", "win950", "windows950",
	"GBK", "win936", "windows936", "cp936",
	"UHC", "win949", "windows949",
	"GB18030", "gb-18030", "gb_18030",
	"JOHAB",
}

// TestLexingStartupEncodings: a client-only client_encoding is refused at
// startup wherever it is asked for, before the token is even read; the
// ASCII-safe encodings and standard_conforming_strings off are accepted.
func TestLexingStartupEncodings(t *testing.T) {
	p := proxytest.Start(t, pg)
	token := p.Token(t, "user1")
	refused := func(t *testing.T, params []string, wantBeforeToken bool) {
		t.Helper()
		c, e, before := rawStartup(t, p, "user1", token, "", params...)
		if c != nil {
			t.Fatalf("startup %q opened a session (client_encoding %s)", params, lexValue(t, c, "SHOW client_encoding"))
		}
		if e.Severity != "FATAL" || e.Code != "42501" || !strings.Contains(e.Message, "client_encoding") {
			t.Errorf("startup %q: %s %s: %s; want FATAL 42501 naming client_encoding", params, e.Severity, e.Code, e.Message)
		}
		if wantBeforeToken && !before {
			t.Errorf("startup %q: refused only after the token was read", params)
		}
	}
	t.Run("parameter", func(t *testing.T) {
		for _, enc := range lexClientOnlySpellings {
			refused(t, []string{"client_encoding", enc}, true)
		}
	})
	t.Run("options", func(t *testing.T) {
		for _, opt := range []string{
			"-c client_encoding=GBK",
			"-cclient_encoding=SJIS",
			"--client-encoding=BIG5",
			"--client_encoding=UHC",
			"-c CLIENT_ENCODING=gb18030",
			"-c client-encoding=mskanji",
			`-c client_encoding=S\JIS`, // pg_split_opts drops the backslash
			"-c application_name=x -c client_encoding=win950",
			"-c client_encoding=UTF8 -c client_encoding=Shift_JIS", // the last one wins
		} {
			refused(t, []string{"options", opt}, true)
		}
		// A safe parameter does not cover an unsafe option, nor the reverse.
		refused(t, []string{"client_encoding", "UTF8", "options", "-c client_encoding=SJIS"}, true)
		refused(t, []string{"options", "-c client_encoding=UTF8", "client_encoding", "GB18030"}, true)
	})
	t.Run("parameter name in another case", func(t *testing.T) {
		// PostgreSQL finds settings whatever the case of their name; the
		// session is refused by the check of what the server reports.
		for _, name := range []string{"Client_Encoding", "CLIENT_ENCODING"} {
			refused(t, []string{name, "SJIS"}, false)
		}
	})
	t.Run("pgx runtime parameter", func(t *testing.T) {
		cfg, err := pgx.ParseConfig(p.DSN("user1", token))
		if err != nil {
			t.Fatal(err)
		}
		cfg.RuntimeParams["client_encoding"] = "SJIS"
		conn, err := pgx.ConnectConfig(context.Background(), cfg)
		if err == nil {
			conn.Close(context.Background())
			t.Fatal("pgx connected with client_encoding SJIS")
		}
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "42501" || !strings.Contains(pgErr.Message, "client_encoding") {
			t.Fatalf("want 42501 naming client_encoding, got %v", err)
		}
	})
	t.Run("psql PGCLIENTENCODING and PGOPTIONS", func(t *testing.T) {
		for _, env := range [][]string{{"PGCLIENTENCODING=BIG5"}, {"PGOPTIONS=-c client_encoding=GBK"}, {"PGCLIENTENCODING=SJIS"}} {
			out, err := psql(t, p.DSN("user1", ""), token, env, "-c", "SELECT current_user")
			if err == nil || !strings.Contains(out, "FATAL") || !strings.Contains(out, "client_encoding") {
				t.Errorf("psql with %s: %v: %s; want FATAL naming client_encoding", env, err, out)
			}
		}
	})
	t.Run("look-alikes", func(t *testing.T) {
		for _, tc := range []struct {
			params []string
			show   string // SHOW client_encoding
		}{
			{[]string{"client_encoding", "LATIN1"}, "LATIN1"},
			{[]string{"client_encoding", "UTF-8"}, "UTF8"},
			{[]string{"client_encoding", "utf8"}, "UTF8"},
			{[]string{"client_encoding", "unicode"}, "UTF8"},
			{[]string{"client_encoding", "WIN1252"}, "WIN1252"},
			{[]string{"client_encoding", "windows-1251"}, "WIN1251"},
			{[]string{"client_encoding", "EUC_JP"}, "EUC_JP"},
			{[]string{"client_encoding", "euc-kr"}, "EUC_KR"},
			{[]string{"client_encoding", "ISO-8859-5"}, "ISO_8859_5"},
			{[]string{"client_encoding", "KOI8-R"}, "KOI8R"},
			{[]string{"client_encoding", "SQL_ASCII"}, "SQL_ASCII"},
			{[]string{"options", "-c client_encoding=LATIN1"}, "LATIN1"},
			{[]string{"options", "--client-encoding=WIN1252"}, "WIN1252"},
			{[]string{"options", "-cclient_encoding=EUC_JP"}, "EUC_JP"},
			{[]string{"application_name", "SJIS"}, "UTF8"},
			{[]string{"options", "-c application_name=client_encoding=SJIS"}, "UTF8"},
			{[]string{"options", "-c standard_conforming_strings=off"}, "UTF8"},
		} {
			c, e, _ := rawStartup(t, p, "user1", token, "", tc.params...)
			if e != nil {
				t.Errorf("look-alike startup %q refused: %s %s: %s", tc.params, e.Severity, e.Code, e.Message)
				continue
			}
			lexAssertIdentity(t, c, "user1", tc.show)
			c.Close()
		}
		c := rawSession(t, p, "user1", "options", "-c standard_conforming_strings=off")
		if got := lexValue(t, c, "SHOW standard_conforming_strings"); got != "off" {
			t.Errorf("standard_conforming_strings %s, want off", got)
		}
		cfg, err := pgx.ParseConfig(p.DSN("user1", token))
		if err != nil {
			t.Fatal(err)
		}
		cfg.RuntimeParams["client_encoding"] = "LATIN1"
		conn, err := pgx.ConnectConfig(context.Background(), cfg)
		if err != nil {
			t.Fatalf("pgx with client_encoding LATIN1: %v", err)
		}
		defer conn.Close(context.Background())
		if got := queryStrings(t, conn, "SELECT current_user || ',' || current_setting('client_encoding')"); len(got) != 1 || got[0] != "authenticated,LATIN1" {
			t.Errorf("pgx LATIN1 session: %v", got)
		}
		out, err := psql(t, p.DSN("user1", ""), token, []string{"PGCLIENTENCODING=LATIN1"}, "-c", "SHOW client_encoding")
		if err != nil || out != "LATIN1" {
			t.Errorf("psql PGCLIENTENCODING=LATIN1: %v: %s", err, out)
		}
		out, err = psql(t, p.DSN("user1", ""), token, []string{"PGOPTIONS=-c standard_conforming_strings=off"}, "-c", "SHOW standard_conforming_strings")
		if err != nil || out != "off" {
			t.Errorf("psql PGOPTIONS scs off: %v: %s", err, out)
		}
	})
}

// TestLexingControlsGuardOff: with the guard off the same spellings do
// reach the server, so the refusals of the tests here stop real paths: the
// startup spellings, and the in-session ones that look least like a SET
// (pg_settings and a view over it, which is updatable through pg_settings'
// own rules).
func TestLexingControlsGuardOff(t *testing.T) {
	// Session mode: transaction mode reads statements for state even with
	// the guard off, and so refuses these encodings (TestTxPooling*).
	p := proxytest.Start(t, pg, proxytest.GuardOff, proxytest.SessionPooling)
	for _, params := range [][]string{
		{"client_encoding", "mskanji"},
		{"Client_Encoding", "SJIS"},
		{"options", "--client-encoding=BIG5"},
		{"options", `-c client_encoding=S\JIS`},
	} {
		c := rawSession(t, p, "user1", params...)
		if got := lexValue(t, c, "SHOW client_encoding"); got != "SJIS" && got != "BIG5" {
			t.Errorf("guard off, startup %q: client_encoding %s", params, got)
		}
		c.Close()
	}
	c := rawSession(t, p, "user1")
	for _, tc := range []struct{ sql, enc string }{
		{"UPDATE pg_settings SET setting = 'LATIN1' WHERE name = 'client_encoding'", "LATIN1"},
		{"CREATE TEMP VIEW lexing_v AS SELECT * FROM pg_settings", "LATIN1"},
		{"UPDATE lexing_v SET setting = 'WIN1252' WHERE name = 'client_encoding'", "WIN1252"},
		{"SELECT set_config('client_encoding', 'EUC_JP', false)", "EUC_JP"},
		{"UPDATE lexing_v SET setting = 'SJIS' WHERE name = 'client_encoding'", "SJIS"},
	} {
		if a := lexQuery(t, c, tc.sql); len(a.errs) > 0 || !a.has("Z") {
			t.Fatalf("guard off, %s: %s (%s)", tc.sql, a, a.messages())
		}
		if got := lexValue(t, c, "SHOW client_encoding"); got != tc.enc {
			t.Errorf("guard off, after %s: client_encoding %s, want %s", tc.sql, got, tc.enc)
		}
	}
}

// lexEncodingAttacks are the ways a session could switch itself to a
// client-only encoding with one statement, and the word the refusal names.
var lexEncodingAttacks = []struct{ sql, word string }{
	{"SET client_encoding = 'SJIS'", "client_encoding"},
	{"SET client_encoding TO sjis", "client_encoding"},
	{`set CLIENT_ENCODING to "Shift_JIS"`, "client_encoding"},
	{`SET "client_encoding" = 'mskanji'`, "client_encoding"},
	{`SET U&"client\005fencoding" = 'SJIS'`, "client_encoding"},
	{"SET /* x */ client_encoding /* y */ = 'gb18030'", "client_encoding"},
	{"SET client_encoding = 'S'\n'JIS'", "client_encoding"}, // adjacent literals are one
	{`SET client_encoding = E'\123JIS'`, "client_encoding"},
	{`SET client_encoding = U&'\0053JIS'`, "client_encoding"},
	{"SET client_encoding = $$win950$$", "client_encoding"},
	{"SET client_encoding = $t$GBK$t$", "client_encoding"},
	{"SET NAMES 'BIG5'", "client_encoding"},
	{"set names 'windows936'", "client_encoding"},
	{"SET SESSION client_encoding = 'UHC'", "client_encoding"},
	{"SET SESSION client_encoding TO 'JOHAB'", "client_encoding"},
	{"SET client_encoding = 'SHIFT_JIS_2004'", "client_encoding"},
	{"SELECT set_config('client_encoding', 'SJIS', false)", "client_encoding"},
	{"SELECT pg_catalog.set_config('client_encoding', 'SJIS', false)", "client_encoding"},
	{"SELECT set_config('client_' || 'encoding', 'BIG5', false)", "set_config"},
	{"SELECT 1 FROM pg_settings WHERE set_config(name, 'SJIS', false) IS NULL", "set_config"},
	{"UPDATE pg_settings SET setting = 'SJIS' WHERE name = 'client_encoding'", "pg_settings"},
	{"update pg_catalog.pg_settings set setting = 'UHC' where name = 'client_encoding'", "pg_settings"},
	{`UPDATE "pg_settings" s SET setting = 'GBK' WHERE s.name = 'client_encoding' RETURNING s.setting`, "pg_settings"},
	{"WITH u AS (UPDATE pg_settings SET setting = 'SJIS' WHERE name = 'client_encoding' RETURNING 1) SELECT count(*) FROM u", "pg_settings"},
	{"CREATE TEMP VIEW lexing_v AS SELECT * FROM pg_settings", "pg_settings"},
	{"CREATE TEMP VIEW lexing_v AS TABLE pg_catalog.pg_settings", "pg_settings"},
	{"CREATE OR REPLACE TEMP VIEW lexing_v AS SELECT name, setting FROM pg_settings WHERE name = 'client_encoding'", "pg_settings"},
	{"CREATE TEMP VIEW lexing_v AS WITH s AS (SELECT * FROM pg_settings) SELECT * FROM s", "pg_settings"},
}

// TestLexingSetEncodingInSession: every statement that switches the
// session to a client-only encoding is refused, in the simple and the
// extended protocol, alone, inside a transaction and among other
// statements; the session keeps its encoding and its identity. The
// look-alikes pass: ASCII-safe encodings (and text in them that holds
// guard words), going back to the default, reading pg_settings, a table
// of one's own named settings.
func TestLexingSetEncodingInSession(t *testing.T) {
	for _, d := range lexDrivers {
		t.Run(d.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, d.opts...)
			token := p.Token(t, "user1")
			c := rawSession(t, p, "user1")
			t.Run("refused", func(t *testing.T) {
				for _, a := range lexEncodingAttacks {
					lexMustRefuse(t, c, a.sql, a.word, false)
					lexMustRefuse(t, c, a.sql, a.word, true)
				}
				lexMustRefuse(t, c, "SELECT 1; SET client_encoding = 'SJIS'; SELECT 2", "client_encoding", false)
				lexMustRefuse(t, c, "SET client_encoding = 'LATIN1'; SET NAMES 'SJIS'", "client_encoding", false)
				lexMustRefuse(t, c, "SELECT 1; UPDATE pg_settings SET setting = 'BIG5' WHERE name = 'client_encoding'", "pg_settings", false)
				lexAssertIdentity(t, c, "user1", "UTF8")
			})
			t.Run("refused in a transaction", func(t *testing.T) {
				for _, sql := range []string{"SET LOCAL client_encoding = 'GBK'", "SET LOCAL NAMES 'SJIS'", "SELECT set_config('client_encoding', 'SJIS', true)"} {
					if a := lexQuery(t, c, "BEGIN"); a.String() != "C:BEGIN Z" {
						t.Fatalf("BEGIN: %s", a)
					}
					if a := lexQuery(t, c, sql); a.String() != "E:42501 Z" {
						t.Errorf("%s in a transaction: %s (%s)", sql, a, a.messages())
					}
					// The server failed the transaction with the client.
					if a := lexQuery(t, c, "SELECT 1"); a.String() != "E:25P02 Z" {
						t.Errorf("after the refusal in a transaction: %s", a)
					}
					if a := lexQuery(t, c, "ROLLBACK"); a.String() != "C:ROLLBACK Z" {
						t.Fatalf("ROLLBACK: %s", a)
					}
				}
				lexAssertIdentity(t, c, "user1", "UTF8")
			})
			t.Run("refused through pgx", func(t *testing.T) {
				conn := connect(t, p, "user1", token)
				for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeExec, pgx.QueryExecModeSimpleProtocol, pgx.QueryExecModeCacheStatement} {
					for _, sql := range []string{"SET client_encoding = 'SJIS'", "SET NAMES 'BIG5'", "SELECT set_config('client_encoding', 'SJIS', false)"} {
						_, err := conn.Exec(context.Background(), sql, mode)
						var pgErr *pgconn.PgError
						if !errors.As(err, &pgErr) || pgErr.Code != "42501" {
							t.Errorf("pgx %v %q: %v, want 42501", mode, sql, err)
						}
					}
				}
				if got := queryStrings(t, conn, "SHOW client_encoding"); got[0] != "UTF8" {
					t.Errorf("pgx session now in %s", got[0])
				}
			})
			t.Run("look-alikes", func(t *testing.T) {
				lexMustPass(t, c, "CREATE TEMP TABLE lexing_t (id int, name text, role text, note text, path text)")
				lexMustPass(t, c, "INSERT INTO lexing_t VALUES (1, 'n', 'r', 'x', 'p')")
				if a := lexMustPass(t, c, "SET client_encoding = 'LATIN1'"); !a.has("S:client_encoding=LATIN1") {
					t.Errorf("SET client_encoding LATIN1: %s", a)
				}
				// LATIN1 bytes, with the words the guard reads for around them.
				a := lexMustPass(t, c, "UPDATE lexing_t SET name = 'Zo\xeb', role = 'M\xfcller' WHERE id = 1 RETURNING name, role")
				if !a.has("D:Zo\xeb,M\xfcller") {
					t.Errorf("LATIN1 round trip: %q", a.seq)
				}
				if got := lexValue(t, c, "SELECT encode(convert_to(name || role, 'UTF8'), 'hex') FROM lexing_t WHERE id = 1"); got != hex.EncodeToString([]byte("ZoëMüller")) {
					t.Errorf("stored as %s", got)
				}
				lexMustPass(t, c, "UPDATE lexing_t SET name = 'Zo\xeb M\xfcller', note = 'caf\xe9 cr\xe8me br\xfbl\xe9e', role = 'Z\xfcrich' WHERE id = 1")
				lexMustPass(t, c, "SELECT 'SET ROLE admin \xe9t\xe9' AS role FROM lexing_t WHERE note <> '\xe0 la fa\xe7on'")
				lexAssertIdentity(t, c, "user1", "LATIN1")
				for _, tc := range []struct{ sql, enc string }{
					{"SET NAMES DEFAULT", "UTF8"},
					{"SET client_encoding = 'WIN1252'", "WIN1252"},
					{"RESET client_encoding", "UTF8"},
					{"SET NAMES 'EUC_JP'", "EUC_JP"},
					{"SET client_encoding TO DEFAULT", "UTF8"},
					{"SET client_encoding = 'ISO-8859-1'", "LATIN1"},
					{"SET NAMES", "UTF8"},
					{"SET client_encoding = 'KOI8-R'", "KOI8R"},
					{"SET NAMES 'UTF8'", "UTF8"},
				} {
					lexMustPass(t, c, tc.sql)
					if got := lexValue(t, c, "SHOW client_encoding"); got != tc.enc {
						t.Errorf("after %s: client_encoding %s, want %s", tc.sql, got, tc.enc)
					}
				}
				for _, sql := range []string{"SET client_encoding = 'LATIN1'", "SET NAMES 'UTF8'"} {
					if a := lexExtended(t, c, sql); len(a.errs) > 0 {
						t.Errorf("extended %s: %s (%s)", sql, a, a.messages())
					}
				}
				if got := lexValue(t, c, "SELECT setting FROM pg_settings WHERE name = 'client_encoding'"); got != "UTF8" {
					t.Errorf("pg_settings says %s", got)
				}
				lexMustPass(t, c, "SELECT name, setting FROM pg_catalog.pg_settings WHERE name IN ('role', 'client_encoding') ORDER BY name")
				lexMustPass(t, c, "CREATE TEMP TABLE settings (name text, setting text)")
				lexMustPass(t, c, "INSERT INTO settings VALUES ('client_encoding', 'UTF8')")
				lexMustPass(t, c, "UPDATE settings SET setting = 'SJIS' WHERE name = 'client_encoding'")
				lexMustPass(t, c, "CREATE TEMP VIEW lexing_settings AS SELECT * FROM settings")
				lexMustPass(t, c, "UPDATE lexing_settings SET setting = 'BIG5' WHERE name = 'client_encoding'")
				lexMustPass(t, c, "SELECT 'SET client_encoding = ''SJIS''', 'set_config(''client_encoding'', ''SJIS'', false)'")
				lexMustPass(t, c, "SET application_name = 'SJIS'")
				lexMustPass(t, c, "UPDATE lexing_t SET note = 'SET NAMES ''BIG5''' WHERE id = 1")
				if got := lexValue(t, c, "SELECT setting FROM settings"); got != "BIG5" {
					t.Errorf("own settings table: %s", got)
				}
				lexAssertIdentity(t, c, "user1", "UTF8")
			})
		})
	}
}

// TestLexingServerDefaults: an encoding the guard cannot read that the
// server applies by itself (a database default, a role-in-database default)
// ends the startup with a clear error before any statement is relayed; the
// ASCII-safe and scs-off defaults work, and the guard reads with them.
func TestLexingServerDefaults(t *testing.T) {
	ctx := context.Background()
	dbs := map[string]string{
		"lexing_db_sjis":   "ALTER DATABASE lexing_db_sjis SET client_encoding = 'SJIS'",
		"lexing_db_role":   "ALTER ROLE authenticator IN DATABASE lexing_db_role SET client_encoding = 'BIG5'",
		"lexing_db_latin1": "ALTER DATABASE lexing_db_latin1 SET client_encoding = 'LATIN1'",
		"lexing_db_scsoff": "ALTER DATABASE lexing_db_scsoff SET standard_conforming_strings = off",
	}
	dropAll := func() {
		for db := range dbs {
			if err := pg.Exec(ctx, "postgres", "DROP DATABASE IF EXISTS "+db+" WITH (FORCE)"); err != nil {
				t.Errorf("drop %s: %v", db, err)
			}
		}
	}
	dropAll()
	t.Cleanup(dropAll) // after the proxies' cleanups: they close their pools first
	for db, set := range dbs {
		if err := pg.Exec(ctx, "postgres", "CREATE DATABASE "+db); err != nil {
			t.Fatal(err)
		}
		if err := pg.Exec(ctx, "postgres", set); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range lexDrivers {
		t.Run(d.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, append([]proxytest.Option{func(c *proxytest.Setup) { c.Databases = []string{"*"} }}, d.opts...)...)
			token := p.Token(t, "user1")
			for db, enc := range map[string]string{"lexing_db_sjis": "SJIS", "lexing_db_role": "BIG5"} {
				c, e, _ := rawStartup(t, p, "user1", token, db)
				if c != nil {
					t.Errorf("a session to %s opened (client_encoding %s)", db, lexValue(t, c, "SHOW client_encoding"))
					continue
				}
				if e.Severity != "FATAL" || e.Code != "42501" || !strings.Contains(e.Message, "client_encoding") || !strings.Contains(e.Message, enc) {
					t.Errorf("%s: %s %s: %s; want FATAL 42501 naming client_encoding %s", db, e.Severity, e.Code, e.Message, enc)
				}
				// pgx sees the same clear error.
				cfg, _ := pgx.ParseConfig(p.DSN("user1", token))
				cfg.Database = db
				if conn, err := pgx.ConnectConfig(ctx, cfg); err == nil {
					conn.Close(ctx)
					t.Errorf("pgx connected to %s", db)
				} else if !strings.Contains(err.Error(), "client_encoding") {
					t.Errorf("pgx to %s: %v", db, err)
				}
			}

			c, e, _ := rawStartup(t, p, "user1", token, "lexing_db_latin1")
			if e != nil {
				t.Fatalf("LATIN1 database default refused: %s", e.Message)
			}
			lexAssertIdentity(t, c, "user1", "LATIN1")
			a := lexMustPass(t, c, "SELECT 'Zo\xeb' AS role, 'SET ROLE admin' AS note")
			if !a.has("D:Zo\xeb,SET ROLE admin") {
				t.Errorf("LATIN1 database: %q", a.seq)
			}
			lexMustRefuse(t, c, "SELECT 'Zo\xeb'; SET ROLE admin", "role", false)
			lexMustRefuse(t, c, "SET client_encoding = 'SJIS'", "client_encoding", false)
			lexAssertIdentity(t, c, "user1", "LATIN1")

			c, e, _ = rawStartup(t, p, "user1", token, "lexing_db_scsoff")
			if e != nil {
				t.Fatalf("scs-off database default refused: %s", e.Message)
			}
			if got := lexValue(t, c, "SHOW standard_conforming_strings"); got != "off" {
				t.Fatalf("standard_conforming_strings %s", got)
			}
			if got := lexValue(t, c, `SELECT 'a\\b' AS role`); got != `a\b` {
				t.Errorf(`'a\\b' with scs off: %s`, got)
			}
			lexMustRefuse(t, c, `SELECT '\' ; RESET ROLE; SELECT ' -- '`, "", false)
			lexMustRefuse(t, c, `SELECT 'x\', ' ; SET ROLE admin; -- '`, "", false)
			lexAssertIdentity(t, c, "user1", "UTF8")
		})
	}
}

// lexHiddenSetup creates, as superuser, the functions a DBA might offer to
// switch the encoding or the string reading of a session (the guard cannot
// see into them), and a table a hidden statement writes who it ran as into.
func lexHiddenSetup(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	if err := pg.Exec(ctx, demo.Database, `
		DROP TABLE IF EXISTS public.lexing_log;
		CREATE TABLE public.lexing_log (who text, tag text);
		GRANT INSERT, SELECT ON public.lexing_log TO PUBLIC;
		CREATE OR REPLACE FUNCTION public.lexing_use_encoding(e text) RETURNS text LANGUAGE sql
			AS $$ SELECT set_config('client_encoding', e, false) $$;
		CREATE OR REPLACE FUNCTION public.lexing_use_scs(v text) RETURNS text LANGUAGE sql
			AS $$ SELECT set_config('standard_conforming_strings', v, false) $$;
		GRANT EXECUTE ON FUNCTION public.lexing_use_encoding(text), public.lexing_use_scs(text) TO authenticated;`); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = pg.Exec(context.Background(), demo.Database, `
			DROP TABLE IF EXISTS public.lexing_log;
			DROP FUNCTION IF EXISTS public.lexing_use_encoding(text);
			DROP FUNCTION IF EXISTS public.lexing_use_scs(text);`)
	})
}

// lexLogged returns who a hidden statement of the tag ran as.
func lexLogged(t *testing.T, su *pgx.Conn, tag string) string {
	t.Helper()
	var who string
	if err := su.QueryRow(context.Background(), "SELECT coalesce(string_agg(who, ','), '') FROM public.lexing_log WHERE tag = $1", tag).Scan(&who); err != nil {
		t.Fatal(err)
	}
	return who
}

// lexHiddenAttacks hide a statement behind a valid UTF-8 character followed
// by a backslash: read as UTF-8 the backslash escapes the quote and all is
// one literal; read in the encoding, a multibyte character swallows the
// backslash, the literal ends, and the rest runs. "Á\" is C3 81 5C, which
// SJIS reads as a half-width kana and the character 81 5C; "中\" is E4 B8 AD
// 5C, which BIG5, GBK and GB18030 read as E4 B8 and AD 5C; "€\" is E2 82 AC
// 5C, which GBK and GB18030 read as E2 82 and AC 5C. %s is where the hidden
// statement goes; it records who it ran as in lexing_log.
var lexHiddenEncodings = []struct{ enc, prefix string }{
	{"SJIS", "Á"}, {"SHIFT_JIS_2004", "Á"}, {"BIG5", "中"}, {"GBK", "€"}, {"GB18030", "中"},
}

var lexHiddenStatements = []struct{ name, sql string }{
	{"reset role", "RESET ROLE"},
	{"set role", "SET ROLE admin"},
	{"alter role", "ALTER ROLE authenticator PASSWORD $$lexing-x$$"},
	{"claims", "SET jwt.claims.sub = $$user2$$"},
}

// lexHidden is a Query that hides stmt behind prefix: one harmless SELECT
// read as UTF-8.
func lexHidden(prefix, stmt, tag string) string {
	return fmt.Sprintf("SELECT E'%s\\'; %s; INSERT INTO public.lexing_log SELECT current_user || $$/$$ || current_setting($$jwt.claims.sub$$), $$%s$$; -- '", prefix, stmt, tag)
}

// TestLexingHiddenEncodingSwitch: a client switches its encoding where the
// guard cannot see (a function the database offers) and pipelines, in the
// same write, a statement that hides an identity change behind bytes the
// new encoding reads otherwise. The hidden statement never runs, and the
// session ends (FATAL 42501 naming client_encoding) without any later
// statement of the client being answered. With the guard off the same
// pipeline does run the hidden statement: the attack is real.
func TestLexingHiddenEncodingSwitch(t *testing.T) {
	lexHiddenSetup(t)
	su := superConn(t)
	lexGuardLoginState(t, su)
	n := 0
	for _, d := range lexDrivers {
		t.Run(d.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, d.opts...)
			for _, e := range lexHiddenEncodings {
				for _, h := range lexHiddenStatements {
					n++
					tag := fmt.Sprintf("enc-%d", n)
					app := "lexing_" + tag
					t.Run(e.enc+" "+h.name, func(t *testing.T) {
						c := rawSession(t, p, "user1", "application_name", app)
						c.send(t,
							&pgproto3.Query{String: "SELECT public.lexing_use_encoding('" + e.enc + "')"},
							&pgproto3.Query{String: lexHidden(e.prefix, h.sql, tag)},
							&pgproto3.Query{String: "SELECT current_user"},
						)
						a := lexRead(t, c, 3)
						lexAssertEndedOnEncoding(t, a, e.enc)
						lexWaitGone(t, su, app)
						if who := lexLogged(t, su, tag); who != "" {
							t.Errorf("BUG: the hidden statement ran, as %s", who)
						}
						// The session ended before the guard's refusal of the
						// hidden statement could be told: sent alone, it is refused.
						c = rawSession(t, p, "user1")
						lexMustRefuse(t, c, lexHidden(e.prefix, h.sql, tag), "", false)
						lexMustRefuse(t, c, lexHidden(e.prefix, h.sql, tag), "", true)
					})
					n++
					tag = fmt.Sprintf("enc-%d", n)
					app = "lexing_" + tag
					t.Run(e.enc+" "+h.name+" extended", func(t *testing.T) {
						// In one batch the server reports the new encoding only
						// at its end (Sync): the hidden Parse is read in it. The
						// guard refuses it, the batch fails, and with it the
						// switch: the session goes on in UTF8.
						hidden := fmt.Sprintf("SELECT E'%s\\', set_config($$role$$, $$admin$$, false), $$%s$$ -- '", e.prefix, tag)
						c := rawSession(t, p, "user1")
						c.send(t,
							&pgproto3.Parse{Query: "SELECT public.lexing_use_encoding('" + e.enc + "')"}, &pgproto3.Bind{}, &pgproto3.Execute{},
							&pgproto3.Parse{Query: hidden}, &pgproto3.Bind{}, &pgproto3.Execute{},
							&pgproto3.Sync{},
							&pgproto3.Query{String: "SELECT current_user || ',' || current_setting('client_encoding')"},
						)
						a := lexRead(t, c, 2)
						if want := "1 2 D:" + e.enc + " C:SELECT 1 E:42501 Z T D:authenticated,UTF8 C:SELECT 1 Z"; a.String() != want {
							t.Errorf("got %s (%s), want %s", a, a.messages(), want)
						}
						// With a Sync between, the switch is reported before the
						// hidden Parse is answered: the session ends.
						c = rawSession(t, p, "user1", "application_name", app)
						c.send(t,
							&pgproto3.Parse{Query: "SELECT public.lexing_use_encoding('" + e.enc + "')"}, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{},
							&pgproto3.Parse{Query: hidden}, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{},
							&pgproto3.Query{String: "SELECT current_user"},
						)
						lexAssertEndedOnEncoding(t, lexRead(t, c, 3), e.enc)
						lexWaitGone(t, su, app)
					})
				}
			}
		})
	}

	t.Run("guard off: the attacks are real", func(t *testing.T) {
		p := proxytest.Start(t, pg, proxytest.GuardOff, proxytest.SessionPooling)
		for _, e := range lexHiddenEncodings {
			n++
			tag := fmt.Sprintf("enc-%d", n)
			c := rawSession(t, p, "user1")
			c.send(t,
				&pgproto3.Query{String: "SELECT public.lexing_use_encoding('" + e.enc + "')"},
				&pgproto3.Query{String: lexHidden(e.prefix, "RESET ROLE", tag)},
				&pgproto3.Query{String: "SELECT current_user"},
			)
			if a := lexRead(t, c, 3); !a.has("D:authenticator") {
				t.Errorf("%s: the hidden RESET ROLE did not run: %s (%s)", e.enc, a, a.messages())
			}
			if who := lexLogged(t, su, tag); who != "authenticator/user1" {
				t.Errorf("%s: hidden statement logged %q", e.enc, who)
			}
			c = rawSession(t, p, "user1")
			c.send(t,
				&pgproto3.Parse{Query: "SELECT public.lexing_use_encoding('" + e.enc + "')"}, &pgproto3.Bind{}, &pgproto3.Execute{},
				&pgproto3.Parse{Query: fmt.Sprintf("SELECT E'%s\\', set_config($$role$$, $$admin$$, false), $$x$$ -- '", e.prefix)}, &pgproto3.Bind{}, &pgproto3.Execute{},
				&pgproto3.Sync{},
				&pgproto3.Query{String: "SELECT current_user"},
			)
			if a := lexRead(t, c, 2); !a.has("D:admin") {
				t.Errorf("%s extended: the hidden set_config did not run: %s (%s)", e.enc, a, a.messages())
			}
		}
	})
}

// lexAssertEndedOnEncoding checks that a pipeline ended with the FATAL for
// the server's client_encoding, answering nothing after the switch.
func lexAssertEndedOnEncoding(t *testing.T, a lexAnswers, enc string) {
	t.Helper()
	if a.fatal == nil || a.fatal.Code != "42501" || !strings.Contains(a.fatal.Message, "client_encoding") || !strings.Contains(a.fatal.Message, enc) {
		t.Fatalf("want FATAL 42501 naming client_encoding %s, got %s (%s)", enc, a, a.messages())
	}
	if !a.closed || a.seq[len(a.seq)-1] != "F:42501" {
		t.Errorf("answers after the FATAL: %s", a)
	}
	if !a.has("D:" + enc) {
		t.Errorf("the switch itself was not answered: %s", a)
	}
	for _, s := range a.seq {
		if s == "Z" || s == "D:authenticated" || s == "D:authenticator" || s == "D:admin" {
			t.Errorf("a statement after the switch was answered: %s", a)
			break
		}
	}
}

// TestLexingStandardConformingStrings: standard_conforming_strings off is
// the client's to choose (at startup, by SET, by a function pipelined ahead
// of a statement); ordinary statements with backslashes work either way and
// return what PostgreSQL returns, and the statements that hide an identity
// change behind a backslash one reading takes for an escape are refused.
func TestLexingStandardConformingStrings(t *testing.T) {
	lexHiddenSetup(t)
	su := superConn(t)
	lexGuardLoginState(t, su)
	scsAttacks := []string{
		`SELECT 'x\', ' ; RESET ROLE; -- '`,
		`SELECT 'x\', ' ; SET ROLE admin; -- '`,
		`SELECT 'x\', ' ; SET jwt.claims.sub = $$user2$$; -- '`,
		`SELECT 'x\', ' ; ALTER ROLE authenticator PASSWORD $$x$$; -- '`,
		`SELECT 'x\', ' ; SELECT set_config($$role$$, $$admin$$, false); -- '`,
		`SELECT '\' ; RESET ROLE; SELECT ' -- '`,
		`SELECT '\' ; SET ROLE admin; SELECT ' -- '`,
		`SELECT 1 WHERE 'a\' = ' ; SET ROLE admin; -- '`,
		`UPDATE lexing_t SET note = 'x\', role = ' ; SET ROLE admin; -- '`,
	}
	for _, d := range lexDrivers {
		t.Run(d.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, d.opts...)
			for _, mode := range []string{"startup option", "SET", "default on"} {
				t.Run(mode, func(t *testing.T) {
					var c *rawClient
					scsOff := mode != "default on"
					switch mode {
					case "startup option":
						c = rawSession(t, p, "user1", "options", "-c standard_conforming_strings=off")
					case "SET":
						c = rawSession(t, p, "user1")
						if a := lexMustPass(t, c, "SET standard_conforming_strings = off"); !a.has("S:standard_conforming_strings=off") {
							t.Fatalf("SET standard_conforming_strings = off: %s", a)
						}
					default:
						c = rawSession(t, p, "user1")
					}
					lexMustPass(t, c, "CREATE TEMP TABLE lexing_t (id int, name text, role text, note text, path text)")
					lexMustPass(t, c, "INSERT INTO lexing_t VALUES (1, 'n', 'r', 'x', 'p')")
					for _, sql := range scsAttacks {
						lexMustRefuse(t, c, sql, "", false)
						lexMustRefuse(t, c, sql, "", true)
					}
					// Look-alikes, each with the words the guard reads for
					// around it, and the value PostgreSQL gives it.
					type look struct{ sql, on, off string }
					for _, l := range []look{
						{`SELECT 'a\\b' AS role`, `a\\b`, `a\b`},
						{`SELECT E'\\' AS role`, `\`, `\`},
						{`UPDATE lexing_t SET path = E'C:\\temp\\' WHERE id = 1 RETURNING path`, `C:\temp\`, `C:\temp\`},
						{`UPDATE lexing_t SET note = E'it\'s' WHERE id = 1 RETURNING note`, "it's", "it's"},
						{`UPDATE lexing_t SET role = 'a\b' || 'c' WHERE id = 1 RETURNING role`, `a\bc`, "a\bc"},
						{`UPDATE lexing_t SET note = 'SET ROLE admin', path = '\\' WHERE id = 1 RETURNING path`, `\\`, `\`},
					} {
						want := l.on
						if scsOff {
							want = l.off
						}
						a := lexMustPass(t, c, l.sql)
						if !a.has("D:" + want) {
							t.Errorf("%s (scs off %v): %s, want %q", l.sql, scsOff, a, want)
						}
					}
					// Only scs on can read these; only scs off those.
					if scsOff {
						a := lexMustPass(t, c, `UPDATE lexing_t SET path = 'C:\\temp\\', role = 'it\'s' WHERE id = 1 RETURNING path, role`)
						if !a.has(`D:C:\temp\,it's`) {
							t.Errorf("scs off: %s", a)
						}
					} else {
						a := lexMustPass(t, c, `UPDATE lexing_t SET path = 'C:\temp\', role = 'it''s' WHERE id = 1 RETURNING path, role`)
						if !a.has(`D:C:\temp\,it's`) {
							t.Errorf("scs on: %s", a)
						}
					}
					lexAssertIdentity(t, c, "user1", "UTF8")
					want := "on"
					if scsOff {
						want = "off"
					}
					if got := lexValue(t, c, "SHOW standard_conforming_strings"); got != want {
						t.Errorf("standard_conforming_strings %s, want %s", got, want)
					}
				})
			}
			t.Run("function pipelined", func(t *testing.T) {
				for _, tc := range []struct{ start, to, attack string }{
					{"on", "off", `SELECT 'x\', ' ; RESET ROLE; INSERT INTO public.lexing_log SELECT current_user, $$%s$$; -- '`},
					{"on", "off", `SELECT 'x\', ' ; SET ROLE admin; INSERT INTO public.lexing_log SELECT current_user, $$%s$$; -- '`},
					{"off", "on", `SELECT '\' ; SET ROLE admin; INSERT INTO public.lexing_log SELECT current_user, $$%s$$; SELECT ' -- '`},
					{"off", "on", `SELECT '\' ; RESET ROLE; INSERT INTO public.lexing_log SELECT current_user, $$%s$$; SELECT ' -- '`},
				} {
					n := time.Now().UnixNano()
					tag := fmt.Sprintf("scs-%d", n)
					c := rawSession(t, p, "user1", "options", "-c standard_conforming_strings="+tc.start)
					c.send(t,
						&pgproto3.Query{String: "SELECT public.lexing_use_scs('" + tc.to + "')"},
						&pgproto3.Query{String: fmt.Sprintf(tc.attack, tag)},
						&pgproto3.Query{String: "SELECT current_user"},
					)
					a := lexRead(t, c, 3)
					want := "T D:" + tc.to + " C:SELECT 1 S:standard_conforming_strings=" + tc.to + " Z E:42501 Z T D:authenticated C:SELECT 1 Z"
					if a.String() != want {
						t.Errorf("scs %s→%s %q: %s (%s), want %s", tc.start, tc.to, tc.attack, a, a.messages(), want)
					}
					if who := lexLogged(t, su, tag); who != "" {
						t.Errorf("BUG: the hidden statement ran as %s", who)
					}
					lexAssertIdentity(t, c, "user1", "UTF8")
				}
			})
		})
	}
	t.Run("guard off: the attacks are real", func(t *testing.T) {
		p := proxytest.Start(t, pg, proxytest.GuardOff, proxytest.SessionPooling)
		c := rawSession(t, p, "user1")
		c.send(t,
			&pgproto3.Query{String: "SELECT public.lexing_use_scs('off')"},
			&pgproto3.Query{String: `SELECT 'x\', ' ; RESET ROLE; -- '`},
			&pgproto3.Query{String: "SELECT current_user"},
		)
		if a := lexRead(t, c, 3); !a.has("D:authenticator") {
			t.Errorf("the hidden RESET ROLE did not run: %s", a)
		}
	})
}

// lexHex is the hex of s's bytes, as encode(..., 'hex') gives it.
func lexHex(s string) string { return hex.EncodeToString([]byte(s)) }

// TestLexingClaimsByteExact: claims that are not ASCII reach the settings
// byte-exact whatever client_encoding the client chose (they travel as
// bytea), and so does the signature over them: read back on the server
// side as UTF-8 bytes, in UTF8, LATIN1 (which cannot even hold 東京) and
// EUC_JP sessions, set at startup or mid-session, and again after the
// proxy re-installs them on DISCARD ALL.
func TestLexingClaimsByteExact(t *testing.T) {
	const name = "Zoë 東京 😀 \\ ' \""
	const sub = "zoë-東京-😀"
	p := proxytest.Start(t, pg, withSigner)
	token, err := p.Issuer.Mint(devissuer.TokenRequest{Subject: sub, Extra: map[string]any{"name": name, "latin": "Zoë"}})
	if err != nil {
		t.Fatal(err)
	}
	check := func(t *testing.T, c *rawClient, enc string) {
		t.Helper()
		if got := lexValue(t, c, "SELECT encode(convert_to(current_setting('jwt.claims.name'), 'UTF8'), 'hex')"); got != lexHex(name) {
			t.Errorf("%s: jwt.claims.name is %s, want %s", enc, got, lexHex(name))
		}
		if got := lexValue(t, c, "SELECT encode(convert_to(current_setting('jwt.claims.sub'), 'UTF8'), 'hex')"); got != lexHex(sub) {
			t.Errorf("%s: jwt.claims.sub is %s, want %s", enc, got, lexHex(sub))
		}
		if got := lexValue(t, c, "SELECT encode(convert_to(auth.user_id(), 'UTF8'), 'hex')"); got != lexHex(sub) {
			t.Errorf("%s: auth.user_id() is %s, want %s", enc, got, lexHex(sub))
		}
		raw, err := hex.DecodeString(lexValue(t, c, "SELECT encode(convert_to(current_setting('request.jwt.claims'), 'UTF8'), 'hex')"))
		if err != nil {
			t.Fatal(err)
		}
		var claims map[string]any
		if err := json.Unmarshal(raw, &claims); err != nil || claims["name"] != name || claims["sub"] != sub {
			t.Errorf("%s: request.jwt.claims is %s (%v)", enc, raw, err)
		}
		// The signed layer reads its own sub: no error, no other user's rows.
		if got := lexValue(t, c, "SELECT count(*) FROM signed_notes"); got != "0" {
			t.Errorf("%s: signed_notes shows %s rows", enc, got)
		}
		latin := map[string]string{"UTF8": "Zoë", "LATIN1": "Zo\xeb", "EUC_JP": "Zo\x8f\xab\xb3"}[enc]
		if got := lexValue(t, c, "SELECT current_setting('jwt.claims.latin')"); got != latin {
			t.Errorf("%s: jwt.claims.latin arrives as %q, want %q", enc, got, latin)
		}
		if got := lexValue(t, c, "SELECT current_user || ',' || current_setting('client_encoding')"); got != "authenticated,"+enc {
			t.Errorf("session is %s", got)
		}
	}
	for _, d := range lexDrivers {
		t.Run(d.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, append([]proxytest.Option{withSigner}, d.opts...)...)
			token, err := p.Issuer.Mint(devissuer.TokenRequest{Subject: sub, Extra: map[string]any{"name": name, "latin": "Zoë"}})
			if err != nil {
				t.Fatal(err)
			}
			for _, enc := range []string{"UTF8", "LATIN1", "EUC_JP"} {
				t.Run(enc+" at startup", func(t *testing.T) {
					c, e, _ := rawStartup(t, p, sub, token, "", "client_encoding", enc)
					if e != nil {
						t.Fatalf("startup refused: %s %s: %s", e.Severity, e.Code, e.Message)
					}
					check(t, c, enc)
					for _, reset := range []string{"DISCARD ALL", "RESET ALL", "RESET ROLE", "SELECT 1; RESET ALL"} {
						if a := lexQuery(t, c, reset); len(a.errs) > 0 {
							t.Fatalf("%s: %s", reset, a.messages())
						}
						check(t, c, enc) // the startup encoding survives the reset
					}
				})
				t.Run(enc+" set mid-session", func(t *testing.T) {
					c, e, _ := rawStartup(t, p, sub, token, "")
					if e != nil {
						t.Fatalf("startup refused: %s %s: %s", e.Severity, e.Code, e.Message)
					}
					lexMustPass(t, c, "SET client_encoding = '"+enc+"'")
					check(t, c, enc)
					lexMustPass(t, c, "SET NAMES '"+enc+"'; RESET ROLE")
					check(t, c, enc)
					lexMustPass(t, c, "DISCARD ALL") // back to UTF8, claims re-installed
					check(t, c, "UTF8")
				})
			}
		})
	}
	t.Run("pgx", func(t *testing.T) {
		conn := connect(t, p, "user1", token)
		var got, uid string
		if err := conn.QueryRow(context.Background(), "SELECT current_setting('jwt.claims.name'), auth.user_id()").Scan(&got, &uid); err != nil || got != name || uid != sub {
			t.Errorf("pgx: %q %q %v", got, uid, err)
		}
	})
}

// Dollar-quote tags. A dollar-quoted literal ends only at a tag equal to its
// opening tag, and the server compares tags after it has converted the
// statement to the database's encoding, where different characters of the
// client's can become one ("¦" and "￤" are both 8F A2 C3 in EUC_JP) and
// which the guard's readings (every non-ASCII character standing for one)
// cannot tell apart. So "SELECT $é$ x $è$ || ' $é$; SET ROLE admin; -- '"
// in a LATIN1 session was, to the guard, one SELECT of two literals and, to
// the server, a SELECT of one dollar-quoted literal that ends at the second
// $é$, then SET ROLE admin. Tags with non-ASCII bytes are now refused in
// statements the guard parses; the look-alike that must pass uses an ASCII
// tag around the same non-ASCII text.
func TestLexingDollarQuoteTags(t *testing.T) {
	su := superConn(t)
	lexGuardLoginState(t, su)
	for _, tc := range []struct {
		name, enc string
		a, b      string // two different characters, in the encoding
	}{
		{"LATIN1", "LATIN1", "\xe9", "\xe8"},
		{"WIN1252", "WIN1252", "\x80", "\xe9"},
		{"EUC_JP", "EUC_JP", "\xa4\xa2", "\xa4\xa4"},
	} {
		for _, h := range []struct{ stmt, word string }{
			{"SET ROLE admin", "role"},
			{"RESET ROLE", "string_reading"},
			{"SET jwt.claims.sub = $$user2$$", "jwt.claims.sub"},
		} {
			for _, d := range lexDrivers {
				t.Run(tc.name+" "+h.stmt+" "+d.name, func(t *testing.T) {
					p := proxytest.Start(t, pg, d.opts...)
					c := rawSession(t, p, "user1", "client_encoding", tc.enc)
					sql := fmt.Sprintf("SELECT $%s$ x $%s$ || ' $%s$; %s; -- '", tc.a, tc.b, tc.a, h.stmt)
					a := lexQuery(t, c, sql)
					if a.String() != "E:42501 Z" {
						t.Errorf("BUG: %q in a %s session passed the guard: %s (%s)", sql, tc.enc, a, a.messages())
					}
					if got := lexValue(t, c, "SELECT current_user || ',' || current_setting('jwt.claims.sub')"); got != "authenticated,user1" {
						t.Errorf("BUG: the session is now %s", got)
					}
				})
			}
		}
	}
	// The same through SET client_encoding mid-session, in the extended
	// protocol, and with the look-alike that must pass: an ASCII tag.
	p := proxytest.Start(t, pg)
	c := rawSession(t, p, "user1")
	lexMustPass(t, c, "SET client_encoding = 'LATIN1'")
	a := lexExtended(t, c, "SELECT $\xe9$ x $\xe8$ || ' $\xe9$ || set_config($$role$$, $$admin$$, false) -- '")
	if a.String() != "E:42501 Z" {
		t.Errorf("BUG: extended: %s (%s)", a, a.messages())
	}
	if got := lexValue(t, c, "SELECT current_user"); got != "authenticated" {
		t.Errorf("BUG: the session is now %s", got)
	}
	a = lexMustPass(t, c, "SELECT $x$ SET ROLE admin \xe9\xe8 $x$ AS role")
	if !a.has("D: SET ROLE admin \xe9\xe8 ") {
		t.Errorf("look-alike: %s", a)
	}
	if a := lexQuery(t, c, "SELECT $\xe9$ SET ROLE admin $\xe8$ $\xe9$ AS role"); !strings.Contains(a.messages(), "non-ASCII tags") {
		t.Errorf("a non-ASCII tag: %s (%s), want the guard's refusal", a, a.messages())
	}

	// The same without any encoding the client chose: a UTF8 client on a
	// database whose encoding is EUC_JP. The server converts the statement
	// to EUC_JP before it lexes it, and "¦" (U+00A6) and "￤" (U+FFE4) both
	// become 8F A2 C3: two tags to the guard, one to the server.
	ctx := context.Background()
	const db = "lexing_db_eucjp"
	drop := func() {
		if err := pg.Exec(ctx, "postgres", "DROP DATABASE IF EXISTS "+db+" WITH (FORCE)"); err != nil {
			t.Errorf("drop %s: %v", db, err)
		}
	}
	drop()
	t.Cleanup(drop)
	if err := pg.Exec(ctx, "postgres", "CREATE DATABASE "+db+" ENCODING 'EUC_JP' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"); err != nil {
		t.Fatal(err)
	}
	p = proxytest.Start(t, pg, func(c *proxytest.Setup) { c.Databases = []string{"*"} })
	c, e, _ := rawStartup(t, p, "user1", p.Token(t, "user1"), db, "client_encoding", "UTF8")
	if e != nil {
		t.Fatalf("UTF8 session on an EUC_JP database: %s", e.Message)
	}
	lexAssertIdentity(t, c, "user1", "UTF8")
	sql := "SELECT $¦$ x $￤$, 1; SET ROLE admin; SELECT $￤$ y $¦$"
	if a := lexQuery(t, c, sql); a.String() != "E:42501 Z" {
		t.Errorf("BUG: %q on an EUC_JP database passed the guard: %s (%s)", sql, a, a.messages())
	}
	if got := lexValue(t, c, "SELECT current_user"); got != "authenticated" {
		t.Errorf("BUG: the session is now %s", got)
	}
}

// A statement longer than 4 KB is judged in a helper process
// (session/guard_isolate.go). It once travelled there as a JSON string, and
// encoding/json replaces every byte that is not UTF-8 with U+FFFD (EF BF
// BD), so the helper judged other bytes than the server runs, and the
// client-only readings it computed were not those of the statement; it now
// travels as bytes. "\xa1\x81\\" is, to
// SJIS, a half-width kana and the character 81 5C: the backslash is
// swallowed. Judged in process, the guard finds the SJIS reading and
// refuses; in the helper the bytes are EF BF BD EF BF BD 5C, which no
// reading pairs with the backslash, and the statement passes. A client
// that switches to SJIS with a function the database offers and pipelines
// such a statement runs what it hides.
func TestLexingLongStatementReadings(t *testing.T) {
	lexHiddenSetup(t)
	su := superConn(t)
	lexGuardLoginState(t, su)
	pad := strings.Repeat("x", 5000)
	for _, d := range lexDrivers {
		t.Run(d.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, d.opts...)
			c := rawSession(t, p, "user1")
			for _, long := range []bool{false, true} {
				filler := "x"
				if long {
					filler = pad
				}
				// The guard reads every reading whatever the session's
				// encoding: the verdict must not depend on the length.
				sql := "SELECT '" + filler + "', E'\xa1\x81\\'; SET ROLE admin; -- '"
				if a := lexQuery(t, c, sql); a.String() != "E:42501 Z" {
					t.Errorf("BUG: long %v: %s (%s), want E:42501 Z", long, a, a.messages())
				}
				if a := lexExtended(t, c, "SELECT '"+filler+"', E'\xa1\x81\\', set_config($$role$$, $$admin$$, false) -- '"); a.String() != "E:42501 Z" {
					t.Errorf("BUG: long %v, extended: %s (%s), want E:42501 Z", long, a, a.messages())
				}
			}
			lexAssertIdentity(t, c, "user1", "UTF8")

			// The attack: in one extended batch the server reports the
			// switch only at Sync, after running everything before it.
			tag := fmt.Sprintf("long-%d", time.Now().UnixNano())
			c = rawSession(t, p, "user1")
			c.send(t,
				&pgproto3.Parse{Query: "SELECT public.lexing_use_encoding('SJIS')"}, &pgproto3.Bind{}, &pgproto3.Execute{},
				&pgproto3.Parse{Query: "SELECT '" + pad + "', E'\xa1\x81\\', set_config($$role$$, $$admin$$, false) -- '"}, &pgproto3.Bind{}, &pgproto3.Execute{},
				&pgproto3.Parse{Query: "INSERT INTO public.lexing_log SELECT current_user, '" + tag + "'"}, &pgproto3.Bind{}, &pgproto3.Execute{},
				&pgproto3.Sync{},
			)
			a := lexRead(t, c, 1)
			if who := lexLogged(t, su, tag); who != "" {
				t.Errorf("BUG: a statement of the session ran as %s (answers: %s)", who, a)
			}

			// In the simple protocol the session ends on the switch, but
			// the hidden statement was sent with it, and the server runs it.
			tag = fmt.Sprintf("long-%d", time.Now().UnixNano())
			app := "lexing_" + tag
			c = rawSession(t, p, "user1", "application_name", app)
			c.send(t,
				&pgproto3.Query{String: "SELECT public.lexing_use_encoding('SJIS')"},
				&pgproto3.Query{String: "SELECT '" + pad + "', E'\xa1\x81\\'; SET ROLE admin; INSERT INTO public.lexing_log SELECT current_user, $$" + tag + "$$; -- '"},
				&pgproto3.Query{String: "SELECT current_user"},
			)
			lexAssertEndedOnEncoding(t, lexRead(t, c, 3), "SJIS")
			lexWaitGone(t, su, app)
			if who := lexLogged(t, su, tag); who != "" {
				t.Errorf("BUG: a statement of the session ran as %s after the session ended", who)
			}
		})
	}
}
