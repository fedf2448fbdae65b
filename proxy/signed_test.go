package proxy_test

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// signedRows reads signed_notes, whose policy is user_id = (SELECT
// auth.user_id()): it returns the rows, or the error auth.* raised.
func signedRows(conn *pgx.Conn) ([]string, error) {
	rows, err := conn.Query(context.Background(), "SELECT user_id FROM signed_notes ORDER BY 1", pgx.QueryExecModeSimpleProtocol)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// With the guard off, the signed-claims layer stands alone: every attack on
// the claims yields an error or no rows from auth.*, never another user's
// rows. Both layers together hold as well.
func TestSignedClaimsStandAlone(t *testing.T) {
	ctx := context.Background()
	for _, mode := range []struct {
		name  string
		opts  []proxytest.Option
		guard bool
	}{
		// Session mode: the signature binds the backend, which transaction
		// pooling shares between clients (README, "Residual risks").
		{"guard off, signed claims", []proxytest.Option{proxytest.GuardOff, withSigner, proxytest.SessionPooling}, false},
		{"guard on, signed claims", []proxytest.Option{withSigner}, true},
	} {
		t.Run(mode.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, mode.opts...)
			victim := connect(t, p, "user2", p.Token(t, "user2"))
			var claims2, sig2 string
			if err := victim.QueryRow(ctx, "SELECT current_setting('request.jwt.claims'), current_setting('rlsproxy.claims_signature')").Scan(&claims2, &sig2); err != nil {
				t.Fatal(err)
			}
			if got, err := signedRows(victim); err != nil || len(got) != 1 || got[0] != "user2" {
				t.Fatalf("the victim's own view: %v %v", got, err)
			}
			claimAttacks := []struct{ name, sql string }{
				{"forged claims", `SET request.jwt.claims = '{"sub":"user2","exp":4102444800}'`},
				{"edited claims", "SELECT set_config('request.jwt.claims', replace(current_setting('request.jwt.claims'), 'user1', 'user2'), false)"},
				{"copied claims and signature", "SET request.jwt.claims = " + quoteLiteral(claims2) + "; SET rlsproxy.claims_signature = " + quoteLiteral(sig2)},
				{"replayed signature", "SET rlsproxy.claims_signature = " + quoteLiteral(sig2)},
				{"claims reset away", "RESET ALL"},
				{"discard all", "DISCARD ALL"},
			}
			for _, a := range append(claimAttacks, attacks...) {
				conn := connect(t, p, "user1", p.Token(t, "user1"))
				_, _ = conn.Exec(ctx, a.sql, pgx.QueryExecModeSimpleProtocol)
				if conn.PgConn().TxStatus() != 'I' {
					_, _ = conn.Exec(ctx, "ROLLBACK")
				}
				got, err := signedRows(conn)
				for _, u := range got {
					if u != "user1" {
						t.Fatalf("%s: user1's session sees %s's rows: %v", a.name, u, got)
					}
				}
				// With the guard on the session is untouched; with it off
				// the claims layer answers with an error or nothing.
				if mode.guard && (err != nil || len(got) != 1) {
					t.Fatalf("%s: with the guard on, user1 sees %v, %v", a.name, got, err)
				}
			}
		})
	}
}

// BenchmarkAuthUserIDPolicy measures a policy that calls auth.user_id() with
// signed claims, in its two forms, over a 100,000-row scan through the
// proxy: bare (the function runs per row) and (SELECT auth.user_id()) (once
// per statement). ns/row of the bare form is the cost of one verifying call.
//
//	go test -run '^$' -bench AuthUserIDPolicy -benchtime 20x ./proxy/
func BenchmarkAuthUserIDPolicy(b *testing.B) {
	ctx := context.Background()
	const rows = 100000
	if err := pg.Exec(ctx, "app", `
		CREATE TABLE IF NOT EXISTS cost_bare (user_id text);
		CREATE TABLE IF NOT EXISTS cost_select (user_id text);
		TRUNCATE cost_bare, cost_select;
		INSERT INTO cost_bare SELECT 'user' || (g % 2 + 1) FROM generate_series(1, 100000) g;
		INSERT INTO cost_select SELECT * FROM cost_bare;
		ALTER TABLE cost_bare ENABLE ROW LEVEL SECURITY;
		ALTER TABLE cost_select ENABLE ROW LEVEL SECURITY;
		DROP POLICY IF EXISTS p ON cost_bare;
		DROP POLICY IF EXISTS p ON cost_select;
		CREATE POLICY p ON cost_bare USING (user_id = auth.user_id());
		CREATE POLICY p ON cost_select USING (user_id = (SELECT auth.user_id()));
		GRANT SELECT ON cost_bare, cost_select TO authenticated;
		ANALYZE cost_bare, cost_select;`); err != nil {
		b.Fatal(err)
	}
	p := proxytest.Start(b, pg, withSigner)
	conn, err := pgx.Connect(ctx, p.DSN("user1", p.Token(b, "user1")))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	for _, table := range []string{"cost_bare", "cost_select"} {
		b.Run(table, func(b *testing.B) {
			for b.Loop() {
				var n int
				if err := conn.QueryRow(ctx, "SELECT count(*) FROM "+table).Scan(&n); err != nil || n != rows/2 {
					b.Fatalf("%d %v", n, err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/rows, "ns/row")
		})
	}
}
