package e2e

// Transaction pooling with real client libraries: named prepared statements
// (proxy/prepared.go) must follow each client from backend to backend. More
// clients than upstream connections, of several users, each re-executing
// the same prepared statements transaction after transaction, so that
// consecutive transactions of a client land on different backends, where
// the proxy prepares the statement again under the client's own name for it.

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/rlsproxy/rlsproxy/internal/demo"
	"github.com/rlsproxy/rlsproxy/internal/proxytest"
	"github.com/rlsproxy/rlsproxy/session"
)

const (
	// txpoolConns upstream connections serve txpoolUsers × txpoolPerUser
	// clients: 9 over 2, so that a client rarely finds its last backend free.
	txpoolConns   = 2
	txpoolPerUser = 3
	// txpoolTxs is each client's transactions (see txpoolKind).
	txpoolTxs = 30
)

// txpoolUsers are the subjects the clients connect as, one client program
// (with txpoolPerUser connections) each, all at once. user3 has no notes:
// its rows are empty, its sub and echo are not.
var txpoolUsers = []string{"user1", "user2", "user3"}

// txpoolPool is transaction pooling over txpoolConns upstream connections,
// with a pool wait long enough for every client to queue.
func txpoolPool(s *proxytest.Setup) {
	proxytest.TransactionPooling(s)
	s.PoolConfig = session.PoolConfig{Size: txpoolConns, MaxConns: txpoolConns, WaitTimeout: 30 * time.Second}
}

// txpoolClient is one client library. Each of its runs connects as one user
// with txpoolPerUser connections, concurrently, and each connection runs
// txpoolTxs transactions, printing one line per transaction:
//
//	tx <conn> <i> <kind> <who> <rows> <pids>
//
// tab-separated, where who is "current_user,sub,2*i" from the prepared
// statement WHO run with parameter i, rows is "user_id,content;..." from the
// prepared statement NOTES, and pids are the pg_backend_pid() of each WHO
// the transaction ran: one for autocommit executions, several for a
// transaction block, which must all be one backend's. The test checks every
// line, and that each client program's transactions ran on both backends.
type txpoolClient struct {
	name string
	// setup fails the test when the client's tools are missing and returns
	// the command line that runs it, and what it adds to the environment.
	// shared is a directory the clients' setups share (compiled classes).
	setup func(t *testing.T, shared string) (argv, env []string)
	// run, instead of setup, runs the client in the test's process (pgx).
	run func(ctx context.Context, p *proxytest.Proxy, user, token string) result
	// redo: the client's every tenth transaction closes or deallocates its
	// statements, then prepares them again (kind redo).
	redo bool
}

var txpoolClients = []txpoolClient{
	{
		// pgx's statement cache names NOTES (stmtcache_<hash>); WHO is
		// prepared by name. Its redo, in turn, closes WHO (Close),
		// deallocates it with another in one Query (DEALLOCATE who;
		// DEALLOCATE PREPARE echo), or deallocates everything (DEALLOCATE
		// ALL), then prepares it again under the same name.
		name: "pgx",
		run:  txpoolPgx,
		redo: true,
	},
	{
		// pgjdbc with prepareThreshold=1 names its statements (S_N) from
		// their first execution; its redo closes a PreparedStatement and
		// prepares its SQL again (a new S_N).
		name:  "jdbc",
		setup: txpoolJDBC("plain"),
		redo:  true,
	},
	{
		// HikariCP lends a connection per transaction; pgjdbc's statement
		// cache gives back that connection's server statement.
		name:  "jdbc_hikari",
		setup: txpoolJDBC("hikari"),
	},
	{
		// prepare() and the statement cache name statements
		// (__asyncpg_stmt_N__); the redo prepares WHO anew, and asyncpg
		// closes the old statement (Close) once the new one is parsed.
		name:  "asyncpg",
		setup: txpoolPython("asyncpg_txpool.py", "asyncpg", "python3-asyncpg"),
		redo:  true,
	},
	{
		// Named queries ({name, text, values}) are parsed once per
		// connection; the redo deallocates "who" (SQL DEALLOCATE) and
		// parses it again under the same name.
		name:  "node-postgres",
		setup: txpoolNode("node_postgres_txpool.js"),
		redo:  true,
	},
	{
		// Tagged templates are named statements (prepare: true, the
		// default), parsed once per connection.
		name:  "postgres.js",
		setup: txpoolNode("postgresjs_txpool.js"),
	},
	{
		// prepare=True names a statement (_pg3_N) on its first run.
		name:  "psycopg3",
		setup: txpoolPython("psycopg3_txpool.py", "psycopg", "python3-psycopg", "commit"),
	},
	{
		// A rollback makes psycopg 3.1 deallocate every statement and
		// prepare them again: DEALLOCATE ALL, sent as Parse/Bind/Execute
		// (psycopg runs its own commands through the extended protocol),
		// which drops every client's statements on that backend: the proxy
		// must forget them there, as for DEALLOCATE ALL in a Query.
		name:  "psycopg3_rollback",
		setup: txpoolPython("psycopg3_txpool.py", "psycopg", "python3-psycopg", "rollback"),
		redo:  true,
	},
	{
		// prepared_max = 1: every statement prepared evicts the other,
		// which psycopg deallocates by name (DEALLOCATE _pg3_N) through the
		// extended protocol: the proxy must rename it, as in a Query.
		name:  "psycopg3_evict",
		setup: txpoolPython("psycopg3_txpool.py", "psycopg", "python3-psycopg", "evict"),
	},
}

