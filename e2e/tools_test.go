package e2e

import (
	"bufio"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/rlsproxy/rlsproxy/internal/demo"
	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// toolPgClient finds a PostgreSQL client program, the version-15 one first:
// pg_dump refuses a server newer than itself, and the suite's server is 15.
func toolPgClient(t *testing.T, name string) string {
	t.Helper()
	if p := filepath.Join("/usr/lib/postgresql/15/bin", name); toolFileExists(p) {
		return p
	}
	return lookPath(t, name, "install the PostgreSQL 15 client: apt-get install -y postgresql-client-15")
}

// toolFileExists reports whether path exists.
func toolFileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// toolEnv is clientEnv for user on database, with a fresh token.
func toolEnv(t *testing.T, p *proxytest.Proxy, user, database string) []string {
	t.Helper()
	// exec.Cmd keeps the last of duplicate variables.
	return append(clientEnv(p, user, p.Token(t, user), "disable"), "PGDATABASE="+database)
}

// toolDirectEnv is the environment of a client connecting straight to
// PostgreSQL as the superuser, bypassing the proxy.
func toolDirectEnv(database string) []string {
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "PG") })
	return append(env, "PGHOST=127.0.0.1", "PGPORT="+strconv.Itoa(pg.Port), "PGUSER=postgres",
		"PGPASSWORD="+pg.Password, "PGDATABASE="+database, "PGSSLMODE=disable", "PGCONNECT_TIMEOUT=10")
}

// toolCopyRows returns the data rows pg_dump wrote for table in a plain
// dump, as "col,col" strings with columns picked by cols (indexes into the
// COPY column list).
func toolCopyRows(t *testing.T, dump, table string, cols ...int) []string {
	t.Helper()
	var rows []string
	in := false
	found := false
	sc := bufio.NewScanner(strings.NewReader(dump))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "COPY "+table+" ") && strings.HasSuffix(line, " FROM stdin;"):
			in, found = true, true
		case in && line == `\.`:
			in = false
		case in:
			fields := strings.Split(line, "\t")
			var picked []string
			for _, c := range cols {
				if c >= len(fields) {
					t.Fatalf("the dump's row %q of %s has no column %d", line, table, c)
				}
				picked = append(picked, fields[c])
			}
			rows = append(rows, strings.Join(picked, ","))
		}
	}
	if !found {
		t.Fatalf("the dump has no COPY block for %s:\n%s", table, dump)
	}
	return rows
}

// toolPgDumpNotes are dumps of the demo table notes. The data dumps leave out
// the value of notes_id_seq: reading it takes SELECT on the sequence, which
// the demo grants nobody (it would tell how many notes all users have).
var toolPgDumpNotes = []string{"--table=public.notes", "--exclude-table-data=public.notes_id_seq"}

// toolRLSRefused is how PostgreSQL refuses to run a query that row-level
// security would filter while row_security is off, as pg_dump sets it
// unless told --enable-row-security.
const toolRLSRefused = `query would be affected by row-level security policy for table "notes"`

// TestPgDump dumps the RLS table notes with pg_dump through the proxy. Every
// pg_dump run sends set_config calls the guard must let through (search_path
// first, then restrict_nonsystem_relation_kind since 15.8) and turns
// row_security off or on; the dump must show what PostgreSQL shows the role
// directly.
func TestPgDump(t *testing.T) {
	pgDump := toolPgClient(t, "pg_dump")
	for _, s := range setups {
		t.Run(s.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, s.opts...)
			for _, user := range users {
				t.Run("enable-row-security/"+user, func(t *testing.T) {
					argv := append([]string{pgDump, "--enable-row-security", "--data-only"}, toolPgDumpNotes...)
					res := runClient(t, argv, toolEnv(t, p, user, demo.Database))
					if res.err != nil {
						t.Fatalf("pg_dump --enable-row-security: %v\n%s", res.err, res)
					}
					// Columns id, user_id, content: user_id and content.
					if got := strings.Join(toolCopyRows(t, res.stdout, "public.notes", 1, 2), ";"); got != wantRows(user) {
						t.Errorf("as %s the dump holds rows %q, want %q\n%s", user, got, wantRows(user), res)
					}
				})
			}
			t.Run("row-security-off", func(t *testing.T) {
				// pg_dump's own --role makes the superuser's session the
				// mapped role's, as the proxy's is: no BYPASSRLS either way.
				argv := append([]string{pgDump, "--data-only"}, toolPgDumpNotes...)
				direct := runClient(t, append(argv, "--role=authenticated"), toolDirectEnv(demo.Database))
				res := runClient(t, argv, toolEnv(t, p, "user1", demo.Database))
				if direct.err == nil || !strings.Contains(direct.stderr, toolRLSRefused) {
					t.Fatalf("straight to PostgreSQL as authenticated: want pg_dump to fail with %q\n%s", toolRLSRefused, direct)
				}
				if res.err == nil {
					t.Fatalf("through the proxy pg_dump dumped notes with row_security off, which PostgreSQL refuses the role\n%s", res)
				}
				if got, want := toolErrorLines(res.stderr), toolErrorLines(direct.stderr); got != want {
					t.Errorf("through the proxy pg_dump failed with\n%s\nstraight to PostgreSQL with\n%s", got, want)
				}
				for _, n := range demoNotes {
					if strings.Contains(res.stdout, n.content) {
						t.Errorf("the failed dump holds the row %q\n%s", n.content, res)
					}
				}
				if strings.Contains(res.stderr, "rlsproxy") {
					t.Errorf("the proxy refused a statement of pg_dump's:\n%s", res)
				}
			})
			// Without row data, row_security off is no obstacle: the whole
			// table's definition, its policy included, dumps as it is.
			t.Run("schema-only", func(t *testing.T) {
				res := runClient(t, []string{pgDump, "--schema-only", "--table=public.notes"}, toolEnv(t, p, "user1", demo.Database))
				if res.err != nil {
					t.Fatalf("pg_dump --schema-only: %v\n%s", res.err, res)
				}
				for _, want := range []string{
					"CREATE TABLE public.notes (",
					"ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY;",
					"CREATE POLICY notes_owner ON public.notes USING ((user_id = current_setting('jwt.claims.sub'::text)))",
				} {
					if !strings.Contains(res.stdout, want) {
						t.Errorf("the schema dump lacks %q\n%s", want, res)
					}
				}
			})
		})
	}
}

