package dbsetup_test

import (
	"github.com/rlsproxy/rlsproxy/internal/sqlquote"

	"github.com/rlsproxy/rlsproxy/internal/dbsetup"

	"context"
	"encoding/json"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rlsproxy/rlsproxy/auth"
	"github.com/rlsproxy/rlsproxy/session"
)

// finding is a finding a scenario expects: its severity, its check, and a
// part of its message.
type finding struct{ severity, check, text string }

func problem(check, text string) finding { return finding{dbsetup.SeverityProblem, check, text} }
func warning(check, text string) finding { return finding{dbsetup.SeverityWarning, check, text} }

// unsignedWarnings are the findings in a database set up without a signing
// key, checked without one: the login role reaches every mapped role, and
// claims are not signed.
var unsignedWarnings = []finding{
	warning("membership", "which is a member of every mapped role"),
	warning("signing-key", "claims are not signed"),
}

// Check finds nothing in a database set up by the bootstrap SQL (signed,
// hardened, as rlsproxy sql prints it) with an RLS table, and then finds
// each gap, opened one at a time, with a message that names the object.
// Every scenario has its own database and its own roles, login roles
// included: roles are cluster-wide, and a login role shared between
// scenarios would be a member of every scenario's mapped role, which Check
// rightly reports.
func TestCheck(t *testing.T) {
	signer := testSigner(t)
	other, err := session.NewSigner([]byte(strings.Repeat("o", 64)))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		// gap is SQL run as superuser after the bootstrap; {db}, {role},
		// {login} (the --upstream login), {slogin} (the login sessions of
		// {role} run as: its own with a key, {login} without) and {admin}
		// (a second mapped role, with admin set) are replaced.
		gap         string
		checkSigner *session.Signer // Check's signer; the bootstrap's when nil
		// unsigned: bootstrap and Check without a key; noBootSigner,
		// noSigner: one of them without.
		unsigned, noBootSigner, noSigner bool
		transition                       bool // bootstrap with --transition
		admin                            bool // a second mapped role, {db}_admin (--role-map admins=...)
		// want are the findings expected, each at least once. Any other
		// finding fails the scenario, but for the two warnings of every
		// unsigned database (unsignedWarnings) in unsigned scenarios.
		want []finding
	}{
		{name: "clean"},
		{name: "clean_two_roles", admin: true},
		{name: "unsigned_clean", unsigned: true, want: unsignedWarnings},
		{name: "transition", transition: true, want: []finding{
			warning("membership", "the login role chk_transition_login is still a member of every mapped role (chk_transition_authenticated) (a transition"),
		}},

		// The --upstream login.
		{name: "membership", gap: "CREATE ROLE {db}_admin; GRANT {db}_admin TO {login}",
			want: []finding{problem("membership", "the login role chk_membership_login is a member of role chk_membership_admin, which is not a mapped role: sessions do not run as")}},
		{name: "unsigned_membership", unsigned: true, gap: "CREATE ROLE {db}_admin; GRANT {db}_admin TO {login}",
			want: []finding{problem("membership", "is a member of role chk_unsigned_membership_admin, which is not a mapped role: a session that escapes its mapped role can SET ROLE")}},
		{name: "unsigned_indirect_membership", unsigned: true, gap: "CREATE ROLE {db}_owner; GRANT {db}_owner TO {role}",
			want: []finding{problem("membership", "the login role chk_unsigned_indirect_membership_login is a member of role chk_unsigned_indirect_membership_owner (through chk_unsigned_indirect_membership_authenticated)")}},
		{name: "unsigned_not_member", unsigned: true, gap: "REVOKE {role} FROM {login}",
			want: []finding{problem("mapped-role", "chk_unsigned_not_member_login is not a member of role chk_unsigned_not_member_authenticated")}},
		{name: "unsigned_setting", unsigned: true, gap: "ALTER ROLE {login} SET jwt.claims.email = 'x'",
			want: []finding{warning("login-settings", "the login role chk_unsigned_setting_login, which every session logs in as, carries settings of its own: jwt.claims.email (in every database)")}},

		// The login of the mapped role, with a key.
		{name: "indirect_membership", gap: "CREATE ROLE {db}_owner; GRANT {db}_owner TO {role}",
			want: []finding{problem("membership", "is a member of role chk_indirect_membership_owner (through chk_indirect_membership_authenticated), which is not a mapped role")}},
		{name: "login_other_role", gap: "CREATE ROLE {db}_ops; GRANT {db}_ops TO {slogin}",
			want: []finding{problem("membership", "is a member of role chk_login_other_role_ops, which is not a mapped role: a session of chk_login_other_role_authenticated can SET ROLE chk_login_other_role_ops")}},
		{name: "login_other_mapped", admin: true, gap: "GRANT {admin} TO {slogin}", want: []finding{
			problem("membership", "is a member of role chk_login_other_mapped_admin, another mapped role: a session of chk_login_other_mapped_authenticated can SET ROLE chk_login_other_mapped_admin"),
			// The round trip proves it on a live session.
			problem("round-trip", "a session of role chk_login_other_mapped_authenticated can become role chk_login_other_mapped_admin"),
		}},
		{name: "login_missing", gap: "DROP OWNED BY {slogin}; DROP ROLE {slogin}",
			want: []finding{problem("session-login", "which sessions of role chk_login_missing_authenticated log in as with --signing-key-file, does not exist")}},
		{name: "login_nologin", gap: "ALTER ROLE {slogin} NOLOGIN",
			want: []finding{problem("session-login", "cannot log in (NOLOGIN): sessions of chk_login_nologin_authenticated cannot open")}},
		{name: "not_member", gap: "REVOKE {role} FROM {slogin}",
			want: []finding{problem("session-login", "is not a member of chk_not_member_authenticated: sessions of chk_not_member_authenticated cannot open")}},
		{name: "login_inherit", gap: "ALTER ROLE {slogin} INHERIT",
			want: []finding{warning("session-login", "which sessions of role chk_login_inherit_authenticated log in as, inherits the rights of its roles")}},
		{name: "login_bypassrls", gap: "ALTER ROLE {slogin} BYPASSRLS",
			want: []finding{problem("session-login", "has BYPASSRLS")}},
		{name: "login_setting", gap: "ALTER ROLE {slogin} SET jwt.claims.email = 'x'",
			want: []finding{problem("login-settings", "carries settings of its own: jwt.claims.email (in every database); a session that reached its login may have planted them")}},
		{name: "login_setting_db", gap: "ALTER ROLE {slogin} IN DATABASE {db} SET jwt.claims.email = 'x'",
			want: []finding{problem("login-settings", "carries settings of its own: jwt.claims.email (in database chk_login_setting_db)")}},
		{name: "login_password", gap: "ALTER ROLE {slogin} PASSWORD 'changed-by-a-session'",
			want: []finding{problem("signing-key", "or the password of login role")}},
		{name: "wall_owner", gap: "INSERT INTO public.notes VALUES (1, 'someone-else', 'secret'); ALTER TABLE public.notes OWNER TO {slogin}", want: []finding{
			problem("table-owner", "table public.notes is owned by login role"),
			// The round trip proves it: RESET ROLE reads the row.
			problem("round-trip", "still reads rows of table public.notes"),
		}},
		{name: "key_readable_login", gap: "GRANT SELECT ON auth.signing_key TO {slogin}",
			want: []finding{problem("signing-key", "which sessions log in as, can read auth.signing_key")}},

		// Policies.
		{name: "policy_claims", gap: `CREATE TABLE public.docs (id int, owner text);
			ALTER TABLE public.docs ENABLE ROW LEVEL SECURITY;
			CREATE POLICY docs_sub ON public.docs USING (owner = current_setting('jwt.claims.sub'));
			CREATE POLICY docs_claims ON public.docs FOR INSERT WITH CHECK (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
			CREATE POLICY docs_computed ON public.docs FOR DELETE USING (owner = current_setting('jwt.claims.' || 'sub'));
			CREATE POLICY docs_other ON public.docs FOR UPDATE USING (current_setting('app.tenant') = 'a')`, want: []finding{
			warning("policy-claims", "policy docs_sub on table public.docs reads jwt.claims.sub with current_setting()"),
			warning("policy-claims", "policy docs_claims on table public.docs reads request.jwt.claims"),
			warning("policy-claims", "policy docs_computed on table public.docs reads jwt.claims."),
		}},

		// Unchanged by per-role logins.
		{name: "bypassrls", gap: "ALTER ROLE {role} BYPASSRLS",
			want: []finding{problem("mapped-role", "mapped role chk_bypassrls_authenticated has BYPASSRLS")}},
		{name: "rls_off", gap: "CREATE TABLE public.open (id int); GRANT SELECT ON public.open TO {role}",
			want: []finding{problem("table-rls", "table public.open has row-level security off and role chk_rls_off_authenticated can read it")}},
		{name: "owner", gap: "CREATE TABLE public.mine (id int); ALTER TABLE public.mine ENABLE ROW LEVEL SECURITY; ALTER TABLE public.mine OWNER TO {role}",
			want: []finding{problem("table-owner", "table public.mine is owned by mapped role chk_owner_authenticated, and does not FORCE")}},
		{name: "truncate", gap: "GRANT TRUNCATE ON public.notes TO {role}",
			want: []finding{problem("table-truncate", "can TRUNCATE table public.notes")}},
		{name: "view", gap: "CREATE VIEW public.all_notes AS SELECT * FROM public.notes; GRANT SELECT ON public.all_notes TO {role}",
			want: []finding{warning("view", "view public.all_notes runs with the rights of its owner postgres")}},
		{name: "temp", gap: "GRANT TEMPORARY ON DATABASE {db} TO PUBLIC",
			want: []finding{warning("temp", "may create temporary objects in database chk_temp")}},
		{name: "plpgsql", gap: "GRANT USAGE ON LANGUAGE plpgsql TO PUBLIC",
			want: []finding{warning("language", "may use language plpgsql")}},
		{name: "set_config", gap: "GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO PUBLIC",
			want: []finding{warning("set_config", "may execute set_config()")}},
		// The "$user" schemas, reserved by the bootstrap.
		{name: "user_schema_reserved", gap: "GRANT CREATE ON DATABASE {db} TO {role}"},
		{name: "user_schema", gap: "GRANT CREATE ON DATABASE {db} TO {role}; DROP SCHEMA {role}",
			want: []finding{problem("user-schema", "role chk_user_schema_authenticated may create schemas and no schema chk_user_schema_authenticated exists")}},
		{name: "user_schema_owned", gap: "ALTER SCHEMA {role} OWNER TO {role}",
			want: []finding{problem("schema", "schema chk_user_schema_owned_authenticated is owned by chk_user_schema_owned_authenticated")}},
		{name: "no_auth", gap: "DROP SCHEMA auth CASCADE",
			want: []finding{problem("auth", "schema auth does not exist")}},
		{name: "other_key", checkSigner: other,
			want: []finding{problem("signing-key", "does not match --signing-key-file")}},
		{name: "unsigned_db", noBootSigner: true, want: []finding{
			problem("signing-key", "table auth.signing_key does not exist"),
			problem("session-login", "does not exist: sessions of chk_unsigned_db_authenticated cannot open"),
			warning("membership", "is still a member of every mapped role"),
		}},
		{name: "no_key_flag", noSigner: true, want: []finding{
			problem("signing-key", "no --signing-key-file is set"),
			// rlsproxy sql with a key revoked the role from the login.
			problem("mapped-role", "chk_no_key_flag_login is not a member of role chk_no_key_flag_authenticated"),
		}},
		{name: "empty_key", gap: "DELETE FROM auth.signing_key",
			want: []finding{problem("signing-key", "table auth.signing_key is empty")}},
		{name: "key_readable", gap: "GRANT SELECT ON auth.signing_key TO {role}",
			want: []finding{problem("signing-key", "chk_key_readable_authenticated can read auth.signing_key")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			boot, chk := signer, signer
			if tc.checkSigner != nil {
				chk = tc.checkSigner
			}
			if tc.noBootSigner || tc.unsigned {
				boot = nil
			}
			if tc.noSigner || tc.unsigned {
				chk = nil
			}
			db := "chk_" + tc.name
			dsn, policy := checkDatabase(t, ctx, db, dbOptions{signer: boot, transition: tc.transition, admin: tc.admin})
			if tc.gap != "" {
				role, login := db+"_authenticated", db+"_login"
				slogin := login
				if chk != nil {
					slogin = session.LoginFor(login, role)
				}
				gap := strings.NewReplacer("{db}", db, "{role}", role, "{login}", login,
					"{slogin}", sqlquote.Ident(slogin), "{admin}", db+"_admin").Replace(tc.gap)
				if err := cluster.Exec(ctx, db, gap); err != nil {
					t.Fatalf("%s: %v", gap, err)
				}
			}
			findings := runCheck(t, ctx, dsn, policy, chk)
			allowed := tc.want
			if tc.unsigned {
				allowed = append(slices.Clip(allowed), unsignedWarnings...)
			}
			matched := make([]bool, len(allowed))
			for _, f := range findings {
				t.Logf("%s %s: %s (fix: %s)", f.Severity, f.Check, f.Message, f.Fix)
				if f.Fix == "" {
					t.Errorf("finding without a fix: %+v", f)
				}
				expected := false
				for i, w := range allowed {
					if f.Severity == w.severity && f.Check == w.check && strings.Contains(f.Message, w.text) {
						matched[i], expected = true, true
					}
				}
				if !expected {
					// Nothing but the gap opened: no other finding.
					t.Errorf("unexpected %s %s: %s", f.Severity, f.Check, f.Message)
				}
			}
			for i, w := range tc.want {
				if !matched[i] {
					t.Errorf("no %s %s finding containing %q", w.severity, w.check, w.text)
				}
			}
		})
	}
}