// txpoolJDBC compiles clients/txpool/TxpoolJdbc.java against Debian's
// PostgreSQL JDBC driver and HikariCP (with SLF4J, which it logs through),
// once into shared, and returns a java command line running it in mode.
func txpoolJDBC(mode string) func(t *testing.T, shared string) ([]string, []string) {
	return func(t *testing.T, shared string) ([]string, []string) {
		t.Helper()
		const install = "apt-get install -y default-jdk-headless libpostgresql-jdbc-java libhikaricp-java"
		cp := []string{jdbcJar(t)}
		for _, jar := range []string{"HikariCP.jar", "slf4j-api.jar", "slf4j-nop.jar"} {
			path := filepath.Join("/usr/share/java", jar)
			if !toolFileExists(path) {
				t.Fatalf("%s not found: %s", path, install)
			}
			cp = append(cp, path)
		}
		java := lookPath(t, "java", install)
		javac := lookPath(t, "javac", install)
		classes := filepath.Join(shared, "jdbc")
		classpath := strings.Join(cp, string(os.PathListSeparator))
		if !toolFileExists(filepath.Join(classes, "TxpoolJdbc.class")) {
			cmd := exec.Command(javac, "-d", classes, "-cp", classpath, filepath.Join(clientsDir(t), "txpool", "TxpoolJdbc.java"))
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("javac TxpoolJdbc.java: %v\n%s", err, out)
			}
		}
		// As setupJDBC: the quick JIT and the serial GC start faster.
		return []string{java, "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
			"-cp", classes + string(os.PathListSeparator) + classpath, "TxpoolJdbc", mode}, nil
	}
}

// txpoolPython is setupPython for a script of clients/txpool, run with args.
func txpoolPython(script, modules, debPackages string, args ...string) func(*testing.T, string) ([]string, []string) {
	setup := setupPython(filepath.Join("txpool", script), modules, debPackages)
	return func(t *testing.T, _ string) ([]string, []string) { return append(setup(t), args...), nil }
}

// txpoolNode runs a script of clients/txpool with node, on the npm packages
// locked in clients/node (installed by nodeInstall), found through
// NODE_PATH.
func txpoolNode(script string) func(*testing.T, string) ([]string, []string) {
	return func(t *testing.T, _ string) ([]string, []string) {
		node, dir := nodeInstall(t)
		return []string{node, filepath.Join(clientsDir(t), "txpool", script)},
			[]string{"NODE_PATH=" + filepath.Join(dir, "node_modules")}
	}
}

// txpoolKind is the kind of client transaction i: every tenth a redo (for
// clients that have one), else every third a BEGIN ... COMMIT block of
// several executions, else autocommit executions, each its own transaction.
func txpoolKind(i int, redo bool) string {
	switch {
	case redo && i%10 == 9:
		return "redo"
	case i%3 == 2:
		return "block"
	}
	return "auto"
}

