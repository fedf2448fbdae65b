package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rlsproxy/rlsproxy/internal/demo"
	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// demoNotes are the rows internal/demo/schema.sql inserts, in id order.
var demoNotes = []struct{ user, content string }{
	{"user1", "user1: buy milk"},
	{"user1", "user1: call the bank"},
	{"user2", "user2: water the plants"},
}

// users are the subjects every client connects as. Their notes differ in
// count and content, so a proxy that ignored or mixed up identities, or
// dropped the claim settings, fails every check.
var users = []string{"user1", "user2"}

// wantRows is what a client prints for `SELECT user_id, content FROM notes
// ORDER BY id` run as user: "user_id,content" rows joined by ";".
func wantRows(user string) string {
	var rows []string
	for _, n := range demoNotes {
		if n.user == user {
			rows = append(rows, n.user+","+n.content)
		}
	}
	return strings.Join(rows, ";")
}

// wantValue is the value a client must print for check when its token's
// subject is user. Checks not named here are the notes query run some way.
func wantValue(check, user string) string {
	switch check {
	case "current_user":
		return "authenticated" // the policy's default role, not the service login
	case "sub":
		return user // current_setting('jwt.claims.sub')
	case "server_prepared":
		return "true" // pg_prepared_statements holds the driver's named statement
	case "insert_denied":
		return "42501" // new row violates row-level security policy
	case "cancel":
		return "57014" // canceling statement due to user request
	case "pool_sessions":
		return "3" // node-postgres opened a session for each of 3 concurrent queries
	}
	return wantRows(user)
}

// client is one PostgreSQL client program under e2e/clients. Each prints one
// "check<TAB>value" line per result, or "connect_error<TAB>SQLSTATE<TAB>message"
// and exit status 3 when the connection is refused.
type client struct {
	name string
	// setup fails the test when the client's tools are missing, builds what
	// it needs, and returns the command line that runs it.
	setup func(t *testing.T) []string
	// checks are the lines the client must print, with how many times each:
	// exact counts, so a client that stopped half way fails.
	checks map[string]int
	// refusedSQLState is the SQLSTATE the driver reports when the proxy
	// refuses the password. libpq-based drivers report only the message.
	refusedSQLState string
}

var clients = []client{
	{
		name:  "jdbc",
		setup: setupJDBC,
		checks: map[string]int{
			"current_user": 1, "sub": 1, "statement": 1,
			// Seven runs: pgjdbc's prepareThreshold is 5, so the last runs
			// use a named server-side statement.
			"prepared": 7, "server_prepared": 1,
			"fetchsize": 1, "insert_denied": 1, "cancel": 1, "after_cancel": 1,
		},
		refusedSQLState: "28P01",
	},
	{
		name:  "psycopg2",
		setup: setupPython("psycopg2_client.py", "psycopg2", "python3-psycopg2"),
		checks: map[string]int{
			"current_user": 1, "sub": 1, "simple": 1, "named_cursor": 1, "copy": 1,
			"insert_denied": 1, "cancel": 1, "after_cancel": 1,
		},
	},
	{
		name:  "psycopg3",
		setup: setupPython("psycopg3_client.py", "psycopg", "python3-psycopg"),
		checks: map[string]int{
			"current_user": 1, "sub": 1, "params": 1, "prepared": 6, "server_prepared": 1,
			"binary": 1, "server_cursor": 1, "pipeline": 3, "copy": 1,
			"insert_denied": 1, "cancel": 1, "after_cancel": 1,
		},
	},
	{
		name:  "sqlalchemy",
		setup: setupPython("sqlalchemy_client.py", "sqlalchemy, psycopg2", "python3-sqlalchemy python3-psycopg2"),
		checks: map[string]int{
			"current_user": 1, "sub": 1, "orm": 1, "orm_filter": 1, "insert_denied": 1,
		},
	},
	{
		name:  "node-postgres",
		setup: setupNode,
		checks: map[string]int{
			"current_user": 1, "sub": 1, "plain": 1, "params": 1, "named": 6, "server_prepared": 1,
			"insert_denied": 1, "pool": 3, "pool_sessions": 1,
		},
		refusedSQLState: "28P01",
	},
}

