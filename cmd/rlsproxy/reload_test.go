package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/rlsproxy/rlsproxy/auth"
	"github.com/rlsproxy/rlsproxy/internal/devissuer"
	"github.com/rlsproxy/rlsproxy/session"
)

// --config: keys are flag names; the command line and RLSPROXY_* win; an
// unknown key or a bad value refuses the file.
func TestConfigFile(t *testing.T) {
	path, write := configFile(t)
	write("pool-size: 7\nrole-map: [admins=app_admin, ops=app_ops]\nlog-level: debug\nguard-allow-code: false\nmax-client-conns: 50\n")
	t.Setenv("RLSPROXY_MAX_CLIENT_CONNS", "60")
	cfg, _, err := serveBuilder(serveArgs("--config", path, "--pool-size", "9"))(true)
	if err != nil {
		t.Fatal(err)
	}
	for flag, want := range map[string]string{
		"pool-size":        "9",  // the command line wins
		"max-client-conns": "60", // the environment wins
		"role-map":         "admins=app_admin,ops=app_ops",
		"log-level":        "debug",
	} {
		if got := cfg.flags[flag]; got != want {
			t.Errorf("%s = %q, want %q", flag, got, want)
		}
	}
	for body, want := range map[string]string{
		"pool-sise: 7\n":       `"pool-sise" is not a flag`,
		"pool-size: seven\n":   "invalid value",
		"config: other.yaml\n": `"config" is not a flag`,
		"pool-size: [1\n":      "--config",
	} {
		write(body)
		if _, _, err := serveBuilder(serveArgs("--config", path))(true); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want an error containing %q", body, err, want)
		}
	}
}

// SIGHUP's reload applies what can change live, says what needs a restart,
// and refuses a configuration that does not validate, whole.
func TestReload(t *testing.T) {
	path, write := configFile(t)
	write("log-level: info\npool-size: 5\nframe-timeout: 30s\n")
	build := serveBuilder(serveArgs("--config", path))
	cfg, _, err := build(true)
	if err != nil {
		t.Fatal(err)
	}
	cfg.reread = func() (*serveConfig, error) { next, _, err := build(true); return next, err }
	var logs lockedBuffer
	live := &liveConfig{cfg: cfg, log: slog.New(slog.NewTextHandler(&logs, nil))}
	live.set(nil, session.NewPool(cfg.dialer, cfg.policy, cfg.pool), nil, nil)

	pool := live.pool
	write("log-level: debug\npool-size: 8\nframe-timeout: 10s\nrole-map: [admins=app_admin]\nclaim-prefix: other.\nmax-client-conns: 5\nshutdown-timeout: 7s\n")
	live.reload()
	if got := live.shutdownTimeout(); got != 7*time.Second {
		t.Errorf("--shutdown-timeout %s after the reload, want 7s", got)
	}
	if got := cfg.level.Level(); got != slog.LevelDebug {
		t.Errorf("log level %v after the reload, want debug", got)
	}
	if !strings.Contains(logs.String(), "applied=\"[frame-timeout log-level max-client-conns pool-size role-map shutdown-timeout]\"") || !strings.Contains(logs.String(), "needs_restart=[claim-prefix]") {
		t.Errorf("the reload's line:\n%s", logs.String())
	}
	if p := pool.Policy(); len(p.RoleMap) != 1 || p.RoleMap[0].Role != "app_admin" || p.ClaimPrefix != "jwt.claims." {
		t.Errorf("the pool's policy after the reload: %+v", p)
	}

	write("log-level: warn\nleeway: 1h\n") // --leeway is at most 5 minutes
	live.reload()
	if got := cfg.level.Level(); got != slog.LevelDebug {
		t.Errorf("a refused configuration changed the log level to %v", got)
	}
	if !strings.Contains(logs.String(), "refused whole") {
		t.Errorf("no line about the refused configuration:\n%s", logs.String())
	}
}

