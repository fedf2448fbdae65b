package proxy_test

// Attacks from an independent review of the guard's readings, the ledger,
// the proxy's own round trips and resource limits: the reproductions of
// what broke, now fixed, and regression tests of what held.

import (
	"context"
	"encoding/binary"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// reviewWho shows the session's identity as the server sees it.
const reviewWho = "SELECT current_user, current_setting('jwt.claims.sub', true), (SELECT count(*) FROM notes)"

// reviewSelf is reviewWho's answer for user1 in its own identity.
const reviewSelf = "T D:authenticated,user1,2 C:SELECT 1 Z"

// ---------------------------------------------------------------------------
// Reproductions of what broke.

// The proxy's install batch once ran its statements as the unnamed prepared
// statement, and the last one, installRoleSQL, was left on the connection
// the client then gets. Bind is not inspected, so a client re-bound it with
// a role of its choice: SET ROLE with no SQL at all, at connect, at checkout
// from the pool, and after every re-installation that follows a client's
// reset. The proxy's statements are now named by the batch's nonce and
// closed in the batch: the client's Bind finds no statement.
func TestReviewInstallStatementNotLeft(t *testing.T) {
	p := proxytest.Start(t, pg)
	for _, tc := range []struct {
		name, role, before string
	}{
		{"at connect, another mapped role", "admin", ""},
		{"at connect, the login role", "none", ""},
		{"after DISCARD ALL's re-installation", "admin", "DISCARD ALL"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := rawSession(t, p, "user1")
			if tc.before != "" {
				queryEach(t, c, tc.before)
			}
			c.send(t,
				&pgproto3.Bind{Parameters: [][]byte{[]byte(tc.role), []byte("x")}},
				&pgproto3.Execute{},
				&pgproto3.Sync{},
				&pgproto3.Query{String: reviewWho})
			got := untilReady(t, c, 2)
			if who := strings.Join(got[len(got)-4:], " "); who != reviewSelf || got[0] != "E:26000" {
				t.Fatalf("after Bind to the unnamed statement with %q: %v", tc.role, got)
			}
		})
	}
}

// The guard once skipped every other reading of a statement that did not
// parse in pg_query, taking a parse failure for the server's. Two ways that
// was false, each with standard_conforming_strings switched off in a Query
// pipelined ahead (the guard still reads "on", the server reads "off"):
//   - bytes: the flipped reading was parsed from the raw, non-UTF-8 bytes
//     of a LATIN1 session, where an octal escape in an E-string next to a
//     raw byte fails pg_verifymbstr; the server converts LATIN1 first and
//     finds valid UTF-8;
//   - grammar: pg_query is PostgreSQL 17's grammar, the server 15's; SQL 15
//     accepts and 17 refuses (a FROM alias named system_user, reserved
//     since 16) failed only the guard's reading.
//
// Every reading is now built from the text as the server lexes it, and one
// that lexes but does not parse is refused.
func TestReviewSkippedReadings(t *testing.T) {
	p := proxytest.Start(t, pg)
	cases := []struct {
		name   string
		params []string
		poison string // makes the guard's flipped reading fail
		tail   string
	}{
		{"raw LATIN1 bytes", []string{"client_encoding", "LATIN1"}, "E'\\303\\251\xe9', ", ""},
		{"PostgreSQL 15 grammar", nil, "", " ; SELECT 1 FROM (VALUES (1)) AS system_user"},
	}
	for _, tc := range cases {
		for _, payload := range []string{"SET ROLE admin", "SET jwt.claims.sub = $$user2$$", "RESET ROLE"} {
			t.Run(tc.name+"/"+payload, func(t *testing.T) {
				c := rawSession(t, p, "user1", tc.params...)
				attack := "SELECT " + tc.poison + "'a\\'' ; " + payload + tc.tail + " ; --'"
				c.send(t,
					&pgproto3.Query{String: "SET standard_conforming_strings = off"},
					&pgproto3.Query{String: attack},
					&pgproto3.Query{String: "SET standard_conforming_strings = on"},
					&pgproto3.Query{String: reviewWho})
				got := untilReady(t, c, 4)
				seq := strings.Join(got, " ")
				if !strings.Contains(seq, "E:42501") || !strings.HasSuffix(seq, reviewSelf) {
					t.Fatalf("%q: %s", attack, seq)
				}
			})
		}
	}
}