// setups are the two database setups a client meets: the recommended one
// (one login per mapped role, signed claims) and the earlier one (the
// service login a member of every mapped role).
var setups = []struct {
	name string
	opts []proxytest.Option
}{
	{"per-role logins", []proxytest.Option{recommended}},
	{"shared login", nil},
}

// TestClients runs each client through the proxy as user1 and as user2, each
// with a fresh token, and once with a password that is not a token, in each
// setup.
func TestClients(t *testing.T) {
	for _, c := range clients {
		t.Run(c.name, func(t *testing.T) {
			argv := c.setup(t)
			for _, s := range setups {
				t.Run(s.name, func(t *testing.T) { testClient(t, c, argv, s.opts) })
			}
		})
	}
}

func testClient(t *testing.T, c client, argv []string, opts []proxytest.Option) {
	p := proxytest.Start(t, pg, opts...)
	// user2 connects with sslmode=prefer, libpq's and pgjdbc's default: the
	// proxy has no TLS here, answers SSLRequest with N, and the driver goes
	// on in plaintext over loopback. node-postgres has no prefer mode and
	// ignores the setting.
	for _, run := range []struct{ user, sslmode string }{{"user1", "disable"}, {"user2", "prefer"}} {
		user := run.user
		t.Run(user, func(t *testing.T) {
			res := runClient(t, argv, clientEnv(p, user, p.Token(t, user), run.sslmode))
			if res.err != nil {
				t.Fatalf("%s as %s: %v\n%s", c.name, user, res.err, res)
			}
			checkOutput(t, res, c.checks, user)
		})
	}
	t.Run("not_a_token", func(t *testing.T) {
		res := runClient(t, argv, clientEnv(p, "user1", "not-a-token", "disable"))
		var ee *exec.ExitError
		if !errors.As(res.err, &ee) || ee.ExitCode() != 3 {
			t.Fatalf("%s with a bad password: want a refused connection (exit status 3), got %v\n%s", c.name, res.err, res)
		}
		state, msg, ok := connectError(res.stdout)
		if !ok {
			t.Fatalf("%s printed no connect_error line\n%s", c.name, res)
		}
		// The proxy answers FATAL 28P01 "the password is not a JWT: ...".
		if !strings.Contains(msg, "not a JWT") {
			t.Errorf("%s refusal %q does not say the password is not a JWT", c.name, msg)
		}
		if c.refusedSQLState != "" && state != c.refusedSQLState {
			t.Errorf("%s refusal SQLSTATE = %q, want %q (message %q)", c.name, state, c.refusedSQLState, msg)
		}
	})
}

// clientEnv is the environment of a client connecting as user with password
// and sslmode: libpq's variables, which libpq reads itself and the other
// clients read by name. Inherited PG* variables are dropped so that a
// developer's PGSERVICE or PGOPTIONS cannot leak in, and so are PYTHONPATH
// and PYTHONHOME, which could hand Debian's python3 another interpreter's
// modules.
func clientEnv(p *proxytest.Proxy, user, password, sslmode string) []string {
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool {
		return strings.HasPrefix(kv, "PG") || strings.HasPrefix(kv, "PYTHONPATH=") || strings.HasPrefix(kv, "PYTHONHOME=")
	})
	return append(env,
		"PGHOST="+p.Host, "PGPORT="+p.PortString(), "PGDATABASE="+demo.Database,
		"PGUSER="+user, "PGPASSWORD="+password, "PGSSLMODE="+sslmode, "PGCONNECT_TIMEOUT=10",
	)
}

// result is what a client program did.
type result struct {
	argv           []string
	stdout, stderr string
	err            error
	took           time.Duration
}

func (r result) String() string {
	return fmt.Sprintf("command: %s (%v)\nstdout:\n%s\nstderr:\n%s", strings.Join(r.argv, " "), r.took.Round(time.Millisecond), r.stdout, r.stderr)
}

// runClient runs argv with env, bounded so that a hung client fails the test
// instead of the package's timeout.
func runClient(t *testing.T, argv, env []string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = env
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	res := result{argv: argv, stdout: stdout.String(), stderr: stderr.String(), err: err, took: time.Since(start)}
	t.Logf("%s %s took %v", filepath.Base(argv[0]), filepath.Base(argv[len(argv)-1]), res.took.Round(time.Millisecond))
	return res
}

