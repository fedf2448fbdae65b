package dbsetup

import (
	"github.com/rlsproxy/rlsproxy/internal/sqlquote"

	"github.com/rlsproxy/rlsproxy/session"

	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/rlsproxy/rlsproxy/auth"
)

// Severities of a Finding.
const (
	// SeverityProblem: RLS can be bypassed, or the proxy cannot work as
	// configured. `rlsproxy check` exits non-zero.
	SeverityProblem = "problem"
	// SeverityWarning: a door another layer (the guard, signed claims)
	// already watches, or a risk that depends on how the database is used.
	SeverityWarning = "warning"
)

// Finding is one gap `rlsproxy check` found in a live database.
type Finding struct {
	Severity string // SeverityProblem or SeverityWarning
	// Check names the rule that found it: login-role, membership,
	// mapped-role, table-rls, table-owner, table-truncate, view, schema,
	// temp, language, set_config, signal-backend, pg_stat_activity, auth,
	// signing-key, round-trip.
	Check   string
	Message string // names the object, in words a DBA can act on
	Fix     string // the SQL or command that closes the gap
}

// CheckOptions describe the proxy configuration to check a database against.
type CheckOptions struct {
	Policy session.Policy
	// Login is the service login role (the --upstream user); empty means
	// the session user of the connection.
	Login string
	// Signer is the --signing-key-file secret; nil when claims are unsigned.
	Signer *session.Signer
	// Connect opens a new connection with the --upstream credentials, for
	// the round trip that proves sessions work and the signing key matches.
	// It must be a separate connection: Install commits its settings and
	// role for the session, which would then run the remaining catalog
	// queries as the mapped role. Nil skips the round trip.
	Connect func(ctx context.Context) (*pgconn.PgConn, error)
}

// CheckSubject is the sub of the claims the round trip installs.
const CheckSubject = "rlsproxy-check"

// Check inspects the database conn is connected to (as the login role) and
// reports what would weaken row-level security through the proxy: the
// least-privilege layer of THREATS.md, the auth schema and the signing key.
// It only reads the catalogs and changes nothing in the database. Every
// value travels as a bind parameter; names in Fix are quoted identifiers.
func Check(ctx context.Context, conn *pgconn.PgConn, o CheckOptions) ([]Finding, error) {
	c := &checker{conn: conn, o: o}
	if err := c.run(ctx); err != nil {
		return c.findings, err
	}
	return c.findings, nil
}

type checker struct {
	conn     *pgconn.PgConn
	o        CheckOptions
	login    string
	database string
	// roles are the mapped roles that exist; plain are those of them that
	// are neither superuser nor BYPASSRLS: per-object checks run for these
	// only, since the other two pass every check and are reported already.
	roles, plain []string
	// unreachable are mapped roles the login role is not a member of.
	unreachable []string
	findings    []Finding
}

func (c *checker) problem(check, fix, format string, args ...any) {
	c.findings = append(c.findings, Finding{SeverityProblem, check, fmt.Sprintf(format, args...), fix})
}

func (c *checker) warning(check, fix, format string, args ...any) {
	c.findings = append(c.findings, Finding{SeverityWarning, check, fmt.Sprintf(format, args...), fix})
}

func (c *checker) run(ctx context.Context) error {
	rows, err := c.query(ctx, `SELECT session_user, pg_catalog.current_database()`)
	if err != nil {
		return fmt.Errorf("check: reading the session: %w", err)
	}
	c.login, c.database = rows[0].str(0), rows[0].str(1)
	if c.o.Login != "" {
		c.login = c.o.Login
	}
	mapped := c.o.Policy.Roles()
	if len(mapped) == 0 {
		return errors.New("check: no mapped roles: set --role, --role-map or --anonymous-role")
	}
	steps := []struct {
		what string
		fn   func(context.Context) (bool, error)
	}{
		{"the login role", c.checkLogin},
		{"the mapped roles", c.checkMappedRoles},
		{"memberships", c.checkMemberships},
		{"tables", c.checkTables},
		{"tables owned by the login role", c.checkLoginTables},
		{"schemas", c.checkSchemas},
		{"privileges", c.checkPrivileges},
		{"the auth schema", c.checkAuth},
	}
	for _, s := range steps {
		more, err := s.fn(ctx)
		if err != nil {
			return fmt.Errorf("check %s: %w", s.what, err)
		}
		if !more {
			return nil
		}
	}
	return nil
}

