package session_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rlsproxy/rlsproxy/internal/demo"
	"github.com/rlsproxy/rlsproxy/internal/pgtemp"
	"github.com/rlsproxy/rlsproxy/session"
)

var (
	upstream string
	cluster  *pgtemp.Cluster
)

func TestMain(m *testing.M) {
	ctx := context.Background()
	c, err := pgtemp.Start(ctx, pgtemp.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	cluster = c
	upstream, err = demo.Setup(ctx, c)
	code := 1
	if err == nil {
		code = m.Run()
	} else {
		fmt.Fprintln(os.Stderr, err)
	}
	c.Stop()
	os.Exit(code)
}

func TestInstall(t *testing.T) {
	ctx := context.Background()
	conn, err := pgconn.Connect(ctx, upstream)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	g := &session.Grant{Role: "authenticated", Settings: []session.Setting{
		{Name: "jwt.claims.sub", Value: "it's \"quoted\" \\ {braces}, commas"},
		{Name: "request.jwt.claims", Value: `{"sub":"x"}`},
	}}
	if err := session.Install(ctx, conn, g, nil); err != nil {
		t.Fatal(err)
	}
	rows, err := conn.Exec(ctx, "SELECT current_user, current_setting('jwt.claims.sub'), current_setting('request.jwt.claims')").ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	r := rows[0].Rows[0]
	if string(r[0]) != "authenticated" || string(r[1]) != g.Settings[0].Value || string(r[2]) != g.Settings[1].Value {
		t.Fatalf("after install: %q", r)
	}
}

// A failed install leaves nothing behind: settings and role are one
// transaction, so a connection is never half-switched.
func TestInstallIsAtomic(t *testing.T) {
	ctx := context.Background()
	conn, err := pgconn.Connect(ctx, upstream)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	g := &session.Grant{Role: "no_such_role", Settings: []session.Setting{{Name: "jwt.claims.sub", Value: "u1"}}}
	if err := session.Install(ctx, conn, g, nil); err == nil {
		t.Fatal("install with a missing role succeeded")
	}
	rows, err := conn.Exec(ctx, "SELECT current_user, coalesce(current_setting('jwt.claims.sub', true), '')").ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if r := rows[0].Rows[0]; string(r[0]) != "authenticator" || string(r[1]) != "" {
		t.Fatalf("after a failed install: %q", r)
	}
}

func TestOpenAndCancel(t *testing.T) {
	ctx := context.Background()
	d, err := session.NewDialer(upstream, nil)
	if err != nil {
		t.Fatal(err)
	}
	up, err := d.Open(ctx, d.Database(), map[string]string{"application_name": "opened"}, &session.Grant{Role: "authenticated"})
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	if g := up.Greeting(1, []byte{0, 0, 0, 1}); up.Parameter("application_name") != "opened" || !bytes.HasSuffix(g, []byte{'Z', 0, 0, 0, 5, 'I'}) {
		t.Fatalf("upstream: params %q, greeting %q", up.Parameter("application_name"), g)
	}
	if err := up.Cancel(ctx); err != nil {
		t.Fatal(err)
	}
	pool := session.NewPool(d, session.Policy{DefaultRole: "authenticated"}, session.PoolConfig{})
	defer pool.Close()
	if err := pool.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := session.NewDialer("postgres://%zz", nil); err == nil {
		t.Fatal("a bad DSN parsed")
	}
}

// A login whose writes are slow (a loaded machine) makes pgconn read the
// socket in the background, and a read of its can still be under way when
// the login is done: the connection's first answer, to the proxy's install,
// must not go to it.
func TestOpenSlowWrites(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := session.NewDialer(upstream, nil)
	if err != nil {
		t.Fatal(err)
	}
	var dialer net.Dialer
	session.SetDialFunc(d, func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dialer.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		s := &slowWrites{Conn: c}
		s.slow.Store(3)
		return s, nil
	})
	began := time.Now()
	up, err := d.Open(ctx, d.Database(), nil, &session.Grant{Role: "authenticated"})
	if err != nil {
		t.Fatalf("after %s: %v", time.Since(began).Round(time.Millisecond), err)
	}
	defer up.Close()
	if took := time.Since(began); took > 5*time.Second {
		t.Errorf("the login took %s", took)
	}
}

// slowWrites returns from each of its first slow writes (the login's:
// startup message, SCRAM's two) 40 ms after it is done: longer than pgconn
// waits (15 ms) before it starts reading in the background.
type slowWrites struct {
	net.Conn
	slow atomic.Int32
}

func (c *slowWrites) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if c.slow.Add(-1) >= 0 {
		time.Sleep(40 * time.Millisecond)
	}
	return n, err
}

