package guard

import (
	"slices"
	"strings"
	"testing"
)

// The state rules' tests (state.go): every statement that leaves state
// behind, in several spellings, with its pin reason; the look-alikes that
// leave nothing; DEALLOCATE; the word pre-check for state words; a guard
// without TrackState; NoRules over every attack; the cache, the helper
// processes, the readings; a fuzz target and benchmarks.

type statePin struct{ sql, pin string }

// statePins leave state behind and pass the rules: a guard with TrackState
// and one with NoRules both pin them, for the reason given.
var statePins = []statePin{
	// Settings the proxy does not carry, for the session.
	{"SET search_path = app", PinSet},
	{"set search_path to app, public", PinSet},
	{"SET SESSION search_path TO app", PinSet},
	{`SET "search_path" TO app`, PinSet},
	{`SET "SEARCH_PATH" TO app`, PinSet},
	{"SET/**/search_path/**/=/**/app", PinSet},
	{"SET -- comment\nstatement_timeout = 1000", PinSet},
	{`SET U&"\0073earch_path" = app`, PinSet},
	{"SET SCHEMA 'app'", PinSet},
	{"SET XML OPTION DOCUMENT", PinSet},
	{"SET statement_timeout = 5000", PinSet},
	{"SET statement_timeout TO '5s'", PinSet},
	{"SET lock_timeout = 0", PinSet},
	{"SET work_mem = '64MB'", PinSet},
	{"SET myapp.tenant = 'acme'", PinSet},
	{"SET default_transaction_isolation = 'serializable'", PinSet},
	{"SET statement_timeout FROM CURRENT", PinSet},
	{"BEGIN; SET statement_timeout = 5; COMMIT", PinSet},
	{"SELECT 1; SET search_path = app", PinSet},
	{"SET application_name = 'a'; SET search_path = app", PinSet},
	{"SET LOCAL search_path = app; SET search_path = app", PinSet},
	{"SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", PinSessionCharacteristics},
	{"SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", PinSessionCharacteristics},
	{"set session characteristics as transaction deferrable", PinSessionCharacteristics},

	// set_config for the session, of a setting not carried or of one the
	// guard cannot name, anywhere in a statement.
	{"SELECT set_config('search_path', 'app', false)", PinSet},
	{"SELECT pg_catalog.set_config('search_path', '', false)", PinSet},
	{`SELECT "set_config"('statement_timeout', '0', false)`, PinSet},
	{"SELECT SET_CONFIG('lock_timeout', '1s', FALSE)", PinSet},
	{"SELECT set_config('search_path', 'app', 'f')", PinSet},
	{"SELECT set_config('search_path', 'app', 'off')", PinSet},
	{"SELECT set_config('search_path', 'app', 'o')", PinSet}, // not a boolean: refused by the server, pinned here
	{"SELECT set_config('search_path', 'app', 'truest')", PinSet},
	{"SELECT set_config('search_path', 'app', NULL)", PinSet}, // NULL is false
	{"SELECT set_config('search_path', 'app', $1)", PinSet},
	{"SELECT set_config('search_path', 'app', true::text::bool)", PinSet},
	{"SELECT set_config('search_path', 'app', x) FROM t", PinSet},
	{"SELECT set_config('search_path', 'app', NOT false)", PinSet},
	{"SELECT set_config(setting_name => 'search_path', new_value => 'app', is_local => false)", PinSet},
	{"SELECT set_config(is_local => false, new_value => 'app', setting_name => 'search_path')", PinSet},
	{"SELECT set_config('search_path', new_value => 'app', is_local => false)", PinSet},
	{"SELECT set_config('application_name', 'x', false), set_config('search_path', '', false)", PinSet},
	{"WITH x AS (SELECT set_config('search_path', 'app', false)) SELECT * FROM x", PinSet},
	{"SELECT * FROM t WHERE x IN (SELECT set_config('work_mem', '1GB', false))", PinSet},
	{"SELECT * FROM set_config('search_path', 'app', false)", PinSet},
	{"SELECT CASE WHEN $1 THEN set_config('search_path', 'app', false) END", PinSet},
	{"UPDATE t SET x = set_config('search_path', 'app', false)", PinSet},
	{"EXPLAIN ANALYZE SELECT set_config('search_path', '', false)", PinSet},
	{"EXPLAIN (ANALYZE, BUFFERS) SELECT set_config('search_path', '', false)", PinSet},
	{"EXPLAIN (ANALYZE false, ANALYZE) SELECT set_config('search_path', '', false)", PinSet},
	{"EXPLAIN (ANALYZE 1) SELECT set_config('search_path', '', false)", PinSet},
	{"COPY (SELECT set_config('search_path', '', false)) TO STDOUT", PinSet},
	{"DECLARE c CURSOR FOR SELECT set_config('search_path', '', false)", PinSet},
	// pg_dump's, on every run (15.8, 14.13, 13.16 and later).
	{"SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind'", PinSet},
	{"SELECT pg_catalog.set_config('search_path', '', false);", PinSet},

	// LISTEN.
	{"LISTEN chan", PinListen},
	{"listen chan", PinListen},
	{`LISTEN "Chan"`, PinListen},
	{"LISTEN/**/chan", PinListen},
	{"BEGIN; LISTEN chan; COMMIT", PinListen},
	{"SELECT 1; LISTEN chan", PinListen},
	{"LISTEN a; UNLISTEN a", PinListen}, // nothing unpins

	// Temporary objects.
	{"CREATE TEMP TABLE t (x int)", PinTempObject},
	{"CREATE TEMPORARY TABLE t (x int)", PinTempObject},
	{"create temp table t (x int)", PinTempObject},
	{"CREATE LOCAL TEMP TABLE t (x int)", PinTempObject},
	{"CREATE GLOBAL TEMPORARY TABLE t (x int)", PinTempObject},
	{"CREATE TEMP TABLE IF NOT EXISTS t (x int)", PinTempObject},
	{"CREATE TEMP TABLE t (LIKE notes INCLUDING ALL)", PinTempObject},
	{"CREATE TEMP TABLE t (x int) ON COMMIT DELETE ROWS", PinTempObject},
	{"CREATE TEMP TABLE t (x int) ON COMMIT PRESERVE ROWS", PinTempObject},
	{"CREATE/**/TEMP/**/TABLE t (x int)", PinTempObject},
	{"CREATE TABLE pg_temp.t (x int)", PinTempObject},
	{`CREATE TABLE "pg_temp".t (x int)`, PinTempObject},
	{"CREATE TABLE pg_temp_3.t (x int)", PinTempObject},
	{"CREATE TABLE postgres.pg_temp.t (x int)", PinTempObject},
	{"CREATE TEMP TABLE t AS SELECT 1 AS x", PinTempObject},
	{"CREATE TEMP TABLE t AS SELECT 1 AS x WITH NO DATA", PinTempObject},
	{"CREATE TEMPORARY TABLE t ON COMMIT DELETE ROWS AS SELECT 1 AS x", PinTempObject},
	{"CREATE TABLE pg_temp.t AS SELECT 1 AS x", PinTempObject},
	{"SELECT 1 AS x INTO TEMP t", PinTempObject},
	{"SELECT 1 AS x INTO TEMPORARY TABLE t", PinTempObject},
	{"SELECT * INTO TEMP t FROM notes WHERE id = $1", PinTempObject},
	{"SELECT 1 AS x INTO pg_temp.t", PinTempObject},
	{"EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1", PinTempObject},
	{"EXPLAIN (ANALYZE) SELECT 1 INTO TEMP t", PinTempObject},
	{"CREATE TEMP VIEW v AS SELECT 1 AS x", PinTempObject},
	{"CREATE OR REPLACE TEMP VIEW v AS SELECT 1 AS x", PinTempObject},
	{"CREATE TEMPORARY RECURSIVE VIEW v (n) AS SELECT 1", PinTempObject},
	{"CREATE VIEW pg_temp.v AS SELECT 1 AS x", PinTempObject},
	{"CREATE TEMP SEQUENCE s", PinTempObject},
	{"CREATE SEQUENCE pg_temp.s", PinTempObject},
	{"CREATE TEMP SEQUENCE IF NOT EXISTS s START 10", PinTempObject},
	{"CREATE TYPE pg_temp.ty AS (a int)", PinTempObject},
	{"CREATE TYPE pg_temp.e AS ENUM ('a', 'b')", PinTempObject},
	{"CREATE TYPE pg_temp.r AS RANGE (subtype = int4)", PinTempObject},
	{"CREATE DOMAIN pg_temp.d AS int CHECK (VALUE > 0)", PinTempObject},
	{"CREATE TEMP TABLE a (x int) ON COMMIT DROP; CREATE TEMP TABLE b (x int)", PinTempObject},
	{"BEGIN; CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (1); COMMIT", PinTempObject},

	// Cursors that outlive their transaction.
	{"DECLARE c CURSOR WITH HOLD FOR SELECT 1", PinHoldCursor},
	{"DECLARE c SCROLL CURSOR WITH HOLD FOR SELECT * FROM notes", PinHoldCursor},
	{"declare c binary no scroll cursor with hold for select 1", PinHoldCursor},
	{"DECLARE c INSENSITIVE CURSOR WITH HOLD FOR SELECT 1", PinHoldCursor},
	{"DECLARE c CURSOR/**/WITH/**/HOLD FOR SELECT 1", PinHoldCursor},
	{"BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1; COMMIT", PinHoldCursor},

	// Session advisory locks, anywhere.
	{"SELECT pg_advisory_lock(1)", PinAdvisoryLock},
	{"SELECT pg_advisory_lock(1, 2)", PinAdvisoryLock},
	{"SELECT pg_advisory_lock_shared(1)", PinAdvisoryLock},
	{"SELECT pg_advisory_lock_shared(1, 2)", PinAdvisoryLock},
	{"SELECT pg_try_advisory_lock(1)", PinAdvisoryLock},
	{"SELECT pg_try_advisory_lock(1, 2)", PinAdvisoryLock},
	{"SELECT pg_try_advisory_lock_shared(1)", PinAdvisoryLock},
	{"SELECT pg_try_advisory_lock_shared(1, 2)", PinAdvisoryLock},
	{"select pg_advisory_lock($1)", PinAdvisoryLock},
	{"SELECT PG_ADVISORY_LOCK(1)", PinAdvisoryLock},
	{"SELECT pg_catalog.pg_advisory_lock(1)", PinAdvisoryLock},
	{"SELECT public.pg_advisory_lock(1)", PinAdvisoryLock},
	{`SELECT "pg_advisory_lock"(1)`, PinAdvisoryLock},
	{`SELECT pg_catalog."pg_try_advisory_lock"(1)`, PinAdvisoryLock},
	{`SELECT U&"\0070g_advisory_lock"(1)`, PinAdvisoryLock},
	{"SELECT pg_advisory_lock/**/(1)", PinAdvisoryLock},
	{"SELECT pg_try_advisory_lock(hashtext('job'))", PinAdvisoryLock},
	{"SELECT id FROM jobs WHERE pg_try_advisory_lock(id) LIMIT 1", PinAdvisoryLock},
	{"SELECT id FROM jobs WHERE pg_try_advisory_lock(tableoid::int, id) ORDER BY id FOR UPDATE SKIP LOCKED", PinAdvisoryLock},
	{"WITH l AS (SELECT pg_advisory_lock(42)) SELECT * FROM l", PinAdvisoryLock},
	{"SELECT * FROM t WHERE EXISTS (SELECT pg_advisory_lock(1))", PinAdvisoryLock},
	{"SELECT CASE WHEN x THEN pg_try_advisory_lock(1) END FROM t", PinAdvisoryLock},
	{"SELECT * FROM t, LATERAL (SELECT pg_try_advisory_lock(t.id)) l", PinAdvisoryLock},
	{"SELECT * FROM pg_try_advisory_lock(1)", PinAdvisoryLock},
	{"INSERT INTO t SELECT pg_try_advisory_lock(1)", PinAdvisoryLock},
	{"INSERT INTO t VALUES (1) RETURNING pg_try_advisory_lock(id)", PinAdvisoryLock},
	{"UPDATE jobs SET locked = pg_try_advisory_lock(id)", PinAdvisoryLock},
	{"DELETE FROM jobs WHERE pg_try_advisory_lock(id)", PinAdvisoryLock},
	{"EXPLAIN ANALYZE SELECT pg_advisory_lock(1)", PinAdvisoryLock},
	{"DECLARE c CURSOR FOR SELECT pg_advisory_lock(1)", PinAdvisoryLock},
	{"EXECUTE p (pg_try_advisory_lock(1))", PinAdvisoryLock},
	{"CALL p(pg_try_advisory_lock(1))", PinAdvisoryLock},
	{"SELECT (42::bigint).pg_advisory_lock", PinAdvisoryLock},
	{"SELECT ((SELECT 42::bigint)).pg_try_advisory_lock_shared", PinAdvisoryLock},
	{"SELECT t.pg_try_advisory_lock FROM generate_series(7, 7) t", PinAdvisoryLock},
	{"SELECT pg_advisory_lock(1); SELECT pg_advisory_unlock(1)", PinAdvisoryLock}, // nothing unpins
	{"SELECT pg_advisory_lock(1); SET search_path = app", PinAdvisoryLock},        // the first reason

	// SQL prepared statements.
	{"PREPARE p AS SELECT 1", PinPrepare},
	{"prepare p(int) as select $1", PinPrepare},
	{`PREPARE "P" AS SELECT 1`, PinPrepare},
	{"PREPARE p(int) AS UPDATE t SET x = $1", PinPrepare},
	{"PREPARE p AS INSERT INTO t VALUES (1)", PinPrepare},
	{"PREPARE p AS SELECT 1 INTO TEMP t", PinPrepare},
	{"SELECT 1; PREPARE p AS SELECT 2", PinPrepare},
}