// checkLogin reports attributes of the login role that outrank RLS. It
// returns false when the role does not exist, since the other checks ask
// about its memberships.
func (c *checker) checkLogin(ctx context.Context) (bool, error) {
	login := sqlquote.Ident(c.login)
	if slices.Contains(c.o.Policy.Roles(), c.login) {
		c.problem("login-role", "map tokens to roles without LOGIN (see rlsproxy sql) and keep "+login+" for the proxy alone",
			"the login role %s is also a mapped role: clients would run as the service login, which can switch to every mapped role", c.login)
	}
	rows, err := c.query(ctx, `SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolreplication, rolinherit
		FROM pg_catalog.pg_roles WHERE rolname = $1`, c.login)
	if err != nil {
		return false, err
	}
	if len(rows) == 0 {
		c.problem("login-role", "check the user of --upstream", "the login role %s does not exist", c.login)
		return false, nil
	}
	r := rows[0]
	for _, a := range []struct {
		col        int
		attr, why  string
		isProblem  bool
		fixKeyword string
	}{
		{0, "SUPERUSER", "a superuser bypasses row-level security and every privilege", true, "NOSUPERUSER"},
		{1, "BYPASSRLS", "it bypasses row-level security", true, "NOBYPASSRLS"},
		{2, "CREATEROLE", "it can create roles and grant itself their rights", true, "NOCREATEROLE"},
		{4, "REPLICATION", "it can stream every row of the cluster", true, "NOREPLICATION"},
		{3, "CREATEDB", "it can create databases it owns", false, "NOCREATEDB"},
	} {
		if !r.bool(a.col) {
			continue
		}
		add := c.warning
		if a.isProblem {
			add = c.problem
		}
		add("login-role", "ALTER ROLE "+login+" "+a.fixKeyword+";",
			"the login role %s has %s: %s, and a session that gets back to the login role has it too", c.login, a.attr, a.why)
	}
	if r.bool(5) {
		c.warning("login-role", "ALTER ROLE "+login+" NOINHERIT;",
			"the login role %s inherits the rights of its roles: with NOINHERIT it holds none of them itself, so a session that gets back to it can read nothing", c.login)
	}
	return true, nil
}

// checkMappedRoles reports mapped roles that are missing, that the login
// role cannot switch to, or that have attributes RLS does not stop.
func (c *checker) checkMappedRoles(ctx context.Context) (bool, error) {
	rows, err := c.query(ctx, `SELECT m.r, p.rolname IS NOT NULL,
			coalesce(p.rolsuper, false), coalesce(p.rolbypassrls, false), coalesce(p.rolcreaterole, false),
			coalesce(p.rolreplication, false), coalesce(p.rolcanlogin, false), coalesce(p.rolcreatedb, false),
			p.rolname IS NOT NULL AND pg_catalog.pg_has_role($2, p.oid, 'MEMBER')
		FROM unnest($1::text[]) WITH ORDINALITY AS m(r, i)
		LEFT JOIN pg_catalog.pg_roles p ON p.rolname = m.r
		ORDER BY m.i`, c.o.Policy.Roles(), c.login)
	if err != nil {
		return false, err
	}
	for _, r := range rows {
		name := r.str(0)
		role := sqlquote.Ident(name)
		if !r.bool(1) {
			c.problem("mapped-role", "rlsproxy sql | psql (as a superuser), or: CREATE ROLE "+role+" NOLOGIN; GRANT "+role+" TO "+sqlquote.Ident(c.login)+";",
				"role %s does not exist: sessions mapped to it cannot open", name)
			continue
		}
		c.roles = append(c.roles, name)
		if !r.bool(2) && !r.bool(3) {
			c.plain = append(c.plain, name)
		}
		if !r.bool(8) {
			c.unreachable = append(c.unreachable, name)
			c.problem("mapped-role", "GRANT "+role+" TO "+sqlquote.Ident(c.login)+";",
				"the login role %s is not a member of role %s: the proxy cannot switch sessions to it", c.login, name)
		}
		for _, a := range []struct {
			col       int
			attr, why string
			isProblem bool
			keyword   string
		}{
			{2, "SUPERUSER", "a superuser bypasses row-level security and every privilege", true, "NOSUPERUSER"},
			{3, "BYPASSRLS", "row-level security does not apply to its sessions at all", true, "NOBYPASSRLS"},
			{4, "CREATEROLE", "its sessions can create roles and grant themselves their rights", true, "NOCREATEROLE"},
			{5, "REPLICATION", "its sessions can stream every row of the cluster", true, "NOREPLICATION"},
			{6, "LOGIN", "anyone with its password connects directly, without a token and without the proxy", false, "NOLOGIN"},
			{7, "CREATEDB", "its sessions can create databases they own", false, "NOCREATEDB"},
		} {
			if !r.bool(a.col) {
				continue
			}
			add := c.warning
			if a.isProblem {
				add = c.problem
			}
			add("mapped-role", "ALTER ROLE "+role+" "+a.keyword+";", "mapped role %s has %s: %s", name, a.attr, a.why)
		}
	}
	return true, nil
}

