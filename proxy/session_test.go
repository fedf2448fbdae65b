package proxy_test

import (
	"github.com/rlsproxy/rlsproxy/internal/devissuer"

	"context"
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/rlsproxy/rlsproxy/auth"
	"github.com/rlsproxy/rlsproxy/internal/proxytest"
	"github.com/rlsproxy/rlsproxy/session"
)

// Each user sees only their own notes, through psql and through pgx.
func TestEachUserSeesOnlyOwnRows(t *testing.T) {
	p := proxytest.Start(t, pg)
	for _, tc := range []struct {
		user string
		want []string
	}{
		{"user1", []string{"user1: buy milk", "user1: call the bank"}},
		{"user2", []string{"user2: water the plants"}},
		{"user3", nil},
	} {
		t.Run(tc.user, func(t *testing.T) {
			tok := p.Token(t, tc.user)
			out, err := psql(t, p.DSN(tc.user, ""), tok, nil, "-c", "SELECT content FROM notes ORDER BY id")
			if err != nil {
				t.Fatalf("psql: %v\n%s", err, out)
			}
			if got := strings.Join(tc.want, "\n"); out != got {
				t.Fatalf("psql rows = %q, want %q", out, got)
			}
			conn := connect(t, p, tc.user, tok)
			got := queryStrings(t, conn, "SELECT content FROM notes ORDER BY id")
			if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Fatalf("pgx rows = %q, want %q", got, tc.want)
			}
			var cu, su string
			if err := conn.QueryRow(context.Background(), "SELECT current_user, session_user").Scan(&cu, &su); err != nil {
				t.Fatal(err)
			}
			if cu != "authenticated" || su != "authenticator" {
				t.Fatalf("current_user, session_user = %s, %s; want authenticated, authenticator", cu, su)
			}
			// Writes are checked by the policy too.
			if _, err := conn.Exec(context.Background(), "INSERT INTO notes (content) VALUES ('new')"); err != nil {
				t.Fatalf("insert own row: %v", err)
			}
			if _, err := conn.Exec(context.Background(), "INSERT INTO notes (user_id, content) VALUES ('someone-else', 'x')"); err == nil {
				t.Fatal("inserting a row for another user succeeded")
			}
			if _, err := conn.Exec(context.Background(), "DELETE FROM notes WHERE content = 'new'"); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// The claims arrive as settings: the whole set as JSON, each claim on its
// own, non-strings as JSON text, and names that cannot be settings skipped.
func TestClaimSettings(t *testing.T) {
	p := proxytest.Start(t, pg)
	tok, err := p.Issuer.Mint(devissuer.TokenRequest{Subject: "user1", TokenUse: "id", Groups: []string{"g1", "g2"},
		Extra: map[string]any{"custom:tenant": "t1", "tenant_id": 42, "profile": map[string]any{"tier": "gold"}}})
	if err != nil {
		t.Fatal(err)
	}
	// The harness accepts access tokens; accept id tokens for this test.
	pid := proxytest.Start(t, pg, withVerifier(t, p, auth.Rules{TokenUse: "id"}))
	conn := connect(t, pid, "user1", tok)
	ctx := context.Background()
	var claims, sub, verified, tenant, profile, groupsMissing string
	err = conn.QueryRow(ctx, `SELECT current_setting('request.jwt.claims'), current_setting('jwt.claims.sub'),
		current_setting('jwt.claims.email_verified'), current_setting('jwt.claims.tenant_id'),
		current_setting('jwt.claims.profile'), coalesce(current_setting('jwt.claims.cognito:groups', true), 'unset')`).
		Scan(&claims, &sub, &verified, &tenant, &profile, &groupsMissing)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(claims), &m); err != nil {
		t.Fatalf("request.jwt.claims is not JSON: %v", err)
	}
	if m["sub"] != "user1" || m["custom:tenant"] != "t1" || m["email_verified"] != true {
		t.Fatalf("request.jwt.claims = %s", claims)
	}
	if sub != "user1" || verified != "true" || tenant != "42" || profile != `{"tier":"gold"}` {
		t.Fatalf("claim settings: sub=%q email_verified=%q tenant_id=%q profile=%q", sub, verified, tenant, profile)
	}
	if groupsMissing != "unset" {
		t.Fatalf("a claim name with a colon became a setting: %q", groupsMissing)
	}
	if !strings.Contains(pid.Logs(), "claim skipped") {
		t.Fatal("skipped claims are not logged")
	}
}

// withVerifier replaces the harness verifier by one for p's issuer with
// other rules.
func withVerifier(t *testing.T, p *proxytest.Proxy, r auth.Rules) proxytest.Option {
	r.Issuer = p.Issuer.URL
	if r.ClientIDs == nil {
		r.ClientIDs = []string{devissuer.ClientID}
	}
	r.Leeway = 5 * time.Second
	v, err := auth.New(context.Background(), auth.Config{Rules: r})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)
	for deadline := time.Now().Add(10 * time.Second); !v.Ready(context.Background()); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("verifier never loaded the JWKS")
		}
	}
	return func(c *proxytest.Setup) { c.Verifier = v }
}

