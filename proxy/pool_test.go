package proxy_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// leaveTraces leaves in the session everything a pooled connection must not
// carry to the next client.
func leaveTraces(t *testing.T, conn *pgx.Conn) {
	t.Helper()
	for _, sql := range []string{
		"CREATE TEMP TABLE trace (x int)",
		"PREPARE trace_stmt AS SELECT 1",
		"LISTEN trace_channel",
		"SELECT pg_advisory_lock(4242)",
		"SET statement_timeout = 1234",
	} {
		if _, err := conn.Exec(context.Background(), sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
}

// assertNoTraces checks that conn, a session of sub, carries nothing of
// another client's session.
func assertNoTraces(t *testing.T, conn *pgx.Conn, sub string) {
	t.Helper()
	var cu, gotSub, timeout string
	var temp, prepared, listening, locks int
	err := conn.QueryRow(context.Background(), `SELECT current_user, current_setting('jwt.claims.sub'),
		current_setting('statement_timeout'),
		(SELECT count(*) FROM pg_class WHERE relname = 'trace' AND relpersistence = 't'),
		(SELECT count(*) FROM pg_prepared_statements WHERE name = 'trace_stmt'),
		(SELECT count(*) FROM pg_listening_channels()),
		(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())`).
		Scan(&cu, &gotSub, &timeout, &temp, &prepared, &listening, &locks)
	if err != nil {
		t.Fatal(err)
	}
	if cu != "authenticated" || gotSub != sub || timeout != "0" || temp+prepared+listening+locks != 0 {
		t.Fatalf("pooled session of %s: role %s sub %s statement_timeout %s temp %d prepared %d listening %d advisory locks %d",
			sub, cu, gotSub, timeout, temp, prepared, listening, locks)
	}
	rows := queryStrings(t, conn, "SELECT DISTINCT user_id FROM notes")
	if len(rows) != 1 || rows[0] != sub {
		t.Fatalf("pooled session of %s sees notes of %v", sub, rows)
	}
}

// Two users alternate on one pooled upstream connection: each sees only
// itself, never the other's role, claims, prepared statements, temporary
// tables, advisory locks or LISTENs.
// Both relay drivers hand the connection back: the event loop takes the
// socket off the Go runtime for the session and returns it as a net.Conn.
func TestPoolIsolation(t *testing.T) {
	for _, d := range relayDrivers {
		t.Run(d.name, func(t *testing.T) { testPoolIsolation(t, d.opt) })
	}
}

func testPoolIsolation(t *testing.T, driver proxytest.Option) {
	p := proxytest.Start(t, pg, proxytest.Pooled(1, 1), driver)
	ctx := context.Background()
	pid := 0
	for i, sub := range []string{"user1", "user2", "user1", "user2"} {
		conn, err := pgx.Connect(ctx, p.DSN(sub, p.Token(t, sub)))
		if err != nil {
			t.Fatal(err)
		}
		got := backendPID(t, conn)
		if i > 0 && got != pid {
			t.Fatalf("session %d ran on backend %d, not the pooled %d", i, got, pid)
		}
		pid = got
		assertNoTraces(t, conn, sub)
		leaveTraces(t, conn)
		conn.Close(ctx) // Terminate: a clean end
	}
}

// A client that leaves mid-transaction: its work is rolled back, and the
// connection serves the next client clean.
func TestPoolClientLeavesMidTransaction(t *testing.T) {
	p := proxytest.Start(t, pg, proxytest.Pooled(1, 1))
	ctx := context.Background()
	for _, abrupt := range []bool{false, true} {
		conn := connect(t, p, "user1", p.Token(t, "user1"))
		if _, err := conn.Exec(ctx, "BEGIN"); err != nil {
			t.Fatal(err)
		}
		leaveTraces(t, conn)
		if _, err := conn.Exec(ctx, "INSERT INTO notes (content) VALUES ('uncommitted')"); err != nil {
			t.Fatal(err)
		}
		if abrupt {
			conn.PgConn().Conn().Close() // the socket drops, no Terminate
		} else {
			conn.Close(ctx)
		}
		next := connectRetry(t, p, "user2")
		assertNoTraces(t, next, "user2")
		next.Close(ctx)
	}
	var n int
	admin := superConn(t)
	if err := admin.QueryRow(ctx, "SELECT count(*) FROM notes WHERE content = 'uncommitted'").Scan(&n); err != nil || n != 0 {
		t.Fatalf("work of a client that left mid-transaction was kept: %d %v", n, err)
	}
}

// A client that leaves mid-COPY: the connection is not reused half-way
// through a COPY; the next client gets a clean session.
func TestPoolClientLeavesMidCopy(t *testing.T) {
	p := proxytest.Start(t, pg, proxytest.Pooled(1, 1))
	ctx := context.Background()
	conn := connect(t, p, "user1", p.Token(t, "user1"))
	if _, err := conn.Exec(ctx, "CREATE TEMP TABLE c (x int)"); err != nil {
		t.Fatal(err)
	}
	pr := &slowReader{data: []byte(strings.Repeat("1\n", 1000))}
	go func() {
		time.Sleep(300 * time.Millisecond)
		conn.PgConn().Conn().Close()
	}()
	_, _ = conn.PgConn().CopyFrom(ctx, pr, "COPY c FROM STDIN")
	next := connectRetry(t, p, "user2")
	assertNoTraces(t, next, "user2")
}

// slowReader feeds COPY data slowly, so the client is mid-COPY when it leaves.
type slowReader struct{ data []byte }

func (r *slowReader) Read(b []byte) (int, error) {
	if len(r.data) == 0 {
		time.Sleep(time.Hour)
	}
	time.Sleep(50 * time.Millisecond)
	n := copy(b[:min(len(b), 10)], r.data)
	r.data = r.data[n:]
	return n, nil
}

// At --max-upstream-conns, clients wait, then get 53300 with a clear message.
func TestPoolMaxUpstreamConns(t *testing.T) {
	p := proxytest.Start(t, pg, proxytest.Pooled(1, 1), proxytest.SessionPooling)
	ctx := context.Background()
	holder := connect(t, p, "user1", p.Token(t, "user1"))
	start := time.Now()
	_, err := pgx.Connect(ctx, p.DSN("user2", p.Token(t, "user2")))
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "53300" || !strings.Contains(pgErr.Message, "upstream connections are in use") {
		t.Fatalf("want 53300, got %v", err)
	}
	if waited := time.Since(start); waited < 400*time.Millisecond {
		t.Fatalf("the client did not wait (%v)", waited)
	}
	// Once the holder leaves, the waiting client gets the connection.
	done := make(chan error, 1)
	go func() {
		c, err := pgx.Connect(ctx, p.DSN("user2", p.Token(t, "user2")))
		if err == nil {
			c.Close(ctx)
		}
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	holder.Close(ctx)
	if err := <-done; err != nil {
		t.Fatalf("after the holder left: %v", err)
	}
}

// /metrics shows the pool: a connection in use while its session lasts,
// then idle in the pool once the client leaves.
func TestPoolMetrics(t *testing.T) {
	p := proxytest.Start(t, pg, proxytest.Pooled(1, 1), proxytest.SessionPooling)
	gauges := func() string {
		out, _ := scrapeMetrics(p)
		var lines []string
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "rlsproxy_upstream_connections") {
				lines = append(lines, l)
			}
		}
		return strings.Join(lines, "; ")
	}
	c := connect(t, p, "user1", p.Token(t, "user1"))
	if got, want := gauges(), "rlsproxy_upstream_connections 1; rlsproxy_upstream_connections_idle 0"; got != want {
		t.Fatalf("in use: %s, want %s", got, want)
	}
	c.Close(context.Background())
	want := "rlsproxy_upstream_connections 1; rlsproxy_upstream_connections_idle 1"
	for deadline := time.Now().Add(5 * time.Second); gauges() != want; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("after the client left: %s, want %s", gauges(), want)
		}
	}
}
