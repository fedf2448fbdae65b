package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// Every protocol feature a driver uses passes through the relay unchanged,
// whichever way the session is relayed.
func TestProtocolFeatures(t *testing.T) {
	for _, d := range relayDrivers {
		t.Run(d.name, func(t *testing.T) { testProtocolFeatures(t, d.opt) })
	}
}

func testProtocolFeatures(t *testing.T, driver proxytest.Option) {
	p := proxytest.Start(t, pg, driver)
	ctx := context.Background()
	conn := connect(t, p, "user1", p.Token(t, "user1"))

	t.Run("extended query with parameters and binary results", func(t *testing.T) {
		var n int64
		var f float64
		var b []byte
		err := conn.QueryRow(ctx, "SELECT $1::int8 * 2, $2::float8, $3::bytea", int64(21), 1.5, []byte{0, 1, 2}).Scan(&n, &f, &b)
		if err != nil || n != 42 || f != 1.5 || !bytes.Equal(b, []byte{0, 1, 2}) {
			t.Fatalf("got %d %v %v, err %v", n, f, b, err)
		}
	})

	t.Run("named prepared statement", func(t *testing.T) {
		if _, err := conn.Prepare(ctx, "mine", "SELECT content FROM notes WHERE user_id = $1 ORDER BY id"); err != nil {
			t.Fatal(err)
		}
		for range 3 {
			if got := queryStrings(t, conn, "mine", "user2"); len(got) != 0 {
				t.Fatalf("prepared statement shows another user's rows: %v", got)
			}
			if got := queryStrings(t, conn, "mine", "user1"); len(got) != 2 {
				t.Fatalf("prepared statement rows: %v", got)
			}
		}
	})

	t.Run("pipeline", func(t *testing.T) {
		pl := conn.PgConn().StartPipeline(ctx)
		for i := range 50 {
			pl.SendQueryParams("SELECT $1::int", [][]byte{fmt.Appendf(nil, "%d", i)}, nil, nil, nil)
		}
		if err := pl.Sync(); err != nil {
			t.Fatal(err)
		}
		for i := range 50 {
			res, err := pl.GetResults()
			if err != nil {
				t.Fatal(err)
			}
			rr := res.(*pgconn.ResultReader).Read()
			if rr.Err != nil || string(rr.Rows[0][0]) != fmt.Sprint(i) {
				t.Fatalf("pipelined result %d: %v %v", i, rr.Rows, rr.Err)
			}
		}
		if _, err := pl.GetResults(); err != nil { // the Sync
			t.Fatal(err)
		}
		if err := pl.Close(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("batch with an error in the middle", func(t *testing.T) {
		b := &pgx.Batch{}
		b.Queue("SELECT 1")
		b.Queue("SELECT 1/0")
		b.Queue("SELECT 3")
		err := conn.SendBatch(ctx, b).Close()
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "22012" {
			t.Fatalf("want division_by_zero, got %v", err)
		}
		if got := queryStrings(t, conn, "SELECT 'still usable'"); got[0] != "still usable" {
			t.Fatal(got)
		}
	})

	t.Run("copy in and out", func(t *testing.T) {
		if _, err := conn.Exec(ctx, "CREATE TEMP TABLE items (id int, label text)"); err != nil {
			t.Fatal(err)
		}
		rows := make([][]any, 5000)
		for i := range rows {
			rows[i] = []any{i, strings.Repeat("x", i%100)}
		}
		n, err := conn.CopyFrom(ctx, pgx.Identifier{"items"}, []string{"id", "label"}, pgx.CopyFromRows(rows))
		if err != nil || n != 5000 {
			t.Fatalf("COPY FROM: %d %v", n, err)
		}
		var buf bytes.Buffer
		tag, err := conn.PgConn().CopyTo(ctx, &buf, "COPY items TO STDOUT")
		if err != nil || tag.RowsAffected() != 5000 {
			t.Fatalf("COPY TO: %v %v", tag, err)
		}
		// RLS holds in COPY (query) TO: only the user's notes.
		buf.Reset()
		if _, err := conn.PgConn().CopyTo(ctx, &buf, "COPY (SELECT user_id FROM notes) TO STDOUT"); err != nil {
			t.Fatal(err)
		}
		if buf.String() != "user1\nuser1\n" {
			t.Fatalf("COPY TO of notes: %q", buf.String())
		}
		// A COPY FROM the client that fails midway leaves the session usable.
		_, err = conn.PgConn().CopyFrom(ctx, strings.NewReader("1\tok\nnot-a-number\tbad\n"), "COPY items FROM STDIN")
		if err == nil {
			t.Fatal("bad COPY data was accepted")
		}
		if got := queryStrings(t, conn, "SELECT count(*)::text FROM items"); got[0] != "5000" {
			t.Fatal(got)
		}
	})

	t.Run("messages larger than the relay buffer", func(t *testing.T) {
		big := strings.Repeat("y", 3<<20) // 3 MiB each way
		var n int
		if err := conn.QueryRow(ctx, "SELECT length($1::text)", big).Scan(&n); err != nil || n != len(big) {
			t.Fatalf("big parameter: %d %v", n, err)
		}
		if err := conn.QueryRow(ctx, fmt.Sprintf("SELECT length('%s')", big)).Scan(&n); err != nil || n != len(big) {
			t.Fatalf("big query text: %d %v", n, err)
		}
		var s string
		if err := conn.QueryRow(ctx, "SELECT repeat('z', 5000000)").Scan(&s); err != nil || len(s) != 5000000 {
			t.Fatalf("big row: %d %v", len(s), err)
		}
	})

	t.Run("large result set", func(t *testing.T) {
		rows, err := conn.Query(ctx, "SELECT g, md5(g::text) FROM generate_series(1, 200000) g")
		if err != nil {
			t.Fatal(err)
		}
		count := 0
		for rows.Next() {
			count++
		}
		if rows.Err() != nil || count != 200000 {
			t.Fatalf("rows %d, err %v", count, rows.Err())
		}
	})

	t.Run("notices", func(t *testing.T) {
		var notices []string
		cfg, _ := pgx.ParseConfig(p.DSN("user1", p.Token(t, "user1")))
		cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) { notices = append(notices, n.Message) }
		c, err := pgx.ConnectConfig(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(ctx)
		if _, err := c.Exec(ctx, "DROP TABLE IF EXISTS no_such_table"); err != nil {
			t.Fatal(err)
		}
		if len(notices) != 1 || !strings.Contains(notices[0], "does not exist, skipping") {
			t.Fatalf("notices: %v", notices)
		}
	})

	t.Run("transactions", func(t *testing.T) {
		tx, err := conn.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "INSERT INTO notes (content) VALUES ('in tx')"); err != nil {
			t.Fatal(err)
		}
		if err := tx.Rollback(ctx); err != nil {
			t.Fatal(err)
		}
		if got := queryStrings(t, conn, "SELECT content FROM notes WHERE content = 'in tx'"); len(got) != 0 {
			t.Fatal("rolled-back insert is visible")
		}
	})
}

// LISTEN/NOTIFY: a notification sent by one session reaches another that
// listens, asynchronously, through the relay.
func TestListenNotify(t *testing.T) {
	p := proxytest.Start(t, pg)
	ctx := context.Background()
	listener := connect(t, p, "user1", p.Token(t, "user1"))
	sender := connect(t, p, "user2", p.Token(t, "user2"))
	if _, err := listener.Exec(ctx, "LISTEN events"); err != nil {
		t.Fatal(err)
	}
	if _, err := sender.Exec(ctx, "SELECT pg_notify('events', 'hello')"); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	n, err := listener.WaitForNotification(wctx)
	if err != nil || n.Channel != "events" || n.Payload != "hello" {
		t.Fatalf("notification %+v, err %v", n, err)
	}
}

// A CancelRequest with the proxy's BackendKeyData cancels the right
// upstream query; a wrong key is ignored.
func TestCancel(t *testing.T) {
	p := proxytest.Start(t, pg)
	ctx := context.Background()
	conn := connect(t, p, "user1", p.Token(t, "user1"))
	other := connect(t, p, "user2", p.Token(t, "user2"))
	if pid := conn.PgConn().PID(); pid == other.PgConn().PID() || pid == 0 {
		t.Fatalf("proxy-issued pids are not distinct: %d", pid)
	}

	// A forged key (right pid, wrong secret) does nothing.
	done := make(chan error, 1)
	go func() {
		_, err := conn.Exec(ctx, "SELECT pg_sleep(1)")
		done <- err
	}()
	time.Sleep(200 * time.Millisecond)
	if err := sendCancel(p.Addr, conn.PgConn().PID(), 12345); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("a cancel with a wrong secret cancelled the query: %v", err)
	}

	// The real key cancels conn's query and not other's.
	go func() {
		_, err := conn.Exec(ctx, "SELECT pg_sleep(30)")
		done <- err
	}()
	otherDone := make(chan error, 1)
	go func() {
		_, err := other.Exec(ctx, "SELECT pg_sleep(1)")
		otherDone <- err
	}()
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
	defer ccancel()
	if err := conn.PgConn().CancelRequest(cctx); err != nil {
		t.Fatal(err)
	}
	err := <-done
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "57014" {
		t.Fatalf("want query_canceled, got %v", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Fatal("cancel took too long")
	}
	if err := <-otherDone; err != nil {
		t.Fatalf("another session's query was cancelled: %v", err)
	}
	if got := queryStrings(t, conn, "SELECT 'alive'"); got[0] != "alive" {
		t.Fatal(got)
	}
}

// A client that stops reading a large result holds back only its own
// session: the loop stops reading that session's server instead of
// buffering the result, another session on the same loop carries on, and
// the slow client gets every row once it reads again.
func TestSlowClientDoesNotStallLoop(t *testing.T) {
	for _, d := range relayDrivers {
		t.Run(d.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, d.opt)
			ctx := context.Background()
			slow, err := pgconn.Connect(ctx, p.DSN("user1", p.Token(t, "user1")))
			if err != nil {
				t.Fatal(err)
			}
			defer slow.Close(ctx)
			const rows, width = 100000, 1000 // ~100 MB
			heapBefore := heapInUse()
			// pgconn reads the result only when asked: until then the client's
			// socket fills and the proxy's writes to it block.
			result := slow.Exec(ctx, fmt.Sprintf("SELECT repeat('x', %d) FROM generate_series(1, %d)", width, rows))

			fast := connect(t, p, "user2", p.Token(t, "user2"))
			qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			for i := range 200 {
				var n int
				if err := fast.QueryRow(qctx, "SELECT $1::int", i).Scan(&n); err != nil || n != i {
					t.Fatalf("other session, query %d while the slow client stalls: %d %v", i, n, err)
				}
			}
			time.Sleep(time.Second) // time enough to read the whole result from the server
			if relayed := p.Counter(t, "rlsproxy_relayed_bytes_total"); relayed > 40<<20 {
				t.Fatalf("%.0f bytes relayed to a client that reads nothing", relayed)
			}
			if grown := heapInUse() - heapBefore; grown > 32<<20 {
				t.Fatalf("the heap grew by %d MiB while the client read nothing: the proxy is buffering the result", grown>>20)
			}

			got := 0
			for result.NextResult() {
				rr := result.ResultReader()
				for rr.NextRow() {
					if len(rr.Values()[0]) != width {
						t.Fatalf("row %d is %d bytes", got, len(rr.Values()[0]))
					}
					got++
				}
				if _, err := rr.Close(); err != nil {
					t.Fatal(err)
				}
			}
			if err := result.Close(); err != nil || got != rows {
				t.Fatalf("slow client got %d rows, err %v", got, err)
			}
		})
	}
}