// stateCodePins pass the rules with AllowCode only: a guard with TrackState
// and AllowCode, and one with NoRules, pin them.
var stateCodePins = []statePin{
	{"DO $$BEGIN END$$", PinCode},
	{"do 'begin end'", PinCode},
	{"DO LANGUAGE plpgsql $$BEGIN PERFORM set_config('search_path', '', true); END$$", PinCode},
	{"DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_type WHERE typname = 'enum_users_status') THEN CREATE TYPE enum_users_status AS ENUM ('a', 'b'); END IF; END$$", PinCode},
	{"CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'", PinTempObject},
	{"create function pg_temp.f() returns int language sql as $f$select 1$f$", PinTempObject},
	{"CREATE OR REPLACE PROCEDURE pg_temp.p() LANGUAGE sql AS 'SELECT 1'", PinTempObject},
	{"SELECT query_to_xml('SELECT set_config(''search_path'', '''', false)', true, false, '')", ""}, // unseen code is not judged
	{"CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = app AS 'SELECT 1'", ""},
	{"ALTER FUNCTION f() SET search_path = app", ""},
	{"CREATE FUNCTION f() RETURNS void LANGUAGE sql BEGIN ATOMIC SELECT pg_advisory_lock(1); END", ""},
	{"CREATE TRIGGER t BEFORE INSERT ON notes FOR EACH ROW EXECUTE FUNCTION f()", ""},
	{"CREATE RULE r AS ON INSERT TO notes DO ALSO SELECT pg_advisory_lock(1)", ""},
	{"CREATE OR REPLACE FUNCTION pg_temp.sequelize_upsert(OUT created boolean, OUT primary_key text) AS $func$ BEGIN created := true; END $func$ LANGUAGE plpgsql", PinTempObject},
}