// checkMemberships reports every role the login role can become, directly
// or through other roles, beyond the mapped ones: SET ROLE is checked
// against the session user, so a session that escapes its mapped role can
// become any of them (THREATS.md).
func (c *checker) checkMemberships(ctx context.Context) (bool, error) {
	rows, err := c.query(ctx, `WITH RECURSIVE m(roleid, path) AS (
			SELECT a.roleid, ARRAY[]::name[]
			FROM pg_catalog.pg_auth_members a JOIN pg_catalog.pg_roles l ON l.oid = a.member
			WHERE l.rolname = $1
		UNION ALL
			SELECT a.roleid, m.path || r.rolname
			FROM m JOIN pg_catalog.pg_auth_members a ON a.member = m.roleid
			JOIN pg_catalog.pg_roles r ON r.oid = m.roleid
		)
		SELECT DISTINCT ON (r.rolname) r.rolname, coalesce(m.path[cardinality(m.path)]::text, $1), array_to_string(m.path, ' -> ')
		FROM m JOIN pg_catalog.pg_roles r ON r.oid = m.roleid
		WHERE r.rolname <> ALL ($2::text[])
		ORDER BY r.rolname, cardinality(m.path)`, c.login, c.o.Policy.Roles())
	if err != nil {
		return false, err
	}
	for _, r := range rows {
		name, member, path := r.str(0), r.str(1), r.str(2)
		via := ""
		if path != "" {
			via = " (through " + path + ")"
		}
		c.problem("membership", "REVOKE "+sqlquote.Ident(name)+" FROM "+sqlquote.Ident(member)+";",
			"the login role %s is a member of role %s%s, which is not a mapped role: a session that escapes its mapped role can SET ROLE %s and gain its rights",
			c.login, name, via, name)
	}
	return true, nil
}

// userRelations filters out the schemas the checks skip: the catalogs, TOAST and
// temporary schemas, and auth (checked on its own).
const userRelations = `n.nspname NOT IN ('pg_catalog', 'information_schema', 'auth') AND n.nspname !~ '^pg_(toast|temp_)'`

