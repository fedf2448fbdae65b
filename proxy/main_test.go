package proxy_test

import (
	"github.com/rlsproxy/rlsproxy/internal/dbsetup"

	"context"
	"errors"
	"net/http/httptest"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
	"github.com/rlsproxy/rlsproxy/session"
)

// pg is the PostgreSQL cluster every test in this package talks to.
var pg *proxytest.Postgres

// signer signs claims in the tests of the signed-claims layer; the database
// holds its key through the bootstrap SQL.
var signer *session.Signer

func TestMain(m *testing.M) {
	proxytest.Main(m, func(p *proxytest.Postgres) error {
		pg = p
		ctx := context.Background()
		if err := p.Exec(ctx, "app", `
			CREATE ROLE admin NOLOGIN;
			CREATE ROLE anon NOLOGIN;
			CREATE ROLE editor NOLOGIN;
			GRANT admin, anon, editor TO authenticator;
			GRANT SELECT ON notes TO anon, admin;
			CREATE POLICY notes_admin ON notes TO admin USING (true);
			CREATE ROLE outsider NOLOGIN;`); err != nil {
			return err
		}
		var err error
		if signer, err = session.NewSigner([]byte("proxy-test-signing-key-0123456789abcdef")); err != nil {
			return err
		}
		sql, err := dbsetup.BootstrapSQL(dbsetup.BootstrapOptions{Policy: proxytest.DefaultPolicy(),
			Login: "authenticator", Database: "app", Signer: signer, Leeway: 5 * time.Second})
		if err != nil {
			return err
		}
		if err := p.Exec(ctx, "app", sql); err != nil {
			return err
		}
		// The signed-claims layer's table: its policy reads auth.user_id().
		return p.Exec(ctx, "app", `
			CREATE TABLE signed_notes (user_id text NOT NULL, content text NOT NULL);
			ALTER TABLE signed_notes ENABLE ROW LEVEL SECURITY;
			CREATE POLICY own ON signed_notes USING (user_id = (SELECT auth.user_id()));
			GRANT SELECT ON signed_notes TO authenticated;
			INSERT INTO signed_notes VALUES ('user1', 'signed: user1'), ('user2', 'signed: user2');`)
	})
}

// connect opens a pgx connection through the proxy.
func connect(t *testing.T, p *proxytest.Proxy, user, token string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), p.DSN(user, token))
	if err != nil {
		t.Fatalf("connect through proxy as %s: %v", user, err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// connectErr returns the PgError of a connection attempt that must fail.
func connectErr(t *testing.T, dsn string) *pgconn.PgError {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dsn)
	if err == nil {
		conn.Close(context.Background())
		t.Fatal("connection succeeded, want an error")
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		t.Fatalf("want a PgError, got %v", err)
	}
	return pgErr
}

// psql runs the psql binary with the token as PGPASSWORD.
func psql(t *testing.T, conninfo, token string, args ...string) (string, error) {
	t.Helper()
	if _, err := exec.LookPath("psql"); err != nil {
		t.Fatal("psql not found: install postgresql-client")
	}
	cmd := exec.Command("psql", append([]string{"-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", conninfo}, args...)...)
	cmd.Env = append(cmd.Environ(), "PGPASSWORD="+token, "PGCONNECT_TIMEOUT=10")
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func queryStrings(t *testing.T, conn *pgx.Conn, sql string, args ...any) []string {
	t.Helper()
	rows, err := conn.Query(context.Background(), sql, args...)
	if err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return out
}

// counterValue sums a counter family of the proxy's registry.
func counterValue(t *testing.T, p *proxytest.Proxy, name string) float64 {
	t.Helper()
	mfs, err := p.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

// scrapeMetrics renders the proxy's metrics as /metrics serves them.
func scrapeMetrics(p *proxytest.Proxy) (string, error) {
	rec := httptest.NewRecorder()
	p.Server.AdminHandler(p.Registry, false).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	return rec.Body.String(), nil
}
