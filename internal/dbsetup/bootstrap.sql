-- rlsproxy bootstrap SQL, printed by `rlsproxy sql`.
-- Run it once as a superuser (or a role with CREATEROLE that owns the
-- database): psql -v ON_ERROR_STOP=1 -f bootstrap.sql "dbname={{.Database}}"
-- It is idempotent: running it again, or where the roles exist, is harmless.
{{- if not .Signed}}
-- Claims are not signed (no --signing-key-file): the auth.* functions trust
-- the claim settings, and the login role of --upstream can reach every
-- mapped role, so only the SQL guard protects identity. With
-- --signing-key-file, this SQL creates one login per mapped role instead
-- and the database enforces both (README, "Security").
{{- end}}
BEGIN;

-- 1. Roles. None of them is SUPERUSER, BYPASSRLS or CREATEROLE, and none of
-- them should own the tables that RLS protects (owners bypass RLS without
-- FORCE).
DO $roles$
BEGIN
{{- range .Roles}}
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {{literal .}}) THEN
    CREATE ROLE {{ident .}} NOLOGIN;
  END IF;
{{- end}}
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {{literal .Login}}) THEN
    -- Set its password afterwards: \password {{.Login}}
    CREATE ROLE {{ident .Login}} LOGIN NOINHERIT;
  END IF;
{{- range .Logins}}
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {{literal .Name}}) THEN
    CREATE ROLE {{ident .Name}} LOGIN NOINHERIT;
  END IF;
{{- end}}
END
$roles$;
{{- range .Roles}}
ALTER ROLE {{ident .}} NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB NOLOGIN;
{{- end}}
ALTER ROLE {{ident .Login}} NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB NOINHERIT;
{{- if .Signed}}

-- One login per mapped role, a member of that role only, so that the
-- database itself keeps each session in its role: whatever SQL runs in it
-- (RESET ROLE, SET ROLE, SET SESSION AUTHORIZATION, DISCARD ALL), a session
-- can reach its mapped role and its login, which is NOINHERIT and holds no
-- privilege. The proxy logs in as them with passwords derived from the
-- signing key; here they are set as SCRAM verifiers, so no password appears.
-- Settings on them are removed: a session that reached its login could have
-- planted some (ALTER ROLE ... SET), and the proxy refuses such a login.
{{- range .Logins}}
ALTER ROLE {{ident .Name}} LOGIN NOINHERIT NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB PASSWORD {{literal .Verifier}};
ALTER ROLE {{ident .Name}} RESET ALL;
ALTER ROLE {{ident .Name}} IN DATABASE {{ident $.Database}} RESET ALL;
GRANT {{ident .Role}} TO {{ident .Name}};
{{- end}}
{{- if .Transition}}
-- Transition: the --upstream login stays a member of the mapped roles while
-- proxies without --signing-key-file still log in as it. Run this SQL again
-- without --transition once every proxy runs with the signing key.
GRANT {{.RoleList}} TO {{ident .Login}};
{{- else}}
-- The --upstream login is a member of no mapped role: it is the login of
-- `rlsproxy check` and of the proxy's readiness probe only.
REVOKE {{.RoleList}} FROM {{ident .Login}};
{{- end}}
{{- else}}
{{- range .Roles}}
GRANT {{ident .}} TO {{ident $.Login}};
{{- end}}
{{- end}}

-- The "$user" schemas. The default search_path is "$user", public: a schema
-- named after a role comes first for every session of that role, so a user
-- who could create it (CREATE on the database) would have every other user
-- of the role find their tables and functions ahead of public's. The names
-- are reserved here: empty schemas owned by the role running this script,
-- which sessions can neither use nor create in (the search path skips them).
{{- range .Roles}}
CREATE SCHEMA IF NOT EXISTS {{ident .}};
{{- end}}
{{- range .Logins}}
CREATE SCHEMA IF NOT EXISTS {{ident .Name}};
{{- end}}

-- 2. The auth schema: auth.session(), auth.claims() and auth.user_id(), with
-- the names and meanings of Neon's pg_session_jwt, so policies port as they are.
CREATE SCHEMA IF NOT EXISTS auth;
REVOKE ALL ON SCHEMA auth FROM PUBLIC;
GRANT USAGE ON SCHEMA auth TO {{.RoleList}};
{{- if .Signed}}

