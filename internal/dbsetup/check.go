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
	"regexp"
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
	// Check names the rule that found it: login-role (the --upstream
	// login), session-login (the login a session of a mapped role runs as:
	// its own with a signing key), membership (roles a login can SET ROLE
	// to), mapped-role, login-settings (settings planted on a session
	// login), table-rls, table-owner, table-truncate, view, policy-claims
	// (policies that read claim settings the database does not verify),
	// schema, temp, language, set_config, signal-backend, pg_stat_activity,
	// auth, signing-key, round-trip (a live session as the proxy opens it,
	// and with a signing key the wall around its role).
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
	// With it, a session of mapped role R logs in as its own login role
	// session.LoginFor(Login, R); without it, as Login.
	Signer *session.Signer
	// Connect opens a new connection with the --upstream credentials (the
	// catalog connection of `rlsproxy check`). Check itself uses it only
	// for the round trip, and only when ConnectAs is nil and Signer is nil.
	Connect func(ctx context.Context) (*pgconn.PgConn, error)
	// ConnectAs opens a new connection as the proxy logs in for a session
	// of mapped role role (session.Dialer.ConnectAs): as the role's own
	// login with the password derived from Signer, as the --upstream login
	// without a signer. The round trip uses it to prove that sessions open,
	// that the signing key matches, and (with a key) that a session cannot
	// leave its role. It must be a separate connection: Install commits
	// its settings and role for the session, which would then run the
	// remaining catalog queries as the mapped role. Nil (and Connect nil
	// or a signer set) skips the round trip.
	ConnectAs func(ctx context.Context, role string) (*pgconn.PgConn, error)
}

// CheckSubject is the sub of the claims the round trip installs.
const CheckSubject = "rlsproxy-check"

// wallTimeout bounds the round trip's read of a table after RESET ROLE: it
// fails at once when the login holds no privilege, which is the case to
// prove; it scans only when the login can read the table.
const wallTimeout = "5s"

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
	// unreachable are mapped roles whose sessions cannot open, because
	// their session login (sessionLogin) is missing, cannot log in or is
	// not a member of them: reported already, so the round trip skips them.
	unreachable []string
	findings    []Finding
}

func (c *checker) problem(check, fix, format string, args ...any) {
	c.findings = append(c.findings, Finding{SeverityProblem, check, fmt.Sprintf(format, args...), fix})
}

func (c *checker) warning(check, fix, format string, args ...any) {
	c.findings = append(c.findings, Finding{SeverityWarning, check, fmt.Sprintf(format, args...), fix})
}

// perRoleLogins reports whether sessions log in as one login per mapped
// role: with a signing key, as the proxy does (session.Dialer).
func (c *checker) perRoleLogins() bool { return c.o.Signer != nil }

// sessionLogin is the login role a session of mapped role role runs as
// before its SET ROLE, and returns to with RESET ROLE: its own login with a
// signing key, the --upstream login without.
func (c *checker) sessionLogin(role string) string {
	if c.perRoleLogins() {
		return session.LoginFor(c.login, role)
	}
	return c.login
}

// sessionLogins lists, for every mapped role (existing or not), the login
// its sessions run as, in the order of Policy.Roles.
func (c *checker) sessionLogins() (roles, logins []string) {
	for _, r := range c.o.Policy.Roles() {
		roles, logins = append(roles, r), append(logins, c.sessionLogin(r))
	}
	return roles, logins
}

// bootstrapFix is the command that creates what the proxy's flags need.
func (c *checker) bootstrapFix() string {
	// The bootstrap SQL names the roles the proxy's flags name: the DBA
	// must run it with the same flags, so the fix says so.
	if c.o.Signer != nil {
		return "rlsproxy sql <the proxy's --upstream, role and claim flags, --signing-key-file included> | psql -v ON_ERROR_STOP=1 (as a superuser)"
	}
	return "rlsproxy sql <the proxy's --upstream, role and claim flags> | psql -v ON_ERROR_STOP=1 (as a superuser)"
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
		{"the session logins", c.checkSessionLogins},
		{"memberships", c.checkMemberships},
		{"settings of the session logins", c.checkLoginSettings},
		{"tables", c.checkTables},
		{"policies", c.checkPolicies},
		{"tables owned by the login roles", c.checkLoginTables},
		{"schemas", c.checkSchemas},
		{"the \"$user\" schemas", c.checkUserSchemas},
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
	// Without a signing key every session runs as the login role once it
	// resets its role; with one, only proxies still without the key do.
	reach := "a session that gets back to the login role has it too"
	if c.perRoleLogins() {
		reach = "sessions do not run as it with --signing-key-file, but the proxy holds its password and proxies without the key run their sessions as it"
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
			"the login role %s has %s: %s, and %s", c.login, a.attr, a.why, reach)
	}
	if r.bool(5) {
		c.warning("login-role", "ALTER ROLE "+login+" NOINHERIT;",
			"the login role %s inherits the rights of its roles: with NOINHERIT it holds none of them itself, so a session that gets back to it can read nothing", c.login)
	}
	return true, nil
}

