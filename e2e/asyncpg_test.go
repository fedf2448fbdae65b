package e2e

import (
	"bufio"
	"strings"
	"testing"

	"github.com/rlsproxy/rlsproxy/internal/demo"
	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// toolAsyncpgChecks are the lines clients/asyncpg_client.py prints, with how
// many times each.
var toolAsyncpgChecks = map[string]int{
	"current_user": 1, "sub": 1, "prepare_fetch": 1, "prepare_execute": 1, "transaction": 1,
	"copy_records": 1, "copy_denied": 1, "copy_to_table": 1, "copy_from_query": 1, "insert_denied": 1,
	"pool_sub": 8, "pool": 8,
}

// toolAsyncpgWant is the value the asyncpg client must print for check as
// user.
func toolAsyncpgWant(check, user string) string {
	switch check {
	case "copy_records":
		return user + ",asyncpg: copied" // user_id from the claim
	case "copy_to_table":
		return user + ",asyncpg: from file"
	case "copy_denied":
		return "23514" // the owner check: check_violation
	case "pool_sub":
		return user
	}
	return wantValue(check, user)
}

// toolAsyncpgSetup is the table the asyncpg client copies rows into.
// PostgreSQL refuses COPY FROM into a table with row-level security, so
// this one has none; its owner is the claim all the same, by default and
// by check.
const toolAsyncpgSetup = `
DROP SCHEMA IF EXISTS tools_asyncpg CASCADE;
CREATE SCHEMA tools_asyncpg;
CREATE TABLE tools_asyncpg.items (
    owner   text NOT NULL DEFAULT current_setting('jwt.claims.sub') CHECK (owner = current_setting('jwt.claims.sub')),
    content text NOT NULL
);
GRANT USAGE ON SCHEMA tools_asyncpg TO authenticated;
GRANT SELECT, INSERT ON tools_asyncpg.items TO authenticated;
`

// TestAsyncpg runs asyncpg through the proxy as each user, in each setup.
// asyncpg follows its Parse/Describe/Flush with a plain Query, no Sync
// between, in prepare() then execute() or transaction(), in
// copy_records_to_table every time, and in its pool's reset: the proxy must
// relay that as PostgreSQL takes it, not end the session (08P01).
func TestAsyncpg(t *testing.T) {
	argv := setupPython("asyncpg_client.py", "asyncpg", "python3-asyncpg")(t)
	toolMustExec(t, demo.Database, toolAsyncpgSetup)
	for _, s := range setups {
		t.Run(s.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, s.opts...)
			for _, user := range users {
				t.Run(user, func(t *testing.T) {
					res := runClient(t, argv, clientEnv(p, user, p.Token(t, user), "disable"))
					if res.err != nil {
						t.Fatalf("asyncpg as %s: %v\n%s", user, res.err, res)
					}
					toolCheckOutput(t, res, toolAsyncpgChecks, user, toolAsyncpgWant)
				})
			}
		})
	}
}

// toolCheckOutput is checkOutput with the client's own expected values.
func toolCheckOutput(t *testing.T, res result, checks map[string]int, user string, want func(check, user string) string) {
	t.Helper()
	counts := map[string]int{}
	sc := bufio.NewScanner(strings.NewReader(res.stdout))
	for sc.Scan() {
		check, value, ok := strings.Cut(sc.Text(), "\t")
		if _, known := checks[check]; !ok || !known {
			t.Errorf("unexpected output line %q", sc.Text())
			continue
		}
		counts[check]++
		if w := want(check, user); value != w {
			t.Errorf("as %s, check %s (run %d) = %q, want %q", user, check, counts[check], value, w)
		}
	}
	for check, n := range checks {
		if counts[check] != n {
			t.Errorf("check %s printed %d times, want %d", check, counts[check], n)
		}
	}
	if t.Failed() {
		t.Logf("%s", res)
	}
}