// stateNoRulesPins are refused by the rules: with NoRules they pass and pin
// for the reason given, or pin nothing (the role and the claims: the proxy
// installs them on every backend it hands out).
var stateNoRulesPins = []statePin{
	{"LOAD 'auto_explain'", PinLoad},
	{"load '$libdir/plugins/auto_explain'", PinLoad},
	{"CREATE AGGREGATE pg_temp.a (int) (SFUNC = int4pl, STYPE = int)", PinTempObject},
	{"CREATE OPERATOR pg_temp.=== (LEFTARG = int, RIGHTARG = int, FUNCTION = int4eq)", PinTempObject},
	{"CREATE COLLATION pg_temp.c (locale = 'C')", PinTempObject},
	{"SELECT dblink_connect('c', 'dbname=postgres')", PinDblink},
	{"SELECT public.dblink_connect_u('dbname=postgres')", PinDblink},
	{"SELECT ('dbname=postgres'::text).dblink_connect", PinDblink},
	{"UPDATE pg_settings SET setting = 'app' WHERE name = 'search_path'", PinSet},
	{"UPDATE pg_catalog.pg_settings SET setting = 'on' WHERE name = 'jit'", PinSet},
	{"MERGE INTO pg_settings s USING (SELECT 'jit' AS n) v ON s.name = v.n WHEN MATCHED THEN UPDATE SET setting = 'on'", PinSet},
	{"SELECT set_config(name, 'x', false) FROM pg_settings", PinSet},
	{"SELECT set_config(VARIADIC ARRAY['search_path', 'app', 'false'])", PinSet},
	{"SELECT set_config('search_path', 'app')", PinSet},
	{"SELECT set_config($1, 'app', true OR false)", PinSet},
	{"SELECT set_config($1, $2, false)", PinSet},
	{"SELECT set_config('application_name'||'', 'x', false)", PinSet},
	{"SELECT set_config(is_local => true, setting_name => $1, new_value => $2)", ""},
	{"SELECT set_config($1, $2, true)", ""},

	{"SET ROLE admin", ""},
	{"SET SESSION ROLE admin", ""},
	{"SET SESSION AUTHORIZATION admin", ""},
	{"SET jwt.claims.sub = 'u2'", ""},
	{`SET "request.jwt.claims" TO '{}'`, ""},
	{"SET rlsproxy.claims_signature = 'x'", ""},
	{"SELECT set_config('role', 'admin', false)", ""},
	{"SELECT set_config('jwt.claims.sub', 'u2', false)", ""},
	{"SELECT set_config('is_superuser', 'on', false)", ""},
	{"ALTER ROLE CURRENT_USER SET search_path = app", ""},
	{"ALTER DATABASE postgres SET search_path = app", ""},
	{"ALTER SYSTEM SET work_mem = '1GB'", ""},
	{"CREATE EXTENSION dblink", ""},
	{"SELECT dblink('dbname=postgres', 'SELECT 1')", ""},
	{"SELECT dblink_disconnect('c')", ""},
	{"CREATE VIEW v AS SELECT * FROM pg_settings", ""},
}

// stateLookAlikes leave nothing behind that a later transaction would miss:
// they pass the rules and pin nothing, with TrackState as with NoRules. Many
// share a word with a state rule.
var stateLookAlikes = []string{
	// Settings for the transaction, carried by the proxy, or back to
	// their defaults.
	"SET LOCAL search_path = app",
	"SET LOCAL statement_timeout = 1000",
	"set local work_mem = '1GB'",
	"BEGIN; SET LOCAL search_path = app; SELECT 1; COMMIT",
	"SET application_name = 'x'",
	"SET SESSION application_name TO 'x'",
	`SET "application_name" = 'x'`,
	"SET APPLICATION_NAME = 'x'",
	"SET TIME ZONE 'UTC'",
	"SET TIME ZONE LOCAL",
	"SET TIME ZONE DEFAULT",
	"SET TIME ZONE INTERVAL '+00:00' HOUR TO MINUTE",
	"SET timezone = 'Europe/Paris'",
	`SET "TimeZone" TO 'UTC'`,
	"SET datestyle = ISO, MDY",
	"SET DateStyle TO 'ISO'",
	"SET intervalstyle = postgres",
	"SET NAMES 'UTF8'",
	"SET client_encoding = 'UTF8'",
	"SET client_encoding TO DEFAULT",
	"SET standard_conforming_strings = on",
	"SET default_transaction_read_only = on",
	"SET transaction_isolation = 'serializable'",
	"SET SESSION transaction_read_only = on",
	"SET transaction_deferrable TO on",
	"SELECT set_config('transaction_isolation', 'serializable', false)",
	"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
	"SET TRANSACTION READ ONLY, DEFERRABLE",
	"SET TRANSACTION SNAPSHOT '00000003-0000001B-1'",
	"SET CONSTRAINTS ALL DEFERRED",
	"RESET search_path",
	"RESET statement_timeout",
	"SET search_path TO DEFAULT",
	"SET statement_timeout = DEFAULT",
	"RESET application_name",
	"SHOW search_path",
	"SHOW ALL",
	"SELECT current_setting('search_path')",
	"SELECT * FROM pg_settings WHERE name = 'search_path'",
	"UPDATE t SET x = 1",
	"UPDATE t SET search_path = 'x'",
	"INSERT INTO t (id, x) VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET x = 1",
	"ALTER TABLE t ALTER COLUMN x SET DEFAULT 0",
	"ALTER TABLE t SET (fillfactor = 70)",
	"ALTER TABLE t SET SCHEMA app",
	"ALTER SEQUENCE s RESTART",
	"SELECT 'SET search_path = x'",
	"SELECT 1 -- SET search_path = x",
	"SELECT 1 /* LISTEN c; PREPARE p AS SELECT 1; SELECT pg_advisory_lock(1) */",
	"SELECT $$CREATE TEMP TABLE t (x int)$$",
	"SELECT set_config('search_path', 'app', true)",
	"SELECT set_config('search_path', 'app', TRUE)",
	"SELECT set_config('search_path', 'app', 'on')",
	"SELECT set_config('search_path', 'app', 't')",
	"SELECT set_config('search_path', 'app', 'TRUE')",
	"SELECT set_config('search_path', 'app', ' yes ')",
	"SELECT set_config('search_path', 'app', 'y')",
	"SELECT set_config('search_path', 'app', '1')",
	"SELECT set_config('search_path', 'app', 't'::bool)",
	"SELECT set_config('search_path', 'app', true::boolean)",
	"SELECT set_config('search_path', 'app', CAST('on' AS pg_catalog.bool))",
	"SELECT set_config(setting_name => 'search_path', new_value => 'app', is_local => true)",
	"select set_config('lock_timeout', '3600000', true)",
	"SELECT set_config('statement_timeout', '0', true), set_config('app.tenant', $1, true)",
	"SELECT set_config('application_name', 'x', false)",
	"SELECT set_config('TimeZone', 'UTC', false)",
	"SELECT set_config('client_encoding', 'UTF8', false)",
	"SELECT set_config('standard_conforming_strings'::text, 'on', false)",
	"SELECT set_config('DateStyle', $1, $2)",
	"EXPLAIN SELECT set_config('search_path', '', false)",
	"EXPLAIN (ANALYZE false) SELECT set_config('search_path', '', false)",
	"EXPLAIN (ANALYZE off, VERBOSE) SELECT set_config('search_path', '', false)",
	"EXPLAIN (ANALYZE 0) SELECT set_config('search_path', '', false)",
	"EXPLAIN (VERBOSE) SELECT set_config('search_path', '', false)",
	"SELECT 'set_config(''search_path'', '''', false)'",
	"SELECT my_set_config('search_path', '', false)",
	"SELECT set_config_x('search_path', '', false)",
	"SELECT t.set_config FROM t",

	// LISTEN's neighbours.
	"UNLISTEN chan",
	"UNLISTEN *",
	"NOTIFY chan",
	"NOTIFY chan, 'LISTEN x'",
	"SELECT pg_notify('chan', 'x')",
	"SELECT pg_listening_channels()",
	"SELECT listen FROM t",
	`SELECT "listen", listen.listen FROM listen`,
	"UPDATE listen SET listen = 1",
	"SELECT 'LISTEN chan'",

	// Temporary objects dropped at commit, and everything else named temp.
	"CREATE TEMP TABLE t (x int) ON COMMIT DROP",
	"CREATE TEMPORARY TABLE t (x int DEFAULT 1) ON COMMIT DROP",
	"CREATE TEMP TABLE t ON COMMIT DROP AS SELECT 1 AS x",
	"CREATE TABLE pg_temp.t (x int) ON COMMIT DROP",
	"BEGIN; CREATE TEMP TABLE t (x int) ON COMMIT DROP; INSERT INTO t VALUES (1); COMMIT",
	"CREATE TABLE t (x int)",
	"CREATE TABLE temp (temp int)",
	"CREATE UNLOGGED TABLE t (x int)",
	"CREATE TABLE IF NOT EXISTS app.t (x int)",
	"CREATE TABLE pg_temporary.t (x int)",
	"CREATE TABLE t AS SELECT 1 AS x",
	"CREATE VIEW v AS SELECT * FROM temp",
	"CREATE SEQUENCE s",
	"CREATE TYPE ty AS (a int)",
	"CREATE INDEX ON temp (temp)",
	"SELECT 1 AS x INTO t",
	"SELECT temp FROM t",
	"SELECT * FROM temp",
	`SELECT "temp", "temporary" FROM "temp"`,
	"INSERT INTO temp VALUES (1)",
	"SELECT * FROM pg_temp.t",
	"INSERT INTO pg_temp.t VALUES (1)",
	"DROP TABLE pg_temp.t",
	"DROP TABLE IF EXISTS temp",
	"TRUNCATE pg_temp.t",
	"DISCARD TEMP",
	"DISCARD TEMPORARY",
	"DISCARD PLANS",
	"DISCARD SEQUENCES",
	"EXPLAIN CREATE TEMP TABLE t AS SELECT 1",
	"EXPLAIN (ANALYZE false) CREATE TEMP TABLE t AS SELECT 1",
	"EXPLAIN SELECT 1 INTO TEMP t",
	"SELECT 'CREATE TEMP TABLE t (x int)'",
	"SELECT pg_my_temp_schema()",
	"SELECT * FROM pg_class WHERE relpersistence = 't'",

	// Cursors of the transaction.
	"DECLARE c CURSOR FOR SELECT 1",
	"DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
	"DECLARE c SCROLL CURSOR FOR SELECT hold FROM t",
	"BEGIN; DECLARE c CURSOR FOR SELECT * FROM notes; FETCH 10 FROM c; CLOSE c; COMMIT",
	"SELECT hold FROM t",
	"UPDATE t SET hold = true",
	"FETCH 10 FROM c",
	"MOVE NEXT IN c",
	"CLOSE c",
	"CLOSE ALL",

	// Advisory locks of the transaction, unlocks, mentions.
	"SELECT pg_advisory_xact_lock(1)",
	"SELECT pg_advisory_xact_lock(1, 2)",
	"SELECT pg_advisory_xact_lock_shared(1)",
	"SELECT pg_try_advisory_xact_lock(1)",
	"SELECT pg_try_advisory_xact_lock_shared(1, 2)",
	"SELECT pg_catalog.pg_try_advisory_xact_lock(hashtext('job'))",
	"SELECT id FROM jobs WHERE pg_try_advisory_xact_lock(id) LIMIT 1",
	"SELECT pg_advisory_unlock(1)",
	"SELECT pg_advisory_unlock_shared(1, 2)",
	"SELECT pg_advisory_unlock_all()",
	"SELECT 'pg_advisory_lock(1)'",
	"SELECT * FROM pg_locks WHERE locktype = 'advisory'",
	"EXPLAIN SELECT pg_advisory_lock(1)",
	"SELECT t.pg_advisory_lock_id FROM t",
	"SELECT pg_advisory_lock FROM t",
	"SELECT my_pg_advisory_lock(1)",

	// Prepared statements run or removed; two-phase transactions.
	"EXECUTE p",
	"EXECUTE p(1, 'x')",
	"EXPLAIN ANALYZE EXECUTE p",
	"PREPARE TRANSACTION 'tx1'",
	"COMMIT PREPARED 'tx1'",
	"ROLLBACK PREPARED 'tx1'",
	"SELECT prepare FROM t",
	"SELECT * FROM pg_prepared_statements",

	// Libraries and code, named.
	"SELECT load FROM t",
	"SELECT * FROM pg_stat_activity WHERE query LIKE 'LOAD%'",
	"CALL some_proc()",
	"CALL some_proc(1, 'SET search_path = x')",
	"SELECT some_function()",
	"INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING",
	"MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET x = 1 WHEN NOT MATCHED THEN DO NOTHING",
	"SELECT 'DO $$BEGIN END$$'",

	// Transactions and locks end with their transaction.
	"BEGIN",
	"BEGIN ISOLATION LEVEL SERIALIZABLE",
	"START TRANSACTION READ ONLY",
	"COMMIT",
	"ROLLBACK",
	"END",
	"SAVEPOINT a",
	"RELEASE SAVEPOINT a",
	"ROLLBACK TO SAVEPOINT a",
	"LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
	"LOCK t",
	"SELECT * FROM t FOR UPDATE",
	"SELECT nextval('s')",
	"SELECT lo_open(1234, 262144)",
	"COPY t FROM STDIN",
	"VACUUM t",
	"CHECKPOINT",
}

