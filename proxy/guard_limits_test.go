package proxy_test

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// No statement takes the proxy down, and none makes it hold more than its
// documented bounds: statements the guard must parse at length are parsed
// in helper processes, a crash or an exhausted limit there refuses the
// statement (54000), and the session, like every other, carries on.
func TestGuardLimits(t *testing.T) {
	p := proxytest.Start(t, pg)
	other := connect(t, p, "user2", p.Token(t, "user2"))
	c := rawSession(t, p, "user1")
	for _, tc := range []struct {
		name, sql, want string
	}{
		// 26,000 levels of expression overflowed pg_query's C stack and
		// killed the whole proxy (SIGSEGV); the guard word in the comment
		// makes the guard parse it.
		{"deep expression", "SELECT 1" + strings.Repeat("+1", 26000) + " -- set role", "E:54000"},
		{"deep expression, parenthesised", "SELECT " + strings.Repeat("(1+", 9000) + "1" + strings.Repeat(")", 9000) + " -- set role", "E:"},
		// Longer than the 2 MiB the guard parses.
		{"too long to parse", "SELECT 1" + strings.Repeat(",1", 1200000) + " -- set", "E:54000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c.send(t, &pgproto3.Query{String: tc.sql}, &pgproto3.Query{String: "SELECT current_user"})
			got := strings.Join(untilReady(t, c, 2), " ")
			if !strings.HasPrefix(got, tc.want) || !strings.HasSuffix(got, "Z T D:authenticated C:SELECT 1 Z") {
				t.Fatalf("got %.200s; want %s, then the session carrying on", got, tc.want)
			}
			c.send(t, &pgproto3.Parse{Query: tc.sql}, &pgproto3.Sync{}, &pgproto3.Query{String: "SELECT current_user"})
			if got := strings.Join(untilReady(t, c, 2), " "); !strings.HasPrefix(got, tc.want) || !strings.HasSuffix(got, "D:authenticated C:SELECT 1 Z") {
				t.Fatalf("extended: got %.200s", got)
			}
			if got := queryStrings(t, other, "SELECT current_user"); got[0] != "authenticated" {
				t.Fatalf("another session: %v", got)
			}
		})
	}

	// The look-alike that must pass: a 1 MB multi-row INSERT whose values
	// hold the guard's words is parsed (in a helper) and runs; the proxy's
	// own heap does not pay for the parse.
	conn := connect(t, p, "user1", p.Token(t, "user1"))
	ctx := context.Background()
	if _, err := conn.Exec(ctx, "CREATE TEMP TABLE bulk (id int, note text)"); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	b.WriteString("INSERT INTO bulk VALUES ")
	rows := 0
	for b.Len() < 1<<20 {
		if rows > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, "(%d, 'set role do create %d')", rows, rows)
		rows++
	}
	before := heapInUse()
	if _, err := conn.Exec(ctx, b.String()); err != nil {
		t.Fatalf("the 1 MB INSERT: %v", err)
	}
	runtime.GC()
	grew := heapInUse() - before
	if got := queryStrings(t, conn, "SELECT count(*) FROM bulk"); got[0] != fmt.Sprint(rows) {
		t.Fatalf("%s rows inserted, want %d", got[0], rows)
	}
	if grew > 32<<20 {
		t.Fatalf("the proxy's heap grew by %d MiB parsing a 1 MB statement", grew>>20)
	}
	t.Logf("1 MB INSERT of %d rows: proxy heap +%d KiB", rows, grew>>10)
}
