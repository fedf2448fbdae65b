package dbsetup_test

import (
	"github.com/rlsproxy/rlsproxy/internal/sqlquote"

	"github.com/rlsproxy/rlsproxy/internal/dbsetup"

	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rlsproxy/rlsproxy/session"
)

// Check finds nothing in a database set up by the bootstrap SQL (signed,
// hardened) with an RLS table, and then finds each gap, opened one at a
// time, with a message that names the object. Every scenario has its own
// database and its own roles, login role included: roles are cluster-wide,
// and a login role shared between scenarios would be a member of every
// scenario's mapped role, which Check rightly reports.
func TestCheck(t *testing.T) {
	signer := testSigner(t)
	other, err := session.NewSigner([]byte(strings.Repeat("o", 64)))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name                   string
		gap                    string          // SQL run as superuser after the bootstrap; {db}, {role}, {login} are replaced
		checkSigner            *session.Signer // Check's signer; the bootstrap's when nil
		noBootSigner, noSigner bool            // unsigned bootstrap SQL; Check without a signer
		severity, check, want  string          // the finding expected; none when severity is ""
	}{
		{name: "clean"},
		{name: "membership", gap: "CREATE ROLE {db}_admin; GRANT {db}_admin TO {login}",
			severity: "problem", check: "membership", want: "is a member of role chk_membership_admin"},
		{name: "indirect_membership", gap: "CREATE ROLE {db}_owner; GRANT {db}_owner TO {role}",
			severity: "problem", check: "membership", want: "chk_indirect_membership_owner (through chk_indirect_membership_authenticated)"},
		{name: "bypassrls", gap: "ALTER ROLE {role} BYPASSRLS",
			severity: "problem", check: "mapped-role", want: "mapped role chk_bypassrls_authenticated has BYPASSRLS"},
		{name: "rls_off", gap: "CREATE TABLE public.open (id int); GRANT SELECT ON public.open TO {role}",
			severity: "problem", check: "table-rls", want: "table public.open has row-level security off and role chk_rls_off_authenticated can read it"},
		{name: "owner", gap: "CREATE TABLE public.mine (id int); ALTER TABLE public.mine ENABLE ROW LEVEL SECURITY; ALTER TABLE public.mine OWNER TO {role}",
			severity: "problem", check: "table-owner", want: "table public.mine is owned by mapped role chk_owner_authenticated, and does not FORCE"},
		{name: "truncate", gap: "GRANT TRUNCATE ON public.notes TO {role}",
			severity: "problem", check: "table-truncate", want: "can TRUNCATE table public.notes"},
		{name: "view", gap: "CREATE VIEW public.all_notes AS SELECT * FROM public.notes; GRANT SELECT ON public.all_notes TO {role}",
			severity: "warning", check: "view", want: "view public.all_notes runs with the rights of its owner postgres"},
		{name: "temp", gap: "GRANT TEMPORARY ON DATABASE {db} TO PUBLIC",
			severity: "warning", check: "temp", want: "may create temporary objects in database chk_temp"},
		{name: "plpgsql", gap: "GRANT USAGE ON LANGUAGE plpgsql TO PUBLIC",
			severity: "warning", check: "language", want: "may use language plpgsql"},
		{name: "set_config", gap: "GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO PUBLIC",
			severity: "warning", check: "set_config", want: "may execute set_config()"},
		{name: "no_auth", gap: "DROP SCHEMA auth CASCADE",
			severity: "problem", check: "auth", want: "schema auth does not exist"},
		{name: "other_key", checkSigner: other,
			severity: "problem", check: "signing-key", want: "does not match --signing-key-file"},
		{name: "unsigned_db", noBootSigner: true,
			severity: "problem", check: "signing-key", want: "table auth.signing_key does not exist"},
		{name: "no_key_flag", noSigner: true,
			severity: "problem", check: "signing-key", want: "no --signing-key-file is set"},
		{name: "empty_key", gap: "DELETE FROM auth.signing_key",
			severity: "problem", check: "signing-key", want: "table auth.signing_key is empty"},
		{name: "not_member", gap: "REVOKE {role} FROM {login}",
			severity: "problem", check: "mapped-role", want: "chk_not_member_login is not a member of role chk_not_member_authenticated"},
		{name: "key_readable", gap: "GRANT SELECT ON auth.signing_key TO {role}",
			severity: "problem", check: "signing-key", want: "chk_key_readable_authenticated can read auth.signing_key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			boot, chk := signer, signer
			if tc.checkSigner != nil {
				chk = tc.checkSigner
			}
			if tc.noBootSigner {
				boot = nil
			}
			if tc.noSigner {
				chk = nil
			}
			db := "chk_" + tc.name
			dsn, policy := checkDatabase(t, ctx, db, boot)
			if tc.gap != "" {
				gap := strings.NewReplacer("{db}", db, "{role}", db+"_authenticated", "{login}", db+"_login").Replace(tc.gap)
				if err := cluster.Exec(ctx, db, gap); err != nil {
					t.Fatalf("%s: %v", gap, err)
				}
			}
			conn, err := pgconn.Connect(ctx, dsn)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			findings, err := dbsetup.Check(ctx, conn, dbsetup.CheckOptions{
				Policy: policy, Signer: chk,
				Connect: func(ctx context.Context) (*pgconn.PgConn, error) { return pgconn.Connect(ctx, dsn) },
			})
			if err != nil {
				t.Fatal(err)
			}
			found := false
			for _, f := range findings {
				t.Logf("%s %s: %s (fix: %s)", f.Severity, f.Check, f.Message, f.Fix)
				if f.Fix == "" {
					t.Errorf("finding without a fix: %+v", f)
				}
				switch {
				case f.Severity == tc.severity && f.Check == tc.check && strings.Contains(f.Message, tc.want):
					found = true
				case tc.severity == "" || f.Severity == "problem":
					// Nothing but the gap opened: no other finding in a
					// clean database, no other problem otherwise.
					t.Errorf("unexpected %s %s: %s", f.Severity, f.Check, f.Message)
				}
			}
			if tc.severity != "" && !found {
				t.Errorf("no %s %s finding containing %q", tc.severity, tc.check, tc.want)
			}
		})
	}
}