// toolErrorLines are pg_dump's error and detail lines.
func toolErrorLines(stderr string) string {
	var lines []string
	for line := range strings.Lines(stderr) {
		if strings.HasPrefix(line, "pg_dump: error:") || strings.HasPrefix(line, "pg_dump: detail:") ||
			strings.HasPrefix(line, "HINT:") {
			lines = append(lines, strings.TrimRight(line, "\n"))
		}
	}
	return strings.Join(lines, "\n")
}

// Names the restore test owns in the shared cluster.
const (
	toolSourceSchema = "tools_src"
	toolRestoreDB    = "tools_restore"
)

// toolSourceSQL is a small schema a user builds through the proxy in a
// schema granted to its role: what pg_dump must dump and psql restore.
// The data holds what COPY escapes (tabs, newlines, backslashes, NULL,
// non-ASCII text).
const toolSourceSQL = `
CREATE TABLE tools_src.authors (
    id   integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE
);
CREATE SEQUENCE tools_src.ticket_seq START 100;
CREATE TABLE tools_src.books (
    id        bigserial PRIMARY KEY,
    author_id integer NOT NULL REFERENCES tools_src.authors,
    title     text NOT NULL,
    ticket    integer NOT NULL DEFAULT nextval('tools_src.ticket_seq'),
    tags      text[],
    meta      jsonb,
    published date CHECK (published > '1400-01-01')
);
CREATE INDEX books_lower_title ON tools_src.books (lower(title));
CREATE INDEX books_tags ON tools_src.books USING gin (tags);
CREATE VIEW tools_src.author_counts AS
    SELECT a.name, count(b.id) AS books FROM tools_src.authors a LEFT JOIN tools_src.books b ON b.author_id = a.id GROUP BY a.name;
COMMENT ON TABLE tools_src.books IS 'books, restored through rlsproxy';
INSERT INTO tools_src.authors (name) VALUES ('Ursula'), ('Italo'), ('Nobody');
INSERT INTO tools_src.books (author_id, title, tags, meta, published) VALUES
    (1, 'The Dispossessed', '{sf,anarchy}', '{"pages": 387}', '1974-05-01'),
    (1, E'tab\there, newline\nthere', '{}', NULL, NULL),
    (2, E'back\\slash and naïve café ✓', NULL, '{"quote": "\"x\""}', '1979-01-01'),
    (2, 'Invisible Cities', '{cities}', '[]', '1972-11-01');
`

// toolVerifySQL prints what the restore must have brought over: rows,
// sequences that go on where they stopped, indexes, the view and the
// comment. Run in both databases, it must print the same.
const toolVerifySQL = `
SELECT id, name FROM tools_src.authors ORDER BY id;
SELECT id, author_id, title, ticket, tags, meta, published FROM tools_src.books ORDER BY id;
SELECT name, books FROM tools_src.author_counts ORDER BY name;
SELECT indexdef FROM pg_indexes WHERE schemaname = 'tools_src' ORDER BY indexname;
SELECT obj_description('tools_src.books'::regclass, 'pg_class');
BEGIN;
SELECT nextval('tools_src.ticket_seq'), nextval('tools_src.books_id_seq');
INSERT INTO tools_src.authors (name) VALUES ('next') RETURNING id;
ROLLBACK;
`