// trackingGuard returns a guard with TrackState and opts.
func trackingGuard(opts ...Option) *Guard {
	return New(guardPolicy, 1000, append([]Option{TrackState}, opts...)...)
}

func checkStateVerdict(t *testing.T, what, sql string, v Verdict, pin string) {
	t.Helper()
	if v.Reject != nil {
		t.Errorf("%s: %q rejected by rule %q: %s", what, sql, v.Reject.Rule, v.Reject.Msg)
		return
	}
	if v.Pin != pin {
		t.Errorf("%s: %q pins %q, want %q", what, sql, v.Pin, pin)
	}
	if v.Deallocate != "" || v.DeallocateAll {
		t.Errorf("%s: %q deallocates %q (all %v)", what, sql, v.Deallocate, v.DeallocateAll)
	}
}

// checkStateEverywhere judges sql with g as a Query and a Parse, and with
// every other state guard, and checks that the pre-check reads a state word
// in every text that pins.
func checkState(t *testing.T, guards map[string]*Guard, sql, pin string) {
	t.Helper()
	for name, g := range guards {
		checkStateVerdict(t, name+" Query", sql, guardQuery(g, sql), pin)
		checkStateVerdict(t, name+" Parse", sql, guardParse(g, sql), pin)
	}
	if pin != "" && !holdsWord([]byte(sql), forState) {
		t.Errorf("%q pins %q, but the pre-check finds no state word in it", sql, pin)
	}
}

func TestStatePins(t *testing.T) {
	track, code, noRules := trackingGuard(), trackingGuard(AllowCode), New(guardPolicy, 1000, NoRules)
	for _, c := range statePins {
		t.Run(guardTestName(c.sql), func(t *testing.T) {
			checkState(t, map[string]*Guard{"TrackState": track, "AllowCode": code, "NoRules": noRules}, c.sql, c.pin)
		})
	}
	for _, c := range stateCodePins {
		t.Run(guardTestName(c.sql), func(t *testing.T) {
			checkState(t, map[string]*Guard{"AllowCode": code, "NoRules": noRules}, c.sql, c.pin)
			// Without AllowCode the rules refuse them, effects and all.
			if v := guardQuery(track, c.sql); v.Reject == nil || v.Pin != "" {
				t.Errorf("TrackState without AllowCode: %q = %+v, want a rejection with no effects", c.sql, v)
			}
		})
	}
	for _, c := range stateNoRulesPins {
		t.Run(guardTestName(c.sql), func(t *testing.T) {
			checkState(t, map[string]*Guard{"NoRules": noRules}, c.sql, c.pin)
			if v := guardQuery(code, c.sql); v.Reject == nil || v.Pin != "" {
				t.Errorf("TrackState and AllowCode: %q = %+v, want a rejection with no effects", c.sql, v)
			}
		})
	}
}

func TestStateLookAlikes(t *testing.T) {
	guards := map[string]*Guard{"TrackState": trackingGuard(), "AllowCode": trackingGuard(AllowCode), "NoRules": New(guardPolicy, 1000, NoRules)}
	for _, sql := range stateLookAlikes {
		t.Run(guardTestName(sql), func(t *testing.T) {
			checkState(t, guards, sql, "")
		})
	}
	// The rules' look-alikes pass as before: only the pins are new.
	g := trackingGuard()
	for _, sql := range guardLookAlikes {
		for _, extended := range []bool{false, true} {
			if v := g.judge([]byte(sql), extended, Lexing{}); v.Reject != nil || v.Resets {
				t.Errorf("%q (extended=%v) with TrackState: %+v", sql, extended, v)
			}
		}
	}
}