// checkOutput compares a client's check lines with what user must see.
func checkOutput(t *testing.T, res result, checks map[string]int, user string) {
	t.Helper()
	counts := map[string]int{}
	sc := bufio.NewScanner(strings.NewReader(res.stdout))
	for sc.Scan() {
		check, value, ok := strings.Cut(sc.Text(), "\t")
		if !ok {
			t.Errorf("unexpected output line %q", sc.Text())
			continue
		}
		if _, known := checks[check]; !known {
			t.Errorf("unexpected check %q = %q", check, value)
			continue
		}
		counts[check]++
		if want := wantValue(check, user); value != want {
			t.Errorf("as %s, check %s (run %d) = %q, want %q", user, check, counts[check], value, want)
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

// connectError finds the client's connect_error line.
func connectError(stdout string) (state, msg string, ok bool) {
	for line := range strings.Lines(stdout) {
		if rest, found := strings.CutPrefix(strings.TrimRight(line, "\n"), "connect_error\t"); found {
			state, msg, _ = strings.Cut(rest, "\t")
			return state, msg, true
		}
	}
	return "", "", false
}

// clientsDir is the absolute path of e2e/clients (tests run in e2e/).
func clientsDir(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs("clients")
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// lookPath finds a tool or fails the test saying how to install it: CI
// installs every tool, so a missing one is a broken setup, never a skip.
func lookPath(t *testing.T, name, install string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s not found (%v): %s", name, err, install)
	}
	return p
}

// jdbcJar finds Debian's PostgreSQL JDBC driver: postgresql.jar, else a
// versioned postgresql-N.jar.
func jdbcJar(t *testing.T) string {
	t.Helper()
	jars, _ := filepath.Glob("/usr/share/java/postgresql*.jar")
	slices.SortFunc(jars, func(a, b string) int { return jarRank(a) - jarRank(b) })
	if len(jars) == 0 || jarRank(jars[0]) > 1 {
		t.Fatalf("the PostgreSQL JDBC driver is not in /usr/share/java/postgresql*.jar: install libpostgresql-jdbc-java (apt-get install -y libpostgresql-jdbc-java default-jdk-headless)")
	}
	return jars[0]
}

var versionedJar = regexp.MustCompile(`^postgresql-[0-9.]+\.jar$`)

func jarRank(path string) int {
	switch base := filepath.Base(path); {
	case base == "postgresql.jar":
		return 0
	case versionedJar.MatchString(base):
		return 1
	}
	return 2 // postgresql-jdbc3.jar and the like: old compatibility names
}

// setupJDBC compiles clients/Client.java against the driver and returns a
// java command line running it.
func setupJDBC(t *testing.T) []string {
	t.Helper()
	const install = "install a JDK and the JDBC driver: apt-get install -y default-jdk-headless libpostgresql-jdbc-java"
	jar := jdbcJar(t)
	java := lookPath(t, "java", install)
	javac := lookPath(t, "javac", install)
	classes := t.TempDir()
	cmd := exec.Command(javac, "-d", classes, "-cp", jar, filepath.Join(clientsDir(t), "Client.java"))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("javac Client.java: %v\n%s", err, out)
	}
	// A short-lived client: skip the optimising JIT and the parallel GC,
	// which only cost start-up time on two cores.
	return []string{java, "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
		"-cp", classes + string(os.PathListSeparator) + jar, "Client"}
}

// systemPython is Debian's interpreter, which has the Debian python3-*
// modules; a python3 earlier on PATH (pyenv) does not.
const systemPython = "/usr/bin/python3"

// setupPython returns a setup that checks Debian's python3 can import
// modules (comma-separated) and runs script with it.
func setupPython(script, modules, debPackages string) func(t *testing.T) []string {
	return func(t *testing.T) []string {
		t.Helper()
		if _, err := os.Stat(systemPython); err != nil {
			t.Fatalf("%s not found: apt-get install -y python3 %s", systemPython, debPackages)
		}
		cmd := exec.Command(systemPython, "-c", "import "+modules)
		cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool {
			return strings.HasPrefix(kv, "PYTHONPATH=") || strings.HasPrefix(kv, "PYTHONHOME=")
		})
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s cannot import %s (%v): apt-get install -y %s\n%s", systemPython, modules, err, debPackages, out)
		}
		return []string{systemPython, filepath.Join(clientsDir(t), script)}
	}
}