// The first group of the token, in the token's order, that the role map
// names decides the role; a token with no mapped group gets --role, and with
// --role empty it is refused with 28000.
func TestRoleMapping(t *testing.T) {
	rules := []session.RoleRule{{Group: "admins", Role: "admin"}, {Group: "editors", Role: "editor"}}
	p := proxytest.Start(t, pg, func(c *proxytest.Setup) { c.Policy.RoleMap = rules })
	for _, tc := range []struct {
		groups []string
		want   string
	}{
		{nil, "authenticated"},
		{[]string{"unmapped"}, "authenticated"},
		{[]string{"unmapped", "admins"}, "admin"},
		{[]string{"editors", "admins"}, "editor"},
		{[]string{"admins", "editors"}, "admin"},
	} {
		conn := connect(t, p, "user1", p.Token(t, "user1", tc.groups...))
		got := queryStrings(t, conn, "SELECT current_user::text")
		if got[0] != tc.want {
			t.Errorf("groups %v: role %s, want %s", tc.groups, got[0], tc.want)
		}
	}
	// admin's policy shows every row.
	conn := connect(t, p, "user1", p.Token(t, "user1", "admins"))
	if n := len(queryStrings(t, conn, "SELECT content FROM notes")); n != 3 {
		t.Errorf("admin sees %d notes, want 3", n)
	}

	noDefault := proxytest.Start(t, pg, func(c *proxytest.Setup) { c.Policy.RoleMap = rules; c.Policy.DefaultRole = "" })
	e := connectErr(t, noDefault.DSN("user1", noDefault.Token(t, "user1", "unmapped")))
	if e.Code != "28000" || !strings.Contains(e.Message, "no database role") {
		t.Fatalf("unmapped token without --role: %s %s", e.Code, e.Message)
	}
}

// A client whose user is "anonymous" gets --anonymous-role without a token;
// with no anonymous role it must send a token like anyone else.
func TestAnonymous(t *testing.T) {
	p := proxytest.Start(t, pg, func(c *proxytest.Setup) { c.Policy.AnonymousRole = "anon" })
	conn := connect(t, p, "anonymous", "")
	if got := queryStrings(t, conn, "SELECT current_user::text"); got[0] != "anon" {
		t.Fatalf("anonymous role = %s", got[0])
	}
	// No claims are set, so the demo policy fails closed.
	if _, err := conn.Exec(context.Background(), "SELECT * FROM notes"); err == nil {
		t.Fatal("anonymous read notes without claims")
	}

	off := proxytest.Start(t, pg)
	e := connectErr(t, off.DSN("anonymous", "x"))
	if e.Code != "28P01" {
		t.Fatalf("anonymous without --anonymous-role: %s %s", e.Code, e.Message)
	}
}

// Bad tokens are refused at startup with FATAL 28P01 or 28000 and a message
// that never holds the token.
func TestAuthenticationFailures(t *testing.T) {
	p := proxytest.Start(t, pg)
	expired, _ := p.Issuer.Mint(devissuer.TokenRequest{Subject: "user1", TTL: -time.Hour})
	idToken, _ := p.Issuer.Mint(devissuer.TokenRequest{Subject: "user1", TokenUse: "id"})
	for _, tc := range []struct {
		name, token, code, msg string
	}{
		{"garbage", "not-a-token", "28P01", "not a JWT"},
		{"expired", expired, "28P01", "token expired at"},
		{"tampered", tamper(p.Token(t, "user1")), "28P01", "signature does not match"},
		{"id token", idToken, "28000", "token_use id is not accepted: send the access token"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := connectErr(t, p.DSN("user1", tc.token))
			if e.Severity != "FATAL" || e.Code != tc.code || !strings.Contains(e.Message, tc.msg) {
				t.Fatalf("got %s %s %q, want FATAL %s %q", e.Severity, e.Code, e.Message, tc.code, tc.msg)
			}
			if len(tc.token) > 20 && strings.Contains(e.Message+p.Logs(), tc.token[len(tc.token)-20:]) {
				t.Fatal("the token leaked into the message or the log")
			}
		})
	}
	out, err := psql(t, p.DSN("user1", ""), expired, nil, "-c", "SELECT 1")
	if err == nil || !strings.Contains(out, "token expired at") {
		t.Fatalf("psql with an expired token: %v %s", err, out)
	}
}

// tamper swaps the payload of a token for another subject's, keeping the
// signature: the signature then matches no key.
func tamper(tok string) string {
	parts := strings.Split(tok, ".")
	parts[1] = strings.TrimRight(parts[1], "A") + "B"
	return strings.Join(parts, ".")
}