// checkTables reports tables, views and materialized views in schemas the
// mapped roles can use, through which a session reads or changes rows that
// RLS does not filter.
func (c *checker) checkTables(ctx context.Context) (bool, error) {
	if len(c.plain) == 0 {
		return true, nil
	}
	rows, err := c.query(ctx, `SELECT n.nspname, c.relname, c.relkind, c.relrowsecurity, c.relforcerowsecurity,
			pg_catalog.pg_get_userbyid(c.relowner), r.role,
			pg_catalog.has_any_column_privilege(r.role, c.oid, 'SELECT'),
			pg_catalog.has_any_column_privilege(r.role, c.oid, 'INSERT, UPDATE')
				OR pg_catalog.has_table_privilege(r.role, c.oid, 'DELETE'),
			pg_catalog.has_table_privilege(r.role, c.oid, 'TRUNCATE'),
			pg_catalog.pg_has_role(r.role, c.relowner, 'USAGE'),
			coalesce((SELECT e.extname FROM pg_catalog.pg_depend d
				JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
				WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
				AND d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e' LIMIT 1), ''),
			coalesce((SELECT o.option_value FROM pg_catalog.pg_options_to_table(c.reloptions) o
				WHERE o.option_name = 'security_invoker'), 'false')::bool
		FROM pg_catalog.pg_class c
		JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
		CROSS JOIN unnest($1::text[]) WITH ORDINALITY AS r(role, i)
		WHERE c.relkind IN ('r', 'p', 'v', 'm') AND `+userRelations+`
		AND pg_catalog.has_schema_privilege(r.role, n.oid, 'USAGE')
		ORDER BY n.nspname, c.relname, r.i`, c.plain)
	if err != nil {
		return false, err
	}
	for _, r := range rows {
		schema, rel, kind := r.str(0), r.str(1), r.str(2)
		rls, force, owner, role := r.bool(3), r.bool(4), r.str(5), r.str(6)
		read, write, truncate, owns := r.bool(7), r.bool(8), r.bool(9), r.bool(10)
		ext, invoker := r.str(11), r.bool(12)
		name := schema + "." + rel
		qname := sqlquote.Ident(schema, rel)
		// Objects of an extension (PostGIS's spatial_ref_sys, ...) are
		// usually public reference data: flag them, but as a warning.
		add, note := c.problem, ""
		if ext != "" {
			add, note = c.warning, " (it belongs to extension "+ext+")"
		}
		switch kind {
		case "v":
			if read && !invoker {
				c.warning("view", "ALTER VIEW "+qname+" SET (security_invoker = true);",
					"view %s runs with the rights of its owner %s (security_invoker is off) and role %s can read it: row-level security on the tables it reads is checked against %s, which bypasses it if it owns them or is a superuser%s",
					name, owner, role, owner, note)
			}
			continue
		case "m":
			if read {
				c.warning("view", "REVOKE ALL ON "+qname+" FROM "+sqlquote.Ident(role)+", PUBLIC;",
					"materialized view %s holds rows read with the rights of its owner %s, and role %s can read it: row-level security does not apply to materialized views%s",
					name, owner, role, note)
			}
			continue
		}
		ownedBy := "role " + owner + ", whose rights role " + role + " has,"
		if owner == role {
			ownedBy = "mapped role " + role + ","
		}
		ownerFix := "ALTER TABLE " + qname + " OWNER TO <a role that is not mapped>;  -- at the least: ALTER TABLE " + qname + " FORCE ROW LEVEL SECURITY;"
		switch {
		case !rls && (read || write):
			fix := "ALTER TABLE " + qname + " ENABLE ROW LEVEL SECURITY;  -- and CREATE POLICY ... ON " + qname + "; or: REVOKE ALL ON " + qname + " FROM " + sqlquote.Ident(role) + ", PUBLIC;"
			if owns {
				fix += "  -- and " + ownerFix
			}
			add("table-rls", fix, "table %s has row-level security off and role %s can %s it: every session of %s sees every row%s",
				name, role, access(read, write, truncate), role, note)
		case owns && !force:
			add("table-owner", ownerFix,
				"table %s is owned by %s and does not FORCE row-level security: its owner bypasses RLS, so every session of %s sees every row%s",
				name, ownedBy, role, note)
		case owns:
			c.warning("table-owner", "ALTER TABLE "+qname+" OWNER TO <a role that is not mapped>;",
				"table %s is owned by %s: FORCE ROW LEVEL SECURITY applies RLS to it, but as owner its sessions can still DISABLE row-level security, drop policies or drop the table%s",
				name, ownedBy, note)
		case truncate:
			add("table-truncate", "REVOKE TRUNCATE ON "+qname+" FROM "+sqlquote.Ident(role)+", PUBLIC;",
				"role %s can TRUNCATE table %s, which row-level security does not restrict: any session can delete every row%s",
				role, name, note)
		}
	}
	return true, nil
}

func access(read, write, truncate bool) string {
	switch {
	case read && (write || truncate):
		return "read and change"
	case read:
		return "read"
	default:
		return "change"
	}
}

// checkLoginTables reports tables the login role owns without FORCE: the
// proxy's sessions never run as the login role, but if one got back to it
// (the guard's layer failing) it would see every row.
func (c *checker) checkLoginTables(ctx context.Context) (bool, error) {
	rows, err := c.query(ctx, `SELECT n.nspname, c.relname
		FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
		JOIN pg_catalog.pg_roles l ON l.rolname = $1
		WHERE c.relkind IN ('r', 'p') AND `+userRelations+`
		AND NOT c.relforcerowsecurity AND NOT l.rolsuper
		AND pg_catalog.pg_has_role(l.oid, c.relowner, 'USAGE')
		ORDER BY 1, 2`, c.login)
	if err != nil {
		return false, err
	}
	for _, r := range rows {
		qname := sqlquote.Ident(r.str(0), r.str(1))
		c.problem("table-owner", "ALTER TABLE "+qname+" OWNER TO <a role that is not the login role>;",
			"table %s.%s is owned by the login role %s and does not FORCE row-level security: a session that gets back to the login role sees every row",
			r.str(0), r.str(1), c.login)
	}
	return true, nil
}

