package main

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/rlsproxy/rlsproxy/session"
)

// --config: keys are flag names; the command line and RLSPROXY_* win; an
// unknown key or a bad value refuses the file.
func TestConfigFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "rlsproxy.yaml")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
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
	path := filepath.Join(t.TempDir(), "rlsproxy.yaml")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("log-level: info\npool-size: 5\nframe-timeout: 30s\n")
	build := serveBuilder(serveArgs("--config", path))
	cfg, _, err := build(true)
	if err != nil {
		t.Fatal(err)
	}
	cfg.reread = func() (*serveConfig, error) { next, _, err := build(true); return next, err }
	var logs lockedBuffer
	live := &liveConfig{cfg: cfg, log: slog.New(slog.NewTextHandler(&logs, nil))}
	live.set(nil, session.NewPool(cfg.dialer, cfg.policy, cfg.pool))

	pool := live.pool
	write("log-level: debug\npool-size: 8\nframe-timeout: 10s\nrole-map: [admins=app_admin]\nclaim-prefix: other.\n")
	live.reload()
	if got := cfg.level.Level(); got != slog.LevelDebug {
		t.Errorf("log level %v after the reload, want debug", got)
	}
	if !strings.Contains(logs.String(), "applied=\"[frame-timeout log-level pool-size role-map]\"") || !strings.Contains(logs.String(), "needs_restart=[claim-prefix]") {
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