// npmMu serialises npm ci, which replaces node_modules wholesale.
var npmMu sync.Mutex

// setupNode installs clients/node's locked dependencies when node_modules
// does not hold them (see nodeInstall) and returns a node command line
// running client.js.
func setupNode(t *testing.T) []string {
	t.Helper()
	node, dir := nodeInstall(t)
	return []string{node, filepath.Join(dir, "client.js")}
}

// nodeInstall finds node and runs npm ci in clients/node unless every
// package of its package-lock.json is installed at the locked version: a
// node_modules left by an older lock (a checkout that has since pinned
// another version or added a package) is installed again, not trusted. It
// returns node's path and the directory of the Node.js clients.
func nodeInstall(t *testing.T) (node, dir string) {
	t.Helper()
	const install = "install Node.js and npm: apt-get install -y nodejs npm"
	node = lookPath(t, "node", install)
	dir = filepath.Join(clientsDir(t), "node")
	npmMu.Lock()
	defer npmMu.Unlock()
	stale, err := nodeModulesStale(dir)
	if err != nil {
		t.Fatal(err)
	}
	if stale != "" {
		t.Logf("npm ci in %s: %s", dir, stale)
		npm := lookPath(t, "npm", install)
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, npm, "ci", "--no-audit", "--no-fund")
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("npm ci in %s: %v\n%s", dir, err, out)
		}
		if stale, err = nodeModulesStale(dir); err != nil || stale != "" {
			t.Fatalf("after npm ci in %s: %s%v", dir, stale, err)
		}
	}
	return node, dir
}

// nodeModulesStale names a package of dir's package-lock.json that
// node_modules lacks or holds at another version, or returns "" when every
// one is installed as locked. Optional packages (pg-cloudflare) are judged
// only when present: npm may leave them out.
func nodeModulesStale(dir string) (string, error) {
	data, err := os.ReadFile(filepath.Join(dir, "package-lock.json"))
	if err != nil {
		return "", err
	}
	var lock struct {
		Packages map[string]struct {
			Version  string `json:"version"`
			Optional bool   `json:"optional"`
			Link     bool   `json:"link"`
		} `json:"packages"`
	}
	if err := json.Unmarshal(data, &lock); err != nil {
		return "", fmt.Errorf("%s/package-lock.json: %w", dir, err)
	}
	if len(lock.Packages) == 0 {
		return "", fmt.Errorf("%s/package-lock.json lists no packages (lockfileVersion 2 or later expected)", dir)
	}
	if _, err := os.Stat(filepath.Join(dir, "node_modules")); err != nil {
		return "node_modules is missing", nil
	}
	for _, path := range slices.Sorted(maps.Keys(lock.Packages)) {
		want := lock.Packages[path]
		if path == "" || want.Link || want.Version == "" {
			continue // the root project, or a package npm does not copy
		}
		data, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(path), "package.json"))
		if err != nil {
			if want.Optional && errors.Is(err, os.ErrNotExist) {
				continue
			}
			return fmt.Sprintf("%s is not installed", path), nil
		}
		var got struct {
			Version string `json:"version"`
		}
		if err := json.Unmarshal(data, &got); err != nil || got.Version != want.Version {
			return fmt.Sprintf("%s is at version %q, the lock says %s", path, got.Version, want.Version), nil
		}
	}
	return "", nil
}

// initPgbench loads pgbench's tables (scale 1) into the demo database, as
// the superuser straight to PostgreSQL, and lets role authenticated read
// them. They have no RLS: pgbench's own script measures the relay, and
// pgbenchCheck below checks the identity.
func initPgbench(t *testing.T, pgbench string) {
	t.Helper()
	cmd := exec.Command(pgbench, "-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", strconv.Itoa(pg.Port), "-U", "postgres", demo.Database)
	cmd.Env = append(slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "PG") }),
		"PGPASSWORD="+pg.Password, "PGSSLMODE=disable")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("pgbench -i: %v\n%s", err, out)
	}
	if err := pg.Exec(t.Context(), demo.Database,
		"GRANT SELECT ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO authenticated"); err != nil {
		t.Fatal(err)
	}
}