// Statements of up to 4 KB were parsed on the event loop that relays the
// session, under up to 8 readings (~45 ms each for `1+1+...` with a `€\` in
// a comment): one session stalled every other session on its loop by ~0.7 s
// per 64 KB read, for as long as it kept sending. The loop now hands a
// session off before a message whose parse may cost more than 4 KB of
// parsing, and once the session has spent 20 ms a second parsing on it.
func TestReviewLoopNotStalledByShortStatements(t *testing.T) {
	p := proxytest.Start(t, pg, proxytest.RelayLoops(1))
	victim := connect(t, p, "user2", p.Token(t, "user2"))
	c := rawSession(t, p, "user1")
	go func() {
		for {
			if _, err := c.fe.Receive(); err != nil {
				return
			}
		}
	}()
	var frames []byte
	for i := 0; i < 48; i++ {
		pre := fmt.Sprintf("SELECT /*set €\\*/ '\\', %d", i)
		frames, _ = (&pgproto3.Query{String: pre + strings.Repeat("+1", (4000-len(pre))/2)}).Encode(frames)
	}
	go func() { _, _ = c.Write(frames) }()
	time.Sleep(50 * time.Millisecond)
	t0 := time.Now()
	if _, err := victim.Exec(context.Background(), "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); d > 200*time.Millisecond {
		t.Fatalf("another session's SELECT 1 took %v", d)
	}
}

// A 5-byte header once reserved the whole frame it announced (up to 64 MiB)
// for the guard: 8 sessions that sent 13 bytes each held 512 MiB. The frame
// now grows as its bytes come.
func TestReviewGuardFrameNotReservedOnHeader(t *testing.T) {
	p := proxytest.Start(t, pg, proxytest.Pooled(0, 0))
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := 0; i < 8; i++ {
		c := rawSession(t, p, "user1")
		hdr := []byte{'Q', 0, 0, 0, 0}
		binary.BigEndian.PutUint32(hdr[1:], 64<<20-16)
		_, _ = c.Write(append(hdr, "SELECT 1"...))
	}
	time.Sleep(200 * time.Millisecond)
	runtime.ReadMemStats(&after)
	if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > 64<<20 {
		t.Fatalf("8 sessions that sent 13 bytes each hold %d MiB", grew>>20)
	}
}

// `COPY t FROM STDIN; RESET ROLE` as one Query once deadlocked: the client
// side was held for the re-installation while the server waited for its
// CopyData. The guard now refuses a reset that shares its message with COPY
// FROM STDIN; the session carries on.
func TestReviewCopyInResetQueryRefused(t *testing.T) {
	p := proxytest.Start(t, pg)
	c := rawSession(t, p, "user1")
	queryEach(t, c, "CREATE TEMP TABLE review_copy (v text)")
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	got := queryEach(t, c, "COPY review_copy FROM STDIN; RESET ROLE", reviewWho)
	if !strings.HasPrefix(got[0], "E:42501") || got[1] != reviewSelf {
		t.Fatalf("got %q", got)
	}
}

// ---------------------------------------------------------------------------
// Regression tests of what held.

// A reset inside a transaction block, a savepoint or a failed block, or
// followed by a statement that fails the block: role and claims are those of
// the token at every step and after every way out.
func TestReviewResetsInTransactionsHold(t *testing.T) {
	p := proxytest.Start(t, pg)
	for _, seq := range [][]string{
		{"BEGIN", "SAVEPOINT s", "RESET ROLE", reviewWho, "ROLLBACK TO s", reviewWho, "COMMIT", reviewWho},
		{"BEGIN", "SAVEPOINT s", "RESET ROLE; DISCARD ALL", "ROLLBACK TO s", reviewWho, "COMMIT", reviewWho},
		{"BEGIN", "RESET ROLE; DISCARD ALL", "ROLLBACK", reviewWho},
		{"BEGIN", "SELECT 1/0", "RESET ROLE", "ROLLBACK", reviewWho},
		{"BEGIN", "RESET ROLE; RESET jwt.claims.sub", reviewWho, "COMMIT", reviewWho},
		{"BEGIN", "SET LOCAL role TO DEFAULT", reviewWho, "COMMIT", reviewWho},
		{"BEGIN", "SAVEPOINT a", "RESET ROLE", "RELEASE a", reviewWho, "ROLLBACK", reviewWho},
		{"SELECT 1; RESET ROLE; DISCARD ALL", reviewWho}, // DISCARD ALL fails the implicit block
	} {
		c := rawSession(t, p, "user1")
		for i, got := range queryEach(t, c, seq...) {
			if seq[i] == reviewWho && got != reviewSelf {
				t.Errorf("%q: step %d: %s", seq, i, got)
			}
		}
	}
}

