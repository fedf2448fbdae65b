package proxy_test

// Attacks from review 11 on transaction pooling's prepared statements
// (prepared.go, ledger.go's statement records, txpool.go's sweep).
//
// Its findings are fixed, each with its test in txpool_test.go
// (TestTxPoolingExecuteOfProxyNames, TestTxPoolingCodeCannotSwapStatements,
// TestTxPoolingBoundDeallocateAllNotExecuted, TestTxPoolingHeldUntilSync,
// TestTxPoolingDeallocateWhereNotPrepared,
// TestTxPoolingUnnamedStatementOfAnotherSession); what follows is what was
// tried and held.

import (
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
	"github.com/rlsproxy/rlsproxy/internal/sqlquote"
)

// Held (goal 1): every spelling of another client's server name in
// DEALLOCATE, and Close, Describe and Bind naming it, reach nothing: the
// proxy renames them into the client's own namespace.
func TestReview11HeldNamesReachNothing(t *testing.T) {
	p := proxytest.Start(t, pg, oneConnection)
	a := rawSession(t, p, "user1")
	defer a.Close()
	a.send(t, &pgproto3.Parse{Name: "s", Query: "SELECT 'a statement'::text"}, &pgproto3.Sync{})
	untilReady(t, a, 1)
	b := rawSession(t, p, "user2")
	defer b.Close()
	name := serverNameOf(t, b, "a statement")
	upper := strings.ToUpper(name)
	uesc := `U&"` + strings.ReplaceAll(name, "_", `\005F`) + `"`
	for _, tc := range []struct {
		name string
		msgs []pgproto3.FrontendMessage
	}{
		{"DEALLOCATE", []pgproto3.FrontendMessage{&pgproto3.Query{String: "DEALLOCATE " + name}}},
		{"DEALLOCATE PREPARE quoted", []pgproto3.FrontendMessage{&pgproto3.Query{String: `DEALLOCATE PREPARE "` + name + `"`}}},
		{"DEALLOCATE upper", []pgproto3.FrontendMessage{&pgproto3.Query{String: "DEALLOCATE " + upper}}},
		{"DEALLOCATE upper quoted", []pgproto3.FrontendMessage{&pgproto3.Query{String: `DEALLOCATE "` + upper + `"`}}},
		{"DEALLOCATE U&", []pgproto3.FrontendMessage{&pgproto3.Query{String: "DEALLOCATE " + uesc}}},
		{"DEALLOCATE two", []pgproto3.FrontendMessage{&pgproto3.Query{String: "DEALLOCATE x; DEALLOCATE " + name}}},
		{"DEALLOCATE comments", []pgproto3.FrontendMessage{&pgproto3.Query{String: "/* x */ DEALLOCATE/**/" + name + " -- y"}}},
		{"DEALLOCATE mixed", []pgproto3.FrontendMessage{&pgproto3.Query{String: "SELECT 1; DEALLOCATE " + name}}},
		{"parsed DEALLOCATE", []pgproto3.FrontendMessage{&pgproto3.Parse{Query: "DEALLOCATE " + name}, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{}}},
		{"Close", []pgproto3.FrontendMessage{&pgproto3.Close{ObjectType: 'S', Name: name}, &pgproto3.Sync{}}},
		{"Describe", []pgproto3.FrontendMessage{&pgproto3.Describe{ObjectType: 'S', Name: name}, &pgproto3.Sync{}}},
		{"Bind", []pgproto3.FrontendMessage{&pgproto3.Bind{PreparedStatement: name}, &pgproto3.Execute{}, &pgproto3.Sync{}}},
	} {
		b.send(t, tc.msgs...)
		got := strings.Join(untilReady(t, b, 1), " ")
		left := r10Must(t, a, "SELECT count(*) FROM pg_prepared_statements WHERE name = "+sqlquote.Literal(name))[0]
		t.Logf("%-26s -> %-16s a's statement left: %s", tc.name, got, left)
		if left != "1" || strings.Contains(got, "a statement") {
			t.Errorf("%s reached a's statement: %s, left %s", tc.name, got, left)
		}
	}
}

// Held (goal 2): pipelines where a Parse runs among errors, a Parse or Close
// the server discards, a Parse sent into COPY FROM STDIN, an answered Parse
// without Sync, and a session that ends mid-pipeline: a's statement is
// gone from the connection once a's session has ended.
func TestReview11HeldStatementsSwept(t *testing.T) {
	const text = "SELECT 'r11 swept'"
	r10Super(t, "CREATE TABLE IF NOT EXISTS r11_copy (x int); GRANT ALL ON r11_copy TO PUBLIC")
	t.Cleanup(func() { r10Super(t, "DROP TABLE IF EXISTS r11_copy") })
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, a *rawClient)
	}{
		{"parse, then an error", func(t *testing.T, a *rawClient) {
			a.send(t, &pgproto3.Parse{Name: "s", Query: text}, &pgproto3.Bind{PreparedStatement: "s"}, &pgproto3.Execute{},
				&pgproto3.Parse{Name: "bad", Query: "SELECT 1/0"}, &pgproto3.Bind{PreparedStatement: "bad"}, &pgproto3.Execute{}, &pgproto3.Sync{})
			untilReady(t, a, 1)
		}},
		{"parse, close skipped, close again failed block", func(t *testing.T, a *rawClient) {
			a.send(t, &pgproto3.Parse{Name: "s", Query: text}, &pgproto3.Sync{},
				&pgproto3.Parse{Name: "bad", Query: "SELECT * FROM nope"}, &pgproto3.Close{ObjectType: 'S', Name: "s"}, &pgproto3.Sync{})
			untilReady(t, a, 2)
			inFailedBlock(t, a, "DEALLOCATE s")
		}},
		{"parse sent into COPY", func(t *testing.T, a *rawClient) {
			a.send(t, &pgproto3.Parse{Name: "s", Query: text}, &pgproto3.Sync{})
			untilReady(t, a, 1)
			a.send(t, &pgproto3.Query{String: "COPY r11_copy FROM STDIN"})
			a.receive(t) // CopyInResponse
			a.send(t, &pgproto3.Parse{Name: "t", Query: text}, &pgproto3.Close{ObjectType: 'S', Name: "s"}, &pgproto3.Sync{})
			untilReady(t, a, 2)
		}},
		{"parse and flush, then gone", func(t *testing.T, a *rawClient) {
			a.send(t, &pgproto3.Parse{Name: "s", Query: text}, &pgproto3.Flush{})
			a.receive(t) // ParseComplete
		}},
		{"gone mid-pipeline", func(t *testing.T, a *rawClient) {
			a.send(t, &pgproto3.Parse{Name: "s", Query: text}, &pgproto3.Sync{})
			untilReady(t, a, 1)
			a.send(t, &pgproto3.Parse{Name: "t", Query: text}, &pgproto3.Bind{PreparedStatement: "t"},
				&pgproto3.Parse{Name: "u", Query: "SELECT pg_sleep(0.2)"}, &pgproto3.Bind{PreparedStatement: "u"}, &pgproto3.Execute{})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, oneConnection)
			a := rawSession(t, p, "user1")
			tc.run(t, a)
			a.Close()
			if got := leftAfterEnd(t, p, text); got != "0" {
				t.Errorf("a's statement is still on the connection after a ended: %s", got)
			}
		})
	}
}
