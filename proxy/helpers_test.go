package proxy_test

// The helpers the tests of the package share: proxy options, pgx and psql
// connections through the proxy, sessions spoken by hand, and what the
// tests read of the proxy itself.

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http/httptest"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/demo"
	"github.com/rlsproxy/rlsproxy/internal/proxytest"
	"github.com/rlsproxy/rlsproxy/internal/sqlquote"
	"github.com/rlsproxy/rlsproxy/session"
)

// relayDrivers are the two ways a session is relayed: an event loop (plaintext) and a goroutine per direction (TLS).
var relayDrivers = []struct {
	name string
	opt  proxytest.Option
}{
	{"loop", proxytest.RelayLoops(1)},
	{"goroutines", proxytest.GoroutineRelay},
}

// withSigner signs every session's claims with the test key.
func withSigner(s *proxytest.Setup) { s.Signer = signer }

// connect opens a pgx connection through the proxy, closed when the test ends.
func connect(t *testing.T, p *proxytest.Proxy, user, token string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), p.DSN(user, token))
	if err != nil {
		t.Fatalf("connect through proxy as %s: %v", user, err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// connectRetry connects as sub, waiting briefly for the previous session's connection to be released.
func connectRetry(t *testing.T, p *proxytest.Proxy, sub string) *pgx.Conn {
	t.Helper()
	var last error
	for range 20 {
		conn, err := pgx.Connect(context.Background(), p.DSN(sub, p.Token(t, sub)))
		if err == nil {
			t.Cleanup(func() { conn.Close(context.Background()) })
			return conn
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("connect as %s: %v", sub, last)
	return nil
}

// connectErr returns the PgError of a connection attempt that must fail.
func connectErr(t *testing.T, dsn string) *pgconn.PgError {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dsn)
	if err == nil {
		conn.Close(context.Background())
		t.Fatal("connection succeeded, want an error")
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		t.Fatalf("want a PgError, got %v", err)
	}
	return pgErr
}

// superConn is a superuser connection to the demo database (not through the proxy), closed when the test ends.
func superConn(t *testing.T) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), pg.SuperDSN(demo.Database))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// queryStrings runs a query whose rows are one text column and returns them.
func queryStrings(t *testing.T, conn *pgx.Conn, sql string, args ...any) []string {
	t.Helper()
	rows, err := conn.Query(context.Background(), sql, args...)
	if err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return out
}

// backendPID is the upstream backend serving conn.
func backendPID(t *testing.T, conn *pgx.Conn) int {
	t.Helper()
	var pid int
	if err := conn.QueryRow(context.Background(), "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	return pid
}

// psql runs the psql binary on conninfo with the token as PGPASSWORD and the extra environment variables env.
func psql(t *testing.T, conninfo, token string, env []string, args ...string) (string, error) {
	t.Helper()
	if _, err := exec.LookPath("psql"); err != nil {
		t.Fatal("psql not found: install postgresql-client")
	}
	cmd := exec.Command("psql", append([]string{"-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", conninfo}, args...)...)
	cmd.Env = append(cmd.Environ(), append([]string{"PGPASSWORD=" + token, "PGCONNECT_TIMEOUT=10"}, env...)...)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// quoteLiteral quotes s as an SQL string literal (standard_conforming_strings on).
func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// scrapeMetrics renders the proxy's metrics as /metrics serves them.
func scrapeMetrics(p *proxytest.Proxy) (string, error) {
	rec := httptest.NewRecorder()
	p.Server.AdminHandler(p.Registry, false).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	return rec.Body.String(), nil
}

// heapInUse is the live heap after a collection (the test shares its process with the proxy).
func heapInUse() int64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc)
}

// rawClient speaks the protocol by hand, for what drivers will not send.
type rawClient struct {
	net.Conn
	fe *pgproto3.Frontend
}

// dialRaw connects a rawClient to addr, with a 10 s deadline, closed when the test ends.
func dialRaw(t *testing.T, addr string) *rawClient {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return &rawClient{Conn: c, fe: pgproto3.NewFrontend(c, c)}
}

// send writes msgs in one flush.
func (c *rawClient) send(t *testing.T, msgs ...pgproto3.FrontendMessage) {
	t.Helper()
	for _, m := range msgs {
		c.fe.Send(m)
	}
	if err := c.fe.Flush(); err != nil {
		t.Fatal(err)
	}
}

// receive reads one message; an error fails the test.
func (c *rawClient) receive(t *testing.T) pgproto3.BackendMessage {
	t.Helper()
	m, err := c.fe.Receive()
	if err != nil {
		t.Fatalf("receive: %v", err)
	}
	return m
}

// startupPacket builds a StartupMessage with any protocol version.
func startupPacket(version uint32, params ...string) []byte {
	body := binary.BigEndian.AppendUint32(nil, version)
	for _, p := range params {
		body = append(append(body, p...), 0)
	}
	body = append(body, 0)
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(body)+4)), body...)
}