// The signature of the carried settings is equal only for equal values (a
// missing one counts as empty), so that comparing it decides that a client's
// settings need not be given to a connection.
func TestCarriedSignature(t *testing.T) {
	base := map[string]string{"application_name": "app", "TimeZone": "UTC", "DateStyle": "ISO, MDY"}
	for _, c := range []struct {
		name  string
		other map[string]string
		same  bool
	}{
		{"equal", map[string]string{"application_name": "app", "TimeZone": "UTC", "DateStyle": "ISO, MDY"}, true},
		{"missing is empty", map[string]string{"application_name": "app", "TimeZone": "UTC", "DateStyle": "ISO, MDY", "IntervalStyle": ""}, true},
		{"not carried", map[string]string{"application_name": "app", "TimeZone": "UTC", "DateStyle": "ISO, MDY", "search_path": "x"}, true},
		{"one differs", map[string]string{"application_name": "app", "TimeZone": "Europe/Paris", "DateStyle": "ISO, MDY"}, false},
		{"bytes moved between settings", map[string]string{"application_name": "ap", "client_encoding": "p", "TimeZone": "UTC", "DateStyle": "ISO, MDY"}, false},
		{"one missing", map[string]string{"application_name": "app", "TimeZone": "UTC"}, false},
	} {
		if got := session.CarriedSignature(base) == session.CarriedSignature(c.other); got != c.same {
			t.Errorf("%s: same signature %v, want %v", c.name, got, c.same)
		}
	}
}

// Closing the pool ends the waits for a connection at once.
func TestPoolCloseEndsWaits(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := session.NewDialer(upstream, nil)
	if err != nil {
		t.Fatal(err)
	}
	pool := session.NewPool(d, session.Policy{DefaultRole: "authenticated"}, session.PoolConfig{Size: 1, MaxConns: 1, WaitTimeout: 20 * time.Second})
	target := session.NewTarget(d.Database(), nil, &session.Grant{Role: "authenticated"})
	held, _, err := pool.Acquire(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	waited := make(chan error, 1)
	go func() {
		_, _, err := pool.Acquire(ctx, target)
		waited <- err
	}()
	for pool.Snapshot().Waiting == 0 {
		if ctx.Err() != nil {
			t.Fatal("the second Acquire never waited")
		}
		time.Sleep(10 * time.Millisecond)
	}
	pool.Close()
	select {
	case err := <-waited:
		if err == nil {
			t.Fatal("a wait ended by Close got a connection")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a wait for a connection outlived the pool's Close")
	}
}

// The statements a connection holds are kept by owner: those of one
// session are dropped without touching the others', and the count follows.
func TestPreparedByOwner(t *testing.T) {
	up := session.NewIdleUpstream()
	steps := []struct {
		owner uint64
		name  string
		held  bool
		count int
	}{
		{1, "rlsproxy_1_1", true, 1},
		{1, "rlsproxy_1_1", true, 1}, // again: no second count
		{1, "rlsproxy_1_2", true, 2},
		{2, "rlsproxy_2_1", true, 3},
		{2, "rlsproxy_2_9", false, 3}, // never held
		{3, "rlsproxy_3_1", true, 4},
		{3, "rlsproxy_3_1", false, 3},
	}
	for i, s := range steps {
		up.SetPrepared(s.owner, s.name, s.held)
		if got := up.PreparedCount(); got != s.count {
			t.Fatalf("step %d: count %d, want %d", i, got, s.count)
		}
		if up.Prepared(s.owner, s.name) != s.held {
			t.Fatalf("step %d: Prepared(%d, %s) = %v", i, s.owner, s.name, !s.held)
		}
	}
	var owners []uint64
	up.PreparedOwners(func(o uint64) { owners = append(owners, o) })
	slices.Sort(owners)
	if !slices.Equal(owners, []uint64{1, 2}) {
		t.Fatalf("owners %v, want [1 2] (3's only statement was dropped)", owners)
	}
	dropped := up.DropPrepared(1)
	slices.Sort(dropped)
	if !slices.Equal(dropped, []string{"rlsproxy_1_1", "rlsproxy_1_2"}) || up.PreparedCount() != 1 ||
		up.Prepared(1, "rlsproxy_1_1") || !up.Prepared(2, "rlsproxy_2_1") {
		t.Fatalf("after dropping 1's: dropped %v, count %d", dropped, up.PreparedCount())
	}
	if up.Prepared(1, "rlsproxy_2_1") {
		t.Fatal("a statement is found under another owner")
	}
	if none := up.DropPrepared(7); len(none) != 0 || up.PreparedCount() != 1 {
		t.Fatalf("dropping an owner with no statements: %v, count %d", none, up.PreparedCount())
	}
	up.SetPrepared(1, "rlsproxy_1_3", true) // an owner dropped before
	if !up.Prepared(1, "rlsproxy_1_3") || up.PreparedCount() != 2 {
		t.Fatalf("a statement of a dropped owner: count %d", up.PreparedCount())
	}
	up.MarkPreparedUnknown()
	up.ForgetPrepared()
	if up.PreparedCount() != 0 || up.Prepared(2, "rlsproxy_2_1") || up.PreparedUnknown() {
		t.Fatal("ForgetPrepared left statements")
	}
}