// checkDatabase creates database db with the bootstrap SQL (hardened,
// signed with signer if set), roles <db>_authenticated and <db>_login, and
// an RLS table notes granted to the mapped role. It returns the login
// role's DSN and the policy.
func checkDatabase(t *testing.T, ctx context.Context, db string, signer *session.Signer) (string, session.Policy) {
	t.Helper()
	if err := cluster.Exec(ctx, "postgres", "CREATE DATABASE "+db); err != nil {
		t.Fatal(err)
	}
	role, login, password := db+"_authenticated", db+"_login", "pw-"+db
	policy := session.Policy{DefaultRole: role, ClaimsSetting: "request.jwt.claims", ClaimPrefix: "jwt.claims."}
	sql, err := dbsetup.BootstrapSQL(dbsetup.BootstrapOptions{Policy: policy, Login: login, Database: db,
		Signer: signer, Leeway: 30 * time.Second, Harden: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := cluster.Exec(ctx, db, sql); err != nil {
		t.Fatal(err)
	}
	if err := cluster.Exec(ctx, db, `ALTER ROLE `+login+` PASSWORD `+sqlquote.Literal(password)+`;
		CREATE TABLE public.notes (id int PRIMARY KEY, user_id text NOT NULL, content text);
		ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY;
		CREATE POLICY notes_owner ON public.notes USING (user_id = (SELECT auth.user_id()));
		GRANT SELECT, INSERT, UPDATE, DELETE ON public.notes TO `+role); err != nil {
		t.Fatal(err)
	}
	return cluster.URL(login, password, db), policy
}
