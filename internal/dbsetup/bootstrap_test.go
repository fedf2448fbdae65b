package dbsetup_test

import (
	"github.com/rlsproxy/rlsproxy/internal/dbsetup"

	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rlsproxy/rlsproxy/session"
)

func testSigner(t *testing.T) *session.Signer {
	t.Helper()
	s, err := session.NewSigner([]byte(strings.Repeat("k", 64)))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// The bootstrap SQL runs twice without error, and the auth functions it
// creates verify the signature the proxy sets: a forged, edited or copied
// claim setting raises an error.
func TestBootstrapSQL(t *testing.T) {
	ctx := context.Background()
	if err := cluster.Exec(ctx, "postgres", "CREATE DATABASE boot"); err != nil {
		t.Fatal(err)
	}
	policy := session.Policy{DefaultRole: "authenticated", RoleMap: []session.RoleRule{{Group: "g", Role: "boot_editor"}},
		ClaimsSetting: "request.jwt.claims", ClaimPrefix: "jwt.claims."}
	signer := testSigner(t)
	sql, err := dbsetup.BootstrapSQL(dbsetup.BootstrapOptions{Policy: policy, Login: "authenticator", Database: "boot",
		Signer: signer, Leeway: 30 * time.Second, Harden: true})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if err := cluster.Exec(ctx, "boot", sql); err != nil {
			t.Fatalf("run %d: %v", i+1, err)
		}
	}

	dsn := strings.Replace(upstream, "/app?", "/boot?", 1)
	// Sessions of authenticated log in as its own login, as the proxy does
	// with a signing key (the bootstrap revoked the role from authenticator).
	login := session.LoginFor("authenticator", "authenticated")
	open := func() *pgconn.PgConn {
		cfg, err := pgconn.ParseConfig(dsn)
		if err != nil {
			t.Fatal(err)
		}
		cfg.User, cfg.Password = login, signer.LoginPassword(login)
		c, err := pgconn.ConnectConfig(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(ctx) })
		return c
	}
	query := func(c *pgconn.PgConn, sql string) (string, error) {
		res, err := c.Exec(ctx, sql).ReadAll()
		if err != nil {
			return "", err
		}
		last := res[len(res)-1]
		if len(last.Rows) == 0 || last.Rows[0][0] == nil {
			return "NULL", nil
		}
		return string(last.Rows[0][0]), nil
	}
	exp := time.Now().Add(time.Hour).Unix()
	claims := `{"sub":"u1","exp":` + itoa(exp) + `}`
	grant := &session.Grant{Role: "authenticated", Claims: claims, Settings: []session.Setting{{Name: "request.jwt.claims", Value: claims}}}

	a := open()
	if err := session.Install(ctx, a, grant, signer); err != nil {
		t.Fatal(err)
	}
	if got, err := query(a, "SELECT auth.user_id()"); err != nil || got != "u1" {
		t.Fatalf("auth.user_id() = %q, %v", got, err)
	}
	sig, _ := query(a, "SELECT current_setting('rlsproxy.claims_signature')")

	// Hardened: the mapped role cannot call set_config, so the attacks
	// below run as the login role (as with the guard off and no hardening).
	if _, err := query(a, "SELECT set_config('jwt.claims.sub', 'x', false)"); err == nil {
		t.Fatal("hardening did not revoke set_config from the mapped role")
	}
	// The attacker: another session, as user u2, on another backend.
	b := open()
	claims2 := strings.Replace(claims, "u1", "u2", 1)
	if err := session.Install(ctx, b, &session.Grant{Role: "authenticated", Claims: claims2,
		Settings: []session.Setting{{Name: "request.jwt.claims", Value: claims2}}}, signer); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, attack string }{
		{"forged", `SET request.jwt.claims = '{"sub":"u1","exp":` + itoa(exp) + `}'`},
		{"edited", "SET request.jwt.claims = '" + strings.Replace(claims2, `"exp"`, `"admin":true,"exp"`, 1) + "'"},
		{"copied with its signature", "SET request.jwt.claims = '" + claims + "'; SET rlsproxy.claims_signature = '" + sig + "'"},
		{"signature copied", "SET rlsproxy.claims_signature = '" + sig + "'"},
	} {
		if _, err := query(b, tc.attack); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		got, err := query(b, "SELECT auth.user_id()")
		if err == nil || !strings.Contains(err.Error(), "valid signature") {
			t.Fatalf("%s: auth.user_id() = %q, %v; want an error", tc.name, got, err)
		}
	}
	// Claims reset away: NULL, no one's rows.
	if got, err := query(a, "RESET request.jwt.claims; SELECT auth.user_id()"); err != nil || got != "NULL" {
		t.Fatalf("after RESET: auth.user_id() = %q, %v; want NULL", got, err)
	}

	// An expired token's claims fail, even signed.
	old := `{"sub":"u1","exp":` + itoa(time.Now().Add(-time.Hour).Unix()) + `}`
	c := open()
	if err := session.Install(ctx, c, &session.Grant{Role: "authenticated", Claims: old,
		Settings: []session.Setting{{Name: "request.jwt.claims", Value: old}}}, signer); err != nil {
		t.Fatal(err)
	}
	if _, err := query(c, "SELECT auth.user_id()"); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("expired claims: %v", err)
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func TestBootstrapSQLRefusesLoginAsMappedRole(t *testing.T) {
	_, err := dbsetup.BootstrapSQL(dbsetup.BootstrapOptions{Policy: session.Policy{DefaultRole: "authenticator", ClaimsSetting: "c.d"}, Login: "authenticator"})
	if err == nil {
		t.Fatal("the login role as a mapped role was accepted")
	}
}

func TestSigner(t *testing.T) {
	if _, err := session.NewSigner([]byte("short")); err == nil {
		t.Fatal("a short key was accepted")
	}
	s := testSigner(t)
	a, b := s.Sign(1, "x"), s.Sign(1, "x")
	if a != b || a == s.Sign(2, "x") {
		t.Fatal("signatures are not bound to the backend")
	}
}