// rawStartup logs in by hand as sub with token to db (demo if empty); on a refusal it returns the error, and whether it came before the token was asked for.
func rawStartup(t *testing.T, p *proxytest.Proxy, sub, token, db string, params ...string) (c *rawClient, refused *pgproto3.ErrorResponse, beforeToken bool) {
	t.Helper()
	if db == "" {
		db = demo.Database
	}
	c = dialRaw(t, p.Addr)
	if _, err := c.Write(startupPacket(3<<16, append([]string{"user", sub, "database", db}, params...)...)); err != nil {
		t.Fatal(err)
	}
	asked := false
	for {
		m, err := c.fe.Receive()
		if err != nil {
			t.Fatalf("startup %q: %v", params, err)
		}
		switch m := m.(type) {
		case *pgproto3.AuthenticationCleartextPassword:
			asked = true
			c.send(t, &pgproto3.PasswordMessage{Password: token})
		case *pgproto3.ErrorResponse:
			e := *m
			if _, err := c.fe.Receive(); err == nil {
				t.Errorf("startup %q: a message followed the error %s", params, e.Message)
			}
			return nil, &e, !asked
		case *pgproto3.ReadyForQuery:
			return c, nil, false
		}
	}
}

// rawSession logs in by hand as sub, with a token minted for it and the extra startup parameters; a refusal fails the test.
func rawSession(t *testing.T, p *proxytest.Proxy, sub string, params ...string) *rawClient {
	t.Helper()
	c, e, _ := rawStartup(t, p, sub, p.Token(t, sub), "", params...)
	if e != nil {
		t.Fatalf("startup %q refused: %s %s: %s", params, e.Severity, e.Code, e.Message)
	}
	return c
}

// untilReady reads answers up to the n-th ReadyForQuery or a FATAL, as short strings (shortAnswer).
func untilReady(t *testing.T, c *rawClient, n int) []string {
	t.Helper()
	var seq []string
	for n > 0 {
		m := c.receive(t)
		seq = append(seq, shortAnswer(m))
		switch m := m.(type) {
		case *pgproto3.ErrorResponse:
			if m.Severity == "FATAL" {
				return seq
			}
		case *pgproto3.ReadyForQuery:
			n--
		}
	}
	return seq
}

// shortAnswer is a server message as a short string: E:code Z D:a,b C:tag G T, and ? for the rest.
func shortAnswer(m pgproto3.BackendMessage) string {
	switch m := m.(type) {
	case *pgproto3.ErrorResponse:
		return "E:" + m.Code
	case *pgproto3.ReadyForQuery:
		return "Z"
	case *pgproto3.DataRow:
		var vals []string
		for _, v := range m.Values {
			vals = append(vals, string(v))
		}
		return "D:" + strings.Join(vals, ",")
	case *pgproto3.CommandComplete:
		return "C:" + string(m.CommandTag)
	case *pgproto3.CopyInResponse:
		return "G"
	case *pgproto3.RowDescription:
		return "T"
	}
	return "?"
}