// The fix of a policy-claims warning is runnable SQL that reads the same
// claims through the auth functions: once run, the warnings are gone and
// the policies still give each user their own rows.
func TestCheckPolicyFix(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	signer := testSigner(t)
	db := "chk_policy_fix"
	dsn, policy := checkDatabase(t, ctx, db, dbOptions{signer: signer})
	role := db + "_authenticated"
	if err := cluster.Exec(ctx, db, `CREATE TABLE public.docs (id int, owner text, tenant text);
		ALTER TABLE public.docs ENABLE ROW LEVEL SECURITY;
		CREATE POLICY docs_sub ON public.docs USING (owner = current_setting('jwt.claims.sub'))
			WITH CHECK (owner = pg_catalog.current_setting('jwt.claims.sub', true));
		CREATE POLICY "Docs Tenant" ON public.docs AS RESTRICTIVE FOR SELECT
			USING (tenant IS NULL OR tenant = (current_setting('request.jwt.claims', true)::jsonb ->> 'tenant')
				OR tenant = current_setting('jwt.claims.tenant', true));
		INSERT INTO public.docs VALUES (1, 'rlsproxy-check', NULL), (2, 'someone-else', NULL);
		GRANT SELECT, INSERT ON public.docs TO `+role); err != nil {
		t.Fatal(err)
	}
	var fixes []string
	for _, f := range runCheck(t, ctx, dsn, policy, signer) {
		t.Logf("%s %s: %s (fix: %s)", f.Severity, f.Check, f.Message, f.Fix)
		if f.Check == "policy-claims" {
			fixes = append(fixes, f.Fix)
		}
	}
	if len(fixes) != 2 {
		t.Fatalf("%d policy-claims findings, want 2", len(fixes))
	}
	for _, fix := range fixes {
		if !strings.HasPrefix(fix, "ALTER POLICY ") || strings.Contains(fix, "current_setting") {
			t.Fatalf("fix %q", fix)
		}
		if err := cluster.Exec(ctx, db, fix); err != nil {
			t.Fatalf("%s: %v", fix, err)
		}
	}
	for _, f := range runCheck(t, ctx, dsn, policy, signer) {
		t.Errorf("after the fixes: %s %s: %s", f.Severity, f.Check, f.Message)
	}

	// A session of the check's subject still sees its own row only.
	d, err := session.NewDialer(dsn, signer)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := d.ConnectAs(ctx, role)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	grant, err := policy.Grant(testIdentity(t, dbsetup.CheckSubject), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if err := session.Install(ctx, conn, grant, signer); err != nil {
		t.Fatal(err)
	}
	res, err := conn.Exec(ctx, "SELECT string_agg(id::text, ',') FROM public.docs").ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if got := string(res[0].Rows[0][0]); got != "1" {
		t.Errorf("rows %q, want 1", got)
	}
}

// runCheck runs Check as rlsproxy check does: connected as the login role,
// with the dialer's Connect and ConnectAs.
func runCheck(t *testing.T, ctx context.Context, dsn string, policy session.Policy, signer *session.Signer) []dbsetup.Finding {
	t.Helper()
	d, err := session.NewDialer(dsn, signer)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := d.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	findings, err := dbsetup.Check(ctx, conn, dbsetup.CheckOptions{
		Policy: policy, Login: d.User(), Signer: signer, Connect: d.Connect, ConnectAs: d.ConnectAs,
	})
	if err != nil {
		t.Fatal(err)
	}
	return findings
}

// dbOptions shape a scenario's database: the bootstrap's signer (nil:
// unsigned), --transition, and a second mapped role.
type dbOptions struct {
	signer            *session.Signer
	transition, admin bool
}

// checkDatabase creates database db with the bootstrap SQL (hardened,
// signed with o.signer if set), roles <db>_authenticated (and <db>_admin,
// mapped from group admins, with o.admin) and the login <db>_login, and an
// RLS table notes granted to the mapped role. It returns the login role's
// DSN and the policy.
func checkDatabase(t *testing.T, ctx context.Context, db string, o dbOptions) (string, session.Policy) {
	t.Helper()
	if err := cluster.Exec(ctx, "postgres", "CREATE DATABASE "+db); err != nil {
		t.Fatal(err)
	}
	role, login, password := db+"_authenticated", db+"_login", "pw-"+db
	policy := session.Policy{DefaultRole: role, ClaimsSetting: "request.jwt.claims", ClaimPrefix: "jwt.claims."}
	if o.admin {
		policy.RoleClaim = "groups"
		policy.RoleMap = []session.RoleRule{{Group: "admins", Role: db + "_admin"}}
	}
	sql, err := dbsetup.BootstrapSQL(dbsetup.BootstrapOptions{Policy: policy, Login: login, Database: db,
		Signer: o.signer, Leeway: 30 * time.Second, Harden: true, Transition: o.transition})
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

// testIdentity is a verified token of subject sub that expires in a minute.
func testIdentity(t *testing.T, sub string) *auth.Identity {
	t.Helper()
	claims := map[string]any{"sub": sub, "exp": json.Number(strconv.FormatInt(time.Now().Add(time.Minute).Unix(), 10))}
	js, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	return &auth.Identity{Subject: sub, Claims: claims, ClaimsJSON: string(js)}
}