// The flipped standard_conforming_strings reading, pipelined, when it
// parses: refused whatever the guard believes the setting is, in UTF8 and
// LATIN1 sessions and one started with it off (the look-alike that must
// pass: a literal holding a backslash that parses both ways).
func TestReviewPipelinedScsFlipRefused(t *testing.T) {
	p := proxytest.Start(t, pg)
	for _, params := range [][]string{nil, {"client_encoding", "LATIN1"}, {"options", "-c standard_conforming_strings=off"}} {
		flip := "off"
		if len(params) > 0 && params[0] == "options" {
			flip = "on"
		}
		c := rawSession(t, p, "user1", params...)
		c.send(t,
			&pgproto3.Query{String: "SET standard_conforming_strings = " + flip},
			&pgproto3.Query{String: "SELECT 'a\\'' ; SET ROLE admin ; --'"},
			&pgproto3.Query{String: "SELECT 'C:\\\\'"},
			&pgproto3.Query{String: "RESET standard_conforming_strings"},
			&pgproto3.Query{String: reviewWho})
		got := strings.Join(untilReady(t, c, 5), " ")
		if strings.Count(got, "E:") != 1 || strings.Count(got, "E:42501") != 1 || !strings.HasSuffix(got, reviewSelf) {
			t.Errorf("%v: %s", params, got)
		}
	}
}

// What a session leaves on a pooled connection (open transaction, prepared
// statement, cursor, advisory lock, LISTEN, temp table, settings, a suspended
// portal) is gone for the next user on the same backend.
func TestReviewPooledLeftoversGone(t *testing.T) {
	p := proxytest.Start(t, pg, proxytest.Pooled(1, 1))
	a := rawSession(t, p, "user1")
	pid := queryEach(t, a,
		"SELECT pg_backend_pid()",
		"LISTEN review_ch; SELECT pg_advisory_lock(4242); CREATE TEMP TABLE review_tmp (v int); PREPARE review_p AS SELECT 1; SET statement_timeout = 4242",
		"BEGIN; DECLARE review_c CURSOR WITH HOLD FOR SELECT 1; SET LOCAL work_mem = '8MB'",
	)[0]
	a.send(t, &pgproto3.Parse{Query: "SELECT generate_series(1, 3)"}, &pgproto3.Bind{}, &pgproto3.Execute{MaxRows: 1}, &pgproto3.Sync{})
	untilReady(t, a, 1)
	a.send(t, &pgproto3.Terminate{})
	b := rawSession(t, p, "user2")
	got := queryEach(t, b, `SELECT pg_backend_pid()::text || ',' || current_user || ',' || current_setting('jwt.claims.sub')
		|| ',' || (SELECT count(*) FROM pg_prepared_statements) || ',' || (SELECT count(*) FROM pg_cursors)
		|| ',' || (SELECT count(*) FROM pg_listening_channels()) || ',' || (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())
		|| ',' || (to_regclass('pg_temp.review_tmp') IS NULL) || ',' || current_setting('statement_timeout')`)[0]
	want := "T D:" + strings.Fields(strings.TrimPrefix(pid, "T D:"))[0] + ",authenticated,user2,0,0,0,0,true,0 C:SELECT 1 Z"
	if got != want {
		t.Fatalf("next user on the backend: %s, want %s", got, want)
	}
}

// The deepest statements the guard parses in process (4 KB: ~2,000 levels
// of `1+1+...`, ARRAY[[[...]]], prefix operators, subscripts) are answered
// and the proxy stays up. Measured with a standalone parser: each needs
// 0.5-1 MB of C stack, against glibc's default thread stack of 8 MB (it
// would crash on a 512 KB one, e.g. `ulimit -s 512` or musl's 128 KB).
func TestReviewDeepestInProcessStatementsParse(t *testing.T) {
	p := proxytest.Start(t, pg)
	c := rawSession(t, p, "user1")
	const limit = 4096
	pre := "SELECT /*set*/ "
	for _, q := range []string{
		pre + "1" + strings.Repeat("+1", (limit-len(pre)-1)/2),
		pre + "ARRAY" + strings.Repeat("[", (limit-len(pre)-6)/2) + "1" + strings.Repeat("]", (limit-len(pre)-6)/2),
		pre + strings.Repeat("~ ", (limit-len(pre)-1)/2) + "1",
		pre + "(ARRAY[1])" + strings.Repeat("[1]", (limit-len(pre)-10)/3),
	} {
		if len(q) > limit {
			t.Fatalf("%d bytes", len(q))
		}
		c.send(t, &pgproto3.Query{String: q})
		untilReady(t, c, 1)
	}
	if got := queryEach(t, c, reviewWho)[0]; got != reviewSelf {
		t.Fatal(got)
	}
}