// A message the guard must parse at length moves its session off the event
// loop, to goroutines of its own: the loop's other sessions carry on while
// it is judged, and the session itself carries on after.
func TestLongGuardParseDoesNotStallLoop(t *testing.T) {
	p := proxytest.Start(t, pg, proxytest.RelayLoops(1))
	ctx := context.Background()
	slow := connect(t, p, "user1", p.Token(t, "user1"))
	fast := connect(t, p, "user2", p.Token(t, "user2"))

	// set_config of role makes the guard parse the statement (and refuse it); the
	// VALUES list (1.8 MB, under the 2 MiB the guard parses) makes the
	// parse take a while.
	var b strings.Builder
	b.WriteString("SELECT count(set_config('role', 'admin', false)) FROM (VALUES ")
	for i := range 80000 {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "(%d, 'value %d')", i, i)
	}
	b.WriteString(") v(a, b)")
	type result struct {
		took time.Duration
		err  error
	}
	done := make(chan result, 1)
	go func() {
		start := time.Now()
		var n int
		err := slow.QueryRow(ctx, b.String()).Scan(&n)
		done <- result{time.Since(start), err}
	}()

	// A stall lasts as long as the parse (seconds); a shared 2-core machine
	// under -race delays a query by 100 ms now and then without one.
	const bound = 100 * time.Millisecond
	var worst time.Duration
	queries := 0
	for {
		select {
		case res := <-done:
			if res.err == nil || !strings.Contains(res.err.Error(), "set_config of role is not allowed") {
				t.Fatalf("the long statement was not refused: %v", res.err)
			}
			if res.took < 2*bound {
				t.Fatalf("the long statement took only %v: too short to tell a stall from a wait", res.took)
			}
			if worst > max(bound, res.took/8) || queries == 0 {
				t.Fatalf("another session's query waited %v (%d queries) while a %v statement was judged", worst, queries, res.took)
			}
			t.Logf("%d queries of another session, the slowest %v, while a statement of %d KB took %v", queries, worst, b.Len()>>10, res.took)
			if got := queryStrings(t, slow, "SELECT current_setting('jwt.claims.sub')"); got[0] != "user1" {
				t.Fatalf("after the hand-off the session is %v", got)
			}
			return
		default:
		}
		start := time.Now()
		var n int
		if err := fast.QueryRow(ctx, "SELECT $1::int", queries).Scan(&n); err != nil {
			t.Fatal(err)
		}
		worst = max(worst, time.Since(start))
		queries++
	}
}