-- The signing key, as HMAC-SHA256 inner and outer pads, readable only by
-- the owner of this table (the role running this script) and so only by the
-- SECURITY DEFINER functions below: verification needs only the built-in
-- sha256(), no extension, so it works on RDS and Cloud SQL too.
CREATE TABLE IF NOT EXISTS auth.signing_key (
    id   int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    ipad bytea NOT NULL,
    opad bytea NOT NULL
);
REVOKE ALL ON auth.signing_key FROM PUBLIC;
INSERT INTO auth.signing_key (id, ipad, opad)
    VALUES (1, '\x{{.IPad}}', '\x{{.OPad}}')
    ON CONFLICT (id) DO UPDATE SET ipad = EXCLUDED.ipad, opad = EXCLUDED.opad;
{{- end}}

-- auth.session(): the claims of the session's token as jsonb, or NULL for a
-- session without claims.
{{- if .Signed}} The claims must carry rlsproxy's signature, bound
-- to this backend: a claim setting that was forged, edited or copied from
-- another session raises an error (fail closed).
{{- end}} An expired token raises
-- an error too.
CREATE OR REPLACE FUNCTION auth.session() RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    claims text := current_setting({{literal .ClaimsSetting}}, true);
    j jsonb;
{{- if .Signed}}
    sig text := current_setting({{literal .SignatureSetting}}, true);
    k record;
{{- end}}
BEGIN
    IF claims IS NULL OR claims = '' THEN
        RETURN NULL;
    END IF;
{{- if .Signed}}
    SELECT ipad, opad INTO k FROM auth.signing_key WHERE id = 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'rlsproxy: auth.signing_key is empty: run rlsproxy sql --signing-key-file'
            USING ERRCODE = '42501';
    END IF;
    IF sig IS NULL OR sig <> encode(sha256(k.opad || sha256(k.ipad ||
            convert_to(pg_backend_pid()::text || '.' || claims, 'UTF8'))), 'hex') THEN
        RAISE EXCEPTION 'rlsproxy: the claims of this session do not carry a valid signature'
            USING ERRCODE = '42501';
    END IF;
{{- end}}
    j := claims::jsonb;
    IF jsonb_typeof(j->'exp') = 'number'
       AND (j->>'exp')::numeric + {{.LeewaySeconds}} < extract(epoch FROM clock_timestamp()) THEN
        RAISE EXCEPTION 'rlsproxy: the token of this session has expired' USING ERRCODE = '42501';
    END IF;
    RETURN j;
END
$fn$;

CREATE OR REPLACE FUNCTION auth.claims() RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$ SELECT auth.session() $fn$;

-- auth.user_id(): the token's sub. In policies write (SELECT auth.user_id()):
-- the sub-select runs once per statement instead of once per row.
CREATE OR REPLACE FUNCTION auth.user_id() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$ SELECT auth.session() ->> 'sub' $fn$;

REVOKE ALL ON FUNCTION auth.session(), auth.claims(), auth.user_id() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION auth.session(), auth.claims(), auth.user_id() TO {{.RoleList}};
{{- if .Harden}}

-- 3. Hardening. Each statement closes a door the SQL guard also watches, so
-- each layer stands on its own. They change defaults for PUBLIC in this
-- database: review them against other applications that use it.
-- No temporary objects (temp functions, triggers, rules on temp tables):
REVOKE TEMPORARY ON DATABASE {{ident .Database}} FROM PUBLIC;
-- No procedural code from the client roles (DO blocks, functions):
REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC;
-- No set_config for anyone but the login roles, which install the claims:
REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO {{ident .Login}}{{if .Signed}}, {{idents .LoginNames}}{{end}};
-- No ending or cancelling of other users' sessions (they share a role):
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_terminate_backend(integer, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_cancel_backend(integer) FROM PUBLIC;
-- No view of other sessions' queries and settings:
REVOKE SELECT ON pg_catalog.pg_stat_activity FROM PUBLIC;
GRANT SELECT ON pg_catalog.pg_stat_activity TO pg_monitor, {{ident .Login}};
{{- else}}

-- 3. Hardening: run `rlsproxy sql --harden` for the optional section that
-- revokes TEMP, plpgsql, set_config, the backend-termination functions and
-- pg_stat_activity from the client roles.
{{- end}}

COMMIT;
