package e2e

import (
	"bufio"
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rlsproxy/rlsproxy/internal/demo"
	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// nodeLine is one "check<TAB>value" line a Node.js client must print.
type nodeLine struct {
	check string
	value string
	// contains, when set, replaces value: the printed value must hold each
	// of these (a message whose wording may change around them).
	contains []string
}

// nodeORM is one Node.js ORM or driver run through the proxy by TestNodeORMs.
type nodeORM struct {
	name   string
	script string // under e2e/clients/node
	opts   []proxytest.Option
	// setup is SQL run as the superuser before the runs. It starts from
	// scratch (dropping what an earlier run left), so that the first user
	// meets an empty schema and -count=2 passes.
	setup   string
	cleanup string
	// want are the lines a run as user prints, in order; first is the
	// first run after setup (user1), which migrates, where the second
	// finds the work done.
	want func(user string, first bool) []nodeLine
	// rejected are the guard's refusals, by rule, that one run causes.
	rejected map[string]float64
}

// nodeSchema is setup SQL giving role authenticated a schema of its own to
// create tables in: since PostgreSQL 15 no one but the owner may create in
// public.
func nodeSchema(schema string) string {
	return fmt.Sprintf(`DROP SCHEMA IF EXISTS %[1]s CASCADE;
CREATE SCHEMA %[1]s;
GRANT USAGE, CREATE ON SCHEMA %[1]s TO authenticated;
`, schema)
}

// nodeIdentity are the lines each client prints first: who the database
// says the session is.
func nodeIdentity(user string) []nodeLine {
	return []nodeLine{{check: "current_user", value: "authenticated"}, {check: "sub", value: user}}
}

// nodeNotes is the line of the demo notes the session sees, printed as
// "user_id,content;..." under check.
func nodeNotes(check, user string) nodeLine { return nodeLine{check: check, value: wantRows(user)} }

// nodeRefused is a statement the guard refused as code it cannot see into:
// SQLSTATE 42501 and a message naming the flag that would let it through.
func nodeRefused(check string) nodeLine {
	return nodeLine{check: check, contains: []string{"refused 42501: ", "--guard-allow-code"}}
}

var nodeORMs = []nodeORM{
	{
		// Kysely's Migrator locks with set_config('lock_timeout', ...)
		// in a CTE, which a guard refusing every set_config refused.
		name:   "kysely",
		script: "kysely.js",
		opts:   []proxytest.Option{recommended},
		setup:  nodeSchema("node_kysely"),
		want: func(user string, first bool) []nodeLine {
			latest := "none"
			if first {
				latest = "0001_todo:Up:Success,0002_todo_done:Up:Success"
			}
			return append(nodeIdentity(user),
				nodeLine{check: "migrate_latest", value: latest},
				nodeLine{check: "migrate_down", value: "0002_todo_done:Down:Success"},
				nodeLine{check: "migrate_latest_again", value: "0002_todo_done:Up:Success"},
				nodeLine{check: "migrate_latest_noop", value: "none"},
				nodeLine{check: "todo_owner", value: user},
				nodeLine{check: "own_todos", value: "kysely todo"},
				nodeNotes("notes", user),
				nodeNotes("notes_builder", user),
			)
		},
	},
	{
		// TypeORM sends CREATE EXTENSION IF NOT EXISTS "uuid-ossp" for a
		// uuid key, which a guard refusing every CREATE EXTENSION refused
		// (TypeORM only logs that; the client prints what it logged).
		name:   "typeorm",
		script: "typeorm.js",
		opts:   []proxytest.Option{recommended},
		// The superuser installs the extension TypeORM asks for, as a
		// deployment would; TypeORM's own CREATE EXTENSION IF NOT EXISTS
		// then passes the guard and the server skips it.
		setup: `CREATE EXTENSION IF NOT EXISTS "uuid-ossp" WITH SCHEMA public;
` + nodeSchema("node_typeorm"),
		want: func(user string, _ bool) []nodeLine {
			return append(nodeIdentity(user),
				nodeLine{check: "create_extension", value: `CREATE EXTENSION IF NOT EXISTS "uuid-ossp"`},
				nodeLine{check: "item_owner", value: user},
				nodeLine{check: "item_id", value: "uuid v4"},
				nodeLine{check: "own_items", value: "typeorm item"},
				nodeNotes("notes", user),
				nodeNotes("notes_query_builder", user),
				nodeLine{check: "problems", value: "none"},
			)
		},
	},
	{
		// postgres.js names its statements, pipelines, and fetches from
		// portals with row limits: nothing here is for the guard to refuse.
		name:   "postgres.js",
		script: "postgresjs.js",
		opts:   []proxytest.Option{recommended},
		want: func(user string, _ bool) []nodeLine {
			rows := wantRows(user)
			return append(nodeIdentity(user),
				nodeLine{check: "template", value: rows},
				nodeLine{check: "template", value: rows},
				nodeLine{check: "template", value: rows},
				nodeLine{check: "server_prepared", value: "true"},
				nodeLine{check: "tx_insert_owner", value: user},
				nodeLine{check: "tx_forged", contains: []string{"refused 42501: new row violates row-level security policy"}},
				nodeLine{check: "tx_count", value: fmt.Sprint(strings.Count(rows, ";") + 2)},
				nodeLine{check: "after_rollback", value: rows},
				nodeLine{check: "pipelined", value: "authenticated;" + rows},
				nodeLine{check: "unsafe_params", value: rows},
				nodeLine{check: "unsafe_simple", value: "authenticated;" + rows},
				nodeLine{check: "unsafe_sub", value: user},
				nodeLine{check: "cursor", value: rows},
				nodeLine{check: "notify", value: "hello " + user},
			)
		},
	},
	{
		// Drizzle's migrator: CREATE SCHEMA IF NOT EXISTS, its table, and
		// the migrations (CREATE SCHEMA, CREATE TABLE with a default,
		// ALTER TABLE, CREATE INDEX) in one transaction.
		name:   "drizzle",
		script: "drizzle.js",
		opts:   []proxytest.Option{recommended},
		// Drizzle's migrator sends CREATE SCHEMA IF NOT EXISTS for its
		// table, and PostgreSQL checks CREATE on the database before it
		// looks for the schema: an application role that runs drizzle
		// migrations needs that privilege, granted for this test only.
		setup: `DROP SCHEMA IF EXISTS node_drizzle, node_drizzle_app CASCADE;
GRANT CREATE ON DATABASE ` + demo.Database + ` TO authenticated;
`,
		cleanup: "REVOKE CREATE ON DATABASE " + demo.Database + " FROM authenticated",
		want: func(user string, _ bool) []nodeLine {
			return append(nodeIdentity(user),
				nodeLine{check: "migrate", value: "2 recorded"},
				nodeLine{check: "migrate_again", value: "2 recorded"},
				nodeLine{check: "todo_columns", value: "id,title,owner,done"},
				nodeLine{check: "todo_owner", value: user},
				nodeLine{check: "own_todos", value: "drizzle todo"},
				nodeNotes("notes", user),
			)
		},
	},
	{
		// Sequelize's findOrCreate and its sync of an ENUM column run code
		// the guard cannot see into: refused by default, naming the flag.
		name:   "sequelize",
		script: "sequelize.js",
		opts:   []proxytest.Option{recommended},
		setup:  nodeSchema("node_sequelize"),
		want: func(user string, _ bool) []nodeLine {
			return append(nodeIdentity(user),
				nodeLine{check: "sync_tag", value: "ok"},
				nodeRefused("find_or_create"),
				nodeRefused("find_or_create_again"),
				nodeLine{check: "tag_owner", value: "none"},
				nodeRefused("sync_enum"),
				nodeLine{check: "mood", value: "none"},
				nodeNotes("notes", user),
				nodeLine{check: "current_user_after", value: "authenticated"},
			)
		},
		// The ENUM type never gets created, so each run's sync tries again.
		rejected: map[string]float64{"create_function": 2, "do": 1},
	},
	{
		// With --guard-allow-code, which needs the signed per-role setup.
		name:   "sequelize_allow_code",
		script: "sequelize.js",
		opts:   []proxytest.Option{recommended, proxytest.AllowCode},
		setup:  nodeSchema("node_sequelize"),
		want: func(user string, _ bool) []nodeLine {
			return append(nodeIdentity(user),
				nodeLine{check: "sync_tag", value: "ok"},
				nodeLine{check: "find_or_create", value: "created"},
				nodeLine{check: "find_or_create_again", value: "found"},
				nodeLine{check: "tag_owner", value: user},
				nodeLine{check: "sync_enum", value: "ok"},
				nodeLine{check: "mood", value: "happy"},
				nodeNotes("notes", user),
				nodeLine{check: "current_user_after", value: "authenticated"},
			)
		},
	},
}

// TestNodeORMs runs Node.js ORMs and drivers (the real npm packages, locked
// in clients/node/package-lock.json) through a proxy with the guard on, as
// user1 and then user2: their migrations, schema synchronisation and
// queries must pass the guard (no false positives), except code the guard
// cannot see into, which must be refused with a message naming
// --guard-allow-code and pass with it. Each run checks the session's
// identity too, so the ORM went through the proxy with its token.
func TestNodeORMs(t *testing.T) {
	node, dir := nodeInstall(t)
	for _, o := range nodeORMs {
		t.Run(o.name, func(t *testing.T) {
			if o.setup != "" {
				if err := pg.Exec(t.Context(), demo.Database, o.setup); err != nil {
					t.Fatalf("setup: %v", err)
				}
			}
			if o.cleanup != "" {
				t.Cleanup(func() {
					if err := pg.Exec(context.Background(), demo.Database, o.cleanup); err != nil {
						t.Errorf("cleanup: %v", err)
					}
				})
			}
			p := proxytest.Start(t, pg, o.opts...)
			argv := []string{node, filepath.Join(dir, o.script)}
			for i, user := range users {
				t.Run(user, func(t *testing.T) {
					before := nodeRejections(t, p)
					res := runClient(t, argv, clientEnv(p, user, p.Token(t, user), "disable"))
					if res.err != nil {
						t.Fatalf("%s as %s: %v\n%s", o.name, user, res.err, res)
					}
					nodeCheckLines(t, res, o.want(user, i == 0))
					after := nodeRejections(t, p)
					for rule := range after {
						after[rule] -= before[rule]
						if after[rule] == 0 {
							delete(after, rule)
						}
					}
					if fmt.Sprint(after) != fmt.Sprint(o.rejected) {
						t.Errorf("guard refusals by rule = %v, want %v\n%s", after, o.rejected, res)
					}
				})
			}
		})
	}
}

// nodeCheckLines compares a client's output with the lines it must print,
// in order.
func nodeCheckLines(t *testing.T, res result, want []nodeLine) {
	t.Helper()
	var got [][2]string
	sc := bufio.NewScanner(strings.NewReader(res.stdout))
	for sc.Scan() {
		check, value, _ := strings.Cut(sc.Text(), "\t")
		got = append(got, [2]string{check, value})
	}
	for i := range max(len(got), len(want)) {
		switch {
		case i >= len(got):
			t.Errorf("line %d: missing, want check %s", i+1, want[i].check)
		case i >= len(want):
			t.Errorf("line %d: unexpected %s = %q", i+1, got[i][0], got[i][1])
		case got[i][0] != want[i].check:
			t.Errorf("line %d: check %s = %q, want check %s", i+1, got[i][0], got[i][1], want[i].check)
		case want[i].contains == nil && got[i][1] != want[i].value:
			t.Errorf("check %s = %q, want %q", got[i][0], got[i][1], want[i].value)
		default:
			for _, s := range want[i].contains {
				if !strings.Contains(got[i][1], s) {
					t.Errorf("check %s = %q, want it to contain %q", got[i][0], got[i][1], s)
				}
			}
		}
	}
	if t.Failed() {
		t.Logf("%s", res)
	}
}

// nodeRejections are the proxy's guard refusals so far, by rule.
func nodeRejections(t *testing.T, p *proxytest.Proxy) map[string]float64 {
	t.Helper()
	mfs, err := p.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	byRule := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "rlsproxy_guard_rejections_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "rule" {
					byRule[l.GetValue()] += m.GetCounter().GetValue()
				}
			}
		}
	}
	return byRule
}