// The pins of the rules' look-alikes (guard_test.go), all of them: those not
// listed pin nothing.
var lookAlikePins = map[string]string{
	"SELECT pg_catalog.set_config('search_path', '', false)":                                                                        PinSet,
	"SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind'":        PinSet,
	"SELECT set_config(name, 'view', false) FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind'":                       PinSet,
	"select pg_catalog.set_config(name, 'view', false) from pg_catalog.pg_settings where name = 'restrict_nonsystem_relation_kind'": PinSet,
	"SELECT set_config('statement_timeout', '0', false), set_config('app.tenant', $1, true)":                                        PinSet,
	"CREATE TEMP TABLE role (role text, set_config int)":                                                                            PinTempObject,
	`CREATE TEMP TABLE "role" ("role" text)`:                                                                                        PinTempObject,
	"SET statement_timeout = 5000":                                                                                                  PinSet,
	"SET statement_timeout TO '5s'":                                                                                                 PinSet,
	"SET SESSION statement_timeout = 1000":                                                                                          PinSet,
	"SET search_path = public":                                                                                                      PinSet,
	"SET search_path TO public, pg_temp":                                                                                            PinSet,
	"SET SCHEMA 'public'":                                                                                                           PinSet,
	"SET XML OPTION DOCUMENT":                                                                                                       PinSet,
	"SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY":                                                                          PinSessionCharacteristics,
	"SET jwt.claims = 'not under the prefix'":                                                                                       PinSet,
	"SET request.jwt.claim = 'x'":                                                                                                   PinSet,
	"SET myapp.tenant = 'x'":                                                                                                        PinSet,
	"CREATE TEMP TABLE t (x int DEFAULT 1)":                                                                                         PinTempObject,
	"CREATE TEMP TABLE t (x int CHECK (x > 0), y text DEFAULT current_setting('jwt.claims.sub'))":                                   PinTempObject,
	"CREATE TEMP TABLE t AS SELECT 1 AS x":                                                                                          PinTempObject,
	"CREATE TEMP VIEW v AS SELECT 1 AS x":                                                                                           PinTempObject,
	"CREATE TEMP SEQUENCE s":                                                                                                        PinTempObject,
	"LISTEN chan":                                                                                                                   PinListen,
	"PREPARE p AS SELECT 1":                                                                                                         PinPrepare,
	"PREPARE p(int) AS UPDATE t SET x = $1":                                                                                         PinPrepare,
	"SELECT set_config('search_path'::text, 'public', false)":                                                                       PinSet,
	"SELECT set_config(CAST('app.tenant' AS pg_catalog.text), '7', false)":                                                          PinSet,
	"SELECT set_config('statement_timeout'::character varying, '0', false)":                                                         PinSet,
}

func TestStateRulesLookAlikes(t *testing.T) {
	for name, g := range map[string]*Guard{"TrackState": trackingGuard(), "NoRules": New(guardPolicy, 1000, NoRules)} {
		for _, sql := range guardLookAlikes {
			v := guardQuery(g, sql)
			if v.Reject != nil || v.Pin != lookAlikePins[sql] {
				t.Errorf("%s: %q = %+v, want pin %q", name, sql, v, lookAlikePins[sql])
			}
		}
	}
	for sql := range lookAlikePins {
		if !slices.Contains(guardLookAlikes, sql) {
			t.Errorf("lookAlikePins lists %q, which guardLookAlikes does not hold", sql)
		}
	}
}

func TestStateDeallocate(t *testing.T) {
	for _, c := range []struct {
		sql   string
		names []string
		all   bool
		pin   string
	}{
		{"DEALLOCATE p", []string{"p"}, false, ""},
		{"DEALLOCATE PREPARE p", []string{"p"}, false, ""},
		{"deallocate P", []string{"p"}, false, ""},
		{`DEALLOCATE "My Stmt"`, []string{"My Stmt"}, false, ""},
		{`DEALLOCATE U&"\0070"`, []string{"p"}, false, ""},
		{"DEALLOCATE/**/p", []string{"p"}, false, ""},
		{"DEALLOCATE lrupsc_1_0", []string{"lrupsc_1_0"}, false, ""},
		{"DEALLOCATE ALL", nil, true, ""},
		{"DEALLOCATE PREPARE ALL", nil, true, ""},
		{"deallocate all", nil, true, ""},
		{`DEALLOCATE "all"`, []string{"all"}, false, ""},
		{"DEALLOCATE a; DEALLOCATE b", []string{"a", "b"}, false, ""},
		{"DEALLOCATE b; SELECT 1; DEALLOCATE a; DEALLOCATE b", []string{"b", "a", "b"}, false, ""},
		{"DEALLOCATE a; DEALLOCATE ALL", []string{"a"}, true, ""},
		{"DEALLOCATE ALL; DEALLOCATE a", []string{"a"}, true, ""},
		{"BEGIN; DEALLOCATE p; COMMIT", []string{"p"}, false, ""},
		{"PREPARE p AS SELECT 1; DEALLOCATE p", []string{"p"}, false, PinPrepare},
		{"DEALLOCATE p; LISTEN c", []string{"p"}, false, PinListen},
		{"SELECT 'DEALLOCATE p'", nil, false, ""},
		{"SELECT deallocate FROM t", nil, false, ""},
	} {
		for name, g := range map[string]*Guard{"TrackState": trackingGuard(), "NoRules": New(guardPolicy, 1000, NoRules)} {
			for _, v := range []Verdict{guardQuery(g, c.sql), guardParse(g, c.sql)} {
				if v.Reject != nil || v.Pin != c.pin || v.DeallocateAll != c.all || !slices.Equal(v.DeallocatedNames(), c.names) {
					t.Errorf("%s: %q = %+v (names %q), want names %q, all %v, pin %q", name, c.sql, v, v.DeallocatedNames(), c.names, c.all, c.pin)
				}
			}
		}
		if (c.names != nil || c.all) && !holdsWord([]byte(c.sql), forState) {
			t.Errorf("%q deallocates, but the pre-check finds no state word in it", c.sql)
		}
	}
	// DISCARD ALL drops the statements too.
	if v := guardQuery(trackingGuard(), "DISCARD ALL"); !v.DeallocateAll || !v.Resets {
		t.Errorf("DISCARD ALL = %+v, want a reset that deallocates all", v)
	}
}

// The prepared statements EXECUTE runs are named, under EXPLAIN and CREATE
// TABLE AS too, for the proxy to keep clients out of each other's.
func TestStateExecutes(t *testing.T) {
	for _, c := range []struct {
		sql   string
		names []string
	}{
		{"EXECUTE p", []string{"p"}},
		{"execute P(1, 'x')", []string{"p"}},
		{`EXECUTE "Rlsproxy_1_1"`, []string{"Rlsproxy_1_1"}},
		{`EXECUTE U&"\0070"`, []string{"p"}},
		{"EXECUTE/**/p", []string{"p"}},
		{"EXPLAIN EXECUTE p", []string{"p"}},
		{"EXPLAIN (ANALYZE, COSTS OFF) EXECUTE p", []string{"p"}},
		{"CREATE TEMP TABLE t AS EXECUTE p", []string{"p"}},
		{"EXPLAIN ANALYZE CREATE TABLE t AS EXECUTE p WITH NO DATA", []string{"p"}},
		{"SELECT 1; EXECUTE a; EXECUTE b", []string{"a", "b"}},
		{"SELECT 'EXECUTE p'", nil},
		{"SELECT execute FROM t", nil},
		{"CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$BEGIN EXECUTE 'SELECT 1'; END$$", nil},
	} {
		for name, g := range map[string]*Guard{"TrackState": trackingGuard(), "NoRules": New(guardPolicy, 1000, NoRules)} {
			v := guardQuery(g, c.sql)
			if !slices.Equal(v.ExecutedNames(), c.names) {
				t.Errorf("%s: %q = %+v (executes %q), want %q", name, c.sql, v, v.ExecutedNames(), c.names)
			}
		}
		if c.names != nil && !holdsWord([]byte(c.sql), forState) {
			t.Errorf("%q executes, but the pre-check finds no state word in it", c.sql)
		}
	}
	for sql, want := range map[string][]string{
		"PREPARE p AS SELECT 1":                                   {"p"},
		`PREPARE "Rlsproxy_1" (int) AS SELECT $1`:                 {"Rlsproxy_1"},
		"PREPARE a AS SELECT 1; EXECUTE a; PREPARE b AS SELECT 2": {"a", "b"},
		"SELECT 'PREPARE p AS SELECT 1'":                          nil,
	} {
		if v := guardQuery(trackingGuard(), sql); !slices.Equal(v.PreparedNames(), want) {
			t.Errorf("%q: prepares %q, want %q", sql, v.PreparedNames(), want)
		}
	}
}