// pgbenchCheck is a pgbench script run beside the built-in select-only one:
// it divides by zero, failing the run, unless the session sees exactly its
// user's notes and claim. :want and :userno come from -D; 'user' || :userno
// keeps the value numeric, so it works as literal text in simple mode and as
// a bind parameter in the extended and prepared modes.
const pgbenchCheck = `SELECT 1 / (count(*) = :want
    AND min(user_id) = 'user' || :userno
    AND max(user_id) = 'user' || :userno
    AND current_setting('jwt.claims.sub') = 'user' || :userno
    AND current_user = 'authenticated')::int
FROM notes;
`

var (
	tpsLine      = regexp.MustCompile(`(?m)^tps = [0-9.]+ `)
	processed    = regexp.MustCompile(`(?m)^number of transactions actually processed: (\d+)/(\d+)$`)
	failed       = regexp.MustCompile(`(?m)^number of failed transactions: (\d+) `)
	checkScripts = regexp.MustCompile(`(?m)^SQL script 2: .*check\.sql\n - weight: .*\n - (\d+) transactions`)
)

// TestPgbench drives the proxy with pgbench in each query mode, as each user,
// mixing the built-in select-only script (-S) with the RLS check script.
func TestPgbench(t *testing.T) {
	pgbench := lookPath(t, "pgbench", "install the PostgreSQL client: apt-get install -y postgresql-client")
	initPgbench(t, pgbench)
	script := filepath.Join(t.TempDir(), "check.sql")
	if err := os.WriteFile(script, []byte(pgbenchCheck), 0o644); err != nil {
		t.Fatal(err)
	}
	p := proxytest.Start(t, pg)

	cases := []struct {
		name    string
		mode    string
		clients int
		txs     int      // transactions per client
		extra   []string // more pgbench flags
	}{
		{name: "simple", mode: "simple", clients: 2, txs: 200},
		{name: "extended", mode: "extended", clients: 2, txs: 200},
		{name: "prepared", mode: "prepared", clients: 4, txs: 200},
		// -C opens a connection, so a token check and an upstream login,
		// for every transaction.
		{name: "prepared_reconnect", mode: "prepared", clients: 2, txs: 15, extra: []string{"-C"}},
	}
	for _, tc := range cases {
		for i, user := range users {
			t.Run(tc.name+"/"+user, func(t *testing.T) {
				want := strings.Count(wantRows(user), ";") + 1
				argv := []string{pgbench, "-n", "-S", "-f", script,
					"-M", tc.mode, "-c", strconv.Itoa(tc.clients), "-j", "2", "-t", strconv.Itoa(tc.txs),
					"-D", "want=" + strconv.Itoa(want), "-D", "userno=" + strconv.Itoa(i+1)}
				argv = append(argv, tc.extra...)
				argv = append(argv, demo.Database)
				res := runClient(t, argv, clientEnv(p, user, p.Token(t, user), "disable"))
				if res.err != nil {
					t.Fatalf("pgbench -M %s as %s: %v\n%s", tc.mode, user, res.err, res)
				}
				total := tc.clients * tc.txs
				if m := processed.FindStringSubmatch(res.stdout); m == nil || m[1] != strconv.Itoa(total) || m[2] != strconv.Itoa(total) {
					t.Errorf("want %d/%d transactions processed, got %q", total, total, m)
				}
				if m := failed.FindStringSubmatch(res.stdout); m == nil || m[1] != "0" {
					t.Errorf("want 0 failed transactions, got %q", m)
				}
				if !tpsLine.MatchString(res.stdout) {
					t.Errorf("pgbench printed no tps line")
				}
				// Each transaction draws one of the two scripts at random:
				// over 30 or more transactions the check runs but for odds
				// of 1 in 2^30, and it must have run for the identity to
				// have been checked at all.
				if m := checkScripts.FindStringSubmatch(res.stdout); m == nil || m[1] == "0" {
					t.Errorf("the RLS check script did not run: %q", m)
				}
				if t.Failed() {
					t.Logf("%s", res)
				}
			})
		}
	}
}