// checkSchemas reports schemas a mapped role owns (its sessions can drop or
// replace any table in them) or can create objects in (functions, tables
// and views that other sessions of the same role may then run or read).
func (c *checker) checkSchemas(ctx context.Context) (bool, error) {
	if len(c.plain) == 0 {
		return true, nil
	}
	rows, err := c.query(ctx, `SELECT n.nspname, r.role, pg_catalog.pg_get_userbyid(n.nspowner),
			pg_catalog.pg_has_role(r.role, n.nspowner, 'USAGE')
		FROM pg_catalog.pg_namespace n CROSS JOIN unnest($1::text[]) WITH ORDINALITY AS r(role, i)
		WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp_)'
		AND (pg_catalog.pg_has_role(r.role, n.nspowner, 'USAGE')
			OR pg_catalog.has_schema_privilege(r.role, n.oid, 'CREATE'))
		ORDER BY n.nspname, r.i`, c.plain)
	if err != nil {
		return false, err
	}
	for _, r := range rows {
		schema, role, owner := r.str(0), r.str(1), r.str(2)
		if r.bool(3) {
			c.problem("schema", "ALTER SCHEMA "+sqlquote.Ident(schema)+" OWNER TO <a role that is not mapped>;",
				"schema %s is owned by %s, whose rights role %s has: its sessions can drop, rename or replace any table in it",
				schema, owner, role)
			continue
		}
		c.warning("schema", "REVOKE CREATE ON SCHEMA "+sqlquote.Ident(schema)+" FROM PUBLIC, "+sqlquote.Ident(role)+";",
			"role %s can create objects in schema %s: sessions can plant functions, tables or views there that other sessions of the same role then run or read",
			role, schema)
	}
	return true, nil
}

// checkPrivileges reports the defaults the hardening section of `rlsproxy
// sql` revokes. Each is a warning: the guard stops their use, and the
// hardening closes them so that the layer stands on its own.
func (c *checker) checkPrivileges(ctx context.Context) (bool, error) {
	if len(c.plain) == 0 {
		return true, nil
	}
	rows, err := c.query(ctx, `SELECT r.role,
			pg_catalog.has_database_privilege(r.role, pg_catalog.current_database(), 'TEMP'),
			coalesce(pg_catalog.has_function_privilege(r.role,
				pg_catalog.to_regprocedure('pg_catalog.set_config(text,text,boolean)'), 'EXECUTE'), false),
			coalesce(pg_catalog.has_function_privilege(r.role,
				pg_catalog.to_regprocedure('pg_catalog.pg_terminate_backend(integer,bigint)'), 'EXECUTE'), false),
			coalesce(pg_catalog.has_function_privilege(r.role,
				pg_catalog.to_regprocedure('pg_catalog.pg_cancel_backend(integer)'), 'EXECUTE'), false),
			coalesce(pg_catalog.has_table_privilege(r.role,
				pg_catalog.to_regclass('pg_catalog.pg_stat_activity'), 'SELECT'), false),
			array_to_string(ARRAY(SELECT l.lanname FROM pg_catalog.pg_language l
				WHERE l.lanispl AND l.lanpltrusted AND pg_catalog.has_language_privilege(r.role, l.oid, 'USAGE')
				ORDER BY l.lanname), ',')
		FROM unnest($1::text[]) WITH ORDINALITY AS r(role, i)
		ORDER BY r.i`, c.plain)
	if err != nil {
		return false, err
	}
	const harden = "  -- or: rlsproxy sql --harden <the proxy's flags> | psql"
	for _, r := range rows {
		role := r.str(0)
		if r.bool(1) {
			c.warning("temp", "REVOKE TEMPORARY ON DATABASE "+sqlquote.Ident(c.database)+" FROM PUBLIC, "+sqlquote.Ident(role)+";"+harden,
				"role %s may create temporary objects in database %s: temporary functions, triggers and rules run code that a statement filter does not see", role, c.database)
		}
		if langs := r.str(6); langs != "" {
			for _, l := range strings.Split(langs, ",") {
				c.warning("language", "REVOKE USAGE ON LANGUAGE "+sqlquote.Ident(l)+" FROM PUBLIC, "+sqlquote.Ident(role)+";"+harden,
					"role %s may use language %s: DO blocks and functions run dynamic SQL that a statement filter does not see", role, l)
			}
		}
		if r.bool(2) {
			c.warning("set_config", "REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) FROM PUBLIC, "+sqlquote.Ident(role)+";  -- then GRANT it to "+sqlquote.Ident(c.login)+harden,
				"role %s may execute set_config(): a session can rewrite its own claim settings (unless the guard or signed claims stop it)", role)
		}
		if r.bool(3) || r.bool(4) {
			c.warning("signal-backend", "REVOKE EXECUTE ON FUNCTION pg_catalog.pg_terminate_backend(integer, bigint), pg_catalog.pg_cancel_backend(integer) FROM PUBLIC, "+sqlquote.Ident(role)+";"+harden,
				"role %s may execute pg_terminate_backend() or pg_cancel_backend(): all its sessions share the role, so any user can end or cancel other users' sessions", role)
		}
		if r.bool(5) {
			c.warning("pg_stat_activity", "REVOKE SELECT ON pg_catalog.pg_stat_activity FROM PUBLIC, "+sqlquote.Ident(role)+";  -- then GRANT it to pg_monitor, "+sqlquote.Ident(c.login)+harden,
				"role %s may read pg_stat_activity: all its sessions share the role, so any user sees the queries of other users' sessions", role)
		}
	}
	return true, nil
}

