package guard

import (
	"testing"
)

// A statement the guard would read as harmless under the session's settings
// but the server could run otherwise (the settings changed by a statement
// pipelined ahead of it, or by a function the guard cannot see into) is
// refused, whatever the session's settings are: each attack hides its
// statement in what one reading takes for a string literal.
func TestGuardReadsEveryWay(t *testing.T) {
	g := newTestGuard()
	for _, tc := range []struct {
		name, sql string
		rule      string
	}{
		// standard_conforming_strings off: 'x\' does not end the literal.
		{"scs off hides a role change", `SELECT 'x\', ' ; RESET ROLE; -- '`, "string_reading"},
		{"scs off hides set role", `SELECT 'x\', ' ; SET ROLE app_admin; -- '`, "role"},
		{"scs off hides alter role", `SELECT 'a\', ' ; ALTER ROLE authenticator PASSWORD $$x$$; -- '`, "alter_role"},
		{"scs off hides claims", `SELECT 'a\', ' ; SET jwt.claims.sub = $$user2$$; -- '`, "claims_setting"},
		// scs on, for a session with it off (the only case whose own
		// reading is scs off).
		{"scs on hides a role change", `SELECT '\' ; RESET ROLE; SELECT ' -- '`, "reset_position"},
		// Valid UTF-8 that a client-only encoding reads otherwise: "Á\" is
		// C3 81 5C, which SJIS reads as a half-width kana and one character
		// 81 5C; "€\" is E2 82 AC 5C, which BIG5, GBK, UHC and GB18030 read
		// as two characters, E2 82 and AC 5C. The guard's UTF-8 reading sees
		// a backslash that escapes the quote; the server, once its encoding
		// is switched, does not.
		{"sjis hides a role change", "SELECT E'Á\\'; RESET ROLE; -- '", "string_reading"},
		{"big5 hides set role", "SELECT E'€\\'; SET ROLE app_admin; -- '", "role"},
		{"gbk hides alter role", "SELECT E'€\\' ; ALTER ROLE authenticator SET search_path = x; -- '", "alter_role"},
		{"gb18030 hides claims", "SELECT E'€\\'; SET jwt.claims.sub = $$u2$$; -- '", "claims_setting"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Under the session's own reading (scs on, UTF-8) each attack is
			// a harmless statement: only the other readings find it.
			own := Lexing{NonStandardStrings: tc.rule == "reset_position"}
			if v, err := g.verdictOf(tc.sql, false, own); v.Reject != nil || err != nil {
				t.Fatalf("the attack does not hide under the guard's own reading: %+v %v", v.Reject, err)
			}
			for _, lex := range []Lexing{{}, {NonStandardStrings: true}} {
				if v := g.Query([]byte(tc.sql), lex); v.Reject == nil || v.Reject.Rule != tc.rule && lex == (Lexing{}) {
					t.Errorf("Query, lex %+v: verdict %+v, want rule %s", lex, v.Reject, tc.rule)
				}
				if v := g.Parse([]byte(tc.sql), lex); v.Reject == nil {
					t.Errorf("Parse, lex %+v: passed", lex)
				}
			}
		})
	}
}

// Bytes that are not UTF-8 (a LATIN1 session) are read as the server reads
// them once converted: an attack next to them is found, and the look-alike
// passes (TestGuardReadingsLookAlikes).
func TestGuardReadsLatin1(t *testing.T) {
	v := newTestGuard().Query([]byte("SELECT 'caf\xe9'; SET ROLE app_admin"), Lexing{})
	if v.Reject == nil || v.Reject.Rule != "role" {
		t.Fatalf("verdict %+v, want rule role", v.Reject)
	}
}

// verdictOf is the guard's verdict under one reading only.
func (g *Guard) verdictOf(sql string, extended bool, lex Lexing) (Verdict, error) {
	tree, err := parseTree(sql, lex.NonStandardStrings)
	if err != nil {
		return Verdict{}, err
	}
	return g.verdict(tree, extended), nil
}

// The look-alikes that must pass: backslashes and non-ASCII text that read
// the same every way.
func TestGuardReadingsLookAlikes(t *testing.T) {
	g := newTestGuard()
	for _, sql := range []string{
		`UPDATE t SET path = 'C:\temp\' WHERE id = 1`,
		`UPDATE t SET path = E'C:\\temp\\' WHERE id = 1`,
		`UPDATE t SET note = E'it\'s' WHERE id = 1`,
		`UPDATE t SET note = 'a\b' WHERE id = 1`,
		"UPDATE t SET name = 'Zoë Müller', city = 'Zürich' WHERE id = 1",
		"UPDATE t SET name = '東京都', note = '€a' WHERE id = 1",
		"UPDATE t SET note = '€\\' WHERE id = 1",
		"SET application_name = 'naïve\\'",
		"UPDATE t SET name = 'Zo\xeb' WHERE id = 1", // LATIN1
	} {
		for _, lex := range []Lexing{{}, {NonStandardStrings: true}} {
			if v := g.Query([]byte(sql), lex); v.Reject != nil && v.Reject.Rule != "parse_error" {
				t.Errorf("%q (lex %+v) refused: %s", sql, lex, v.Reject.Msg)
			}
		}
	}
}

// Dollar-quote tags with non-ASCII bytes are refused: the server matches
// them after converting to its encoding, where "$é$" and "$è$" in a LATIN1
// session's bytes, or "¦" and "￤" for an EUC_JP database, are different to
// the guard and one to the server (or the other way round).
func TestGuardNonASCIIDollarTags(t *testing.T) {
	g := newTestGuard()
	for sql, refused := range map[string]bool{
		"SELECT $\xe9$ x $\xe8$ || ' $\xe9$; SET ROLE admin; -- '": true,
		"SELECT $¦$ x $￤$, 1; SET ROLE admin; SELECT $￤$ y $¦$":    true,
		"SELECT $é$ set $é$": true,
		// Look-alikes: ASCII tags, and a $ that starts no tag.
		"SELECT $x$ set role $x$, $$ set $$":                   false,
		"UPDATE t SET price = '$é' WHERE note = 'ça coûte 5$'": false,
		"UPDATE t SET a$é = 1":                                 false,
	} {
		v := g.Query([]byte(sql), Lexing{})
		if got := v.Reject != nil && v.Reject.Rule == "dollar_quote"; got != refused {
			t.Errorf("%q: verdict %+v, want refused=%v", sql, v.Reject, refused)
		}
	}
}

// A reset cannot share its message with COPY FROM STDIN: the proxy holds
// the client after a reset until the session is re-established, while the
// server would wait for the client's data. COPY TO STDOUT, or FROM a file,
// may.
func TestGuardResetAfterCopyIn(t *testing.T) {
	g := newTestGuard()
	for sql, refused := range map[string]bool{
		"COPY t FROM STDIN; RESET ROLE":  true,
		"COPY t FROM STDIN; DISCARD ALL": true,
		"COPY t TO STDOUT; DISCARD ALL":  false,
		"COPY t FROM STDIN":              false,
		"SELECT 1; RESET ALL":            false,
	} {
		if v := g.Query([]byte(sql), Lexing{}); (v.Reject != nil) != refused {
			t.Errorf("%q: %+v, want refused=%v", sql, v, refused)
		}
	}
}