// TestTxPoolClients runs each client library through a transaction-pooled
// proxy with fewer upstream connections than clients, as three users at
// once, and checks every transaction's identity and results.
func TestTxPoolClients(t *testing.T) {
	shared := t.TempDir()
	for _, c := range txpoolClients {
		t.Run(c.name, func(t *testing.T) {
			var argv, extraEnv []string
			if c.setup != nil {
				argv, extraEnv = c.setup(t, shared)
			}
			p := proxytest.Start(t, pg, recommended, txpoolPool)
			pinnedBefore := p.Counter(t, "rlsproxy_pinned_sessions_total")
			repreparedBefore := p.Counter(t, "rlsproxy_statements_reprepared_total")
			start := time.Now()
			results := make([]result, len(txpoolUsers))
			var wg sync.WaitGroup
			for i, user := range txpoolUsers {
				token := p.Token(t, user)
				wg.Add(1)
				go func() {
					defer wg.Done()
					if c.run != nil {
						ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
						defer cancel()
						results[i] = c.run(ctx, p, user, token)
						return
					}
					env := append(clientEnv(p, user, token, "disable"), extraEnv...)
					results[i] = runClient(t, argv, append(env,
						"TXPOOL_CONNS="+strconv.Itoa(txpoolPerUser), "TXPOOL_TXS="+strconv.Itoa(txpoolTxs)))
				}()
			}
			wg.Wait()
			var pids []string
			moved := 0
			for i, user := range txpoolUsers {
				t.Run(user, func(t *testing.T) {
					res := results[i]
					if res.err != nil {
						t.Fatalf("%s as %s: %v\n%s", c.name, user, res.err, res)
					}
					seen, m := txpoolCheckLines(t, res, user, c.redo)
					moved += m
					// One user's clients may stay on one backend (it is
					// preferred for their identity): movement is judged
					// over all clients below.
					for _, pid := range seen {
						if !slices.Contains(pids, pid) {
							pids = append(pids, pid)
						}
					}
				})
			}
			st := p.Config.Pool.Snapshot()
			reprepared := p.Counter(t, "rlsproxy_statements_reprepared_total") - repreparedBefore
			t.Logf("%s: %d clients, %d transactions each, in %v: backends %v, %d moves from backend to backend, %.0f statements prepared again, %d upstream connections opened",
				c.name, len(txpoolUsers)*txpoolPerUser, txpoolTxs, time.Since(start).Round(time.Millisecond), pids, moved, reprepared, st.Opened)
			if pinned := p.Counter(t, "rlsproxy_pinned_sessions_total") - pinnedBefore; pinned != 0 {
				t.Errorf("%v sessions pinned: a pinned client keeps its backend, and its statements never move", pinned)
			}
			if st.Opened > txpoolConns {
				t.Errorf("opened %d upstream connections, want at most %d", st.Opened, txpoolConns)
			}
			if len(pids) < 2 {
				t.Errorf("every transaction ran on backend %v: nothing moved", pids)
			}
			if reprepared == 0 {
				t.Errorf("no statement was prepared again on another backend: the client used no named statements, or never moved")
			}
			if t.Failed() {
				t.Logf("proxy pool: %+v", st)
			}
		})
	}
}

// The statements every client prepares (the client programs spell them in
// their drivers' placeholder styles): WHO echoes its parameter, so that each
// execution shows it was bound anew.
const (
	txpoolWho   = "SELECT current_user::text, current_setting('jwt.claims.sub'), $1::int * 2, pg_backend_pid()"
	txpoolNotes = "SELECT user_id, content FROM notes WHERE id >= $1 ORDER BY id"
)

// txpoolPgx is the pgx client: txpoolPerUser connections as user, one
// goroutine each, printing what the client programs print.
func txpoolPgx(ctx context.Context, p *proxytest.Proxy, user, token string) result {
	start := time.Now()
	var mu sync.Mutex
	var stdout, stderr strings.Builder
	var wg sync.WaitGroup
	var failed error
	for c := range txpoolPerUser {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := txpoolPgxConn(ctx, p.URL(user, token), func(i int, kind, who, rows string, pids []string) {
				mu.Lock()
				defer mu.Unlock()
				fmt.Fprintf(&stdout, "tx\t%d\t%d\t%s\t%s\t%s\t%s\n", c, i, kind, who, rows, strings.Join(pids, ","))
			})
			if err != nil {
				mu.Lock()
				defer mu.Unlock()
				fmt.Fprintf(&stderr, "conn %d: %v\n", c, err)
				failed = err
			}
		}()
	}
	wg.Wait()
	return result{argv: []string{"pgx"}, stdout: stdout.String(), stderr: stderr.String(), err: failed, took: time.Since(start)}
}