// authFunctions are the functions policies call, as `rlsproxy sql` creates them.
var authFunctions = []string{"session", "claims", "user_id"}

// checkAuth reports a missing or unusable auth schema and signing key, then
// proves with a round trip that a session installed as the proxy does it
// reads its claims back through auth.user_id().
func (c *checker) checkAuth(ctx context.Context) (bool, error) {
	// The bootstrap SQL names the roles the proxy's flags name: the DBA
	// must run it with the same flags, so the fix says so.
	bootstrap := "rlsproxy sql <the proxy's flags> | psql -v ON_ERROR_STOP=1 (as a superuser)"
	if c.o.Signer != nil {
		bootstrap = "rlsproxy sql <the proxy's flags, --signing-key-file included> | psql -v ON_ERROR_STOP=1 (as a superuser)"
	}
	rows, err := c.query(ctx, `SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = 'auth'`)
	if err != nil {
		return false, err
	}
	if len(rows) == 0 {
		c.problem("auth", bootstrap,
			"schema auth does not exist: policies cannot call auth.user_id(), and claims cannot be verified in the database")
		return true, nil
	}
	rows, err = c.query(ctx, `SELECT f.name, r.role, p.oid IS NOT NULL,
			coalesce(pg_catalog.has_function_privilege(r.role, p.oid, 'EXECUTE')
				AND pg_catalog.has_schema_privilege(r.role, p.pronamespace, 'USAGE'), false)
		FROM unnest($1::text[]) WITH ORDINALITY AS f(name, i)
		LEFT JOIN unnest($2::text[]) WITH ORDINALITY AS r(role, j) ON true
		LEFT JOIN (pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace AND n.nspname = 'auth')
			ON p.proname = f.name AND p.pronargs = 0
		ORDER BY f.i, r.j`, authFunctions, c.roles)
	if err != nil {
		return false, err
	}
	broken := false
	missing := map[string]bool{}
	for _, r := range rows {
		fn, role := "auth."+r.str(0)+"()", r.str(1)
		switch {
		case !r.bool(2):
			if !missing[fn] {
				missing[fn] = true
				c.problem("auth", bootstrap, "function %s does not exist: policies that call it fail", fn)
			}
			broken = true
		case role == "":
			// No mapped role exists (reported already): nothing to grant.
		case !r.bool(3):
			c.problem("auth", "GRANT USAGE ON SCHEMA auth TO "+sqlquote.Ident(role)+"; GRANT EXECUTE ON FUNCTION "+fn+" TO "+sqlquote.Ident(role)+";",
				"role %s may not call %s: its sessions fail on every policy that calls it", role, fn)
			broken = true
		}
	}
	rows, err = c.query(ctx, `SELECT pg_catalog.has_table_privilege($1, c.oid, 'SELECT'),
			array_to_string(ARRAY(SELECT r.role FROM unnest($2::text[]) WITH ORDINALITY AS r(role, i)
				WHERE pg_catalog.has_table_privilege(r.role, c.oid, 'SELECT') ORDER BY r.i), ',')
		FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = 'auth' AND c.relname = 'signing_key'`, c.login, c.roles)
	if err != nil {
		return false, err
	}
	signed := len(rows) > 0
	switch {
	case c.o.Signer != nil && !signed:
		c.problem("signing-key", bootstrap,
			"table auth.signing_key does not exist: the auth functions were created without --signing-key-file, so they trust claim settings without checking their signature")
	case c.o.Signer == nil && !signed:
		c.warning("signing-key", "openssl rand -hex 32 > key; rlsproxy sql --signing-key-file key | psql; then run the proxy with --signing-key-file key",
			"claims are not signed: only the SQL guard stops a session from rewriting its claim settings")
	case c.o.Signer == nil && signed:
		c.problem("signing-key", "pass --signing-key-file with the key that rlsproxy sql provisioned",
			"the database verifies signed claims (table auth.signing_key exists) but no --signing-key-file is set: every session's auth.user_id() would fail")
	}
	if signed {
		if rows[0].bool(0) {
			c.warning("signing-key", "REVOKE ALL ON auth.signing_key FROM "+sqlquote.Ident(c.login)+";",
				"the login role %s can read auth.signing_key: a session that gets back to the login role can read the key and sign any claims", c.login)
		}
		if readers := rows[0].str(1); readers != "" {
			c.problem("signing-key", "REVOKE ALL ON auth.signing_key FROM PUBLIC, "+identList(strings.Split(readers, ","))+";",
				"role(s) %s can read auth.signing_key: any session can read the key and sign claims for any user", readers)
		}
	}
	if broken || (c.o.Signer == nil && signed) {
		// The round trip would only fail for the reason already reported.
		return true, nil
	}
	return true, c.roundTrip(ctx, bootstrap, signed)
}