// Resets are reported with TrackState as without it, and with NoRules
// wherever they are: nothing is refused.
func TestStateResets(t *testing.T) {
	track := trackingGuard()
	for _, sql := range []string{"RESET ALL", "DISCARD ALL", "RESET ROLE", "SELECT 1; RESET jwt.claims.sub"} {
		if v := guardQuery(track, sql); v.Reject != nil || !v.Resets || v.Pin != "" {
			t.Errorf("TrackState Query(%q) = %+v, want Resets and no pin", sql, v)
		}
		checkGuardRejection(t, sql, guardParse(track, sql), "reset_in_extended_protocol")
	}
	noRules := New(guardPolicy, 1000, NoRules)
	for sql, pin := range map[string]string{
		"RESET ALL":                      "",
		"RESET ALL; SELECT 1":            "",
		"DISCARD ALL; SET ROLE admin":    "",
		"SELECT 1; RESET ROLE; SELECT 2": "",
		"SET SESSION AUTHORIZATION DEFAULT; SELECT * FROM notes": "",
		"COPY t FROM STDIN; RESET ROLE":                          "",
		"LISTEN c; DISCARD ALL":                                  PinListen, // nothing unpins
		"RESET ALL; SET search_path = app":                       PinSet,
	} {
		if v := guardQuery(noRules, sql); v.Reject != nil || !v.Resets || v.Pin != pin {
			t.Errorf("NoRules: Query %q = %+v, want Resets and pin %q", sql, v, pin)
		}
		// Prepared, it runs at Execute, out of the proxy's sight: pinned.
		if v := guardParse(noRules, sql); v.Reject != nil || v.Resets || (v.Pin != pin && v.Pin != PinPreparedReset) || v.Pin == "" {
			t.Errorf("NoRules: Parse %q = %+v, want pinned (%q or %q), no reset", sql, v, pin, PinPreparedReset)
		}
	}
}

// With NoRules nothing is refused: every attack passes, and its effects
// are classified. Those not listed here pin nothing (the role and the
// claims are the proxy's to install, and unseen code is not judged).
var attackPins = map[string]string{
	"SELECT set_config('jwt.'||'claims.sub', 'u2', false)":                                                 PinSet,
	"SELECT set_config(concat('r', 'ole'), 'admin', false)":                                                PinSet,
	"SELECT set_config($1, 'admin', false)":                                                                PinSet,
	"SELECT set_config((SELECT 'role'), 'admin', false)":                                                   PinSet,
	"SELECT set_config(n, v, false) FROM (VALUES ('role', 'admin')) s(n, v)":                               PinSet,
	"SELECT set_config(lower('ROLE'), 'admin', false)":                                                     PinSet,
	"SELECT set_config('role', 'admin')":                                                                   PinSet,
	"SELECT set_config(VARIADIC ARRAY['role', 'admin', 'false'])":                                          PinSet,
	"PREPARE p AS SELECT " + setConfigCall:                                                                 PinPrepare,
	"PREPARE p(text) AS SELECT set_config('jwt.claims.sub', $1, false)":                                    PinPrepare,
	"DECLARE c SCROLL CURSOR WITH HOLD FOR SELECT " + setConfigCall:                                        PinHoldCursor,
	"CREATE TEMP TABLE t (x text DEFAULT " + setConfigCall + ")":                                           PinTempObject,
	"CREATE TEMP TABLE t (x text CHECK (" + setConfigCall + " IS NOT NULL))":                               PinTempObject,
	"CREATE TEMP TABLE t (x text, y text GENERATED ALWAYS AS (" + setConfigCall + ") STORED)":              PinTempObject,
	"CREATE TEMP TABLE t AS SELECT " + setConfigCall:                                                       PinTempObject,
	"CREATE TEMP VIEW v AS SELECT " + setConfigCall:                                                        PinTempObject,
	"CREATE OR REPLACE TEMP VIEW v AS SELECT " + setConfigCall:                                             PinTempObject,
	"CREATE OR REPLACE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql AS $$SELECT " + setConfigCall + "$$": PinTempObject,
	"create function pg_temp.f() returns int language sql as $f$select 1$f$":                               PinTempObject,
	"CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql SECURITY DEFINER SET role = admin AS 'SELECT 1'": PinTempObject,
	"CREATE OR REPLACE PROCEDURE pg_temp.p() LANGUAGE plpgsql AS $$BEGIN END$$":                            PinTempObject,
	"CREATE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql BEGIN ATOMIC SELECT " + setConfigCall + "; END": PinTempObject,
	"CREATE PROCEDURE pg_temp.p() LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END":                       PinTempObject,
	"CREATE OPERATOR pg_temp.=== (LEFTARG = int, RIGHTARG = int, PROCEDURE = int4eq)":                      PinTempObject,
	"CREATE AGGREGATE pg_temp.a (text) (SFUNC = textcat, STYPE = text, FINALFUNC = f)":                     PinTempObject,
	"LOAD 'plpgsql'":                                    PinLoad,
	"load '$libdir/passwordcheck'":                      PinLoad,
	"SELECT dblink_connect('c', 'dbname=postgres')":     PinDblink,
	"SELECT public.dblink_connect_u('dbname=postgres')": PinDblink,
	"SELECT 'a;b'; DO $$BEGIN END$$":                    PinCode,
	"SET ROLE":                                          PinUnparsed,
	"SET ROLE DEFAULT":                                  PinUnparsed,
	"SELECT set_config(":                                PinUnparsed,
	"SELECT 1; SET ROLE admin;; SELEC":                  PinUnparsed,
	"DO $$ BEGIN END":                                   PinUnparsed,
	`SET U&"\XYZ" TO admin`:                             PinUnparsed,
	"SELECT set_config(name, 'x', false) INTO t FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind'": PinSet,
	// A name behind a cast that may cut or pad it is not read: it pins.
	"SELECT set_config('rolex'::varchar(4), 'admin', false)":                       PinSet,
	"SELECT set_config('role '::char(5), 'admin', false)":                          PinSet,
	"SELECT set_config('role'::bpchar, 'admin', false)":                            PinSet,
	"SELECT set_config('request.jwt.claimsX'::character varying(18), '{}', false)": PinSet,
	"SELECT set_config('jwt.claims.subX'::pg_catalog.varchar(14), 'u2', false)":    PinSet,
	"SELECT set_config('rolex'::name::varchar(4), 'admin', false)":                 PinSet,
	"SELECT set_config(CAST('rolex' AS varchar(4)), 'admin', false)":               PinSet,
	"SELECT set_config('search_path'::myschema.text, 'x', false)":                  PinSet,
}

func TestNoRulesPassesAttacks(t *testing.T) {
	g := New(guardPolicy, 1000, NoRules)
	for _, a := range guardAttacks {
		want, ok := attackPins[a.sql]
		if !ok && (a.rule == "do" || strings.HasPrefix(a.sql, "DO ") || strings.HasPrefix(a.sql, "do ")) {
			want = PinCode
		}
		if !ok && (strings.Contains(a.sql, "set_config(name,") || strings.Contains(a.sql, "set_config(r.name,")) {
			want = PinSet // the name is a column
		}
		q := guardQuery(g, a.sql)
		for i, v := range []Verdict{q, guardParse(g, a.sql)} {
			want := want
			if i == 1 && want == "" && q.Resets {
				want = PinPreparedReset // a reset runs at Execute, out of the proxy's sight
			}
			if v.Reject != nil {
				t.Errorf("NoRules: %q refused by rule %q: %s", a.sql, v.Reject.Rule, v.Reject.Msg)
			} else if v.Pin != want {
				t.Errorf("NoRules: %q (rule %s) pins %q, want %q", a.sql, a.rule, v.Pin, want)
			}
		}
	}
	for _, gap := range guardGaps {
		want := ""
		if strings.HasSuffix(gap.sql, ".dblink_connect") {
			want = PinDblink
		}
		if v := guardQuery(g, gap.sql); v.Reject != nil || v.Pin != want {
			t.Errorf("NoRules: %q = %+v, want a pass that pins %q", gap.sql, v, want)
		}
	}
	for sql := range attackPins {
		if !slices.ContainsFunc(guardAttacks, func(a guardAttack) bool { return a.sql == sql }) {
			t.Errorf("attackPins lists %q, which guardAttacks does not hold", sql)
		}
	}
	// The messages the guard cannot read pass too, pinned.
	for _, sql := range []string{
		"SELECT $\xe9$ x $\xe8$; LISTEN c", // a non-ASCII dollar tag
		"SET search_path =",
		"LISTEN",
	} {
		if v := guardQuery(g, sql); v.Reject != nil || v.Pin != PinUnparsed {
			t.Errorf("NoRules: %q = %+v, want pin %q", sql, v, PinUnparsed)
		}
	}
}

