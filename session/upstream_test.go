package session_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"testing"

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
