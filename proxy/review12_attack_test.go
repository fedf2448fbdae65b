package proxy_test

// Attacks from review 12 on the ledger's unsynced/quiet logic, the undoing
// of statement records, and the refusal of EXECUTE/PREPARE of the proxy's
// statement names. The FIXED tests failed before their fix: a Sync a COPY
// consumed counted as ending the extended-protocol batch (ledger.copyStarts
// now says), and a Close or DEALLOCATE the server did not run lost the
// client's name for good (statements.undo now gives it back).

import (
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
	"github.com/rlsproxy/rlsproxy/internal/sqlquote"
)

// r12Until reads c's answers up to the first message for which stop
// reports true, failing on an ErrorResponse.
func r12Until(t *testing.T, c *rawClient, stop func(pgproto3.BackendMessage) bool) {
	t.Helper()
	for {
		m := c.receive(t)
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			t.Fatalf("error %s: %s", e.Code, e.Message)
		}
		if stop(m) {
			return
		}
	}
}

// FIXED. A Sync sent while the server is in COPY FROM STDIN is consumed
// (ignored) by the server, yet ledger.add clears `unsynced` for it before
// it knows the copy consumes it. Client a runs, in the extended protocol,
// BEGIN then COPY ... FROM STDIN, with its only Sync sent right behind the
// Execute (as drivers send P/B/E/S in one batch); the server reads that Sync
// as part of the copy. After CopyData and CopyDone the server answers
// CommandComplete and waits for a Sync inside a's open transaction block,
// but the ledger is idle, "synced", and its last ReadyForQuery said 'I', so
// mayDetach hands the connection to client b (another identity), whose
// statements then run inside a's transaction: b sees a's uncommitted row
// and gets ReadyForQuery 'T' for an autocommit query (its writes would
// never commit unless it notices). b must wait until a's Sync ends the
// batch. (a sends a Flush after CopyDone: the server holds the
// CommandComplete in its buffer until a Sync or Flush.)
func TestReview12CopySyncSwallowedHandsOffMidTransaction(t *testing.T) {
	r10Super(t, "DROP TABLE IF EXISTS r12_copy; CREATE TABLE r12_copy (x text); GRANT ALL ON r12_copy TO PUBLIC")
	t.Cleanup(func() { r10Super(t, "DROP TABLE IF EXISTS r12_copy") })
	p := proxytest.Start(t, pg, oneConnection)
	a := rawSession(t, p, "user1")
	defer a.Close()
	b := rawSession(t, p, "user2")
	defer b.Close()
	a.send(t, &pgproto3.Parse{Query: "BEGIN"}, &pgproto3.Bind{}, &pgproto3.Execute{},
		&pgproto3.Parse{Query: "COPY r12_copy FROM STDIN"}, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{})
	r12Until(t, a, func(m pgproto3.BackendMessage) bool { _, ok := m.(*pgproto3.CopyInResponse); return ok })
	a.send(t, &pgproto3.CopyData{Data: []byte("uncommitted row of a\n")}, &pgproto3.CopyDone{}, &pgproto3.Flush{})
	r12Until(t, a, func(m pgproto3.BackendMessage) bool { _, ok := m.(*pgproto3.CommandComplete); return ok })
	// The server now waits, in a's transaction block, for a Sync.
	b.send(t, &pgproto3.Query{String: "SELECT count(*)::text FROM r12_copy"})
	if got := strings.Join(answersWithin3s(t, b), " "); got != "timeout" {
		t.Errorf("b ran on the connection while a's COPY batch waited for its Sync: %s (want it to wait)", got)
	}
	a.send(t, &pgproto3.Sync{})
	// Now: b's session ends with 08006 (its identity switch ran inside a's
	// transaction block: upstream_protocol_error, the connection closed,
	// a's COPY rolled back), and a's Sync is answered 'I' on another
	// connection: a is told nothing of its lost transaction.
	if got := strings.Join(answersWithin3s(t, a), " "); got != "ZT" {
		t.Errorf("a's Sync: %s, want ZT (a's transaction block is open)", got)
	}
	if got := strings.Join(queryEach(t, a, "SELECT count(*)::text FROM r12_copy", "ROLLBACK"), " | "); got != "T D:1 C:SELECT 1 Z | C:ROLLBACK Z" {
		t.Errorf("a in its transaction: %s", got)
	}
}