func TestStateFunctionCall(t *testing.T) {
	noRules := New(guardPolicy, 1000, NoRules)
	for oid, pin := range map[uint32]string{
		2078: PinSet,
		2880: PinAdvisoryLock, 2881: PinAdvisoryLock, 2882: PinAdvisoryLock, 2883: PinAdvisoryLock,
		2886: PinAdvisoryLock, 2887: PinAdvisoryLock, 2888: PinAdvisoryLock, 2889: PinAdvisoryLock,
		3089: "", 2884: "", 2892: "", // pg_advisory_xact_lock, pg_advisory_unlock, pg_advisory_unlock_all
		952: "", 954: "", 1: "", 4294967295: "",
	} {
		if v := noRules.FunctionCall(oid); v.Reject != nil || v.Pin != pin {
			t.Errorf("NoRules FunctionCall(%d) = %+v, want pin %q", oid, v, pin)
		}
	}
	track := trackingGuard()
	checkGuardRejection(t, "FunctionCall(2078)", track.FunctionCall(2078), "function_call")
	if v := track.FunctionCall(952); v != (Verdict{}) {
		t.Errorf("TrackState FunctionCall(952) (lo_open) = %+v, want a plain pass", v)
	}
}

// A guard without TrackState computes no effects, and parses no statement
// for a state word alone.
func TestStateOff(t *testing.T) {
	g := newTestGuard()
	var all []string
	for _, tables := range [][]statePin{statePins, stateCodePins, stateNoRulesPins} {
		for _, c := range tables {
			all = append(all, c.sql)
		}
	}
	all = append(all, stateLookAlikes...)
	all = append(all, "DEALLOCATE p", "DEALLOCATE ALL; DEALLOCATE p")
	for _, sql := range all {
		for _, v := range []Verdict{guardQuery(g, sql), guardParse(g, sql)} {
			if v.Pin != "" || v.Deallocate != "" || v.DeallocateAll {
				t.Errorf("without TrackState: %q = %+v, want no effects", sql, v)
			}
		}
	}
	g = newTestGuard()
	for _, sql := range []string{"LISTEN chan", "DEALLOCATE p", "PREPARE p AS SELECT 1", "SELECT pg_advisory_lock(1)",
		"CREATE TEMP TABLE t (x int)", "DECLARE c CURSOR WITH HOLD FOR SELECT 1", "SELECT 1 INTO TEMP t"} {
		if v := guardQuery(g, sql); v != (Verdict{}) {
			t.Errorf("without TrackState: %q = %+v", sql, v)
		}
	}
	if n := guardCacheLen(t, g); n != 1 { // CREATE is a rule's word
		t.Errorf("without TrackState, %d statements were parsed for state words, want only the CREATE", n)
	}
}

func TestStateCache(t *testing.T) {
	g := trackingGuard()
	for i := 0; i < 3; i++ {
		if v := guardQuery(g, "LISTEN chan"); v.Pin != PinListen {
			t.Fatalf("LISTEN chan: %+v", v)
		}
		if v := guardParse(g, "DEALLOCATE a; DEALLOCATE ALL"); !v.DeallocateAll || v.Deallocate != "a" {
			t.Fatalf("DEALLOCATE: %+v", v)
		}
	}
	if n := guardCacheLen(t, g); n != 2 {
		t.Errorf("cache holds %d entries, want 2", n)
	}
	if v, ok := g.verdicts.Get(cacheKey{0, "LISTEN chan"}); !ok || v.Pin != PinListen {
		t.Errorf("cached verdict of LISTEN chan: %+v %v", v, ok)
	}
	if v, ok := g.verdicts.Get(cacheKey{1, "DEALLOCATE a; DEALLOCATE ALL"}); !ok || !v.DeallocateAll {
		t.Errorf("cached verdict of the Parse of DEALLOCATE: %+v %v", v, ok)
	}
	// Ordinary statements are still waved through unparsed.
	for _, sql := range guardHotPath {
		if v := guardQuery(g, sql); v != (Verdict{}) {
			t.Errorf("%q: %+v", sql, v)
		}
	}
	if n := guardCacheLen(t, g); n != 2 {
		t.Errorf("hot-path statements were cached with TrackState: %d entries, want 2", n)
	}
}

// A statement the guard reads one way and the server could read another
// (readings.go) is refused when its effects differ, as any statement whose
// readings differ; with NoRules it passes, pinned.
func TestStateReadings(t *testing.T) {
	hidden := `SELECT 'x\', ' ; LISTEN c; -- '`
	checkGuardRejection(t, hidden, guardQuery(trackingGuard(), hidden), "string_reading")
	if v := guardQuery(newTestGuard(), hidden); v.Reject != nil {
		t.Errorf("without TrackState: %q refused: %s", hidden, v.Reject.Msg)
	}
	noRules := New(guardPolicy, 1000, NoRules)
	for sql, want := range map[string]Verdict{
		hidden:                              {Pin: PinUnparsed},
		`SELECT 'x\', ' ; RESET ROLE; -- '`: {Pin: PinUnparsed, Resets: true},
		"SELECT E'€\\'; SET search_path = x; -- '": {Pin: PinUnparsed},
		`SELECT 'x\' LISTEN c; -- '`:               {Pin: PinUnparsed}, // read with scs on, it does not parse
		// Read so, it sets the role, which pins nothing: the readings agree.
		"SELECT E'€\\'; SET ROLE app_admin; -- '": {},
	} {
		for _, lex := range []Lexing{{}, {NonStandardStrings: true}} {
			if v := noRules.Query([]byte(sql), lex); v != want {
				t.Errorf("NoRules, lex %+v: %q = %+v, want %+v", lex, sql, v, want)
			}
		}
	}
	// Read the same every way, it is judged as usual.
	if v := noRules.Query([]byte(`SET search_path = 'a\b'`), Lexing{}); v.Pin != PinSet {
		t.Errorf("NoRules: %+v", v)
	}
}

// Long statements are judged in helper processes, with the same options.
func TestStateHelpers(t *testing.T) {
	pad := "SELECT 1 /*" + strings.Repeat(" ", MaxInProcessParse) + "*/; "
	for _, tc := range []struct {
		name string
		opts []Option
	}{{"TrackState", []Option{TrackState}}, {"NoRules", []Option{NoRules}}} {
		t.Run(tc.name, func(t *testing.T) {
			g := New(guardPolicy, 100, tc.opts...)
			if err := g.IsolateParsing(ParseLimits{Helpers: 1, MaxStatement: 64 << 10}); err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			if v := guardQuery(g, pad+"LISTEN chan"); v.Reject != nil || v.Pin != PinListen {
				t.Errorf("long LISTEN: %+v", v)
			}
			if v := guardQuery(g, pad+"DEALLOCATE a; DEALLOCATE b"); v.Reject != nil || !slices.Equal(v.DeallocatedNames(), []string{"a", "b"}) {
				t.Errorf("long DEALLOCATE: %+v", v)
			}
			if v := guardQuery(g, pad+"SET search_path = app"); v.Reject != nil || v.Pin != PinSet {
				t.Errorf("long SET: %+v", v)
			}
			unreadable := []string{pad + "SET ROLE", "LISTEN c; SELECT 1 /*" + strings.Repeat(" ", 64<<10) + "*/"}
			for _, sql := range unreadable {
				v := guardQuery(g, sql)
				if tc.name == "NoRules" && (v.Reject != nil || v.Pin != PinUnparsed) {
					t.Errorf("NoRules: unreadable long statement: %+v, want pin %q", v, PinUnparsed)
				}
				if tc.name == "TrackState" && v.Reject == nil {
					t.Errorf("TrackState: unreadable long statement passed: %+v", v)
				}
			}
			if tc.name == "NoRules" {
				if v := guardQuery(g, pad+"SET ROLE admin; RESET ALL; SELECT 1"); v.Reject != nil || v.Pin != "" || !v.Resets {
					t.Errorf("NoRules: long statement the rules refuse: %+v", v)
				}
			}
		})
	}
}