// configFile is a --config file for a test, and what writes it anew.
func configFile(t *testing.T) (string, func(string)) {
	path := filepath.Join(t.TempDir(), "rlsproxy.yaml")
	return path, func(s string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// A reload that changes the issuer or the token rules swaps the verifier
// whole once the new issuer's keys load; one whose keys do not load (an
// error page answered with 200) is refused whole, and the running issuer
// keeps serving logins.
func TestReloadIssuer(t *testing.T) {
	clearEnv(t)
	a, b := startIssuer(t), startIssuer(t)
	broken := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte(`{"keys": []}`))
	}))
	t.Cleanup(broken.Close)

	path, write := configFile(t)
	write("issuer: " + a.URL + "\nclient-id: " + devissuer.ClientID + "\nlog-level: info\n")
	build := serveBuilder([]string{"--upstream", testUpstream, "--config", path})
	cfg, _, err := build(true)
	if err != nil {
		t.Fatal(err)
	}
	cfg.reread = func() (*serveConfig, error) { next, _, err := build(true); return next, err }
	var logs lockedBuffer
	live := &liveConfig{cfg: cfg, log: slog.New(slog.NewTextHandler(&logs, nil)), keyWait: 5 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	newVerifier := func(c auth.Config) (*auth.Verifier, error) { return auth.New(ctx, c) }
	first, err := live.loadVerifierWith(newVerifier, cfg.auth)
	if err != nil {
		t.Fatal(err)
	}
	v := &liveVerifier{}
	v.v.Store(first)
	live.set(nil, nil, v, newVerifier)

	mint := func(iss *devissuer.Issuer, use string) string {
		t.Helper()
		tok, err := iss.Mint(devissuer.TokenRequest{Subject: "alice", TokenUse: use})
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	accepts := func(when string, want map[string]bool) {
		t.Helper()
		for tok, ok := range want {
			_, err := v.Verify(ctx, tok)
			if (err == nil) != ok {
				t.Errorf("%s: token of %s: error %v, want accepted=%v", when, tokenIssuer(t, tok), err, ok)
			}
		}
	}
	tokA, tokB, idB := mint(a, "access"), mint(b, "access"), mint(b, "id")
	accepts("before the reload", map[string]bool{tokA: true, tokB: false})

	write("issuer: " + b.URL + "\nclient-id: " + devissuer.ClientID + "\nlog-level: info\n")
	live.reload()
	accepts("after the reload to issuer B", map[string]bool{tokA: false, tokB: true, idB: false})
	if !strings.Contains(logs.String(), "applied=[issuer]") {
		t.Errorf("the reload's line:\n%s", logs.String())
	}

	// A token rule alone: id tokens instead of access tokens; the token
	// cache starts empty, so B's access token cached above is judged again.
	write("issuer: " + b.URL + "\nclient-id: " + devissuer.ClientID + "\ntoken-use: id\nlog-level: info\n")
	live.reload()
	accepts("after the reload to id tokens", map[string]bool{tokB: false, idB: true})

	// An issuer whose key set is an error page: refused whole (the log
	// level with it); B and its rules stay.
	write("issuer: " + broken.URL + "\nclient-id: " + devissuer.ClientID + "\nlog-level: debug\n")
	live.reload()
	accepts("after the refused reload", map[string]bool{idB: true, tokB: false})
	if got := cfg.level.Level(); got != slog.LevelInfo {
		t.Errorf("a refused reload changed the log level to %v", got)
	}
	if !strings.Contains(logs.String(), "refused, and the configuration with them, whole") || !strings.Contains(logs.String(), "no usable key") {
		t.Errorf("no line about the refused issuer:\n%s", logs.String())
	}
	if !v.Ready(ctx) {
		t.Error("not ready after a refused reload")
	}
}

// startIssuer serves a dev issuer with a key of its own on loopback.
func startIssuer(t *testing.T) *devissuer.Issuer {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	var iss atomic.Pointer[devissuer.Issuer]
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { iss.Load().ServeHTTP(w, r) }))
	t.Cleanup(srv.Close)
	d, err := devissuer.New(srv.URL, key)
	if err != nil {
		t.Fatal(err)
	}
	iss.Store(d)
	return d
}

// tokenIssuer is the iss claim of tok, for messages.
func tokenIssuer(t *testing.T, tok string) string {
	t.Helper()
	claims := jwt.MapClaims{}
	if _, _, err := jwt.NewParser().ParseUnverified(tok, claims); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprint(claims["iss"], " (", claims["token_use"], ")")
}