// roundTrip installs test claims on a new connection exactly as the proxy
// does, and reads them back with auth.user_id(): this proves that the login
// role can switch to the role, and that the database holds the same signing
// key as --signing-key-file. With a key, it then checks that claims signed
// with another key are refused, which proves the functions verify at all.
// Only session state of that connection changes, and it is closed.
func (c *checker) roundTrip(ctx context.Context, bootstrap string, signed bool) error {
	if c.o.Connect == nil {
		if c.o.Signer != nil {
			c.warning("round-trip", "", "the signing key was not proved to match the database: no connection was given for the round trip")
		}
		return nil
	}
	grant, err := c.testGrant()
	if err != nil {
		c.warning("round-trip", "", "no round trip: %v", err)
		return nil
	}
	if !slices.Contains(c.roles, grant.Role) || slices.Contains(c.unreachable, grant.Role) {
		return nil // the install would fail for the reason reported already
	}
	conn, err := c.o.Connect(ctx)
	if err != nil {
		return fmt.Errorf("connecting for the round trip: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))

	if err := session.Install(ctx, conn, grant, c.o.Signer); err != nil {
		c.problem("round-trip", "GRANT "+sqlquote.Ident(grant.Role)+" TO "+sqlquote.Ident(c.login)+";  -- or: "+bootstrap,
			"the login role %s cannot open a session as role %s: %v", c.login, grant.Role, err)
		return nil
	}
	sub, err := userID(ctx, conn)
	switch {
	case err != nil && strings.Contains(err.Error(), "valid signature"):
		c.problem("signing-key", "rlsproxy sql --signing-key-file <the proxy's key file> <the proxy's other flags> | psql -v ON_ERROR_STOP=1 (as a superuser)",
			"the signing key in the database does not match --signing-key-file: auth.user_id() refused claims the proxy signed (%v)", err)
		return nil
	case err != nil && strings.Contains(err.Error(), "signing_key is empty"):
		c.problem("signing-key", bootstrap, "table auth.signing_key is empty: every signed session fails (%v)", err)
		return nil
	case err != nil && strings.Contains(err.Error(), "expired"):
		c.problem("round-trip", "synchronise the clocks of the database server and the proxy host (NTP)",
			"auth.user_id() says claims valid for 60 more seconds have expired: the database clock is ahead of this host's (%v)", err)
		return nil
	case err != nil:
		c.problem("round-trip", bootstrap, "auth.user_id() failed for a session as role %s: %v", grant.Role, err)
		return nil
	case sub != CheckSubject:
		c.problem("round-trip", bootstrap,
			"auth.user_id() returned %q for a session whose token has sub %q: check --claims-setting against the functions of rlsproxy sql", sub, CheckSubject)
		return nil
	}
	if c.o.Signer == nil || !signed {
		return nil
	}

	// The same claims, signed with a key the database cannot know. RESET
	// ROLE first, as the proxy's re-injection does: the mapped role may
	// not call set_config once hardened.
	other, err := randomSigner()
	if err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, "RESET ROLE").ReadAll(); err != nil {
		return fmt.Errorf("round trip: %w", err)
	}
	if err := session.Install(ctx, conn, grant, other); err != nil {
		return fmt.Errorf("round trip with a wrong key: %w", err)
	}
	if sub, err := userID(ctx, conn); err == nil {
		c.problem("signing-key", bootstrap,
			"auth.user_id() accepted claims signed with a wrong key (it returned %q): the auth functions do not verify signatures", sub)
	}
	return nil
}

// testGrant builds the grant the proxy would install for a token of
// CheckSubject that maps to the default role (or the first mapped group),
// through Policy.Grant, so the settings are those of a real session.
func (c *checker) testGrant() (*session.Grant, error) {
	p := c.o.Policy
	claims := map[string]any{
		"sub": CheckSubject,
		"exp": json.Number(strconv.FormatInt(time.Now().Add(time.Minute).Unix(), 10)),
	}
	if p.DefaultRole == "" && len(p.RoleMap) > 0 && p.RoleClaim != "" {
		claims[p.RoleClaim] = []any{p.RoleMap[0].Group}
	}
	js, err := json.Marshal(claims)
	if err != nil {
		return nil, err
	}
	return p.Grant(&auth.Identity{Subject: CheckSubject, Claims: claims, ClaimsJSON: js}, slog.New(slog.DiscardHandler))
}

func userID(ctx context.Context, conn *pgconn.PgConn) (string, error) {
	res := conn.ExecParams(ctx, `SELECT auth.user_id()`, nil, nil, nil, nil).Read()
	if res.Err != nil {
		return "", res.Err
	}
	if len(res.Rows) != 1 || res.Rows[0][0] == nil {
		return "", nil
	}
	return string(res.Rows[0][0]), nil
}

func randomSigner() (*session.Signer, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	return session.NewSigner([]byte(hex.EncodeToString(b)))
}

// row is one result row in text format.
type row [][]byte

func (r row) str(i int) string { return string(r[i]) }

func (r row) bool(i int) bool { return string(r[i]) == "t" }

// query runs sql with args as bind parameters: string as text, []string as
// text[] (binary). Results come back in text format.
func (c *checker) query(ctx context.Context, sql string, args ...any) ([]row, error) {
	params := make([][]byte, len(args))
	oids := make([]uint32, len(args))
	formats := make([]int16, len(args))
	m := pgtype.NewMap()
	for i, a := range args {
		switch v := a.(type) {
		case string:
			params[i], oids[i] = []byte(v), pgtype.TextOID
		case []string:
			if v == nil {
				v = []string{} // an empty array, not NULL
			}
			b, err := m.Encode(pgtype.TextArrayOID, pgtype.BinaryFormatCode, v, nil)
			if err != nil {
				return nil, err
			}
			params[i], oids[i], formats[i] = b, pgtype.TextArrayOID, pgtype.BinaryFormatCode
		default:
			return nil, fmt.Errorf("query parameter of type %T", a)
		}
	}
	res := c.conn.ExecParams(ctx, sql, params, oids, formats, nil).Read()
	if res.Err != nil {
		return nil, res.Err
	}
	rows := make([]row, len(res.Rows))
	for i, r := range res.Rows {
		rows[i] = r
	}
	return rows, nil
}

func identList(names []string) string {
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = sqlquote.Ident(n)
	}
	return strings.Join(q, ", ")
}