func TestStateWords(t *testing.T) {
	for sql, want := range map[string]bool{
		"LISTEN c":                    true,
		"listen":                      true,
		"listener":                    false,
		"temp":                        true,
		"TEMPORARY":                   true,
		"temperature":                 false,
		"pg_temp":                     true,
		"PG_TEMP_3":                   true,
		"pg_temp_":                    true,
		"pg_temporary":                false,
		"hold":                        true,
		"holds":                       false,
		"prepare":                     true,
		"prepared":                    false,
		"deallocate":                  true,
		"load":                        true,
		"loader":                      false,
		"do":                          true,
		"set":                         true,
		"reset":                       true,
		"discard":                     true,
		"set_config":                  true,
		"pg_advisory_lock":            true,
		"pg_try_advisory_lock_shared": true,
		"pg_advisory_xact_lock":       false,
		"pg_advisory_unlock":          false,
		"dblink_connect":              true,
		"dblink":                      false,
		"INSERT INTO t":               false,
		"DECLARE c CURSOR":            false,
		"CREATE TABLE t":              false, // a rule's word, not a state word
		`"pg_advisory_lock"`:          true,
		"x.pg_advisory_lock":          true,
		"SELECT/*listen*/1":           true,
		"SELECT 'hold'":               true,
		`U&"x"`:                       true,
		"$$temp$$":                    true,
	} {
		if got := holdsWord([]byte(sql), forState); got != want {
			t.Errorf("holdsWord(%q, forState) = %v, want %v", sql, got, want)
		}
	}
	for _, sql := range guardHotPath {
		if holdsWord([]byte(sql), forRules|forState) {
			t.Errorf("holdsWord(%q) = true, want false (hot path)", sql)
		}
	}
	// Consistency of the fast path with the full decision, for every
	// statement of every table: whatever the pre-check waves through
	// leaves nothing behind.
	var all []string
	for _, tables := range [][]statePin{statePins, stateCodePins, stateNoRulesPins} {
		for _, c := range tables {
			all = append(all, c.sql)
		}
	}
	all = append(all, stateLookAlikes...)
	for _, a := range guardAttacks {
		all = append(all, a.sql)
	}
	for _, gap := range guardGaps {
		all = append(all, gap.sql)
	}
	all = append(all, guardLookAlikes...)
	all = append(all, guardHotPath...)
	g := New(guardPolicy, 0, NoRules)
	for _, sql := range all {
		checkStateFastPath(t, g, sql)
	}
}

// checkStateFastPath fails when the state pre-check passes a text that the
// full decision finds effects in (a text it cannot parse aside: PostgreSQL's
// grammar needs a state word to leave state behind).
func checkStateFastPath(t *testing.T, g *Guard, sql string) {
	t.Helper()
	if holdsWord([]byte(sql), forState) {
		return
	}
	for _, extended := range []bool{false, true} {
		v := g.decide(sql, extended, Lexing{})
		if v.Pin == PinUnparsed {
			continue
		}
		if v.Pin != "" || v.Deallocate != "" || v.DeallocateAll || v.Resets || v.Reject != nil {
			t.Errorf("STATE GAP: no state word in %q, but decide (extended=%v) finds %+v: the fast path misses it", sql, extended, v)
		}
	}
}

func TestDeallocatedNames(t *testing.T) {
	for v, want := range map[Verdict][]string{
		{}:                             nil,
		{DeallocateAll: true}:          nil,
		{Deallocate: "p"}:              {"p"},
		{Deallocate: "a\x00b c\x00a"}:  {"a", "b c", "a"},
		{Deallocate: "x", Pin: PinSet}: {"x"},
	} {
		if got := v.DeallocatedNames(); !slices.Equal(got, want) {
			t.Errorf("%+v: names %q, want %q", v, got, want)
		}
	}
}

// The fast path stays allocation-free with TrackState, as does a cached
// verdict that pins.
func TestStateAllocations(t *testing.T) {
	for name, g := range map[string]*Guard{"off": newTestGuard(), "TrackState": trackingGuard(), "NoRules": New(guardPolicy, 100, NoRules)} {
		for _, sql := range append(guardHotPath, "LISTEN chan", "SELECT pg_advisory_lock($1)") {
			b := []byte(sql)
			g.Query(b, Lexing{})
			if n := testing.AllocsPerRun(100, func() { g.Query(b, Lexing{}) }); n != 0 {
				t.Errorf("%s: Query(%q) allocates %v times", name, sql, n)
			}
		}
	}
}

// FuzzTrackState: with NoRules nothing is refused and the state pre-check is
// safe: a text without a state word leaves nothing behind (or cannot be
// read, and then the server cannot run it either).
//
//	go test -run '^$' -fuzz FuzzTrackState -fuzztime 60s ./guard/
func FuzzTrackState(f *testing.F) {
	for _, tables := range [][]statePin{statePins, stateCodePins, stateNoRulesPins} {
		for _, c := range tables {
			f.Add(c.sql)
		}
	}
	for _, sql := range stateLookAlikes {
		f.Add(sql)
	}
	for _, a := range guardAttacks {
		f.Add(a.sql)
	}
	g := New(guardPolicy, 256, NoRules)
	track := New(guardPolicy, 256, TrackState)
	f.Fuzz(func(t *testing.T, sql string) {
		b := []byte(sql)
		for _, v := range []Verdict{g.Query(b, Lexing{}), g.Parse(b, Lexing{}), g.Query(b, Lexing{NonStandardStrings: true})} {
			if v.Reject != nil {
				t.Errorf("NoRules: %q refused by rule %q", sql, v.Reject.Rule)
			}
		}
		for _, v := range []Verdict{track.Query(b, Lexing{}), track.Parse(b, Lexing{})} {
			if v.Reject != nil && (v.Pin != "" || v.Deallocate != "" || v.DeallocateAll) {
				t.Errorf("TrackState: %q refused with effects: %+v", sql, v)
			}
		}
		checkStateFastPath(t, g, sql)
	})
}

func BenchmarkTrackState(b *testing.B) {
	guards := []struct {
		name string
		opts []Option
	}{{"off", nil}, {"TrackState", []Option{TrackState}}, {"NoRules", []Option{NoRules}}}
	for _, tc := range []struct {
		name  string
		texts [][]byte
	}{
		{"hot path", [][]byte{[]byte("SELECT abalance FROM pgbench_accounts WHERE aid = $1")}},
		{"cached pin", [][]byte{[]byte("SELECT pg_advisory_lock($1)")}},
		// Every call parses.
		{"uncached UPDATE", distinctTexts("UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = %d")},
		{"uncached pin", distinctTexts("SELECT id FROM jobs WHERE pg_try_advisory_lock(id) AND id > %d LIMIT 1")},
	} {
		for _, gc := range guards {
			b.Run(tc.name+"/"+gc.name, func(b *testing.B) {
				benchQueries(b, New(guardPolicy, 1000, gc.opts...), tc.texts...)
			})
		}
	}
}

// With NoRules a reset prepared through the extended protocol passes, pinned:
// it runs at Execute, where the proxy cannot re-install role and claims
// right after it; as a simple Query it is a reset, as with the rules.
func TestStateNoRulesPreparedReset(t *testing.T) {
	g := New(guardPolicy, 1000, NoRules)
	for _, sql := range []string{"DISCARD ALL", "RESET ALL", "RESET ROLE", "RESET SESSION AUTHORIZATION", "SELECT 1; DISCARD ALL"} {
		if v := g.Parse([]byte(sql), Lexing{}); v.Reject != nil || v.Resets || v.Pin != PinPreparedReset {
			t.Errorf("Parse %q = %+v, want pinned %s, no reset", sql, v, PinPreparedReset)
		}
		if v := g.Query([]byte(sql), Lexing{}); v.Reject != nil || !v.Resets {
			t.Errorf("Query %q = %+v, want a reset", sql, v)
		}
	}
}