// checkMappedRoles reports mapped roles that are missing or have
// attributes RLS does not stop. Without a signing key it reports mapped
// roles the login role cannot switch to, and warns that it can switch to
// all the others; with one, that the login role still can (a transition).
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
	login := sqlquote.Ident(c.login)
	var members []string // mapped roles the login role can SET ROLE to
	for _, r := range rows {
		name := r.str(0)
		role := sqlquote.Ident(name)
		if !r.bool(1) {
			fix := c.bootstrapFix() + ", or: CREATE ROLE " + role + " NOLOGIN; GRANT " + role + " TO " + login + ";"
			if c.perRoleLogins() {
				fix = c.bootstrapFix() + "  -- it creates the role and its login " + sqlquote.Ident(c.sessionLogin(name))
			}
			c.problem("mapped-role", fix, "role %s does not exist: sessions mapped to it cannot open", name)
			if c.perRoleLogins() {
				c.unreachable = append(c.unreachable, name)
			}
			continue
		}
		c.roles = append(c.roles, name)
		if !r.bool(2) && !r.bool(3) {
			c.plain = append(c.plain, name)
		}
		switch {
		case r.bool(8):
			members = append(members, name)
		case !c.perRoleLogins():
			c.unreachable = append(c.unreachable, name)
			c.problem("mapped-role", "GRANT "+role+" TO "+login+";",
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
	if len(members) == 0 {
		return true, nil
	}
	which := "mapped roles " + strings.Join(members, ", ")
	if len(members) == len(c.o.Policy.Roles()) {
		which = "every mapped role (" + strings.Join(members, ", ") + ")"
	}
	if c.perRoleLogins() {
		c.warning("membership", "rlsproxy sql <the proxy's --upstream, role and claim flags, --signing-key-file included, without --transition> | psql -v ON_ERROR_STOP=1 (as a superuser), or: REVOKE "+identList(members)+" FROM "+login+";",
			"the login role %s is still a member of %s (a transition: rlsproxy sql --transition): proxies with --signing-key-file do not log in as it, but proxies without the key do, and a session of theirs that gets past the guard can switch to any of these roles; once every proxy runs with the key, revoke them",
			c.login, which)
		return true, nil
	}
	c.warning("membership", "openssl rand -hex 32 > signing.key; rlsproxy sql <the proxy's --upstream, role and claim flags> --signing-key-file signing.key | psql -v ON_ERROR_STOP=1 (as a superuser; one login per mapped role); then run the proxy and rlsproxy check with --signing-key-file signing.key",
		"sessions log in as the login role %s, which is a member of %s: SET ROLE is checked against the login, so a session whose SQL gets past the guard (--guard off, --guard-allow-code) can RESET ROLE to %s and SET ROLE to any of them; only the guard keeps a session in its role. Run rlsproxy sql with --signing-key-file (one login per mapped role), and the database keeps each session in its role",
		c.login, which, c.login)
	return true, nil
}

// checkSessionLogins reports, with a signing key, the login role of each
// mapped role R (session.LoginFor): it must exist, log in, be a member of
// R, have no attribute that outranks RLS, and be NOINHERIT so that a
// session that resets its role holds no privilege. Without a key the
// session login is the login role, which checkLogin and checkMappedRoles
// cover.
func (c *checker) checkSessionLogins(ctx context.Context) (bool, error) {
	if !c.perRoleLogins() {
		return true, nil
	}
	roles, logins := c.sessionLogins()
	rows, err := c.query(ctx, `SELECT m.r, m.l, p.oid IS NOT NULL, r.oid IS NOT NULL,
			coalesce(p.rolcanlogin, false), coalesce(p.rolsuper, false), coalesce(p.rolbypassrls, false),
			coalesce(p.rolcreaterole, false), coalesce(p.rolreplication, false), coalesce(p.rolcreatedb, false),
			coalesce(p.rolinherit, false),
			CASE WHEN p.oid IS NULL OR r.oid IS NULL THEN false ELSE pg_catalog.pg_has_role(p.oid, r.oid, 'MEMBER') END,
			CASE WHEN p.oid IS NULL OR r.oid IS NULL THEN false ELSE pg_catalog.pg_has_role(p.oid, r.oid, 'USAGE') END
		FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS m(r, l, i)
		LEFT JOIN pg_catalog.pg_roles p ON p.rolname = m.l
		LEFT JOIN pg_catalog.pg_roles r ON r.rolname = m.r
		ORDER BY m.i`, roles, logins)
	if err != nil {
		return false, err
	}
	for _, r := range rows {
		role, name := r.str(0), r.str(1)
		qrole, qname := sqlquote.Ident(role), sqlquote.Ident(name)
		exists, roleExists := r.bool(2), r.bool(3)
		switch {
		case !roleExists:
			// Reported as a missing mapped role: the same fix creates both.
			if !exists {
				continue
			}
		case !exists:
			c.unreachable = append(c.unreachable, role)
			c.problem("session-login", c.bootstrapFix(),
				"login role %s, which sessions of role %s log in as with --signing-key-file, does not exist: sessions of %s cannot open", name, role, role)
			continue
		case !r.bool(4):
			c.unreachable = append(c.unreachable, role)
			c.problem("session-login", "ALTER ROLE "+qname+" LOGIN;  -- or: "+c.bootstrapFix(),
				"login role %s, which sessions of role %s log in as, cannot log in (NOLOGIN): sessions of %s cannot open", name, role, role)
		case !r.bool(11):
			c.unreachable = append(c.unreachable, role)
			c.problem("session-login", c.bootstrapFix()+", or: GRANT "+qrole+" TO "+qname+";",
				"login role %s, which sessions of role %s log in as, is not a member of %s: sessions of %s cannot open", name, role, role, role)
		}
		for _, a := range []struct {
			col       int
			attr, why string
			isProblem bool
			keyword   string
		}{
			{5, "SUPERUSER", "a superuser bypasses row-level security and every privilege", true, "NOSUPERUSER"},
			{6, "BYPASSRLS", "it bypasses row-level security", true, "NOBYPASSRLS"},
			{7, "CREATEROLE", "it can create roles and grant itself their rights", true, "NOCREATEROLE"},
			{8, "REPLICATION", "it can stream every row of the cluster", true, "NOREPLICATION"},
			{9, "CREATEDB", "it can create databases it owns", false, "NOCREATEDB"},
		} {
			if !r.bool(a.col) {
				continue
			}
			add := c.warning
			if a.isProblem {
				add = c.problem
			}
			add("session-login", "ALTER ROLE "+qname+" "+a.keyword+";",
				"login role %s, which sessions of role %s log in as, has %s: %s, and a session of %s that runs RESET ROLE runs as %s",
				name, role, a.attr, a.why, role, name)
		}
		if r.bool(10) || r.bool(12) {
			c.warning("session-login", "ALTER ROLE "+qname+" NOINHERIT;  -- on PostgreSQL 16 and later also: REVOKE "+qrole+" FROM "+qname+"; GRANT "+qrole+" TO "+qname+" WITH INHERIT FALSE;",
				"login role %s, which sessions of role %s log in as, inherits the rights of its roles: with NOINHERIT it holds none of them itself, so a session that runs RESET ROLE can read nothing",
				name, role)
		}
	}
	return true, nil
}

// membershipsSQL lists every role each login ($2[i]) can SET ROLE to,
// directly or through other roles, but its own mapped role ($1[i]; empty
// for the --upstream login) and the roles in $3: with the shortest path
// (the roles in between), the role holding the grant to revoke, and whether
// the role is a mapped one. SET ROLE is checked against the session user,
// so a session can become each of them whatever role it runs as. (On
// PostgreSQL 16 and later a grant WITH SET FALSE forbids SET ROLE but may
// still pass on rights: every membership is listed.)
const membershipsSQL = `WITH RECURSIVE m(i, login, own, roleid, path) AS (
		SELECT s.i, s.login, s.own, a.roleid, ARRAY[]::name[]
		FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS s(own, login, i)
		JOIN pg_catalog.pg_roles l ON l.rolname = s.login
		JOIN pg_catalog.pg_auth_members a ON a.member = l.oid
	UNION ALL
		SELECT m.i, m.login, m.own, a.roleid, m.path || r.rolname
		FROM m JOIN pg_catalog.pg_auth_members a ON a.member = m.roleid
		JOIN pg_catalog.pg_roles r ON r.oid = m.roleid
	)
	SELECT DISTINCT ON (m.i, r.rolname) m.login, m.own, r.rolname,
		coalesce(m.path[cardinality(m.path)]::text, m.login), array_to_string(m.path, ' -> '),
		r.rolname = ANY ($4::text[])
	FROM m JOIN pg_catalog.pg_roles r ON r.oid = m.roleid
	WHERE r.rolname <> m.own AND r.rolname <> ALL ($3::text[])
	ORDER BY m.i, r.rolname, cardinality(m.path)`

// checkMemberships reports every role a login can become beyond its own:
// for the login role, every role but the mapped ones; with a signing key,
// for the login of each mapped role R, every role but R, other mapped roles
// included, since that login is the wall that keeps a session in R.
func (c *checker) checkMemberships(ctx context.Context) (bool, error) {
	rows, err := c.query(ctx, membershipsSQL, []string{""}, []string{c.login}, c.o.Policy.Roles(), c.o.Policy.Roles())
	if err != nil {
		return false, err
	}
	for _, r := range rows {
		name, member, path := r.str(2), r.str(3), r.str(4)
		fix := "REVOKE " + sqlquote.Ident(name) + " FROM " + sqlquote.Ident(member) + ";"
		if c.perRoleLogins() {
			c.problem("membership", fix,
				"the login role %s is a member of role %s%s, which is not a mapped role: sessions do not run as %s with --signing-key-file, but whoever holds its password (the proxy's --upstream) has the rights of %s, and so do sessions of proxies without the key that get past the guard",
				c.login, name, through(path), c.login, name)
			continue
		}
		c.problem("membership", fix,
			"the login role %s is a member of role %s%s, which is not a mapped role: a session that escapes its mapped role can SET ROLE %s and gain its rights",
			c.login, name, through(path), name)
	}
	if !c.perRoleLogins() {
		return true, nil
	}
	roles, logins := c.sessionLogins()
	rows, err = c.query(ctx, membershipsSQL, roles, logins, []string{}, c.o.Policy.Roles())
	if err != nil {
		return false, err
	}
	for _, r := range rows {
		login, role, name, member, path, mapped := r.str(0), r.str(1), r.str(2), r.str(3), r.str(4), r.bool(5)
		what := "which is not a mapped role: a session of " + role + " can SET ROLE " + name + " and gain its rights"
		if mapped {
			what = "another mapped role: a session of " + role + " can SET ROLE " + name + " and act with the rights of the sessions of " + name
		}
		c.problem("membership", "REVOKE "+sqlquote.Ident(name)+" FROM "+sqlquote.Ident(member)+";",
			"login role %s, which sessions of role %s log in as, is a member of role %s%s, %s, whatever SQL it runs: the database no longer keeps it in its role",
			login, role, name, through(path), what)
	}
	return true, nil
}

// through renders the roles between a login and a role it reaches.
func through(path string) string {
	if path == "" {
		return ""
	}
	return " (through " + path + ")"
}

// checkLoginSettings reports settings that the logins sessions run as
// carry of their own (ALTER ROLE ... SET, for every database or for this
// one): a login role may set its own defaults, so a session that reached
// its login could have planted claim settings for every later session.
// With a signing key the proxy refuses such a login, so each is a problem;
// without one the login role is shared and the guard stops ALTER ROLE, so
// they are listed as a warning. Names only: a planted value may be a
// claim.
func (c *checker) checkLoginSettings(ctx context.Context) (bool, error) {
	roles, logins := []string{""}, []string{c.login}
	if c.perRoleLogins() {
		roles, logins = c.sessionLogins()
	}
	rows, err := c.query(ctx, `SELECT m.l, m.r, s.setdatabase = 0,
			array_to_string(ARRAY(SELECT split_part(x, '=', 1) FROM unnest(s.setconfig) AS x), ', ')
		FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS m(r, l, i)
		JOIN pg_catalog.pg_roles p ON p.rolname = m.l
		JOIN pg_catalog.pg_db_role_setting s ON s.setrole = p.oid
			AND s.setdatabase IN (0, (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database()))
		ORDER BY m.i, s.setdatabase`, roles, logins)
	if err != nil {
		return false, err
	}
	type planted struct {
		login, role string
		where       []string
	}
	var found []*planted
	for _, r := range rows {
		if len(found) == 0 || found[len(found)-1].login != r.str(0) {
			found = append(found, &planted{login: r.str(0), role: r.str(1)})
		}
		p := found[len(found)-1]
		where := "in database " + c.database
		if r.bool(2) {
			where = "in every database"
		}
		p.where = append(p.where, r.str(3)+" ("+where+")")
	}
	for _, p := range found {
		q := sqlquote.Ident(p.login)
		fix := "ALTER ROLE " + q + " RESET ALL; ALTER ROLE " + q + " IN DATABASE " + sqlquote.Ident(c.database) + " RESET ALL;"
		if c.perRoleLogins() {
			c.problem("login-settings", fix+"  -- or: "+c.bootstrapFix(),
				"login role %s, which sessions of role %s log in as, carries settings of its own: %s; a session that reached its login may have planted them (ALTER ROLE ... SET) for every later session, and the proxy refuses to log in as it",
				p.login, p.role, strings.Join(p.where, ", "))
			continue
		}
		c.warning("login-settings", fix,
			"the login role %s, which every session logs in as, carries settings of its own: %s; a session that gets past the guard and back to %s can plant settings there (ALTER ROLE ... SET) for every later session: check that these are yours",
			p.login, strings.Join(p.where, ", "), p.login)
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

// settingCall matches a current_setting() call on a constant name in a
// policy expression as PostgreSQL prints it back (pg_policies):
// current_setting('jwt.claims.sub'::text) or
// current_setting('request.jwt.claims'::text, true). Group 1 is the name,
// with quotes doubled; a computed name ('jwt.claims.' || 'sub') leaves the
// match at its first literal, which is then a prefix of the name.
var settingCall = regexp.MustCompile(`(?i)(?:pg_catalog\.)?current_setting\(\s*\(*\s*'((?:[^']|'')*)'`)

// settingCallExact matches a whole current_setting() call on a constant
// name, as policyFix rewrites it.
var settingCallExact = regexp.MustCompile(`(?i)(?:pg_catalog\.)?current_setting\('((?:[^']|'')*)'(?:::text)?(?:,\s*(?:true|false))?\)`)

// claimSetting reports whether a setting name read by a policy is one the
// proxy sets from the claims (Policy.ClaimsSetting, a name under
// Policy.ClaimPrefix); exact says whether it names it whole.
func (c *checker) claimSetting(name string, exact bool) bool {
	n := strings.ToLower(name)
	p := c.o.Policy
	if p.ClaimsSetting != "" {
		cs := strings.ToLower(p.ClaimsSetting)
		if n == cs || (!exact && n != "" && strings.HasPrefix(cs, n)) {
			return true
		}
	}
	if p.ClaimPrefix != "" {
		cp := strings.ToLower(p.ClaimPrefix)
		if strings.HasPrefix(n, cp) || (!exact && n != "" && strings.HasPrefix(cp, n)) {
			return true
		}
	}
	return false
}

// checkPolicies reports row-level security policies that read claims with
// current_setting(): the proxy sets those settings, but the database does
// not verify them, so SQL that the guard does not see (--guard off,
// --guard-allow-code) can change them. auth.user_id() and auth.session()
// verify the claims' signature (with --signing-key-file).
func (c *checker) checkPolicies(ctx context.Context) (bool, error) {
	rows, err := c.query(ctx, `SELECT schemaname, tablename, policyname, coalesce(qual, ''), coalesce(with_check, '')
		FROM pg_catalog.pg_policies
		WHERE qual ILIKE '%current\_setting(%' OR with_check ILIKE '%current\_setting(%'
		ORDER BY 1, 2, 3`)
	if err != nil {
		return false, err
	}
	verify := "which verify the claims' signature"
	if !c.perRoleLogins() {
		verify = "which verify the claims' signature once the proxy and rlsproxy sql run with --signing-key-file"
	}
	for _, r := range rows {
		schema, table, policy, qual, check := r.str(0), r.str(1), r.str(2), r.str(3), r.str(4)
		var read []string
		for _, expr := range []string{qual, check} {
			for _, m := range settingCall.FindAllStringSubmatch(expr, -1) {
				name := strings.ReplaceAll(m[1], "''", "'")
				if c.claimSetting(name, false) && !slices.Contains(read, name) {
					read = append(read, name)
				}
			}
		}
		if len(read) == 0 {
			continue
		}
		it := "it"
		if len(read) > 1 {
			it = "them"
		}
		c.warning("policy-claims", c.policyFix(schema, table, policy, qual, check),
			"policy %s on table %s.%s reads %s with current_setting(): the proxy sets %s but the database does not verify %s, so SQL the guard does not see (--guard off, --guard-allow-code) can change %s and read or write other users' rows; read the claims through auth.user_id() or auth.session(), %s",
			policy, schema, table, strings.Join(read, ", "), it, it, it, verify)
	}
	return true, nil
}

// policyFix returns the ALTER POLICY that reads the same claims through
// the auth functions: current_setting(<claims setting>) becomes
// (SELECT auth.session())::text, current_setting('<prefix>sub') becomes
// (SELECT auth.user_id()) and any other claim (SELECT auth.session() ->>
// 'claim'). Where a claim setting is read otherwise (a computed name), it
// returns the pattern to follow.
func (c *checker) policyFix(schema, table, policy, qual, check string) string {
	pattern := "ALTER POLICY " + sqlquote.Ident(policy) + " ON " + sqlquote.Ident(schema, table) +
		" USING (user_id = (SELECT auth.user_id()));  -- claims other than sub: (SELECT auth.session() ->> 'claim'); WITH CHECK likewise"
	rewrite := func(expr string) (string, bool) {
		out := settingCallExact.ReplaceAllStringFunc(expr, func(call string) string {
			name := strings.ReplaceAll(settingCallExact.FindStringSubmatch(call)[1], "''", "'")
			switch {
			case !c.claimSetting(name, true):
				return call
			case strings.EqualFold(name, c.o.Policy.ClaimsSetting):
				return "(SELECT auth.session())::text"
			}
			prefix := c.o.Policy.ClaimPrefix
			if len(name) < len(prefix) || !strings.EqualFold(name[:len(prefix)], prefix) {
				return call // left to the check below
			}
			claim := name[len(prefix):]
			if strings.EqualFold(claim, "sub") {
				return "(SELECT auth.user_id())"
			}
			return "(SELECT auth.session() ->> " + sqlquote.Literal(claim) + ")"
		})
		// What is left must read no claim setting.
		for _, m := range settingCall.FindAllStringSubmatch(out, -1) {
			if c.claimSetting(strings.ReplaceAll(m[1], "''", "'"), false) {
				return "", false
			}
		}
		return out, true
	}
	fix := "ALTER POLICY " + sqlquote.Ident(policy) + " ON " + sqlquote.Ident(schema, table)
	for _, e := range []struct{ clause, expr string }{{"USING", qual}, {"WITH CHECK", check}} {
		if e.expr == "" {
			continue
		}
		out, ok := rewrite(e.expr)
		if !ok {
			return pattern
		}
		fix += " " + e.clause + " (" + out + ")"
	}
	return fix + ";"
}

// checkLoginTables reports tables that a login sessions run as owns (or
// whose owner's rights it has) without FORCE: the login role, and with a
// signing key the login of each mapped role. A session that runs RESET
// ROLE runs as its login, and would see every row.
func (c *checker) checkLoginTables(ctx context.Context) (bool, error) {
	roles, logins := []string{""}, []string{c.login}
	if c.perRoleLogins() {
		r, l := c.sessionLogins()
		roles, logins = append(roles, r...), append(logins, l...)
	}
	rows, err := c.query(ctx, `SELECT n.nspname, c.relname, m.l, m.r, pg_catalog.pg_get_userbyid(c.relowner)
		FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS m(r, l, i)
		JOIN pg_catalog.pg_roles l ON l.rolname = m.l
		JOIN pg_catalog.pg_class c ON pg_catalog.pg_has_role(l.oid, c.relowner, 'USAGE')
		JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
		WHERE c.relkind IN ('r', 'p') AND `+userRelations+`
		AND NOT c.relforcerowsecurity AND NOT l.rolsuper
		ORDER BY m.i, 1, 2`, roles, logins)
	if err != nil {
		return false, err
	}
	for _, r := range rows {
		schema, table, login, role, owner := r.str(0), r.str(1), r.str(2), r.str(3), r.str(4)
		qname := sqlquote.Ident(schema, table)
		fix := "ALTER TABLE " + qname + " OWNER TO <a role that is not a login or mapped role>;  -- at the least: ALTER TABLE " + qname + " FORCE ROW LEVEL SECURITY;"
		who := "the login role " + login
		if role != "" {
			who = "login role " + login + " (sessions of role " + role + " log in as it)"
		}
		owned := "owned by " + who
		if owner != login {
			owned = "owned by role " + owner + ", whose rights " + who + " has,"
		}
		if role == "" {
			who := "a session that gets back to the login role"
			if c.perRoleLogins() {
				who = "a session of a proxy without --signing-key-file that gets back to it, or whoever holds its password,"
			}
			c.problem("table-owner", fix,
				"table %s.%s is %s and does not FORCE row-level security: %s sees every row",
				schema, table, owned, who)
			continue
		}
		c.problem("table-owner", fix,
			"table %s.%s is %s and does not FORCE row-level security: a session of %s that runs RESET ROLE sees every row",
			schema, table, owned, role)
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

// checkUserSchemas reports a "$user" schema that a session could create: one
// named after a mapped role or a session login, first on the default
// search_path of every session of that role, which does not exist while the
// role may create schemas. (checkSchemas reports one that exists and that a
// role owns or can create in.)
func (c *checker) checkUserSchemas(ctx context.Context) (bool, error) {
	roles, logins := c.sessionLogins()
	rows, err := c.query(ctx, `SELECT u.name, r.role
		FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS r(role, login, i)
		CROSS JOIN LATERAL (VALUES (r.role, 1), (r.login, 2)) AS u(name, j)
		WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_namespace n WHERE n.nspname = u.name)
		AND EXISTS (SELECT FROM pg_catalog.pg_roles x WHERE x.rolname = r.role)
		AND pg_catalog.has_database_privilege(r.role, pg_catalog.current_database(), 'CREATE')
		ORDER BY r.i, u.j`, roles, logins)
	if err != nil {
		return false, err
	}
	seen := map[string]bool{}
	for _, r := range rows {
		name, role := r.str(0), r.str(1)
		if seen[name] {
			continue
		}
		seen[name] = true
		c.problem("user-schema", "CREATE SCHEMA "+sqlquote.Ident(name)+";  -- as the database owner: reserves the name; or: REVOKE CREATE ON DATABASE "+sqlquote.Ident(c.database)+" FROM PUBLIC, "+sqlquote.Ident(role)+";  -- or: "+c.bootstrapFix(),
			"role %s may create schemas and no schema %s exists: a session could create it, and as the \"$user\" entry of the default search_path it comes first for every session of %s, whose other users' unqualified names would then find that user's objects",
			role, name, role)
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
	const harden = "  -- or: rlsproxy sql --harden <the proxy's --upstream, role and claim flags> | psql"
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
			// The proxy installs claims as the session's login.
			grantees := sqlquote.Ident(c.login)
			if c.perRoleLogins() {
				grantees += ", " + sqlquote.Ident(c.sessionLogin(role))
			}
			c.warning("set_config", "REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) FROM PUBLIC, "+sqlquote.Ident(role)+";  -- then GRANT it to "+grantees+harden,
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
	bootstrap := c.bootstrapFix()
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
	// Who can read the key: the login role, the mapped roles, and with a
	// signing key the login of each mapped role (a session that runs RESET
	// ROLE runs as it).
	var logins []string
	if c.perRoleLogins() {
		_, logins = c.sessionLogins()
	}
	rows, err = c.query(ctx, `SELECT pg_catalog.has_table_privilege($1, c.oid, 'SELECT'),
			array_to_string(ARRAY(SELECT r.role FROM unnest($2::text[]) WITH ORDINALITY AS r(role, i)
				WHERE pg_catalog.has_table_privilege(r.role, c.oid, 'SELECT') ORDER BY r.i), ','),
			array_to_string(ARRAY(SELECT l.login FROM unnest($3::text[]) WITH ORDINALITY AS l(login, i)
				JOIN pg_catalog.pg_roles p ON p.rolname = l.login
				WHERE pg_catalog.has_table_privilege(p.oid, c.oid, 'SELECT') ORDER BY l.i), ',')
		FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = 'auth' AND c.relname = 'signing_key'`, c.login, c.roles, logins)
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
			who := "a session that gets back to the login role"
			if c.perRoleLogins() {
				who = "a session of a proxy without --signing-key-file that gets back to it"
			}
			c.warning("signing-key", "REVOKE ALL ON auth.signing_key FROM "+sqlquote.Ident(c.login)+";",
				"the login role %s can read auth.signing_key: %s can read the key and sign any claims", c.login, who)
		}
		if readers := rows[0].str(1); readers != "" {
			c.problem("signing-key", "REVOKE ALL ON auth.signing_key FROM PUBLIC, "+identList(strings.Split(readers, ","))+";",
				"role(s) %s can read auth.signing_key: any session can read the key and sign claims for any user", readers)
		}
		if readers := rows[0].str(2); readers != "" {
			c.problem("signing-key", "REVOKE ALL ON auth.signing_key FROM PUBLIC, "+identList(strings.Split(readers, ","))+";",
				"login role(s) %s, which sessions log in as, can read auth.signing_key: a session that runs RESET ROLE can read the key and sign claims for any user", readers)
		}
	}
	if broken || (c.o.Signer == nil && signed) {
		// The round trip would only fail for the reason already reported.
		return true, nil
	}
	return true, c.roundTrip(ctx, bootstrap, signed)
}

// roundTrip logs in as a session of the test grant's role does (its own
// login with a signing key), installs test claims exactly as the proxy
// does, and reads them back with auth.user_id(): this proves that sessions
// of the role open, and that the database holds the same signing key as
// --signing-key-file (the login's password is derived from it, and the
// claims are signed with it). With a key, it then proves the wall around
// the role (checkWall), and that claims signed with another key are
// refused, which proves the functions verify at all. Only session state of
// that connection changes, nothing is written, and it is closed.
func (c *checker) roundTrip(ctx context.Context, bootstrap string, signed bool) error {
	connect := c.o.ConnectAs
	if connect == nil && c.o.Signer == nil && c.o.Connect != nil {
		connect = func(ctx context.Context, _ string) (*pgconn.PgConn, error) { return c.o.Connect(ctx) }
	}
	if connect == nil {
		if c.o.Signer != nil {
			c.warning("round-trip", "rlsproxy check --upstream <the proxy's DSN> --signing-key-file <the proxy's key file> <the proxy's other flags>",
				"the signing key was not proved to match the database, nor the wall around each session's role: no connection was given for the round trip")
		}
		return nil
	}
	grant, err := c.testGrant()
	if err != nil {
		c.warning("round-trip", "set --role, or check --role-map and --role-claim", "no round trip: %v", err)
		return nil
	}
	if !slices.Contains(c.roles, grant.Role) || slices.Contains(c.unreachable, grant.Role) {
		return nil // the install would fail for the reason reported already
	}
	login := c.sessionLogin(grant.Role)
	who := "the login role " + login
	if c.perRoleLogins() {
		who = "login role " + login + ", which sessions of role " + grant.Role + " log in as,"
	}
	conn, err := connect(ctx, grant.Role)
	if err != nil {
		if ctx.Err() != nil || !c.perRoleLogins() {
			return fmt.Errorf("connecting for the round trip: %w", err)
		}
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == "28P01" {
			c.problem("signing-key", "rlsproxy sql --signing-key-file <the proxy's key file> <the proxy's other flags> | psql -v ON_ERROR_STOP=1 (as a superuser)",
				"the signing key in the database does not match --signing-key-file, or the password of login role %s was changed (a session that reached its login can change it): %s refused the password derived from the key (%v)",
				login, login, err)
			return nil
		}
		c.problem("round-trip", "let "+sqlquote.Ident(login)+" connect wherever "+sqlquote.Ident(c.login)+" may (pg_hba.conf), then SELECT pg_catalog.pg_reload_conf();",
			"the proxy cannot log in as %s: %v", who, err)
		return nil
	}
	defer conn.Close(context.WithoutCancel(ctx))

	if err := session.Install(ctx, conn, grant, c.o.Signer); err != nil {
		c.problem("round-trip", "GRANT "+sqlquote.Ident(grant.Role)+" TO "+sqlquote.Ident(login)+";  -- or: "+bootstrap,
			"%s cannot open a session as role %s: %v", strings.TrimSuffix(who, ","), grant.Role, err)
		return nil
	}
	claimsOK := c.checkClaims(ctx, conn, grant, bootstrap)
	if !c.perRoleLogins() {
		return nil
	}
	if err := c.checkWall(ctx, conn, grant.Role, login); err != nil {
		return err
	}
	if !claimsOK || !signed {
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

// checkClaims reads the test claims back through auth.user_id() on conn, a
// session installed with grant, and reports why it fails if it does.
func (c *checker) checkClaims(ctx context.Context, conn *pgconn.PgConn, grant *session.Grant, bootstrap string) bool {
	sub, err := userID(ctx, conn)
	switch {
	case err != nil && strings.Contains(err.Error(), "valid signature"):
		c.problem("signing-key", "rlsproxy sql --signing-key-file <the proxy's key file> <the proxy's other flags> | psql -v ON_ERROR_STOP=1 (as a superuser)",
			"the signing key in the database does not match --signing-key-file: auth.user_id() refused claims the proxy signed (%v)", err)
	case err != nil && strings.Contains(err.Error(), "signing_key is empty"):
		c.problem("signing-key", bootstrap, "table auth.signing_key is empty: every signed session fails (%v)", err)
	case err != nil && strings.Contains(err.Error(), "expired"):
		c.problem("round-trip", "synchronise the clocks of the database server and the proxy host (NTP)",
			"auth.user_id() says claims valid for 60 more seconds have expired: the database clock is ahead of this host's (%v)", err)
	case err != nil:
		c.problem("round-trip", bootstrap, "auth.user_id() failed for a session as role %s: %v", grant.Role, err)
	case sub != CheckSubject:
		c.problem("round-trip", bootstrap,
			"auth.user_id() returned %q for a session whose token has sub %q: check --claims-setting against the functions of rlsproxy sql", sub, CheckSubject)
	default:
		return true
	}
	return false
}

// checkWall proves, on conn (a connection of login, the session login of
// role, with the test grant installed), that the database keeps a session
// in its role whatever SQL runs: SET ROLE to each other mapped role fails,
// and after RESET ROLE the login reads no row of a table the role can read
// (it holds no privilege, so the read fails, or row-level security still
// filters it). It leaves conn running as login.
func (c *checker) checkWall(ctx context.Context, conn *pgconn.PgConn, role, login string) error {
	for _, other := range c.roles {
		if other == role {
			continue
		}
		_, err := conn.Exec(ctx, "SET ROLE "+sqlquote.Ident(other)).ReadAll()
		if err == nil {
			c.problem("round-trip", "REVOKE "+sqlquote.Ident(other)+" FROM "+sqlquote.Ident(login)+";  -- if the grant is indirect, the membership finding for "+sqlquote.Ident(login)+" names the role that holds it",
				"a session of role %s can become role %s: SET ROLE %s succeeded on a connection of its login role %s, so its users can act as the users of %s",
				role, other, other, login, other)
			continue
		}
		if !serverError(err) {
			return fmt.Errorf("round trip: %w", err)
		}
	}
	if _, err := conn.Exec(ctx, "RESET ROLE").ReadAll(); err != nil {
		return fmt.Errorf("round trip: %w", err)
	}
	rows, err := c.query(ctx, `SELECT n.nspname, c.relname
		FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
		WHERE c.relkind IN ('r', 'p') AND `+userRelations+`
		AND pg_catalog.has_schema_privilege($1, n.oid, 'USAGE')
		AND pg_catalog.has_any_column_privilege($1, c.oid, 'SELECT')
		AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
			WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
			AND d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e')
		ORDER BY NOT c.relrowsecurity, 1, 2 LIMIT 1`, role)
	if err != nil {
		return fmt.Errorf("round trip: %w", err)
	}
	if len(rows) == 0 {
		return nil // the role reads no table: nothing to prove it on
	}
	name := rows[0].str(0) + "." + rows[0].str(1)
	qname := sqlquote.Ident(rows[0].str(0), rows[0].str(1))
	// A login that holds no privilege fails at once; one that does would
	// scan: bound it.
	if _, err := conn.Exec(ctx, "SET statement_timeout = '"+wallTimeout+"'").ReadAll(); err != nil {
		return fmt.Errorf("round trip: %w", err)
	}
	res, err := conn.Exec(ctx, "SELECT EXISTS (SELECT FROM "+qname+")").ReadAll()
	var pe *pgconn.PgError
	switch {
	case errors.As(err, &pe) && pe.Code == "57014":
		c.warning("round-trip", "ALTER ROLE "+sqlquote.Ident(login)+" NOINHERIT; REVOKE ALL ON "+qname+" FROM "+sqlquote.Ident(login)+";",
			"after RESET ROLE, a session of role %s runs as its login role %s, which may read table %s (the read ran for %s without an answer): the login should hold no privilege of its own",
			role, login, name, wallTimeout)
	case err != nil && !serverError(err):
		return fmt.Errorf("round trip: %w", err)
	case err != nil:
		// Refused (no privilege): the wall holds.
	case len(res) == 1 && len(res[0].Rows) == 1 && string(res[0].Rows[0][0]) == "t":
		c.problem("round-trip", "ALTER ROLE "+sqlquote.Ident(login)+" NOINHERIT NOBYPASSRLS; REVOKE ALL ON "+qname+" FROM "+sqlquote.Ident(login)+";  -- and if it owns the table: ALTER TABLE "+qname+" OWNER TO <a role that is not a login or mapped role>;",
			"after RESET ROLE, a session of role %s runs as its login role %s, which still reads rows of table %s: the login holds rights of its own that row-level security does not restrict (it owns the table, has BYPASSRLS, or reads it with RLS off)",
			role, login, name)
	}
	return nil
}

// serverError reports whether err is an error the server sent (the
// connection is still usable), not a broken connection.
func serverError(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe)
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
	return p.Grant(&auth.Identity{Subject: CheckSubject, Claims: claims, ClaimsJSON: string(js)}, slog.New(slog.DiscardHandler))
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