// queryEach sends each query alone and returns each one's answers, untilReady's strings joined by spaces.
func queryEach(t *testing.T, c *rawClient, queries ...string) []string {
	t.Helper()
	var out []string
	for _, q := range queries {
		c.send(t, &pgproto3.Query{String: q})
		out = append(out, strings.Join(untilReady(t, c, 1), " "))
	}
	return out
}

// sendCancel sends a CancelRequest to the proxy and waits for it to close the connection.
func sendCancel(addr string, pid, secret uint32) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	msg := binary.BigEndian.AppendUint32(nil, 16)
	msg = binary.BigEndian.AppendUint32(msg, 80877102)
	msg = binary.BigEndian.AppendUint32(msg, pid)
	msg = binary.BigEndian.AppendUint32(msg, secret)
	if _, err := c.Write(msg); err != nil {
		return err
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(make([]byte, 1)) // the proxy closes without a word
	if err == io.EOF {
		return nil
	}
	return err
}

// answersWithin3s reads answers up to ReadyForQuery, a FATAL, or a 3 s silence
// ("timeout"), as untilReady's short strings.
func answersWithin3s(t *testing.T, c *rawClient) []string {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	defer c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var seq []string
	for {
		m, err := c.fe.Receive()
		if err != nil {
			return append(seq, "timeout")
		}
		switch m := m.(type) {
		case *pgproto3.ErrorResponse:
			seq = append(seq, shortAnswer(m))
			if m.Severity == "FATAL" {
				return seq
			}
		case *pgproto3.DataRow, *pgproto3.CommandComplete:
			seq = append(seq, shortAnswer(m))
		case *pgproto3.ReadyForQuery:
			return append(seq, "Z"+string(m.TxStatus))
		}
	}
}

// oneConnection is transaction pooling over a single upstream connection.
func oneConnection(s *proxytest.Setup) {
	proxytest.TransactionPooling(s)
	s.PoolConfig = session.PoolConfig{Size: 1, MaxConns: 1, WaitTimeout: 5 * time.Second}
}

// oneSessionConnection is session pooling over a single upstream
// connection, so that consecutive sessions share one backend.
func oneSessionConnection(s *proxytest.Setup) {
	proxytest.SessionPooling(s)
	s.PoolConfig = session.PoolConfig{Size: 1, MaxConns: 1, WaitTimeout: 5 * time.Second}
}

// poolModes are both pool modes over one upstream connection, for attacks
// that must hold in each.
var poolModes = []struct {
	name  string
	setup proxytest.Option
}{
	{"transaction", oneConnection},
	{"session", oneSessionConnection},
}

// leftAfterEnd counts, from a new client on the single connection, the
// statements with text still there after the last client's session ended,
// polling up to 5 s for the sweep (each query is a transaction, which
// sweeps).
func leftAfterEnd(t *testing.T, p *proxytest.Proxy, text string) string {
	t.Helper()
	b := rawSession(t, p, "user2")
	defer b.Close()
	count := "SELECT count(*) FROM pg_prepared_statements WHERE statement = " + sqlquote.Literal(text)
	deadline := time.Now().Add(5 * time.Second)
	got := r10Must(t, b, count)[0]
	for got != "0" && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		got = r10Must(t, b, count)[0]
	}
	return got
}

// serverNameOf is the name on the server of the statement whose text
// contains like, as another client on the connection reads it from
// pg_prepared_statements.
func serverNameOf(t *testing.T, c *rawClient, like string) string {
	t.Helper()
	names := r10Must(t, c, "SELECT name FROM pg_prepared_statements WHERE statement LIKE "+sqlquote.Literal("%"+like+"%"))
	if len(names) != 1 {
		t.Fatalf("statements like %q: %v", like, names)
	}
	return names[0]
}