// Upstream failures reach the client as FATAL 08001 (cannot log in) or
// 08006 (logged in, role switch failed) with the reason.
func TestUpstreamFailures(t *testing.T) {
	t.Run("connect", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		closed := l.Addr().String()
		l.Close() // nothing listens there now
		bad := strings.Replace(pg.Upstream, fmt.Sprintf("127.0.0.1:%d", pg.Port), closed, 1)
		p := proxytest.Start(t, pg, func(c *proxytest.Setup) { c.Upstream = bad + "&connect_timeout=2" })
		e := connectErr(t, p.DSN("user1", p.Token(t, "user1")))
		if e.Severity != "FATAL" || e.Code != "08001" || !strings.Contains(e.Message, "upstream connection failed") {
			t.Fatalf("got %s %s %q", e.Severity, e.Code, e.Message)
		}
	})
	t.Run("role", func(t *testing.T) {
		for role, msg := range map[string]string{"nosuchrole": "does not exist", "outsider": "may not switch"} {
			p := proxytest.Start(t, pg, func(c *proxytest.Setup) { c.Policy.DefaultRole = role })
			e := connectErr(t, p.DSN("user1", p.Token(t, "user1")))
			if e.Severity != "FATAL" || e.Code != "08006" || !strings.Contains(e.Message, msg) {
				t.Fatalf("role %s: got %s %s %q", role, e.Severity, e.Code, e.Message)
			}
		}
	})
}

// The session ends when the token expires: at once when idle, after the
// running statement when busy; --on-token-expiry ignore keeps it.
func TestTokenExpiry(t *testing.T) {
	ctx := context.Background()
	mint := func(p *proxytest.Proxy, ttl time.Duration) string {
		// exp is whole seconds: start from a fresh second so ttl is exact enough.
		time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second)))
		tok, err := p.Issuer.Mint(devissuer.TokenRequest{Subject: "user1", TTL: ttl})
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	t.Run("idle", func(t *testing.T) {
		p := proxytest.Start(t, pg)
		conn := connect(t, p, "user1", mint(p, time.Second))
		time.Sleep(1500 * time.Millisecond)
		_, err := conn.Exec(ctx, "SELECT 1")
		if err == nil || !strings.Contains(err.Error(), "token expired at") {
			t.Fatalf("query after expiry: %v", err)
		}
	})
	t.Run("busy", func(t *testing.T) {
		p := proxytest.Start(t, pg)
		conn := connect(t, p, "user1", mint(p, time.Second))
		if _, err := conn.Exec(ctx, "SELECT pg_sleep(2)"); err != nil {
			t.Fatalf("the statement running at expiry was cut off: %v", err)
		}
		if _, err := conn.Exec(ctx, "SELECT 1"); err == nil {
			t.Fatal("the session outlived its token")
		}
	})
	t.Run("ignore", func(t *testing.T) {
		p := proxytest.Start(t, pg, func(c *proxytest.Setup) { c.TerminateOnExpiry = false })
		conn := connect(t, p, "user1", mint(p, time.Second))
		time.Sleep(1500 * time.Millisecond)
		if _, err := conn.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatalf("with ignore, the session ended: %v", err)
		}
	})
}

// pg_stat_activity shows the install statements with placeholders only:
// claim values travel as bind parameters.
func TestClaimsNeverInStatementText(t *testing.T) {
	p := proxytest.Start(t, pg)
	secret := "sub-" + strings.Repeat("z", 12)
	conn := connect(t, p, secret, p.Token(t, secret))
	_ = conn
	admin := superConn(t)
	var n int
	if err := admin.QueryRow(context.Background(),
		"SELECT count(*) FROM pg_stat_activity WHERE usename = 'authenticator' AND query LIKE '%set_config%'").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n == 0 {
		t.Fatal("the install statement is not visible; the test proves nothing")
	}
	if err := admin.QueryRow(context.Background(),
		"SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%'||$1||'%' AND pid <> pg_backend_pid()", secret).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatal("a claim value appears in pg_stat_activity")
	}
}

// Reconnecting with the same token is answered from the token cache, and
// the hits and misses are counted in /metrics.
func TestTokenCacheMetrics(t *testing.T) {
	p := proxytest.Start(t, pg)
	tok := p.Token(t, "user1")
	for range 3 {
		c := connect(t, p, "user1", tok)
		c.Close(context.Background())
	}
	if hits := p.Counter(t, "rlsproxy_token_cache_lookups_total"); hits != 3 {
		t.Fatalf("cache lookups counted: %v, want 3", hits)
	}
	out, err := scrapeMetrics(p)
	if err != nil || !strings.Contains(out, `rlsproxy_token_cache_lookups_total{result="hit"} 2`) {
		t.Fatalf("metrics: %v\n%s", err, out)
	}
}