// toolSetupRestore gives the role a schema of its own to build in, and an
// empty database to restore into where it may create schemas, as a user
// restoring a dump of its schema would have.
func toolSetupRestore(t *testing.T) {
	t.Helper()
	toolMustExec(t, demo.Database, "DROP SCHEMA IF EXISTS tools_src CASCADE; CREATE SCHEMA tools_src; GRANT USAGE, CREATE ON SCHEMA tools_src TO authenticated")
	// DROP and CREATE DATABASE each run alone: not in a transaction block.
	toolMustExec(t, "postgres", "DROP DATABASE IF EXISTS tools_restore WITH (FORCE)")
	toolMustExec(t, "postgres", "CREATE DATABASE tools_restore")
	toolMustExec(t, "postgres", "GRANT CREATE ON DATABASE tools_restore TO authenticated")
}

// toolServeRestoreDB lets clients of the proxy ask for the restore database
// beside the demo one (--databases).
func toolServeRestoreDB(s *proxytest.Setup) { s.Databases = []string{demo.Database, toolRestoreDB} }

// TestPgDumpRestore builds a schema through the proxy, dumps it with pg_dump
// through the proxy as a plain SQL script, and restores the script with psql
// through the proxy into an empty database. The script opens with pg_dump's
// preamble (SET lines, a set_config that empties search_path) and loads data
// with COPY ... FROM stdin; ON_ERROR_STOP makes any refusal fail the
// restore.
func TestPgDumpRestore(t *testing.T) {
	pgDump := toolPgClient(t, "pg_dump")
	psql := toolPgClient(t, "psql")
	for _, s := range setups {
		t.Run(s.name, func(t *testing.T) {
			toolSetupRestore(t)
			p := proxytest.Start(t, pg, append(s.opts, toolServeRestoreDB)...)
			dir := t.TempDir()
			psqlFile := func(database, file string) result {
				t.Helper()
				return runClient(t, []string{psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", file},
					toolEnv(t, p, "user1", database))
			}
			source := filepath.Join(dir, "source.sql")
			verify := filepath.Join(dir, "verify.sql")
			dump := filepath.Join(dir, "dump.sql")
			for name, text := range map[string]string{source: toolSourceSQL, verify: toolVerifySQL} {
				if err := os.WriteFile(name, []byte(text), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if res := psqlFile(demo.Database, source); res.err != nil {
				t.Fatalf("building the source schema: %v\n%s", res.err, res)
			}
			// The role owns what it built; --no-owner and --no-privileges
			// leave out the ALTER ... OWNER and GRANT statements that the
			// proxy refuses by design and a restore as another owner would
			// not want anyway.
			res := runClient(t, []string{pgDump, "--schema=" + toolSourceSchema, "--no-owner", "--no-privileges", "--file=" + dump},
				toolEnv(t, p, "user1", demo.Database))
			if res.err != nil {
				t.Fatalf("pg_dump: %v\n%s", res.err, res)
			}
			script, err := os.ReadFile(dump)
			if err != nil {
				t.Fatal(err)
			}
			for _, want := range []string{
				"SELECT pg_catalog.set_config('search_path', '', false);",
				"SET row_security = off;",
				"CREATE SCHEMA tools_src;",
				"COPY tools_src.books (id, author_id, title, ticket, tags, meta, published) FROM stdin;",
				"SELECT pg_catalog.setval('tools_src.ticket_seq', 103, true);",
			} {
				if !strings.Contains(string(script), want) {
					t.Errorf("the dump lacks %q:\n%s", want, script)
				}
			}
			if res := psqlFile(toolRestoreDB, dump); res.err != nil {
				t.Fatalf("restoring the dump with psql: %v\n%s", res.err, res)
			}
			want := psqlFile(demo.Database, verify)
			got := psqlFile(toolRestoreDB, verify)
			if want.err != nil || got.err != nil {
				t.Fatalf("verifying: source %v, restored %v\n%s\n%s", want.err, got.err, want, got)
			}
			if got.stdout != want.stdout {
				t.Errorf("the restored schema differs from the source:\nrestored:\n%s\nsource:\n%s", got.stdout, want.stdout)
			}
			for _, w := range []string{"The Dispossessed", "naïve café ✓", "tab\there, newline\nthere", "CREATE INDEX books_lower_title"} {
				if !strings.Contains(got.stdout, w) {
					t.Errorf("the restored schema lacks %q:\n%s", w, got.stdout)
				}
			}
			// The restored sequences and identity go on where the source's
			// stopped: next ticket 104, book 5, author 4.
			if !strings.HasSuffix(got.stdout, "\n104|5\n4\n") {
				t.Errorf("the restored sequences do not go on from the dumped values:\n%s", got.stdout)
			}
			if t.Failed() {
				t.Logf("dump:\n%s", script)
			}
		})
	}
}

// toolMustExec runs SQL as the superuser straight to PostgreSQL.
func toolMustExec(t *testing.T, database, sql string) {
	t.Helper()
	if err := pg.Exec(t.Context(), database, sql); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}