// FIXED. A Close of a client's statement that the server skips (an
// earlier message of the batch failed), or a DEALLOCATE query that fails
// (25P02 in a failed transaction block), was undone only in the
// connection's record (stmtRecord): statements.close had already deleted
// the client's name (forget), so a later Bind of it went to
// "rlsproxy_<n>_unknown_s" and failed with 26000, where PostgreSQL, which
// never ran the Close or DEALLOCATE, still has the statement.
func TestReview12UnrunDropKeepsClientName(t *testing.T) {
	for _, tc := range []struct {
		name string
		drop func(t *testing.T, a *rawClient)
	}{
		{"close skipped", func(t *testing.T, a *rawClient) {
			a.send(t, &pgproto3.Parse{Query: "SELEC"}, &pgproto3.Close{ObjectType: 'S', Name: "s"}, &pgproto3.Sync{})
			if got := strings.Join(untilReady(t, a, 1), " "); got != "E:42601 Z" {
				t.Fatalf("batch with a failing Parse: %s", got)
			}
		}},
		{"deallocate failed", func(t *testing.T, a *rawClient) {
			if got := strings.Join(queryEach(t, a, "BEGIN; SELECT 1/0", "DEALLOCATE s", "ROLLBACK"), " | "); got != "C:BEGIN E:22012 Z | E:25P02 Z | C:ROLLBACK Z" {
				t.Fatalf("setup: %s", got)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, oneConnection)
			a := rawSession(t, p, "user1")
			defer a.Close()
			a.send(t, &pgproto3.Parse{Name: "s", Query: "SELECT 'kept'::text"}, &pgproto3.Sync{})
			untilReady(t, a, 1)
			tc.drop(t, a)
			a.send(t, &pgproto3.Bind{PreparedStatement: "s"}, &pgproto3.Execute{}, &pgproto3.Sync{})
			if got := strings.Join(untilReady(t, a, 1), " "); got != "? D:kept C:SELECT 1 Z" {
				t.Errorf("Bind of s after its drop did not run: %s, want ? D:kept C:SELECT 1 Z (the server still has it)", got)
			}
		})
	}
}

// HELD. EXECUTE and PREPARE of the proxy's names through a Parse (the
// extended protocol), U& identifiers, upper case, comments and a second
// statement are refused.
func TestReview12HeldExecuteSpellings(t *testing.T) {
	p := proxytest.Start(t, pg, oneConnection)
	a := rawSession(t, p, "user1")
	defer a.Close()
	a.send(t, &pgproto3.Parse{Name: "s", Query: "SELECT 'secret of user1'::text"}, &pgproto3.Sync{})
	untilReady(t, a, 1)
	b := rawSession(t, p, "user2")
	defer b.Close()
	theirs := r10Must(t, b, "SELECT name FROM pg_prepared_statements WHERE statement = "+sqlquote.Literal("SELECT 'secret of user1'::text"))[0]
	uamp := `U&"\0072` + theirs[1:] + `"`
	for _, q := range []string{
		"EXECUTE " + strings.ToUpper(theirs),
		"EXECUTE " + uamp,
		"EXECUTE/**/" + theirs,
		"EXPLAIN (ANALYZE, VERBOSE, COSTS OFF) EXECUTE " + uamp,
		"CREATE TEMP TABLE l2 AS EXECUTE " + theirs + " WITH NO DATA",
	} {
		if rows, code := r10Query(t, b, q); code != "26000" {
			t.Errorf("b: %s: %v %q, want 26000", q, rows, code)
		}
		b.send(t, &pgproto3.Parse{Name: "x", Query: q}, &pgproto3.Bind{PreparedStatement: "x"}, &pgproto3.Execute{}, &pgproto3.Sync{})
		if got := strings.Join(untilReady(t, b, 1), " "); got != "E:26000 Z" {
			t.Errorf("b: Parse %s: %s, want E:26000 Z", q, got)
		}
	}
	for _, q := range []string{"PREPARE " + `U&"\0072lsproxy_1_77"` + " AS SELECT 1", "PREPARE RLSPROXY_1_77 AS SELECT 1"} {
		if rows, code := r10Query(t, b, q); code != "0A000" {
			t.Errorf("b: %s: %v %q, want 0A000", q, rows, code)
		}
		b.send(t, &pgproto3.Parse{Name: "y", Query: q}, &pgproto3.Bind{PreparedStatement: "y"}, &pgproto3.Execute{}, &pgproto3.Sync{})
		if got := strings.Join(untilReady(t, b, 1), " "); got != "E:0A000 Z" {
			t.Errorf("b: Parse %s: %s, want E:0A000 Z", q, got)
		}
	}
	a.send(t, &pgproto3.Bind{PreparedStatement: "s"}, &pgproto3.Execute{}, &pgproto3.Sync{})
	if got := strings.Join(untilReady(t, a, 1), " "); got != "? D:secret of user1 C:SELECT 1 Z" {
		t.Errorf("a's own statement: %s", got)
	}
}