// txpoolPgxConn is one pgx connection's transactions.
func txpoolPgxConn(ctx context.Context, url string, print func(i int, kind, who, rows string, pids []string)) error {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	// echo is deallocated beside who, in one Query (case 1 below).
	const echoSQL = "SELECT $1::int"
	for name, sql := range map[string]string{"who": txpoolWho, "echo": echoSQL} {
		if _, err := conn.Prepare(ctx, name, sql); err != nil {
			return err
		}
	}
	type querier interface {
		QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
		Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	}
	// who runs the statement prepared as "who": pgx binds it by name.
	who := func(q querier, i int) (string, string, error) {
		var role, sub string
		var double, pid int
		if err := q.QueryRow(ctx, "who", i).Scan(&role, &sub, &double, &pid); err != nil {
			return "", "", err
		}
		return fmt.Sprintf("%s,%s,%d", role, sub, double), strconv.Itoa(pid), nil
	}
	notes := func(q querier) (string, error) {
		rows, err := q.Query(ctx, txpoolNotes, 1)
		if err != nil {
			return "", err
		}
		got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (string, error) {
			var u, c string
			err := r.Scan(&u, &c)
			return u + "," + c, err
		})
		return strings.Join(got, ";"), err
	}
	for i := range txpoolTxs {
		kind := txpoolKind(i, true)
		var w, w2, rows, pid, pid2 string
		var err error
		switch kind {
		case "redo":
			// The same name prepared again after each way of dropping it.
			switch i / 10 % 3 {
			case 0: // Close, then Parse
				if err = conn.Deallocate(ctx, "who"); err == nil {
					_, err = conn.Prepare(ctx, "who", txpoolWho)
				}
			case 1: // DEALLOCATE both in one Query, then Parse (pgx still knows them)
				if _, err = conn.Exec(ctx, "DEALLOCATE who; DEALLOCATE PREPARE echo"); err == nil {
					if _, err = conn.PgConn().Prepare(ctx, "who", txpoolWho, nil); err == nil {
						_, err = conn.PgConn().Prepare(ctx, "echo", echoSQL, nil)
					}
				}
			case 2: // DEALLOCATE ALL: pgx forgets its statement cache too
				if err = conn.DeallocateAll(ctx); err == nil {
					if _, err = conn.Prepare(ctx, "who", txpoolWho); err == nil {
						_, err = conn.Prepare(ctx, "echo", echoSQL)
					}
				}
			}
			if err == nil {
				if w, pid, err = who(conn, i); err == nil {
					rows, err = notes(conn)
				}
			}
			if err == nil {
				var n int
				if err = conn.QueryRow(ctx, "echo", i).Scan(&n); err == nil && n != i {
					err = fmt.Errorf("echo %d returned %d", i, n)
				}
			}
			w2, pid2 = w, pid
		case "block":
			var tx pgx.Tx
			if tx, err = conn.Begin(ctx); err != nil {
				return err
			}
			if w, pid, err = who(tx, i); err == nil {
				if rows, err = notes(tx); err == nil {
					w2, pid2, err = who(tx, i)
				}
			}
			if err == nil {
				err = tx.Commit(ctx)
			} else {
				_ = tx.Rollback(ctx)
			}
		default:
			if w, pid, err = who(conn, i); err == nil {
				rows, err = notes(conn)
			}
			w2, pid2 = w, pid
		}
		if err != nil {
			return fmt.Errorf("transaction %d (%s): %w", i, kind, err)
		}
		pids := []string{pid}
		if kind == "block" {
			pids = append(pids, pid2)
		}
		if w2 != w {
			w += "|" + w2
		}
		print(i, kind, w, rows, pids)
	}
	return nil
}

