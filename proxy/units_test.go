package proxy_test

import (
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// The ledger keeps what the server owes from the server's own answers, to
// tell the proxy's own answers (after a reset) from the client's and to know
// when a connection is idle. These tests speak the protocol by hand to reach
// the sequences where PostgreSQL answers fewer than one ReadyForQuery per
// Query and Sync.

// After an error, PostgreSQL skips a Query sent before the batch's Sync; the
// ledger learns it from the error and keeps the count exact, so a later
// reset is re-established and its answers stay out of the client's sight.
func TestQueryInsideFailedBatchIsSkipped(t *testing.T) {
	p := proxytest.Start(t, pg)
	c := rawSession(t, p, "user1")
	c.send(t,
		&pgproto3.Parse{Query: "SELEC 1"}, // fails in PostgreSQL
		&pgproto3.Query{String: "SELECT 1"},
		&pgproto3.Sync{},
		&pgproto3.Query{String: "RESET ROLE"},
		&pgproto3.Query{String: "SELECT current_user, current_setting('jwt.claims.sub', true)"},
	)
	want := "E:42601 Z C:RESET Z T D:authenticated,user1 C:SELECT 1 Z"
	if got := strings.Join(untilReady(t, c, 3), " "); got != want {
		t.Fatalf("got %s, want %s", got, want)
	}
}

// asyncpg sends a Query behind Parse, Describe and Flush, before any Sync:
// PostgreSQL runs it, and so does the relay.
func TestQueryInsideOpenBatchRuns(t *testing.T) {
	p := proxytest.Start(t, pg)
	c := rawSession(t, p, "user1")
	c.send(t,
		&pgproto3.Parse{Name: "s1", Query: "SELECT $1::int"},
		&pgproto3.Describe{ObjectType: 'S', Name: "s1"},
		&pgproto3.Flush{},
		&pgproto3.Query{String: "SELECT current_user"},
		&pgproto3.Query{String: "RESET ROLE"},
		&pgproto3.Query{String: "SELECT current_user"},
	)
	want := "? ? T T D:authenticated C:SELECT 1 Z C:RESET Z T D:authenticated C:SELECT 1 Z"
	if got := strings.Join(untilReady(t, c, 3), " "); got != want {
		t.Fatalf("got %s, want %s", got, want)
	}
}

// The look-alike that must pass: the same Query once the batch is closed
// by its Sync, after a failing Parse.
func TestQueryAfterExtendedBatchPasses(t *testing.T) {
	p := proxytest.Start(t, pg)
	c := rawSession(t, p, "user1")
	c.send(t,
		&pgproto3.Parse{Query: "SELEC 1"},
		&pgproto3.Sync{},
		&pgproto3.Query{String: "SELECT current_user"},
	)
	if got := strings.Join(untilReady(t, c, 2), " "); got != "E:42601 Z T D:authenticated C:SELECT 1 Z" {
		t.Fatalf("got %s", got)
	}
}

// A client's own rows may hold text like the re-injection's mark (not its
// per-session random part): answered while the relay waits for a reset's
// re-injection, they reach the client and the session carries on.
func TestMarkLookAlikePasses(t *testing.T) {
	p := proxytest.Start(t, pg)
	c := rawSession(t, p, "user1")
	c.send(t,
		&pgproto3.Query{String: "SELECT 'rlsproxy_reinjected_0123456789abcdef'; RESET ALL"},
		&pgproto3.Query{String: "SELECT current_user"})
	want := "T D:rlsproxy_reinjected_0123456789abcdef C:SELECT 1 C:RESET Z T D:authenticated C:SELECT 1 Z"
	if got := strings.Join(untilReady(t, c, 2), " "); got != want {
		t.Fatalf("got %s, want %s", got, want)
	}
}

// libpq runs COPY FROM STDIN in the extended protocol as Parse, Bind,
// Execute, Sync, then the data, CopyDone and another Sync; PostgreSQL
// ignores the first Sync. The count follows, so a reset afterwards is
// re-established and answered as usual, and the connection is pooled.
func TestExtendedCopyKeepsCount(t *testing.T) {
	p := proxytest.Start(t, pg, proxytest.Pooled(1, 1))
	c := rawSession(t, p, "user1")
	c.send(t, &pgproto3.Query{String: "CREATE TEMP TABLE t (v text); SELECT pg_backend_pid()"})
	pid := untilReady(t, c, 1)[2] // C T D C Z
	c.send(t,
		&pgproto3.Parse{Query: "COPY t FROM STDIN"}, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{})
	if got := untilCopyIn(t, c); got != "G" {
		t.Fatalf("COPY: %s", got)
	}
	c.send(t, &pgproto3.CopyData{Data: []byte("a\nb\n")}, &pgproto3.CopyDone{}, &pgproto3.Sync{})
	if got := strings.Join(untilReady(t, c, 1), " "); got != "C:COPY 2 Z" {
		t.Fatalf("after COPY: %s", got)
	}
	c.send(t,
		&pgproto3.Query{String: "DISCARD ALL"},
		&pgproto3.Query{String: "SELECT current_user, current_setting('jwt.claims.sub')"})
	if got := strings.Join(untilReady(t, c, 2), " "); got != "C:DISCARD ALL Z T D:authenticated,user1 C:SELECT 1 Z" {
		t.Fatalf("after DISCARD ALL: %s", got)
	}
	c.send(t, &pgproto3.Terminate{})
	c2 := rawSession(t, p, "user2")
	c2.send(t, &pgproto3.Query{String: "SELECT pg_backend_pid()"})
	if got := untilReady(t, c2, 1)[1]; got != pid {
		t.Fatalf("the next session ran on backend %s, not the pooled %s", got, pid)
	}
}

func untilCopyIn(t *testing.T, c *rawClient) string {
	t.Helper()
	for {
		switch m := c.receive(t).(type) {
		case *pgproto3.CopyInResponse:
			return "G"
		case *pgproto3.ErrorResponse:
			return "E:" + m.Code + " " + m.Message
		case *pgproto3.ParseComplete, *pgproto3.BindComplete:
		default:
			return "?"
		}
	}
}

// A stray CopyData, which PostgreSQL ignores outside COPY, once made the
// relay take back a Sync and lose count. The ledger learns COPY only from
// the server: the reset after it is re-established as usual.
func TestStrayCopyDataKeepsCount(t *testing.T) {
	for _, pipelined := range []bool{true, false} {
		p := proxytest.Start(t, pg)
		c := rawSession(t, p, "user1")
		c.send(t, &pgproto3.Parse{Query: "SELECT 1"}, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{})
		var seq []string
		if !pipelined {
			seq = untilReady(t, c, 1)
		}
		c.send(t, &pgproto3.CopyData{Data: []byte("stray")}, &pgproto3.Sync{}, &pgproto3.CopyDone{})
		c.send(t,
			&pgproto3.Query{String: "DISCARD ALL"},
			&pgproto3.Query{String: "SELECT current_user"})
		n := 3
		if pipelined {
			n = 4
		}
		seq = append(seq, untilReady(t, c, n)...)
		want := "? ? D:1 C:SELECT 1 Z Z C:DISCARD ALL Z T D:authenticated C:SELECT 1 Z"
		if got := strings.Join(seq, " "); got != want {
			t.Fatalf("pipelined %v: got %s, want %s", pipelined, got, want)
		}
	}
}

// A Query pipelined behind COPY FROM STDIN is read by the server during the
// copy: PostgreSQL fails the copy (08P01 "unexpected message type") and,
// having stopped in the middle of reading a message, ends the connection
// ("protocol synchronization was lost"). The ledger, which kept both Queries
// as one run, follows: the client reads both errors, the connection is not
// reused, and the next session starts clean.
func TestQueryPipelinedIntoCopy(t *testing.T) {
	p := proxytest.Start(t, pg, proxytest.Pooled(1, 1))
	c := rawSession(t, p, "user1")
	c.send(t, &pgproto3.Query{String: "CREATE TEMP TABLE t (v text); SELECT pg_backend_pid()"})
	pid := untilReady(t, c, 1)[2] // C T D C Z
	c.send(t,
		&pgproto3.Query{String: "COPY t FROM STDIN"},
		&pgproto3.Query{String: "SELECT 'never answered'"})
	if got := strings.Join(untilReady(t, c, 1), " "); got != "G E:08P01 E:08P01" {
		t.Fatalf("got %s, want the copy failed and the connection ended", got)
	}
	c2 := rawSession(t, p, "user2")
	c2.send(t, &pgproto3.Query{String: "SELECT pg_backend_pid(), current_user, current_setting('jwt.claims.sub')"})
	got := untilReady(t, c2, 1)
	if got[1] == "D:"+strings.TrimPrefix(pid, "D:")+",authenticated,user2" || !strings.HasSuffix(got[1], ",authenticated,user2") {
		t.Fatalf("next session: %v (the first ran on %s)", got, pid)
	}
}