// txpoolCheckLines checks one client program's transactions as user: every
// one printed once, the identity and rows right, a transaction block on one
// backend. It returns the backends seen and how many times a connection's
// transaction ran on another backend than its previous one.
func txpoolCheckLines(t *testing.T, res result, user string, redo bool) (pids []string, moved int) {
	t.Helper()
	type key struct{ conn, i int }
	seen := map[key]bool{}
	last := map[int]string{}
	kinds := map[string]int{}
	sc := bufio.NewScanner(strings.NewReader(res.stdout))
	for sc.Scan() {
		f := strings.Split(sc.Text(), "\t")
		if len(f) != 7 || f[0] != "tx" {
			t.Errorf("unexpected output line %q", sc.Text())
			continue
		}
		conn, err1 := strconv.Atoi(f[1])
		i, err2 := strconv.Atoi(f[2])
		if err1 != nil || err2 != nil || conn < 0 || conn >= txpoolPerUser || i < 0 || i >= txpoolTxs || seen[key{conn, i}] {
			t.Errorf("unexpected or repeated transaction in line %q", sc.Text())
			continue
		}
		seen[key{conn, i}] = true
		kind, who, rows, txPids := f[3], f[4], f[5], strings.Split(f[6], ",")
		kinds[kind]++
		if want := txpoolKind(i, redo); kind != want {
			t.Errorf("connection %d transaction %d is a %s, want %s", conn, i, kind, want)
		}
		// The echo of the parameter shows the Bind carried this
		// execution's value, not a stale one.
		if want := fmt.Sprintf("authenticated,%s,%d", user, 2*i); who != want {
			t.Errorf("connection %d transaction %d (%s): who = %q, want %q", conn, i, kind, who, want)
		}
		if want := wantRows(user); rows != want {
			t.Errorf("connection %d transaction %d (%s): rows = %q, want %q", conn, i, kind, rows, want)
		}
		for _, pid := range txPids {
			if _, err := strconv.Atoi(pid); err != nil || pid != txPids[0] {
				t.Errorf("connection %d transaction %d (%s) ran on backends %v, want one", conn, i, kind, txPids)
				break
			}
		}
		if kind == "block" && len(txPids) < 2 {
			t.Errorf("connection %d transaction %d (%s): %d executions, want several", conn, i, kind, len(txPids))
		}
		if prev, ok := last[conn]; ok && prev != txPids[0] {
			moved++
		}
		last[conn] = txPids[0]
		if !slices.Contains(pids, txPids[0]) {
			pids = append(pids, txPids[0])
		}
	}
	if len(seen) != txpoolPerUser*txpoolTxs {
		t.Errorf("%d transactions printed, want %d", len(seen), txpoolPerUser*txpoolTxs)
	}
	if t.Failed() {
		t.Logf("kinds %v\n%s", kinds, res)
	}
	return pids, moved
}

// The table TestTxPoolPreparedAfterFailedParse's statements read: it does
// not exist when the client first prepares them.
const (
	txpoolLateDrop   = "DROP TABLE IF EXISTS public.txpool_late"
	txpoolLateCreate = "CREATE TABLE public.txpool_late (v text); INSERT INTO public.txpool_late VALUES ('late'); GRANT SELECT ON public.txpool_late TO authenticated"
)

// A Parse that fails leaves no statement, and a client parses the name again
// later: pgx's Prepare, and its statement cache, once the table exists. The
// statement must then run on every backend: the one the failed Parses went
// to (whose proxy must not believe it holds them) and the other. Two more
// clients hold one backend or the other in a transaction, so that the
// client's transactions land where the test says.
func TestTxPoolPreparedAfterFailedParse(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := pg.Exec(ctx, demo.Database, txpoolLateDrop); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pg.Exec(context.Background(), demo.Database, txpoolLateDrop) })
	p := proxytest.Start(t, pg, recommended, txpoolPool)
	connect := func(user string) *pgx.Conn {
		c, err := pgx.Connect(ctx, p.URL(user, p.Token(t, user)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(context.Background()) })
		return c
	}
	a := connect("user1")
	holders := []*pgx.Conn{connect("user2"), connect("user3")}
	pid := func(q interface {
		QueryRow(context.Context, string, ...any) pgx.Row
	}) int {
		var n int
		if err := q.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	// hold keeps backend busy in a holder's transaction, which it returns,
	// and returns the other backend, the one left to the client: the
	// holders take one each, and the one on the other lets go.
	hold := func(busy int) (pgx.Tx, int) {
		var txs []pgx.Tx
		var pids []int
		for _, h := range holders {
			tx, err := h.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			txs, pids = append(txs, tx), append(pids, pid(tx))
		}
		keep := slices.Index(pids, busy)
		if keep < 0 || pids[0] == pids[1] {
			t.Fatalf("holders on backends %v, want %d and another", pids, busy)
		}
		if err := txs[1-keep].Commit(ctx); err != nil {
			t.Fatal(err)
		}
		return txs[keep], pids[1-keep]
	}
	const (
		lateSQL   = "SELECT v || ' ' || current_setting('jwt.claims.sub') FROM public.txpool_late"
		cachedSQL = "SELECT count(*)::text || ' ' || current_setting('jwt.claims.sub') FROM public.txpool_late WHERE v <> $1"
	)

	// Both Parses fail on backend first: no such table, then a
	// transaction already aborted.
	tx, err := a.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	first := pid(tx)
	if _, err := a.Prepare(ctx, "late", lateSQL); err == nil || !strings.Contains(err.Error(), "42P01") {
		t.Fatalf("prepare before the table exists: %v, want 42P01", err)
	}
	var got string
	if err := a.QueryRow(ctx, cachedSQL, "x").Scan(&got); err == nil || !strings.Contains(err.Error(), "25P02") {
		t.Fatalf("cached query in the aborted transaction: %v, want 25P02", err)
	}
	_ = tx.Rollback(ctx)
	if err := pg.Exec(ctx, demo.Database, txpoolLateCreate); err != nil {
		t.Fatal(err)
	}

	// Parsed again, on the other backend.
	held, other := hold(first)
	if _, err := a.Prepare(ctx, "late", lateSQL); err != nil {
		t.Fatalf("prepare once the table exists: %v", err)
	}
	if err := a.QueryRow(ctx, cachedSQL, "x").Scan(&got); err != nil || got != "1 user1" {
		t.Fatalf("cached query once the table exists: %q, %v", got, err)
	}
	if err := held.Commit(ctx); err != nil {
		t.Fatal(err)
	}

	// Then each statement on each backend in turn, first's first.
	for i := range 4 {
		busy := []int{other, first}[i%2]
		held, want := hold(busy)
		for _, q := range []struct {
			sql  string
			args []any
			want string
		}{
			{"late", nil, "late user1"},
			{cachedSQL, []any{"x"}, "1 user1"},
		} {
			got = ""
			if err := a.QueryRow(ctx, q.sql, q.args...).Scan(&got); err != nil || got != q.want {
				t.Errorf("run %d on backend %d (the failed Parses' %v) of %.30q: %q, %v; want %q",
					i, want, want == first, q.sql, got, err, q.want)
			}
		}
		if on := pid(a); on != want {
			t.Errorf("run %d: the client ran on backend %d, want %d", i, on, want)
		}
		if err := held.Commit(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// A client's SQL DEALLOCATE of a name in the proxy's namespace (another
// client's statement, on the backend they share, as pg_prepared_statements
// shows it) reaches nothing: the other client's statement still runs.
func TestTxPoolDeallocateOthers(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	p := proxytest.Start(t, pg, recommended, func(s *proxytest.Setup) {
		proxytest.TransactionPooling(s)
		s.PoolConfig = session.PoolConfig{Size: 1, MaxConns: 1, WaitTimeout: 10 * time.Second}
	})
	var conns []*pgx.Conn
	for _, user := range []string{"user1", "user2"} {
		c, err := pgx.Connect(ctx, p.URL(user, p.Token(t, user)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(context.Background()) })
		conns = append(conns, c)
	}
	a, b := conns[0], conns[1]
	const mine = "SELECT 'mine ' || current_setting('jwt.claims.sub')"
	if _, err := a.Prepare(ctx, "mine", mine); err != nil {
		t.Fatal(err)
	}
	var name string
	if err := b.QueryRow(ctx, "SELECT name FROM pg_prepared_statements WHERE statement = $1", mine).Scan(&name); err != nil {
		t.Fatalf("a's statement on the shared backend: %v", err)
	}
	for _, q := range []string{"DEALLOCATE " + name, "DEALLOCATE PREPARE " + name + "; DEALLOCATE " + name} {
		if _, err := b.Exec(ctx, q); err == nil || !strings.Contains(err.Error(), "26000") {
			t.Errorf("%s by another client: %v, want 26000", q, err)
		}
	}
	var got string
	if err := a.QueryRow(ctx, "mine").Scan(&got); err != nil || got != "mine user1" {
		t.Errorf("a's statement after the other's DEALLOCATE: %q, %v", got, err)
	}
}
